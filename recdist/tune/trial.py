"""What runs inside Ray Tune: the trial function, the Ray Train callback that feeds Tune, the driver's progress.

A trial is one Ray Train run of recdist.train.run's TorchTrainer (train_worker: the loop `recdist train` runs)
on the stage's config with the trial's sampled knobs. Its Train run is named after the trial and stored beside
the search, so a trial restarted by Tuner.restore resumes its Train run from the latest checkpoint.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Any

import ray.tune
from ray.tune import Callback
from ray.tune.integration.ray_train import TuneReportCallback

from recdist import logs
from recdist.config import StageConfig
from recdist.models.space import Knob, apply
from recdist.train.cluster import WorkerPlan

log = logging.getLogger("recdist.tune")

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
    """The Tune function trainable: one Ray Train run of the stage with this trial's knobs."""
    from recdist.train.run import _fit, make_trainer

    trial_id = ray.tune.get_context().get_trial_id()
    stage = stage_of(spec, config)
    loop_config = {
        "data": spec.data,
        "stage": stage.model_dump(mode="json"),
        "upstream": spec.upstream,
        "cpus_per_worker": spec.plan.cpus_per_worker,
        "gpu": spec.plan.gpu,
        "fail_at_epoch": None,
    }
    name = f"{spec.name}-{trial_id}"
    _fit(make_trainer(loop_config, spec.plan, spec.storage_uri, name, spec.max_failures, callbacks=[ToTune()]))


class ToTune(TuneReportCallback):
    """Pass rank 0's reports on to Tune: per epoch val_rmse and epochs_done (ASHA's clock), the running best;
    the last report (the best weights' train/val figures) ends the trial. Test figures never reach the search."""

    def __init__(self) -> None:
        super().__init__()
        self.epochs, self.best, self.best_epoch = 0, math.inf, 0

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        row = {k: v for k, v in metrics[0].items() if not k.startswith("test_")}
        if "epoch" in row:
            self.epochs = int(row["epoch"]) + 1
            if row["val_rmse"] < self.best:
                self.best, self.best_epoch = float(row["val_rmse"]), self.epochs
        else:  # the final report: the restored best weights
            self.best = min(self.best, float(row["val_rmse"]))
        row.update(epochs_done=self.epochs, best_val_rmse=self.best, best_epoch=self.best_epoch)
        super().after_report(run_context, [row], None)


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
