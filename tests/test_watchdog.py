"""A driver killed with SIGKILL leaves no process behind: recdist.train.watchdog, and a local Ray cluster's start."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import ROOT

from recdist.config import ClusterConfig
from recdist.train import cluster, watchdog

ORPHANS = """
import subprocess, sys, time
from recdist.train import watchdog
watchdog.start()
# a child that starts a grandchild, as the raylet starts Ray's agents: both outlive a killed driver on their own
GRANDCHILD = "import subprocess, time; subprocess.Popen(['sleep', '600']); time.sleep(600)"
child = subprocess.Popen([sys.executable, "-c", GRANDCHILD])
time.sleep(1.5)  # the watchdog has noted them
print("READY", flush=True)
time.sleep(600)
"""

RAY_DRIVER = """
import time
import ray
from recdist.config import ClusterConfig
from recdist.train.cluster import connect
connect(ClusterConfig())

@ray.remote
class Echo:
    def ping(self):
        return 1

echo = Echo.remote()
ray.get(echo.ping.remote())
print("READY", flush=True)
time.sleep(600)
"""


def kill_and_count(script: str, wait_s: float) -> tuple[dict[int, int], dict[int, int]]:
    """Run `script` until it prints READY, SIGKILL it; (its descendants then, those still alive after wait_s)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(ROOT)
    driver = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert driver.stdout.readline().strip() == "READY"
        below = watchdog.descendants(driver.pid)
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    deadline = time.monotonic() + wait_s
    while watchdog.alive(below) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = watchdog.alive(below)
    for pid in left:  # only what this test started (pid and start time matched)
        os.kill(pid, signal.SIGKILL)
    return below, left


def test_a_killed_driver_takes_its_descendants_with_it() -> None:
    below, left = kill_and_count(ORPHANS, wait_s=10)
    assert len(below) >= 3  # the watchdog, the child, its sleep
    assert not left


def test_the_watchdog_starts_only_with_a_local_cluster(monkeypatch) -> None:
    """A cluster joined at an address is never touched; a local one recdist starts is watched."""
    import ray

    started, inits = [], []
    monkeypatch.setattr(watchdog, "start", lambda: started.append(True))
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: inits.append(kw))
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0})
    monkeypatch.setattr(cluster, "local_resources", lambda: {"CPU": 8.0, "GPU": 0.0})
    monkeypatch.delenv("RAY_ADDRESS", raising=False)

    remote = cluster.connect(ClusterConfig(address="10.0.0.1:6379"))
    assert inits[-1]["address"] == "10.0.0.1:6379" and not started
    assert not remote.in_process  # a cluster of its own: Ray Train places the worker
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert cluster.connect(ClusterConfig(in_process=True)).in_process  # asked for
    assert not started
    monkeypatch.delenv("RAY_ADDRESS")
    local = cluster.connect(ClusterConfig())
    assert "address" not in inits[-1] and started
    assert local.in_process and not cluster.connect(ClusterConfig(workers=2)).in_process


@pytest.mark.ray
@pytest.mark.slow
def test_no_process_of_a_killed_drivers_ray_cluster_outlives_it() -> None:
    """kill -9 of a driver that started its own Ray cluster: its GCS, raylet, dashboard, agents and workers are all
    gone within 10 s (the issue's goal; Ray's DashboardAgent and RuntimeEnvAgent alone take 60-90 s)."""
    below, left = kill_and_count(RAY_DRIVER, wait_s=10)
    assert len(below) >= 8  # gcs_server, raylet, dashboard, the two agents, a worker, ...
    assert not left, f"{len(left)} of {len(below)} still alive 10 s after the driver"
