"""Train one stage on Ray Train: the TorchTrainer builder, the per-worker function, and the committed output.

Driver: validate everything cheap first (model, output, data columns, upstream, cluster fit), run a
TorchTrainer whose checkpoints live in Ray Train storage (default RUN/_ray next to OUT), then write OUT from
the final checkpoint in one commit (manifest.json last). A failed worker group restarts from the latest
checkpoint (FailureConfig.max_failures); re-running train_stage on an uncommitted OUT with the same
settings resumes the same Ray Train run (same name and storage) instead of starting again.

Worker: seed = train.seed + rank; read this rank's shards onto its device; build the model with a
generator seeded by train.seed (identical on every rank); a Ray Train report with rank 0's checkpoint after the
epochs the checkpoint policy picks (cluster.checkpoint_every_epochs / _seconds: each report waits for the
controller's next poll, so none in between); a last report carries the last state, the best weights and the
final train/val/test metrics.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import math
import os
import posixpath
import queue
import random
import tempfile
import threading
import time
import weakref
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any

import numpy as np
import torch

from recdist import figures, imports, logs, storage
from recdist.config import ClusterConfig, StageConfig, WarmConfig
from recdist.errors import ConfigError, DataError, RecdistError, StorageError
from recdist.models import registry
from recdist.models.base import Model
from recdist.models.batch import Dims
from recdist.models.io import model_dims
from recdist.schema import SCHEMA_VERSION, SPLITS
from recdist.train import checkpoint, dist, history
from recdist.train.cluster import WorkerPlan, worker_plan
from recdist.train.data import check_columns, load_rank_data
from recdist.train.loop import Trainer
from recdist.train.sessions import CHECKPOINTS_KEPT, InProcessSession, WorkerSession
from recdist.train.solvers import solver_name

log = logging.getLogger(__name__)

#: Test and chaos hook: a worker raises after training this epoch in a run's first attempt (never after a restart).
FAIL_AT_EPOCH_ENV = "RECDIST_INJECT_FAILURE_AT_EPOCH"
#: With FAIL_AT_EPOCH_ENV: `raise` (default) or `hang` (the worker stops there: a test kills the driver meanwhile).
FAIL_KIND_ENV = "RECDIST_INJECT_FAILURE_KIND"


def build_model(stage: StageConfig, dims: Dims) -> Model:
    """The stage's model, its weights drawn from a generator seeded by train.seed (the same on every rank)."""
    entry = registry.get(stage.model)
    config = registry.validate(stage.model, stage.params)
    return entry.module(config, dims, torch.Generator().manual_seed(stage.train.seed))


def built_with(dims: Dims, warm_start: dict[str, Any] | None) -> Dims:
    """The Dims a stage's model is built from: its data's, with a fold-in's previous global mean (recdist.train.warm:
    a fold-in night keeps it, so an unchanged row's centring is the previous run's)."""
    mean = (warm_start or {}).get("global_mean")
    return dims if mean is None else replace(dims, global_mean=mean)


def model_from_state(stage: StageConfig, dims: Dims, tensors: dict[str, torch.Tensor]) -> Model:
    """Rebuild a trained model from its state_dict alone (frozen upstream tables and contexts included)."""
    model = build_model(stage, dims)
    model.resize_for(tensors)  # the buffers attach()/set_context() size
    model.load_state_dict(tensors)
    return model.eval()


# --------------------------------------------------------------------------------------------------- worker


def train_worker(config: dict[str, Any]) -> Any:
    """Ray Train's train_loop_per_worker: one rank's whole training run. In local mode (a TorchTrainer of no
    workers: the one rank in the driver's process; config["in_process"] = where its checkpoints persist) it
    returns the last checkpoint, torch's thread count restored."""
    root = config.get("in_process")
    if root is None:
        run_worker(config, WorkerSession())
        return None
    session, threads = InProcessSession(root), torch.get_num_threads()
    try:
        run_worker(config, session)
    finally:
        torch.set_num_threads(threads)
    return session.last


def run_worker(config: dict[str, Any], session: Any) -> None:
    """One rank's whole training run, reporting through `session` (a WorkerSession or alike)."""
    entered = time.time()  # wall clock: the driver compares it with its own (one machine: the same clock)
    rank, world = session.rank, session.world
    stage = StageConfig.model_validate(config["stage"])
    _seed_rank(stage.train.seed + rank, config["cpus_per_worker"])
    if stage.train.epochs and solver_name(registry.get(stage.model).module, stage.train.solver) == "autograd":
        imports.prefetch("torch._dynamo")  # a torch.optim optimiser's first use imports it (1.2 s): now, meanwhile
    device = session.device(config["gpu"])
    trainer, timings, carried = _rank_trainer(config, stage, rank, world, device)
    clock = time.perf_counter()
    attempt = _resume(trainer, config, session, device)
    timings["setup_s"] += time.perf_counter() - clock
    compute = reporting = 0.0

    progress = config.get("progress_queue")
    fail_at = config.get("fail_at_epoch") if attempt == 0 else None
    policy = checkpoint.CheckpointPolicy(  # without the keys (a direct caller): every epoch, as before
        int(config.get("checkpoint_every_epochs", 1)), float(config.get("checkpoint_every_seconds", 0.0))
    )
    last_checkpoint, checkpoints = time.monotonic(), 0
    while not trainer.done:
        row = trainer.train_epoch()
        row["attempt"] = attempt
        if fail_at is not None and row["epoch"] == fail_at:
            while config.get("fail_kind") == "hang":
                time.sleep(1)
            raise RuntimeError(f"injected failure after epoch {fail_at} ({FAIL_AT_EPOCH_ENV})")
        compute += row["seconds"]
        if progress is not None and rank == 0:
            progress.put(row)
        if trainer.done:  # the final report below checkpoints the last state
            break
        clock = time.perf_counter()
        due = _agreed(policy.due(row["epoch"] + 1, time.monotonic() - last_checkpoint), device)
        if due or session.reports_every_epoch:
            _report(session, trainer, row, save=due, attempt=attempt)
            if due:
                last_checkpoint, checkpoints = time.monotonic(), checkpoints + 1
        reporting += time.perf_counter() - clock

    clock = time.perf_counter()
    trainer.finish()
    final = trainer.final_metrics(tuple(config.get("splits", SPLITS)))  # () = validation only
    compute += time.perf_counter() - clock
    flat = {f"{split}_{name}": value for split, figures in final.items() for name, value in (figures or {}).items()}
    timings.update(compute_s=compute, report_s=reporting, checkpoints=checkpoints + 1)
    timings.update(entered=entered, left=time.time(), process_created=_process_created())
    _report(
        session, trainer, {"final": 1, **flat}, attempt=attempt, final=final, device=device.type, world=world,
        timings=timings, warm_counts=carried,
    )  # fmt: skip
    # DistributedDataParallel sits in a reference cycle: left to a later collection it is destroyed after Ray
    # Train has destroyed the process group, and its reducer then aborts the process ("terminate called without
    # an active exception", 1 exit in 6-12 in tests/test_train.py's two gloo ranks). Collect it here, first. So
    # too when anything else still holds the model (a traceback caught inside PyTorch's first optimiser holds
    # the frames of the epoch that built it): then the rank's data goes now, not at a later collection. Else
    # the model is gone already, and a full collection of the heap (0.2 s per stage) is saved.
    model = weakref.ref(trainer.model)
    del trainer
    if model() is not None:
        gc.collect()


def _seed_rank(seed: int, cpus: float) -> None:
    """seed = base + rank for torch, numpy and random; torch's threads to this worker's CPU share."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    torch.set_num_threads(max(1, min(cpus, os.cpu_count() or 1)))


def _rank_trainer(
    config: dict[str, Any], stage: StageConfig, rank: int, world: int, device: torch.device
) -> tuple[Trainer, dict[str, float], dict[str, int] | None]:
    """This rank's data, its model (the upstream model attached) and the Trainer; timings of load and setup; what
    a warm start carried over (None for a cold fit)."""
    from recdist.models.io import load_model

    model_cls = registry.get(stage.model).module
    clock = time.perf_counter()
    data = load_rank_data(
        config["data"],
        target=model_cls.target,
        inputs=tuple(model_cls.inputs),
        rank=rank,
        world=world,
        device=device,
        context=model_cls.needs_context,
    )
    timings = {"data_load_s": time.perf_counter() - clock}
    clock = time.perf_counter()
    model = build_model(stage, built_with(data.dims, config.get("warm_start"))).to(device)
    if model_cls.upstream:
        model.attach(load_model(config["upstream"], device=device))
    warm_start, counts = config.get("warm_start"), None  # either way before _resume: a checkpoint wins
    if warm_start and model.mf_tables() is not None:  # tables by original ids, before the solver sees the rows
        from recdist.train import warm

        carried = warm.carry_tables(model, warm_start, config["data"])
        data = carried.rows_of(data)  # a fold-in trains over the rows that can move only
        trainer = Trainer(model, stage.train, data, device)
        trainer.solver.warm_rows(carried.user_rates, carried.item_rates)
        counts = carried.counts
        if warm_start.get("fold_in") and world == 1:
            counts = {**counts, "training_rows": len(data.train)}
    else:
        trainer = Trainer(model, stage.train, data, device)
        if warm_start:  # weights after the model's data-dependent set-up
            from recdist.train import warm

            counts = warm.apply(model, warm_start)
    if counts is not None and rank == 0:
        log.info("warm start from %s: %s", warm_start["model"], counts)
    timings["setup_s"] = time.perf_counter() - clock
    return trainer, timings, counts


def _resume(trainer: Trainer, config: dict[str, Any], session: Any, device: torch.device) -> int:
    """Load the latest checkpoint into `trainer` if the session has one; this worker group's attempt number."""
    attempt = 0
    resumed = session.latest_checkpoint()
    if resumed is not None:
        with resumed.as_directory() as directory:
            state = checkpoint.load_state(directory, device)
        trainer.load_state_dict(state)
        attempt = int(state["progress"].get("attempt", 0)) + 1
    return _attempt(config, session.rank, device, attempt)


def _attempt(config: dict[str, Any], rank: int, device: torch.device, from_checkpoint: int) -> int:
    """This worker group's attempt at the run (0 = the first), counted by rank 0 in a small file of the run's Ray
    Train directory and shared with every rank: a restart finds no checkpoint when the policy wrote none yet.
    Without the file's address (a direct caller), the count the latest checkpoint implies."""
    uri = config.get("attempts_file")
    if not uri:
        return from_checkpoint
    mine = 0
    if rank == 0:
        mine = int(storage.read_json(uri)["started"]) if storage.exists(uri) else 0
        storage.write_json(uri, {"started": mine + 1})
    return int(dist.all_reduce_sum_(torch.tensor([float(mine)], device=device)).item())


def _process_created() -> float | None:
    """When this worker process started (wall clock), or None where psutil cannot tell."""
    try:
        import psutil

        return psutil.Process().create_time()
    except Exception:  # noqa: BLE001 - a figure for the bench, never worth failing a run
        return None


def _agreed(due: bool, device: torch.device) -> bool:
    """Whether any rank's policy says checkpoint now: every rank must call report the same number of times, and
    their clocks differ (one 1-element all-reduce; nothing in a single process)."""
    flag = torch.tensor([1.0 if due else 0.0], device=device)
    return bool(dist.all_reduce_sum_(flag).item() > 0)


def _report(session: Any, trainer: Trainer, metrics: dict[str, Any], *, save: bool = True, **extra: Any) -> None:
    """Every rank reports (a barrier under Ray Train); rank 0 alone writes the checkpoint, when `save`."""
    if session.rank != 0 or not save:
        session.report(metrics, None)
        return
    with tempfile.TemporaryDirectory(prefix="recdist-ckpt-") as directory:
        checkpoint.save_state(trainer.state_dict(), directory, **extra)
        session.report(metrics, directory)


# --------------------------------------------------------------------------------------------------- driver


def train_stage(
    data: str,
    stage: StageConfig,
    cluster: ClusterConfig,
    out: str,
    *,
    upstream: str | None = None,
    overwrite: bool = False,
    warm_start: dict[str, Any] | None = None,
    warm: WarmConfig | None = None,
    epoch_lines: bool = True,
    splits: tuple[str, ...] = SPLITS,
) -> dict[str, Any]:
    """Train `stage` on the dataset or scored table at `data` with Ray Train; commit the model to `out`; return
    metrics.json's content. warm_start (recdist.train.warm.WarmStart.to_json()): start from that previous model
    (MF tables mapped by original ids, other models' weights as they were), trained as `warm` says (default
    WarmConfig()); a warm fit whose validation RMSE is worse than the previous model's by more than warm.tolerance
    is refit cold (`warm_fallback` in the metrics). Problems the driver can see raise before any worker starts; a
    worker's RecdistError is raised as it was. epoch_lines: a log line per epoch, else progress every few seconds
    (the cross-fitting fold models: five more fits of the stage). splits: the final figures measured besides
    validation's (always: early stopping and the warm start's check read it); the others are null in metrics.json."""
    model_cls = registry.get(stage.model).module
    registry.validate(stage.model, stage.params)
    if stage.train.epochs == 0 and not warm_start:
        raise ConfigError(
            f"train.epochs is 0: nothing would train {stage.model}, and its untrained weights would be committed",
            where="train.epochs",
            fix="set train.epochs >= 1 (0 is for a warm stage 2 or 3 keeping yesterday's weights: "
            "pipeline.warm.mlp_epochs)",
        )
    data, out = storage.absolute(data), storage.absolute(out)  # the workers' working directory is not ours
    upstream = storage.absolute(upstream) if upstream else None
    committed = storage.is_committed(out)
    if committed and not overwrite:
        raise StorageError(
            f"output already exists: {out}", fix="pass --overwrite to retrain it, or choose another output path"
        )
    manifest = check_inputs(data, model_cls, upstream)
    _say_without_validation(data, manifest, stage.train.epochs)
    plan = worker_plan(cluster)
    storage_uri = storage.absolute(cluster.storage_path or storage.join(_parent(out), "_ray"))
    fit = _StageFit(
        data, out, upstream, cluster, plan, storage_uri, fresh=committed, epoch_lines=epoch_lines, splits=splits
    )
    figures.prefetch()  # write_output's learning curve
    if warm_start:
        stage, state, metrics = _fit_warm(fit, stage, warm_start, warm or WarmConfig())
    else:
        state, metrics = fit(stage, None)
    write_output(out, state, stage, manifest, metrics, data=data, upstream=upstream, overwrite=overwrite)
    for run_dir in fit.run_dirs:  # committed: the runs' checkpoints are no longer needed
        try:
            storage.remove(run_dir)
        except OSError:
            pass
    return metrics


def _fit_warm(
    fit: _StageFit, stage: StageConfig, warm_start: dict[str, Any], settings: WarmConfig
) -> tuple[StageConfig, dict[str, Any], dict[str, Any]]:
    """A warm fit of `stage` from warm_start's model, refit cold when its validation RMSE is worse than the previous
    model's by more than settings.tolerance; returns the stage as trained, its final state and its metrics."""
    from recdist.train import warm as warm_rules

    warm_stage = warm_rules.warm_train(stage, warm_start["model"], settings)
    rate = warm_rules.new_row_rate(stage, warm_stage)
    fold_in = warm_rules.folds_in(stage, settings)
    if warm_stage.train.epochs == 0:
        log.info(
            "warm start from %s: its weights%s as they are, kept if they validate (no epochs)", warm_start["model"],
            " and input statistics (a fold-in night)" if fold_in else "",
        )  # fmt: skip
    else:
        log.info(
            "warm start from %s: peak learning rate %s (new users and movies: x %.3g), at most %d epochs, "
            "patience %d%s",
            warm_start["model"], warm_stage.train.lr, rate, warm_stage.train.epochs, warm_stage.train.patience,
            "; a fold-in: only new and changed users and new movies train" if fold_in else "",
        )  # fmt: skip
    told = {**warm_start, **({"new_row_rate": rate} if rate != 1.0 else {})}
    if fold_in:  # the previous run's global mean too, in every model of the night: its rows predict as they did
        told.update(fold_in=True, global_mean=model_dims(warm_start["model"]).global_mean)
    state, metrics = fit(warm_stage, told)
    worse = warm_rules.fallback(metrics, warm_start["model"], settings.tolerance)
    if worse is None:
        stage = warm_stage
        if warm_stage.train.epochs == 0:
            kept = (metrics.get("val") or {}).get("rmse")
            kept = "none" if kept is None else f"{kept:.4f}"
            log.info("warm start: the previous weights kept, validation RMSE %s", kept)
    else:
        log.warning(
            "warm start: validation RMSE %.4f is worse than the previous model's %.4f by more than %g of it "
            "(pipeline.warm.tolerance): refitting cold",
            worse["warm_val_rmse"], worse["previous_val_rmse"], settings.tolerance,
        )  # fmt: skip
        worse["warm_seconds"] = metrics["seconds"]
        state, metrics = fit(stage, None)
        metrics["warm_fallback"] = worse
    counts = metrics.pop("warm_counts", None)  # what the warm fit carried over (a cold refit's has none)
    metrics["warm_start"] = {**warm_start, **({"counts": counts} if counts else {})}
    if fold_in and worse is None:
        metrics["warm_start"].update(fold_in=True, global_mean=told["global_mean"])
    return stage, state, metrics


class _StageFit:
    """One Ray Train fit of a stage's model into `out` (called once, or twice when a warm fit is refit cold):
    the final checkpoint's state and metrics.json's content. Its Ray Train run directories are removed by the
    caller after the commit (a re-run before it resumes them)."""

    def __init__(
        self, data: str, out: str, upstream: str | None, cluster: ClusterConfig, plan: WorkerPlan, storage_uri: str,
        *, fresh: bool, epoch_lines: bool = True, splits: tuple[str, ...] = SPLITS,
    ) -> None:  # fmt: skip
        self.data, self.out, self.upstream, self.cluster, self.plan = data, out, upstream, cluster, plan
        self.storage_uri, self.fresh, self.epoch_lines, self.splits = storage_uri, fresh, epoch_lines, splits
        self.run_dirs: list[str] = []

    def __call__(self, stage: StageConfig, warm_start: dict[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
        model_cls = registry.get(stage.model).module
        cluster, plan = self.cluster, self.plan
        name = run_name(self.data, stage, self.out, self.upstream, plan, warm_start)
        run_dir = storage.join(self.storage_uri, name)
        self.run_dirs.append(run_dir)
        if self.fresh:  # retraining a committed output: start afresh, not from its old run's checkpoints
            storage.remove(run_dir)
        loop_config: dict[str, Any] = {
            "data": self.data,
            "splits": list(self.splits),
            "stage": stage.model_dump(mode="json"),
            "upstream": self.upstream,
            "cpus_per_worker": plan.cpus_per_worker,
            "gpu": plan.gpu,
            "fail_at_epoch": int(os.environ[FAIL_AT_EPOCH_ENV]) if os.environ.get(FAIL_AT_EPOCH_ENV) else None,
            "fail_kind": os.environ.get(FAIL_KIND_ENV, "raise"),
            "attempts_file": storage.join(run_dir, "attempts.json"),
            "checkpoint_every_epochs": cluster.checkpoint_every_epochs,
            "checkpoint_every_seconds": cluster.checkpoint_every_seconds,
            "warm_start": warm_start,
        }
        started, fit_started = time.perf_counter(), time.time()
        where = "in this process" if plan.in_process else f"on {plan.workers} worker(s)"
        if plan.in_process:
            loop_config["in_process"] = storage.join(run_dir, IN_PROCESS)
        label = f"{stage.model} {where}"
        with EpochProgress(stage.train.epochs, label, local=plan.in_process, lines=self.epoch_lines) as bar:
            loop_config["progress_queue"] = bar.queue
            result = _fit(make_trainer(loop_config, plan, self.storage_uri, name, cluster.max_failures))
        saved = result.return_value if plan.in_process else result.checkpoint
        fit_ended = time.time()
        if saved is None:
            raise RecdistError(f"training of {stage.model} reported no checkpoint", where=run_dir)
        with saved.as_directory() as directory:
            state = checkpoint.load_state(directory)
        metrics = summarise(state["progress"], stage, model_cls, plan, time.perf_counter() - started)
        metrics["overhead"] = overhead(state["progress"].get("timings"), fit_started, fit_ended)
        if state["progress"].get("warm_counts"):
            metrics["warm_counts"] = state["progress"]["warm_counts"]
        return state, metrics


IN_PROCESS = "in-process"
"""Where an in-process fit (ClusterConfig.in_process) keeps its checkpoints inside its Ray Train run directory."""


def _say_without_validation(data: str, manifest: dict[str, Any], epochs: int) -> None:
    """Warn (shown even with --quiet: the run differs in kind) when the data has no validation rows."""
    if manifest.get("splits", {}).get("val", 1) == 0:
        log.warning(
            "%s has no validation ratings: training runs all %d epochs without early stopping and keeps the last; "
            "give a validation file, or prepare with --val-fraction above 0",
            data, epochs,
        )  # fmt: skip


def check_inputs(data: str, model_cls: type[Model], upstream: str | None) -> dict[str, Any]:
    """The data's manifest, after checking the columns the model reads and its upstream model exist."""
    from recdist.data import dataset

    manifest = dataset.read_manifest(data)
    shards = dataset.shard_files(data)
    if not shards:
        raise DataError("the dataset has no ratings shards", where=data, fix="run `recdist prepare` again")
    columns = ["user_idx", "item_idx", model_cls.target, *model_cls.inputs, "split"]
    check_columns(data, columns, storage.parquet_schema(shards[0]).names)
    if model_cls.upstream:
        if not upstream:
            raise ConfigError(
                f"model {model_cls.registry_name!r} trains on a stage-1 model's factors but none was given",
                fix="pass the trained MF stage's output directory as upstream",
            )
        if not storage.exists(storage.join(upstream, "model.safetensors")):
            raise StorageError(
                "upstream model not found (no model.safetensors)", where=upstream, fix="train stage 1 first"
            )
    return manifest


def run_name(
    data: str, stage: StageConfig, out: str, upstream: str | None, plan: WorkerPlan, warm: dict[str, Any] | None = None
) -> str:
    """A Ray Train run name fixed by everything that shapes the run: re-running resumes the same run."""
    parts = [
        storage.absolute(data),
        stage.model_dump(mode="json"),
        storage.absolute(out),
        upstream and storage.absolute(upstream),
        plan.workers,
        plan.gpu,
    ]
    key = json.dumps(parts + [warm] if warm else parts, sort_keys=True)  # a cold run keeps its old name
    base = posixpath.basename(str(out).rstrip("/")) or "stage"
    return f"{base}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def make_trainer(
    loop_config: dict[str, Any], plan: WorkerPlan, storage_uri: str, name: str, max_failures: int, callbacks=None
):
    """The TorchTrainer: gloo on CPU, NCCL with GPUs; checkpoints and run state under storage_uri/name.
    callbacks: Ray Train callbacks (`recdist tune` passes its reports on to Ray Tune).

    An in-process plan gets Ray Train's local mode (no workers: train_worker runs in this process, no cluster);
    its checkpoints persist under loop_config["in_process"] (sessions.InProcessSession), not Ray Train's storage.
    """
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    logging.getLogger("ray.train").setLevel(logs.train_log_level())  # local mode's INFO line, in this process
    if plan.in_process:
        scaling = ScalingConfig(num_workers=0, use_gpu=plan.gpu)
    else:
        scaling = ScalingConfig(
            num_workers=plan.workers, use_gpu=plan.gpu, resources_per_worker=plan.resources_per_worker()
        )
    fs, path = storage.arrow_filesystem(storage_uri)
    return TorchTrainer(
        train_worker,
        train_loop_config=loop_config,
        scaling_config=scaling,
        run_config=RunConfig(
            name=name,
            storage_path=path,
            storage_filesystem=fs if storage.is_s3(storage_uri) else None,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=CHECKPOINTS_KEPT),
            logging_config=LoggingConfig(log_level=logs.train_log_level()),
            callbacks=callbacks,
        ),
    )


def _fit(trainer):
    """trainer.fit(), with a worker's RecdistError raised as itself instead of wrapped in Ray's error."""
    from ray.train import TrainingFailedError

    try:
        return trainer.fit()
    except TrainingFailedError as e:
        for failure in getattr(e, "worker_failures", {}).values():
            if isinstance(failure, RecdistError):
                raise failure from None
        raise


def summarise(progress: dict[str, Any], stage: StageConfig, model_cls: type, plan: WorkerPlan, seconds: float):
    """metrics.json from the final checkpoint's progress (NaN, e.g. no validation split, becomes null)."""
    rows = progress["history"]
    speeds = [r["rows_per_s"] for r in rows]
    metrics = {
        **{split: progress["final"].get(split) for split in SPLITS},
        "best_epoch": progress["best_epoch"],
        "epochs": len(rows),
        "stopped_early": progress["stopped"],
        "rows_per_s": float(np.mean(speeds)) if speeds else None,
        "seconds": seconds,
        "attempts": max([int(r.get("attempt", 0)) for r in rows] + [int(progress.get("attempt", 0))]) + 1,
        "workers": plan.workers,
        "device": progress.get("device", "cuda" if plan.gpu else "cpu"),
        "model": stage.model,
        "params": stage.params,
        "train_config": stage.train.model_dump(mode="json"),
    }
    return _finite(metrics)


def overhead(timings: dict[str, float] | None, fit_started: float, fit_ended: float) -> dict[str, float] | None:
    """Where the fit's wall seconds went (rank 0 of the last attempt; wall clocks of one machine compared):
    start (controller, worker processes and imports, process group; process_s: the part after the worker process
    was created, or after fit() began when it was an older process), data load, setup (model, upstream, solver),
    compute (epochs with their validation, final evaluation), report (Ray Train reports and checkpoints between
    epochs), stop (the final report and checkpoint, then the controller's shutdown until fit() returns); commit_s
    (writing OUT) is added by write_output; checkpoints: how many the last attempt wrote, the final one included.
    Earlier attempts of a restarted run count in start."""
    if not timings:
        return None
    out = {
        "fit_s": fit_ended - fit_started,
        "start_s": timings["entered"] - fit_started,
        "data_load_s": timings["data_load_s"],
        "setup_s": timings["setup_s"],
        "compute_s": timings["compute_s"],
        "report_s": timings["report_s"],
        "stop_s": fit_ended - timings["left"],
    }
    if timings.get("process_created"):  # start = the process's launch + its imports and the process group
        out["process_s"] = timings["entered"] - max(timings["process_created"], fit_started)
    return {**{k: round(v, 3) for k, v in out.items()}, "checkpoints": int(timings.get("checkpoints", 0))}


def write_output(
    out: str,
    state: dict[str, Any],
    stage: StageConfig,
    manifest: dict[str, Any],
    metrics: dict[str, Any],
    *,
    data: str,
    upstream: str | None,
    overwrite: bool,
) -> None:
    """OUT: model.safetensors + model.json, history.parquet, learning_curve.png, metrics.json, manifest last."""
    from recdist.data import dataset
    from recdist.manifest import file_entries
    from recdist.models.io import save_model

    clock = time.perf_counter()
    model = model_from_state(stage, built_with(dataset.dims(manifest), metrics.get("warm_start")), state["model"])
    metrics["n_parameters"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    rows = state["progress"]["history"]
    with storage.staged_output(out, overwrite=overwrite) as staging:
        save_model(model, staging)
        history.write_history(rows, storage.join(staging, "history.parquet"))
        history.write_learning_curve(rows, storage.join(staging, "learning_curve.png"), title=stage.model)
        if metrics.get("overhead"):
            metrics["overhead"]["commit_s"] = round(time.perf_counter() - clock, 3)  # all but the two JSON files
        storage.write_json(storage.join(staging, "metrics.json"), metrics)
        storage.write_json(
            storage.join(staging, storage.MANIFEST),
            {
                "schema_version": SCHEMA_VERSION,
                "kind": "model",
                "model": stage.model,
                "stage": stage.model_dump(mode="json"),
                "data": data,
                "data_config_hash": manifest.get("config_hash"),
                "upstream": upstream,
                **{key: metrics[key] for key in ("warm_start", "warm_fallback") if metrics.get(key)},
                "metrics": {k: metrics[k] for k in ("train", "val", "test", "best_epoch", "epochs")},
                "created_at": datetime.now(timezone.utc).isoformat(),
                "files": [entry.model_dump() for entry in file_entries(staging)],
            },
        )


_QUEUES: dict[tuple[str, str], Any] = {}
"""The progress queue of each Ray session this process joined: one actor for every stage of a run."""


def _progress_queue() -> Any:
    """This Ray session's progress queue, made once (an actor is a process to start: not one per stage)."""
    import ray
    from ray.util.queue import Queue

    context = ray.get_runtime_context()
    key = (context.get_job_id(), context.get_node_id())
    if key not in _QUEUES:
        _QUEUES.clear()  # another session's queue died with it
        _QUEUES[key] = Queue(actor_options={"num_cpus": 0})
    return _QUEUES[key]


class EpochProgress:
    """One log line per epoch on the driver (`lines`; else a `done of total` line every few seconds) and a bar on a
    terminal (recdist.logs.Progress), fed by rank 0 through a Ray queue shared by the session's stages (`local`: a
    plain queue, rank 0 runs in this process); no queue when nothing would show the lines (INFO disabled)."""

    def __init__(self, epochs: int, label: str, *, local: bool = False, lines: bool = True):
        self.epochs, self.label, self.local, self.lines = epochs, label, local, lines
        self.queue: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> EpochProgress:
        if log.isEnabledFor(logging.INFO):
            self.queue = queue.Queue() if self.local else _progress_queue()
            self._thread = threading.Thread(target=self._pump, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._thread is None:
            return
        try:  # the end, behind every row rank 0 put (its puts returned before the stage did): the pump drains the
            self.queue.put(None)  # queue and stops at once, and the next stage's pump starts on an empty one
        except Exception:  # noqa: BLE001 - the queue's actor gone with its session: stop at the next empty poll
            self._stop.set()
        self._thread.join(timeout=10)

    def _pump(self) -> None:
        with logs.Progress(log, self.label, self.epochs) as progress:
            while True:
                try:
                    row = self.queue.get(timeout=0.5)
                except queue.Empty:  # Ray's Empty is one
                    if self._stop.is_set():
                        return
                    continue
                if row is None:
                    return
                epoch = int(row["epoch"]) + 1
                fields = {k: row[k] for k in ("train_loss", "val_rmse", "val_mae", "rows_per_s", "lr") if k in row}
                line = epoch_line(row, epoch, self.epochs) if self.lines else None
                progress.update(epoch, line, epoch=epoch, **fields)


def epoch_line(row: dict[str, Any], epoch: int, epochs: int) -> str:
    """`epoch 3/20 train loss 0.7037 val RMSE 0.8466 val MAE 0.6836 1,763,486 rows/s lr 0.0098`"""
    return (
        f"epoch {epoch}/{epochs} train loss {row['train_loss']:.4f} val RMSE {row['val_rmse']:.4f} "
        f"val MAE {row['val_mae']:.4f} {row['rows_per_s']:,.0f} rows/s lr {row['lr']:.2g}"
    )


def trained_line(metrics: dict[str, Any]) -> str:
    """`trained: 40 epochs (best 38), val RMSE 0.8573, 0.2 s`, from a stage's metrics.json."""
    rmse = (metrics.get("val") or {}).get("rmse")
    best = metrics.get("best_epoch")
    best = f" (best {best + 1})" if isinstance(best, int) and best >= 0 else ""
    val = f"val RMSE {rmse:.4f}" if rmse is not None else "no validation rows"
    return f"trained: {metrics.get('epochs')} epochs{best}, {val}, {metrics.get('seconds') or 0:.1f} s"


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _parent(uri: str) -> str:
    uri = str(uri).rstrip("/")
    return posixpath.dirname(uri) if "://" in uri else os.path.dirname(storage.absolute(uri))
