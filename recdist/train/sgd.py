"""Fast SGD for matrix factorisation: stratified SGD (DSGD, Gemulla et al. 2011) over threads and ranks.

Users and items are dealt at random into S groups (the same on every rank), so the ratings fall into S x S
blocks. A sub-epoch runs the S blocks of one diagonal -- they share no user and no item, so they run in
parallel without races -- and an epoch runs all S diagonals in a fresh random order.

Across ranks: rank r of W owns the user groups g with g % W == r and holds every training rating of their
users (moved there once, at start, by one all-to-all). In a sub-epoch each rank runs its own blocks of the
diagonal; then the item rows each rank changed (each has exactly one owner in a sub-epoch) are shared by a
masked all-reduce, and the user rows once an epoch. The blocks' contents (sorted by user and item), their
seeds and their order depend on the seed and S only, not on the ranks or threads: with the numba kernel 1 and
N workers compute the same tables, bit for bit, and a resumed run continues exactly (every epoch starts from
the same block order).

Kernels: on CPU (`numba`) a compiled per-rating pass over each block in a fresh random order (a Fisher-Yates
shuffle fused into the pass), the blocks of a diagonal in parallel threads. Where a block's factor rows would not
fit in a core's cache, the block is cut into T x T sub-blocks (tiles_for) run one after another in a fresh random
order, each shuffled as a block is: random accesses then hit cache (1.6-1.7x the ratings per second at ML-20M), and
the strata, so what the ranks exchange, are unchanged. Elsewhere (`torch`, the CUDA
default) the rank's ratings of a diagonal in shuffled whole-batch steps of batch_size / W rows, each row moving
by its gradients summed over the batch divided by its count there (a damped per-row step: summed gradients of
repeated rows diverge).
"""

from __future__ import annotations

import time
from typing import Any

import numba
import numpy as np
import torch
from numba import njit, prange

from recdist.errors import ConfigError
from recdist.models.batch import Batch
from recdist.train import dist
from recdist.train.solvers import Problem, Schedule, default_lr, epoch_generator, rank_counts, trained_tables

# ---------------------------------------------------------------------------------------------- numba kernel


@njit(inline="always")
def _xorshift(state):  # pragma: no cover
    """One xorshift64 step of the kernels' random stream (inlined into them by numba)."""
    state ^= state << np.uint64(13)
    state ^= state >> np.uint64(7)
    state ^= state << np.uint64(17)
    return state


@njit(cache=True, nogil=True, fastmath=True)
def _block_pass(users, items, ratings, lo, hi, seed, P, Q, bu, bi, mu, lr, ru, ri, reg, reg_b, biased):
    """SGD over ratings[lo:hi] in a fresh random order (Fisher-Yates fused in); returns the sum of squared errors.
    A user's rows move at lr x ru[u], an item's at lr x ri[i] (per-row rates: 1, or more for a warm fit's new rows)."""
    k = P.shape[1]
    state = np.uint64(seed) | np.uint64(1)
    sse = 0.0
    for j in range(lo, hi):
        # xorshift64, then Lemire's multiply-shift to pick m uniformly in [j, hi)
        state = _xorshift(state)
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
        lu = lr * ru[u]
        li = lr * ri[i]
        if biased:
            bu[u] += lu * (e - reg_b * bu[u])
            bi[i] += li * (e - reg_b * bi[i])
        for f in range(k):
            p = P[u, f]
            q = Q[i, f]
            P[u, f] = p + lu * (e * q - reg * p)
            Q[i, f] = q + li * (e * p - reg * q)
    return sse


@njit(cache=True, nogil=True, fastmath=True)
def _tiled_pass(users, items, ratings, offsets, blk, tiles, seed, P, Q, bu, bi, mu, lr, ru, ri, reg, reg_b, biased):
    """Block `blk` as its `tiles` sub-blocks (offsets[blk * tiles + t]), in a fresh random order, each by _block_pass;
    returns the block's sum of squared errors. A sub-block's rows fit in cache where the block's do not."""
    order = np.arange(tiles)
    state = np.uint64(seed) | np.uint64(1)
    for j in range(tiles - 1):
        state = _xorshift(state)
        m = j + np.int64(((state >> np.uint64(32)) * np.uint64(tiles - j)) >> np.uint64(32))
        order[j], order[m] = order[m], order[j]
    sse = 0.0
    for t in range(tiles):
        sub = blk * tiles + order[t]
        state = _xorshift(state)
        tile_seed = seed if tiles == 1 else np.int64(state >> np.uint64(1))
        sse += _block_pass(
            users, items, ratings, offsets[sub], offsets[sub + 1], tile_seed, P, Q, bu, bi, mu, lr, ru, ri, reg,
            reg_b, biased,
        )  # fmt: skip
    return sse


@njit(parallel=True, cache=True, nogil=True, fastmath=True)
def _sweep(users, items, ratings, offsets, tiles, blocks, seeds, P, Q, bu, bi, mu, lr, ru, ri, reg, reg_b, biased, sse):
    """Run `blocks` (disjoint in users and items) in parallel, each as its `tiles` sub-blocks; each block's squared
    errors go to sse[block]."""
    for b in prange(blocks.shape[0]):
        blk = blocks[b]
        sse[blk] = _tiled_pass(
            users, items, ratings, offsets, blk, tiles, seeds[blk], P, Q, bu, bi, mu, lr, ru, ri, reg, reg_b, biased
        )


def _bucket(users, items, ratings, ugroup, igroup, S, n_items, utile, itile, T, threads):
    """The ratings grouped into the S x S blocks (user group major), each block into its T x T sub-blocks (user
    tile major: utile, itile in [0, T)), each sub-block sorted by (user, item), equal pairs in input order.

    Two passes, each on `threads` threads: every rating is written at the next free place of its sub-block (each
    thread a range of the input, placed after the ranges before it, so a sub-block holds its ratings in input
    order), then each sub-block is sorted in cache (a stable sort of its user x n_items + item keys). The same
    arrays as three stable counting sorts of all the ratings (by item, by user, by sub-block), which jumped across
    every user's and item's bucket: 0.85 s against 2.0-2.3 s on 2 cores at ML-20M. Returns users, items, ratings in
    that order and the S*S*T*T + 1 sub-block offsets (block b's sub-blocks are b*T*T ... (b+1)*T*T - 1)."""
    from concurrent.futures import ThreadPoolExecutor

    n, subs = users.shape[0], S * S * T * T
    key = _sub_block_keys(users, items, ugroup, igroup, S, utile, itile, T)
    cuts = np.linspace(0, n, threads + 1).astype(np.int64)
    counts = np.stack([np.bincount(key[a:b], minlength=subs) for a, b in zip(cuts[:-1], cuts[1:], strict=True)])
    offsets = np.zeros(subs + 1, np.int64)
    np.cumsum(counts.sum(axis=0), out=offsets[1:])
    firsts = offsets[:-1] + np.cumsum(counts, axis=0) - counts  # each thread's first place in each sub-block
    parts = np.searchsorted(offsets, np.linspace(0, n, threads + 1)).clip(0, subs)  # sub-blocks by equal rows
    parts[0], parts[-1] = 0, subs
    out = (np.empty_like(users), np.empty_like(items), np.empty_like(ratings))
    place = lambda t: _place(key, users, items, ratings, cuts[t], cuts[t + 1], firsts[t], *out)  # noqa: E731
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(place, range(threads)))
        list(pool.map(lambda t: _sort_sub_blocks(*out, n_items, offsets, parts[t], parts[t + 1]), range(threads)))
    return (*out, offsets)


@njit(cache=True, nogil=True)
def _sub_block_keys(users, items, ugroup, igroup, S, utile, itile, T):
    key = np.empty(users.shape[0], np.int32)
    for j in range(users.shape[0]):
        u, i = users[j], items[j]
        key[j] = ((ugroup[u] * S + igroup[i]) * T + utile[u]) * T + itile[i]
    return key


@njit(cache=True, nogil=True)
def _place(key, users, items, ratings, lo, hi, firsts, out_users, out_items, out_ratings):
    """Rows lo..hi-1 written at their sub-block's next place, from `firsts` (this range's first place in each)."""
    at = firsts.copy()
    for j in range(lo, hi):
        p = at[key[j]]
        out_users[p], out_items[p], out_ratings[p] = users[j], items[j], ratings[j]
        at[key[j]] = p + 1


@njit(cache=True, nogil=True)
def _sort_sub_blocks(users, items, ratings, n_items, offsets, first, last):
    """Sub-blocks first..last-1 sorted in place by (user, item), stably."""
    for b in range(first, last):
        lo, hi = offsets[b], offsets[b + 1]
        if hi - lo < 2:
            continue
        pair = np.empty(hi - lo, np.int64)
        for r in range(hi - lo):
            pair[r] = np.int64(users[lo + r]) * n_items + items[lo + r]
        order = np.argsort(pair, kind="mergesort")
        u, i, x = users[lo:hi].copy(), items[lo:hi].copy(), ratings[lo:hi].copy()
        for r in range(hi - lo):
            users[lo + r], items[lo + r], ratings[lo + r] = u[order[r]], i[order[r]], x[order[r]]


# ---------------------------------------------------------------------------------------------- the solver


CACHE_BYTES = 512 * 1024
"""What a sub-block's factor rows (its users' and items' factors and biases, float32) may take: a core's L2 cache
on this machine's and today's server CPUs. The kernel visits a block's ratings in random order, so rows that
spill out of cache cost a memory access each: at ML-20M, rank 32, one thread ran 7.7M ratings/s over whole blocks
of the 8 x 8 grid and 13.3M over their 6 x 6 sub-blocks (best of 7)."""


def tiles_for(n_users: int, n_items: int, rank: int, strata: int) -> int:
    """Sub-blocks per side of a block (T of its T x T), so that a sub-block's rows fit CACHE_BYTES; 1 when a block's
    do. A block is cut locally: the strata, and so what the ranks exchange, stay as they are."""
    rows = (n_users + n_items) * (rank + 1) * 4
    return max(1, -(-rows // (strata * CACHE_BYTES)))


class SGDSolver:
    """Per-rating SGD for the explicit_mf family (mf, biased_mf), updating the model's own tables in place.

    `kernel`: "numba" (CPU default) or "torch" (CUDA default; works on CPU too). `strata`: S of the S x S block
    grid (the result depends on it, not on threads or ranks; raised to ranks x threads when smaller, so every
    thread has a block). `threads`: numba threads (default: torch's, which the worker sets to its CPU share).
    """

    def __init__(self, p: Problem, *, kernel: str | None = None, strata: int = 8, threads: int | None = None) -> None:
        model, cfg, data = p.model, p.cfg, p.data
        self.cfg, self.device = cfg, p.device
        self.kernel = kernel or ("numba" if self.device.type == "cpu" else "torch")
        if self.kernel not in ("numba", "torch"):
            raise ConfigError(f"unknown SGD kernel {self.kernel!r}", fix="use 'numba' (CPU) or 'torch'")
        if self.kernel == "numba" and self.device.type != "cpu":
            raise ConfigError("the numba SGD kernel runs on CPU only", fix="use kernel='torch' on CUDA")
        self.t = trained_tables(model, "sgd")
        # per user and per item: a multiple of the schedule's rate (warm_rows), 1 by default
        self.row_rate = tuple(
            torch.ones(n, dtype=torch.float32, device=self.device) for n in (data.dims.n_users, data.dims.n_items)
        )
        self.schedule = Schedule(cfg, default_lr(model, "sgd"))
        self.rank, self.world = dist.rank(), dist.world_size()
        self.threads = threads or torch.get_num_threads()
        self.strata = S = max(strata, self.world * self.threads)
        n_users, n_items = data.dims.n_users, data.dims.n_items
        rng = np.random.default_rng(cfg.seed)  # the same groups on every rank
        ugroup, igroup = ((rng.permutation(n) % S).astype(np.int32) for n in (n_users, n_items))
        self.tiles = T = tiles_for(n_users, n_items, self.t.user_factors.shape[1], S) if self.kernel == "numba" else 1
        utile, itile = ((rng.permutation(n) % T).astype(np.int32) for n in (n_users, n_items))
        self.owned = np.arange(self.rank, S, self.world)  # this rank's user groups
        user, item, rating = self._exchange(data.train, torch.from_numpy(ugroup))
        self.n_global = float(sum(rank_counts(len(user), self.device)))
        arrays = _bucket(user, item, rating, ugroup, igroup, S, n_items, utile, itile, T, max(1, self.threads))
        self.users, self.items, self.ratings, self.offsets = arrays  # offsets of the sub-blocks
        if self.kernel == "numba":  # every epoch starts from this order: reproducible and resumable
            self.start = (self.users.copy(), self.items.copy(), self.ratings.copy())
            no_block = np.zeros(0, np.int64)  # load the compiled kernel now, in set-up, not in epoch 1
            self._numba_sweep(no_block, np.zeros(S * S, np.int64), 0.0, np.zeros(S * S))
        else:
            self.users, self.items = (torch.from_numpy(x).to(self.device).long() for x in (self.users, self.items))
            self.ratings = torch.from_numpy(self.ratings).to(self.device)
        self.user_owned = torch.from_numpy(ugroup % self.world == self.rank).to(self.device)
        self.item_group = torch.from_numpy(igroup).to(self.device)

    # -------------------------------------------------------------------------------------------- protocol

    def train_epoch(self, epoch: int) -> dict[str, float]:
        lr = self.schedule.lr(epoch)
        start = time.perf_counter()
        S = self.strata
        rng = np.random.default_rng([self.cfg.seed, epoch])  # the same on every rank
        diagonals = rng.permutation(S)
        seeds = rng.integers(1, 2**63 - 1, size=S * S, dtype=np.int64)
        sse = np.zeros(S * S)  # per block, so the sum is the same whichever rank ran a block
        gen = epoch_generator(self.cfg.seed, self.rank, epoch, self.device) if self.kernel == "torch" else None
        if self.kernel == "numba":
            numba.set_num_threads(max(1, min(self.threads, numba.config.NUMBA_NUM_THREADS)))
            for x, x0 in zip((self.users, self.items, self.ratings), self.start, strict=True):
                np.copyto(x, x0)
        for d in diagonals:
            blocks = self.owned * S + (self.owned + d) % S
            if self.kernel == "numba":
                self._numba_sweep(blocks, seeds, lr, sse)
            else:
                sse[blocks[0]] = self._torch_sweep(blocks, gen, lr)  # booked on one block of the diagonal
            if self.world > 1:  # item group h was changed by the owner of user group (h - d) mod S
                self._share(self.t.item_tensors(), (self.item_group - int(d)) % S % self.world == self.rank)
        if self.world > 1:
            self._share(self.t.user_tensors(), self.user_owned)
        seconds = time.perf_counter() - start
        total = float(dist.all_reduce_sum_(torch.from_numpy(sse).to(self.device)).sum())
        return {"train_loss": total / max(self.n_global, 1.0), "rows": self.n_global, "seconds": seconds, "lr": lr}

    def observe(self, val_rmse: float) -> None:
        """Plateau schedule: halve the learning rate when validation RMSE stops improving."""
        self.schedule.observe(val_rmse)

    def state_dict(self) -> dict[str, Any]:
        """The schedule only: the model holds the tables and every epoch derives from (seed, epoch)."""
        return {"schedule": self.schedule.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.schedule.load_state_dict(state["schedule"])

    def warm_rows(self, user_rates: np.ndarray, item_rates: np.ndarray) -> None:
        """A warm fit's per-row rates (multiples of the schedule's): its new users and items start as a cold fit's
        rows do, so they take its rate where the known rows take the warm one's lower rate; a fold-in's frozen
        rows 0, so they never move (their ratings still train the other side)."""
        for table, rates in zip(self.row_rate, (user_rates, item_rates), strict=True):
            table.copy_(torch.from_numpy(np.asarray(rates, dtype=np.float32)))

    # -------------------------------------------------------------------------------------------- kernels

    def _numba_sweep(self, blocks: np.ndarray, seeds: np.ndarray, lr: float, sse: np.ndarray) -> None:
        t = self.t
        _sweep(
            self.users, self.items, self.ratings, self.offsets, self.tiles * self.tiles, blocks, seeds,
            t.user_factors.numpy(), t.item_factors.numpy(), t.user_bias.numpy(), t.item_bias.numpy(),
            np.float32(t.mu), np.float32(lr), self.row_rate[0].numpy(), self.row_rate[1].numpy(), np.float32(t.reg),
            np.float32(t.reg_bias), t.biased, sse,
        )  # fmt: skip

    @torch.no_grad()
    def _torch_sweep(self, blocks: np.ndarray, gen: torch.Generator, lr: float) -> float:
        """The rank's ratings of these blocks, shuffled, in damped whole-batch steps; their squared errors."""
        rows = torch.cat([torch.arange(self.offsets[b], self.offsets[b + 1], device=self.device) for b in blocks])
        rows = rows[torch.randperm(len(rows), generator=gen, device=self.device)]
        sse = torch.zeros((), dtype=torch.float64, device=self.device)
        for idx in torch.split(rows, max(1, self.cfg.batch_size // self.world)):
            sse += self._torch_step(idx, lr)
        return float(sse)

    def _torch_step(self, idx: torch.Tensor, lr: float) -> torch.Tensor:
        """One damped step: each row moves by lr times its summed gradient over the batch / its count there."""
        t = self.t
        u, i, r = self.users[idx], self.items[idx], self.ratings[idx]
        pu, qi = t.user_factors[u], t.item_factors[i]
        e = r - (t.mu + t.user_bias[u] + t.item_bias[i] + (pu * qi).sum(1))
        step_u = lr * self.row_rate[0][u] / torch.bincount(u, minlength=t.user_factors.shape[0])[u].to(e.dtype)
        step_i = lr * self.row_rate[1][i] / torch.bincount(i, minlength=t.item_factors.shape[0])[i].to(e.dtype)
        t.user_factors.index_add_(0, u, (e[:, None] * qi - t.reg * pu) * step_u[:, None])
        t.item_factors.index_add_(0, i, (e[:, None] * pu - t.reg * qi) * step_i[:, None])
        if t.biased:
            t.user_bias.index_add_(0, u, (e - t.reg_bias * t.user_bias[u]) * step_u)
            t.item_bias.index_add_(0, i, (e - t.reg_bias * t.item_bias[i]) * step_i)
        return (e * e).sum().double()

    # -------------------------------------------------------------------------------------------- ranks

    def _exchange(self, train: Batch, ugroup: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """This rank's training rows after one all-to-all: every rating of the users in its groups."""
        user, item, rating = train.user, train.item, train.target.float()
        if self.world > 1:
            owner = ugroup.to(user.device)[user].long() % self.world
            order = torch.argsort(owner, stable=True)
            send = torch.bincount(owner, minlength=self.world)
            recv = dist.all_to_all_(torch.empty_like(send), send, [1] * self.world, [1] * self.world)
            sizes = (recv.tolist(), send.tolist())
            user, item, rating = (
                dist.all_to_all_(x.new_empty(sum(sizes[0])), x[order], *sizes) for x in (user, item, rating)
            )
        return user.cpu().numpy().astype(np.int32), item.cpu().numpy().astype(np.int32), rating.cpu().numpy()

    def _share(self, tensors: list[torch.Tensor], mine: torch.Tensor) -> None:
        """Every rank gets the rows each owner has: zero the rows this rank does not own, then sum over ranks."""
        for x in tensors:
            x[~mine] = 0
            dist.all_reduce_sum_(x)
