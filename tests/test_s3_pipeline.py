"""The whole pipeline on S3 (a moto server on loopback): input, Ray Train checkpoints and outputs under s3://.

Endpoint and keys come only from the standard AWS_* variables (tests/conftest.py), as for MinIO or AWS. The
fake keys are recognisable, so every file the run writes (in the bucket and locally, Ray's logs included) and
everything it prints is searched for them. Bucket, credential and endpoint problems stop the CLI with exit
status 2 and a clear message before any training starts.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest
import yaml
from helpers import FAKE_AWS_ACCESS_KEY_ID, FAKE_AWS_SECRET_ACCESS_KEY, free_port

from recdist.cli import main
from recdist.train.run import FAIL_AT_EPOCH_ENV

SECRETS = (FAKE_AWS_ACCESS_KEY_ID.encode(), FAKE_AWS_SECRET_ACCESS_KEY.encode())

#: Seconds of work per stage: every S3 code path (Polars/pyarrow reads, Ray Train storage, Ray Data read and
#: write, staged commits) runs, on a few thousand ratings.
TINY = {
    "synth": {"n_users": 200, "n_items": 120, "n_ratings": 6000, "min_user_ratings": 5},
    "prepare": {"shards": 2},
    "cluster": {"workers": 1},
    "pipeline": {"outputs": {"candidates": 20, "map_items": 20, "similar_min_ratings": 2}},
    "stages": {
        "mf": {"model": "biased_mf", "params": {"rank": 4}, "train": {"epochs": 2, "solver": "sgd"}},
        "reliability": {"params": {"hidden": [8]}, "train": {"epochs": 1, "batch_size": 1024}},
        "rating": {"params": {"hidden": [8]}, "train": {"epochs": 1, "batch_size": 1024}},
    },
}


def cli(*args: str) -> int:
    """`recdist ARGS` in this process; its exit status."""
    try:
        main(list(args))
    except SystemExit as e:
        return int(e.code or 0)
    return 0


def bucket_objects(s3_server, bucket: str) -> dict[str, bytes]:
    client = s3_server.client()
    name = bucket.removeprefix("s3://")
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=name)
    keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
    return {key: client.get_object(Bucket=name, Key=key)["Body"].read() for key in keys}


def leaks(blobs: dict[str, bytes]) -> list[str]:
    return [name for name, data in blobs.items() if any(secret in data for secret in SECRETS)]


def local_files(*roots: Path) -> dict[str, bytes]:
    found = {}
    for root in roots:
        if root.exists():
            found.update({str(p): p.read_bytes() for p in root.rglob("*") if p.is_file() and not p.is_symlink()})
    return found


@pytest.mark.s3
@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_pipeline_on_s3_end_to_end_without_leaking_credentials(
    ray_cluster, s3_server, s3_bucket, tmp_path, monkeypatch, capfd
):
    # Input: synthetic ratings and movies written into the bucket; the config file read from the bucket too.
    assert cli("synth", "--out", f"{s3_bucket}/raw", "--users", "200", "--items", "120", "--ratings", "6000", "-q") == 0
    config = {**TINY, "source": {"path": f"{s3_bucket}/raw"}}
    # Ray Train workers (not this process), checkpoints in the bucket, one after every epoch (the default policy
    # checkpoints every 30 s)
    config["cluster"] = {
        "workers": 1, "in_process": False, "storage_path": f"{s3_bucket}/ray", "checkpoint_every_epochs": 1
    }  # fmt: skip
    s3_server.client().put_object(Bucket=s3_bucket[5:], Key="configs/tiny.yaml", Body=yaml.safe_dump(config).encode())
    # Stage 1's first attempt fails after its second epoch: it must resume from its checkpoint in the bucket.
    monkeypatch.setenv(FAIL_AT_EPOCH_ENV, "1")
    monkeypatch.chdir(tmp_path)
    out = f"{s3_bucket}/runs/date=2026-01-31"

    assert cli("pipeline", "--config", f"{s3_bucket}/configs/tiny.yaml", "--out", out) == 0
    printed = capfd.readouterr()

    objects = bucket_objects(s3_server, s3_bucket)
    run = "runs/date=2026-01-31/"
    manifest = json.loads(objects[run + "manifest.json"])
    assert manifest["status"] == "complete" and list(manifest["stages"]) == [
        "prepare",
        "mf",
        "reliability",
        "rating",
        "outputs",
    ]
    assert manifest["data"] == "data" and manifest["log"].startswith("logs/")  # relative: the run can be moved
    # Checkpoints lived in the bucket: stage 1 restarted from one (attempt 2), and they were removed once committed.
    mf_metrics = json.loads(objects[run + "mf/model/metrics.json"])
    assert mf_metrics["attempts"] == 2 and mf_metrics["epochs"] == 2
    scoring = json.loads(objects[run + "mf/manifest.json"])["scoring"]  # Ray Data's first pass of the run: its
    assert scoring["engine"] == "ray-data" and scoring["warmed_tasks"] == scoring["actors"]  # processes were warm
    assert not [k for k in objects if k.startswith("ray/") and "checkpoint" in k]
    assert not [k for k in objects if ".staging-" in k or ".recdist-write-probe" in k]  # nothing half-written
    assert not list(Path(tmp_path).rglob("checkpoint*"))  # and nothing of the run on local disk

    # Outputs read back from the bucket, as an analyst would: pyarrow, and Polars with the same AWS_* settings.
    assert run + "outputs/_SUCCESS" in objects
    recs = pq.read_table(io.BytesIO(objects[run + "outputs/recommendations/part-00000.parquet"]))
    assert recs.num_rows == 200 * 10
    assert {"user_id", "movie_id", "score", "expected_abs_error", "candidate_score"} <= set(recs.column_names)
    predictions = pl.read_parquet(
        f"{out}/outputs/predictions/**/*.parquet", hive_partitioning=True, storage_options=polars_s3_options()
    )
    assert predictions.height == 6000 and predictions["expected_abs_error"].null_count() == 0
    assert predictions["split"].unique().sort().to_list() == ["test", "train", "val"]  # from the split=... folders
    report = objects[run + "outputs/report.md"].decode()
    assert "reliab" in report.lower()

    # No credentials in anything the run wrote or printed: the bucket, the local disk, Ray's logs, the console.
    session = Path(ray_cluster._private.worker._global_node.get_session_dir_path())
    written = {**objects, **local_files(tmp_path, session / "logs")}
    written["stdout"], written["stderr"] = printed.out.encode(), printed.err.encode()
    assert len(written) > 50
    assert leaks(written) == []


def polars_s3_options() -> dict[str, str]:
    """Polars' object-store options from the standard AWS variables (what README tells analysts to pass)."""
    return {
        "aws_access_key_id": os.environ["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": os.environ["AWS_SECRET_ACCESS_KEY"],
        "aws_region": os.environ["AWS_DEFAULT_REGION"],
        "aws_endpoint_url": os.environ["AWS_ENDPOINT_URL"],
    }


# --- S3 problems: a clear error (exit 2) before any training starts ---------------------------------------------------


@pytest.fixture
def tiny_config(tmp_path) -> str:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({**TINY, "source": {"dataset": "synthetic"}}))
    return str(path)


def refused(capfd, *args: str) -> str:
    """Run the pipeline CLI, expect exit status 2, return what it printed (checked free of the keys)."""
    assert cli("pipeline", *args) == 2
    printed = capfd.readouterr()
    text = printed.out + printed.err
    assert FAKE_AWS_ACCESS_KEY_ID not in text and FAKE_AWS_SECRET_ACCESS_KEY not in text
    assert "Traceback" not in text
    return text


@pytest.mark.s3
@pytest.mark.timeout(120)
def test_pipeline_refuses_a_missing_output_bucket(tiny_config, capfd):
    text = refused(capfd, "--config", tiny_config, "--out", "s3://recdist-missing-bucket/runs/x")
    assert "S3 bucket 'recdist-missing-bucket' does not exist" in text and "create the bucket" in text


@pytest.mark.s3
@pytest.mark.timeout(120)
def test_pipeline_refuses_wrong_credentials(s3_server, s3_bucket, tiny_config, capfd):
    with s3_server.rejecting_credentials():
        text = refused(capfd, "--config", tiny_config, "--out", f"{s3_bucket}/runs/x")
    assert "S3 refused access" in text and "AWS_ACCESS_KEY_ID" in text
    assert bucket_objects(s3_server, s3_bucket) == {}


@pytest.mark.s3
@pytest.mark.timeout(120)
def test_pipeline_refuses_an_unreachable_endpoint(s3_bucket, tiny_config, capfd, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    text = refused(capfd, "--config", tiny_config, "--out", f"{s3_bucket}/runs/x")
    assert "S3 endpoint unreachable" in text and "AWS_ENDPOINT_URL" in text


@pytest.mark.s3
@pytest.mark.timeout(120)
def test_pipeline_refuses_a_config_in_a_missing_bucket(tmp_path, capfd):
    text = refused(capfd, "--config", "s3://recdist-missing-bucket/tiny.yaml", "--out", str(tmp_path / "run"))
    assert "s3://recdist-missing-bucket/tiny.yaml" in text
    assert not (tmp_path / "run").exists()
