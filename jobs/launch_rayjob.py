"""The CronJob pattern's pod: create one uniquely named RayJob from a template, wait for it, exit with its result.

Runs in the recdist image as the pod of a plain Kubernetes CronJob (k8s/cronjob/), so nightly runs work on any
KubeRay version, with the CronJob's concurrencyPolicy and history limits:

    python jobs/launch_rayjob.py --template /etc/recdist/launcher/rayjob.yaml

The RayJob is named after the pod's Job ($JOB_NAME, unique per scheduled run), so a retried pod finds the RayJob
it already created and waits for it instead of starting a second one; it is owned by that Job ($JOB_UID), so when
the CronJob's history limit deletes the Job, Kubernetes deletes the RayJob with it; its Ray pods run the
launcher's own image ($RECDIST_IMAGE); and its head gets RECDIST_RUN_DATE, so every retry of the run writes the
same date partition. The pod waits until the RayJob ends
(the CronJob's `Forbid` then means what it says) and exits 0 only when the Ray job SUCCEEDED. It talks to the API
server with the pod's service account and the standard library only; it needs `create` and `get` on rayjobs.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import ssl
import sys
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone
from typing import Any

import yaml

SERVICE_ACCOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
RAYJOBS = "/apis/ray.io/v1/namespaces/{namespace}/rayjobs"
#: KubeRay refuses longer RayJob names (it derives RayCluster and Pod names from them).
MAX_NAME = 47
TERMINAL = {"Complete", "Failed"}


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


class Api:
    """The Kubernetes API server, as the pod's service account (or any base URL and token, for tests)."""

    def __init__(self, base: str, token: str, ca_file: str | None = None):
        self.base, self.token = base.rstrip("/"), token
        self.context = ssl.create_default_context(cafile=ca_file) if base.startswith("https") else None

    @classmethod
    def in_cluster(cls) -> Api:
        host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        if not host or not os.path.exists(f"{SERVICE_ACCOUNT}/token"):
            raise LaunchError("not running in a Kubernetes pod with a service account", "run it from k8s/cronjob/")
        with open(f"{SERVICE_ACCOUNT}/token") as f:
            token = f.read().strip()
        return cls(f"https://{host}:{port}", token, f"{SERVICE_ACCOUNT}/ca.crt")

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
        request = urllib.request.Request(
            self.base + path,
            method=method,
            data=json.dumps(body).encode() if body is not None else None,
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=30, context=self.context) as response:
                return response.status, json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as e:
            try:
                return e.code, json.loads(e.read() or b"{}")
            except ValueError:
                return e.code, {}


def create(api: Api, namespace: str, rayjob: dict[str, Any]) -> None:
    """Create the RayJob; one that already exists (this run's pod was retried) is kept and waited for."""
    status, answer = api.call("POST", RAYJOBS.format(namespace=namespace), rayjob)
    name = rayjob["metadata"]["name"]
    if status == 201:
        print(f"launcher: created RayJob {namespace}/{name}", flush=True)
    elif status == 409:
        print(f"launcher: RayJob {namespace}/{name} exists (a retried run): waiting for it", flush=True)
    elif status in (401, 403):
        raise LaunchError(
            f"the API server refused to create RayJob {name} ({status}): {answer.get('message', '')}",
            "apply k8s/cronjob/ (rbac.yaml): the launcher's ServiceAccount needs create and get on rayjobs.ray.io",
        )
    else:
        raise LaunchError(f"creating RayJob {name} failed ({status}): {answer.get('message', '')}")


def wait(api: Api, namespace: str, name: str, poll_seconds: float) -> str:
    """Poll the RayJob until KubeRay says it is over; its Ray job status (SUCCEEDED, FAILED, STOPPED, ...)."""
    path = f"{RAYJOBS.format(namespace=namespace)}/{name}"
    last = None
    while True:
        status, answer = api.call("GET", path)
        if status == 404:
            raise LaunchError(f"RayJob {namespace}/{name} disappeared while running", "see `kubectl get events`")
        if status != 200:
            raise LaunchError(f"reading RayJob {name} failed ({status}): {answer.get('message', '')}")
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
    args = parser.parse_args(argv)
    try:
        job_name, job_uid = env.get("JOB_NAME"), env.get("JOB_UID")
        if not job_name or not job_uid:
            raise LaunchError("JOB_NAME and JOB_UID are not set", "set them from the pod's Job labels (k8s/cronjob/)")
        with open(args.template) as f:
            template = yaml.safe_load(f)
        run_date = env.get("RECDIST_RUN_DATE") or datetime.now(timezone.utc).strftime("%Y-%m-%d")
        rayjob = rayjob_for(
            template, job_name=job_name, job_uid=job_uid, run_date=run_date, image=env.get("RECDIST_IMAGE")
        )
        namespace = args.namespace or _pod_namespace()
        api = api or Api.in_cluster()
        create(api, namespace, rayjob)
        result = wait(api, namespace, job_name, args.poll_seconds)
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
