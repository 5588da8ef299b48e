"""Split invariants on small frames: disjoint and complete, the promised fractions, stability, time order."""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from recdist.config import PrepareConfig
from recdist.data import splits
from recdist.errors import DataError


@pytest.fixture(scope="module")
def ratings() -> pl.DataFrame:
    """300 users with 1..120 ratings each on distinct items, random timestamps with many ties."""
    rng = np.random.default_rng(7)
    counts = rng.integers(1, 121, 300)
    users = np.repeat(np.arange(300) * 3 + 1, counts)
    items = np.concatenate([rng.choice(5000, c, replace=False) for c in counts])
    return pl.DataFrame(
        {"user_id": users, "item_id": items, "timestamp": rng.integers(0, 2000, len(users))},
        schema={"user_id": pl.Int64, "item_id": pl.Int64, "timestamp": pl.Int64},
    )


def _counts(df: pl.DataFrame) -> dict[str, int]:
    return dict(df["split"].value_counts().iter_rows())


def _check_complete(before: pl.DataFrame, after: pl.DataFrame) -> None:
    assert after.height == before.height
    assert after["split"].dtype == splits.SPLIT and after["split"].null_count() == 0
    assert after.drop("split").equals(before)  # rows untouched, in order


def test_row_hash_is_pinned():
    """The split of a row must not change with library versions: the hash values are fixed numbers."""
    h = splits.row_hash(pl.Series([1, 1, 2]), pl.Series([1, 2, 1]), seed=42)
    assert h.dtype == np.uint64
    assert len(set(h.tolist())) == 3
    assert h.tolist() == splits.row_hash(pl.Series([1, 1, 2]), pl.Series([1, 2, 1]), seed=42).tolist()
    assert h.tolist() == [4115121265575818634, 3472629243983776235, 15280004746802387286]


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint32, np.uint64])
def test_the_compiled_pair_hash_is_splitmix64_over_whole_arrays_for_every_index_type(dtype):
    """pair_hash's compiled loop against its definition in numpy's whole-array uint64 arithmetic (which wraps),
    on random indices of each dtype the callers pass, with salts at the edges of uint64 (negatives wrap alike)."""
    rng = np.random.default_rng(3)
    users = rng.integers(0, np.iinfo(np.int32).max, 10_000).astype(dtype)
    items = rng.integers(0, np.iinfo(np.int32).max, 10_000).astype(dtype)
    for salt in (0, 1, 2**63, 2**64 - 1, 0xBF58476D1CE4E5B9 * 7):
        x = users.astype(np.uint64) * splits._GOLDEN + items.astype(np.uint64) + np.uint64(salt % 2**64)
        assert np.array_equal(splits.pair_hash(users, items, salt), splits.mix64(x))
    view = pa.array(users).to_numpy()  # Arrow's zero-copy view: read-only
    assert not view.flags.writeable
    assert np.array_equal(splits.pair_hash(view, items, 5), splits.pair_hash(users.copy(), items, 5))
    assert len(splits._pair_hash.signatures) == 1  # one compiled variant, whatever the callers pass
    negative = np.array([-1, -7], np.int64)
    expected = splits.mix64(negative.astype(np.uint64) * splits._GOLDEN + np.array([3, 4], np.uint64))
    assert np.array_equal(splits.pair_hash(negative, np.array([3, 4], np.int32), 0), expected)


def test_random_split_fractions_and_stability(ratings):
    out = splits.random_split(ratings, val_fraction=0.1, test_fraction=0.2, seed=3)
    _check_complete(ratings, out)
    counts = _counts(out)
    n = ratings.height
    assert abs(counts["test"] / n - 0.2) < 0.02 and abs(counts["val"] / n - 0.1) < 0.015

    # adding rows (new users too) and shuffling the file order moves no existing row
    extra = pl.DataFrame({"user_id": [10_000, 10_000, 1], "item_id": [1, 2, 99_999], "timestamp": [5, 6, 7]})
    bigger = pl.concat([extra, ratings.sample(fraction=1.0, shuffle=True, seed=1)])
    again = splits.random_split(bigger, val_fraction=0.1, test_fraction=0.2, seed=3)
    joined = out.join(again, on=["user_id", "item_id"], suffix="_again")
    assert joined.height == ratings.height
    assert (joined["split"] == joined["split_again"]).all()

    other_seed = splits.random_split(ratings, val_fraction=0.1, test_fraction=0.2, seed=4)
    assert (other_seed["split"] != out["split"]).sum() > ratings.height // 5


def test_user_split_stratifies_each_user(ratings):
    out = splits.user_split(ratings, val_fraction=0.1, test_fraction=0.2, seed=3)
    _check_complete(ratings, out)
    per_user = out.group_by("user_id").agg(
        n=pl.len(),
        test=(pl.col("split") == "test").sum(),
        val=(pl.col("split") == "val").sum(),
        train=(pl.col("split") == "train").sum(),
    )
    enough = per_user.filter(pl.col("n") >= 5)  # round(5 * 0.1) = 1: every split gets a rating
    assert enough.height > 250
    assert (enough["test"] == (enough["n"] * 0.2 + 0.5).floor()).all()
    assert (enough["val"] == (enough["n"] * 0.1 + 0.5).floor()).all()
    assert (enough["train"] >= 1).all()
    few = per_user.filter(pl.col("n") < 5)
    assert few.height > 0 and (few["train"] == few["n"]).all()
    assert out.equals(splits.user_split(ratings, val_fraction=0.1, test_fraction=0.2, seed=3))
    assert not out.equals(splits.user_split(ratings, val_fraction=0.1, test_fraction=0.2, seed=4))


def test_time_split_is_one_cut(ratings):
    out = splits.time_split(ratings, val_fraction=0.1, test_fraction=0.2)
    _check_complete(ratings, out)
    n = ratings.height
    counts = _counts(out)
    assert counts["test"] == int(n * 0.2 + 0.5) and counts["val"] == int(n * 0.1 + 0.5)
    ts = {k: out.filter(pl.col("split") == k)["timestamp"] for k in ("train", "val", "test")}
    assert ts["train"].max() <= ts["val"].min() and ts["val"].max() <= ts["test"].min()


def test_time_split_exact_with_all_timestamps_equal():
    df = pl.DataFrame({"user_id": [1] * 10, "item_id": list(range(10)), "timestamp": [5] * 10})
    out = splits.time_split(df, val_fraction=0.2, test_fraction=0.3)
    assert out["split"].to_list() == ["train"] * 5 + ["val"] * 2 + ["test"] * 3


def test_user_time_split_holds_out_each_users_latest(ratings):
    k = 2
    out = splits.user_time_split(ratings, holdout_k=k)
    _check_complete(ratings, out)
    per_user = out.group_by("user_id").agg(
        n=pl.len(),
        test=(pl.col("split") == "test").sum(),
        val=(pl.col("split") == "val").sum(),
        test_min=pl.col("timestamp").filter(pl.col("split") == "test").min(),
        val_min=pl.col("timestamp").filter(pl.col("split") == "val").min(),
        val_max=pl.col("timestamp").filter(pl.col("split") == "val").max(),
        train_max=pl.col("timestamp").filter(pl.col("split") == "train").max(),
    )
    held = per_user.filter(pl.col("n") > 2 * k)
    assert (held["test"] == k).all() and (held["val"] == k).all()
    assert (held["test_min"] >= held["val_max"]).all() and (held["val_min"] >= held["train_max"]).all()
    short = per_user.filter(pl.col("n") <= 2 * k)
    assert short.height > 0 and (short["test"] + short["val"] == 0).all()

    no_val = splits.user_time_split(ratings, holdout_k=k, val=False)
    assert "val" not in _counts(no_val)


def test_time_splits_need_timestamps():
    df = pl.DataFrame(
        {"user_id": [1, 1], "item_id": [1, 2], "timestamp": [None, 3]}, schema_overrides={"timestamp": pl.Int64}
    )
    for split in ("time", "user_time"):
        with pytest.raises(DataError, match="timestamp"):
            splits.assign_split(df, PrepareConfig(split=split))


def test_given_split_is_kept_and_checked():
    df = pl.DataFrame({"user_id": [1, 1, 2], "item_id": [1, 2, 1], "split": ["test", "train", "val"]})
    out = splits.assign_split(df, PrepareConfig(split="given"))
    assert out["split"].dtype == splits.SPLIT and out["split"].cast(pl.String).to_list() == ["test", "train", "val"]
    with pytest.raises(DataError, match="'holdout'"):
        splits.given_split(df.with_columns(split=pl.lit("holdout")))
    with pytest.raises(DataError, match="train_path"):
        splits.given_split(df.drop("split"))


def test_from_codes_round_trips():
    codes = np.array([2, 0, 1, 0], dtype=np.int8)
    s = splits.from_codes(codes)
    assert s.dtype == splits.SPLIT and s.cast(pl.String).to_list() == ["test", "train", "val", "train"]
    assert s.to_physical().to_numpy().tolist() == codes.tolist()


def test_split_is_reads_dictionary_codes_and_plain_strings_alike():
    """Chunks with different dictionaries (as Parquet shards give), a null, and a plain string column."""
    import pyarrow as pa

    from recdist.data.splits import split_is

    a = pa.DictionaryArray.from_arrays(pa.array([0, 1, 2, None], pa.int8()), ["train", "val", "test"])
    b = pa.DictionaryArray.from_arrays(pa.array([1, 0, 0], pa.int8()), ["test", "train"])
    column = pa.chunked_array([a, b])
    assert split_is(column, "train").tolist() == [True, False, False, False, True, False, False]
    assert split_is(column, "val", "test").tolist() == [False, True, True, False, False, True, True]
    plain = pa.array(["test", None, "train"])
    assert split_is(plain, "train").tolist() == [False, False, True]
    assert split_is(pa.chunked_array([], pa.string()), "train").tolist() == []
