"""The CronJob pattern's pod: create one uniquely named RayJob from a template, wait for it, exit with its result.

Runs in the recdist image as the pod of a plain Kubernetes CronJob (k8s/cronjob/), so nightly runs work on any
KubeRay version, with the CronJob's concurrencyPolicy and history limits:

    python jobs/launch_rayjob.py --template /etc/recdist/launcher/rayjob.yaml

The RayJob is named after the pod's Job ($JOB_NAME, unique per scheduled run), so a retried pod finds the RayJob
it already created and waits for it instead of starting a second one; it is owned by that Job ($JOB_UID), so when
the CronJob's history limit deletes the Job, Kubernetes deletes the RayJob with it; its Ray pods run the
launcher's own image ($RECDIST_IMAGE); and its head gets RECDIST_RUN_DATE, so every retry of the run writes the
same date partition. The pod waits until the RayJob ends (the CronJob's `Forbid` then means what it says).

The wait lasts hours, so the API server's hiccups do not end it: a 5xx or 429 answer, a dropped connection or a
request timeout is retried with exponential backoff (--retry-seconds doubling up to a minute; a 429's Retry-After
is honoured), and the pod gives up only when every request has failed for --patience-seconds in a row. The
service-account token is read afresh for every request, so the kubelet's rotation of it is picked up. It talks
to the API server with the standard library only and needs `create` and `get` on rayjobs (k8s/cronjob/rbac.yaml).

Exit status: 0 the Ray job SUCCEEDED; 1 it ended otherwise (FAILED, STOPPED, ...); 2 a setting is wrong (no
JOB_NAME, a bad template, RBAC, a RayJob of that name owned by another Job), with how to fix it; 3 the API server
failed for --patience-seconds: the RayJob may still be running, and a retried pod (the Job's backoffLimit) waits
for it again.
"""

from __future__ import annotations

import argparse
import copy
import http.client
import json
import os
import ssl
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import yaml

SERVICE_ACCOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
RAYJOBS = "/apis/ray.io/v1/namespaces/{namespace}/rayjobs"
#: KubeRay refuses longer RayJob names (it derives RayCluster and Pod names from them).
MAX_NAME = 47
TERMINAL = {"Complete", "Failed"}
#: The longest pause between two attempts at a failing request, seconds.
MAX_RETRY_SECONDS = 60.0


class LaunchError(Exception):
    """What went wrong and how to fix it; printed without a traceback, exit status 2."""


def rayjob_for(
    template: dict[str, Any], *, job_name: str, job_uid: str, run_date: str, image: str | None = None
) -> dict[str, Any]:
    """The RayJob to create: the template's spec, named and owned by this run's Job, the run date on its head.

    image: the image of every Ray container (the launcher's own, which kustomize set; the template file keeps
    the placeholder it was written with).
    """
    if template.get("kind") != "RayJob" or not isinstance(template.get("spec"), dict):
        raise LaunchError("the template is not a RayJob manifest", "mount k8s/rayjob/rayjob.yaml as the template")
    if len(job_name) > MAX_NAME:
        raise LaunchError(f"RayJob name {job_name!r} is longer than {MAX_NAME}", "shorten the CronJob's name")
    rayjob = {"apiVersion": "ray.io/v1", "kind": "RayJob", "spec": copy.deepcopy(template["spec"])}
    labels = {**template.get("metadata", {}).get("labels", {}), "app.kubernetes.io/managed-by": "recdist-launcher"}
    rayjob["metadata"] = {
        "name": job_name,
        "labels": labels,
        "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": job_name, "uid": job_uid}],
    }
    cluster = rayjob["spec"]["rayClusterSpec"]
    pods = [cluster["headGroupSpec"]["template"], *(g["template"] for g in cluster.get("workerGroupSpecs", []))]
    if image:
        for pod in pods:
            for container in pod["spec"]["containers"]:
                container["image"] = image
    head = pods[0]["spec"]["containers"][0]
    env = [e for e in head.get("env", []) if e.get("name") != "RECDIST_RUN_DATE"]
    head["env"] = [*env, {"name": "RECDIST_RUN_DATE", "value": run_date}]
    return rayjob


class Transient(Exception):
    """The API server did not answer this time (5xx, 429, dropped connection, timeout); worth asking again."""

    def __init__(self, what: str, retry_after: float | None = None):
        super().__init__(what)
        self.retry_after = retry_after


class GaveUp(Exception):
    """Every request failed for the whole patience window; exit status 3."""


class Api:
    """The Kubernetes API server, as the pod's service account (or any base URL and token file, for tests).

    token_file is read for every request: the kubelet rewrites a projected service-account token before it
    expires, and the next request carries the new one.
    """

    def __init__(self, base: str, token_file: str, ca_file: str | None = None, timeout: float = 30.0):
        self.base, self.token_file, self.timeout = base.rstrip("/"), token_file, timeout
        handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]  # never via $HTTPS_PROXY
        if base.startswith("https"):
            handlers.append(urllib.request.HTTPSHandler(context=ssl.create_default_context(cafile=ca_file)))
        self.opener = urllib.request.build_opener(*handlers)

    @classmethod
    def in_cluster(cls, timeout: float = 30.0) -> Api:
        host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        if not host or not os.path.exists(f"{SERVICE_ACCOUNT}/token"):
            raise LaunchError("not running in a Kubernetes pod with a service account", "run it from k8s/cronjob/")
        host = f"[{host}]" if ":" in host else host  # an IPv6 service address
        return cls(f"https://{host}:{port}", f"{SERVICE_ACCOUNT}/token", f"{SERVICE_ACCOUNT}/ca.crt", timeout)

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
        """One request: (status, JSON answer) for a definite answer; Transient when there was none worth keeping."""
        try:
            with open(self.token_file) as f:  # a failed read (mid-rotation) is retried like a failed request
                token = f.read().strip()
            request = urllib.request.Request(
                self.base + path,
                method=method,
                data=json.dumps(body).encode() if body is not None else None,
                headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
            )
            with self.opener.open(request, timeout=self.timeout) as response:
                return response.status, json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as e:
            code, answer = e.code, _json(e)
            if code >= 500 or code in (401, 429):  # 401: a token rotated under us; the next request rereads it
                reason = f"{code} {e.reason}" + (f": {answer['message']}" if answer.get("message") else "")
                raise Transient(reason, _seconds(e.headers.get("Retry-After"))) from None
            return code, answer
        except urllib.error.URLError as e:
            if isinstance(e.reason, ssl.SSLCertVerificationError):
                raise LaunchError(f"the API server's certificate was refused: {e.reason}") from None
            raise Transient(f"no connection: {e.reason}") from None
        except TimeoutError:
            raise Transient(f"no answer within {self.timeout:g} s") from None
        except (OSError, http.client.HTTPException, ValueError) as e:  # dropped mid-answer, truncated JSON
            raise Transient(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__) from None


def _json(error: urllib.error.HTTPError) -> dict[str, Any]:
    try:
        answer = json.loads(error.read() or b"{}")
        return answer if isinstance(answer, dict) else {}
    except (OSError, http.client.HTTPException, ValueError):
        return {}


def _seconds(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:  # an HTTP date: the backoff decides
        return None


class Retrying:
    """Api.call that asks again after Transient failures, backing off, until `patience` seconds of failures."""

    def __init__(
        self,
        api: Api,
        patience: float,
        first_delay: float = 1.0,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.api, self.patience, self.first_delay, self.sleep, self.clock = api, patience, first_delay, sleep, clock

    def __call__(
        self, what: str, method: str, path: str, body: dict[str, Any] | None = None
    ) -> tuple[int, dict[str, Any]]:
        """api.call(method, path, body); `what` names the request in messages."""
        since, delay, attempt = self.clock(), self.first_delay, 0
        while True:
            try:
                return self.api.call(method, path, body)
            except Transient as e:
                attempt += 1
                left = self.patience - (self.clock() - since)
                if left <= 0:
                    raise GaveUp(
                        f"{what}: the Kubernetes API server has failed every request for {self.patience:g} s"
                        f" ({attempt} attempts; last: {e})"
                    ) from None
                pause = min(max(delay, e.retry_after or 0.0), MAX_RETRY_SECONDS, left)
                print(f"launcher: {what}: {e}; attempt {attempt + 1} in {pause:.2g} s", flush=True)
                self.sleep(pause)
                delay = min(2 * delay, MAX_RETRY_SECONDS)


def create(call: Retrying, namespace: str, rayjob: dict[str, Any]) -> None:
    """Create the RayJob; one that already exists (an earlier pod or attempt of this run made it) is waited for."""
    name = rayjob["metadata"]["name"]
    status, answer = call(f"creating RayJob {name}", "POST", RAYJOBS.format(namespace=namespace), rayjob)
    if status in (200, 201):
        print(f"launcher: created RayJob {namespace}/{name}", flush=True)
    elif status == 409:
        print(f"launcher: RayJob {namespace}/{name} exists (an earlier pod or attempt made it): waiting", flush=True)
    elif status == 403:
        raise LaunchError(
            f"the API server refused to create RayJob {name} ({status}): {answer.get('message', '')}",
            "apply k8s/cronjob/ (rbac.yaml): the launcher's ServiceAccount needs create and get on rayjobs.ray.io",
        )
    else:
        raise LaunchError(f"creating RayJob {name} failed ({status}): {answer.get('message', '')}")


def wait(call: Retrying, namespace: str, name: str, job_uid: str, poll_seconds: float) -> str:
    """Poll the RayJob until KubeRay says it is over; its Ray job status (SUCCEEDED, FAILED, STOPPED, ...)."""
    path = f"{RAYJOBS.format(namespace=namespace)}/{name}"
    last = None
    while True:
        status, answer = call(f"reading RayJob {name}", "GET", path)
        if status == 404:
            raise LaunchError(f"RayJob {namespace}/{name} disappeared while running", "see `kubectl get events`")
        if status == 403:
            raise LaunchError(
                f"the API server refused to read RayJob {name} ({status}): {answer.get('message', '')}",
                "apply k8s/cronjob/ (rbac.yaml): the launcher's ServiceAccount needs create and get on rayjobs.ray.io",
            )
        if status != 200:
            raise LaunchError(f"reading RayJob {name} failed ({status}): {answer.get('message', '')}")
        if last is None:  # a RayJob of this name that another Job made is not this run's
            owners = {o.get("uid") for o in answer.get("metadata", {}).get("ownerReferences", [])}
            if job_uid not in owners:
                raise LaunchError(
                    f"RayJob {namespace}/{name} exists but belongs to another Job, not to {job_uid}",
                    f"delete it (kubectl -n {namespace} delete rayjob {name}) and run again",
                )
        state = answer.get("status", {})
        seen = (state.get("jobDeploymentStatus"), state.get("jobStatus"))
        if seen != last:
            print(f"launcher: RayJob {name}: deployment {seen[0] or '-'}, job {seen[1] or '-'}", flush=True)
            last = seen
        if seen[0] in TERMINAL:
            return seen[1] or "UNKNOWN"
        time.sleep(poll_seconds)


def main(argv: list[str] | None = None, api: Api | None = None, env: dict[str, str] | None = None) -> int:
    env = dict(os.environ) if env is None else env
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--template", required=True, help="RayJob manifest (k8s/rayjob/rayjob.yaml, via a ConfigMap).")
    parser.add_argument("--namespace", help="Namespace of the RayJob [default: the pod's].")
    parser.add_argument("--poll-seconds", type=float, default=30.0, help="Seconds between status reads.")
    parser.add_argument("--request-timeout", type=float, default=30.0, help="Seconds to wait for one answer.")
    parser.add_argument("--retry-seconds", type=float, default=1.0, help="First pause after a failed request.")
    parser.add_argument(
        "--patience-seconds",
        type=float,
        default=900.0,
        help="Give up (exit 3) when every request has failed for this long in a row.",
    )
    args = parser.parse_args(argv)
    job_name, namespace = env.get("JOB_NAME"), args.namespace
    try:
        job_uid = env.get("JOB_UID")
        if not job_name or not job_uid:
            raise LaunchError("JOB_NAME and JOB_UID are not set", "set them from the pod's Job labels (k8s/cronjob/)")
        with open(args.template) as f:
            template = yaml.safe_load(f)
        run_date = env.get("RECDIST_RUN_DATE") or datetime.now(timezone.utc).strftime("%Y-%m-%d")
        rayjob = rayjob_for(
            template, job_name=job_name, job_uid=job_uid, run_date=run_date, image=env.get("RECDIST_IMAGE")
        )
        namespace = namespace or _pod_namespace()
        call = Retrying(api or Api.in_cluster(args.request_timeout), args.patience_seconds, args.retry_seconds)
        create(call, namespace, rayjob)
        result = wait(call, namespace, job_name, job_uid, args.poll_seconds)
    except GaveUp as e:
        print(f"error: {e}", file=sys.stderr)
        print(
            f"  RayJob {job_name} may still be running: a retried pod (the Job's backoffLimit) waits for it again;"
            f" see `kubectl -n {namespace} get rayjob {job_name}`",
            file=sys.stderr,
        )
        return 3
    except (LaunchError, OSError, yaml.YAMLError) as e:
        what, fix = (e.args + ("",))[:2] if isinstance(e, LaunchError) else (str(e), "")
        print(f"error: {what}" + (f"\n  fix:   {fix}" if fix else ""), file=sys.stderr)
        return 2
    print(f"launcher: RayJob {job_name} finished: {result}", flush=True)
    return 0 if result == "SUCCEEDED" else 1


def _pod_namespace() -> str:
    try:
        with open(f"{SERVICE_ACCOUNT}/namespace") as f:
            return f.read().strip()
    except OSError:
        return "default"


if __name__ == "__main__":
    sys.exit(main())
