"""Helpers shared by test modules (data builders, constants): imported as `from helpers import ...`.

Test modules never import each other; fixtures live in conftest.py, plain functions and constants here.
"""

from __future__ import annotations

import io
import json
import os
import socket
import zipfile
from collections.abc import Callable
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from recdist.schema import RATINGS

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("RECDIST_SHARED", ROOT.parent / "shared"))

FAKE_AWS_ACCESS_KEY_ID = "RECDISTTESTFAKEKEYID"
"""Fake credentials, recognisable so a leak check can grep logs, messages and outputs for them."""
FAKE_AWS_SECRET_ACCESS_KEY = "recdist-test-fake-secret-must-never-be-printed"

SMALL_RUN = {
    "prepare.shards": 2,
    "cluster.workers": 1,
    "pipeline.outputs.top_n": 5,
    "pipeline.outputs.candidates": 30,
    "pipeline.outputs.similar_k": 4,
    "pipeline.outputs.similar_min_ratings": 5,
    "pipeline.outputs.map_items": 40,
    "pipeline.inference.actors": 1,
}
"""Config keys that size a pipeline run for a few hundred users: 2 shards, 1 worker, short output lists."""

N_USERS, N_ITEMS = 80, 50
"""The planted_frame catalog."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def planted_frame(n_rows: int = 2400, rank: int = 3, noise: float = 0.3, seed: int = 7) -> pl.DataFrame:
    """Ratings from a planted rank-`rank` model plus user and item biases, split 80/10/10 at random."""
    g = torch.Generator().manual_seed(seed)
    p, q = torch.randn(N_USERS, rank, generator=g) * 0.6, torch.randn(N_ITEMS, rank, generator=g) * 0.6
    bu, bi = torch.randn(N_USERS, generator=g) * 0.4, torch.randn(N_ITEMS, generator=g) * 0.4
    pairs = torch.randperm(N_USERS * N_ITEMS, generator=g)[:n_rows]
    user, item = pairs // N_ITEMS, pairs % N_ITEMS
    rating = 3.5 + bu[user] + bi[item] + (p[user] * q[item]).sum(1) + noise * torch.randn(n_rows, generator=g)
    split = torch.rand(n_rows, generator=g)
    return pl.DataFrame(
        {
            "user_idx": user.int().numpy(),
            "item_idx": item.int().numpy(),
            "rating": rating.clamp(0.5, 5.0).float().numpy(),
            "timestamp": torch.arange(n_rows).numpy(),
            "split": ["train" if s < 0.8 else "val" if s < 0.9 else "test" for s in split.tolist()],
        }
    )


def write_dataset(root, frame: pl.DataFrame, shards: int = 2, extra: dict | None = None) -> str:
    """A prepared-dataset directory (RATINGS schema, manifest) written directly, without prepare."""
    (root / "ratings").mkdir(parents=True)
    schema = RATINGS
    for name in extra or {}:
        schema = schema.append(pa.field(name, pa.float32()))
    for s in range(shards):
        part = frame[s::shards]
        cols = {c: part[c].to_list() for c in RATINGS.names} | {k: v[s::shards] for k, v in (extra or {}).items()}
        pq.write_table(pa.Table.from_pydict(cols, schema=schema), root / "ratings" / f"part-{s:05d}.parquet")
    train = frame.filter(pl.col("split") == "train")
    manifest = {
        "schema_version": 1,
        "kind": "dataset",
        "name": "planted",
        "n_users": N_USERS,
        "n_items": N_ITEMS,
        "n_ratings": frame.height,
        "splits": {s: frame.filter(pl.col("split") == s).height for s in ("train", "val", "test")},
        "rating_scale": [0.5, 5.0],
        "global_mean": float(train["rating"].mean()),
        "source_checksum": "x",
        "config_hash": "y",
        "shards": shards,
        "duplicates_resolved": 0,
        "filtered": {},
        "created_at": "now",
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return str(root)


def reader_counts(folder: Path, where: str | None = None) -> dict[str, int]:
    """Rows of the table in `folder` as each of the analysts' four readers counts them (pyarrow.dataset, DuckDB,
    Polars, pandas; hive partitions as columns), all rows or those with `split == where`."""
    import duckdb
    import pandas as pd
    import pyarrow.dataset as ds

    dataset = ds.dataset(folder, format="parquet", partitioning="hive")
    sql = f"select count(*) from read_parquet('{folder}/**/*.parquet')"
    frame = pl.scan_parquet(folder)
    if where is None:
        return {
            "pyarrow": dataset.count_rows(),
            "duckdb": duckdb.sql(sql).fetchall()[0][0],
            "polars": frame.select(pl.len()).collect().item(),
            "pandas": len(pd.read_parquet(folder)),
        }
    return {
        "pyarrow": dataset.count_rows(filter=ds.field("split") == where),
        "duckdb": duckdb.sql(f"{sql} where split = '{where}'").fetchall()[0][0],
        "polars": frame.filter(pl.col("split") == where).select(pl.len()).collect().item(),
        "pandas": len(pd.read_parquet(folder, filters=[("split", "==", where)])),
    }


def zipped(members: dict[str, bytes], patch: Callable[[bytearray], None] | None = None) -> bytes:
    """A zip of `members` (deflated), optionally damaged in place by `patch` (tests and bench/chaos.py)."""
    sink = io.BytesIO()
    with zipfile.ZipFile(sink, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    data = bytearray(sink.getvalue())
    if patch:
        patch(data)
    return bytes(data)


def damage_first_member(data: bytearray) -> None:
    """Flip 16 bytes inside a zip's first member's compressed data (its CRC no longer matches)."""
    start = 30 + int.from_bytes(data[26:28], "little") + int.from_bytes(data[28:30], "little") + 20
    for k in range(start, start + 16):
        data[k] ^= 0xFF


def set_zip_field(data: bytearray, local: int, central: int, value: int) -> None:
    """Set a 2-byte field of a zip's first member in its local header (offset `local`) and its central record
    (`central`): the flags are 6/8, the compression method 8/10."""
    at = data.find(b"PK\x01\x02")
    data[local : local + 2] = data[at + central : at + central + 2] = value.to_bytes(2, "little")
