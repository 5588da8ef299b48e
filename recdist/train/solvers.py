"""Solvers: what one epoch of training means for a model. The autograd solver here; MF ones in sgd/als/gibbs.py.

Every solver takes a `Problem` (model, train config, this rank's RankData, device), updates the model in place,
and returns each epoch's metrics. With several ranks the autograd solver wraps the model in DistributedDataParallel
(gloo on CPU, NCCL on CUDA; the same code path), so gradients are averaged across ranks each step.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from recdist.config import TrainConfig
from recdist.errors import ConfigError
from recdist.models.base import MFTables, Model, SolverFamily
from recdist.models.losses import data_loss
from recdist.train import dist
from recdist.train.data import RankData

#: The autograd optimisers' learning rate when train.lr is empty and the model has no default_lr.
DEFAULT_LR = 0.005
#: Per-rating SGD's learning rate when train.lr is empty (cosine schedule): bench/family.py's choice.
SGD_LR = 0.04
#: Cosine schedule's final learning rate as a share of the peak.
COSINE_FLOOR = 0.05
#: Plateau schedule: halve the learning rate after each epoch whose validation RMSE did not improve.
PLATEAU_FACTOR = 0.5
#: The solvers that can train each Model.solver_family, `auto`'s choice first.
SOLVERS: dict[SolverFamily, tuple[str, ...]] = {
    "autograd": ("autograd",),
    "explicit_mf": ("sgd", "als", "gibbs", "autograd"),
}


@dataclass(frozen=True)
class Problem:
    """What a solver trains: one model under a TrainConfig on this rank's rows, on a device (a name is taken)."""

    model: Model
    cfg: TrainConfig
    data: RankData
    device: torch.device = torch.device("cpu")

    def __post_init__(self) -> None:
        object.__setattr__(self, "device", torch.device(self.device))


class Solver(Protocol):
    """One epoch at a time; resumable from its state; told each epoch's validation RMSE (observe)."""

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """Train one pass over this rank's rows; at least train_loss, rows (all ranks), seconds, lr. provisional:
        1.0 when the weights after it are no result (Gibbs burn-in, thinned-out sweeps): early stopping skips it."""
        ...

    def observe(self, val_rmse: float) -> None:
        """After each epoch with a validation RMSE (the plateau schedule reads it)."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def warm_rows(self, user_rates: np.ndarray, item_rates: np.ndarray) -> None:
        """A warm fit's per-row learning rates, multiples of the schedule's, one per user and per item: its new
        users and items (which start as a cold fit's rows) at a higher one, a fold-in's frozen rows at 0 (only
        per-rating SGD freezes them: recdist.train.warm.folds_in); solvers without per-row rates ignore them."""
        ...


def epoch_seed(seed: int, rank: int, epoch: int) -> int:
    """The seed of (seed, rank, epoch): independent streams, no collisions between them."""
    return int(np.random.SeedSequence([seed, rank, epoch]).generate_state(1, dtype=np.uint64)[0] >> 1)


def epoch_generator(seed: int, rank: int, epoch: int, device: torch.device) -> torch.Generator:
    """The shuffling generator of (seed, rank, epoch)."""
    return torch.Generator(device=device).manual_seed(epoch_seed(seed, rank, epoch))


def rank_counts(n_local: int, device: torch.device) -> list[int]:
    """Every rank's row count (one all-reduce of a one-hot vector)."""
    counts = torch.zeros(dist.world_size(), dtype=torch.int64, device=device)
    counts[dist.rank()] = n_local
    return [int(c) for c in dist.all_reduce_sum_(counts).tolist()]


def make_optimizer(params: list[nn.Parameter], cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adagrad":
        return torch.optim.Adagrad(params, lr=lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=cfg.weight_decay)


class Schedule:
    """The learning rate at a (fractional) epoch: constant, cosine down to COSINE_FLOOR x the peak, or halved on
    plateaus. The peak is train.lr, else the solver's `default` rate."""

    def __init__(self, cfg: TrainConfig, default: float) -> None:
        self.cfg = cfg
        self.peak = cfg.lr if cfg.lr is not None else default
        self.best, self.halvings = math.inf, 0

    def lr(self, epoch: float) -> float:
        cfg = self.cfg
        if cfg.lr_schedule == "cosine":
            t = min(epoch / cfg.epochs, 1.0)
            return self.peak * (COSINE_FLOOR + (1 - COSINE_FLOOR) * 0.5 * (1 + math.cos(math.pi * t)))
        if cfg.lr_schedule == "plateau":
            return self.peak * PLATEAU_FACTOR**self.halvings
        return self.peak

    def observe(self, val_rmse: float) -> None:
        """After each epoch: a validation RMSE that did not improve halves the rate (plateau schedule)."""
        if val_rmse < self.best - 1e-4:
            self.best = val_rmse
        elif self.cfg.lr_schedule == "plateau":
            self.halvings += 1

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "halvings": self.halvings}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.halvings = float(state["best"]), int(state["halvings"])


class AutogradSolver:
    """Minibatch autograd on device-resident rows: seeded on-device shuffles, losses.data_loss + model.penalty.

    `batch_size` is global: an epoch has ceil(all ranks' rows / batch_size) steps on every rank, each rank
    splitting its own rows evenly over them, so DDP's collectives always pair up and the averaged gradient of a
    step covers about batch_size rows whatever the number of workers (1 and N workers train alike).
    """

    def __init__(self, p: Problem):
        model, cfg, data = p.model, p.cfg, p.data
        self.model, self.cfg, self.data, self.device = model, cfg, data, p.device
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ConfigError(f"model {type(model).__name__} has no trainable parameters")
        self.schedule = Schedule(cfg, default_lr(model, "autograd"))
        tables = sparse_tables(model, cfg, self.device)  # before DDP, which buckets sparse gradients apart
        self._sparse = [t.weight for t in tables]
        self._optimizers: list[torch.optim.Optimizer] | None = None
        self.net: nn.Module = model
        if dist.is_distributed():
            ids = [self.device.index] if self.device.type == "cuda" else None
            # buffers (frozen upstream factors) are identical on every rank: broadcast neither at start nor each
            # step. PyTorch 2.13 deprecates the flag for forward_sync_buffers, which would still broadcast them at
            # start, and itself advises keeping the flag until an init_sync_buffers exists: its warning is muted
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", "`broadcast_buffers` is deprecated", FutureWarning)
                self.net = nn.parallel.DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)
        self.steps = max(1, math.ceil(sum(rank_counts(len(data.train), self.device)) / cfg.batch_size))
        self.amp = cfg.amp and self.device.type == "cuda"

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        """Built at first use: a torch.optim optimiser's first call imports torch._dynamo (1.6 s per process),
        which a stage that trains no epoch (a warm start keeping its weights) never needs."""
        if self._optimizers is None:
            sparse = self._sparse
            dense = [p for p in self.params if all(p is not q for q in sparse)]
            self._optimizers = [make_optimizer(dense, self.cfg, self.schedule.peak)] if dense else []
            if sparse:
                self._optimizers.append(torch.optim.SparseAdam(sparse, lr=self.schedule.peak))
        return self._optimizers

    def train_epoch(self, epoch: int) -> dict[str, float]:
        start = time.perf_counter()
        train = self.data.train
        n = len(train)
        gen = epoch_generator(self.cfg.seed, dist.rank(), epoch, self.device)
        order = torch.randperm(n, generator=gen, device=self.device)
        # dropout and the autoencoder's hiding (training_batch) draw from the global RNG: seed it per (seed, rank,
        # epoch) too, so a run is reproducible in one process and a resumed epoch draws what the interrupted one did
        torch.manual_seed(epoch_seed(self.cfg.seed + 1, dist.rank(), epoch))
        bounds = [n * s // self.steps for s in range(self.steps + 1)]
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.model.train()
        lr = self.schedule.peak
        for step in range(self.steps):
            lr = self.schedule.lr(epoch + step / self.steps)
            for optimizer in self.optimizers:
                for group in optimizer.param_groups:
                    group["lr"] = lr
            batch = self.model.training_batch(train.take(order[bounds[step] : bounds[step + 1]]))
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                pred = self.net(batch)
                if len(batch):  # the data term is the reported train_loss
                    loss = data_loss(pred.float(), batch)
                else:  # a rank with fewer rows than steps: still join DDP's all-reduce, with zero gradients
                    loss = pred.float().sum() * 0.0
                total = loss + self.model.penalty(batch)
            for optimizer in self.optimizers:
                optimizer.zero_grad(set_to_none=True)
            total.backward()
            if self.cfg.grad_clip:
                clip_grad_norm(self.params, self.cfg.grad_clip)
            for optimizer in self.optimizers:
                optimizer.step()
            loss_sum += loss.detach().double() * len(batch)
        totals = dist.all_reduce_sum_(torch.stack([loss_sum, torch.tensor(float(n), device=self.device).double()]))
        rows = float(totals[1])
        return {
            "train_loss": float(totals[0]) / max(rows, 1.0),
            "rows": rows,
            "seconds": time.perf_counter() - start,
            "lr": lr,
        }

    def observe(self, val_rmse: float) -> None:
        """Plateau schedule: halve the learning rate when validation RMSE stops improving."""
        self.schedule.observe(val_rmse)

    def state_dict(self) -> dict[str, Any]:
        """The optimisers' state (none before they are first used: nothing to resume) and the schedule's."""
        saved = [o.state_dict() for o in self._optimizers] if self._optimizers is not None else []
        return {"optimizers": saved, "schedule": self.schedule.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["optimizers"]:
            for optimizer, saved in zip(self.optimizers, state["optimizers"], strict=True):
                optimizer.load_state_dict(saved)
        self.schedule.load_state_dict(state["schedule"])

    def warm_rows(self, user_rates: np.ndarray, item_rates: np.ndarray) -> None:
        """No per-row learning rates here: new rows train as the others do."""


def sparse_tables(model: Model, cfg: TrainConfig, device: torch.device) -> list[nn.Embedding]:
    """The trainable embedding tables, switched to sparse gradients, when training on one CPU rank with Adam.

    A dense Adam step reads and writes every row of every table (all 138k users of ml-20m for a batch that
    touches a few thousand), which dominates CPU training; with sparse gradients SparseAdam moves only the
    batch's rows (lazy moments). On CUDA the dense step is cheap and NCCL needs dense gradients: tables stay
    dense there. With several CPU ranks too: DistributedDataParallel's sparse all-reduce over gloo corrupts the
    heap now and then (PyTorch 2.13: "malloc(): unaligned tcache chunk detected", or a segfault in backward, in
    2 of 31 two-rank runs of 40 epochs here; never in 66 with dense tables). Models must look their tables up
    through the module (or pass its `sparse` flag on).
    """
    if device.type != "cpu" or cfg.optimizer != "adam" or cfg.weight_decay or dist.is_distributed():
        return []
    tables = [m for m in model.modules() if isinstance(m, nn.Embedding) and m.weight.requires_grad]
    for table in tables:
        table.sparse = True
    return tables


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> None:
    """Scale all gradients so their global L2 norm is at most max_norm; sparse ones (coalesced first) too."""
    grads = []
    for p in params:
        if p.grad is not None and p.grad.is_sparse:
            p.grad = p.grad.coalesce()
        if p.grad is not None:
            grads.append(p.grad)
    if not grads:
        return
    total = torch.stack([(g._values() if g.is_sparse else g).detach().float().norm() for g in grads]).norm()
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)  # a tensor: no device sync
    for g in grads:
        g.mul_(scale)


def solver_name(model: Model | type[Model], solver: str) -> str:
    """The solver train.solver names; `auto`: the first of SOLVERS[model.solver_family] (per-rating SGD for the
    plain MF models, autograd for the others)."""
    return SOLVERS[model.solver_family][0] if solver == "auto" else solver


def default_lr(model: Model | type[Model], solver: str) -> float | None:
    """The learning rate when train.lr is empty, the one rule (training and `recdist models`): per-rating SGD
    SGD_LR; autograd the model's own default_lr, else DEFAULT_LR; ALS (exact solves) and Gibbs (draws) none."""
    name = solver_name(model, solver)
    if name in ("als", "gibbs"):
        return None
    if name == "sgd":
        return SGD_LR
    return model.default_lr or DEFAULT_LR


def make_solver(p: Problem) -> Solver:
    """The solver p.cfg.solver names (solver_name). (SGD runs the compiled kernel on CPU, tensor steps on CUDA.)"""
    from recdist.train import als, gibbs, sgd  # they import this module

    choice = solver_name(p.model, p.cfg.solver)
    if choice == "autograd":
        return AutogradSolver(p)
    return {"sgd": sgd.SGDSolver, "als": als.ALSSolver, "gibbs": gibbs.GibbsSolver}[choice](p)


def trained_tables(model: Model, solver: str) -> MFTables:
    """The MF tables `solver` updates in place; ConfigError when the model's solver_family rules it out."""
    tables = model.mf_tables()
    if solver not in SOLVERS[model.solver_family] or tables is None:
        from recdist.models import registry

        can = [n for n in registry.names() if solver in SOLVERS[registry.get(n).module.solver_family]]
        raise ConfigError(
            f"solver {solver!r} cannot train model {model.registry_name!r}",
            fix=f"use solver autograd or auto; {solver} trains: {', '.join(can)}",
        )
    return tables
