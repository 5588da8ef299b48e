"""Shared fixtures: the real ml-latest-small, one local Ray cluster per session, tiny synthetic data."""

from __future__ import annotations

import os
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest
from helpers import FAKE_AWS_ACCESS_KEY_ID, FAKE_AWS_SECRET_ACCESS_KEY, SHARED

ML_LATEST_SMALL = SHARED / "data" / "ml-latest-small"


@pytest.fixture(scope="session")
def ml_latest_small() -> Path:
    """The real ml-latest-small directory (ratings.csv, movies.csv); skipped where it is absent."""
    if not (ML_LATEST_SMALL / "ratings.csv").exists():
        pytest.skip(f"real MovieLens data not found at {ML_LATEST_SMALL} (set RECDIST_SHARED)")
    return ML_LATEST_SMALL


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster shared by every test marked `ray` (started once: start-up costs seconds)."""
    import ray

    from recdist.train.cluster import IDLE_WORKERS_KEPT

    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    os.environ.setdefault("RAY_num_workers_soft_limit", str(4 + IDLE_WORKERS_KEPT))  # as recdist's local cluster
    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


# --- S3: a real S3 API server (moto) on loopback, for every test session -------------------------------------

class S3Server:
    """A moto S3 server in this process: its endpoint, a bucket maker, and a switch that rejects all keys."""

    def __init__(self, endpoint: str):
        self.endpoint = endpoint

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=FAKE_AWS_ACCESS_KEY_ID,
            aws_secret_access_key=FAKE_AWS_SECRET_ACCESS_KEY,
            region_name="us-east-1",
        )

    def bucket(self, name: str) -> str:
        """Create bucket `name` (if new) and return its s3:// URI."""
        client = self.client()
        try:
            client.create_bucket(Bucket=name)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
        return f"s3://{name}"

    @contextmanager
    def rejecting_credentials(self):
        """Within the block the server authenticates every request, and knows no key: all are refused."""
        import urllib.request

        def reset_auth(count: str) -> None:
            request = urllib.request.Request(
                f"{self.endpoint}/moto-api/reset-auth", data=count.encode(), headers={"Content-Type": "text/plain"}
            )
            urllib.request.urlopen(request, timeout=5).read()

        reset_auth("0")
        try:
            yield
        finally:
            reset_auth("inf")


@pytest.fixture(scope="session", autouse=True)
def s3_server():
    """One moto S3 server on 127.0.0.1 (free port) and the AWS_* variables pointing at it, for the whole session.

    Autouse on purpose: the variables are set before any test starts the session Ray cluster, so Ray workers
    (which inherit the driver's environment when the cluster starts) reach the same endpoint with the same
    fake keys; and no test can ever reach real AWS. The previous environment is restored at the end.
    """
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no access log line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": FAKE_AWS_ACCESS_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": FAKE_AWS_SECRET_ACCESS_KEY,
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    hidden = ("AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_REGION")  # would override ours
    saved = {key: os.environ.get(key) for key in (*env, *hidden)}
    for key in hidden:
        os.environ.pop(key, None)
    os.environ.update(env)
    try:
        yield S3Server(env["AWS_ENDPOINT_URL"])
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> str:
    """A fresh, empty bucket on the session's S3 server, as "s3://<bucket>"."""
    return s3_server.bucket(f"recdist-test-{uuid.uuid4().hex[:12]}")


@pytest.fixture(autouse=True)
def _logging_reset():
    """Every test starts with recdist's logging unconfigured (a CLI test in this process configures it)."""
    from recdist import logs

    logs.reset()
    yield
    logs.reset()
