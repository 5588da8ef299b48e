"""Batch inference on Ray Data: the only module of infer/ that knows Ray.

`score` runs a dataset of the input's shards through map_batches with Ray tasks (score_shards) that stream each
shard through the models in whole Arrow batches (scored.score_shard), writing output shard n for input shard n;
then scored.commit writes the manifest, as score_local does.

Why tasks and not an actor pool: an actor is a new process per pass (start-up, PyTorch import, model load: 7-9 s
of each quickstart stage), while Ray hands tasks to the job's idle worker processes, prestarted by the cluster
and kept between passes, so the three stages' passes share warm processes (PyTorch imported once). A pipeline
starts those of its first pass while stage 1 trains (`warm_workers`: tasks that need no CPU and do the imports),
so no pass of a run waits for them. Each process builds a pass's Predictor once (cached under the pass's key), as
an actor's constructor did.

Why one task per slot (CPU, or GPU), each scoring its run of consecutive shards, and not one task per shard:
between two tasks in the same process Ray Data spent 0.15-0.25 s (the task's result back to the executor, the
next one dispatched), 0.6 s of a 2.9 s pass over 8 shards on two cores; prepare writes shards of equal size, so
the slots stay balanced without handing out shards one at a time.

Why shards and not read_parquet -> map_batches -> write_parquet: on two cores that plan spent ~2 s listing
files, moved every scored row through the object store to separate write tasks (which starve once the actors
hold every CPU), and wrote unevenly sized files in a run-dependent order; 1:1 shards keep the layout the
trainers read by rank and make runs reproducible.
"""

from __future__ import annotations

import os
import time
import uuid
from typing import Any

import pyarrow as pa

from recdist import storage
from recdist.config import ClusterConfig
from recdist.data.dataset import Shard
from recdist.infer.scored import ScoreOptions, commit, score_shard
from recdist.infer.scoring import Predictor, ScoringPlan
from recdist.train.sampling import TrainShare


def score(model_uri: str, data: str, out: str, options: ScoreOptions | None = None) -> dict[str, Any]:
    """One Ray Data inference pass over `data` with the model at `model_uri`, committed to `out` (ScoreOptions
    says what it adds and how it runs). Returns {rows, seconds, rows_per_s, files, out, role, columns, engine,
    actors, actor_seconds, startup_seconds, ...}."""
    import ray

    from recdist.data.dataset import shards
    from recdist.train.cluster import connect

    opts = options or ScoreOptions()
    data, out = storage.absolute(data), storage.absolute(out)  # the actors' working directory is not ours
    connect(opts.cluster or ClusterConfig())
    use_gpu, slots = _slots(opts.gpu)
    plan = opts.plan(model_uri, data, device="cuda" if use_gpu else "cpu")
    files = shards(data)
    n_actors = max(1, min(opts.actors or slots, len(files)))
    t0, wall0 = time.perf_counter(), time.time()
    with ray.data.DataContext.current(_context()), storage.staged_output(out, overwrite=opts.overwrite) as tmp:
        # One block, so one task, per slot: each task scores its run of consecutive shards one after the other
        jobs = ray.data.from_items(
            [{"shard": n} for n in range(len(files))], override_num_blocks=n_actors
        )
        written = jobs.map_batches(
            score_shards,
            fn_args=(uuid.uuid4().hex, plan, tmp, opts.batch_size, files, opts.share),
            batch_size=None,  # the whole block
            batch_format="pyarrow",
            compute=ray.data.TaskPoolStrategy(size=n_actors),
            num_gpus=1 if use_gpu else 0,
            num_cpus=0 if use_gpu else 1,
        ).take_all()
        if len(written) != len(files):
            raise RuntimeError(f"the scoring actors wrote {len(written)} of {len(files)} shards")
        first, last = min(w["start"] for w in written), max(w["end"] for w in written)
        figures = {  # actor_seconds: from the first shard's start to the last one's end; before it, start-up
            "seconds": time.perf_counter() - t0,
            "engine": "ray-data",
            "actors": n_actors,
            "actor_seconds": round(last - first, 3),
            "startup_seconds": round(first - wall0, 3),
            "warmed_tasks": len({w["process"] for w in written if w["warmed"]}),  # ran in a warm_workers process
        }
        result = commit(tmp, out, data, plan, model_uri, opts, **figures)
    return {**result, "out": out}


def _slots(gpu: bool | None) -> tuple[bool, int]:
    """(score on GPUs, tasks at a time by default): one task per GPU when the pass uses them, else per CPU."""
    import ray

    resources = ray.cluster_resources()
    use_gpu = bool(resources.get("GPU", 0)) if gpu is None else gpu
    return use_gpu, int(resources.get("GPU", 1)) if use_gpu else int(resources.get("CPU", 1))


WARM_MODULES = ("ray.data", "recdist.infer.ray_data")
"""What a scoring task imports before its first shard (PyTorch, Polars, Arrow and numba among them)."""

_WARMED = False
"""Whether this worker process ran a warm-up task (a pass counts its tasks that began in such a process)."""


def warm_workers(actors: int | None = None, gpu: bool | None = None, shards: int | None = None) -> list[Any]:
    """Start the worker processes a later pass will score in, with its imports done: as many as the pass runs
    tasks at a time (`actors`, or one per GPU or CPU as `score` counts them, at most one per shard of its input,
    `shards`), on the nodes that have those GPUs
    or CPUs, each a task that needs no CPU, so that they run beside a stage that holds every CPU. A pipeline on
    Ray calls it before stage 1 trains: the processes start and import during the training (3-6 s of the first
    pass on two cores), and Ray hands the pass's tasks to them once idle. Returns the tasks' refs (each the
    process id it ran in)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    use_gpu, slots = _slots(gpu)
    wanted, unit = max(1, min(actors or slots, shards or slots)), "GPU" if use_gpu else "CPU"
    warm = ray.remote(num_cpus=0, max_retries=0)(_import_for_scoring)
    refs: list[Any] = []
    for node in (n for n in ray.nodes() if n.get("Alive")):
        here = min(int(node.get("Resources", {}).get(unit, 0)), wanted - len(refs))
        where = NodeAffinitySchedulingStrategy(node["NodeID"], soft=True)
        refs += [warm.options(scheduling_strategy=where).remote() for _ in range(here)]
    return refs


def _import_for_scoring() -> int:
    """A warm-up task: import WARM_MODULES in this worker process and load the compiled scoring kernel; its process
    id."""
    import importlib

    from recdist.infer.kernels import load_kernels

    global _WARMED
    for name in WARM_MODULES:
        importlib.import_module(name)
    load_kernels()
    _WARMED = True
    time.sleep(0.5)  # busy a moment: the other warm-up tasks go to other processes even where imports were done
    return os.getpid()


def _context() -> Any:
    """This pass's Ray Data settings: the current DataContext without the per-operator resource reservation.

    Its plan has one operator, whose concurrency TaskPoolStrategy caps at the slots, so the reservation divides
    nothing; but it sizes budgets from Ray Data's autoscaling coordinator, whose first answer arrives after the
    executor has read an empty reservation that it keeps for a second (ResourceManager's refresh interval), so
    in every pass after the cluster's first only one task started, the others a second later (~1 s of a 3 s
    pass on two cores). Ray still reserves each task's CPU (or GPU)."""
    import warnings

    import ray

    with warnings.catch_warnings():  # the copy sets every field again; Ray warns at each of its deprecated ones
        warnings.simplefilter("ignore", DeprecationWarning)
        context = ray.data.DataContext.get_current().copy()
    if hasattr(context, "op_resource_reservation_enabled"):
        context.op_resource_reservation_enabled = False
    return context


_PREDICTOR: dict[str, Predictor] = {}
"""This process's Predictor of the current pass (one entry: a new pass's key replaces it)."""


def score_shards(
    batch: pa.Table,
    key: str,
    plan: ScoringPlan,
    out: str,
    batch_size: int,
    sources: list[Shard],
    share: TrainShare | None = None,
) -> pa.Table:
    """Ray Data task: score whole shards (score_shard), one per input row (shard n: sources[n]); output shard n is
    ratings/part-n.parquet, so a scored table has the shards, row order and balance of its input: the next
    stage's ranks read it exactly as they read the prepared data, and a run is reproducible."""
    import torch

    if key not in _PREDICTOR:
        _PREDICTOR.clear()
        _PREDICTOR[key] = Predictor(plan)
    predictor, start = _PREDICTOR[key], time.time()  # before it: start-up (process, imports, models)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one CPU per task: the tasks, not PyTorch's threads, use the cores
    try:
        shards = batch["shard"].to_pylist()
        rows = [score_shard(predictor, sources[n], out, n, batch_size, share) for n in shards]
    finally:
        torch.set_num_threads(threads)
    n, end = len(rows), time.time()
    rows_written = pa.array(rows, pa.int64())
    task = {"start": [start] * n, "end": [end] * n, "process": [os.getpid()] * n, "warmed": [_WARMED] * n}
    return pa.table({"shard": batch["shard"], "rows": rows_written, **task})
