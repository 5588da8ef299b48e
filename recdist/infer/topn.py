"""Whole-tensor ranking on factor tables: top-N unseen items, cosine neighbours, and folding a new user in.

Pure PyTorch on (users x items) score blocks, chunked over users so memory stays bounded; no Ray, no files.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from recdist.sorting import counting_sort


@dataclass(frozen=True)
class Csr:
    """Rows -> column lists (e.g. user -> rated items), for masking seen items in a score block."""

    indptr: torch.Tensor  # int64 (n_rows + 1,)
    indices: torch.Tensor  # int64 (nnz,)

    @staticmethod
    def build(rows: torch.Tensor, cols: torch.Tensor, n_rows: int) -> Csr:
        return Csr.build_ordered(rows, cols, n_rows)[0]

    @staticmethod
    def build_ordered(rows: torch.Tensor, cols: torch.Tensor, n_rows: int) -> tuple[Csr, torch.Tensor]:
        """The Csr and where each stored entry came from (int64 positions in `rows`), to carry per-entry values
        (a split, a flag) into the stored order."""
        rows, cols = rows.long(), cols.long()
        if len(rows) and not (0 <= int(rows.min()) and int(rows.max()) < n_rows):
            raise ValueError(f"Csr.build: row indices must lie in [0, {n_rows})")
        order = torch.from_numpy(counting_sort(rows.numpy(), n_rows, np.arange(len(rows))))  # stable, O(n)
        counts = torch.bincount(rows, minlength=n_rows)
        indptr = torch.zeros(n_rows + 1, dtype=torch.long)
        indptr[1:] = torch.cumsum(counts, 0)
        return Csr(indptr, cols[order]), order

    def subset(self, keep: torch.Tensor) -> Csr:
        """The entries where `keep` (bool, one per stored entry) is set, rows and order unchanged: O(nnz), no sort
        (e.g. a user's training movies out of every movie they rated)."""
        kept = torch.zeros(len(keep) + 1, dtype=torch.long)
        torch.cumsum(keep.long(), 0, out=kept[1:])
        return Csr(kept[self.indptr], self.indices[keep])

    def rows(self) -> torch.Tensor:
        """int64 (nnz,): the row of every stored entry."""
        return torch.repeat_interleave(torch.arange(len(self.indptr) - 1), self.indptr.diff())

    def gather(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(position of the row in `rows`, column) for every stored entry of the given rows."""
        rows = rows.long()
        starts, counts = self.indptr[rows], self.indptr[rows + 1] - self.indptr[rows]
        which = torch.repeat_interleave(torch.arange(len(rows)), counts)
        first = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        offsets = torch.arange(int(counts.sum())) - first
        return which, self.indices[starts[which] + offsets]


def mf_scores(factors: dict[str, torch.Tensor], mean: float, users: torch.Tensor) -> torch.Tensor:
    """mu + b_u + b_i + p_u . q_i for every item: a (len(users), n_items) block."""
    p = factors["user_factors"][users]
    scores = p @ factors["item_factors"].T
    scores += factors["item_bias"].unsqueeze(0)
    scores += (factors["user_bias"][users] + mean).unsqueeze(1)
    return scores


def top_k_of(
    scores_of: Callable[[torch.Tensor], torch.Tensor],
    rows: torch.Tensor,
    k: int,
    *,
    exclude: Csr | None = None,
    allowed: torch.Tensor | None = None,
    chunk: int = 2048,
    columns: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best (score, item) per row of a scoring function, `scores_of(block)` -> (len(block), n_cols),
    called on `chunk` rows at a time (memory: one block); `exclude`d (row, item) pairs and items not `allowed`
    are skipped; k is cut to n_cols. `columns` (int64, n_cols): the item of each score column when scores_of
    scores a subset of the items (default: column j is item j). Returns (scores, items), (len(rows), k) each,
    best first; -inf scores mark slots with no candidate left. MF's top-N:
    `top_k_of(partial(mf_scores, factors, mean), ...)`."""
    position = None
    if columns is not None:
        position = torch.full((int(columns.max()) + 1 if len(columns) else 0,), -1, dtype=torch.long)
        position[columns] = torch.arange(len(columns))
        allowed = allowed[columns] if allowed is not None else None
    if allowed is not None and bool(allowed.all()):
        allowed = None  # nothing to mask
    out_s, out_i = torch.empty(len(rows), k), torch.empty(len(rows), k, dtype=torch.long)
    for lo in range(0, len(rows), chunk):
        block = rows[lo : lo + chunk].long()
        scores = scores_of(block).float()
        if scores.shape[1] < k:
            k = scores.shape[1]
            out_s, out_i = out_s[:, :k], out_i[:, :k]
        if allowed is not None:
            scores[:, ~allowed] = -torch.inf
        if exclude is not None:
            which, cols = exclude.gather(block)
            if position is not None:
                inside = cols < len(position)
                which, cols = which[inside], position[cols[inside]]
                which, cols = which[cols >= 0], cols[cols >= 0]
            scores[which, cols] = -torch.inf
        out_s[lo : lo + chunk], out_i[lo : lo + chunk] = torch.topk(scores, k, dim=1)
    return out_s, (columns[out_i] if columns is not None else out_i)


def popularity_top(
    n_train: torch.Tensor,
    users: torch.Tensor,
    n: int,
    *,
    exclude: Csr | None = None,
    allowed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The popularity baseline: the n most-rated items (training ratings) per user, skipping `exclude`d (seen)
    and not `allowed` items; equal counts in item order. Returns (training ratings, items) as top_k_of does.

    Only the n + s most-rated allowed items are scored, s the most items any of the users has seen: each user
    has at least n unseen ones among them, so the answer is the same as over every item."""
    order = torch.argsort(-n_train.double(), stable=True)
    if allowed is not None:
        order = order[allowed[order]]
    seen = 0
    if exclude is not None and len(users):
        seen = int((exclude.indptr[users.long() + 1] - exclude.indptr[users.long()]).max())
    columns = order[: n + seen]
    position = -torch.arange(len(columns), dtype=torch.float32)  # exact in float32 below 2^24 items
    scores, items = top_k_of(
        lambda block: position.expand(len(block), -1).clone(), users, n, exclude=exclude, columns=columns
    )
    if scores.shape[1] < n:  # fewer allowed items than n: pad as empty slots
        pad = n - scores.shape[1]
        scores = torch.cat([scores, torch.full((len(users), pad), -torch.inf)], dim=1)
        items = torch.cat([items, torch.zeros((len(users), pad), dtype=torch.long)], dim=1)
    counts = n_train.float()[items]
    return torch.where(torch.isfinite(scores), counts, -torch.inf), items


def cosine_neighbours(
    item_factors: torch.Tensor,
    queries: torch.Tensor,
    k: int,
    *,
    allowed: torch.Tensor | None = None,
    chunk: int = 4096,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k items nearest to each query item by cosine of factors, among the `allowed` ones (only those are
    scored), the item itself excluded."""
    unit = torch.nn.functional.normalize(item_factors.float(), dim=1)
    columns = torch.nonzero(allowed).squeeze(1) if allowed is not None else torch.arange(unit.shape[0])
    candidates = unit[columns]
    position = torch.full((unit.shape[0],), -1, dtype=torch.long)
    position[columns] = torch.arange(len(columns))

    def cosines(q: torch.Tensor) -> torch.Tensor:
        cos = unit[q] @ candidates.T
        own = position[q]
        mine = own >= 0
        cos[torch.arange(len(q))[mine], own[mine]] = -torch.inf  # not its own neighbour
        return cos

    return top_k_of(cosines, queries, min(k, unit.shape[0] - 1), chunk=chunk, columns=columns)


def fold_in(
    item_factors: torch.Tensor,
    item_bias: torch.Tensor,
    mean: float,
    items: torch.Tensor,
    ratings: torch.Tensor,
    reg: float,
) -> tuple[torch.Tensor, float]:
    """Factors and bias of a new user from a few ratings, items fixed: one ridge solve (one ALS half-step).

    Minimises sum_j (r_j - mu - b_i(j) - b_u - p . q_j)^2 + reg * n * (|p|^2 + b_u^2), the per-rating L2 of MF.
    """
    q = item_factors[items.long()].double()
    x = torch.cat([q, torch.ones(len(items), 1, dtype=torch.float64)], dim=1)
    y = ratings.double() - mean - item_bias[items.long()].double()
    gram = x.T @ x + reg * len(items) * torch.eye(x.shape[1], dtype=torch.float64)
    sol = torch.linalg.solve(gram, x.T @ y)
    return sol[:-1].to(item_factors.dtype), float(sol[-1])
