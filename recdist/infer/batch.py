"""Batch inference: a prepared or scored Parquet table in, the same rows out with prediction columns added.

`score` runs Ray Data: a dataset of the input's shards, map_batches with an actor class (ShardScorer) that
loads the models once and streams each shard through them in whole Arrow batches, writing output shard n for
input shard n. `score_local` does the same work (score_shard) in this process, the bench's baseline. The
output is a "scored" dataset (manifest.json + ratings/part-*.parquet + users/items), so the next stage trains
on it directly.

Why shards and not read_parquet -> map_batches -> write_parquet: on two cores that plan spent ~2 s listing
files, moved every scored row through the object store to separate write tasks (which starve once the actors
hold every CPU), and wrote unevenly sized files in a run-dependent order; 1:1 shards keep the layout the
trainers read by rank and make runs reproducible.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from recdist import storage
from recdist.config import ClusterConfig
from recdist.infer.folds import fold_of, in_share, known_mask
from recdist.infer.scoring import ROLES, Predictor, ScoringPlan, one_thread, role_of
from recdist.infer.session import DEFAULT_SESSION, SESSION_COLUMNS, SessionSpec, session_columns
from recdist.schema import ROLE_COLUMNS, SCORED_EXTRA, SCORED_PARQUET

SAMPLE = "sample"
"""Sub-directory of a scored table holding the TrainShare dataset, when one was asked for."""


def plan_for(
    model_uri: str,
    data: str,
    *,
    role: str | None = None,
    fold_models: tuple[str, ...] = (),
    fold_seed: int = 0,
    fallback_model: str | None = None,
    device: str = "cpu",
) -> ScoringPlan:
    """The scoring plan for a model over a dataset: cold-start masks from the dataset's training rows.

    The model is taken to have trained on the train split of `data` (or, for fold model k, on the train rows
    outside fold k); a user or item with no such row is cold for it.
    """
    from recdist.data.dataset import read_manifest, read_rank
    from recdist.models.io import load_model

    manifest = read_manifest(data)
    n_users, n_items = int(manifest["n_users"]), int(manifest["n_items"])
    if role is None:
        role = role_of(load_model(model_uri))
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; expected one of {ROLES}")
    mean = float(manifest["global_mean"])
    needs_rows = bool(fold_models) or not _has_counts(data)
    if needs_rows:
        train = read_rank(data, columns=["user_idx", "item_idx", "rating", "split"]).filter(
            pl.col("split").cast(pl.String) == "train"
        )
        user, item = train["user_idx"].to_numpy(), train["item_idx"].to_numpy()
        known_users, known_items = [known_mask(user, n_users)], [known_mask(item, n_items)]
        spread = float(((train["rating"].cast(pl.Float64) - mean) ** 2).mean() or 1.0)
    else:  # users/items.parquet count each one's training ratings: no need to read the ratings for the masks
        known_users, known_items = [_trained(data, "users", n_users)], [_trained(data, "items", n_items)]
        spread = _train_spread(data, mean)
    if fold_models:
        fold = fold_of(user, item, len(fold_models), fold_seed)
        for k in range(len(fold_models)):
            known_users.append(known_mask(user[fold != k], n_users))
            known_items.append(known_mask(item[fold != k], n_items))
    return ScoringPlan(  # absolute paths: the actors' working directory is not ours
        models=tuple(storage.absolute(m) for m in (model_uri, *fold_models)),
        role=role,
        global_mean=mean,
        rating_scale=tuple(float(x) for x in manifest["rating_scale"]),  # type: ignore[arg-type]
        known_users=tuple(known_users),
        known_items=tuple(known_items),
        fallback_model=storage.absolute(fallback_model) if fallback_model else None,
        cold_error=spread,
        fold_seed=fold_seed,
        device=device,
    )


def score(
    model_uri: str,
    data: str,
    out: str,
    *,
    batch_size: int = 262_144,
    overwrite: bool = False,
    role: str | None = None,
    fold_models: tuple[str, ...] = (),
    fold_seed: int = 0,
    fallback_model: str | None = None,
    actors: int | None = None,
    gpu: bool | None = None,
    cluster: ClusterConfig | None = None,
    share: TrainShare | None = None,
    session: SessionSpec | None = DEFAULT_SESSION,
) -> dict[str, Any]:
    """One Ray Data inference pass over `data` with the model at `model_uri`, committed to `out`.

    role: which columns to add (mf: mf_pred + error, reliability: pred_error, rating: pred_rating); default
    from the model (target "error" -> reliability, upstream -> rating, else mf). fold_models: cross-fitted
    stage-1 models, fold k scoring the train rows of fold k. fallback_model: the MF model whose biases
    build the cold-start prediction of a non-MF model. actors: scoring actors (default one per GPU, else one
    per CPU). cluster: where to run (default $RAY_ADDRESS or a local cluster). share: also write the sample/
    dataset of a share of the training rows (TrainShare). session: the session context a stage-1 pass (role
    mf; ignored for the others) adds for stages 2 and 3, None for none: a pass over the whole written table
    before the commit, timed apart (session_seconds; `seconds` and `rows_per_s` are the scoring pass's).
    Returns {rows, seconds, rows_per_s, files, out, role, columns, engine}.
    """
    import ray

    from recdist.data.dataset import read_manifest, shard_files
    from recdist.train.cluster import connect

    data, out = storage.absolute(data), storage.absolute(out)  # the actors' working directory is not ours
    connect(cluster or ClusterConfig())
    resources = ray.cluster_resources()
    use_gpu = bool(resources.get("GPU", 0)) if gpu is None else gpu
    plan = plan_for(
        model_uri,
        data,
        role=role,
        fold_models=fold_models,
        fold_seed=fold_seed,
        fallback_model=fallback_model,
        device="cuda" if use_gpu else "cpu",
    )
    manifest = read_manifest(data)
    files = shard_files(data)
    slots = int(resources.get("GPU", 1)) if use_gpu else int(resources.get("CPU", 1))
    n_actors = max(1, min(actors or slots, len(files)))
    t0, wall0 = time.perf_counter(), time.time()
    with storage.staged_output(out, overwrite=overwrite) as tmp:
        shards = ray.data.from_items(
            [{"shard": n, "source": f} for n, f in enumerate(files)], override_num_blocks=len(files)
        )
        written = shards.map_batches(
            ShardScorer,
            fn_constructor_args=(plan, tmp, batch_size, share),
            batch_size=1,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=n_actors),
            num_gpus=1 if use_gpu else 0,
            num_cpus=0 if use_gpu else 1,
        ).take_all()
        if sum(int(w["rows"]) for w in written) != int(manifest["n_ratings"]):
            raise RuntimeError(f"the scoring actors wrote {len(written)} of {len(files)} shards")
        first, last = min(w["start"] for w in written), max(w["end"] for w in written)
        extra = {  # actor_seconds: from the first shard's start to the last one's end; before it, start-up
            "actors": n_actors,
            "actor_seconds": round(last - first, 3),
            "startup_seconds": round(first - wall0, 3),
        }
        seconds = time.perf_counter() - t0
        result = _finish(
            tmp, data, manifest, plan, model_uri, seconds, engine="ray-data", share=share, session=session, **extra
        )
    return {**result, "out": out}


@dataclass(frozen=True)
class TrainShare:
    """Also write, beside a scored table, the dataset `sample/` of its training rows in a seeded `share` plus every
    validation row (no test row: the pipeline measures test itself): what stages 2 and 3 train on when they need
    not see every training rating."""

    share: float
    seed: int = 0

    def keep(self, table: pa.Table) -> pa.Array:
        user, item = (table[c].to_numpy() for c in ("user_idx", "item_idx"))
        split = table["split"].cast(pa.string())
        is_val = pc.equal(split, "val").to_numpy(zero_copy_only=False)
        is_train = pc.equal(split, "train").to_numpy(zero_copy_only=False)
        return pa.array(is_val | (is_train & in_share(user, item, self.share, self.seed)))


def score_shard(
    predictor: Predictor, source: str, out: str, shard: int, batch_size: int, share: TrainShare | None = None
) -> int:
    """Input shard `shard` through the model: read it whole (Polars), score it in batches of Arrow rows, write
    OUT/ratings/part-<shard>.parquet with the input columns plus the role's (and OUT/sample/ratings/... with
    `share`); returns the rows written. The work of one actor call."""
    table = pl.read_parquet(source, storage_options=_polars_storage(source)).to_arrow()
    schema = _scored_schema(_file_schema(source), predictor.plan.role)
    parts = [predictor(table.slice(lo, batch_size)) for lo in range(0, table.num_rows, batch_size)] or [
        predictor(table)
    ]
    scored = pa.concat_tables(parts).select(schema.names).cast(schema)
    name = f"part-{shard:05d}.parquet"
    storage.write_parquet(scored, storage.join(out, "ratings", name), **SCORED_PARQUET)
    if share is not None:
        sampled = scored.filter(share.keep(scored))
        storage.write_parquet(sampled, storage.join(out, SAMPLE, "ratings", name), **SCORED_PARQUET)
    return scored.num_rows


class ShardScorer:
    """Ray Data actor: loads the plan's models once, then scores whole shards (score_shard), one per call.

    Input rows are (shard, source); output shard n is ratings/part-n.parquet, so a scored table has the
    shards, row order and balance of its input: the next stage's ranks read it exactly as they read the
    prepared data, and a run is reproducible.
    """

    def __init__(self, plan: ScoringPlan, out: str, batch_size: int, share: TrainShare | None = None):
        import torch

        torch.set_num_threads(1)  # one CPU per actor: the actors, not PyTorch's threads, use the cores
        self.predictor, self.out, self.batch_size, self.share = Predictor(plan), out, batch_size, share

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows, start = [], time.time()
        for shard, source in zip(batch["shard"].to_pylist(), batch["source"].to_pylist(), strict=True):
            rows.append(score_shard(self.predictor, source, self.out, int(shard), self.batch_size, self.share))
        n, end = len(rows), time.time()
        return pa.table(
            {"shard": batch["shard"], "rows": pa.array(rows, pa.int64()), "start": [start] * n, "end": [end] * n}
        )


def score_local(
    model_uri: str,
    data: str,
    out: str,
    *,
    batch_size: int = 262_144,
    overwrite: bool = False,
    role: str | None = None,
    fold_models: tuple[str, ...] = (),
    fold_seed: int = 0,
    fallback_model: str | None = None,
    workers: int = 1,
    share: TrainShare | None = None,
    session: SessionSpec | None = DEFAULT_SESSION,
) -> dict[str, Any]:
    """The same pass as `score` without Ray: score_shard over the shards in this process.

    `workers` shards at a time in threads (Polars, Arrow, PyTorch and the MF kernel release the GIL), each
    with one PyTorch thread; memory: `workers` shards. The bench's baseline for Ray Data's overhead.
    """
    from concurrent.futures import ThreadPoolExecutor

    from recdist.data.dataset import read_manifest, shard_files

    plan = plan_for(
        model_uri, data, role=role, fold_models=fold_models, fold_seed=fold_seed, fallback_model=fallback_model
    )
    predictor = Predictor(plan)
    manifest = read_manifest(data)
    t0 = time.perf_counter()
    with one_thread():
        with storage.staged_output(out, overwrite=overwrite) as tmp:

            def one(n: int, source: str) -> int:
                return score_shard(predictor, source, tmp, n, batch_size, share)

            with ThreadPoolExecutor(max(1, workers)) as pool:
                list(pool.map(one, *zip(*enumerate(shard_files(data)), strict=True)))
            seconds = time.perf_counter() - t0
            result = _finish(
                tmp, data, manifest, plan, model_uri, seconds, engine="local", share=share, session=session
            )
    return {**result, "out": out}


def _finish(
    tmp: str,
    data: str,
    manifest: dict[str, Any],
    plan: ScoringPlan,
    model_uri: str,
    seconds: float,
    *,
    engine: str,
    share: TrainShare | None = None,
    session: SessionSpec | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Add the session columns when asked, copy users/items, count what was written, and write the scored
    manifest last (the sample's before it)."""
    import pyarrow.parquet as pq

    if plan.role != "mf":
        session = None  # computed from stage 1's residuals
    if session is not None:
        t0 = time.perf_counter()
        _write_session(tmp, session, share)
        extra["session_seconds"] = round(time.perf_counter() - t0, 3)

    for name in ("users.parquet", "items.parquet"):
        src = storage.join(data, name)
        if storage.exists(src):
            storage.write_bytes(storage.join(tmp, name), storage.read_bytes(src))
            if share is not None:
                storage.write_bytes(storage.join(tmp, SAMPLE, name), storage.read_bytes(src))
    parts = [p for p in storage.listdir(storage.join(tmp, "ratings")) if p.endswith(".parquet")]
    rows = 0
    for p in parts:
        afs, path = storage.arrow_filesystem(storage.join(tmp, "ratings", p))
        with afs.open_input_file(path) as f:
            rows += pq.ParquetFile(f).metadata.num_rows
    expected = int(manifest["n_ratings"])
    if rows != expected:
        raise RuntimeError(f"scoring wrote {rows} rows for {expected} input rows; not committing {tmp}")
    added = [*ROLE_COLUMNS[plan.role], "cold", *(SESSION_COLUMNS if session is not None else ())]
    columns = sorted({*manifest.get("scored_columns", []), *added})
    result = {
        "rows": rows,
        "seconds": round(seconds, 3),
        "rows_per_s": round(rows / seconds) if seconds > 0 else math.inf,
        "files": len(parts),
        "role": plan.role,
        "columns": added,
        "engine": engine,
        **extra,
    }
    scored_manifest = {
        **manifest,
        "kind": "scored",
        "shards": len(parts),
        "scored_columns": columns,
        "scored_from": data,
        "model": model_uri,
        "fold_models": list(plan.models[1:]),
    }
    if share is not None:
        counts = _split_counts(storage.join(tmp, SAMPLE))
        sample = {"share": share.share, "seed": share.seed, "n_ratings": sum(counts.values()), "splits": counts}
        scored_manifest["sample"] = sample
        storage.write_json(
            storage.join(tmp, SAMPLE, storage.MANIFEST),
            {**{k: v for k, v in scored_manifest.items() if k != "shard_rows"}, **sample, "kind": "scored-sample"},
        )
    storage.write_json(
        storage.join(tmp, storage.MANIFEST),
        {
            **scored_manifest,
            "scoring": result,
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        },
    )
    return result


def _write_session(folder: str, spec: SessionSpec, share: TrainShare | None) -> None:
    """Add SESSION_COLUMNS to every shard of a written scored table (and to its sample/): one read of the
    columns they need over all shards (a user's ratings sit in every shard), then each shard rewritten."""
    ratings = storage.join(folder, "ratings")
    names = [p for p in storage.listdir(ratings) if p.endswith(".parquet")]
    needed = ["user_idx", "timestamp", "split", "rating", "mf_pred"]
    frames = [pl.from_arrow(storage.read_parquet(storage.join(ratings, n), columns=needed)) for n in names]
    context = session_columns(pl.concat(frames), spec)
    start = 0
    for name, rows in zip(names, (f.height for f in frames), strict=True):
        table = storage.read_parquet(storage.join(ratings, name))
        part = context.slice(start, rows)
        start += rows
        for column in SESSION_COLUMNS:
            values = pa.array(part[column].to_numpy(), pa.float32())
            if column in table.column_names:
                table = table.set_column(table.column_names.index(column), column, values)
            else:
                table = table.append_column(column, values)
        storage.write_parquet(table, storage.join(ratings, name), **SCORED_PARQUET)
        if share is not None:
            sample = storage.join(folder, SAMPLE, "ratings", name)
            storage.write_parquet(table.filter(share.keep(table)), sample, **SCORED_PARQUET)


def _split_counts(folder: str) -> dict[str, int]:
    """Rows per split of the ratings/part-*.parquet under `folder` (reads the split column only)."""
    counts = {"train": 0, "val": 0, "test": 0}
    folder_ratings = storage.join(folder, "ratings")
    for name in storage.listdir(folder_ratings):
        split = storage.read_parquet(storage.join(folder_ratings, name), columns=["split"])["split"]
        for row in pc.value_counts(split.cast(pa.string())).to_pylist():
            counts[row["values"]] = counts.get(row["values"], 0) + int(row["counts"])
    return counts


def _has_counts(data: str) -> bool:
    return all(storage.exists(storage.join(data, f"{side}.parquet")) for side in ("users", "items"))


def _trained(data: str, side: str, size: int) -> np.ndarray:
    """bool (size,): the users (or items) with at least one training rating, from {side}.parquet's n_train."""
    table = storage.read_parquet(storage.join(data, f"{side}.parquet"), columns=[f"{side[:-1]}_idx", "n_train"])
    mask = np.zeros(size, dtype=bool)
    idx = table[f"{side[:-1]}_idx"].to_numpy()
    mask[idx] = table["n_train"].to_numpy() > 0
    return mask


def _train_spread(data: str, mean: float) -> float:
    """Mean squared deviation of the training ratings from the global mean: the error of the mean predictor."""
    from recdist.data.dataset import shard_files

    total, n = 0.0, 0
    for uri in shard_files(data):
        t = storage.read_parquet(uri, columns=["rating", "split"])
        is_train = pc.equal(t["split"].cast(pa.string()), "train")
        rating = pc.filter(t["rating"], is_train).to_numpy().astype(np.float64)
        total, n = total + float(((rating - mean) ** 2).sum()), n + len(rating)
    return total / n if n else 1.0


def _scored_schema(schema: pa.Schema, role: str) -> pa.Schema:
    """The input schema plus the role's columns and `cold`, in SCORED_EXTRA's types."""
    names = [*schema.names]
    for name in (*ROLE_COLUMNS[role], "cold"):
        if name not in names:
            names.append(name)
    extra = {f.name: f for f in SCORED_EXTRA}
    return pa.schema([extra.get(n) or schema.field(n) for n in names])


def _polars_storage(uri: str) -> dict[str, str] | None:
    """Polars' object-store options for s3:// from the standard AWS environment variables."""
    if not storage.is_s3(uri):
        return None
    keys = {
        "AWS_ACCESS_KEY_ID": "aws_access_key_id",
        "AWS_SECRET_ACCESS_KEY": "aws_secret_access_key",
        "AWS_ENDPOINT_URL": "aws_endpoint_url",
        "AWS_DEFAULT_REGION": "aws_region",
    }
    return {v: os.environ[k] for k, v in keys.items() if k in os.environ}


def _file_schema(uri: str) -> pa.Schema:
    import pyarrow.parquet as pq

    afs, path = storage.arrow_filesystem(uri)
    return pq.read_schema(path, filesystem=afs)
