"""Typed manifests: the manifest.json a committed directory is written with (last: it marks the commit).

Each kind is a pydantic model: a prepared dataset (`DatasetManifest`, also a cross-fitting fold's training set), a
scored table (`ScoredManifest`) and the share of it stages 2 and 3 may train on (`SampleManifest`), a pipeline
stage (`StageManifest`), the analyst outputs (`OutputsManifest`) and a run (`RunManifest`). Every manifest
lists its `files` (path relative to the directory, rows for Parquet tables, bytes); paths to other
directories of the same run are relative to the manifest's own directory where they share a root.

Readers of manifests written before these models (no `files`, fewer keys) keep working: every field added
since has a default, and keys a model does not declare are kept as they are (`extra="allow"`).
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from recdist import storage
from recdist.schema import SCHEMA_VERSION

M = TypeVar("M", bound="Manifest")


def now() -> str:
    """The current UTC time as manifests record it."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class FileEntry(BaseModel):
    """One file of a committed directory."""

    path: str
    """Relative to the directory holding the manifest, with `/` separators."""
    bytes: int
    rows: int | None = None
    """Rows of a Parquet table; None for other files."""
    sha256: str | None = None
    """The file's checksum (recdist.integrity); None in manifests written before checksums."""


class Manifest(BaseModel):
    """What every manifest holds."""

    model_config = ConfigDict(extra="allow")

    schema_version: int = SCHEMA_VERSION
    kind: str
    files: list[FileEntry] = []
    created_at: str = Field(default_factory=now)
    inputs: dict[str, str] = {}
    """The committed directories this one was made from (relative path -> sha256 of their manifest.json when
    it was made): recdist.integrity refuses it as stale when one of them was redone since."""

    def write(self, folder: str) -> None:
        """Write FOLDER/manifest.json (last, when it commits the folder)."""
        storage.write_json(storage.join(folder, storage.MANIFEST), self.model_dump(mode="json"))

    @classmethod
    def read(cls: type[M], folder: str) -> M:
        return cls.model_validate(storage.read_json(storage.join(folder, storage.MANIFEST)))


class Crossfit(BaseModel):
    """Where a fold model's training set comes from."""

    source: str
    held_out_fold: int
    folds: int
    seed: int


class DatasetManifest(Manifest):
    """A prepared dataset (README, "Prepared dataset layout")."""

    kind: str = "dataset"
    name: str | None = None
    """The source's release name (e.g. ml-20m, synthetic), if it has one."""
    n_users: int
    """Users after filtering: user_idx runs 0..n_users-1 (users.parquet)."""
    n_items: int
    """Movies after filtering: item_idx runs 0..n_items-1 (items.parquet)."""
    n_ratings: int
    """Ratings in all shards, every split."""
    splits: dict[str, int]
    """Ratings per split (train, val, test)."""
    rating_scale: tuple[float, float]
    """(lowest, highest) rating the source allows: predictions are clipped to it."""
    global_mean: float
    """Mean training rating: every model's starting point."""
    timestamp_unit: str | None = None
    """The unit the source's timestamps were found in (s, ms, us, ns; stored as seconds); None without them."""
    val_carved_from_train: float | None = None
    """The share of a given training file carved out as validation (split `given` without a val file)."""
    source_checksum: str | None = None
    """md5: of a release zip GroupLens publishes one for, else sha256: of the input files; synth: for synthetic."""
    config_hash: str | None = None
    """`Config.dataset_hash()`: of the source, prepare and (synthetic) synth sections the data was made from."""
    shards: int = 1
    """Number of ratings/part-NNNNN.parquet files."""
    shard_rows: list[int] | None = None
    """Rows of each shard, in shard order."""
    shard_seed: int | None = None
    """The seed of the shards' rotation (recdist.data.prepare.shard_rows): with n_ratings and shards, which shard
    row is which row of the dataset's order (user, movie). None: a dataset prepared before it was recorded."""
    split_method: str | None = None
    """prepare.split: random, user, time, user_time or given."""
    split_rule: dict[str, Any] | None = None
    """The rule every rating's split follows from its original ids alone (recdist.data.splits.split_rule: a random
    split's method, seed and fractions), None when some split does not (another method, or a split kept from a
    previous dataset that today's rule would not give). A `--previous` of this dataset with the same rule reads
    none of its splits."""
    previous: str | None = None
    """The dataset whose id maps and splits this one kept (prepare --previous), if any."""
    n_raw: int | None = None
    """Rows read from the source, before de-duplication and filtering."""
    duplicates_resolved: int | None = None
    """Repeated (user, movie) ratings collapsed into one."""
    filtered: dict[str, Any] | None = None
    """Rows, users and movies removed by each filter."""
    crossfit: Crossfit | None = None
    """Set on a fold model's training set: the dataset it was cut from and the fold held out."""


class SampleInfo(BaseModel):
    """The seeded share of training rows (and every validation row) written beside a scored table."""

    share: float
    seed: int
    n_ratings: int
    splits: dict[str, int]


class Layer(BaseModel):
    """Files of a layered scored table (recdist.data.dataset.shards) written by one pass: a fold-in night's pass
    links the previous run's layers and adds one holding every rating of the users whose rows it computed."""

    files: list[str]
    """Names under ratings/ (and sample/ratings/)."""
    users: str | None = None
    """The layer's users (a user_idx column), relative to the table; None for the first layer (every user). A
    user's rows in an older layer are superseded by a later layer listing the user."""


class ScoredManifest(DatasetManifest):
    """A scored table: its input's rows and columns plus the prediction columns of one pass."""

    kind: str = "scored"
    scored_columns: list[str] = []
    scored_from: str | None = None
    """The input table, relative to this directory where they share a root."""
    model: str | None = None
    fold_models: list[str] = []
    sample: SampleInfo | None = None
    scoring: dict[str, Any] = {}
    """The pass's figures: rows, seconds, rows_per_s, role, columns, engine, ..."""
    layers: list[Layer] | None = None
    """Set on a layered table (a fold-in night's): its files oldest first; unset, every file under ratings/ is
    current. Read it through recdist.data.dataset.shards (or read_rank), which drops superseded rows."""


class SampleManifest(ScoredManifest):
    """sample/ of a scored table: what stages 2 and 3 train on with pipeline.train_share below 1."""

    kind: str = "scored-sample"
    share: float
    seed: int


class StageManifest(Manifest):
    """RUN/<stage>/: a trained model and its scored table, committed together."""

    kind: str = "stage"
    stage: str
    stage_hash: str
    config: dict[str, Any] = {}
    model: str = "model"
    scored: str = "scored"
    train: dict[str, Any] = {}
    scoring: dict[str, Any] = {}
    crossfit_folds: int | None = None
    warm_start: dict[str, Any] | None = None
    """The stage's warm start (recdist.train.warm.WarmStart), if any: the previous run's model it started from."""
    warm_fallback: dict[str, Any] | None = None
    """Set when the warm fit came out worse than the previous model (pipeline.warm.tolerance) and the stage was
    refit cold: both validation RMSEs, the tolerance, the warm fit's epochs and seconds."""


class RunModels(BaseModel):
    """What a run's outputs are built from: the prepared data, the final scored table and the models (URIs)."""

    model_config = ConfigDict(frozen=True)

    data: str
    """The prepared dataset (users.parquet / items.parquet hold the original ids and titles)."""
    scored: str
    """The final scored table: every rating with all prediction columns."""
    final: str
    """The model whose pred_rating is final: stage 3, or the single model."""
    mf: str | None = None
    """The stage-1 MF (RNCF), or the single model when it has factors (candidates, item factors, fold-in)."""
    reliability: str | None = None
    """Stage 2 (RNCF only)."""
    histories: dict[str, str] = {}
    """Stage name -> trained model directory (history.parquet, learning_curve.png)."""

    def relative_to(self, run: str) -> RunModels:
        """Paths inside the run directory `run` relative to it, the rest as they are (the run can be moved)."""
        inside = storage.absolute(run).rstrip("/") + "/"
        return self._mapped(lambda uri: relative(uri, run) if storage.absolute(uri).startswith(inside) else uri)

    def resolved(self, run: str) -> RunModels:
        """The inverse of `relative_to`: relative paths as URIs under the run directory `run`."""
        return self._mapped(lambda path: resolve(path, run))

    def _mapped(self, path: Callable[[str], str]) -> RunModels:
        fields = {k: v if v is None or k == "histories" else path(v) for k, v in self.model_dump().items()}
        return RunModels(**{**fields, "histories": {k: path(v) for k, v in self.histories.items()}})


class OutputsManifest(Manifest):
    """RUN/outputs/: the analyst tables (a folder each), metrics.json, the report, SCHEMA.md; `_SUCCESS` follows
    it (recdist.tables)."""

    kind: str = "stage"
    stage: str = "outputs"
    stage_hash: str
    models: RunModels
    """Paths inside the run relative to it (`RunModels.relative_to`)."""
    top_n: int
    candidates: int
    recommend_min_ratings: int = 1
    ranking: dict[str, Any] | None = None
    """How the recommendations were ranked (recdist.infer.outputs.ranking_settings); None: before EASE."""
    similar_k: int | None = None
    similar_min_ratings: int = 1
    report: str | None = None


class RunManifest(Manifest):
    """RUN/manifest.json: the stages done, their hashes and times."""

    kind: str = "run"
    run_id: str | None = None
    """Kept across resumes; stamped into every output file (recdist.tables.Stamp). None: runs before it."""
    pipeline: str
    config_hash: str
    data: str
    stages: dict[str, Any] = {}
    status: str = "running"
    log: str | None = None
    seconds: float | None = None
    report: str | None = None
    warm_start: dict[str, Any] | None = None
    """Stage 1's warm start (recdist.train.warm.WarmStart), if any: retention never deletes its source run."""


def file_entries(
    folder: str, names: list[str] | None = None, known: dict[str, FileEntry] | None = None
) -> list[FileEntry]:
    """The FileEntry of each file under `folder` (recursively; or of `names`, relative to it), with its sha256;
    manifest.json left out, and a sub-directory committed on its own (holding a manifest.json) listed by its
    manifest alone (recdist.integrity verifies it through that entry). Files are hashed a few at a time, in
    threads (hashlib and the reads release the GIL): a scored table's 670 MB at 20M ratings, 1.6 GB/s per core.
    `known`: entries by path of files linked unchanged from another committed directory, taken as they are."""
    from concurrent.futures import ThreadPoolExecutor

    names = sorted(_walk(folder, "")) if names is None else names
    with ThreadPoolExecutor(storage.shard_threads(len(names))) as pool:
        return list(pool.map(lambda name: (known or {}).get(name) or _entry(folder, name), names))


def relative(uri: str, base: str) -> str:
    """`uri` relative to the directory `base` when both are local or both in one bucket; else `uri` unchanged."""
    uri, base = storage.absolute(uri), storage.absolute(base)
    if storage.is_s3(uri) != storage.is_s3(base):
        return uri
    if storage.is_s3(uri):
        (bucket, key), (base_bucket, base_key) = (u.removeprefix("s3://").split("/", 1) for u in (uri, base))
        return posixpath.relpath(key, base_key) if bucket == base_bucket else uri
    return posixpath.relpath(uri, base)


def resolve(path: str, base: str) -> str:
    """The inverse of `relative`: a path relative to the directory `base` as a URI."""
    if "://" in path or path.startswith("/"):
        return path
    joined = storage.join(base, path)
    if storage.is_s3(joined):
        bucket, key = joined.removeprefix("s3://").split("/", 1)
        return f"s3://{bucket}/{posixpath.normpath(key)}"
    return posixpath.normpath(joined)


def _walk(folder: str, prefix: str) -> list[str]:
    names = []
    for name in storage.listdir(storage.join(folder, prefix) if prefix else folder):
        rel = f"{prefix}/{name}" if prefix else name
        if name == storage.MANIFEST:
            continue
        full = storage.join(folder, rel)
        fs, path = storage.filesystem(full)
        if fs.isdir(path):
            committed = storage.exists(storage.join(full, storage.MANIFEST))
            names += [f"{rel}/{storage.MANIFEST}"] if committed else _walk(folder, rel)
        else:
            names.append(rel)
    return names


def _entry(folder: str, name: str) -> FileEntry:
    import pyarrow.parquet as pq

    from recdist.integrity import sha256

    uri = storage.join(folder, name)
    fs, path = storage.filesystem(uri)
    rows = None
    if name.endswith(".parquet"):
        afs, apath = storage.arrow_filesystem(uri)
        with afs.open_input_file(apath) as f:
            rows = pq.ParquetFile(f).metadata.num_rows
    return FileEntry(path=name, bytes=int(fs.size(path)), rows=rows, sha256=sha256(uri))
