"""Train/val/test splits: pure functions that take a ratings frame and return it with a `split` column.

`split` is a Polars Enum over recdist.schema.SPLITS. Every split is deterministic: the random ones hash
(seed, user id, item id), so a row's split does not depend on the other rows or on file order.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
from numba import njit

from recdist.config import PrepareConfig
from recdist.errors import DataError
from recdist.schema import SPLITS

SPLIT = pl.Enum(list(SPLITS))
"""The dtype of the `split` column."""

USER, ITEM, TIMESTAMP = "user_id", "item_id", "timestamp"
"""The columns (recdist.schema.RAW_RATINGS') the splits read: hashing original ids keeps a rating's split across
datasets that index users and movies differently."""

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def pair_hash(users: np.ndarray, items: np.ndarray, salt: int) -> np.ndarray:
    """A uint64 hash of each (user, item) pair: splitmix64's finaliser over user * golden + item + salt.

    Pure integer arithmetic (wrapping at 2**64), so it is the same on every machine and library version
    (Polars' own hash is not promised stable across versions). The one pair hash of recdist: the splits here,
    and the cross-fitting folds and training share (recdist.train.sampling), each with its own salt. One compiled
    pass (`_pair_hash`): 20M pairs in 0.04-0.11 s where numpy's eight whole-array steps took 0.11-0.69 s; same bits.
    """
    users, items = _as_int64(users), _as_int64(items)  # one compiled signature, cached once (the image's too)
    return _pair_hash(users, items, np.uint64(salt % 2**64), np.empty(len(users), np.uint64))


def _as_int64(index: np.ndarray) -> np.ndarray:
    """A contiguous, writable int64 copy or view of an integer index array (uint64 reinterpreted: the same bits).
    Writable too, because numba compiles a read-only array (Arrow's and Polars' zero-copy views) as another type."""
    index = np.asarray(index)
    if index.dtype == np.uint64:
        index = index.view(np.int64)
    return np.require(index, np.int64, ["C", "W"])


@njit(cache=True, nogil=True)
def _pair_hash(users, items, salt, out):
    """out = mix64(users * _GOLDEN + items + salt), element by element, in uint64 (it wraps; a negative index
    wraps as numpy's astype does)."""
    for i in range(users.shape[0]):
        x = np.uint64(users[i]) * _GOLDEN + np.uint64(items[i]) + salt
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
        out[i] = x
    return out


def row_hash(users: pl.Series, items: pl.Series, seed: int) -> np.ndarray:
    """The split hash of each (seed, user, item): pair_hash salted with mix64(seed)."""
    salt = int(mix64(np.array([seed], dtype=np.uint64))[0])
    return pair_hash(users.cast(pl.UInt64).to_numpy(), items.cast(pl.UInt64).to_numpy(), salt)


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's output function, in place: a bijection on uint64 that spreads every input bit."""
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


def _label(test: pl.Expr, val: pl.Expr) -> pl.Expr:
    """The split Enum from two boolean conditions (test wins over val)."""
    return (
        pl.when(test)
        .then(pl.lit("test", dtype=SPLIT))
        .when(val)
        .then(pl.lit("val", dtype=SPLIT))
        .otherwise(pl.lit("train", dtype=SPLIT))
        .alias("split")
    )


def from_codes(codes: np.ndarray, name: str = "split") -> pl.Series:
    """The split Enum from codes 0 = train, 1 = val, 2 = test (Polars cannot cast integers to an Enum)."""
    c = pl.Series(name, codes)
    return pl.select(_label(pl.lit(c) == 2, pl.lit(c) == 1).alias(name)).to_series()


def split_is(column: pa.ChunkedArray | pa.Array, *names: str) -> np.ndarray:
    """bool per row of an Arrow split column: its split is one of `names` (a null is none). A dictionary column's
    codes are read, never its text: casting a 20M-row column to strings took 0.3-0.6 s."""
    parts = []
    for chunk in column.chunks if isinstance(column, pa.ChunkedArray) else [column]:
        if pa.types.is_dictionary(chunk.type):
            dictionary = chunk.dictionary.to_pylist()
            codes = pc.fill_null(chunk.indices, len(dictionary)).to_numpy(zero_copy_only=False)  # null: no code
            found = np.zeros(len(codes), bool)
            for code in (k for k, value in enumerate(dictionary) if value in names):  # == per code: 20x a gather
                found |= codes == code
            parts.append(found)
        else:
            found = pc.fill_null(pc.is_in(chunk, pa.array(names, chunk.type)), False)
            parts.append(found.to_numpy(zero_copy_only=False))
    return np.concatenate(parts) if parts else np.zeros(0, bool)


def _count(n: pl.Expr, fraction: float) -> pl.Expr:
    """round(n * fraction), halves up, as an integer expression."""
    return (n * fraction + 0.5).floor().cast(pl.Int64)


def random_split(df: pl.DataFrame, *, val_fraction: float, test_fraction: float, seed: int) -> pl.DataFrame:
    """Each rating independently: test with probability test_fraction, val with val_fraction.

    A row's split depends only on (seed, user, item) through `row_hash`, so adding rows moves no others.
    """
    h = pl.Series("_h", row_hash(df[USER], df[ITEM], seed))
    t_test = _threshold(test_fraction)
    t_val = _threshold(test_fraction + val_fraction)
    return df.with_columns(_label(pl.lit(h) < t_test, pl.lit(h) < t_val))


def _threshold(fraction: float) -> pl.Expr:
    return pl.lit(min(int(fraction * 2.0**64), 2**64 - 1), dtype=pl.UInt64)


def user_split(df: pl.DataFrame, *, val_fraction: float, test_fraction: float, seed: int) -> pl.DataFrame:
    """Per user: round(n * test_fraction) of each user's n ratings to test and round(n * val_fraction) to
    val, chosen by `row_hash` order. Users for whom a non-zero fraction rounds to no rating, or who would
    keep no training rating, keep all their ratings in train.
    """
    h = pl.Series("_h", row_hash(df[USER], df[ITEM], seed))
    tmp = (
        pl.DataFrame([df[USER], h])
        .select(
            _n=pl.len().over(USER),
            _r=pl.col("_h").rank("ordinal").over(USER),  # 1..n in hash order within each user
        )
        .with_columns(
            _test=_count(pl.col("_n"), test_fraction),
            _val=_count(pl.col("_n"), val_fraction),
        )
    )
    n, r, n_test, n_val = (pl.col(c) for c in ("_n", "_r", "_test", "_val"))
    eligible = (n - n_test - n_val >= 1) & ((n_test >= 1) | (test_fraction == 0)) & ((n_val >= 1) | (val_fraction == 0))
    split = tmp.select(_label(eligible & (r <= n_test), eligible & (r <= n_test + n_val)))
    return df.with_columns(split.to_series())


def time_split(df: pl.DataFrame, *, val_fraction: float, test_fraction: float) -> pl.DataFrame:
    """One global cut in time: the latest round(N * test_fraction) ratings are test, the
    round(N * val_fraction) before them val. Equal timestamps are ordered by frame position."""
    _need_timestamps(df, "time")
    n = df.height
    ordered = df[TIMESTAMP].sort()  # sorting the values alone is far cheaper than a rank over the frame
    n_test = int(n * test_fraction + 0.5)
    n_val = int(n * val_fraction + 0.5)
    return df.with_columns(_label(_latest(ordered, n_test), _latest(ordered, n_test + n_val)))


def _latest(ordered: pl.Series, m: int) -> pl.Expr:
    """True on the latest m rows by (timestamp, frame position), given the sorted timestamps."""
    if m == 0:
        return pl.lit(False)
    cut = ordered[len(ordered) - m]
    above = len(ordered) - int(ordered.search_sorted(cut, "right"))
    n_cut = len(ordered) - above - int(ordered.search_sorted(cut, "left"))
    at_cut = pl.col(TIMESTAMP) == cut
    # of the rows at the cut timestamp, the last (m - above) in frame order are among the latest m
    return (pl.col(TIMESTAMP) > cut) | (at_cut & (at_cut.cum_sum() > n_cut - (m - above)))


def user_time_split(df: pl.DataFrame, *, holdout_k: int, val: bool = True) -> pl.DataFrame:
    """Leave-last-k-out: each user's latest holdout_k ratings are test and the holdout_k before them val
    (no val band when `val` is False). Users with too few ratings to keep one in train keep all in train.
    Equal timestamps are ordered by frame position (the later row counts as later)."""
    _need_timestamps(df, "user_time")
    k = holdout_k
    n = pl.len().over(USER)
    # 1 = a user's latest; "ordinal" ranks equal timestamps by position, so the later row is later
    r = n + 1 - pl.col(TIMESTAMP).rank("ordinal").over(USER)
    band = 2 * k if val else k
    eligible = n > band
    return df.with_columns(_label(eligible & (r <= k), (eligible & (r <= band)) if val else pl.lit(False)))


def given_split(df: pl.DataFrame, *, val_fraction: float = 0.0, seed: int = 0) -> pl.DataFrame:
    """Keep the source's own `split` column (train/val/test files), checked and cast to the split Enum.

    Without validation rows (no val file), `val_fraction` of the training rows become validation rows, chosen
    by `row_hash` as random_split chooses them: without them training could never stop early.
    """
    if "split" not in df.columns:
        raise DataError(
            "prepare.split is `given` but the source has no train/val/test files",
            where="source section",
            fix="set source.train_path and source.test_path (and optionally source.val_path), "
            "or choose another prepare.split",
        )
    col = df["split"].cast(pl.String)
    bad = col.filter(col.is_null() | ~col.is_in(list(SPLITS)))
    if len(bad):
        raise DataError(
            f"split column holds {bad[0]!r}; only train, val and test are allowed",
            where="the source's split column",
            fix="label every row train, val or test",
        )
    if val_fraction > 0 and not (col == "val").any():
        pairs = pl.DataFrame({"split": col, "_h": row_hash(df[USER], df[ITEM], seed)})
        carve = (pl.col("_h") < _threshold(val_fraction)) & (pl.col("split") == "train")
        col = pairs.select(pl.when(carve).then(pl.lit("val")).otherwise(pl.col("split"))).to_series()
    return df.with_columns(col.cast(SPLIT).alias("split"))


def split_rule(cfg: PrepareConfig) -> dict[str, Any] | None:
    """What decides a rating's split from its own original ids alone: a random split's seed and fractions. None
    where a split depends on the other ratings or on the files (user, time, user_time, given). Two datasets split
    by the same rule give every rating they share the same split."""
    if cfg.split != "random":
        return None
    return {"method": "random", "seed": cfg.seed, "val_fraction": cfg.val_fraction, "test_fraction": cfg.test_fraction}


def assign_split(df: pl.DataFrame, cfg: PrepareConfig) -> pl.DataFrame:
    """Dispatch on cfg.split."""
    if cfg.split == "random":
        return random_split(df, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction, seed=cfg.seed)
    if cfg.split == "user":
        return user_split(df, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction, seed=cfg.seed)
    if cfg.split == "time":
        return time_split(df, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction)
    if cfg.split == "user_time":
        return user_time_split(df, holdout_k=cfg.holdout_k, val=cfg.val_fraction > 0)
    return given_split(df, val_fraction=cfg.val_fraction, seed=cfg.seed)


def _need_timestamps(df: pl.DataFrame, method: str) -> None:
    if TIMESTAMP not in df.columns or df[TIMESTAMP].null_count():
        missing = df[TIMESTAMP].null_count() if TIMESTAMP in df.columns else df.height
        raise DataError(
            f"prepare.split `{method}` needs a timestamp on every rating, and some are missing",
            where=f"the timestamp column (source.timestamp_col): {missing:,} of {df.height:,} ratings have none",
            fix="set source.timestamp_col to the timestamp column, or use prepare.split=random or user",
        )
