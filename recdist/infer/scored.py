"""Writing a scored table: a prepared or scored Parquet table in, the same rows out with prediction columns added.

The work of one pass, whatever runs it: `score_shard` turns input shard n into output shard n, `score_local` runs
it over every shard in this process (the bench's baseline), `recdist.infer.ray_data.score` on Ray Data tasks.
Both then `commit`: the feature steps asked for (the pipeline's session context) run over the written table,
users/items are copied, rows are counted, and the typed manifest is written last. The output is a "scored"
dataset (manifest.json + ratings/part-*.parquet + users/items), so the next stage trains on it directly.
"""

from __future__ import annotations

import math
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import polars as pl
import pyarrow as pa

from recdist import storage
from recdist.config import INFER_BATCH_SIZE, ClusterConfig
from recdist.data.splits import split_is
from recdist.infer.plan import TrainedOn, plan_for, trained_on
from recdist.infer.scoring import Predictor, ScoringPlan, one_thread
from recdist.manifest import SampleInfo, SampleManifest, ScoredManifest, file_entries, relative
from recdist.schema import ROLE_COLUMNS, SCORED_EXTRA, SCORED_PARQUET
from recdist.train.sampling import SAMPLE, TrainShare


class FeatureStep(Protocol):
    """A pass over a whole scored table before its commit that adds row features (session.SessionStep): over
    the shards in memory (score_local) or over the written table (Ray Data's tasks write their shards)."""

    name: str
    columns: tuple[str, ...]

    def add(self, tables: list[pa.Table]) -> list[pa.Table]:
        """Every shard (in shard order) with `columns` added."""
        ...

    def __call__(self, folder: str, share: TrainShare | None) -> None:
        """Add `columns` to every shard under FOLDER/ratings (and to FOLDER/sample/ratings with `share`)."""
        ...


@dataclass(frozen=True)
class KeptRows:
    """A fold-in night's rows that its stage predicts as the night before (every rating of a user with nothing
    new, of a movie trained, or not, on both days alike): the pass reads their role columns from the previous run's
    scored table of the same stage instead of computing them. A row is found by position: both datasets are
    sorted by (user, movie) and sharded by recdist.data.prepare.shard_rows, and such a user's ratings are the same
    on both days, so their previous position is today's plus the user's `offset`."""

    previous: str
    """The previous run's scored table of the same stage."""
    users: np.ndarray
    """bool per user index: the users whose rows are taken."""
    items: np.ndarray
    """bool per item index: the movies whose rows may be taken."""
    offset: np.ndarray
    """int64 per user index: the previous position of the user's first rating minus today's."""
    layout: tuple[int, int, int]
    """Today's dataset: n_ratings, shards, shard_seed."""
    previous_layout: tuple[int, int, int]
    _columns: dict[str, np.ndarray] = field(default_factory=dict, compare=False, repr=False)
    _shards: dict[tuple[int, int, int], list[np.ndarray]] = field(default_factory=dict, compare=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, compare=False, repr=False)

    def rows(self, table: pa.Table, shard: int) -> tuple[np.ndarray, np.ndarray]:
        """(bool per row of today's shard `shard`: taken; the previous position of each taken row)."""
        user, item = (table[c].to_numpy() for c in ("user_idx", "item_idx"))
        take = self.users[user] & self.items[item]
        return take, self._positions(self.layout)[shard][take] + self.offset[user[take]]

    def _positions(self, layout: tuple[int, int, int]) -> list[np.ndarray]:
        """Each shard's rows in its dataset's order (recdist.data.prepare.shard_rows), computed once per layout."""
        from recdist.data.prepare import shard_rows

        with self._lock:
            if layout not in self._shards:
                self._shards[layout] = shard_rows(*layout)
            return self._shards[layout]

    def columns(self, names: list[str]) -> dict[str, np.ndarray]:
        """The previous table's columns `names` in its dataset order (read once per process: every shard, the
        columns alone)."""
        where = self._positions(self.previous_layout)
        with self._lock:
            missing = [n for n in names if n not in self._columns]
            if missing:
                folder = storage.join(self.previous, "ratings")
                parts = sorted(n for n in storage.listdir(folder) if n.endswith(".parquet"))
                for shard, name in enumerate(parts):
                    read = storage.read_parquet(storage.join(self.previous, "ratings", name), columns=missing)
                    for column in missing:
                        values = read[column].to_numpy(zero_copy_only=False)
                        if column not in self._columns:
                            self._columns[column] = np.empty(self.previous_layout[0], values.dtype)
                        self._columns[column][where[shard]] = values
            return {n: self._columns[n] for n in names}


def kept_rows(previous: str, previous_data: str, data: str, users: np.ndarray) -> KeptRows | None:
    """The KeptRows of a pass over the dataset `data` whose previous run's scored table of the same stage is
    `previous` (made from `previous_data`), for the users `users` (bool per user index, with nothing new); None when
    a dataset does not record what finding rows by position needs (shard_seed, users' n_ratings)."""
    from recdist.data.dataset import read_items, read_manifest, read_users
    from recdist.train.warm import previous_rows

    manifests = [read_manifest(uri) for uri in (previous_data, data)]
    sides = [(read_users(uri).sort("user_idx"), read_items(uri).sort("item_idx")) for uri in (previous_data, data)]
    if any(m.get("shard_seed") is None for m in manifests) or any("n_ratings" not in u.columns for u, _ in sides):
        return None
    rows = previous_rows(*(u["user_id"].to_numpy() for u, _ in sides))
    starts = [np.cumsum(u["n_ratings"].to_numpy().astype(np.int64)) - u["n_ratings"].to_numpy() for u, _ in sides]
    offset = np.where(rows >= 0, starts[0][np.maximum(rows, 0)] - starts[1], 0)
    movies = previous_rows(*(i["item_id"].to_numpy() for _, i in sides))
    trained = [i["n_train"].to_numpy() > 0 for _, i in sides]
    items = np.zeros(len(movies), bool)
    items[movies >= 0] = trained[0][movies[movies >= 0]] == trained[1][movies >= 0]
    layouts = [(int(m["n_ratings"]), int(m["shards"]), int(m["shard_seed"])) for m in manifests]
    return KeptRows(previous, users & (rows >= 0), items, offset, layouts[1], layouts[0])


@dataclass(frozen=True)
class ScoreOptions:
    """What a scoring pass computes and writes, and how it runs."""

    role: str | None = None
    """Which columns to add (mf: mf_pred + error, reliability: pred_error, rating: pred_rating); default from
    the model (target "error" -> reliability, upstream -> rating, else mf)."""
    fold_models: tuple[str, ...] = ()
    """Cross-fitted stage-1 models, fold k scoring the train rows of fold k."""
    fold_seed: int = 0
    fallback_model: str | None = None
    """The MF model whose biases build the cold-start prediction of a non-MF model."""
    trained: TrainedOn | None = None
    """The input's training rows as read once per run (plan.trained_on); read here when not given."""
    batch_size: int = INFER_BATCH_SIZE
    """Rows per Predictor call."""
    overwrite: bool = False
    share: TrainShare | None = None
    """Also write the sample/ dataset of a share of the training rows."""
    features: tuple[FeatureStep, ...] = field(default=())
    """Passes over the whole written table before the commit (the pipeline's stage 1: the session context),
    each timed apart (<name>_seconds; `seconds` and `rows_per_s` are the scoring pass's)."""
    actors: int | None = None
    """Ray Data: tasks at a time, each scoring its run of consecutive shards (default one per GPU, else one per
    CPU)."""
    gpu: bool | None = None
    """Ray Data: score on GPUs (default: when the cluster has some)."""
    cluster: ClusterConfig | None = None
    """Ray Data: where to run (default $RAY_ADDRESS or a local cluster)."""
    workers: int = 1
    """score_local: shards scored at a time, in threads."""
    kept: KeptRows | None = None
    """A fold-in night's rows taken from the previous run's table (score_local; Ray Data's pass computes all)."""

    def plan(self, model_uri: str, data: str, device: str = "cpu") -> ScoringPlan:
        """The pass's scoring plan (reads `data` only when `trained` was not given)."""
        folds = len(self.fold_models)
        view = self.trained if self.trained is not None else trained_on(data, folds, self.fold_seed)
        return plan_for(
            view, model_uri, self.role, fold_models=self.fold_models, fallback_model=self.fallback_model, device=device
        )


def score_shard(
    predictor: Predictor,
    source: str,
    out: str,
    shard: int,
    batch_size: int,
    share: TrainShare | None = None,
    kept: KeptRows | None = None,
) -> int:
    """Input shard `shard` through the model: read it whole (Polars), score it in batches of Arrow rows, write
    OUT/ratings/part-<shard>.parquet with the input columns plus the role's (and OUT/sample/ratings/... with
    `share`); returns the rows written. The work of one Ray Data task."""
    return write_shard(scored_shard(predictor, source, batch_size, kept, shard), out, shard, share)


def scored_shard(
    predictor: Predictor, source: str, batch_size: int, kept: KeptRows | None = None, shard: int = 0
) -> pa.Table:
    """Input shard `source` (shard number `shard`) with the role's columns added, in memory; with `kept`, the
    kept rows' from the previous run's table and the others' computed."""
    table = pl.read_parquet(source, storage_options=_polars_storage(source)).to_arrow()
    schema = _scored_schema(storage.parquet_schema(source), predictor.plan.role)
    take, before = kept.rows(table, shard) if kept is not None else (None, None)
    rest = table if take is None else table.filter(pa.array(~take))
    parts = [predictor(rest.slice(lo, batch_size)) for lo in range(0, rest.num_rows, batch_size)] or [predictor(rest)]
    scored = pa.concat_tables(parts)
    if kept is not None and take is not None and take.any():
        added = [*ROLE_COLUMNS[predictor.plan.role], "cold"]  # what the predictor adds, or updates (cold)
        taken = kept.columns(added)
        for name in added:
            computed = scored[name].to_numpy(zero_copy_only=False)
            values = np.empty(table.num_rows, computed.dtype)
            values[take], values[~take] = taken[name][before], computed
            at = table.column_names.index(name) if name in table.column_names else None
            column = pa.array(values)
            table = table.append_column(name, column) if at is None else table.set_column(at, name, column)
        scored = table
    return scored.select(schema.names).cast(schema)


def write_shard(scored: pa.Table, out: str, shard: int, share: TrainShare | None = None) -> int:
    """Write a scored shard as OUT/ratings/part-<shard>.parquet (and its share as OUT/sample/ratings/...)."""
    name = f"part-{shard:05d}.parquet"
    storage.write_parquet(scored, storage.join(out, "ratings", name), **SCORED_PARQUET)
    if share is not None:
        sampled = scored.filter(share.keep(scored))
        storage.write_parquet(sampled, storage.join(out, SAMPLE, "ratings", name), **SCORED_PARQUET)
    return scored.num_rows


def score_local(model_uri: str, data: str, out: str, options: ScoreOptions | None = None) -> dict[str, Any]:
    """The same pass as ray_data.score without Ray: score_shard over the shards in this process (the same table,
    byte for byte). The pipeline's engine where its stages train in this process (one worker on this machine:
    cluster.in_process), and the bench's baseline for Ray Data's overhead.

    `options.workers` shards at a time in threads (Polars, Arrow, PyTorch and the MF kernel release the GIL),
    each with one PyTorch thread; memory: `workers` shards; on a GPU with `options.gpu`. With feature steps
    (stage 1's session context) every scored shard stays in memory until the steps have added their columns,
    then each is written once (memory: the whole scored table, ~1 GB at 20M ratings), where Ray Data's pass
    writes its shards and the steps read them back and rewrite them.
    """
    from concurrent.futures import ThreadPoolExecutor

    from recdist.data.dataset import shard_files

    opts = options or ScoreOptions()
    plan = opts.plan(model_uri, data, device="cuda" if opts.gpu else "cpu")
    predictor = Predictor(plan)
    t0 = time.perf_counter()
    with one_thread(), storage.staged_output(out, overwrite=opts.overwrite) as tmp:
        files = shard_files(data)
        steps: dict[str, float] = {}
        with ThreadPoolExecutor(max(1, opts.workers)) as pool:
            if opts.features:
                tables = list(pool.map(lambda source: scored_shard(predictor, source, opts.batch_size), files))
                for step in opts.features:
                    clock = time.perf_counter()
                    tables = step.add(tables)
                    steps[step.name] = time.perf_counter() - clock
                list(pool.map(lambda n: write_shard(tables[n], tmp, n, opts.share), range(len(tables))))
                del tables
                seconds = time.perf_counter() - t0 - sum(steps.values())  # scoring and writing, as Ray Data's
            else:
                list(
                    pool.map(
                        lambda n: score_shard(predictor, files[n], tmp, n, opts.batch_size, opts.share, opts.kept),
                        range(len(files)),
                    )
                )
                seconds = time.perf_counter() - t0
        result = commit(tmp, out, data, plan, model_uri, opts, seconds=seconds, engine="local", steps=steps)
    return {**result, "out": out}


def commit(
    tmp: str,
    out: str,
    data: str,
    plan: ScoringPlan,
    model_uri: str,
    opts: ScoreOptions,
    *,
    steps: dict[str, float] | None = None,
    **figures: Any,
) -> dict[str, Any]:
    """Finish a written pass in its staging directory `tmp` (committed to `out`): run the feature steps over the
    written table (unless `steps` gives their seconds: they ran in memory), copy users/items, check the rows,
    and write the sample's manifest and then the scored table's, last.

    figures: seconds and engine of the scoring pass, plus the engine's own (actors, ...). Returns the pass's
    figures: rows, seconds, rows_per_s, files, role, columns, engine, ...
    """
    from recdist.data.dataset import read_manifest

    extra: dict[str, Any] = {}
    for step in opts.features:
        if steps:
            extra[f"{step.name}_seconds"] = round(steps[step.name], 3)
            continue
        t0 = time.perf_counter()
        step(tmp, opts.share)
        extra[f"{step.name}_seconds"] = round(time.perf_counter() - t0, 3)
    _copy_sides(data, tmp, opts.share)
    source = read_manifest(data)
    rows, parts = _count_rows(tmp), _parts(tmp)
    if rows != int(source["n_ratings"]):
        raise RuntimeError(f"scoring wrote {rows} rows for {source['n_ratings']} input rows; not committing {tmp}")
    added = [*ROLE_COLUMNS[plan.role], "cold", *(c for step in opts.features for c in step.columns)]
    seconds = float(figures.pop("seconds"))
    result = {
        "rows": rows,
        "seconds": round(seconds, 3),
        "rows_per_s": round(rows / seconds) if seconds > 0 else math.inf,
        "files": len(parts),
        "role": plan.role,
        "columns": added,
        **figures,
        **extra,
    }
    base = {k: v for k, v in source.items() if k not in ("files", "created_at", "sample", "scoring", "inputs")}
    links = {"scored_from": data, "model": model_uri, "fold_models": plan.models[1:]}
    scored = ScoredManifest.model_validate(
        {
            **base,
            "kind": "scored",
            "shards": len(parts),
            "scored_columns": sorted({*source.get("scored_columns", []), *added}),
            "scoring": result,
            **_linked(links, out),
        }
    )
    if opts.share is not None:
        scored.sample = _write_sample(tmp, scored, opts.share, _linked(links, sample_dir(out)))
    scored.files = file_entries(tmp)
    scored.write(tmp)
    return result


def _linked(links: dict[str, Any], base: str) -> dict[str, Any]:
    """The input and model URIs of a pass relative to the directory `base` (manifest.relative)."""
    return {
        "scored_from": relative(links["scored_from"], base),
        "model": relative(links["model"], base),
        "fold_models": [relative(m, base) for m in links["fold_models"]],
    }


def _write_sample(tmp: str, scored: ScoredManifest, share: TrainShare, links: dict[str, Any]) -> SampleInfo:
    """The sample's manifest: the scored table's, with the sample's counts; returns what the scored one records."""
    folder = storage.join(tmp, SAMPLE)
    counts = _split_counts(folder)
    info = SampleInfo(share=share.share, seed=share.seed, n_ratings=sum(counts.values()), splits=counts)
    fields = scored.model_dump(exclude={"shard_rows", "files", "created_at", "kind"})
    sample = SampleManifest.model_validate({**fields, **info.model_dump(), **links})
    sample.files = file_entries(folder)
    sample.write(folder)
    return info


def sample_dir(scored: str) -> str:
    """Where a scored table's TrainShare sample is."""
    return storage.join(scored, SAMPLE)


def _copy_sides(data: str, tmp: str, share: TrainShare | None) -> None:
    """users.parquet and items.parquet of the input into the scored table (and its sample)."""
    for name in ("users.parquet", "items.parquet"):
        src = storage.join(data, name)
        if storage.exists(src):
            storage.write_bytes(storage.join(tmp, name), storage.read_bytes(src))
            if share is not None:
                storage.write_bytes(storage.join(tmp, SAMPLE, name), storage.read_bytes(src))


def _parts(folder: str) -> list[str]:
    return [p for p in storage.listdir(storage.join(folder, "ratings")) if p.endswith(".parquet")]


def _count_rows(folder: str) -> int:
    """Rows of FOLDER/ratings/*.parquet, from the files' footers."""
    import pyarrow.parquet as pq

    rows = 0
    for p in _parts(folder):
        afs, path = storage.arrow_filesystem(storage.join(folder, "ratings", p))
        with afs.open_input_file(path) as f:
            rows += pq.ParquetFile(f).metadata.num_rows
    return rows


def _split_counts(folder: str) -> dict[str, int]:
    """Rows per split of the ratings/part-*.parquet under `folder` (reads the split column only)."""
    counts = {"train": 0, "val": 0, "test": 0}
    folder_ratings = storage.join(folder, "ratings")
    for name in storage.listdir(folder_ratings):
        split = storage.read_parquet(storage.join(folder_ratings, name), columns=["split"])["split"]
        for value in counts:
            counts[value] += int(split_is(split, value).sum())
    return counts


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
