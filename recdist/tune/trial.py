"""What runs inside Ray Tune: the trial function, what feeds Tune the worker loop's reports, the driver's progress.

A trial runs recdist.train.run's worker loop (run_worker: the loop `recdist train` runs) on the stage's config
with the trial's sampled knobs, in one of two ways:

- one worker (a CPU share or one GPU): in the trial's own process (TrialSession: rank 0 of 1), reporting to Tune
  every epoch and checkpointing into the trial's Tune checkpoints every CHECKPOINT_EVERY_S seconds; no Ray
  Train worker group to start, so a trial costs its epochs, not a worker group's start-up. Tuner.restore
  resumes a cut-short trial from its latest checkpoint.
- several workers: one Ray Train run of the TorchTrainer (train_worker), named after the trial and stored beside
  the search, its rank 0's reports passed on to Tune by the ToTune callback; Tuner.restore resumes the Train run
  from its latest checkpoint.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Any

import ray.tune
import torch
from ray.tune import Callback
from ray.tune.integration.ray_train import TuneReportCallback

from recdist import logs
from recdist.config import StageConfig
from recdist.models.space import Knob, apply
from recdist.train.cluster import WorkerPlan

log = logging.getLogger("recdist.tune")

#: In-process trials: a checkpoint after the first epoch that ends this long after the latest (and the final state).
CHECKPOINT_EVERY_S = 20.0
#: Test hook: the search process dies (os._exit, no clean-up) once this many trials have finished.
EXIT_AFTER_ENV = "RECDIST_TUNE_EXIT_AFTER_TRIALS"


@dataclass(frozen=True)
class TrialSpec:
    """What every trial shares: the data, the stage without its knobs, the knobs, where and how wide to train."""

    data: str
    stage: dict[str, Any]
    upstream: str | None
    knobs: dict[str, Knob]
    plan: WorkerPlan
    storage_uri: str
    name: str
    max_failures: int

    @property
    def in_process(self) -> bool:
        """One worker: the trial runs the worker loop in its own process (no Ray Train worker group)."""
        return self.plan.workers == 1


def tune_value(knob: Knob) -> Any:
    """The Ray Tune domain of a knob (a choice of non-scalars samples an index into its values)."""
    if knob.kind == "loguniform":
        return ray.tune.loguniform(knob.low, knob.high)
    if knob.kind == "uniform":
        return ray.tune.uniform(knob.low, knob.high)
    if knob.kind == "int":
        return ray.tune.randint(int(knob.low), int(knob.high) + 1)
    if knob.kind == "logint":
        return ray.tune.lograndint(int(knob.low), int(knob.high) + 1)
    if _scalars(knob):
        return ray.tune.choice(list(knob.values))
    return ray.tune.choice(list(range(len(knob.values))))


def encode(knob: Knob, value: Any) -> Any:
    """A knob's value as Tune samples it; None when the knob cannot take it (outside its range or choices)."""
    if value is None:
        return None
    if knob.kind in ("loguniform", "uniform", "int", "logint"):
        return value if isinstance(value, int | float) and knob.low <= value <= knob.high else None
    value = tuple(value) if isinstance(value, list) else value
    if value not in knob.values:
        return None
    return value if _scalars(knob) else knob.values.index(value)


def decode(knobs: dict[str, Knob], config: dict[str, Any]) -> dict[str, Any]:
    """The knob values of a trial's Tune config (choice indices back to their values)."""
    values = {}
    for key, knob in knobs.items():
        if key in config:
            raw = config[key]
            values[key] = raw if knob.kind != "choice" or _scalars(knob) else knob.values[int(raw)]
    return values


def _scalars(knob: Knob) -> bool:
    return all(isinstance(v, int | float | str | bool) for v in knob.values)


def stage_of(spec: TrialSpec, config: dict[str, Any]) -> StageConfig:
    return StageConfig.model_validate(apply(spec.stage, decode(spec.knobs, config)))


def run_trial(config: dict[str, Any], spec: TrialSpec) -> None:
    """The Tune function trainable: the worker loop on the stage with this trial's knobs, in this process (one
    worker) or as one Ray Train run (several)."""
    from recdist.train.run import _fit, make_trainer, run_worker

    stage = stage_of(spec, config)
    loop_config = {
        "data": spec.data,
        "stage": stage.model_dump(mode="json"),
        "upstream": spec.upstream,
        "cpus_per_worker": spec.plan.cpus_per_worker,
        "gpu": spec.plan.gpu,
        "fail_at_epoch": None,
    }
    if spec.in_process:
        run_worker({**loop_config, "checkpoint_every_epochs": 0, "checkpoint_every_seconds": CHECKPOINT_EVERY_S},
                   TrialSession())  # fmt: skip
        return
    name = f"{spec.name}-{ray.tune.get_context().get_trial_id()}"
    _fit(make_trainer(loop_config, spec.plan, spec.storage_uri, name, spec.max_failures, callbacks=[ToTune()]))


class TuneRows:
    """The worker loop's reports as Tune results: per epoch val_rmse and epochs_done (ASHA's clock), the running
    best; the last report (the best weights' train/val figures) ends the trial. Test figures never reach the
    search."""

    def __init__(self) -> None:
        self.epochs, self.best, self.best_epoch = 0, math.inf, 0

    def row(self, metrics: dict[str, Any]) -> dict[str, Any]:
        row = {k: v for k, v in metrics.items() if not k.startswith("test_")}
        if "epoch" in row:
            self.epochs = int(row["epoch"]) + 1
            if row["val_rmse"] < self.best:
                self.best, self.best_epoch = float(row["val_rmse"]), self.epochs
        else:  # the final report (the restored best weights) follows the last epoch, which reported nothing
            self.epochs += 1
            self.best = min(self.best, float(row["val_rmse"]))
        row.update(epochs_done=self.epochs, best_val_rmse=self.best, best_epoch=self.best_epoch)
        return row


class TrialSession:
    """recdist.train.run.run_worker's session in a Tune trial's own process: rank 0 of 1, checkpoints and
    reports through Ray Tune (the Ray Train WorkerSession's counterpart)."""

    rank, world = 0, 1
    reports_every_epoch = True

    def __init__(self) -> None:
        self.rows = TuneRows()

    def device(self, gpu: bool) -> torch.device:
        return torch.device("cuda", 0) if gpu else torch.device("cpu")  # Ray sets CUDA_VISIBLE_DEVICES to ours

    def latest_checkpoint(self) -> Any:
        return ray.tune.get_checkpoint()

    def report(self, metrics: dict[str, Any], directory: str | None) -> None:
        saved = ray.tune.Checkpoint.from_directory(directory) if directory else None
        ray.tune.report(self.rows.row(metrics), checkpoint=saved)


class ToTune(TuneReportCallback):
    """A Ray Train run's rank-0 reports passed on to Tune (TuneRows), for trials of several workers."""

    def __init__(self) -> None:
        super().__init__()
        self.rows = TuneRows()

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        super().after_report(run_context, [self.rows.row(metrics[0])], None)


class SearchProgress(Callback):
    """One log line per finished trial on the driver (a bar on a terminal), with the best so far."""

    def __init__(self, total: int | None, knobs: dict[str, Knob]):
        self.total, self.knobs, self.done, self.best = total, knobs, 0, math.inf
        self.progress = logs.Progress(log, "tune", total)
        self._counted = False  # a restored search counts the trials it had finished at its first step
        self._steps_after_exit = 0

    def setup(self, **info: Any) -> None:
        self.progress.__enter__()

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self.progress.__exit__(None, None, None)

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        if not self._counted:
            self._counted = True
            self.done = sum(t.status in ("TERMINATED", "ERROR") for t in trials)
        exit_after = os.environ.get(EXIT_AFTER_ENV)
        if exit_after and self.done >= int(exit_after):
            self._steps_after_exit += 1
            if self._steps_after_exit > 3:  # a few loop steps: Tune saves its state in between
                os._exit(3)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finished(trial, "finished" if trial.last_result.get("final") else "stopped by ASHA")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finished(trial, "failed")

    def _finished(self, trial: Any, how: str) -> None:
        self.done += 1
        result = trial.last_result or {}
        rmse = float(result.get("best_val_rmse", math.nan))
        if rmse < self.best:
            self.best = rmse
        values = decode(self.knobs, trial.config)
        shown = " ".join(f"{k.split('.', 1)[1]}={_short(v)}" for k, v in values.items())
        of = f"/{self.total}" if self.total else ""
        self.progress.update(
            self.done,
            f"trial {self.done}{of} {how}: val RMSE {rmse:.4f} after {result.get('epochs_done', 0)} epochs "
            f"[{shown}] best {self.best:.4f}",
            trial=trial.trial_id, val_rmse=rmse,
        )


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, list | tuple):
        return "x".join(str(v) for v in value)
    return str(value)
