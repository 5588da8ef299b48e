"""Connect to (or start) the Ray cluster a stage trains on, and check it can host the workers asked for (or,
`worker_plan`, see that a run on this machine with one worker needs no cluster: its stages train and score in this
process).

Checks run before any work, so a run asking for GPUs on a CPU-only cluster fails in seconds with the fix,
not after data loading.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from recdist import logs
from recdist.config import ClusterConfig
from recdist.errors import ConfigError
from recdist.train import watchdog

LOCAL_TRAIN_ENV = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
}
"""Ray Train settings for a local cluster recdist starts itself (a user's own values win): the controller polls
its workers every 0.2 s instead of 2 s (a worker's report waits in a queue of one until the next poll, and the
end of a run is seen at a poll: about 8 s per stage on a laptop at 2 s), and no preemption watcher actor (one
machine is not preempted)."""


IDLE_WORKERS_KEPT = 8
"""Worker processes a local cluster keeps beyond one per CPU (RAY_num_workers_soft_limit; a user's value wins)."""


@dataclass(frozen=True)
class WorkerPlan:
    """What each Ray Train worker gets: the resolved cluster section."""

    workers: int
    cpus_per_worker: int
    gpu: bool
    in_process: bool = False
    """Rank 0 of 1 runs in this process (ClusterConfig.in_process), not in a Ray Train worker."""

    def resources_per_worker(self) -> dict[str, float]:
        resources = {"CPU": float(self.cpus_per_worker)}
        if self.gpu:
            resources["GPU"] = 1.0
        return resources


def connect(cluster: ClusterConfig) -> WorkerPlan:
    """Join the configured cluster ($RAY_ADDRESS or cluster.address), else start a local one; check the fit.

    An already initialised Ray (a test session, a `ray job` driver) is used as it is. A local cluster is
    checked against this machine's CPUs and CUDA devices before it is started, so a bad request costs nothing;
    its processes die with this one, even on kill -9 (recdist.train.watchdog).
    Ray's logging follows recdist.logs (quiet unless verbose).
    """
    import ray

    if ray.is_initialized():  # the caller's own Ray (a test session, a notebook): one machine when it has one node
        return plan(cluster, ray.cluster_resources(), local=_alive_nodes() == 1)
    address = cluster.address or os.environ.get("RAY_ADDRESS")
    if address:  # a cluster of its own (KubeRay, `ray start`): Ray Train places the workers, even while it has
        ray.init(address=address, **logs.ray_init_options())  # one node (worker pods may not have joined yet)
        return plan(cluster, ray.cluster_resources(), local=False)
    here = local_resources()
    fit = plan(cluster, here, where="this machine (for a local Ray cluster)")
    for key, value in LOCAL_TRAIN_ENV.items():
        os.environ.setdefault(key, value)
    # Keep idle worker processes (the scoring tasks', PyTorch imported) while a stage trains: Ray kills idle ones
    # beyond a soft limit of one per CPU, and Ray Train's controller and helper actors alone reach it on 2 cores,
    # so each scoring pass would start new processes (7-9 s per quickstart stage).
    os.environ.setdefault("RAY_num_workers_soft_limit", str(int(here["CPU"]) + IDLE_WORKERS_KEPT))
    watchdog.start()  # before ray.init: a driver killed while the cluster starts leaves nothing either
    # The dashboard serves the State API, which Ray Train's placement-group cleaner polls (without it, it warns
    # every second); it binds to loopback, on 8265 or the next free port.
    ray.init(
        num_cpus=int(here["CPU"]),
        num_gpus=int(here["GPU"]),
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        **logs.ray_init_options(),
    )
    return fit


def worker_plan(cluster: ClusterConfig) -> WorkerPlan:
    """The plan of a run on `cluster`, joining or starting Ray only when it needs Ray: a local one-worker run whose
    stages train and score in this process (ClusterConfig.in_process) starts no cluster at all."""
    import ray

    if not ray.is_initialized() and not (cluster.address or os.environ.get("RAY_ADDRESS")):
        fit = plan(cluster, local_resources(), where="this machine (for a local Ray cluster)")
        if fit.in_process:
            return fit
    return connect(cluster)


def _alive_nodes() -> int:
    import ray

    return sum(1 for node in ray.nodes() if node.get("Alive"))


def local_resources() -> dict[str, float]:
    """What a local Ray cluster started here would have: every CPU and every visible CUDA device."""
    import torch

    return {
        "CPU": float(os.cpu_count() or 1),
        "GPU": float(torch.cuda.device_count() if torch.cuda.is_available() else 0),
    }


def plan(
    cluster: ClusterConfig, resources: dict[str, float], where: str = "the Ray cluster", *, local: bool = True
) -> WorkerPlan:
    """The workers' resources on a cluster with these totals (`local`: this one machine), or a ConfigError saying
    how to fix the request."""
    cpus, gpus = int(resources.get("CPU", 0)), int(resources.get("GPU", 0))
    if cluster.workers < 1:
        raise ConfigError(f"cluster.workers is {cluster.workers}", fix="set cluster.workers to 1 or more")
    if cluster.in_process and cluster.workers > 1:
        raise ConfigError(
            f"cluster.in_process trains one rank in this process but cluster.workers is {cluster.workers}",
            fix="set cluster.workers to 1, or leave cluster.in_process empty (Ray Train workers for several ranks)",
        )
    if cluster.gpu and gpus == 0:
        raise ConfigError(
            f"cluster.gpu is set but {where} has no GPUs",
            fix="set cluster.gpu: false to train on CPUs, or point cluster.address at a cluster with GPU nodes",
        )
    if cluster.gpu and cluster.workers > gpus:
        raise ConfigError(
            f"{cluster.workers} GPU workers asked for but {where} has {gpus} GPU(s)",
            fix=f"set cluster.workers to {gpus} or fewer",
        )
    per_worker = cluster.cpus_per_worker or max(1, cpus // cluster.workers)
    if cluster.workers * per_worker > cpus:
        raise ConfigError(
            f"{cluster.workers} workers x {per_worker} CPUs asked for but {where} has {cpus} CPUs",
            fix="lower cluster.workers or cluster.cpus_per_worker (or leave cpus_per_worker empty to share "
            "the CPUs out)",
        )
    in_process = cluster.in_process if cluster.in_process is not None else cluster.workers == 1 and local
    return WorkerPlan(workers=cluster.workers, cpus_per_worker=per_worker, gpu=cluster.gpu, in_process=in_process)
