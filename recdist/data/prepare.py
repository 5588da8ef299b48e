"""`recdist prepare`: raw ratings -> validated, de-duplicated, filtered, indexed, split, sharded Parquet.

`prepare_frame` is pure (a RawSource in, frames out); `prepare` loads the source, calls it and commits
the dataset directory through recdist.storage.staged_output, manifest.json last, so an interrupted run
leaves nothing that looks like a dataset. Whole-column Polars/NumPy throughout: 20M rows in seconds.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from recdist import logs, storage
from recdist.config import Config, PrepareConfig
from recdist.data.idmaps import PreviousMaps, fingerprints, keep_splits, rating_hashes, read_previous, restable
from recdist.data.sources import RawSource
from recdist.data.splits import assign_split, split_rule
from recdist.errors import ConfigError, DataError, StorageError
from recdist.manifest import DatasetManifest, file_entries
from recdist.schema import ITEMS, RATINGS, SPLITS, USERS

log = logging.getLogger(__name__)

_ROW = "_row"  # 0-based position in the raw source (for error messages and file-order tie breaks)
_KEY = "_key"  # user_idx * n_items + item_idx: one int64 per (user, item) pair


@dataclass
class PreparedFrames:
    """A prepared dataset in memory, before it is sharded and written."""

    ratings: pl.DataFrame
    """RATINGS' columns (split as the SPLIT Enum), sorted by (user_idx, item_idx)."""
    users: pl.DataFrame
    """USERS' columns, by user_idx."""
    items: pl.DataFrame
    """ITEMS' columns, by item_idx."""
    stats: dict[str, Any]
    """n_raw, duplicates_resolved, filtered, splits, global_mean: what the manifest reports."""


def _keep_previous(
    df: pl.DataFrame, user_ids: pl.Series, item_ids: pl.Series, previous: PreviousMaps
) -> tuple[pl.DataFrame, pl.Series, pl.Series, int]:
    """The previous dataset's splits and indices kept (recdist.data.idmaps), with a log line of what changed; also
    how many ratings kept a previous split other than today's."""
    n_before = len(user_ids), len(item_ids)
    df, user_ids, item_ids = restable(df, user_ids, item_ids, previous)
    if previous.splits is None:
        changed, splits = 0, "its ratings were split by today's rule (the same split_rule), so each keeps its split"
    else:
        df, changed = keep_splits(df, previous.splits)
        splits = f"{changed:,} ratings kept a previous split other than today's"
    log.info(
        "previous dataset: %s users and %s items kept their indices, %s and %s new, %s and %s gone; %s",
        f"{len(previous.user_ids):,}", f"{len(previous.item_ids):,}", f"{len(user_ids) - len(previous.user_ids):,}",
        f"{len(item_ids) - len(previous.item_ids):,}", f"{len(user_ids) - n_before[0]:,}",
        f"{len(item_ids) - n_before[1]:,}", splits,
    )  # fmt: skip
    return df, user_ids, item_ids, changed


def _read_previous(cfg: PrepareConfig) -> PreviousMaps:
    """The id maps of the dataset prepare.previous, and its ratings' splits unless it was split by today's rule
    (splits.split_rule: today's split gives each of its ratings the split it has there; 20M ratings not read
    and not looked up)."""
    from recdist.data.dataset import read_manifest

    assert cfg.previous is not None
    rule = split_rule(cfg)
    same = rule is not None and read_manifest(cfg.previous).get("split_rule") == rule
    return read_previous(cfg.previous, splits=not same)


def prepare_frame(
    raw: RawSource, cfg: PrepareConfig, rating_scale: tuple[float, float], previous: PreviousMaps | None = None
) -> PreparedFrames:
    """Validate -> de-duplicate -> filter -> encode ids -> split, all in memory (each step timed in the log).

    Users and items get contiguous int32 indices in the order of their sorted original ids, so the same
    ratings always give the same indices whatever the file order. With `previous` (recdist.data.idmaps), the
    previous dataset's ids keep their indices, new ids follow, and its ratings keep their split.
    """
    with logs.timed(log, "read"):
        df = _collect(raw)
    n_raw = df.height
    with logs.timed(log, "validate"):
        validate(df, raw, rating_scale)
        df, unit = timestamps_in_seconds(df, raw.locate)
    carved = carves_val(df, cfg.split, cfg.val_fraction)
    with logs.timed(log, "index"):
        user_ids, user_idx = dense_ids(df["user_id"])
        item_ids, item_idx = dense_ids(df["item_id"])
        key = user_idx.cast(pl.Int64) * len(item_ids) + item_idx
        df = sort_pairs(df.with_columns(user_idx, item_idx, key.alias(_KEY)))
    with logs.timed(log, "dedupe"):
        df, n_dup = dedupe(df, cfg.duplicates, raw.locate)
        df = df.drop(_KEY, _ROW)
    with logs.timed(log, "filter"):
        df, filtered = filter_ratings(df, cfg, len(user_ids), len(item_ids))
        n_before = len(user_ids), len(item_ids)
        df, user_ids, item_ids = reindex(df, user_ids, item_ids)
        filtered["users"], filtered["items"] = n_before[0] - len(user_ids), n_before[1] - len(item_ids)
    with logs.timed(log, "split"):
        df = assign_split(df, cfg)
    changed = 0
    if previous is not None:
        with logs.timed(log, "stable ids"):
            df, user_ids, item_ids, changed = _keep_previous(df, user_ids, item_ids, previous)
    if cfg.split == "given":
        _log_given(df, cfg, carved)
    ratings = df.select("user_idx", "item_idx", "rating", "timestamp", "split")
    code = ratings["split"].to_physical().to_numpy()
    train = code == 0
    users = _with_fingerprints(_id_table(user_ids, "user", ratings["user_idx"].to_numpy(), train), ratings, item_ids,
                               train)  # fmt: skip
    items = _id_table(item_ids, "item", ratings["item_idx"].to_numpy(), train)
    items = _with_titles(items, raw.items)
    counts = np.bincount(code, minlength=len(SPLITS))
    if counts[0] == 0:
        _refuse_no_train(raw, cfg, counts)
    mean = ratings.filter(pl.lit(pl.Series(train))).select(pl.col("rating").cast(pl.Float64).mean()).item()
    stats = {
        "n_raw": n_raw,
        "duplicates_resolved": n_dup,
        "filtered": filtered,
        "splits": {name: int(c) for name, c in zip(SPLITS, counts, strict=True)},
        "global_mean": None if mean is None else float(mean),
        "timestamp_unit": unit,
        "val_carved_from_train": cfg.val_fraction if carved else None,
        "split_rule": split_rule(cfg) if changed == 0 else None,  # every rating split by today's rule
    }
    return PreparedFrames(ratings=ratings, users=users, items=items, stats=stats)


def _refuse_no_train(raw: RawSource, cfg: PrepareConfig, counts: np.ndarray) -> None:
    """DataError for a split that leaves no training rating: nothing to train on, no mean to start from."""
    have = ", ".join(f"{int(c):,} {name}" for name, c in zip(SPLITS, counts, strict=True))
    if cfg.split == "given":
        why = "every pair of the training file is also in the test or validation file, and a repeated pair keeps " \
            "its later line (prepare.duplicates)"
        fix = "remove from the test/val files the pairs the training file holds (or pass the right --train-path)"
    else:
        why = f"too few ratings for split {cfg.split} with val_fraction {cfg.val_fraction} and test_fraction " \
            f"{cfg.test_fraction}"
        fix = "give more ratings, or lower --val-fraction / --test-fraction"
    raise DataError(f"no training ratings after the split ({have}): {why}", where=raw.name, fix=fix)


def _collect(raw: RawSource) -> pl.DataFrame:
    """The raw ratings in file order with their row positions, typed as RAW_RATINGS."""
    cols = [
        pl.col("user_id").cast(pl.Int64),
        pl.col("item_id").cast(pl.Int64),
        pl.col("rating").cast(pl.Float32),
        pl.col("timestamp").cast(pl.Int64),
    ]
    names = raw.ratings.collect_schema().names()
    if "split" in names:
        cols.append(pl.col("split"))
    return raw.ratings.with_row_index(_ROW).select(_ROW, *cols).collect()


def validate(df: pl.DataFrame, raw: RawSource, rating_scale: tuple[float, float]) -> None:
    """DataError, naming the file and line, for: no rows, missing values, ratings that are not finite or lie
    outside the scale, negative ids. Cheap whole-column checks first; rows are searched only when one fails."""
    if df.height == 0:
        raise DataError(
            "the ratings source is empty: no ratings to prepare",
            where=raw.name,
            fix="check the file (a header line alone is not enough) or the source.* columns",
        )
    lo, hi = (float(x) for x in rating_scale)
    for col in ("user_id", "item_id", "rating"):
        if df[col].null_count():
            raise DataError(
                f"missing {col} value",
                where=raw.locate(df.filter(pl.col(col).is_null())[_ROW][0]),
                fix="fill in or remove that line (or point source.*_col at the right column)",
            )
    if not df["rating"].is_finite().all():  # NaN, inf and -inf: no scale holds them, no model learns from them
        bad = df.filter(~pl.col("rating").is_finite()).row(0, named=True)
        raise DataError(
            f"rating {bad['rating']} is not a finite number",
            where=raw.locate(bad[_ROW]),
            fix="correct or delete that line: a rating is a finite number inside source.rating_scale",
        )
    summary = df.select(
        rmin=pl.col("rating").min(),
        rmax=pl.col("rating").max(),
        umin=pl.col("user_id").min(),
        imin=pl.col("item_id").min(),
    ).row(0, named=True)
    if summary["rmin"] < lo or summary["rmax"] > hi:
        bad = df.filter((pl.col("rating") < lo) | (pl.col("rating") > hi)).row(0, named=True)
        wide = (min(lo, summary["rmin"]), max(hi, summary["rmax"]))
        raise DataError(
            f"rating {bad['rating']:g} is outside the rating scale [{lo:g}, {hi:g}]",
            where=raw.locate(bad[_ROW]),
            fix="remove or correct the line, or widen the scale, "
            f"e.g. --set source.rating_scale=[{wide[0]:g},{wide[1]:g}]",
        )
    for col, low in (("user_id", summary["umin"]), ("item_id", summary["imin"])):
        if low < 0:
            row = df.filter(pl.col(col) < 0)[_ROW][0]
            raise DataError(
                f"negative {col} {low}: ids must be non-negative integers",
                where=raw.locate(row),
                fix="correct the line, or map your ids to non-negative integers first",
            )


TIME_UNITS = (("s", "seconds", 1), ("ms", "milliseconds", 10**3), ("us", "microseconds", 10**6),
              ("ns", "nanoseconds", 10**9))  # fmt: skip
"""Timestamp units, told apart by magnitude: |t| below 1e11 is seconds, below 1e14 milliseconds, below 1e17
microseconds, else nanoseconds. Each band holds the years 1973-5138 of its unit (1e11 s is 5138, 1e11 ms 1973)."""
MAX_SPAN_S = 2**33
"""Longest span of timestamps (272 years): stage 1's session context packs a user and a time into 63 bits."""


def timestamps_in_seconds(
    df: pl.DataFrame, locate: Callable[[int], str]
) -> tuple[pl.DataFrame, str | None]:
    """`df` with its timestamps in seconds since the epoch, and the unit they came in (None: no timestamps).

    The unit is told by magnitude (TIME_UNITS) and must be one for the whole file: a file mixing seconds and
    milliseconds is refused, naming a line of each. Other units are floor-divided to seconds, with a log line.
    """
    ts = df["timestamp"]
    if ts.null_count() == df.height:
        return df, None
    lo, hi = ts.min(), ts.max()  # the smallest and largest |t| tell the bands: no per-row pass unless they differ
    low, high = sorted((_band(0 if lo < 0 < hi else min(abs(lo), abs(hi))), _band(max(abs(lo), abs(hi)))))
    if low != high:
        size = ts.abs()
        band = (size >= 10**11).cast(pl.Int8) + (size >= 10**14).cast(pl.Int8) + (size >= 10**17).cast(pl.Int8)
        low, high = band.min(), band.max()
        if low != high:
            first, other = (df.filter(band == b).row(0, named=True) for b in (low, high))
            raise DataError(
                f"timestamps mix units: {first['timestamp']} reads as {TIME_UNITS[low][1]} since the epoch and "
                f"{other['timestamp']} as {TIME_UNITS[high][1]}",
                where=f"{locate(first[_ROW])} and {locate(other[_ROW])}",
                fix="write every timestamp in one unit (seconds since the epoch), or leave timestamps out with "
                "--timestamp-col ''",
            )
    unit, name, per_second = TIME_UNITS[low]
    if per_second > 1:
        df = df.with_columns(pl.col("timestamp") // per_second)
        latest = datetime.fromtimestamp(int(df["timestamp"].max()), timezone.utc).date()
        log.info("timestamps are %s since the epoch by their size (latest %s): converted to seconds", name, latest)
    lo, hi = df["timestamp"].min(), df["timestamp"].max()
    if hi - lo >= MAX_SPAN_S:
        rows = [df.filter(pl.col("timestamp") == t)[_ROW][0] for t in (lo, hi)]
        raise DataError(
            f"timestamps span {(hi - lo) / 31_556_952:,.0f} years ({lo} to {hi} seconds): more than the "
            f"{MAX_SPAN_S / 31_556_952:.0f} years recdist takes",
            where=f"{locate(rows[0])} and {locate(rows[1])}",
            fix="correct those timestamps (seconds since the epoch), or leave timestamps out with --timestamp-col ''",
        )
    return df, unit


def _band(size: int) -> int:
    """The TIME_UNITS position of a timestamp of absolute value `size`."""
    return (size >= 10**11) + (size >= 10**14) + (size >= 10**17)


def carves_val(df: pl.DataFrame, split: str, val_fraction: float) -> bool:
    """True when a given split (your own files) has no validation rows and val_fraction asks for some: then
    that share of the training file goes to validation (recdist.data.splits.given_split)."""
    return split == "given" and val_fraction > 0 and "split" in df.columns and not (df["split"] == "val").any()


def _log_given(df: pl.DataFrame, cfg: PrepareConfig, carved: bool) -> None:
    """Log where a given split's validation rows came from; warn when there are none (no early stopping)."""
    n_val = int((df["split"] == "val").sum())
    if carved:
        log.info(
            "no validation file: %s ratings (%.0f%% of the training file, by the seeded pair hash, prepare.seed %d) "
            "carved out for validation; --val-fraction 0 keeps them in train",
            f"{n_val:,}", 100 * cfg.val_fraction, cfg.seed,
        )  # fmt: skip
    elif n_val == 0:
        log.warning("no validation ratings (--val-fraction 0): training will run every epoch without early stopping")
    else:
        log.info("%s validation ratings from the validation file", f"{n_val:,}")


def dense_ids(ids: pl.Series) -> tuple[pl.Series, pl.Series]:
    """The sorted distinct ids (int64) and each row's position among them (int32, named `<x>_idx`).

    Ids that are small next to the row count go through a lookup table (O(n) gathers); sparse ids through
    a sorted search.
    """
    name = ids.name.removesuffix("_id") + "_idx"
    values = ids.to_numpy()
    top = int(values.max())
    if top < min(2**31 - 1, 8 * len(values) + 2**20):
        seen = np.zeros(top + 1, dtype=bool)
        seen[values] = True
        lut = np.cumsum(seen, dtype=np.int32) - 1
        return pl.Series(ids.name, np.flatnonzero(seen), dtype=pl.Int64), pl.Series(name, lut[values])
    distinct = ids.unique().sort()
    return distinct, distinct.search_sorted(ids).cast(pl.Int32).alias(name)


def sort_pairs(df: pl.DataFrame) -> pl.DataFrame:
    """Sorted by the pair key, file order kept among equal keys; a no-op when the file is already sorted
    (ml-20m's CSV is: by user, then movie)."""
    key = df[_KEY].to_numpy()
    if len(key) < 2 or bool((key[1:] >= key[:-1]).all()):
        return df
    return df.sort(_KEY, maintain_order=True)


def dedupe(
    df: pl.DataFrame, policy: str, locate: Callable[[int], str] = lambda i: f"row {i}"
) -> tuple[pl.DataFrame, int]:
    """Resolve repeated (user, item) pairs in a frame sorted by _KEY (file order within a key).

    last: the latest by timestamp, then the later line; first: the first line; mean: one row with the
    mean rating and the latest timestamp; error: DataError naming the first repeated pair's two lines.
    Returns the frame and how many rows were folded away.
    """
    key = df[_KEY].to_numpy()
    repeat = np.zeros(len(key), dtype=bool)
    repeat[1:] = key[1:] == key[:-1]  # not the first row of its pair
    n_dup = int(repeat.sum())
    if n_dup == 0:
        return df, 0
    in_group = repeat.copy()
    in_group[:-1] |= repeat[1:]
    groups = df.filter(pl.lit(pl.Series(in_group)))
    if policy == "error":
        second = groups.filter(pl.lit(pl.Series(repeat[in_group]))).sort(_ROW).row(0, named=True)
        first = groups.filter(pl.col(_KEY) == second[_KEY])[_ROW].min()
        raise DataError(
            f"user {second['user_id']} rated item {second['item_id']} more than once",
            where=f"{locate(first)} and {locate(second[_ROW])}",
            fix="remove the repeated line, or set prepare.duplicates to last, first or mean "
            "(e.g. --set prepare.duplicates=last)",
        )
    if policy == "first":
        return df.filter(pl.lit(pl.Series(~repeat))), n_dup
    if policy == "last":
        winners = (
            groups.sort([_KEY, "timestamp", _ROW], nulls_last=False)  # a missing timestamp counts as earliest
            .group_by(_KEY, maintain_order=True)
            .agg(pl.col(_ROW).last())[_ROW]
        )
        return df.filter(pl.lit(pl.Series(~in_group)) | pl.col(_ROW).is_in(winners.implode())), n_dup
    if policy == "mean":
        group_no = np.cumsum(~repeat) - 1  # each pair's position among the kept rows
        folded = (
            groups.with_columns(_g=pl.Series(group_no[in_group]))
            .group_by("_g")
            .agg(pl.col("rating").mean().cast(pl.Float32), pl.col("timestamp").max())
        )
        kept = df.filter(pl.lit(pl.Series(~repeat)))
        return kept.with_columns(
            kept["rating"].scatter(folded["_g"], folded["rating"]),
            kept["timestamp"].scatter(folded["_g"], folded["timestamp"]),
        ), n_dup
    raise ValueError(f"unknown duplicates policy {policy!r}")


def filter_ratings(
    df: pl.DataFrame, cfg: PrepareConfig, n_users: int, n_items: int
) -> tuple[pl.DataFrame, dict[str, int]]:
    """Apply, once each and in this order: top_items (the N most-rated items, ties to the smaller id),
    min_item_ratings, then min_user_ratings, each counting the ratings left by the filters before it.

    Not iterated to a fixed point: dropping users can leave an item below min_item_ratings. Returns the
    frame and the rows each filter removed.
    """
    filtered = {"rows": 0, "top_items": 0, "min_item_ratings": 0, "min_user_ratings": 0}
    if not (cfg.top_items or cfg.min_item_ratings or cfg.min_user_ratings):
        return df, filtered
    u, i = df["user_idx"].to_numpy(), df["item_idx"].to_numpy()
    keep = np.ones(len(u), dtype=bool)

    def drop(name: str, rows: np.ndarray) -> None:
        filtered[name] = int((keep & ~rows).sum())
        keep[:] &= rows

    if cfg.top_items:
        counts = np.bincount(i, minlength=n_items)
        top = np.lexsort((np.arange(n_items), -counts))[: cfg.top_items]
        wanted = np.zeros(n_items, dtype=bool)
        wanted[top] = True
        drop("top_items", wanted[i])
    if cfg.min_item_ratings:
        counts = np.bincount(i[keep], minlength=n_items)
        drop("min_item_ratings", (counts >= cfg.min_item_ratings)[i])
    if cfg.min_user_ratings:
        counts = np.bincount(u[keep], minlength=n_users)
        drop("min_user_ratings", (counts >= cfg.min_user_ratings)[u])
    filtered["rows"] = int((~keep).sum())
    if not keep.any():
        removed = ", ".join(f"{k} removed {n:,}" for k, n in filtered.items() if k not in ("rows", "users", "items"))
        raise DataError(
            f"the filters left no ratings (of {len(keep):,}): {removed}",
            where=f"prepare section: top_items={cfg.top_items}, min_item_ratings={cfg.min_item_ratings}, "
            f"min_user_ratings={cfg.min_user_ratings}",
            fix="lower those thresholds (e.g. --min-user-ratings 5), or check the input holds what you expect",
        )
    return df.filter(pl.lit(pl.Series(keep))), filtered


def reindex(df: pl.DataFrame, user_ids: pl.Series, item_ids: pl.Series) -> tuple[pl.DataFrame, pl.Series, pl.Series]:
    """Close the gaps filters left: users and items without ratings are dropped, indices stay contiguous
    and in id order (a monotone map, so a frame sorted by (user_idx, item_idx) stays sorted)."""
    out = []
    for col, ids in (("user_idx", user_ids), ("item_idx", item_ids)):
        idx = df[col].to_numpy()
        present = np.bincount(idx, minlength=len(ids)) > 0
        if present.all():
            out.append((df[col], ids))
            continue
        lut = np.cumsum(present, dtype=np.int32) - 1
        out.append((pl.Series(col, lut[idx]), ids.filter(pl.Series(present))))
    (users, user_ids), (items, item_ids) = out
    return df.with_columns(users, items), user_ids, item_ids


def _id_table(ids: pl.Series, kind: str, idx: np.ndarray, train: np.ndarray) -> pl.DataFrame:
    return pl.DataFrame(
        {
            f"{kind}_idx": np.arange(len(ids), dtype=np.int32),
            f"{kind}_id": ids.cast(pl.Int64),
            "n_train": np.bincount(idx[train], minlength=len(ids)).astype(np.int32),
        }
    )


def _with_fingerprints(
    users: pl.DataFrame, ratings: pl.DataFrame, item_ids: pl.Series, train: np.ndarray
) -> pl.DataFrame:
    """USERS' n_ratings and the fingerprints of each user's ratings and training ratings (idmaps.fingerprints)."""
    user, n = ratings["user_idx"].to_numpy(), users.height
    item, rating = item_ids.to_numpy()[ratings["item_idx"].to_numpy()], ratings["rating"].to_numpy()
    hashes = rating_hashes(item, rating)
    timed = rating_hashes(item, rating, ratings["timestamp"].fill_null(0).to_numpy())
    return users.with_columns(
        pl.Series("n_ratings", np.bincount(user, minlength=n).astype(np.int32)),
        pl.Series("fingerprint", fingerprints(user, timed, n)),
        pl.Series("train_fingerprint", fingerprints(user[train], hashes[train], n)),
    )


def _with_titles(items: pl.DataFrame, raw_items: pl.LazyFrame | None) -> pl.DataFrame:
    """ITEMS' columns: titles and genres from the source's movies file, null where it has none."""
    if raw_items is None:
        return items.select(
            "item_idx", "item_id", pl.lit(None, pl.String).alias("title"), pl.lit(None, pl.String).alias("genres"),
            "n_train",
        )
    titles = (
        raw_items.select(
            pl.col("item_id").cast(pl.Int64), pl.col("title").cast(pl.String), pl.col("genres").cast(pl.String)
        )
        .unique("item_id", keep="first")
        .collect()
    )
    joined = items.join(titles, on="item_id", how="left").sort("item_idx")
    return joined.select("item_idx", "item_id", "title", "genres", "n_train")


def shard_rows(n: int, shards: int, seed: int) -> list[np.ndarray]:
    """Row positions of each shard: shard s takes, from every run of `shards` consecutive rows, the row
    at a random rotation, so sizes differ by at most one and each shard is an unbiased sample of every
    split and of every user's ratings. Positions come out ascending (a sorted frame stays sorted)."""
    blocks = -(-n // shards)
    turn = np.random.default_rng(seed).integers(0, shards, blocks)
    start = np.arange(blocks, dtype=np.int64) * shards
    parts = []
    for s in range(shards):
        rows = start + (s - turn) % shards
        parts.append(rows[rows < n] if n % shards else rows)
    return parts


def ratings_table(ratings: pl.DataFrame) -> pa.Table:
    """The Arrow table in recdist.schema.RATINGS (split as dictionary<int8, string>).

    Built from Polars' Arrow export alone: pa.array() would import pandas (most of a second) on first use.
    """
    codes = ratings["split"].to_physical().cast(pl.Int8).to_arrow()
    split = pa.DictionaryArray.from_arrays(codes, _SPLIT_NAMES)
    cols = [ratings[c].to_arrow() for c in ("user_idx", "item_idx", "rating", "timestamp")]
    return pa.Table.from_arrays([*cols, split], schema=RATINGS)


_SPLIT_NAMES = pl.Series(list(SPLITS)).to_arrow().cast(pa.string())
_DICT_COLUMNS = ["user_idx", "item_idx", "rating", "split"]
"""Dictionary-encoded shard columns: not timestamp, nearly unique, where a dictionary costs CPU and bytes."""


def write_dataset(frames: PreparedFrames, uri: str, shards: int, seed: int) -> list[int]:
    """Write ratings/part-NNNNN.parquet (in parallel), users.parquet and items.parquet under `uri`;
    return the rows of each shard. The caller writes the manifest."""
    parts = shard_rows(frames.ratings.height, shards, seed)

    def write(s: int) -> int:
        part = ratings_table(frames.ratings[parts[s]])
        storage.write_parquet(part, storage.join(uri, "ratings", f"part-{s:05d}.parquet"), use_dictionary=_DICT_COLUMNS)
        return part.num_rows

    with ThreadPoolExecutor(max_workers=min(shards, os.cpu_count() or 1)) as pool:
        rows = list(pool.map(write, range(shards)))
    storage.write_parquet(frames.users.to_arrow().cast(USERS), storage.join(uri, "users.parquet"))
    storage.write_parquet(frames.items.to_arrow().cast(ITEMS), storage.join(uri, "items.parquet"))
    return rows


def prepare(config: Config, out: str, *, overwrite: bool = False) -> dict[str, Any]:
    """Load config.source, prepare it and commit the dataset directory `out`; return its manifest.

    An existing dataset, or any non-empty directory that is not one, is refused unless overwrite=True
    (checked before any work).
    """
    from recdist.data.sources import load_source

    started = time.perf_counter()
    cfg = config.prepare
    _check_split_source(config)
    if not overwrite:
        _refuse_foreign(out)
    with storage.staged_output(out, overwrite=overwrite) as stage:
        with logs.timed(log, "load source"):
            raw = load_source(config.source, config.synth)
        scale = tuple(float(x) for x in (config.source.rating_scale or raw.rating_scale))
        previous = _read_previous(cfg) if cfg.previous else None
        frames = prepare_frame(raw, cfg, scale, previous)
        with logs.timed(log, "write"):
            shard_sizes = write_dataset(frames, stage, cfg.shards, cfg.seed)
        stats = frames.stats
        manifest = DatasetManifest(
            name=raw.name,
            n_users=frames.users.height,
            n_items=frames.items.height,
            n_ratings=frames.ratings.height,
            splits=stats["splits"],
            rating_scale=scale,
            global_mean=stats["global_mean"],
            timestamp_unit=stats["timestamp_unit"],
            val_carved_from_train=stats["val_carved_from_train"],
            source_checksum=raw.checksum,
            config_hash=config.dataset_hash(),
            shards=cfg.shards,
            shard_rows=shard_sizes,
            shard_seed=cfg.seed,
            split_method=cfg.split,
            split_rule=stats["split_rule"],
            previous=cfg.previous,
            n_raw=stats["n_raw"],
            duplicates_resolved=stats["duplicates_resolved"],
            filtered=stats["filtered"],
            files=file_entries(stage),
        )
        manifest.write(stage)
    log.info(
        "committed %s: %s ratings, %s users, %s items in %.1f s", out, f"{manifest.n_ratings:,}",
        f"{manifest.n_users:,}", f"{manifest.n_items:,}", time.perf_counter() - started,
    )
    return manifest.model_dump(mode="json")


DATASET_ENTRIES = frozenset({"ratings", "users.parquet", "items.parquet", storage.MANIFEST})
"""What a dataset directory holds: a directory with anything else is not ours to replace."""


def _refuse_foreign(out: str) -> None:
    """StorageError when `out` is a non-empty directory that is not a prepared dataset (nor the leftover of an
    interrupted S3 commit): replacing it would delete the user's files. A committed dataset is left to
    staged_output, which refuses it without overwrite."""
    if storage.is_committed(out) or not storage.exists(out):
        return
    foreign = [name for name in storage.listdir(out) if name not in DATASET_ENTRIES]
    if foreign:
        raise StorageError(
            f"{out} exists and is not a prepared dataset (it holds {', '.join(foreign[:5])}"
            f"{' ...' if len(foreign) > 5 else ''})",
            where=out,
            fix="choose another --out (a new directory), or pass --overwrite to replace it and everything in it",
        )


def _check_split_source(config: Config) -> None:
    """Separate train/test files and prepare.split go together: one without the other is a config mistake."""
    given_files = bool(config.source.train_path)
    if given_files != (config.prepare.split == "given"):
        raise ConfigError(
            "source.train_path/test_path (your own split files) go with prepare.split=given"
            if given_files
            else "prepare.split is `given` but no split files are set",
            where="source / prepare sections",
            fix="with your own train/test files pass --train-path, --test-path (and --val-path) with --split given; "
            "otherwise give one ratings source (--path / --dataset) and a split method (random, user, time, user_time)",
        )
