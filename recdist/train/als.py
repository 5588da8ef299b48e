"""Alternating least squares for MF (ALS-WR, as Spark's): exact per-row solves, batched Cholesky in PyTorch.

One epoch solves every user's (factors, bias) given the items, then every item's given the users. A row's
normal equations are  (sum_j x_j x_j^T + n_row * diag(reg, .., reg, reg_bias)) z = sum_j y_j x_j  over its
ratings, with x_j the other side's factors augmented by a 1 (the bias column) and y_j the rating minus the
global mean and the other side's bias: the same per-rating L2 objective the SGD solver and the model's
penalty minimise. The Gram matrices (upper triangle) come from one sparse x dense product per half-step
(ratings as a CSR matrix times the other side's outer products), accumulated in float32 and solved in float64.
Across ranks the Gram matrices and right-hand sides are summed with all_reduce, so every rank solves the same
systems and holds the same tables.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from recdist.models.base import MFTables
from recdist.train import dist
from recdist.train.solvers import Problem, rank_counts, trained_tables


@dataclass
class _Side:
    """The ratings as a CSR matrix with one side's rows (users or items) and the other side's columns."""

    crow: torch.Tensor  # (n_rows + 1,) int64
    col: torch.Tensor  # (nnz,) int64, the other side's index
    target: torch.Tensor  # (nnz,) float32, rating - mu, in CSR order
    counts: torch.Tensor  # (n_rows,) ratings per row over all ranks (for the reg * n weighting)
    n_cols: int

    @classmethod
    def build(cls, rows: torch.Tensor, cols: torch.Tensor, target: torch.Tensor, n_rows: int, n_cols: int) -> _Side:
        order = torch.argsort(rows, stable=True)
        local = torch.bincount(rows, minlength=n_rows)
        crow = torch.zeros(n_rows + 1, dtype=torch.int64, device=rows.device)
        torch.cumsum(local, 0, out=crow[1:])
        counts = dist.all_reduce_sum_(local.clone())
        return cls(crow, cols[order], target[order], counts, n_cols)

    def normal_equations(
        self, x: torch.Tensor, y: torch.Tensor, triu: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per row, over all ranks: the upper triangle of sum_j x_j x_j^T (n_rows, T), sum_j y_j x_j (n_rows, d);
        and sum y^2 (1,), for the other side's rows x and the targets y in CSR order."""
        outer = x[:, triu[0]] * x[:, triu[1]]  # (n_cols, T) upper triangles of x x^T
        gram = self.matrix(torch.ones_like(y)) @ outer
        rhs = self.matrix(y) @ x
        yy = torch.dot(y.double(), y.double()).reshape(1)
        for tensor in (gram, rhs, yy):
            dist.all_reduce_sum_(tensor)
        return gram, rhs, yy

    def matrix(self, values: torch.Tensor) -> torch.Tensor:
        with warnings.catch_warnings():  # "sparse CSR support is in beta": the product used here is stable
            warnings.simplefilter("ignore", UserWarning)
            return torch.sparse_csr_tensor(
                self.crow, self.col, values, (len(self.crow) - 1, self.n_cols), check_invariants=False
            )


def rating_sides(p: Problem, t: MFTables) -> tuple[_Side, _Side, float]:
    """This rank's training ratings minus mu by user and by item (_Side), and the rating count over all ranks."""
    train = p.data.train
    user, item = train.user.to(p.device), train.item.to(p.device)
    target = train.target.to(p.device, torch.float32) - t.mu
    n_users, n_items = t.user_factors.shape[0], t.item_factors.shape[0]
    users, items = _Side.build(user, item, target, n_users, n_items), _Side.build(item, user, target, n_items, n_users)
    return users, items, float(sum(rank_counts(len(train), p.device)))


class ALSSolver:
    """ALS for the explicit_mf family (mf, biased_mf); one epoch = a user half-step and an item half-step.

    `lr` and the schedule do not apply (each half-step is an exact minimisation).
    """

    def __init__(self, p: Problem, *, solve_dtype: torch.dtype = torch.float64) -> None:
        self.cfg, self.device, self.solve_dtype = p.cfg, p.device, solve_dtype
        self.t = t = trained_tables(p.model, "als")
        self.users, self.items, self.n_global = rating_sides(p, t)
        k = t.user_factors.shape[1]
        self.dim = k + 1 if t.biased else k
        self.triu = torch.triu_indices(self.dim, self.dim, device=self.device)
        reg = [t.reg] * k + ([t.reg_bias] if t.biased else [])
        self.reg = torch.tensor(reg, dtype=solve_dtype, device=self.device)

    def train_epoch(self, epoch: int) -> dict[str, float]:
        start = time.perf_counter()
        t = self.t
        self._half(self.users, t.user_factors, t.user_bias, t.item_factors, t.item_bias)
        sse = self._half(self.items, t.item_factors, t.item_bias, t.user_factors, t.user_bias)
        return {
            "train_loss": sse / max(self.n_global, 1.0),
            "rows": self.n_global,
            "seconds": time.perf_counter() - start,
            "lr": 0.0,
        }

    def observe(self, val_rmse: float) -> None:
        """Nothing to adjust: ALS has no learning rate."""

    def state_dict(self) -> dict[str, Any]:
        """Nothing beyond the model's tables: an ALS epoch depends only on them."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None

    def warm_rows(self, user_rates: np.ndarray, item_rates: np.ndarray) -> None:
        """No per-row learning rates here: new rows train as the others do."""

    @torch.no_grad()
    def _half(
        self, side: _Side, factors: torch.Tensor, bias: torch.Tensor, other: torch.Tensor, other_bias: torch.Tensor
    ) -> float:
        """Solve every row of `factors` (and `bias`) given the other side; returns the training SSE after it."""
        biased = self.t.biased
        x = torch.cat([other, torch.ones_like(other[:, :1])], 1) if biased else other
        y = side.target - other_bias[side.col] if biased else side.target
        gram, rhs, yy = side.normal_equations(x, y, self.triu)
        g = self._unpack(gram)
        b = rhs.to(self.solve_dtype)
        a = g + torch.diag_embed(side.counts.to(self.solve_dtype)[:, None] * self.reg)
        rated = side.counts > 0
        a[~rated] = torch.eye(self.dim, dtype=self.solve_dtype, device=a.device)  # untouched rows: a no-op system
        chol, _ = torch.linalg.cholesky_ex(a)
        z = torch.cholesky_solve(b[:, :, None], chol)[:, :, 0]
        z = torch.where(rated[:, None], z, self._current(factors, bias).to(self.solve_dtype))
        factors.copy_(z[:, : factors.shape[1]])
        if biased:
            bias.copy_(z[:, -1])
        # training SSE of the new tables: sum y^2 - 2 z.b + z^T G z, over rows with ratings
        quad = torch.einsum("ni,nij,nj->n", z, g, z)
        sse = yy - 2 * (z * b)[rated].sum() + quad[rated].sum()
        return float(sse)

    def _unpack(self, flat: torch.Tensor) -> torch.Tensor:
        """(n, T) upper triangles -> (n, d, d) symmetric matrices in the solve dtype."""
        n, d = flat.shape[0], self.dim
        full = torch.zeros(n, d, d, dtype=self.solve_dtype, device=flat.device)
        full[:, self.triu[0], self.triu[1]] = flat.to(self.solve_dtype)
        full[:, self.triu[1], self.triu[0]] = flat.to(self.solve_dtype)
        return full

    def _current(self, factors: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return torch.cat([factors, bias[:, None]], 1) if self.t.biased else factors
