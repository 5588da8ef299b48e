"""Layered scored tables (a fold-in night's): every reader drops the rows a later layer supersedes."""

from __future__ import annotations

import json
import os

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recdist import storage
from recdist.data import dataset
from recdist.errors import StorageError


def _part(path, users: list[int], tag: float) -> None:
    """A ratings file: each user rates movies 0-2, the rating column telling which file a row came from."""
    rows = [(u, i) for u in users for i in range(3)]
    pq.write_table(
        pa.table(
            {
                "user_idx": pa.array([u for u, _ in rows], pa.int32()),
                "item_idx": pa.array([i for _, i in rows], pa.int32()),
                "rating": pa.array([tag] * len(rows), pa.float32()),
            }
        ),
        path,
    )


def _layered(tmp_path):
    """Users 0-3 in two base files; layer 1 rewrites users 1 and 2; layer 2 rewrites user 2 and drops user 0
    (listed, no rows: a user gone since)."""
    table = tmp_path / "scored"
    (table / "ratings").mkdir(parents=True)
    (table / "layers").mkdir()
    _part(table / "ratings" / "part-00000.parquet", [0, 1, 2, 3], 1.0)
    _part(table / "ratings" / "part-00001.parquet", [0, 1, 2, 3], 1.0)
    _part(table / "ratings" / "part-L001-00000.parquet", [1, 2], 2.0)
    _part(table / "ratings" / "part-L002-00000.parquet", [2], 3.0)
    for name, users in (("L001", [1, 2]), ("L002", [0, 2])):
        pq.write_table(pa.table({"user_idx": pa.array(users, pa.int32())}), table / "layers" / f"{name}.parquet")
    layers = [
        {"files": ["part-00000.parquet", "part-00001.parquet"], "users": None},
        {"files": ["part-L001-00000.parquet"], "users": "layers/L001.parquet"},
        {"files": ["part-L002-00000.parquet"], "users": "layers/L002.parquet"},
    ]
    (table / "manifest.json").write_text(json.dumps({"kind": "scored", "layers": layers}))
    return str(table)


def test_a_users_rows_come_from_the_last_layer_listing_them_whatever_the_ranks(tmp_path):
    table = _layered(tmp_path)
    whole = dataset.read_rank(table).sort("user_idx", "item_idx")
    by_user = dict(whole.group_by("user_idx").agg(pl.col("rating").unique()).iter_rows())
    assert {u: list(r) for u, r in by_user.items()} == {1: [2.0], 2: [3.0], 3: [1.0]}  # user 0 gone
    assert whole.height == 3 * 3 + 3  # user 3 twice (two base files), users 1 and 2 once each
    for world in (2, 3, 8):  # shards by rank, and more ranks than files (the rows cut into equal ranges)
        ranks = [dataset.read_rank(table, r, world, columns=["item_idx", "rating"]) for r in range(world)]
        assert pl.concat(ranks).height == whole.height, world
        assert sorted(pl.concat(ranks)["rating"].to_list()) == sorted(whole["rating"].to_list()), world
    drops = [s.drop.tolist() if s.drop is not None else None for s in dataset.shards(table)]
    assert drops == [[0, 1, 2], [0, 1, 2], [0, 2], None]


def test_a_linked_file_is_the_same_bytes_and_survives_its_sources_deletion_and_rewriting(tmp_path):
    src, dst = tmp_path / "a" / "part.parquet", tmp_path / "b" / "part.parquet"
    src.parent.mkdir()
    _part(src, [0, 1], 1.0)
    storage.link(str(src), str(dst))
    assert dst.read_bytes() == src.read_bytes() and os.stat(dst).st_ino == os.stat(src).st_ino  # a hard link
    storage.write_parquet(pa.table({"x": [1]}), str(src))  # every write replaces the file: the link keeps its bytes
    assert pq.read_table(dst).num_rows == 6
    src.unlink()  # retention deleting the older run
    assert pq.read_table(dst).num_rows == 6
    with pytest.raises(StorageError, match="it is gone") as gone:  # a file of the older run lost: said, not linked
        storage.link(str(src), str(tmp_path / "c" / "part.parquet"))
    assert "restore" in gone.value.fix and not (tmp_path / "c").exists()
