"""Bayesian MF by Gibbs sampling (BPMF, Salakhutdinov & Mnih 2008, with biases): no learning rate, no reg to tune.

The model: r_ui ~ N(mu + b_u + c_i + p_u . q_i, 1/alpha); each user's row z_u = (p_u, b_u) ~ N(m_U, Lambda_U^-1) and
each item's (q_i, c_i) ~ N(m_I, Lambda_I^-1), (m, Lambda) of each side under a Normal-Wishart hyperprior (m0 = 0,
beta0 = BETA0, W0 = I, nu0 = k + 1, k = train.gibbs.rank) and the noise precision alpha under Gamma(ALPHA_SHAPE,
ALPHA_RATE). One epoch is one sweep: the users' hyperparameters given their rows, every user's row given the items
(per row the (k+1)-square normal system of ALS, als.py, then a draw instead of its solution), the same for the
items, then alpha given the training residuals. Plain `mf` samples the factors alone (its bias tables stay zero).

What the model holds: during the first gibbs.burn_in sweeps the current sample; after, every gibbs.thin-th sweep's
sample is kept and the model holds the average predictor of the s samples kept so far, mean_s(b_u^s + c_i^s +
p_u^s . q_i^s), which is itself a biased MF of rank s * k: the samples' factors side by side, each scaled by
1/sqrt(s), and the averaged biases. The other sweeps' epochs (burn-in, thinned out) are no candidates for early
stopping (`provisional` in their metrics). A trained model is therefore a plain MF tensor set (its rank in
model.json is the stored width) that every downstream stage and scorer reads unchanged.

Across ranks the Gram matrices and right-hand sides are summed as ALS's, and every rank draws the same numbers (a
generator seeded by (train.seed, epoch), not by rank, as the initial weights are): every rank holds the same sample.
The draws are made on the CPU in float64 (rows: torch; the hyperparameters' small draws: numpy), so a run draws
the same numbers on any device.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch

from recdist.train.als import _Side, rating_sides
from recdist.train.solvers import Problem, epoch_seed, trained_tables

#: Normal-Wishart prior: pseudo-count of the mean m0 = 0 (the paper's beta0 = 2).
BETA0 = 2.0
#: Gamma prior of the noise precision alpha (shape, rate): weak, the data decides (1 / alpha ~ the residual variance).
ALPHA_SHAPE, ALPHA_RATE = 1.0, 1.0
#: alpha before the first draw (the paper's fixed value: a residual standard deviation of 0.7 stars).
ALPHA_START = 2.0


class GibbsSolver:
    """Gibbs sampling for the explicit_mf family (mf, biased_mf); one epoch = one sweep (users, items, noise).

    `lr`, the schedule and the model's reg/reg_bias do not apply: the priors' precisions are sampled.
    """

    def __init__(self, p: Problem) -> None:
        self.model, self.cfg, self.device = p.model, p.cfg, p.device
        t = trained_tables(p.model, "gibbs")
        self.biased = t.biased
        self.users, self.items, self.n_global = rating_sides(p, t)
        n_users, n_items = t.user_factors.shape[0], t.item_factors.shape[0]
        self.k = p.cfg.gibbs.rank
        self.dim = self.k + 1 if self.biased else self.k
        self.triu = torch.triu_indices(self.dim, self.dim, device=self.device)
        # the current sample (float64 rows: factors, then the bias), alpha, and how many samples the model averages;
        # the start: N(0, init_std^2) factors and zero biases, drawn from train.seed (as a model's initial weights)
        gen = torch.Generator().manual_seed(p.cfg.seed)
        self.user, self.item = (
            torch.cat([torch.randn(n, self.k, generator=gen, dtype=torch.float64) * t.init_std,
                       torch.zeros(n, self.dim - self.k, dtype=torch.float64)], 1).to(self.device)
            for n in (n_users, n_items)
        )  # fmt: skip
        self.alpha = ALPHA_START
        self.kept = 0
        self._write(self.user, self.item, 0)

    def train_epoch(self, epoch: int) -> dict[str, float]:
        start = time.perf_counter()
        seed = epoch_seed(self.cfg.seed, 0, epoch)  # the same on every rank
        gen, rng = torch.Generator().manual_seed(seed), np.random.default_rng(seed)
        self.user, _ = self._half(self.users, self.user, self.item, gen, rng)
        self.item, sse = self._half(self.items, self.item, self.user, gen, rng)
        self.alpha = float(rng.gamma(ALPHA_SHAPE + self.n_global / 2, 1 / (ALPHA_RATE + max(sse, 0.0) / 2)))
        burn = epoch < self.cfg.gibbs.burn_in
        keep = not burn and (epoch - self.cfg.gibbs.burn_in) % self.cfg.gibbs.thin == 0
        if burn:
            self._write(self.user, self.item, 0)
        elif keep:
            self._write(self.user, self.item, self.kept)
            self.kept += 1
        return {
            "train_loss": sse / max(self.n_global, 1.0),  # of the current sample
            "rows": self.n_global,
            "seconds": time.perf_counter() - start,
            "lr": 0.0,
            "provisional": float(not keep),
            "noise_std": 1.0 / math.sqrt(self.alpha),
        }

    def observe(self, val_rmse: float) -> None:
        """Nothing to adjust: a sampler has no learning rate."""

    def state_dict(self) -> dict[str, Any]:
        """The current sample and noise precision (the model's tables hold the average of `kept` samples)."""
        return {"user": self.user.clone(), "item": self.item.clone(), "alpha": self.alpha, "kept": self.kept}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.user = state["user"].to(self.device, torch.float64)
        self.item = state["item"].to(self.device, torch.float64)
        self.alpha, self.kept = float(state["alpha"]), int(state["kept"])

    def warm_rows(self, user_rates: np.ndarray, item_rates: np.ndarray) -> None:
        """No per-row learning rates here: new rows train as the others do."""

    @torch.no_grad()
    def _half(
        self, side: _Side, own: torch.Tensor, other: torch.Tensor, gen: torch.Generator, rng: np.random.Generator
    ) -> tuple[torch.Tensor, float]:
        """A draw of every row of this side given the other side's rows; returns it and the training SSE after it."""
        x = other.to(torch.float32)
        if self.biased:  # the other side's bias column becomes a 1; its bias leaves the target
            y = side.target - x[side.col, -1]
            x = torch.cat([x[:, :-1], torch.ones_like(x[:, :1])], 1)
        else:
            y = side.target
        gram, rhs, yy = side.normal_equations(x, y, self.triu)
        g = unpack(gram, self.triu, self.dim)
        b = rhs.to(torch.float64)
        mean, precision = normal_wishart(own, rng)
        chol, _ = torch.linalg.cholesky_ex(self.alpha * g + precision)
        z = torch.cholesky_solve((self.alpha * b + precision @ mean)[:, :, None], chol)
        noise = torch.randn(z.shape, generator=gen, dtype=torch.float64).to(self.device)
        z = (z + torch.linalg.solve_triangular(chol.mT, noise, upper=True))[:, :, 0]  # + N(0, (L L^T)^-1)
        sse = yy - 2 * (z * b).sum() + torch.einsum("ni,nij,nj->", z, g, z)
        return z, float(sse)

    def _write(self, user: torch.Tensor, item: torch.Tensor, kept: int) -> None:
        """Put the average of `kept` earlier samples (the model's tables) and this one into the model's tables."""
        t = self.model.mf_tables()
        tables = {}
        for name, rows, factors, bias in (
            ("user", user, t.user_factors, t.user_bias),
            ("item", item, t.item_factors, t.item_bias),
        ):
            new = rows[:, : self.k].to(factors.dtype) / math.sqrt(kept + 1)
            if kept:
                new = torch.cat([factors * math.sqrt(kept / (kept + 1)), new], 1)
            tables[f"{name}_factors"] = new
            if self.biased:
                tables[f"{name}_bias"] = (bias * kept + rows[:, -1].to(bias.dtype)) / (kept + 1)
            else:
                tables[f"{name}_bias"] = bias
        self.model.set_tables(**tables)


def unpack(flat: torch.Tensor, triu: torch.Tensor, d: int) -> torch.Tensor:
    """(n, T) upper triangles -> (n, d, d) symmetric float64 matrices."""
    full = torch.zeros(flat.shape[0], d, d, dtype=torch.float64, device=flat.device)
    full[:, triu[0], triu[1]] = flat.to(torch.float64)
    full[:, triu[1], triu[0]] = flat.to(torch.float64)
    return full


def normal_wishart(rows: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A draw of (mean, precision) of the rows' prior given the rows (n, d): the Normal-Wishart posterior of
    m0 = 0, beta0 = BETA0, W0 = I, nu0 = d (the paper's update). Small d x d algebra: numpy, float64."""
    n, d = rows.shape
    mean_t = rows.mean(0)
    centred = rows - mean_t
    scatter = (centred.T @ centred).cpu().numpy()
    mean = mean_t.cpu().numpy()
    w_inv = np.eye(d) + scatter + (BETA0 * n / (BETA0 + n)) * np.outer(mean, mean)
    precision = wishart(np.linalg.inv(w_inv), d + n, rng)
    chol = np.linalg.cholesky((BETA0 + n) * precision)
    centre = n * mean / (BETA0 + n) + np.linalg.solve(chol.T, rng.standard_normal(d))  # + N(0, (beta Lambda)^-1)
    return torch.from_numpy(centre).to(rows), torch.from_numpy(precision).to(rows)


def wishart(scale: np.ndarray, dof: float, rng: np.random.Generator) -> np.ndarray:
    """A draw of Wishart(scale, dof) (Bartlett: L A A^T L^T with L L^T = scale, A lower triangular with
    chi(dof - i) on its diagonal and standard normals below)."""
    d = scale.shape[0]
    chol = np.linalg.cholesky((scale + scale.T) / 2)
    a = np.tril(rng.standard_normal((d, d)), -1)
    a[np.diag_indices(d)] = np.sqrt(rng.chisquare(dof - np.arange(d)))
    la = chol @ a
    return la @ la.T
