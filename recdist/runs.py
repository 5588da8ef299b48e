"""The runs under one parent (local or s3://), for nightly batches: which are complete, which is the latest, and
retention (keep the last N, delete older ones).

A run is a direct child of the parent (e.g. `runs/date=2026-01-31/`); it is complete when its outputs are
committed (`outputs/_SUCCESS`, recdist.tables.SUCCESS). Runs are ordered by their `date=YYYY-MM-DD` segment, else
by RUN/manifest.json's created_at, then by name. Only storage is touched here: no Ray, no models.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from recdist import runlock, storage, tables
from recdist.errors import StorageError

log = logging.getLogger(__name__)

DATE = re.compile(r"(?:^|/)date=(\d{4}-\d{2}-\d{2})(?:/|$)")


@dataclass(frozen=True)
class Run:
    uri: str
    order: str
    """What runs are sorted by: the `date=` day, else the manifest's created_at ('' when neither is known)."""

    @property
    def name(self) -> str:
        return self.uri.rstrip("/").rsplit("/", 1)[-1]


def parent_of(run: str) -> str:
    """The folder a run directory sits in."""
    run = storage.absolute(run).rstrip("/")
    return run.rsplit("/", 1)[0]


def same(a: str, b: str) -> bool:
    """Whether two URIs name the same run directory."""
    return storage.absolute(a).rstrip("/") == storage.absolute(b).rstrip("/")


def is_complete(run: str) -> bool:
    return storage.exists(storage.join(run, "outputs", tables.SUCCESS))


def order_of(run: str) -> str:
    """The sort key of a run: its `date=` day, else RUN/manifest.json's created_at, else ''."""
    found = DATE.search(storage.absolute(run).rstrip("/"))
    if found:
        return found.group(1)
    try:
        return str(storage.read_json(storage.join(run, storage.MANIFEST)).get("created_at") or "")
    except (StorageError, ValueError, AttributeError):
        return ""


def complete_runs(parent: str) -> list[Run]:
    """The complete runs directly under `parent`, oldest first."""
    parent = storage.absolute(parent)
    found = []
    for name in storage.listdir(parent):
        uri = storage.join(parent, name)
        if name.startswith(".") or not is_complete(uri):
            continue
        found.append(Run(uri, order_of(uri)))
    return sorted(found, key=lambda r: (r.order, r.name))


def latest_complete(beside: str) -> str | None:
    """The newest complete run other than `beside` under the same parent (what `--warm-start auto` and
    `--drift-against auto` resolve to); when `beside` is dated (`date=`), only runs of an earlier day count, so a
    backfill of an old day never reads a newer one. None when there is none."""
    mine = DATE.search(storage.absolute(beside).rstrip("/"))
    candidates = [
        r for r in complete_runs(parent_of(beside))
        if not same(r.uri, beside) and (mine is None or not r.order or r.order < mine.group(1))
    ]  # fmt: skip
    return candidates[-1].uri if candidates else None


def keep_last(parent: str, n: int, *, protect: list[str] | tuple[str, ...] = ()) -> list[str]:
    """Delete the complete runs under `parent` older than its newest `n`; return the deleted URIs.

    Never deleted: a protected run (this run, the run a warm start or a drift report read), an incomplete one
    (in progress, or failed: kept for its logs and a resume), one whose lock is held by a live run.
    """
    if n < 1:
        raise ValueError(f"keep_last needs n >= 1, got {n}")
    runs = complete_runs(parent)
    deleted = []
    for run in runs[: max(len(runs) - n, 0)]:
        if any(same(run.uri, p) for p in protect if p):
            log.info("retention: kept %s (protected)", run.uri)
            continue
        holder = runlock.live_holder(run.uri)
        if holder is not None:
            log.warning(
                "retention: kept %s: a run holds its lock (pid %s on %s)",
                run.uri,
                holder.get("pid"),
                holder.get("host"),
            )
            continue
        storage.remove(run.uri)
        log.info("retention: deleted %s", run.uri)
        deleted.append(run.uri)
    return deleted


DRIFT_EXIT = 4
"""The exit status of a complete run whose drift crossed a threshold with pipeline.drift.fail set."""


def after_run(run: str, keep: int | None, *, fail_on_drift: bool = False) -> int:
    """What a nightly batch does once its run is complete: retention (`keep` newest complete runs beside `run`;
    protected: this run, the run its drift compared with, the run its warm start read: RUN/manifest.json's
    `warm_start`), then the exit status (DRIFT_EXIT when the drift crossed a threshold and `fail_on_drift`)."""
    run = storage.absolute(run)
    try:
        drift = storage.read_json(storage.join(run, "outputs", "metrics.json")).get("drift") or {}
    except StorageError:
        drift = {}
    if keep:
        protect = [run, drift.get("against") or "", *_warm_sources(run)]
        deleted = keep_last(parent_of(run), keep, protect=protect)
        log.info("retention: kept the last %d complete runs, deleted %d", keep, len(deleted))
    if fail_on_drift and drift.get("exceeded"):
        log.error("the drift crossed a threshold and pipeline.drift.fail is set: exit status %d", DRIFT_EXIT)
        return DRIFT_EXIT
    return 0


def _warm_sources(run: str) -> list[str]:
    """The run(s) a warm start read, as RUN/manifest.json records them (`warm_start`: a URI, or a mapping
    holding URIs); [] for a cold run."""
    try:
        found = storage.read_json(storage.join(run, storage.MANIFEST)).get("warm_start")
    except (StorageError, AttributeError):
        return []
    values = found.values() if isinstance(found, dict) else [found]
    return [v for v in values if isinstance(v, str) and v]
