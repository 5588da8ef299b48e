"""The analyst tables as files (recdist.tables): one folder per table, stamped Parquet with described columns,
hive partitions the four readers see, and the data dictionary that README and outputs/SCHEMA.md print."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from helpers import reader_counts

from recdist import schema, tables

STAMP = tables.Stamp("9.9.9", "20261201T000000Z-abcdef", "0123456789abcdef", "f" * 40)
README = Path(__file__).resolve().parent.parent / "README.md"


def predictions(n: int = 12) -> pa.Table:
    users = [5, 3, 9, 1] * (n // 4)
    return pa.table(
        {
            "user_id": users,
            "movie_id": list(range(n)),
            "title": [f"m{i}" for i in range(n)],
            "split": pa.array(["train", "test", "val"] * (n // 3)).dictionary_encode(),
            "rated_at": pa.array(list(range(n)), pa.timestamp("ms", tz="UTC")),
            "rating": [4.0] * n,
            "pred_rating": [3.5] * n,
            "expected_abs_error": [0.6] * n,
            "mf_pred": [3.4] * n,
            "cold": [False] * n,
        }
    )


def test_every_analyst_column_is_described_in_the_schema():
    for spec in schema.OUTPUT_TABLES.values():
        for field in spec.schema:
            assert field.metadata and field.metadata[schema.DESCRIPTION], (spec.name, field.name)
        assert set(spec.sort_by) <= set(spec.schema.names) and set(spec.partition_by) <= set(spec.schema.names)


def test_a_partitioned_table_is_one_file_per_split_sorted_stamped_and_read_alike_by_four_readers(tmp_path):
    written = {}
    for part in range(2):
        written |= tables.write_table(predictions(), str(tmp_path), "predictions", STAMP, part=part)
    assert sorted(written) == [f"predictions/split={s}/part-0000{p}.parquet" for s in ("test", "train", "val")
                               for p in range(2)]
    folder = tmp_path / "predictions"
    for rel in written:
        f = tmp_path / rel
        meta = pq.read_metadata(f).metadata
        assert meta[b"recdist.run_id"] == STAMP.run_id.encode() and meta[b"recdist.git_commit"] == b"f" * 40
        assert meta[b"recdist.config_hash"] == b"0123456789abcdef" and meta[b"recdist.version"] == b"9.9.9"
        assert pq.read_schema(f) == schema.OUTPUT_TABLES["predictions"].file_schema()  # no split column inside
        assert pq.read_table(f)["user_id"].to_pylist() == sorted(pq.read_table(f)["user_id"].to_pylist())
    assert set(reader_counts(folder).values()) == {24}, reader_counts(folder)
    assert set(reader_counts(folder, where="test").values()) == {8}

def test_floats_are_byte_stream_split_sort_keys_and_times_delta_encoded_and_read_back_exactly_by_every_reader(
    tmp_path,
):
    import duckdb
    import pandas as pd
    import polars as pl

    table = predictions(24)
    table = table.set_column(table.column_names.index("pred_rating"), "pred_rating", pa.array(
        [1.0 + i / 7 for i in range(24)], pa.float32()))
    tables.write_table(table, str(tmp_path), "predictions", STAMP)
    f = tmp_path / "predictions" / "split=test" / "part-00000.parquet"
    group = pq.ParquetFile(f).metadata.row_group(0)
    encodings = {group.column(i).path_in_schema: group.column(i).encodings for i in range(group.num_columns)}
    for name in ("rating", "pred_rating", "expected_abs_error", "mf_pred"):
        assert "BYTE_STREAM_SPLIT" in encodings[name], encodings[name]
    for name in ("user_id", "rated_at"):  # the leading sort key and times: rising values
        assert "DELTA_BINARY_PACKED" in encodings[name], encodings[name]
    for name in ("title", "movie_id"):
        assert any("DICTIONARY" in e for e in encodings[name]), encodings[name]
    expected = pq.read_table(f)["pred_rating"].to_pylist()
    assert sorted(expected) == sorted(pa.array([1.0 + i / 7 for i in range(1, 24, 3)], pa.float32()).to_pylist())
    assert duckdb.sql(f"select pred_rating from read_parquet('{f}')").fetchnumpy()["pred_rating"].tolist() == expected
    assert pl.read_parquet(f)["pred_rating"].to_list() == expected
    assert pd.read_parquet(f)["pred_rating"].tolist() == expected
    ids = pq.read_table(f).select(["user_id", "rated_at"]).to_pylist()
    assert duckdb.sql(f"select user_id, rated_at from read_parquet('{f}')").to_arrow_table().to_pylist() == ids
    assert pl.read_parquet(f, columns=["user_id", "rated_at"]).to_arrow().to_pylist() == ids
    from_pandas = pd.read_parquet(f, columns=["user_id", "rated_at"])
    assert [(r.user_id, r.rated_at.to_pydatetime()) for r in from_pandas.itertuples()] == [
        (r["user_id"], r["rated_at"]) for r in ids
    ]
    assert sorted(r["user_id"] for r in ids) == [1, 1, 3, 3, 5, 5, 9, 9]


def test_the_stamp_leaves_out_an_unknown_git_commit():
    meta = tables.Stamp("1", "r", "c").metadata("recommendations")
    assert set(meta) == {b"recdist.version", b"recdist.run_id", b"recdist.config_hash", b"recdist.table"}


def test_readme_prints_the_data_dictionary_of_recdist_schema():
    """README's schema tables are the generated ones: `python -m recdist.tables README.md` after a schema change."""
    block = tables.readme_block(README.read_text())
    assert block == tables.data_dictionary("####"), "README is stale: run `python -m recdist.tables README.md`"
    for spec in schema.OUTPUT_TABLES.values():
        for field in spec.schema:
            assert f"| {field.name} |" in block


def test_rows_already_in_order_are_not_sorted_again_and_others_are():
    ordered = pa.table({"user_id": [1, 1, 2, 3], "movie_id": [5, 9, 1, 1]})
    assert tables._sorted(ordered, ("user_id", "movie_id"))
    assert not tables._sorted(ordered.take([1, 0, 2, 3]), ("user_id", "movie_id"))  # a tie out of order
    assert not tables._sorted(ordered.take([2, 0, 1, 3]), ("user_id", "movie_id"))
