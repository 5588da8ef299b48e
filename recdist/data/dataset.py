"""Read a prepared dataset (or a scored table of the same layout): its manifest, sizes, and one rank's rows.

A directory counts only once committed (manifest.json present); training rank r of W reads shards
r, r+W, ...; with more ranks than shards, the rows of all shards are cut into W equal ranges instead.

A layered scored table (a fold-in night's: manifest `layers`) holds the previous run's files plus a layer of the
rows it computed; `shards` gives each file with the users whose rows in it a later layer supersedes, and every
reader here drops them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from recdist import storage
from recdist.data.splits import from_codes
from recdist.errors import StorageError
from recdist.schema import SPLITS

if TYPE_CHECKING:
    from recdist.models import Dims


def read_manifest(uri: str) -> dict[str, Any]:
    """The manifest of the committed dataset at `uri`; StorageError when it is missing or incomplete."""
    _require_committed(uri)
    return storage.read_json(storage.join(uri, storage.MANIFEST))


def dims(manifest: dict[str, Any]) -> Dims:
    """Table sizes and rating scale a model is built from."""
    from recdist.models import Dims  # lazy: reading a dataset must not import torch

    lo, hi = (float(x) for x in manifest["rating_scale"])
    mean = manifest.get("global_mean")
    return Dims(
        n_users=int(manifest["n_users"]),
        n_items=int(manifest["n_items"]),
        global_mean=float(mean) if mean is not None else (lo + hi) / 2,
        rating_min=lo,
        rating_max=hi,
    )


def shard_files(uri: str) -> list[str]:
    """The URIs of ratings/part-*.parquet, sorted."""
    _require_committed(uri)
    folder = storage.join(uri, "ratings")
    names = [n for n in storage.listdir(folder) if n.startswith("part-") and n.endswith(".parquet")]
    if not names:
        raise StorageError(f"no ratings shards in {folder}", fix="prepare the dataset again (--overwrite)")
    return [storage.join(folder, n) for n in names]


@dataclass(frozen=True)
class Shard:
    """One ratings file of a table and the users whose rows in it are superseded (a later layer's)."""

    uri: str
    drop: np.ndarray | None = None
    """Sorted user_idx whose rows here are stale; None: every row is current."""

    def read(self, columns: list[str] | None = None, filters: Any = None) -> pa.Table:
        """The file's current rows (`columns`, or all; Arrow `filters` as storage.read_parquet's)."""
        if self.drop is None or not len(self.drop):
            return storage.read_parquet(self.uri, columns=columns, filters=filters)
        wanted = None if columns is None else [*columns, *(["user_idx"] if "user_idx" not in columns else [])]
        table = storage.read_parquet(self.uri, columns=wanted, filters=filters)
        stale = pa.array(self.drop, table.schema.field("user_idx").type)
        table = table.filter(pc.invert(pc.is_in(table["user_idx"], value_set=stale)))
        return table if columns is None else table.select(columns)


def shards(uri: str) -> list[Shard]:
    """Every ratings file of the committed table at `uri` with what a reader drops from it: nothing, unless the
    table is layered (its manifest's `layers`, oldest first: a user's rows in a layer are superseded by any later
    layer listing the user)."""
    layers = read_manifest(uri).get("layers")
    return layer_shards(uri, layers) if layers else [Shard(f) for f in shard_files(uri)]


def layer_shards(uri: str, layers: list[dict[str, Any]]) -> list[Shard]:
    """The Shards of the table at `uri` (committed or not) whose layers are `layers` (manifest.Layer's fields)."""
    users = [None if layer["users"] is None else layer_users(uri, layer["users"]) for layer in layers]
    found: list[Shard] = []
    for k, layer in enumerate(layers):
        later = [u for u in users[k + 1 :] if u is not None]
        drop = np.unique(np.concatenate(later)) if later else None
        found += [Shard(storage.join(uri, "ratings", name), drop) for name in layer["files"]]
    return found


def layer_users(uri: str, name: str) -> np.ndarray:
    """The user_idx a layer lists (its file `name` under the table `uri`)."""
    return storage.read_parquet(storage.join(uri, name), columns=["user_idx"])["user_idx"].to_numpy()


def read_rank(uri: str, rank: int = 0, world: int = 1, columns: list[str] | None = None) -> pl.DataFrame:
    """The ratings rank `rank` of `world` trains on: shards rank, rank+world, ...; with fewer shards than
    ranks, the rank's equal share of all rows by position (so every rank gets data)."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in [0, {world})")
    parts = shards(uri)
    if world <= len(parts):
        tables = [p.read(columns) for p in parts[rank::world]]
    elif any(p.drop is not None for p in parts):  # a layered table: its current rows end to end, then the range
        every = pa.concat_tables([p.read(columns) for p in parts])
        lo, hi = rank * every.num_rows // world, (rank + 1) * every.num_rows // world
        tables = [every.slice(lo, hi - lo)]
    else:
        tables = _row_range([p.uri for p in parts], rank, world, columns)
    return _frame(pa.concat_tables(tables))


def read_users(uri: str) -> pl.DataFrame:
    """users.parquet: user_idx, user_id, n_train."""
    _require_committed(uri)
    return pl.from_arrow(storage.read_parquet(storage.join(uri, "users.parquet")))


def read_items(uri: str) -> pl.DataFrame:
    """items.parquet: item_idx, item_id, title, genres, n_train."""
    _require_committed(uri)
    return pl.from_arrow(storage.read_parquet(storage.join(uri, "items.parquet")))


def _row_range(files: list[str], rank: int, world: int, columns: list[str] | None) -> list[pa.Table]:
    """Rows [rank*N/world, (rank+1)*N/world) of the files taken end to end, reading only the row groups
    that overlap them."""
    handles = []
    for f in files:
        afs, path = storage.arrow_filesystem(f)
        handles.append(pq.ParquetFile(afs.open_input_file(path)))
    total = sum(h.metadata.num_rows for h in handles)
    lo, hi = rank * total // world, (rank + 1) * total // world
    tables, start = [], 0
    for h in handles:
        for g in range(h.metadata.num_row_groups):
            n = h.metadata.row_group(g).num_rows
            if start < hi and start + n > lo:
                part = h.read_row_group(g, columns=columns)
                a, b = max(lo - start, 0), min(hi - start, n)
                tables.append(part.slice(a, b - a))
            start += n
    if not tables:  # more ranks than rows: an empty table with the right columns
        tables.append(handles[0].schema_arrow.empty_table().select(columns or handles[0].schema_arrow.names))
    return tables


def _frame(table: pa.Table) -> pl.DataFrame:
    """The table as Polars, `split` as the SPLIT Enum (mapped from the dictionary codes, not via strings)."""
    names, split = table.column_names, None
    if "split" in names and pa.types.is_dictionary(table.schema.field("split").type):
        chunks = []
        for chunk in table.column("split").chunks:
            remap = np.array([SPLITS.index(v) for v in chunk.dictionary.to_pylist()], dtype=np.int8)
            chunks.append(remap[chunk.indices.to_numpy(zero_copy_only=False)])
        split = from_codes(np.concatenate(chunks) if chunks else np.zeros(0, np.int8))
        table = table.drop_columns("split")
    frame = pl.from_arrow(table)
    assert isinstance(frame, pl.DataFrame)
    if split is not None:
        frame = frame.with_columns(split).select(names)
    return frame


def _require_committed(uri: str) -> None:
    if storage.is_committed(uri):
        return
    if storage.exists(uri) and storage.listdir(uri):
        raise StorageError(
            f"{uri} is not a committed dataset: it has no {storage.MANIFEST} (an interrupted prepare?)",
            fix=f"prepare it again: recdist prepare ... --out {uri} --overwrite",
        )
    raise StorageError(
        f"no dataset at {uri}",
        fix=f"prepare one first (recdist prepare ... --out {uri}) or check the path",
    )
