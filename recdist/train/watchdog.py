"""Kill what a driver started when the driver dies without cleaning up (kill -9, the OOM killer).

Why: Ray ties the processes the driver starts itself (GCS, raylet, dashboard, monitors) to it with
PR_SET_PDEATHSIG, but not the raylet's children. Its DashboardAgent and RuntimeEnvAgent see the raylet gone within a
second, then report the death to the GCS, which is gone too, and wait out that RPC's fixed 60 s timeout
(ray._private.process_watcher.report_raylet_error_logs -> publish_error_to_driver; RAY_gcs_rpc_server_reconnect_
timeout_s does not shorten it): 60-90 s of two orphans per killed run. `start()` runs this file beside a driver that
started a local cluster (never one that joined a cluster at an address): a process in its own session that notes
the driver's descendants every SNAPSHOT_S (keeping them while they live) and, once the driver is gone, SIGKILLs
those still alive (a pid is matched with its start time, so a reused pid is never hit), then exits. On a clean
exit Ray has stopped them all already and it finds nothing to do.

Standard library only, run as a script with `python -I` (no recdist import in the watchdog process).
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

SNAPSHOT_S = 0.5
"""How often the driver's descendants are noted: a process born after the last note is not killed (the workers a
raylet starts exit on their own within about 2 s of it)."""

_started: dict[int, subprocess.Popen] = {}
"""This process's watchdog, by our pid (kept: a dropped Popen of a running process warns when collected)."""


def start() -> None:
    """Watch this process (once per process): its descendants are killed when it dies."""
    me = os.getpid()
    if me in _started or not sys.platform.startswith("linux"):
        return
    _started[me] = subprocess.Popen(
        [sys.executable, "-I", str(Path(__file__).resolve()), str(me)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,  # a Ctrl-C or a kill of the driver's process group leaves it to clean up
    )  # fmt: skip


def descendants(pid: int) -> dict[int, int]:
    """Every process below `pid` (from /proc), with its start time (clock ticks since boot)."""
    children: dict[int, list[int]] = {}
    started: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields:
                children.setdefault(int(fields[1]), []).append(int(entry.name))
                started[int(entry.name)] = int(fields[19])
    found, todo = {}, [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child in started:
                found[child] = started[child]
                todo.append(child)
    return found


def _stat(pid: int) -> list[str] | None:
    """/proc/PID/stat's fields after the command name (state, ppid, ...; starttime at 19), None when gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def alive(pids: dict[int, int]) -> dict[int, int]:
    """Those of `pids` (pid -> start time) still running: same start time, not a zombie."""
    out = {}
    for pid, started in pids.items():
        fields = _stat(pid)
        if fields and fields[0] != "Z" and int(fields[19]) == started:
            out[pid] = started
    return out


def watch(driver: int) -> int:
    """Note `driver`'s descendants until it dies, then SIGKILL those left; the number killed."""
    try:
        gone = os.pidfd_open(driver)
    except (AttributeError, OSError):  # before Linux 5.3: poll our parent (the driver) instead
        gone = None
    seen: dict[int, int] = {}
    while True:
        if gone is not None:
            dead = bool(select.select([gone], [], [], SNAPSHOT_S)[0])
        else:
            time.sleep(SNAPSHOT_S)
            dead = os.getppid() != driver
        if dead:
            break
        # kept while alive, not only while below the driver: a SIGKILLed driver's main thread exits first and
        # its children (the raylet) die of PR_SET_PDEATHSIG, orphaning theirs, before the driver as a whole is
        # gone (its other threads still exiting): a note taken then no longer finds the agents below it
        seen = alive(seen) | descendants(driver)
        seen.pop(os.getpid(), None)
    killed = 0
    for pid in alive(seen):
        try:
            os.kill(pid, signal.SIGKILL)
            killed += 1
        except OSError:
            pass
    return killed


if __name__ == "__main__":
    watch(int(sys.argv[1]))
