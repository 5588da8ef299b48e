"""Whole-tensor ranking on factor tables: top-N unseen items, cosine neighbours, and folding a new user in.

Pure PyTorch on (users x items) score blocks, chunked over users so memory stays bounded; no Ray, no files.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from numba import njit

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


SCORE_BLOCK_BYTES = 8 << 20
"""Scores in one thread's block of top_k_of: written and read back while in cache, and enough rows to spread each
call's fixed work (EASE sums its weight blocks once per block). At ML-20M size, 80 users x 26,744 movies for MF's
top-N of 10,000 users: 0.29-0.32 s against 0.61 s with 1,024-user blocks; 160 x 13,084 for similar movies: 0.15 s
against 0.37 s; 520 x 4,000 for EASE's candidates, as fast as 1,024 (narrower EASE blocks were slower: 3.2-4.0 s
for 128-256 users against 2.6-2.9 s)."""


def top_k_of(
    scores_of: Callable[[torch.Tensor], torch.Tensor],
    rows: torch.Tensor,
    k: int,
    *,
    exclude: Csr | None = None,
    allowed: torch.Tensor | None = None,
    chunk: int | None = None,
    columns: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best (score, item) per row of a scoring function, `scores_of(block)` -> (len(block), n_cols),
    called on blocks of rows (memory: a block per thread, masked in place); `exclude`d (row, item) pairs
    and items not `allowed` are skipped; k is cut to n_cols. `columns` (int64, n_cols): the item of each score
    column when scores_of scores a subset of the items (default: column j is item j). Returns (scores, items),
    (len(rows), k) each, best first, equal scores in column order; -inf scores mark slots with no candidate left
    (a NaN score is no candidate either). MF's top-N: `top_k_of(partial(mf_scores, factors, mean), ...)`.

    Blocks of rows are scored and selected in threads (scores_of is called from several threads at once: a pure
    function of the rows), PyTorch at one thread in each: scoring and selecting a block run in the same thread, so
    no thread pool idles or spins while another works. A block holds SCORE_BLOCK_BYTES of scores (at least 16
    rows), or `chunk` / threads rows when `chunk` is given. The selection is a compiled pass per row
    (`_select_rows`) that applies the masks and keeps only scores above the k-th best so far: about one read of
    the row (torch.topk plus the masking took 2x as long at ML-20M size)."""
    from concurrent.futures import ThreadPoolExecutor

    from recdist.infer.scoring import one_thread

    position = np.zeros(0, dtype=np.int64)
    if columns is not None:
        position = np.full(int(columns.max()) + 1 if len(columns) else 0, -1, dtype=np.int64)
        position[columns.numpy()] = np.arange(len(columns))
        allowed = allowed[columns] if allowed is not None else None
    banned = np.flatnonzero(~allowed.numpy()) if allowed is not None else np.zeros(0, dtype=np.int64)
    indptr, indices = (exclude.indptr.numpy(), exclude.indices.numpy()) if exclude is not None else (None, None)
    rows = rows.long()
    width = 1
    if len(rows):  # a row's width (k is cut to it); also builds any state scores_of makes on first use
        width = scores_of(rows[:1]).shape[1]
        k = min(k, width)
    out_s, out_i = torch.empty(len(rows), k), torch.empty(len(rows), k, dtype=torch.long)
    threads = max(1, torch.get_num_threads())
    step = max(16, SCORE_BLOCK_BYTES // (4 * max(1, width))) if chunk is None else max(1, -(-chunk // threads))

    def select(lo: int) -> None:
        block = rows[lo : lo + step]
        scores = scores_of(block).detach().float().cpu().contiguous()
        args = (block.numpy(), indptr, indices, position, banned)
        _select_rows(scores.numpy(), k, *args, out_s[lo : lo + step].numpy(), out_i[lo : lo + step].numpy())

    if k:
        with one_thread(), ThreadPoolExecutor(threads) as pool:
            list(pool.map(select, range(0, len(rows), step)))
    return out_s, (columns[out_i] if columns is not None else out_i)


@njit(inline="always")
def _key(score, column):
    """(score, column) as one int64, larger = better: the float's bits made order-preserving, then the column
    complemented (equal scores: the lower column wins). -0.0 counts as 0.0, as the float comparison does."""
    bits = np.int64(np.float32(score + np.float32(0.0)).view(np.int32))
    if bits < 0:
        bits = bits ^ np.int64(0x7FFFFFFF)
    return (bits << 32) | (np.int64(0xFFFFFFFF) - column)


@njit(inline="always")
def _column_of(key):
    return np.int64(0xFFFFFFFF) - (key & np.int64(0xFFFFFFFF))


@njit(cache=True, nogil=True)
def _keep_largest(keys, m, k):
    """Move the k largest of keys[:m] into keys[:k] (any order; quickselect); return the least of them."""
    lo, hi = 0, m - 1
    while lo < hi:
        pivot = keys[(lo + hi) >> 1]
        i, j = lo, hi
        while i <= j:
            while keys[i] > pivot:
                i += 1
            while keys[j] < pivot:
                j -= 1
            if i <= j:
                keys[i], keys[j] = keys[j], keys[i]
                i += 1
                j -= 1
        if k - 1 <= j:
            hi = j
        elif k - 1 >= i:
            lo = i
        else:
            break
    least = keys[0]
    for t in range(1, k):
        least = min(least, keys[t])
    return least


@njit(cache=True, nogil=True)
def _select_rows(scores, k, users, indptr, indices, position, banned, out_s, out_i):
    """The rows of `scores` (float32, n_rows x n_cols; masked in place): their k best (score, column), best
    first, into out_s / out_i. Masked: the `banned` columns and, when indptr is given, user users[r]'s items
    indices[indptr[u]:indptr[u+1]] (mapped to columns by `position` unless it is empty). A buffer of 4k keys
    takes every score above the k-th best kept so far, and is cut back to the k best when full."""
    n = scores.shape[1]
    size = max(4 * k, 64)
    keys = np.empty(size, np.int64)
    mapped = position.shape[0] > 0
    for r in range(scores.shape[0]):
        row = scores[r]
        for c in banned:
            row[c] = -np.inf
        if indptr is not None:
            u = users[r]
            for p in range(indptr[u], indptr[u + 1]):
                c = indices[p]
                if mapped:
                    c = position[c] if c < position.shape[0] else -1
                if 0 <= c < n:
                    row[c] = -np.inf
        m = 0
        floor = np.float32(-np.inf)
        for j in range(n):
            if row[j] > floor:  # NaN and -inf never pass
                keys[m] = _key(row[j], j)
                m += 1
                if m == size:
                    floor = row[_column_of(_keep_largest(keys, m, k))]
                    m = k
        got = min(m, k)
        if m > k:
            _keep_largest(keys, m, k)
        for t in range(1, got):  # insertion sort, best first
            x, s = keys[t], t - 1
            while s >= 0 and keys[s] < x:
                keys[s + 1] = keys[s]
                s -= 1
            keys[s + 1] = x
        for t in range(got):
            out_s[r, t] = row[_column_of(keys[t])]
            out_i[r, t] = _column_of(keys[t])
        for t in range(got, k):
            out_s[r, t] = -np.inf
            out_i[r, t] = 0


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
    chunk: int | None = None,
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
