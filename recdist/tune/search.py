"""`recdist tune`: a Ray Tune search over one stage's settings, every trial a run of `recdist train`'s worker loop.

Driver: check everything before any trial (model, search space, data with validation ratings, output, cluster
fit), then a Tuner over recdist.tune.trial.run_trial (a function trainable that runs the same worker loop as
`recdist train`: in the trial's own process when a trial is one worker, else as a TorchTrainer run), random
search seeded by the budget, the stage's own settings tried first, and ASHA stopping trials that trail on
validation RMSE (clock: epochs). The search's state lives in DIR/_ray (local or s3://, as training's): running
the same command again after a kill resumes it (Tuner.restore), trials cut short resuming from their checkpoints.

DIR: trials.parquet (one row per trial), best.yaml (the best stage as a config fragment for --config),
val_rmse.png, best/ (the best settings retrained by train_stage: a `recdist train` run), manifest.json last.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import time
from datetime import datetime, timezone
from typing import Any

from recdist import logs, storage
from recdist.config import ClusterConfig, StageConfig, TuneBudget
from recdist.errors import ConfigError, StorageError
from recdist.models import registry
from recdist.models.space import Knob, apply, check_space, merge_space
from recdist.schema import SCHEMA_VERSION
from recdist.train.cluster import WorkerPlan

log = logging.getLogger(__name__)

#: CPU each trial's Ray Tune function holds beyond its workers' share: a trial of several workers only drives a Ray
#: Train run (whose workers hold the real share); a one-worker trial is its worker and holds both.
DRIVER_CPU = 0.01
RAY_DIR = "_ray"


def checked_space(stage: StageConfig, budget: TuneBudget) -> dict[str, Knob]:
    """The knobs a search of `stage` explores (the model's space, changed by budget.space); ConfigError on an unknown
    knob or a bad range, before anything is read or started."""
    knobs = merge_space(registry.get(stage.model).config.search_space, budget.space)
    check_space(knobs, stage.model_copy(update={"tune": None}))
    return knobs


def tune_stage(
    data: str,
    stage: StageConfig,
    cluster: ClusterConfig,
    out: str,
    *,
    budget: TuneBudget | None = None,
    slot: str = "single",
    upstream: str | None = None,
    overwrite: bool = False,
    retrain_best: bool = True,
) -> dict[str, Any]:
    """Search `stage`'s settings on the dataset at `data` within `budget`, write the outputs to `out` and return
    the summary (manifest.json's content); a committed `out` holding this very search is kept (_committed_search)."""
    budget = budget or stage.tune or TuneBudget()
    base = stage.model_copy(update={"tune": None})
    data, out = storage.absolute(data), storage.absolute(out)
    upstream = storage.absolute(upstream) if upstream else None
    knobs = checked_space(base, budget)
    name = search_name(data, base, knobs, budget, upstream)
    if (kept := _committed_search(out, name, overwrite)) is not None:
        return kept
    _check_search_inputs(data, stage.model, upstream, out)

    import ray

    from recdist.train.cluster import connect
    from recdist.tune.trial import TrialSpec

    connect(cluster)
    plan, concurrency = trial_plan(cluster, budget, ray.cluster_resources())
    searched = {k: knob for k, knob in knobs.items() if knob.kind != "fixed"}
    spec = TrialSpec(data, _fixed_stage(base, knobs), upstream, searched, plan, storage.join(out, RAY_DIR), name,
                     cluster.max_failures)  # fmt: skip
    started = time.perf_counter()
    _say_search(stage.model, data, budget, concurrency, plan, searched)
    grid, resumed = _search(spec, budget, concurrency, max_epochs(searched, base))
    rows, best_row, best = _write_results(grid, spec, stage.model, slot, out)
    best_metrics = _retrain(data, best, cluster, out, upstream, best_row) if retrain_best else None
    summary = {
        "schema_version": SCHEMA_VERSION, "kind": "tune", "search": name, "model": stage.model, "slot": slot,
        "data": data, "upstream": upstream, "space": {k: knob.describe() for k, knob in knobs.items()},
        "trials": len(rows), **{s: sum(r["status"] == s for r in rows) for s in ("finished", "stopped", "failed")},
        "resumed": resumed, "concurrency": concurrency, "cpus_per_trial": plan.cpus_per_worker * plan.workers,
        "best": {k: best_row[k] for k in ("trial_id", "val_rmse", "epochs", "best_epoch", "seconds")},
        "best_values": best_row["values"], "best_stage": best.model_dump(mode="json", exclude={"tune"}),
        "best_run": {k: best_metrics[k] for k in ("train", "val", "test", "epochs", "best_epoch")}
        if best_metrics else None,
        "seconds": round(time.perf_counter() - started, 2),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }  # fmt: skip
    storage.write_json(storage.join(out, storage.MANIFEST), summary)
    with contextlib.suppress(OSError):  # committed: the search's state and the trials' checkpoints are done with
        storage.remove(spec.storage_uri)
    log.info("tune: best val RMSE %.4f (trial %s) of %d trials in %.0f s: %s", best_row["val_rmse"],
             best_row["trial_id"], len(rows), summary["seconds"], out)  # fmt: skip
    return summary


def _search(spec: Any, budget: TuneBudget, concurrency: int, max_t: int) -> Any:
    """_run, then the placement groups of trials ASHA stopped released (Ray 2.60 leaves them without a dashboard)."""
    if spec.in_process:  # no Ray Train runs: Tune removes its trials' own placement groups
        return _run(spec, budget, concurrency, max_t)
    before = _placement_groups()
    result = _run(spec, budget, concurrency, max_t)
    _release_stopped_trials(before, spec.plan)
    return result


def _fixed_stage(base: StageConfig, knobs: dict[str, Knob]) -> dict[str, Any]:
    """The stage every trial starts from: its model's defaults spelt out, the fixed knobs applied."""
    full = base.model_dump(mode="json", exclude={"tune"})
    full["params"] = registry.validate(base.model, base.params).model_dump(mode="json")
    return apply(full, {k: knob.values[0] for k, knob in knobs.items() if knob.kind == "fixed"})


def _committed_search(out: str, name: str, overwrite: bool) -> dict[str, Any] | None:
    """The committed summary in `out` when it holds this very search (and no --overwrite); else None, `out`
    cleared for a new search when --overwrite is given. Another search's output is refused."""
    if not storage.is_committed(out):
        return None
    previous = storage.read_json(storage.join(out, storage.MANIFEST))
    if not overwrite and previous.get("search") == name:
        log.info("tune: %s already holds this search, kept", out)
        return previous
    if not overwrite:
        raise StorageError(
            f"output already exists: {out}", fix="pass --overwrite to search again, or choose another --out"
        )
    storage.remove(out)
    return None


def _check_search_inputs(data: str, model: str, upstream: str | None, out: str) -> None:
    """The dataset fits the model and has validation ratings (trials are compared on them); `out` is writable."""
    from recdist.train.run import check_inputs

    manifest = check_inputs(data, registry.get(model).module, upstream)
    if manifest.get("splits", {}).get("val", 0) == 0:
        raise ConfigError(
            f"{data} has no validation ratings: a search compares trials on validation RMSE",
            fix="prepare the data with --val-fraction above 0 (or give a validation file)",
        )
    storage.check_writable(out)


def _say_search(
    model: str, data: str, budget: TuneBudget, concurrency: int, plan: WorkerPlan, searched: dict[str, Knob]
) -> None:
    log.info(
        "tune: %s on %s, %s trial(s)%s, %d at a time (%g CPU%s each); searching %s",
        model, data, budget.trials or "unlimited",
        f" within {budget.time_budget_s:g} s" if budget.time_budget_s else "", concurrency,
        plan.cpus_per_worker * plan.workers, " + GPU" if plan.gpu else "",
        ", ".join(f"{k} ({knob.describe()})" for k, knob in searched.items()),
    )  # fmt: skip


def _write_results(
    grid: Any, spec: Any, model: str, slot: str, out: str
) -> tuple[list[dict[str, Any]], dict[str, Any], StageConfig]:
    """trials.parquet, best.yaml and the plot from the search's results: (rows, the best row, the best stage)."""
    from recdist.tune import outputs

    rows = outputs.trial_rows(grid, spec)
    finished = [r for r in rows if r["val_rmse"] is not None and math.isfinite(r["val_rmse"])]
    if not finished:
        raise ConfigError(
            f"no trial of the search reported a validation RMSE ({len(rows)} trial(s))",
            where=storage.join(spec.storage_uri, spec.name),
            fix="look at the trials' errors in Ray's logs (rerun with --verbose), or widen the budget",
        )
    best_row = min(finished, key=lambda r: r["val_rmse"])
    best = StageConfig.model_validate(apply(spec.stage, best_row["values"]))
    outputs.write_trials(rows, list(spec.knobs), storage.join(out, "trials.parquet"))
    outputs.write_best_yaml(best, slot, best_row, len(rows), spec.data, storage.join(out, "best.yaml"))
    outputs.write_plot(rows, spec.knobs, storage.join(out, "val_rmse.png"), title=f"{model}: {len(rows)} trials")
    return rows, best_row, best


def _retrain(
    data: str, best: StageConfig, cluster: ClusterConfig, out: str, upstream: str | None, best_row: dict[str, Any]
) -> dict[str, Any]:
    """The best settings retrained into out/best exactly as `recdist train` writes a run (kept once committed)."""
    from recdist.train.run import train_stage

    best_out = storage.join(out, "best")
    if storage.is_committed(best_out):
        return storage.read_json(storage.join(best_out, "metrics.json"))
    log.info("tune: retraining the best settings (trial %s) into %s", best_row["trial_id"], best_out)
    return train_stage(data, best, cluster, best_out, upstream=upstream)


def tune_for_pipeline(config: Any, slot: str, data: str, out: str, upstream: str | None) -> StageConfig:
    """A pipeline stage's `tune:` budget: search (or take the committed search in `out`), return the best stage
    (its tune section kept, so the stage's hash and manifest still say it was tuned). The pipeline trains it."""
    stage = getattr(config.stages, slot)
    summary = tune_stage(data, stage, config.cluster, out, slot=slot, upstream=upstream, retrain_best=False)
    return StageConfig.model_validate({**summary["best_stage"], "tune": stage.tune.model_dump(mode="json")})


def search_name(data: str, stage: StageConfig, knobs: dict[str, Knob], budget: TuneBudget, upstream: str | None) -> str:
    """A name fixed by everything that shapes the search: the same command again resumes the same search."""
    key = json.dumps(
        [data, stage.model_dump(mode="json", exclude={"tune"}), {k: repr(v) for k, v in sorted(knobs.items())},
         budget.model_dump(mode="json", exclude={"space", "cpus_per_trial"}), upstream],
        sort_keys=True, default=str,
    )  # fmt: skip
    return f"search-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def max_epochs(knobs: dict[str, Knob], stage: StageConfig) -> int:
    """The most epochs any trial can train (ASHA's max_t)."""
    knob = knobs.get("train.epochs")
    return int(max(knob.endpoints())) if knob is not None else stage.train.epochs


def trial_plan(cluster: ClusterConfig, budget: TuneBudget, resources: dict[str, float]) -> tuple[WorkerPlan, int]:
    """Each trial's workers and how many trials run at once on a cluster with these totals.

    GPUs: one per worker, trials side by side as the GPUs allow. CPUs: budget.cpus_per_trial, else
    cluster.cpus_per_worker x workers, else the cluster shared out (a worker per core, less the trial drivers'
    sliver: 0.99 CPU each). A worker's share below one CPU is fractional (one thread); above, whole CPUs.
    """
    cpus, gpus = float(resources.get("CPU", 0)), int(resources.get("GPU", 0))
    workers = cluster.workers
    if cluster.gpu:
        if gpus < workers:
            raise ConfigError(
                f"trials of {workers} GPU worker(s) asked for but the cluster has {gpus} GPU(s)",
                fix=f"set cluster.workers to {gpus} or fewer, or run on CPUs (--cpu)" if gpus else "run on CPUs",
            )
        concurrency = gpus // workers
        per_trial = budget.cpus_per_trial or (cluster.cpus_per_worker or 1) * workers
        concurrency = min(concurrency, max(1, int(cpus // (per_trial + DRIVER_CPU))))
    elif budget.cpus_per_trial or cluster.cpus_per_worker:
        per_trial = budget.cpus_per_trial or float(cluster.cpus_per_worker * workers)
        concurrency = int(cpus // (per_trial + DRIVER_CPU))
    else:
        concurrency = max(1, int(cpus // workers))
        per_trial = cpus / concurrency - DRIVER_CPU
    if concurrency < 1:
        raise ConfigError(
            f"a trial needs {per_trial:g} CPUs (+{DRIVER_CPU} for its driver) but the cluster has {cpus:g}",
            fix="lower tune.cpus_per_trial (--cpus-per-trial) or cluster.workers",
        )
    per_worker = per_trial / workers
    per_worker = float(int(per_worker)) if per_worker >= 1 else round(per_worker - 0.0005, 3)
    share: float | int = int(per_worker) if per_worker >= 1 else per_worker
    return WorkerPlan(workers=workers, cpus_per_worker=share, gpu=cluster.gpu), concurrency  # type: ignore[arg-type]


def _run(spec: Any, budget: TuneBudget, concurrency: int, max_t: int) -> Any:
    """tuner.fit() of a new search, or of the killed one with the same name (Tuner.restore): the ResultGrid, and
    whether it was restored."""
    import ray.tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator

    from recdist.tune.trial import SearchProgress, encode, run_trial, tune_value

    fs, path = storage.arrow_filesystem(spec.storage_uri)
    fs = fs if storage.is_s3(spec.storage_uri) else None
    trainable = ray.tune.with_resources(ray.tune.with_parameters(run_trial, spec=spec), trial_resources(spec.plan))
    if not logs.settings().verbose:  # the old output engine at verbose 0 prints nothing (the new one a table)
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
        logging.getLogger("ray.tune").setLevel(logging.ERROR)  # its slow-step and resource warnings
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "5")  # the search's state saved often: little lost to a kill
    experiment = storage.join(spec.storage_uri, spec.name)
    restoring = ray.tune.Tuner.can_restore(_fs_path(experiment), storage_filesystem=fs)
    if restoring:
        log.info("tune: resuming the search in %s", experiment)
        tuner = ray.tune.Tuner.restore(
            _fs_path(experiment), trainable, resume_unfinished=True, resume_errored=False, storage_filesystem=fs
        )
        return tuner.fit(), True  # its run config, progress callback included, is the saved search's
    first = {k: encode(knob, _value(spec.stage, k)) for k, knob in spec.knobs.items()}
    first = {k: v for k, v in first.items() if v is not None}
    tuner = ray.tune.Tuner(
        trainable,
        param_space={k: tune_value(knob) for k, knob in spec.knobs.items()},
        tune_config=ray.tune.TuneConfig(
            metric="val_rmse",
            mode="min",
            search_alg=BasicVariantGenerator(
                points_to_evaluate=[first] if first else None, max_concurrent=concurrency, random_state=budget.seed
            ),
            scheduler=ASHAScheduler(  # max_t + 1: a trial at its last epoch still sends its final report
                time_attr="epochs_done", max_t=max_t + 1, grace_period=min(budget.grace_epochs, max_t)
            ),
            num_samples=budget.trials or -1,
            time_budget_s=budget.time_budget_s,
            # one-worker trials run in their Tune actor: the next trial reuses it (no process start, no imports)
            reuse_actors=spec.in_process,
        ),
        run_config=ray.tune.RunConfig(
            name=spec.name,
            storage_path=path,
            storage_filesystem=fs,
            verbose=0,
            callbacks=[SearchProgress(budget.trials, spec.knobs)],
            # a one-worker trial that fails restarts from its latest checkpoint, as a Ray Train run's workers do
            failure_config=ray.tune.FailureConfig(max_failures=spec.max_failures if spec.in_process else 0),
        ),
    )
    return tuner.fit(), False


def trial_resources(plan: WorkerPlan) -> Any:
    """What a trial's Tune function holds: a one-worker trial its worker's share (and GPU) plus the driver's
    sliver, in one bundle; a trial of several workers the sliver alone (its Ray Train workers hold theirs)."""
    import ray.tune

    if plan.workers != 1:
        return ray.tune.PlacementGroupFactory([{"CPU": DRIVER_CPU}])
    worker = plan.resources_per_worker()
    return ray.tune.PlacementGroupFactory([{**worker, "CPU": round(worker["CPU"] + DRIVER_CPU, 4)}])


def _placement_groups() -> dict[str, dict[str, Any]]:
    from ray.util import placement_group_table

    return {k: v for k, v in placement_group_table().items() if v["state"] != "REMOVED"}


def _release_stopped_trials(before: dict[str, Any], plan: WorkerPlan, wait_s: float = 20.0) -> None:
    """Remove the worker placement groups of trials ASHA stopped, if Ray Train's cleaner has not.

    Tune stops a trial by killing its actor, and with it the trial's Ray Train controller; Ray Train's detached
    cleaner then removes the workers' placement group, but only where the State API answers (a cluster without
    a dashboard): otherwise those CPUs would stay reserved and best/'s training wait for them forever. Only
    groups created during the search, still there after it and shaped exactly like a trial's workers go.
    """
    from ray.util import remove_placement_group
    from ray.util.placement_group import PlacementGroup

    shape = plan.resources_per_worker()

    def leftovers() -> list[str]:
        return [
            k
            for k, v in _placement_groups().items()
            if k not in before and all(b == shape for b in v["bundles"].values()) and len(v["bundles"]) == plan.workers
        ]

    deadline = time.monotonic() + wait_s
    while leftovers() and time.monotonic() < deadline:
        time.sleep(1.0)
    for pg_id in leftovers():
        log.debug("tune: removing the placement group %s of a stopped trial", pg_id)
        remove_placement_group(PlacementGroup(ray_id(pg_id)))


def ray_id(hex_id: str) -> Any:
    from ray._raylet import PlacementGroupID

    return PlacementGroupID(bytes.fromhex(hex_id))


def _value(stage: dict[str, Any], key: str) -> Any:
    section, _, name = key.partition(".")
    return (stage.get(section) or {}).get(name)


def _fs_path(uri: str) -> str:
    return storage.arrow_filesystem(uri)[1] if storage.is_s3(uri) else storage.absolute(uri)
