"""A scaling model of the MF solvers past one machine: bytes each moves, measured kernel rates, epoch times.

    .venv/bin/python bench/scaling.py                    # time the kernels (minutes when loaded), print the tables
    .venv/bin/python bench/scaling.py --loopback         # also run the real solvers on 1, 2, 4 gloo workers
    .venv/bin/python bench/scaling.py --rates r.json     # reuse (or save, first time) the measured rates

What the solvers move across W ranks (read from recdist/train/sgd.py, als.py; tests/test_scaling.py counts the
tensors they pass to the collective and checks these figures):

- DSGD (`sgd`): S = max(8, W x threads) strata. Each of the S sub-epochs of an epoch ends with a masked
  all-reduce of the *whole* item tables (factors n_items x k and, biased, the bias n_items; float32): each rank
  zeroes the rows it does not own and the sum is every owner's rows. Once an epoch the user tables the same way,
  and the S x S block losses (float64). Once at start, an all-to-all moves each rating to its user's owner.
- ALS (`als`): each half-iteration all-reduces the Gram matrices' upper triangles (n_rows x d(d+1)/2, float32,
  d = k + 1 with the bias), the right-hand sides (n_rows x d) and one float64; every rank then solves *every*
  row's d x d system (the solves are not split over ranks).

Network: a ring all-reduce of n bytes over W ranks takes 2(W-1) steps of `latency` plus 2(W-1)/W x n / bandwidth
(gloo's ring; each rank sends and receives 2(W-1)/W x n). Compute: the kernel rates timed here on one core (best
of a few repeats, on a shared machine), times the worker's cores (linear: an assumption). An epoch is compute
plus communication: the solvers wait at each collective, nothing overlaps.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace

GBIT = 1e9 / 8
"""Bytes per second in one Gbit/s."""

RANKS = (16, 32, 64)
WORKERS = (1, 4, 16, 64)
BASE_STRATA = 8
"""SGDSolver's default `strata` (make_solver passes no other)."""


# ------------------------------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class Shape:
    """A ratings matrix: its users, items and (training) ratings."""

    name: str
    n_users: int
    n_items: int
    n_ratings: int


ML20M = Shape("ml-20m", 138_493, 26_744, 20_000_263)
BIG = Shape("1B", 10_000_000, 1_000_000, 1_000_000_000)
"""The 1B-rating set: 10M users x 1M items, 100 ratings per user and 1,000 per item on average (density 1e-4)."""


@dataclass(frozen=True)
class Rates:
    """Kernel rates per core at each rank k, measured on this machine (or given)."""

    sgd_rows: dict[int, float]  # SGD kernel: ratings per second
    als_gram: dict[int, float]  # ALS: ratings per second through both halves' Gram and right-hand-side products
    als_solve: dict[int, float]  # ALS: rows (users + items) per second through form, Cholesky and solve

    @staticmethod
    def from_json(data: dict) -> Rates:
        return Rates(**{name: {int(k): float(v) for k, v in table.items()} for name, table in data.items()})


@dataclass(frozen=True)
class Inputs:
    """Everything one prediction reads: the data, the model, the cluster and its network."""

    shape: Shape
    rank: int
    workers: int
    rates: Rates
    threads: int = 2  # cores (numba / torch threads) per worker
    bandwidth: float = 10 * GBIT  # bytes/s each worker sends (and receives)
    latency: float = 30e-6  # seconds per ring step
    biased: bool = True
    cores: int | None = None  # cores all the workers share (None: each worker has its own `threads` cores)
    strata: int = BASE_STRATA


@dataclass(frozen=True)
class Epoch:
    """One predicted epoch of one solver on one worker."""

    compute: float  # seconds
    comm: float  # seconds in collectives
    payload: int  # bytes passed to the collectives per rank (per epoch)
    wire: float  # bytes each rank sends per epoch
    collectives: int
    memory: float  # estimated peak bytes per worker

    @property
    def seconds(self) -> float:
        return self.compute + self.comm


def dim(rank: int, biased: bool) -> int:
    """The per-row unknowns of ALS: k factors, plus the bias."""
    return rank + 1 if biased else rank


def strata(x: Inputs) -> int:
    return max(x.strata, x.workers * x.threads)


def dsgd_collectives(n_users: int, n_items: int, rank: int, biased: bool, workers: int, s: int) -> list[int]:
    """The bytes of each all-reduce one DSGD epoch makes, in order (none in one process)."""
    if workers == 1:
        return []
    items = [n_items * rank * 4] + ([n_items * 4] if biased else [])
    users = [n_users * rank * 4] + ([n_users * 4] if biased else [])
    return items * s + users + [s * s * 8]


def als_collectives(n_users: int, n_items: int, rank: int, biased: bool, workers: int) -> list[int]:
    """The bytes of each all-reduce one ALS epoch (user half, then item half) makes, in order."""
    if workers == 1:
        return []
    d = dim(rank, biased)
    return [b for n in (n_users, n_items) for b in (n * d * (d + 1) // 2 * 4, n * d * 4, 8)]


def allreduce_seconds(nbytes: float, workers: int, bandwidth: float, latency: float) -> float:
    """A ring all-reduce: 2(W-1) steps of latency, and 2(W-1)/W x nbytes through each rank's link."""
    if workers == 1:
        return 0.0
    return 2 * (workers - 1) * latency + 2 * (workers - 1) / workers * nbytes / bandwidth


def allgather_seconds(nbytes: float, workers: int, bandwidth: float, latency: float) -> float:
    """A ring all-gather (or reduce-scatter) of nbytes in all: W-1 steps, (W-1)/W x nbytes per link."""
    if workers == 1:
        return 0.0
    return (workers - 1) * latency + (workers - 1) / workers * nbytes / bandwidth


def share(x: Inputs) -> float:
    """The share of its `threads` cores a worker gets: below 1 when the workers oversubscribe `cores`."""
    return 1.0 if x.cores is None else min(1.0, x.cores / (x.workers * x.threads))


def comm(sizes: Iterable[int], x: Inputs) -> tuple[float, int, float, int]:
    """Seconds, payload bytes, bytes on each rank's link, and the count of these all-reduces."""
    counts = Counter(sizes)
    secs = sum(n * allreduce_seconds(b, x.workers, x.bandwidth, x.latency) for b, n in counts.items())
    payload = sum(n * b for b, n in counts.items())
    return secs, payload, 2 * (x.workers - 1) / x.workers * payload, sum(counts.values())


def dsgd_epoch(x: Inputs) -> Epoch:
    """DSGD: each worker's share of the ratings through its cores; S item all-reduces and one user all-reduce."""
    s = x.shape
    cores = x.workers * x.threads * share(x)
    compute = s.n_ratings / (cores * x.rates.sgd_rows[x.rank])
    secs, payload, wire, n = comm(dsgd_collectives(s.n_users, s.n_items, x.rank, x.biased, x.workers, strata(x)), x)
    tables = (s.n_users + s.n_items) * dim(x.rank, x.biased) * 4
    ratings = s.n_ratings / x.workers * (20 + 12 + 12)  # as loaded (int64, int64, f32), bucketed, its start copy
    return Epoch(compute, secs, payload, wire, n, 2 * tables + ratings)


def als_epoch(x: Inputs) -> Epoch:
    """ALS: each worker's ratings through the Gram products; every row's solve on every worker; 6 all-reduces."""
    s = x.shape
    per_worker = x.threads * share(x)
    gram = s.n_ratings / x.workers / (per_worker * x.rates.als_gram[x.rank])
    solve = (s.n_users + s.n_items) / (per_worker * x.rates.als_solve[x.rank])
    secs, payload, wire, n = comm(als_collectives(s.n_users, s.n_items, x.rank, x.biased, x.workers), x)
    d = dim(x.rank, x.biased)
    rows = max(s.n_users, s.n_items)
    half = rows * (d * (d + 1) // 2 * 4 + 4 * d * d * 8)  # Gram (f32), then four n x d x d float64 (unpacked,
    csr = s.n_ratings / x.workers * (12 + 12 + 20)  # system, its Cholesky factor, diag temp); 2 CSR copies, rows
    return Epoch(gram + solve, secs, payload, wire, n, half + csr + (s.n_users + s.n_items) * d * 8)


def dsgd_p2p_epoch(x: Inputs) -> Epoch:
    """Not implemented, for comparison: DSGD passing each changed item group only to its next owner (point to
    point, as Gemulla et al.'s DSGD and NOMAD do): n_items / W rows per rank per sub-epoch instead of the table."""
    e = dsgd_epoch(x)
    if x.workers == 1:
        return e
    s = x.shape
    row = dim(x.rank, x.biased) * 4
    sub = s.n_items / x.workers * row
    secs = strata(x) * (x.latency + sub / x.bandwidth) + allgather_seconds(
        s.n_users * row, x.workers, x.bandwidth, x.latency
    )
    wire = strata(x) * sub + (x.workers - 1) / x.workers * s.n_users * row
    return replace(e, comm=secs, wire=wire, payload=int(wire), collectives=strata(x) + 1)


def als_split_epoch(x: Inputs) -> Epoch:
    """Not implemented, for comparison: ALS with the solves split over ranks (reduce-scatter the Gram matrices,
    each rank solves its 1/W of the rows, all-gather the new factors)."""
    s = x.shape
    per_worker = x.threads * share(x)
    d = dim(x.rank, x.biased)
    gram = s.n_ratings / x.workers / (per_worker * x.rates.als_gram[x.rank])
    solve = (s.n_users + s.n_items) / x.workers / (per_worker * x.rates.als_solve[x.rank])
    secs = wire = 0.0
    for n in (s.n_users, s.n_items):
        for b in (n * (d * (d + 1) // 2 + d) * 4, n * d * 4):  # reduce-scatter, then all-gather
            secs += allgather_seconds(b, x.workers, x.bandwidth, x.latency)
            wire += (x.workers - 1) / x.workers * b if x.workers > 1 else 0.0
    e = als_epoch(x)
    return replace(e, compute=gram + solve, comm=secs, wire=wire, collectives=4 if x.workers > 1 else 0)


SOLVERS: dict[str, Callable[[Inputs], Epoch]] = {"dsgd": dsgd_epoch, "als": als_epoch}


def crossover(x: Inputs, max_workers: int = 1024) -> tuple[int | None, int | None]:
    """The fewest workers (1..max_workers) at which ALS's epoch is faster than DSGD's, and the fewest beyond
    that at which DSGD is faster again (None: never)."""
    als_from = dsgd_back = None
    for w in range(1, max_workers + 1):
        y = replace(x, workers=w)
        als_faster = als_epoch(y).seconds < dsgd_epoch(y).seconds
        if als_faster and als_from is None:
            als_from = w
        if als_from is not None and not als_faster:
            dsgd_back = w
            break
    return als_from, dsgd_back


def best_workers(fn: Callable[[Inputs], Epoch], x: Inputs, max_workers: int = 1024) -> tuple[int, float]:
    """The number of workers (1..max_workers) with the shortest epoch, and that epoch's seconds."""
    return min(((w, fn(replace(x, workers=w)).seconds) for w in range(1, max_workers + 1)), key=lambda t: t[1])


# ------------------------------------------------------------------------------------------------- measuring


def sample_data(n_users: int, n_items: int, n_ratings: int, seed: int = 0, rank: int = 0, world: int = 1):
    """Ratings on uniform users and Zipf-like (popularity ~ 1/i^0.8) items; this rank's rows r::world."""
    import numpy as np
    import torch

    from recdist.models.batch import Batch, Dims
    from recdist.train.data import RankData

    rng = np.random.default_rng(seed)
    pop = 1.0 / np.arange(1, n_items + 1) ** 0.8
    user = rng.integers(0, n_users, n_ratings)
    item = rng.permutation(n_items)[rng.choice(n_items, n_ratings, p=pop / pop.sum())]
    rating = np.clip(np.round(rng.normal(3.5, 1.0, n_ratings) * 2) / 2, 0.5, 5.0).astype(np.float32)
    mine = slice(rank, None, world)
    train = Batch(
        user=torch.from_numpy(user[mine].copy()), item=torch.from_numpy(item[mine].copy()),
        target=torch.from_numpy(rating[mine].copy()),
    )  # fmt: skip
    return RankData(train, None, None, Dims(n_users, n_items, global_mean=float(rating.mean())))


def make(solver: str, data, rank: int, threads: int = 1):
    """The real solver on `data`, biased MF at `rank`, built as make_solver builds it."""
    import torch

    from recdist.config import StageConfig, TrainConfig
    from recdist.train.run import build_model
    from recdist.train.solvers import Problem, make_solver

    torch.set_num_threads(threads)
    stage = StageConfig(model="biased_mf", params={"rank": rank}, train=TrainConfig(solver=solver, lr=0.01))
    model = build_model(stage, data.dims)
    return model, make_solver(Problem(model, stage.train, data))


def time_sgd(rank: int, n_ratings: int, repeats: int) -> float:
    """Ratings per CPU second of one core through SGDSolver.train_epoch on ml-20m's tables (best of `repeats`).

    CPU time, not wall time: on a shared machine a process gets a varying share of a core; the CPU seconds it
    used are what the work costs (cache and memory-bandwidth contention from the other jobs remain in it)."""
    data = sample_data(ML20M.n_users, ML20M.n_items, n_ratings)
    _, solver = make("sgd", data, rank)
    best = math.inf
    for e in range(repeats):
        t = time.process_time()
        solver.train_epoch(e)
        best = min(best, time.process_time() - t)
    return n_ratings / best


def time_als(rank: int, n_users: int, n_items: int, n_ratings: int, repeats: int) -> tuple[float, float]:
    """One core through ALSSolver.train_epoch, in CPU seconds, split at its collectives: (ratings/s through the
    Gram products, rows/s through the solves), each the best of `repeats` epochs."""
    from recdist.train import dist

    data = sample_data(n_users, n_items, n_ratings)
    _, solver = make("als", data, rank)
    marks: list[float] = []
    real_half, real_reduce = solver._half, dist.all_reduce_sum_

    def half(*args):
        marks.append(time.process_time())
        out = real_half(*args)
        marks.append(time.process_time())
        return out

    def reduce(tensor):
        marks.append(time.process_time())
        return real_reduce(tensor)

    solver._half, dist.all_reduce_sum_ = half, reduce
    try:
        grams, solves = [], []
        for e in range(repeats):
            marks.clear()
            solver.train_epoch(e)
            # per half: start, 3 collectives, end
            grams.append(sum(marks[i + 1] - marks[i] for i in (0, 5)))
            solves.append(sum(marks[i + 4] - marks[i + 3] for i in (0, 5)))
    finally:
        dist.all_reduce_sum_ = real_reduce
    return n_ratings / min(grams), (n_users + n_items) / min(solves)


def measure_rates(repeats: int = 3, sgd_ratings: int = 1_000_000) -> Rates:
    sgd = {k: time_sgd(k, sgd_ratings, repeats) for k in RANKS}
    als = {k: time_als(k, 8_000, 2_000, 200_000, repeats) for k in RANKS}
    return Rates(sgd, {k: v[0] for k, v in als.items()}, {k: v[1] for k, v in als.items()})


def load() -> str:
    return "load average " + ", ".join(f"{v:.1f}" for v in os.getloadavg())


# ------------------------------------------------------------------------------------------------- loopback


def _loopback_rank(rank: int, world: int, init: str, out: str, cfg: dict) -> None:
    """One gloo rank on loopback: the network's latency and bandwidth, then the real solver's epochs."""
    import torch
    import torch.distributed as tdist

    from recdist.train import dist

    tdist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.set_num_threads(1)
    result: dict = {}
    if world > 1:  # the ring's per-step latency from a 1-float all-reduce, bandwidth from a large one
        small, big = torch.zeros(1), torch.zeros(cfg["probe_bytes"] // 4)
        for _ in range(5):
            tdist.all_reduce(small)
        t = time.perf_counter()
        for _ in range(50):
            tdist.all_reduce(small)
        result["latency"] = (time.perf_counter() - t) / 50 / (2 * (world - 1))
        tdist.all_reduce(big)
        t = time.perf_counter()
        for _ in range(5):
            tdist.all_reduce(big)
        per = (time.perf_counter() - t) / 5 - 2 * (world - 1) * result["latency"]
        result["bandwidth"] = 2 * (world - 1) / world * big.numel() * 4 / max(per, 1e-9)
    data = sample_data(cfg["users"], cfg["items"], cfg["ratings"], rank=rank, world=world)
    spent = [0.0, 0.0, 0.0]  # wall waiting for the other ranks, wall in the all-reduce, CPU in both
    real = dist.all_reduce_sum_

    def timed(tensor):
        t, c = time.perf_counter(), time.process_time()
        if world > 1:  # the wait for ranks the (loaded) scheduler runs late, apart from the transfer
            tdist.barrier()
        t1 = time.perf_counter()
        out = real(tensor)
        t2 = time.perf_counter()
        spent[0] += t1 - t
        spent[1] += t2 - t1
        spent[2] += time.process_time() - c
        return out

    dist.all_reduce_sum_ = timed
    for solver_name in ("sgd", "als"):
        _, solver = make(solver_name, data, cfg["rank"])
        epochs = []
        for e in range(cfg["epochs"] + 1):  # epoch 0 warms up
            tdist.barrier()
            spent[:] = [0.0, 0.0, 0.0]
            cpu = time.process_time()
            seconds = solver.train_epoch(e)["seconds"]
            if e:  # wall, waiting, all-reduce, CPU outside the collectives
                epochs.append((seconds, spent[0], spent[1], time.process_time() - cpu - spent[2]))
        result[solver_name] = min(epochs)  # the best epoch: the machine is shared
        del solver
    if rank == 0:
        with open(out, "w") as f:
            json.dump(result, f)
    tdist.destroy_process_group()


def loopback(args, rates: Rates) -> list[dict]:
    """The real solvers on 1, 2 and 4 gloo ranks on this machine, beside the model's prediction."""
    import torch.multiprocessing as mp

    cfg = {"users": args.lb_users, "items": args.lb_items, "ratings": args.lb_ratings, "rank": 16,
           "epochs": 3, "probe_bytes": 8 << 20}  # fmt: skip
    shape = Shape("loopback", cfg["users"], cfg["items"], cfg["ratings"])
    cores = os.cpu_count() or 1
    rows = []
    for world in (1, 2, 4):
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "result.json")
            before = load()
            mp.spawn(_loopback_rank, args=(world, f"file://{tmp}/rendezvous", out, cfg), nprocs=world, join=True)
            got = json.load(open(out))
        net = {"bandwidth": got.get("bandwidth", 1e12), "latency": got.get("latency", 0.0)}
        for name, fn in SOLVERS.items():
            base = Inputs(shape, 16, world, rates, threads=1, **net)
            own, shared = fn(base), fn(replace(base, cores=cores))
            rows.append({"workers": world, "solver": name, "measured": got["sgd" if name == "dsgd" else "als"],
                         "own_cores": own, "shared": shared, "net": net, "load": before})  # fmt: skip
    return rows


# ------------------------------------------------------------------------------------------------- printing


def fmt_s(seconds: float) -> str:
    return f"{seconds:.3g} s" if seconds < 100 else f"{seconds:,.0f} s"


def fmt_b(nbytes: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= size:
            return f"{nbytes / size:.3g} {unit}"
    return f"{nbytes:.0f} B"


def print_rates(rates: Rates) -> None:
    print("Kernel rates per core, per CPU second (one thread, this machine, best of the repeats):")
    print("| rank | SGD M ratings/s | ALS Gram M ratings/s | ALS solves k rows/s |")
    print("|---:|---:|---:|---:|")
    for k in RANKS:
        sgd, gram, solve = rates.sgd_rows[k] / 1e6, rates.als_gram[k] / 1e6, rates.als_solve[k] / 1e3
        print(f"| {k} | {sgd:.1f} | {gram:.2f} | {solve:.0f} |")
    print()


def print_bytes(shape: Shape, threads: int) -> None:
    print(f"Bytes each rank passes to all-reduce per epoch, {shape.name} ({threads} threads per worker; the wire "
          "carries 2(W-1)/W of it):")  # fmt: skip
    print("| rank | solver | " + " | ".join(f"{w} workers" for w in WORKERS[1:]) + " |")
    print("|---:|---|" + "---:|" * (len(WORKERS) - 1))
    for k in RANKS:
        for name in ("DSGD", "ALS"):
            cells = []
            for w in WORKERS[1:]:
                if name == "DSGD":
                    sizes = dsgd_collectives(shape.n_users, shape.n_items, k, True, w, max(BASE_STRATA, w * threads))
                else:
                    sizes = als_collectives(shape.n_users, shape.n_items, k, True, w)
                cells.append(f"{fmt_b(sum(sizes))} in {len(sizes)}")
            print(f"| {k} | {name} | " + " | ".join(cells) + " |")
    print()


def print_table(shape: Shape, rates: Rates, args) -> None:
    print(f"{shape.name} ({shape.n_users:,} users x {shape.n_items:,} items, {shape.n_ratings:,} ratings), "
          f"{args.threads} cores per worker, {args.latency * 1e6:.0f} us per ring step: seconds per epoch "
          f"(compute + all-reduce), time to {args.epochs} epochs at the best count:")  # fmt: skip
    head = " | ".join(f"{w} workers" for w in WORKERS)
    print(
        f"| rank | Gbit/s | solver | {head} | fastest (1-1024 workers) | {args.epochs} epochs | "
        "memory/worker at 64 | ALS faster from |"
    )
    print("|---:|---:|---|" + "---:|" * len(WORKERS) + "---:|---:|---:|---|")
    for k in RANKS:
        for gbit in args.gbits:
            x = Inputs(shape, k, 1, rates, threads=args.threads, bandwidth=gbit * GBIT, latency=args.latency)
            als_from, dsgd_back = crossover(x)
            cross = "never" if als_from is None else f"{als_from} workers" + (
                f" (DSGD again from {dsgd_back})" if dsgd_back else "")  # fmt: skip
            for name, fn in (("DSGD", dsgd_epoch), ("ALS", als_epoch)):
                cells = []
                for w in WORKERS:
                    e = fn(replace(x, workers=w))
                    cells.append(f"{fmt_s(e.seconds)}" + (f" ({e.comm / e.seconds:.0%} comm)" if w > 1 else ""))
                w_best, s_best = best_workers(fn, x)
                mem = fn(replace(x, workers=64)).memory
                print(
                    f"| {k} | {gbit:g} | {name} | " + " | ".join(cells) + f" | {fmt_s(s_best)} at {w_best} | "
                    f"{fmt_s(args.epochs * s_best)} | {fmt_b(mem)} | {cross if name == 'ALS' else ''} |"
                )
    print()


def print_throughput(shape: Shape, rates: Rates, args) -> None:
    print(f"{shape.name}: throughput, epochs/s and the time to {args.epochs} epochs:")
    print("| rank | Gbit/s | solver | " + " | ".join(f"{w} workers" for w in WORKERS) + " |")
    print("|---:|---:|---|" + "---:|" * len(WORKERS))
    for k in RANKS:
        for gbit in args.gbits:
            x = Inputs(shape, k, 1, rates, threads=args.threads, bandwidth=gbit * GBIT, latency=args.latency)
            for name, fn in (("DSGD", dsgd_epoch), ("ALS", als_epoch)):
                secs = [fn(replace(x, workers=w)).seconds for w in WORKERS]
                cells = [f"{1 / t:.3g}/s, {fmt_s(args.epochs * t)}" for t in secs]
                print(f"| {k} | {gbit:g} | {name} | " + " | ".join(cells) + " |")
    print()


def print_alternatives(rates: Rates, args) -> None:
    print("Not implemented, for comparison (25 Gbit/s or the last --gbits, rank 64, seconds per epoch): DSGD passing "
          "changed item rows point to point to their next owner instead of all-reducing the table; ALS with the "
          "solves split over ranks (reduce-scatter Grams, all-gather factors):")  # fmt: skip
    gbit = args.gbits[-1]
    print("| data | solver | " + " | ".join(f"{w} workers" for w in WORKERS) + " |")
    print("|---|---|" + "---:|" * len(WORKERS))
    for shape in (ML20M, BIG):
        x = Inputs(shape, 64, 1, rates, threads=args.threads, bandwidth=gbit * GBIT, latency=args.latency)
        for name, fn in (("DSGD (as is)", dsgd_epoch), ("DSGD point to point", dsgd_p2p_epoch),
                         ("ALS (as is)", als_epoch), ("ALS split solves", als_split_epoch)):  # fmt: skip
            cells = [fmt_s(fn(replace(x, workers=w)).seconds) for w in WORKERS]
            print(f"| {shape.name} | {name} | " + " | ".join(cells) + " |")
    print()


def print_loopback(rows: list[dict]) -> None:
    cores = os.cpu_count() or 1
    print(
        f"Loopback: the real solvers (biased MF rank 16, no Ray) on W gloo ranks of 1 thread each on this machine's "
        f"{cores} cores (4 ranks oversubscribe them), best of 3 epochs; rank 0's wall time, its wait at a barrier "
        "put before each all-reduce (for ranks the scheduler runs late), the all-reduces themselves, and its CPU "
        "seconds outside them; beside the model with the kernel rates above and the loopback latency and bandwidth "
        "probed in the same process group:"
    )
    print(
        "| workers | solver | wall s/epoch | waiting | in all-reduce | CPU s outside | model: compute + comm "
        f"| model, {cores} cores shared | loopback latency, bandwidth | load before |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|---|---|")
    for r in rows:
        wall, wait, in_comm, cpu = r["measured"]
        own, shared, net = r["own_cores"], r["shared"], r["net"]
        link = "-" if r["workers"] == 1 else f"{net['latency'] * 1e6:.0f} us, {net['bandwidth'] / 1e9:.2f} GB/s"
        print(
            f"| {r['workers']} | {r['solver'].upper()} | {wall:.3f} | {wait:.3f} | {in_comm:.3f} | {cpu:.3f} | "
            f"{own.compute:.3f} + {own.comm:.3f} = {own.seconds:.3f} | {shared.seconds:.3f} | {link} | {r['load']} |"
        )
    print()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", help="JSON of measured rates: read if it exists, else measured and written there")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="cores per worker (default: this machine's 2)")
    ap.add_argument("--gbits", type=float, nargs="+", default=[10.0, 25.0], help="network bandwidths, Gbit/s")
    ap.add_argument("--latency", type=float, default=30e-6, help="seconds per ring step of a collective")
    ap.add_argument("--epochs", type=int, default=10, help="the fixed number of epochs timed")
    ap.add_argument("--loopback", action="store_true", help="run the real solvers on 1, 2, 4 gloo ranks too")
    ap.add_argument("--loopback-only", action="store_true", help="the loopback runs without the model's tables")
    ap.add_argument("--lb-users", type=int, default=40_000)
    ap.add_argument("--lb-items", type=int, default=8_000)
    ap.add_argument("--lb-ratings", type=int, default=1_000_000)
    args = ap.parse_args()

    print(f"{load()} before measuring ({os.cpu_count()} cores, shared with other jobs)\n")
    if args.rates and os.path.exists(args.rates):
        rates = Rates.from_json(json.load(open(args.rates)))
        print(f"rates from {args.rates}")
    else:
        rates = measure_rates(args.repeats)
        if args.rates:
            with open(args.rates, "w") as f:
                json.dump(asdict(rates), f)
        print(f"{load()} after timing the kernels")
    print_rates(rates)
    if not args.loopback_only:
        print_bytes(ML20M, args.threads)
        for shape in (ML20M, BIG):
            print_table(shape, rates, args)
            print_throughput(shape, rates, args)
        print_alternatives(rates, args)
    if args.loopback or args.loopback_only:
        print_loopback(loopback(args, rates))


if __name__ == "__main__":
    sys.exit(main())
