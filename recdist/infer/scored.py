"""Writing a scored table: a prepared or scored Parquet table in, the same rows out with prediction columns added.

The work of one pass, whatever runs it: `score_shard` turns input shard n into output shard n, `score_local` runs
it over every shard in this process (the bench's baseline), `recdist.infer.ray_data.score` on Ray Data tasks.
Both then `commit`: the feature steps asked for (the pipeline's session context) run over the written table,
users/items are copied, rows are counted, and the typed manifest is written last. The output is a "scored"
dataset (manifest.json + ratings/part-*.parquet + users/items), so the next stage trains on it directly.

A fold-in night's pass (`Delta`) writes a layered table instead: the previous run's table linked as it is, plus
a layer holding every rating of the users whose predictions moved; readers drop the rows a later layer
supersedes (recdist.data.dataset.shards). MAX_LAYERS bounds the chain: the pass after it writes a whole table.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from recdist import storage
from recdist.config import INFER_BATCH_SIZE, ClusterConfig
from recdist.data.dataset import Shard
from recdist.data.splits import split_is
from recdist.infer.plan import TrainedOn, plan_for, trained_on
from recdist.infer.scoring import Predictor, ScoringPlan, one_thread
from recdist.manifest import FileEntry, SampleInfo, SampleManifest, ScoredManifest, file_entries, relative
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


MAX_LAYERS = 8
"""A layered table with this many layers is written whole by the next pass over it (compacted): every layer is one
more file to read and a longer list of superseded users."""


@dataclass(frozen=True)
class Delta:
    """A fold-in night's pass over the users whose rows change: the previous run's scored table of the same stage
    is taken as it is (its files linked into this one: a hard link on a local disk, a server-side copy on S3) and
    every rating of `users` is computed into a new layer that supersedes their rows there
    (recdist.data.dataset.shards). A user with nothing new keeps every prediction of the night before: on a
    fold-in night the models' weights are those of the night before except the folded-in users' and movies'."""

    previous: str
    """The previous run's scored table of the same stage (committed, made from the dataset this one keeps the
    indices of)."""
    users: np.ndarray
    """bool per user index: the users whose rows are computed."""


def delta_users(previous_data: str, data: str, unchanged: np.ndarray) -> np.ndarray:
    """bool per user index of the dataset `data`: the users a Delta pass computes: those not `unchanged` (anything
    new, new users, gone users) and those who rated a movie trained on one day and not on the other (its
    predictions moved: a fold-in trains new movies only). `data` keeps `previous_data`'s indices."""
    from recdist.data.dataset import read_items, read_rank
    from recdist.train.warm import previous_rows

    sides = [read_items(uri).sort("item_idx") for uri in (previous_data, data)]
    movies = previous_rows(*(i["item_id"].to_numpy() for i in sides))
    trained = [i["n_train"].to_numpy() > 0 for i in sides]
    moved = np.ones(len(movies), bool)
    moved[movies >= 0] = trained[0][movies[movies >= 0]] != trained[1][movies >= 0]
    users = ~unchanged
    if moved.any():
        rated = read_rank(data, columns=["user_idx", "item_idx"])
        users[rated["user_idx"].to_numpy()[moved[rated["item_idx"].to_numpy()]]] = True
    return users


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
    delta: Delta | None = None
    """A fold-in night's pass: only its users' rows computed, as a layer over the previous run's table
    (score_local; Ray Data's pass computes every row)."""

    def plan(self, model_uri: str, data: str, device: str = "cpu") -> ScoringPlan:
        """The pass's scoring plan (reads `data` only when `trained` was not given)."""
        folds = len(self.fold_models)
        view = self.trained if self.trained is not None else trained_on(data, folds, self.fold_seed)
        return plan_for(
            view, model_uri, self.role, fold_models=self.fold_models, fallback_model=self.fallback_model, device=device
        )


def score_shard(
    predictor: Predictor,
    source: Shard,
    out: str,
    shard: int,
    batch_size: int,
    share: TrainShare | None = None,
) -> int:
    """Input shard `source` through the model: read it whole, score it in batches of Arrow rows, write
    OUT/ratings/part-<shard>.parquet with the input columns plus the role's (and OUT/sample/ratings/... with
    `share`); returns the rows written. The work of one Ray Data task."""
    return write_shard(scored_shard(predictor, source, batch_size), out, shard, share)


def scored_shard(predictor: Predictor, source: Shard, batch_size: int) -> pa.Table:
    """Input shard `source` with the role's columns added, in memory."""
    if source.drop is None:  # Polars' reader: the faster one for a whole file
        table = pl.read_parquet(source.uri, storage_options=_polars_storage(source.uri)).to_arrow()
    else:
        table = source.read()
    return scored_rows(predictor, table, storage.parquet_schema(source.uri), batch_size)


def scored_rows(predictor: Predictor, table: pa.Table, schema: pa.Schema, batch_size: int) -> pa.Table:
    """Rows of an input table (schema `schema`) with the role's columns added, scored in batches."""
    parts = [predictor(table.slice(lo, batch_size)) for lo in range(0, table.num_rows, batch_size)]
    scored = pa.concat_tables(parts) if parts else predictor(table)
    out = _scored_schema(schema, predictor.plan.role)
    return scored.select(out.names).cast(out)


def write_shard(scored: pa.Table, out: str, shard: int | str, share: TrainShare | None = None) -> int:
    """Write a scored shard as OUT/ratings/part-<shard>.parquet, or OUT/ratings/<shard> given a name (and its share
    as OUT/sample/ratings/...)."""
    name = shard if isinstance(shard, str) else f"part-{shard:05d}.parquet"
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

    With `options.delta` (a fold-in night): the previous table's files linked, and only the delta's users' rows
    scored (and given the features), as one more layer.
    """
    from concurrent.futures import ThreadPoolExecutor

    from recdist.data.dataset import shards

    opts = options or ScoreOptions()
    plan = opts.plan(model_uri, data, device="cuda" if opts.gpu else "cpu")
    predictor = Predictor(plan)
    t0 = time.perf_counter()
    with one_thread(), storage.staged_output(out, overwrite=opts.overwrite) as tmp:
        files = shards(data)
        steps: dict[str, float] = {}
        layers: list[dict[str, Any]] | None = None
        figures: dict[str, Any] = {"engine": "local"}
        with ThreadPoolExecutor(max(1, opts.workers)) as pool:
            if opts.delta is not None or opts.features:
                if opts.delta is not None:
                    layers = link_layers(opts.delta.previous, tmp, opts.share)
                    users = np.flatnonzero(opts.delta.users)
                    tables = [delta_rows(predictor, files, users, opts.batch_size)] if len(users) else []
                    names = [f"part-L{len(layers):03d}-00000.parquet"]
                else:
                    tables = list(pool.map(lambda source: scored_shard(predictor, source, opts.batch_size), files))
                    names = [f"part-{n:05d}.parquet" for n in range(len(tables))]
                for step in opts.features if tables else ():
                    clock = time.perf_counter()
                    tables = step.add(tables)
                    steps[step.name] = time.perf_counter() - clock
                list(pool.map(lambda n: write_shard(tables[n], tmp, names[n], opts.share), range(len(tables))))
                if layers is not None:
                    figures["computed"] = sum(t.num_rows for t in tables)
                    if tables:
                        layers.append(_write_layer_users(tmp, len(layers), users, opts.share) | {"files": names})
                del tables
                seconds = time.perf_counter() - t0 - sum(steps.values())  # scoring and writing, as Ray Data's
            else:
                list(
                    pool.map(
                        lambda n: score_shard(predictor, files[n], tmp, n, opts.batch_size, opts.share),
                        range(len(files)),
                    )
                )
                seconds = time.perf_counter() - t0
        result = commit(tmp, out, data, plan, model_uri, opts, seconds=seconds, steps=steps, layers=layers, **figures)
    return {**result, "out": out}


def link_layers(previous: str, tmp: str, share: TrainShare | None) -> list[dict[str, Any]]:
    """The previous scored table's files (and its sample's, with `share`) linked into the staging directory
    `tmp`, and its layers (a whole table: one layer of every file)."""
    from concurrent.futures import ThreadPoolExecutor

    layers, paths = layer_files(previous, share)
    with ThreadPoolExecutor(storage.shard_threads(len(paths))) as pool:
        list(pool.map(lambda p: storage.link(storage.join(previous, p), storage.join(tmp, p)), paths))
    return layers


def layer_files(table: str, share: TrainShare | None) -> tuple[list[dict[str, Any]], list[str]]:
    """A committed scored table's layers (a whole table: one layer of every file its manifest lists) and the paths
    a Delta pass links from it: its layers' ratings files and users (and its sample's, with `share`), relative to
    it."""
    from recdist.data.dataset import read_manifest

    manifest = read_manifest(table)
    listed = [
        e["path"].removeprefix("ratings/") for e in manifest.get("files") or () if e["path"].startswith("ratings/")
    ]
    layers = manifest.get("layers") or [{"files": listed or _parts(table), "users": None}]
    paths = [f"ratings/{name}" for layer in layers for name in layer["files"]]
    paths += [layer["users"] for layer in layers if layer["users"]]
    paths += [f"{SAMPLE}/{p}" for p in paths] if share is not None else []
    return [{"files": list(layer["files"]), "users": layer["users"]} for layer in layers], paths


def delta_rows(predictor: Predictor, files: list[Shard], users: np.ndarray, batch_size: int) -> pa.Table:
    """Every rating of `users` (sorted user indices) in the input `files`, scored: a file whose superseded users
    include them all is not read (a layered input's older layers)."""
    schema = storage.parquet_schema(files[0].uri)
    wanted = pa.array(users, schema.field("user_idx").type)
    read = [
        s.read(filters=pc.field("user_idx").isin(wanted))
        for s in files
        if s.drop is None or not np.isin(users, s.drop, assume_unique=True).all()
    ]
    return scored_rows(predictor, pa.concat_tables(read), schema, batch_size)


def _write_layer_users(tmp: str, layer: int, users: np.ndarray, share: TrainShare | None) -> dict[str, Any]:
    """The users of layer `layer` written beside the table (and its sample); the layer's `users` entry."""
    name = f"layers/L{layer:03d}.parquet"
    table = pa.table({"user_idx": pa.array(users, pa.int32())})
    for folder in (tmp, storage.join(tmp, SAMPLE)) if share is not None else (tmp,):
        storage.write_parquet(table, storage.join(folder, name))
    return {"users": name}


def commit(
    tmp: str,
    out: str,
    data: str,
    plan: ScoringPlan,
    model_uri: str,
    opts: ScoreOptions,
    *,
    steps: dict[str, float] | None = None,
    layers: list[dict[str, Any]] | None = None,
    **figures: Any,
) -> dict[str, Any]:
    """Finish a written pass in its staging directory `tmp` (committed to `out`): run the feature steps over the
    written table (unless `steps` gives their seconds: they ran in memory), copy users/items, check the rows,
    and write the sample's manifest and then the scored table's, last. `layers`: a layered table's (a Delta
    pass's; the linked files' entries are taken from the previous table's manifests, not hashed again).

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
    rows, parts = _count_rows(tmp, layers), _parts(tmp)
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
    dropped = ("files", "created_at", "sample", "scoring", "inputs", "layers")
    base = {k: v for k, v in source.items() if k not in dropped}
    links = {"scored_from": data, "model": model_uri, "fold_models": plan.models[1:]}
    scored = ScoredManifest.model_validate(
        {
            **base,
            "kind": "scored",
            "shards": len(parts),
            "scored_columns": sorted({*source.get("scored_columns", []), *added}),
            "scoring": result,
            "layers": layers,
            "shard_rows": None if layers else base.get("shard_rows"),  # the input's shards, not a layered table's files
            **_linked(links, out),
        }
    )
    known = _linked_entries(opts.delta.previous) if opts.delta is not None and layers else {}
    if opts.share is not None:
        links_sample = _linked(links, sample_dir(out))
        scored.sample = _write_sample(tmp, scored, opts.share, links_sample, known.get(SAMPLE))
    scored.files = file_entries(tmp, known=known.get(""))
    scored.write(tmp)
    return result


def _linked_entries(previous: str) -> dict[str, dict[str, FileEntry]]:
    """The file entries of a previous table's linked files (its layers' files and users), by path, for the table
    ("") and its sample (SAMPLE)."""
    found: dict[str, dict[str, FileEntry]] = {}
    for sub in ("", SAMPLE):
        folder = storage.join(previous, sub) if sub else previous
        if storage.exists(storage.join(folder, storage.MANIFEST)):
            entries = storage.read_json(storage.join(folder, storage.MANIFEST)).get("files") or []
            found[sub] = {
                e["path"]: FileEntry.model_validate(e)
                for e in entries
                if e["path"].startswith(("ratings/", "layers/")) and e.get("sha256")
            }
    return found


def _linked(links: dict[str, Any], base: str) -> dict[str, Any]:
    """The input and model URIs of a pass relative to the directory `base` (manifest.relative)."""
    return {
        "scored_from": relative(links["scored_from"], base),
        "model": relative(links["model"], base),
        "fold_models": [relative(m, base) for m in links["fold_models"]],
    }


def _write_sample(
    tmp: str,
    scored: ScoredManifest,
    share: TrainShare,
    links: dict[str, Any],
    known: dict[str, FileEntry] | None = None,
) -> SampleInfo:
    """The sample's manifest: the scored table's, with the sample's counts; returns what the scored one records."""
    folder = storage.join(tmp, SAMPLE)
    layers = [layer.model_dump() for layer in scored.layers] if scored.layers else None
    counts = _split_counts(folder, layers)
    info = SampleInfo(share=share.share, seed=share.seed, n_ratings=sum(counts.values()), splits=counts)
    fields = scored.model_dump(exclude={"shard_rows", "files", "created_at", "kind"})
    sample = SampleManifest.model_validate({**fields, **info.model_dump(), **links})
    sample.files = file_entries(folder, known=known)
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


def _count_rows(folder: str, layers: list[dict[str, Any]] | None = None) -> int:
    """Rows of FOLDER/ratings/*.parquet, from the files' footers; of a layered table, its current rows."""
    import pyarrow.parquet as pq

    from recdist.data.dataset import layer_shards

    if layers:
        return sum(s.read(["user_idx"]).num_rows for s in layer_shards(folder, layers))
    rows = 0
    for p in _parts(folder):
        afs, path = storage.arrow_filesystem(storage.join(folder, "ratings", p))
        with afs.open_input_file(path) as f:
            rows += pq.ParquetFile(f).metadata.num_rows
    return rows


def _split_counts(folder: str, layers: list[dict[str, Any]] | None = None) -> dict[str, int]:
    """Rows per split of the ratings/part-*.parquet under `folder` (reads the split column only; of a layered
    table, its current rows)."""
    from recdist.data.dataset import Shard, layer_shards

    counts = {"train": 0, "val": 0, "test": 0}
    whole = [Shard(storage.join(folder, "ratings", n)) for n in _parts(folder)]
    files = layer_shards(folder, layers) if layers else whole
    for shard in files:
        split = shard.read(["split"])["split"]
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
