"""One run per run directory: RUN/.lock names the holder (pid, host, start time) while a pipeline runs there.

Locally the lock is created with O_EXCL (one winner) and held until the run ends; a lock whose holder is gone
(same host, pid not alive) is taken over with a message. On S3, which has no O_EXCL, the lock is a lease: a PUT
with If-None-Match: * (one winner), renewed by a thread every LEASE_S / 3 with If-Match on its ETag; a lease not
renewed for LEASE_S (its holder died or lost the network) is taken over with If-Match on the expired lease's
ETag, so of two runs taking it over only one wins. A run refused here has written nothing. A run whose lease was
taken over (it could not renew it for LEASE_S) stops: its main thread is interrupted as by Ctrl-C, and `check()`
between stages catches it where no interrupt can be delivered (SIGINT ignored, as under nohup); either way it ends
with StorageError naming the new holder, and commits nothing more.
"""

from __future__ import annotations

import _thread
import errno
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any

from recdist import storage
from recdist.errors import StorageError

log = logging.getLogger(__name__)

LOCK = ".lock"
LEASE_S = 120.0
"""Seconds an S3 lease lasts unless renewed (its holder renews it every LEASE_S / 3)."""

_lost: dict[str, dict[str, Any]] = {}
"""Runs of this process whose lease another run took over -> that run's lease (what it says of its holder)."""


def holder() -> dict[str, Any]:
    """What this process writes into the lock."""
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


@contextmanager
def locked(run: str, *, lease_s: float = LEASE_S) -> Iterator[dict[str, Any]]:
    """Hold the lock of the run directory `run` for the block; StorageError at once when another run holds it."""
    if storage.is_s3(run):
        with _lease(run, lease_s) as me:
            yield me
        return
    with _local(storage.absolute(run)) as me:
        yield me


def _refused(run: str, other: dict[str, Any], why: str) -> StorageError:
    since = other.get("started_at", "?")
    return StorageError(
        f"another run is using {run}: pid {other.get('pid')} on {other.get('host')}, started {since}{why}",
        where=storage.join(run, LOCK),
        fix="wait for it to finish, or choose another --out; if that run is gone for good (a machine that died), "
        f"remove {storage.join(run, LOCK)}",
    )


# ------------------------------------------------------------------------------------------------- local


@contextmanager
def _local(run: str) -> Iterator[dict[str, Any]]:
    path = os.path.join(run, LOCK)
    with storage.writing(run):
        os.makedirs(run, exist_ok=True)
    me = holder()
    for _ in range(3):  # create; or take over a dead holder's lock and create again
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            other = _read_local(path)
            if other is None:  # being written by its holder this instant: a live one
                time.sleep(0.2)
                other = _read_local(path) or {}
            if not _dead_here(other):
                raise _refused(run, other, "") from None
            log.warning(
                "taking over the lock of %s: its holder (pid %s on %s, started %s) is no longer running",
                run, other.get("pid"), other.get("host"), other.get("started_at"),
            )  # fmt: skip
            _remove_if_same(path, other)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
            f.flush()
            os.fsync(f.fileno())
        break
    else:
        raise _refused(run, _read_local(path) or {}, " (its lock keeps changing hands)")
    try:
        yield me
    finally:
        _remove_if_same(path, me)


def _read_local(path: str) -> dict[str, Any] | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (FileNotFoundError, ValueError):
        return None


def _dead_here(other: dict[str, Any]) -> bool:
    """True when the holder ran on this host and its pid is gone (another host's lock is never judged)."""
    if other.get("host") != socket.gethostname() or not isinstance(other.get("pid"), int):
        return False
    try:
        os.kill(other["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def _remove_if_same(path: str, who: dict[str, Any]) -> None:
    if _read_local(path) == who:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


# ---------------------------------------------------------------------------------------------------- S3


@contextmanager
def _lease(run: str, lease_s: float) -> Iterator[dict[str, Any]]:
    fs, path = storage.filesystem(storage.join(run, LOCK))
    me = {**holder(), "lease_s": lease_s}
    etag = _take(fs, path, run, me, lease_s)
    stop = threading.Event()
    # the renewer interrupts the holder only where the holder is the main thread (interrupt_main's target)
    state = {"etag": etag, "run": run, "interrupt": threading.current_thread() is threading.main_thread()}
    renewer = threading.Thread(target=_renew, args=(fs, path, me, state, stop, lease_s), daemon=True)
    renewer.start()
    try:
        yield me
    except BaseException as e:
        if run in _lost:  # the renewer's interrupt (or whatever it became on its way up): say why
            raise _taken(run) from None if isinstance(e, KeyboardInterrupt) else e
        raise
    finally:
        _lost.pop(run, None)
        stop.set()
        renewer.join(timeout=10)
        try:
            if _head(fs, path).get("ETag") == state["etag"]:
                fs.rm_file(path)
        except FileNotFoundError:
            pass


def _body(me: dict[str, Any], lease_s: float) -> bytes:
    return json.dumps({**me, "expires_at": time.time() + lease_s}).encode()


def _take(fs: Any, path: str, run: str, me: dict[str, Any], lease_s: float) -> str:
    """Create the lease (If-None-Match: *), or take over an expired one (If-Match: its ETag); its new ETag."""
    try:
        return _put(fs, path, _body(me, lease_s), IfNoneMatch="*")
    except FileExistsError:
        pass
    try:
        info = _head(fs, path)
        other = json.loads(fs.cat_file(path))
    except FileNotFoundError:  # released meanwhile: try once more
        return _put(fs, path, _body(me, lease_s), IfNoneMatch="*")
    expired = time.time() - float(other.get("expires_at", 0))
    if expired <= 0:
        raise _refused(run, other, f" (its lease is valid for {-expired:.0f} s more)")
    try:
        etag = _put(fs, path, _body(me, lease_s), IfMatch=info["ETag"])
    except FileExistsError:
        raise _refused(run, other, " (another run took its expired lease over first)") from None
    log.warning(
        "taking over the lease of %s: its holder (pid %s on %s, started %s) has not renewed it for %.0f s",
        run, other.get("pid"), other.get("host"), other.get("started_at"), expired,
    )  # fmt: skip
    return etag


def _renew(
    fs: Any, path: str, me: dict[str, Any], state: dict[str, Any], stop: threading.Event, lease_s: float
) -> None:
    while not stop.wait(lease_s / 3):
        try:
            state["etag"] = _put(fs, path, _body(me, lease_s), IfMatch=state["etag"])
        except FileExistsError:
            try:
                other = json.loads(fs.cat_file(path))
            except Exception:  # gone or unreadable meanwhile: still not ours
                other = {}
            _lost[state["run"]] = other if isinstance(other, dict) else {}
            log.error("lost the lease of %s to another run (pid %s on %s): stopping this run", path,
                      _lost[state["run"]].get("pid"), _lost[state["run"]].get("host"))  # fmt: skip
            if state["interrupt"] and not stop.is_set():
                _thread.interrupt_main()
            return
        except Exception as e:  # a network blip: try again at the next turn (the lease is still valid)
            log.warning("could not renew the lease %s: %s", path, e)


def check(run: str) -> None:
    """Raise StorageError when this process held the lease of `run` and another run took it over (call it before
    committing anything: between stages)."""
    if run in _lost:
        raise _taken(run)


def _taken(run: str) -> StorageError:
    other = _lost[run]
    return StorageError(
        f"this run lost its lease of {run} to another run (pid {other.get('pid')} on {other.get('host')}, started "
        f"{other.get('started_at', '?')}): it could not renew it in time (network?) and stopped before committing "
        "anything more",
        where=storage.join(run, LOCK),
        fix="let the other run finish; then re-run this command if needed (it resumes from the committed stages)",
    )


def _put(fs: Any, path: str, body: bytes, **conditions: str) -> str:
    """One conditional PUT; FileExistsError when its condition fails (412 Precondition Failed); the new ETag."""
    bucket, key = path.split("/", 1)
    try:
        out = fs.call_s3("put_object", Bucket=bucket, Key=key, Body=body, **conditions)
    except OSError as e:  # s3fs maps a failed If-None-Match to FileExistsError, a failed If-Match to EINVAL
        if isinstance(e, FileExistsError) or "pre-condition" in str(e) or "PreconditionFailed" in repr(e.__cause__):
            raise FileExistsError(errno.EEXIST, str(e)) from e
        raise
    return out["ETag"]


def _head(fs: Any, path: str) -> dict[str, Any]:
    bucket, key = path.split("/", 1)
    return fs.call_s3("head_object", Bucket=bucket, Key=key)


def live_holder(run: str) -> dict[str, Any] | None:
    """Who holds the lock of `run` when its holder may be alive (None: no lock, or a dead holder's lock). A lock
    that cannot be read counts as held; another host's local lock is never judged dead."""
    where = storage.join(run, LOCK)
    if not storage.is_s3(run):
        if not os.path.exists(storage.absolute(where)):
            return None
        other = _read_local(storage.absolute(where))
        return {} if other is None else (None if _dead_here(other) else other)
    try:
        other = storage.read_json(where)
    except StorageError as e:
        return None if isinstance(e.__cause__, FileNotFoundError) else {}
    except ValueError:
        return {}
    return other if float(other.get("expires_at", 0)) > time.time() else None
