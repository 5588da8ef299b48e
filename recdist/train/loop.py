"""The per-worker training loop: epochs of a solver, global evaluation, early stopping, resumable state.

Knows nothing of Ray or files: run.py feeds it a model and a rank's RankData and saves its state_dict() into
Ray Train checkpoints. Every figure it reports is global (all-reduced over ranks), so every rank takes the
same early-stopping decision.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from recdist.config import TrainConfig
from recdist.infer.kernels import kernel_for
from recdist.models.base import Model
from recdist.schema import SPLITS
from recdist.train import dist
from recdist.train.data import RankData
from recdist.train.solvers import Problem, Solver, make_solver

#: Rows per forward pass when evaluating (predictions only, no graph): gathered rows and activations stay in
#: the CPU's cache (2-3x the rows per second of 256k-row passes).
EVAL_CHUNK = 1 << 15
#: Smallest validation RMSE drop that counts as an improvement for early stopping.
MIN_DELTA = 1e-4


def prepare_model(model: Model, data: RankData) -> None:
    """What a model needs from the data before its first step (set_context: the autoencoder's ratings, the
    stage-2/3 standardisation), from every rank's training rows when it declares needs_context."""
    model.set_context(data.context if data.context is not None else data.train)


class Trainer:
    """Trains one model on one rank's data; train_epoch() returns the epoch's global metrics.

    After fit() (or when `done`), finish() puts the best epoch's weights back (early stopping keeps the best
    validation RMSE, not the last).
    """

    def __init__(
        self,
        model: Model,
        cfg: TrainConfig,
        data: RankData,
        device: torch.device | str = "cpu",
        solver: Solver | None = None,
    ):
        self.model, self.cfg, self.data, self.device = model, cfg, data, torch.device(device)
        prepare_model(model, data)
        self.solver = solver if solver is not None else make_solver(Problem(model, cfg, data, self.device))
        self.rating_target = model.target == "rating"
        self.epoch = 0  # the next epoch to train
        self.best_rmse = math.inf
        self.best_epoch = -1
        self.bad_epochs = 0
        self.stopped = False
        self.best_state: dict[str, torch.Tensor] | None = None
        self.history: list[dict[str, float]] = []
        self._best_val: dict[str, float] | None = None  # the best epoch's validation figures, once finish() restored it

    @property
    def done(self) -> bool:
        return self.stopped or self.epoch >= self.cfg.epochs

    def train_epoch(self) -> dict[str, float]:
        """One epoch of the solver, then validation, early-stopping bookkeeping and the history row."""
        start = time.perf_counter()
        self._best_val = None
        stats = self.solver.train_epoch(self.epoch)
        val = self.evaluate("val")
        if not math.isnan(val["rmse"]):
            self.solver.observe(val["rmse"])
        if not stats.get("provisional"):  # e.g. a sampler's burn-in: no result, neither best nor bad
            self._track(val["rmse"])
        row = {
            "epoch": self.epoch,
            "train_loss": float(stats["train_loss"]),
            "val_rmse": val["rmse"],
            "val_mae": val["mae"],
            "rows_per_s": float(stats["rows"]) / max(float(stats["seconds"]), 1e-9),
            "lr": float(stats["lr"]),
            "seconds": time.perf_counter() - start,
        }
        self.history.append(row)
        self.epoch += 1
        return row

    def _track(self, val_rmse: float) -> None:
        if math.isnan(val_rmse):  # no validation split: the last epoch is the best
            self.best_epoch, self.best_state = self.epoch, None
            return
        if val_rmse < self.best_rmse - MIN_DELTA:
            self.best_rmse, self.best_epoch, self.bad_epochs = val_rmse, self.epoch, 0
            self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        else:
            self.bad_epochs += 1
            self.stopped = bool(self.cfg.patience) and self.bad_epochs >= self.cfg.patience

    def fit(self) -> list[dict[str, float]]:
        while not self.done:
            self.train_epoch()
        self.finish()
        return self.history

    def finish(self) -> None:
        """Restore the best epoch's weights (a no-op when the last epoch was the best)."""
        if self.best_state is not None:
            self.model.resize_for(self.best_state)  # a Gibbs average grows wider with each sample
            self.model.load_state_dict(self.best_state)
        best = [row for row in self.history if row["epoch"] == self.best_epoch]
        self._best_val = {"rmse": best[0]["val_rmse"], "mae": best[0]["val_mae"]} if best else None

    @torch.no_grad()
    def evaluate(self, split: str) -> dict[str, float]:
        """RMSE and MAE over a split on every rank together; NaN when the split is empty everywhere.

        Rating predictions are clipped to the rating scale, error predictions (a squared error) at zero. On a
        CPU, a model with a fused scoring kernel (the MF family) is scored by it: 10x PyTorch's gathers.
        """
        batch = self.data.split(split)
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        if batch is not None and len(batch):
            self.model.eval()
            lo, hi = (self.data.dims.rating_min, self.data.dims.rating_max) if self.rating_target else (0.0, None)
            kernel = kernel_for(self.model) if self.device.type == "cpu" else None
            for start in range(0, len(batch), EVAL_CHUNK):
                stop = min(start + EVAL_CHUNK, len(batch))
                if kernel is not None:
                    pred = kernel(batch.user[start:stop].numpy(), batch.item[start:stop].numpy())
                else:
                    pred = self.model(batch.take(torch.arange(start, stop, device=self.device)))
                err = pred.float().clamp(lo, hi) - batch.target[start:stop]
                sums += torch.stack([err.square().sum(), err.abs().sum(), err.new_tensor(float(len(err)))]).to(sums)
        dist.all_reduce_sum_(sums)
        n = float(sums[2])
        if n == 0:
            return {"rmse": math.nan, "mae": math.nan}
        return {"rmse": math.sqrt(float(sums[0]) / n), "mae": float(sums[1]) / n}

    def final_metrics(self, splits: tuple[str, ...] = SPLITS) -> dict[str, dict[str, float] | None]:
        """RMSE and MAE of the current weights on validation and on the other `splits` (None for the rest); the test
        split is only ever read here. After finish(), validation's are the best epoch's, measured on these weights
        when it was chosen."""
        val = dict(self._best_val or self.evaluate("val"))
        return {s: val if s == "val" else self.evaluate(s) if s in splits else None for s in SPLITS}

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly where this trainer is (tensors and plain values)."""
        return {
            "model": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
            "best_model": self.best_state,
            "solver": self.solver.state_dict(),
            "progress": {
                "epoch": self.epoch,
                "best_rmse": self.best_rmse,
                "best_epoch": self.best_epoch,
                "bad_epochs": self.bad_epochs,
                "stopped": self.stopped,
                "history": [dict(row) for row in self.history],
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.resize_for(state["model"])
        self.model.load_state_dict(state["model"])
        self.best_state = state.get("best_model")
        self.solver.load_state_dict(state["solver"])
        p = state["progress"]
        self.epoch, self.best_rmse, self.best_epoch = int(p["epoch"]), float(p["best_rmse"]), int(p["best_epoch"])
        self.bad_epochs, self.stopped = int(p["bad_epochs"]), bool(p["stopped"])
        self.history = [dict(row) for row in p["history"]]
        self._best_val = None
