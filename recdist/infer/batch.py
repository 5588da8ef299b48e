"""Batch inference: a prepared or scored Parquet table in, the same rows out with prediction columns added.

`score` runs Ray Data (read_parquet -> map_batches with an actor class that loads the models once ->
write_parquet); `score_local` does the same work with Polars and PyTorch in this process, as a baseline for
the bench and for small tables. The output is a "scored" dataset (manifest.json + ratings/part-*.parquet +
users/items), so the next stage trains on it directly.
"""

from __future__ import annotations

import math
import os
import time
from datetime import datetime, timezone
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from recdist import storage
from recdist.config import ClusterConfig
from recdist.infer.folds import fold_of, known_mask
from recdist.infer.scoring import ROLES, Predictor, ScoringPlan, role_of
from recdist.infer.tables import ROLE_COLUMNS, SCORED_EXTRA, SCORED_PARQUET


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
    return ScoringPlan(
        models=(model_uri, *fold_models),
        role=role,
        global_mean=mean,
        rating_scale=tuple(float(x) for x in manifest["rating_scale"]),  # type: ignore[arg-type]
        known_users=tuple(known_users),
        known_items=tuple(known_items),
        fallback_model=fallback_model,
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
    progress: bool = True,
) -> dict[str, Any]:
    """One Ray Data inference pass over `data` with the model at `model_uri`, committed to `out`.

    role: which columns to add (mf: mf_pred + error, reliability: pred_error, rating: pred_rating); default
    from the model (target "error" -> reliability, upstream -> rating, else mf). fold_models: cross-fitted
    stage-1 models, fold k scoring the train rows of fold k. fallback_model: the MF model whose biases
    build the cold-start prediction of a non-MF model. actors: scoring actors (default 1 per GPU, else one
    per 4 CPUs, at least 1). cluster: where to run (default $RAY_ADDRESS or a local cluster).
    Returns {rows, seconds, rows_per_s, files, out, role, columns, engine}.
    """
    import ray

    from recdist.data.dataset import read_manifest, shard_files
    from recdist.train.cluster import connect

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
    n_actors = actors or (int(resources.get("GPU", 1)) if use_gpu else max(1, int(resources.get("CPU", 1)) // 4))
    manifest = read_manifest(data)
    files = shard_files(data)
    afs, _ = storage.arrow_filesystem(data)
    schema = _scored_schema(_file_schema(files[0]), plan.role)
    t0 = time.perf_counter()
    with storage.staged_output(out, overwrite=overwrite) as tmp:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = progress
        ctx.print_on_execution_start = progress
        ctx.execution_options.preserve_order = True  # same rows in the same files: next stage trains reproducibly
        ds = ray.data.read_parquet([storage.arrow_filesystem(f)[1] for f in files], filesystem=afs,
                                   ray_remote_args={"num_cpus": _EXP.get("read_cpus", 1)})
        ratings = storage.join(tmp, "ratings")
        if _EXP.get("in_actor", False):
            ds = ds.map_batches(
                ScoreWriter,
                fn_constructor_args=(plan, ratings, schema),
                batch_size=batch_size,
                batch_format="pyarrow",
                zero_copy_batch=True,
                concurrency=n_actors,
                num_gpus=1 if use_gpu else 0,
                num_cpus=_EXP.get("actor_cpus", 1),
            )
            ds.materialize()
        else:
            ds = ds.map_batches(
                Predictor,
                fn_constructor_args=(plan,),
                batch_size=batch_size,
                batch_format="pyarrow",
                zero_copy_batch=True,
                concurrency=n_actors,
                num_gpus=1 if use_gpu else 0,
                num_cpus=_EXP.get("actor_cpus", 1),
            )
            ds.write_parquet(
                storage.arrow_filesystem(ratings)[1],
                filesystem=afs,
                filename_provider=_part_names(),
                mode=ray.data.SaveMode.OVERWRITE,
                min_rows_per_file=batch_size,
                ray_remote_args={"num_cpus": _EXP.get("write_cpus", 1)},
                **SCORED_PARQUET,
            )
        result = _finish(tmp, data, manifest, plan, model_uri, time.perf_counter() - t0, engine="ray-data")
    return {**result, "out": out}


_EXP: dict = {}


class ScoreWriter:
    """Ray Data actor: scores each batch (Predictor) and writes it as one Parquet file; returns {file, rows}.

    Writing in the actor keeps the scored rows out of the object store and needs no write tasks. Files are
    named by the batch's first (user_idx, item_idx), unique and the same in every run.
    """

    def __init__(self, plan: ScoringPlan, ratings: str, schema: pa.Schema):
        self.predictor, self.ratings, self.schema = Predictor(plan), ratings, schema

    def __call__(self, batch: pa.Table) -> pa.Table:
        scored = self.predictor(batch).select(self.schema.names).cast(self.schema)
        if scored.num_rows == 0:
            return pa.table({"file": pa.array([], pa.string()), "rows": pa.array([], pa.int64())})
        name = f"part-{scored['user_idx'][0].as_py():010d}-{scored['item_idx'][0].as_py():010d}.parquet"
        storage.write_parquet(scored, storage.join(self.ratings, name), **SCORED_PARQUET)
        return pa.table({"file": [name], "rows": [scored.num_rows]})


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
    progress: bool = False,
) -> dict[str, Any]:
    """The same pass as `score` without Ray: Polars reads a shard, PyTorch scores it, pyarrow writes it.

    `workers` shards at a time in threads of this process (Arrow, Polars, PyTorch and the MF kernel release
    the GIL), each scoring with one PyTorch thread; memory: `workers` shards. The bench's baseline for Ray Data.
    """
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from recdist.data.dataset import read_manifest, shard_files

    plan = plan_for(
        model_uri, data, role=role, fold_models=fold_models, fold_seed=fold_seed, fallback_model=fallback_model
    )
    predictor = Predictor(plan)
    manifest = read_manifest(data)
    threads = torch.get_num_threads()
    if workers > 1:
        torch.set_num_threads(1)
    t0 = time.perf_counter()
    try:
        with storage.staged_output(out, overwrite=overwrite) as tmp:

            def one(n: int, uri: str) -> None:
                table = pl.read_parquet(uri, storage_options=_polars_storage(uri)).to_arrow()
                schema = _scored_schema(_file_schema(uri), plan.role)
                parts = [predictor(table.slice(lo, batch_size)) for lo in range(0, table.num_rows, batch_size)]
                scored = pa.concat_tables(parts).select(schema.names).cast(schema)
                storage.write_parquet(scored, storage.join(tmp, "ratings", f"part-{n:05d}.parquet"), **SCORED_PARQUET)

            with ThreadPoolExecutor(max(1, workers)) as pool:
                list(pool.map(one, *zip(*enumerate(shard_files(data)), strict=True)))
            result = _finish(tmp, data, manifest, plan, model_uri, time.perf_counter() - t0, engine="local")
    finally:
        torch.set_num_threads(threads)
    return {**result, "out": out}


def _finish(
    tmp: str, data: str, manifest: dict[str, Any], plan: ScoringPlan, model_uri: str, seconds: float, *, engine: str
) -> dict[str, Any]:
    """Copy users/items, count what was written, and write the scored manifest last."""
    import pyarrow.parquet as pq

    for name in ("users.parquet", "items.parquet"):
        src = storage.join(data, name)
        if storage.exists(src):
            storage.write_bytes(storage.join(tmp, name), storage.read_bytes(src))
    parts = [p for p in storage.listdir(storage.join(tmp, "ratings")) if p.endswith(".parquet")]
    rows = 0
    for p in parts:
        afs, path = storage.arrow_filesystem(storage.join(tmp, "ratings", p))
        with afs.open_input_file(path) as f:
            rows += pq.ParquetFile(f).metadata.num_rows
    expected = int(manifest["n_ratings"])
    if rows != expected:
        raise RuntimeError(f"scoring wrote {rows} rows for {expected} input rows; not committing {tmp}")
    columns = sorted({*manifest.get("scored_columns", []), *ROLE_COLUMNS[plan.role], "cold"})
    result = {
        "rows": rows,
        "seconds": round(seconds, 3),
        "rows_per_s": round(rows / seconds) if seconds > 0 else math.inf,
        "files": len(parts),
        "role": plan.role,
        "columns": list(ROLE_COLUMNS[plan.role]) + ["cold"],
        "engine": engine,
    }
    storage.write_json(
        storage.join(tmp, storage.MANIFEST),
        {
            **manifest,
            "kind": "scored",
            "shards": len(parts),
            "scored_columns": columns,
            "scored_from": data,
            "model": model_uri,
            "fold_models": list(plan.models[1:]),
            "scoring": result,
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        },
    )
    return result


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


def _part_names() -> Any:
    """Ray Data output names part-<task>-<i>.parquet: sorted like the prepared shards (ratings/part-*)."""
    from ray.data.datasource import FilenameProvider

    class PartNames(FilenameProvider):
        def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
            return f"part-{task_index:05d}-{{i}}.parquet"

    return PartNames(file_format="parquet")
