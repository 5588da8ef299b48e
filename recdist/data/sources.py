"""Resolve a SourceConfig into raw ratings (RAW_RATINGS schema) as Polars lazy frames."""

from __future__ import annotations

import bisect
import hashlib
import posixpath
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import polars as pl

from recdist.config import SourceConfig, SynthConfig
from recdist.data.download import fetch, verified_checksum
from recdist.data.readers import Columns, Layout, Parsed, layout_for, read_items, read_ratings, read_zip
from recdist.data.registry import get_release, match_release
from recdist.errors import ConfigError

DEFAULT_SCALE = (0.5, 5.0)
"""Rating scale of a file that is not a known release and comes without source.rating_scale."""


@dataclass
class RawSource:
    """Raw ratings from one source, not yet validated for values (prepare does that).

    `ratings` has RAW_RATINGS' columns (user_id i64, item_id i64, rating f32, timestamp i64 nullable) in
    file order, plus a `split` string column when the source gives its own train/val/test files.
    """

    ratings: pl.LazyFrame
    items: pl.LazyFrame | None
    name: str
    checksum: str
    rating_scale: tuple[float, float]
    locate: Callable[[int], str] = field(default=lambda i: f"row {i}")
    """Maps a 0-based row position in `ratings` to 'file, line N' for error messages."""


def load_source(source: SourceConfig, synth: SynthConfig) -> RawSource:
    """The raw ratings `source` names: a GroupLens release (downloaded or cached), `synthetic`, a file of
    yours (`path`), or given train/val/test files (`train_path`, ... with an extra `split` column)."""
    chosen = [key for key in ("dataset", "path", "train_path") if getattr(source, key)]
    if len(chosen) != 1:
        raise ConfigError(
            "the source is " + ("not set" if not chosen else f"set twice ({' and '.join(chosen)})"),
            where="source section",
            fix="set exactly one of: source.dataset (--dataset ml-20m, or synthetic), source.path (--path FILE), "
            "or source.train_path + source.test_path (split `given`)",
        )
    if (source.test_path or source.val_path) and not source.train_path:
        raise ConfigError(
            "source.test_path / val_path are set without source.train_path",
            where="source section",
            fix="with split `given`, set source.train_path too (and not source.dataset / path)",
        )
    if source.dataset == "synthetic":
        return _synthetic(synth)
    if source.dataset:
        return _release(source)
    if source.path:
        return _path(source)
    return _given(source)


def _columns(source: SourceConfig) -> Columns:
    return Columns(
        user=source.user_col,
        item=source.item_col,
        rating=source.rating_col,
        timestamp=source.timestamp_col or None,
        timestamp_required=bool(source.timestamp_col) and "timestamp_col" in source.model_fields_set,
    )


def _layout(source: SourceConfig, uri: str) -> Layout | None:
    """The layout given in the config, or None to tell it from the file name."""
    if source.format == "auto" and source.separator is None and source.has_header is None:
        return None
    return layout_for(uri, source.format, source.separator, source.has_header)


def _scale(source: SourceConfig, uri: str | None = None) -> tuple[float, float]:
    if source.rating_scale:
        return tuple(source.rating_scale)  # type: ignore[return-value]
    release = match_release(uri) if uri else None
    return release.rating_scale if release else DEFAULT_SCALE


def _release(source: SourceConfig) -> RawSource:
    release = get_release(source.dataset or "")
    zip_path = fetch(release, cache_dir=source.cache_dir)
    ratings, items = read_zip(
        str(zip_path),
        release.ratings_member,
        release.movies_member,
        columns=Columns(),  # a GroupLens release has GroupLens columns, whatever --user-col says
        movies_layout=replace(layout_for(release.movies_member), encoding=release.movies_encoding),
        checksum=verified_checksum(zip_path),
    )
    return _raw(ratings, items, release.name, source.rating_scale or release.rating_scale)


def _path(source: SourceConfig) -> RawSource:
    uri = str(source.path)
    ratings, items = read_ratings(uri, _layout(source, uri), _columns(source))
    if source.items_path:
        items = read_items(source.items_path, item_col=source.item_col)
    name = match_release(uri).name if match_release(uri) else posixpath.basename(uri.rstrip("/"))
    return _raw(ratings, items, name, _scale(source, uri))


def _given(source: SourceConfig) -> RawSource:
    """Separate train/val/test files: one frame with a `split` column, rows located in their own file."""
    if not source.test_path:
        raise ConfigError(
            "source.train_path is set without source.test_path", where="source section", fix="set source.test_path too"
        )
    parts = [("train", source.train_path), ("val", source.val_path), ("test", source.test_path)]
    parsed = []
    for split, uri in parts:
        if uri:
            ratings, _ = read_ratings(str(uri), _layout(source, str(uri)), _columns(source))
            parsed.append((split, ratings))
    frame = pl.concat([p.frame.with_columns(split=pl.lit(split)) for split, p in parsed])
    starts = [0]
    for _, p in parsed[:-1]:
        starts.append(starts[-1] + p.frame.height)

    def locate(row: int) -> str:
        k = bisect.bisect_right(starts, row) - 1
        return parsed[k][1].locate(row - starts[k])

    items = read_items(source.items_path, item_col=source.item_col) if source.items_path else None
    checksum = _combine([p.checksum for _, p in parsed] + ([items.checksum] if items else []))
    name = posixpath.basename(str(source.train_path).rstrip("/"))
    return RawSource(
        frame.lazy(),
        items.frame.lazy() if items else None,
        name,
        checksum,
        _scale(source, str(source.train_path)),
        locate,
    )


def _synthetic(synth: SynthConfig) -> RawSource:
    from recdist.data.synth import generate

    ratings, movies = generate(synth)
    frame = ratings.select(
        pl.col("userId").cast(pl.Int64).alias("user_id"),
        pl.col("movieId").cast(pl.Int64).alias("item_id"),
        pl.col("rating").cast(pl.Float32),
        pl.col("timestamp").cast(pl.Int64),
    )
    items = movies.select(
        pl.col("movieId").cast(pl.Int64).alias("item_id"),
        pl.col("title").cast(pl.String),
        pl.col("genres").cast(pl.String),
    )
    checksum = "synth:" + hashlib.sha256(synth.model_dump_json().encode()).hexdigest()
    return RawSource(
        frame.lazy(), items.lazy(), "synthetic", checksum, DEFAULT_SCALE, lambda i: f"synthetic ratings, row {i + 1}"
    )


def _raw(ratings: Parsed, items: Parsed | None, name: str, scale: tuple[float, float]) -> RawSource:
    checksum = _combine([ratings.checksum, items.checksum]) if items else ratings.checksum
    return RawSource(
        ratings.frame.lazy(), items.frame.lazy() if items else None, name, checksum, tuple(scale), ratings.locate
    )  # type: ignore[arg-type]


def _combine(checksums: list[str]) -> str:
    """One checksum for several files (the first alone stays as it is)."""
    if len(checksums) == 1:
        return checksums[0]
    return "sha256:" + hashlib.sha256("\n".join(checksums).encode()).hexdigest()
