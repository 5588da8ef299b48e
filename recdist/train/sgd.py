"""Fast SGD for matrix factorisation: a compiled per-rating kernel on CPU, a whole-batch tensor step elsewhere.

CPU (`kernel="numba"`): stratified SGD (DSGD, Gemulla et al. 2011). Users and items are dealt at random into S
groups, so the ratings fall into S x S blocks; a sub-epoch runs the S blocks of one diagonal in parallel -- they
share no user and no item, so threads never race -- and an epoch runs all S diagonals in a fresh random order.
Each block is walked in a fresh random order every epoch (a Fisher-Yates shuffle fused into the pass). The
outcome depends on the seed and S only, not on the thread count: bitwise reproducible, unlike Hogwild, at the
same speed (each thread's working set is 1/S of the tables, which also helps the caches).

Elsewhere (`kernel="torch"`, the default on CUDA): the same update on whole batches, with gradients summed per
row and divided by the row's count in the batch (a damped per-row step: summed gradients of repeated rows
diverge).

Across ranks each rank trains on its own shard, then the tables are averaged (`sync="mean"`) or the ranks'
changes added up (`sync="sum"`) `syncs_per_epoch` times an epoch.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numba
import numpy as np
import torch
from numba import njit, prange
from torch import nn

from recdist.config import TrainConfig
from recdist.errors import ConfigError
from recdist.train import dist
from recdist.train.data import RankData
from recdist.train.solvers import COSINE_FLOOR, PLATEAU_FACTOR, epoch_generator, rank_counts

SUPPORTED = {"mf", "biased_mf"}
"""Registered model names these solvers train (make_solver's "auto" picks them for these)."""


@dataclass
class MFTables:
    """The tensors of an MF model that the fast solvers update in place (views of its weights)."""

    user_factors: torch.Tensor  # (n_users, k)
    item_factors: torch.Tensor  # (n_items, k)
    user_bias: torch.Tensor  # (n_users,)
    item_bias: torch.Tensor  # (n_items,)
    biased: bool  # False: plain MF, whose zero bias tables stay untouched
    mu: float  # the model's global mean, added to every prediction
    reg: float  # L2 on the factor rows of each rating (the model's penalty, classic SGD MF)
    reg_bias: float  # L2 on the biases of each rating

    def tensors(self) -> list[torch.Tensor]:
        """The tables training changes."""
        both = [self.user_factors, self.item_factors]
        return both + [self.user_bias, self.item_bias] if self.biased else both


def mf_tables(model: nn.Module) -> MFTables:
    """The model's tables, global mean and regularisation; ConfigError for a model that is not pure MF."""
    name = getattr(model, "registry_name", type(model).__name__)
    if name not in SUPPORTED or not getattr(model, "pure_mf", False):
        raise ConfigError(
            f"the fast MF solvers train only {', '.join(sorted(SUPPORTED))}, not {name!r}",
            fix="set train.solver to autograd (or auto) for this model",
        )
    f = model.factors()
    config = model.config
    return MFTables(
        user_factors=f["user_factors"],
        item_factors=f["item_factors"],
        user_bias=f["user_bias"],
        item_bias=f["item_bias"],
        biased=bool(model.use_bias),
        mu=float(model.global_mean),
        reg=float(config.reg),
        reg_bias=float(getattr(config, "reg_bias", 0.0)),
    )


class Schedule:
    """Per-epoch learning rate with the autograd solver's rules: constant, cosine, or halved on plateaus."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.best, self.halvings = math.inf, 0

    def lr(self, epoch: int) -> float:
        cfg = self.cfg
        if cfg.lr_schedule == "cosine":
            t = min(epoch / cfg.epochs, 1.0)
            return cfg.lr * (COSINE_FLOOR + (1 - COSINE_FLOOR) * 0.5 * (1 + math.cos(math.pi * t)))
        if cfg.lr_schedule == "plateau":
            return cfg.lr * PLATEAU_FACTOR**self.halvings
        return cfg.lr

    def observe(self, val_rmse: float) -> None:
        if val_rmse < self.best - 1e-4:
            self.best = val_rmse
        elif self.cfg.lr_schedule == "plateau":
            self.halvings += 1

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "halvings": self.halvings}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.halvings = float(state["best"]), int(state["halvings"])


# ---------------------------------------------------------------------------------------------- numba kernel


@njit(cache=True, nogil=True, fastmath=True)
def _block_pass(users, items, ratings, lo, hi, seed, P, Q, bu, bi, mu, lr, reg, reg_b, biased):
    """SGD over ratings[lo:hi] in a fresh random order (Fisher-Yates fused in); returns the sum of squared errors."""
    k = P.shape[1]
    state = np.uint64(seed) | np.uint64(1)
    sse = 0.0
    for j in range(lo, hi):
        # xorshift64, then Lemire's multiply-shift to pick m uniformly in [j, hi)
        state ^= state << np.uint64(13)
        state ^= state >> np.uint64(7)
        state ^= state << np.uint64(17)
        m = j + np.int64(((state >> np.uint64(32)) * np.uint64(hi - j)) >> np.uint64(32))
        u = users[m]
        i = items[m]
        r = ratings[m]
        users[m] = users[j]
        items[m] = items[j]
        ratings[m] = ratings[j]
        users[j] = u
        items[j] = i
        ratings[j] = r
        pred = mu
        if biased:
            pred += bu[u] + bi[i]
        for f in range(k):
            pred += P[u, f] * Q[i, f]
        e = r - pred
        sse += e * e
        if biased:
            bu[u] += lr * (e - reg_b * bu[u])
            bi[i] += lr * (e - reg_b * bi[i])
        for f in range(k):
            p = P[u, f]
            q = Q[i, f]
            P[u, f] = p + lr * (e * q - reg * p)
            Q[i, f] = q + lr * (e * p - reg * q)
    return sse


@njit(parallel=True, cache=True, nogil=True, fastmath=True)
def _sweep(users, items, ratings, offsets, diagonals, seeds, P, Q, bu, bi, mu, lr, reg, reg_b, biased):
    """Run the given diagonals of the S x S block grid; the blocks of one diagonal in parallel."""
    S = seeds.shape[0]
    sse = 0.0
    for d in diagonals:
        part = np.zeros(S)
        for b in prange(S):
            blk = b * S + (b + d) % S
            lo, hi = offsets[blk], offsets[blk + 1]
            part[b] = _block_pass(users, items, ratings, lo, hi, seeds[b, d], P, Q, bu, bi, mu, lr, reg, reg_b, biased)
        sse += part.sum()
    return sse


@njit(cache=True, nogil=True)
def _bucket(users, items, ratings, ublock, iblock, S):
    """Counting sort of the ratings into the S x S blocks (user group major); returns arrays and block offsets."""
    n = users.shape[0]
    counts = np.zeros(S * S + 1, np.int64)
    for j in range(n):
        counts[ublock[users[j]] * S + iblock[items[j]] + 1] += 1
    offsets = np.cumsum(counts)
    pos = offsets[:-1].copy()
    u2 = np.empty(n, np.int32)
    i2 = np.empty(n, np.int32)
    r2 = np.empty(n, np.float32)
    for j in range(n):
        b = ublock[users[j]] * S + iblock[items[j]]
        p = pos[b]
        u2[p] = users[j]
        i2[p] = items[j]
        r2[p] = ratings[j]
        pos[b] = p + 1
    return u2, i2, r2, offsets


# ---------------------------------------------------------------------------------------------- the solver


class SGDSolver:
    """Per-rating SGD for `mf` / `biased_mf`, updating the model's own tables in place (the Solver protocol).

    `kernel`: "numba" (CPU default) or "torch" (CUDA default; works on CPU too). `strata`: S of the S x S
    block grid (the numba kernel's result depends on it, not on the thread count; it is raised to the thread
    count if smaller). `sync` / `syncs_per_epoch`: how and how often ranks combine their tables.
    `threads`: numba threads (default: torch's, which the trainer sets to the worker's CPU share).
    """

    def __init__(
        self,
        model: nn.Module,
        cfg: TrainConfig,
        data: RankData,
        device: torch.device | str = "cpu",
        *,
        kernel: str | None = None,
        strata: int = 8,
        sync: str = "mean",
        syncs_per_epoch: int = 1,
        threads: int | None = None,
    ) -> None:
        self.cfg, self.device = cfg, torch.device(device)
        self.kernel = kernel or ("numba" if self.device.type == "cpu" else "torch")
        if self.kernel not in ("numba", "torch"):
            raise ConfigError(f"unknown SGD kernel {self.kernel!r}", fix="use 'numba' (CPU) or 'torch'")
        if self.kernel == "numba" and self.device.type != "cpu":
            raise ConfigError("the numba SGD kernel runs on CPU only", fix="use kernel='torch' on CUDA")
        if sync not in ("mean", "sum"):
            raise ConfigError(f"unknown sync {sync!r}", fix="use 'mean' or 'sum'")
        self.t = mf_tables(model)
        self.schedule = Schedule(cfg)
        self.sync, self.syncs = sync, max(1, syncs_per_epoch)
        self.rank, self.world = dist.rank(), dist.world_size()
        train = data.train
        self.n = len(train)
        self.n_global = float(sum(rank_counts(self.n, self.device)))
        self.threads = threads or torch.get_num_threads()
        if self.kernel == "numba":
            self.strata = max(strata, self.threads)
            self.syncs = min(self.syncs, self.strata)
            rng = np.random.default_rng(cfg.seed)  # the same groups on every rank
            groups = [
                (rng.permutation(n) % self.strata).astype(np.int32) for n in (data.dims.n_users, data.dims.n_items)
            ]
            self.users, self.items, self.ratings, self.offsets = _bucket(
                train.user.numpy().astype(np.int32),
                train.item.numpy().astype(np.int32),
                train.target.numpy().astype(np.float32, copy=False),
                *groups,
                self.strata,
            )
        else:
            self.users, self.items = train.user.to(self.device), train.item.to(self.device)
            self.ratings = train.target.to(self.device, torch.float32)

    # -------------------------------------------------------------------------------------------- protocol

    def train_epoch(self, epoch: int) -> dict[str, float]:
        lr = self.schedule.lr(epoch)
        start = time.perf_counter()
        sse = 0.0
        if self.kernel == "numba":
            numba.set_num_threads(max(1, min(self.threads, numba.config.NUMBA_NUM_THREADS)))
            rng = np.random.default_rng([self.cfg.seed, self.rank, epoch])
            diagonals = rng.permutation(self.strata).astype(np.int64)
            seeds = rng.integers(1, 2**63 - 1, size=(self.strata, self.strata), dtype=np.int64)
            for part in np.array_split(diagonals, self.syncs):
                before = self._snapshot()
                sse += self._numba_sweep(part, seeds, lr)
                self._combine(before)
        else:
            order = torch.randperm(
                self.n, generator=epoch_generator(self.cfg.seed, self.rank, epoch, self.device), device=self.device
            )
            for part in torch.tensor_split(order, self.syncs):
                before = self._snapshot()
                for idx in torch.split(part, self.cfg.batch_size):
                    sse += self._torch_step(idx, lr)
                self._combine(before)
        seconds = time.perf_counter() - start
        sse = float(dist.all_reduce_sum_(torch.tensor([sse], dtype=torch.float64, device=self.device)).item())
        return {"train_loss": sse / max(self.n_global, 1.0), "rows": self.n_global, "seconds": seconds, "lr": lr}

    def observe(self, val_rmse: float) -> None:
        """Plateau schedule: halve the learning rate when validation RMSE stops improving."""
        self.schedule.observe(val_rmse)

    def state_dict(self) -> dict[str, Any]:
        """The schedule only: the model holds the tables and every shuffle derives from (seed, rank, epoch)."""
        return {"schedule": self.schedule.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.schedule.load_state_dict(state["schedule"])

    # -------------------------------------------------------------------------------------------- kernels

    def _numba_sweep(self, diagonals: np.ndarray, seeds: np.ndarray, lr: float) -> float:
        t = self.t
        return float(
            _sweep(
                self.users, self.items, self.ratings, self.offsets, diagonals, seeds,
                t.user_factors.numpy(), t.item_factors.numpy(), t.user_bias.numpy(), t.item_bias.numpy(),
                np.float32(t.mu), np.float32(lr), np.float32(t.reg), np.float32(t.reg_bias), t.biased,
            )
        )  # fmt: skip

    @torch.no_grad()
    def _torch_step(self, idx: torch.Tensor, lr: float) -> float:
        """One damped whole-batch step: each row moves by lr times its mean gradient over the batch."""
        t = self.t
        u, i, r = self.users[idx], self.items[idx], self.ratings[idx]
        pu, qi = t.user_factors[u], t.item_factors[i]
        e = r - (t.mu + t.user_bias[u] + t.item_bias[i] + (pu * qi).sum(1))
        step_u = lr / torch.bincount(u, minlength=t.user_factors.shape[0])[u].to(e.dtype)
        step_i = lr / torch.bincount(i, minlength=t.item_factors.shape[0])[i].to(e.dtype)
        t.user_factors.index_add_(0, u, (e[:, None] * qi - t.reg * pu) * step_u[:, None])
        t.item_factors.index_add_(0, i, (e[:, None] * pu - t.reg * qi) * step_i[:, None])
        if t.biased:
            t.user_bias.index_add_(0, u, (e - t.reg_bias * t.user_bias[u]) * step_u)
            t.item_bias.index_add_(0, i, (e - t.reg_bias * t.item_bias[i]) * step_i)
        return float((e * e).sum())

    # -------------------------------------------------------------------------------------------- ranks

    def _snapshot(self) -> list[torch.Tensor] | None:
        return [x.clone() for x in self.t.tensors()] if self.world > 1 else None

    def _combine(self, before: list[torch.Tensor] | None) -> None:
        """Combine the ranks' changes since `before`: their mean (`mean`) or their sum (`sum`)."""
        if before is None:
            return
        scale = 1.0 / self.world if self.sync == "mean" else 1.0
        for x, x0 in zip(self.t.tensors(), before, strict=True):
            delta = dist.all_reduce_sum_(x.sub_(x0))
            x.copy_(x0.add_(delta, alpha=scale))
