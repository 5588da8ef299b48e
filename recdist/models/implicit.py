"""Models of which movies a user rates (implicit feedback), fitted in closed form on the 0/1 training matrix.

A rating model answers "how much would this user like this movie", but a top-N list is judged on movies the
user goes on to rate (and like); these answer the first half, "which movies will this user rate", and propose
the candidates that the rating stages then score. Pure PyTorch (SciPy's sparse matrix, a numba pass) on index
arrays: no Ray, no files.

- `fit_ease`: EASE (Steck, WWW 2019), an item-item linear model with a zero diagonal, in closed form:
  B = I - P diag(1 / diag(P)) with P = (X^T X + reg I)^-1. One (items x items) inverse: fine to ~20k items.
- `fit_ials`: implicit-feedback MF (Hu, Koren and Volinsky, ICDM 2008) by alternating exact least squares:
  every rated pair has preference 1 with confidence 1 + alpha, every other pair 0 with confidence 1.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from numba import njit

from recdist.infer.topn import Csr

BLOCK_BYTES = 1 << 20
"""Bytes of EASE's weights summed at a time: an (m x b) float32 block of at most 1 MB stays in a core's L2 cache
(1-2 MB on current server cores) over a whole chunk of users, where the whole matrix (64 MB at 4,000 modelled
items) streamed from memory for every user. The same sums bit for bit whatever the width. At ML-20M size (64
columns): all users' candidates 2.7-3.0 s against 5.0-5.1 s with 512 columns (8 MB, in L3 only), and 10.7 s
with the whole matrix."""


def block_columns(m: int) -> int:
    """Columns of an (m x b) weight block of at most BLOCK_BYTES: a multiple of 16 (one 64-byte cache line per
    row), 16 to 512."""
    return max(16, min(512, BLOCK_BYTES // (4 * max(1, m)) // 16 * 16))


@dataclass(frozen=True)
class Implicit:
    """A fitted model of which items a user rates: scores(users) is a (U, n_items) block, higher = likelier."""

    kind: str
    n_items: int
    history: Csr
    """user -> items the model was fitted on (EASE scores a user from their row)."""
    items: torch.Tensor | None = None
    """EASE: int64 (m,) the items modelled (the others score -inf)."""
    weights: torch.Tensor | None = None
    """EASE: (m, m) item-item weights."""
    user_factors: torch.Tensor | None = None
    item_factors: torch.Tensor | None = None
    """iALS: (n_users, rank) and (n_items, rank)."""

    @property
    def columns(self) -> torch.Tensor:
        """int64 (m,): the item of each column of `column_scores` (EASE: the modelled items; iALS: all)."""
        if self.kind == "ials":
            return torch.arange(self.n_items)
        assert self.items is not None
        return self.items

    def column_scores(self, users: torch.Tensor) -> torch.Tensor:
        """(U, m) scores of the `columns` items: EASE sums the weight rows of the modelled items each user rated
        (a sparse product: embedding_bag, about 3x a dense one at ML-20M's density), a block of columns at a
        time (block_columns)."""
        users = users.long()
        if self.kind == "ials":
            assert self.user_factors is not None and self.item_factors is not None
            return self.user_factors[users] @ self.item_factors.T
        assert self.items is not None and self.weights is not None
        column = torch.full((self.n_items,), -1, dtype=torch.long)
        column[self.items] = torch.arange(len(self.items))
        which, cols = self.history.gather(users)
        keep = column[cols] >= 0
        offsets = torch.cumsum(torch.bincount(which[keep], minlength=len(users)), 0)
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), offsets[:-1]])
        rows = column[cols[keep]]
        bag = torch.nn.functional.embedding_bag
        return torch.cat([bag(rows, block, offsets, mode="sum") for block in self._weight_blocks], dim=1)

    @cached_property
    def _weight_blocks(self) -> tuple[torch.Tensor, ...]:
        """EASE's weights as contiguous blocks of block_columns(m) columns (made once, on first use)."""
        assert self.weights is not None
        width = block_columns(self.weights.shape[0])
        return tuple(block.contiguous() for block in self.weights.split(width, dim=1))

    def scores(self, users: torch.Tensor) -> torch.Tensor:
        """(U, n_items) scores, -inf for the items the model does not score."""
        out = torch.full((len(users), self.n_items), -torch.inf)
        out[:, self.columns] = self.column_scores(users)
        return out


def _matrix(users: np.ndarray, items: np.ndarray, n_users: int, n_items: int):  # -> scipy.sparse.csr_matrix
    from scipy import sparse

    data = np.ones(len(users), dtype=np.float32)
    x = sparse.csr_matrix((data, (users, items)), shape=(n_users, n_items))
    x.sum_duplicates()
    x.data[:] = 1.0
    return x


def _gram(x, threads: int = 0):  # x: scipy.sparse.csr_matrix -> np.ndarray
    """X^T X as a dense float32 array: every user adds 1 to the count of each pair of their items, a compiled
    pass per block of users in threads (blocks balanced on the pairs, sum of squared row lengths), each pair
    counted once (p <= q) and mirrored at the end. At ML-20M's EASE sample 1.8x faster than SciPy's sparse
    product, which builds a sparse result of 16M entries before densifying it. Exact: counts in float32."""
    from concurrent.futures import ThreadPoolExecutor

    m = x.shape[1]
    threads = threads or max(1, min(os.cpu_count() or 1, 8))
    pairs = np.cumsum(np.diff(x.indptr).astype(np.int64) ** 2)
    bounds = np.searchsorted(pairs, np.linspace(0, pairs[-1] if len(pairs) else 0, threads + 1)[1:-1])
    bounds = np.unique(np.concatenate([[0], bounds, [x.shape[0]]]))
    indptr, indices = x.indptr.astype(np.int64), x.indices.astype(np.int64)
    with ThreadPoolExecutor(max(1, len(bounds) - 1)) as pool:
        parts = list(
            pool.map(lambda k: _pair_counts(indptr, indices, bounds[k], bounds[k + 1], m), range(len(bounds) - 1))
        )
    half = sum(parts[1:], parts[0]) if parts else np.zeros((m, m), np.float32)
    gram = half + half.T
    np.fill_diagonal(gram, np.diagonal(half))
    return gram


@njit(cache=True, nogil=True)
def _pair_counts(indptr, indices, lo, hi, m):
    """(m, m) counts of the item pairs (a, b) at positions p <= q of rows lo..hi-1 (each unordered pair once)."""
    g = np.zeros((m, m), np.float32)
    for r in range(lo, hi):
        start, end = indptr[r], indptr[r + 1]
        for p in range(start, end):
            row = indices[p]
            for q in range(p, end):
                g[row, indices[q]] += 1.0
    return g


def fit_ease(
    users: torch.Tensor,
    items: torch.Tensor,
    n_users: int,
    n_items: int,
    *,
    reg: float,
    modelled: torch.Tensor | None = None,
    max_items: int | None = None,
    max_users: int | None = None,
    seed: int = 0,
    history: Csr | None = None,
) -> Implicit:
    """EASE on the (user, item) pairs given. `modelled` (bool, n_items): the items it scores and reads (default
    every item with a pair). `reg` is relative: the L2 weight is reg x the mean pair count of the modelled items,
    so one value carries across data sizes better than an absolute weight (bench/ranking.py). `max_items`: model
    only that many of them, the most-paired (the inverse costs items^3: ~10k items is minutes on 2 cores);
    `max_users`: estimate X^T X from a seeded sample of that many users (its cost grows with the sum of the
    squared pairs per user); every user is still scored from their own row. `history`: the same pairs as a
    Csr, when the caller has one (saves a sort)."""
    u, i = users.long().numpy(), items.long().numpy()
    counts = np.bincount(i, minlength=n_items)
    keep = counts > 0 if modelled is None else modelled.numpy() & (counts > 0)
    if max_items is not None and int(keep.sum()) > max_items:
        ranked = np.argsort(-np.where(keep, counts, -1), kind="stable")
        keep = np.zeros(n_items, dtype=bool)
        keep[ranked[:max_items]] = True
    cols = np.flatnonzero(keep)
    column = np.full(n_items, -1, dtype=np.int64)
    column[cols] = np.arange(len(cols))
    inside = column[i] >= 0
    if max_users is not None and n_users > max_users:
        sampled = np.zeros(n_users, dtype=bool)
        sampled[np.random.default_rng(seed).choice(n_users, max_users, replace=False)] = True
        inside &= sampled[u]
    x = _matrix(u[inside], column[i[inside]], n_users, len(cols))
    gram = torch.from_numpy(_gram(x)).double()
    lam = reg * float(gram.diagonal().mean()) if len(cols) else reg
    gram.diagonal().add_(lam)
    p = spd_inverse(gram, seed=seed)
    b = -p / p.diagonal().unsqueeze(0)
    b.diagonal().zero_()
    weights = b.float().contiguous()  # row-major: column_scores reads whole rows
    history = history if history is not None else Csr.build(users, items, n_users)
    return Implicit("ease", n_items, history, items=torch.from_numpy(cols), weights=weights)


INVERSE_RESIDUAL = 1e-4
"""spd_inverse keeps its float32 inverse while |A (P v) - v| / |v| stays below this on random vectors."""


def spd_inverse(a: torch.Tensor, *, seed: int = 0) -> torch.Tensor:
    """The inverse of a symmetric positive definite float64 matrix, as float64. Computed by Cholesky in float32
    (2.4x float64's speed at 4,000 movies; EASE's weights are kept in float32 anyway) and checked on 4 seeded
    random vectors; redone in float64 when the float32 factorisation fails or its residual is above
    INVERSE_RESIDUAL (an ill-conditioned matrix: a weakly regularised Gram). At ML-20M size EASE's regularised
    Gram has a condition number near 130 and the float32 inverse a relative residual near 1e-6."""
    factor, info = torch.linalg.cholesky_ex(a.float())
    if int(info) == 0:
        p = torch.cholesky_inverse(factor).double()
        v = torch.randn(a.shape[0], 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        if float(torch.linalg.norm(a @ (p @ v) - v) / torch.linalg.norm(v)) <= INVERSE_RESIDUAL:
            return p
    return torch.cholesky_inverse(torch.linalg.cholesky(a))


def fit_ials(
    users: torch.Tensor,
    items: torch.Tensor,
    n_users: int,
    n_items: int,
    *,
    rank: int = 32,
    alpha: float = 10.0,
    reg: float = 0.1,
    iterations: int = 8,
    seed: int = 0,
    chunk_cells: int = 1 << 25,
) -> Implicit:
    """iALS by exact alternating least squares: for each user, (Y^T Y + alpha Y_u^T Y_u + lam I) p_u = (1 + alpha)
    Y_u^T 1, and the same for items. `reg` is relative: lam = reg x the mean pairs per row of the side solved."""
    x = _matrix(users.long().numpy(), items.long().numpy(), n_users, n_items)
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(n_users, rank, generator=g, dtype=torch.float32) * 0.01
    q = torch.randn(n_items, rank, generator=g, dtype=torch.float32) * 0.01
    by_user = (torch.from_numpy(x.indptr.astype(np.int64)), torch.from_numpy(x.indices.astype(np.int64)))
    xt = x.T.tocsr()
    by_item = (torch.from_numpy(xt.indptr.astype(np.int64)), torch.from_numpy(xt.indices.astype(np.int64)))
    for _ in range(iterations):
        p = _ials_half(q, *by_user, alpha, reg, chunk_cells)
        q = _ials_half(p, *by_item, alpha, reg, chunk_cells)
    return Implicit("ials", n_items, Csr(*by_user), user_factors=p.float(), item_factors=q.float())


def _ials_half(
    fixed: torch.Tensor, indptr: torch.Tensor, indices: torch.Tensor, alpha: float, reg: float, chunk_cells: int
) -> torch.Tensor:
    """One side of iALS: every row's exact solve with the other side's factors fixed, in chunks of rows whose
    pairs' outer products hold about `chunk_cells` numbers."""
    n_rows, rank = len(indptr) - 1, fixed.shape[1]
    counts = indptr[1:] - indptr[:-1]
    lam = reg * float(counts.double().mean().clamp(min=1))
    base = fixed.T @ fixed + lam * torch.eye(rank, dtype=fixed.dtype)
    out = torch.zeros(n_rows, rank, dtype=fixed.dtype)
    per_chunk = max(1, chunk_cells // (rank * rank))
    lo = 0
    while lo < n_rows:
        hi = int(torch.searchsorted(indptr, int(indptr[lo]) + per_chunk, right=True)) - 1
        hi = min(max(hi, lo + 1), n_rows)
        start, stop = int(indptr[lo]), int(indptr[hi])
        row = torch.repeat_interleave(torch.arange(hi - lo), counts[lo:hi])
        y = fixed[indices[start:stop]]
        gram = base.expand(hi - lo, rank, rank).clone()
        gram.index_add_(0, row, alpha * y.unsqueeze(2) * y.unsqueeze(1))
        rhs = torch.zeros(hi - lo, rank, dtype=fixed.dtype).index_add_(0, row, (1 + alpha) * y)
        out[lo:hi] = torch.cholesky_solve(rhs.unsqueeze(2), torch.linalg.cholesky(gram)).squeeze(2)
        lo = hi
    return out
