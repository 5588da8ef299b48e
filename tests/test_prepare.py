"""`prepare` end to end: real ml-latest-small, split invariants on the written shards, duplicates, filters,
shards, the manifest, byte-for-byte reproducibility, refusing to overwrite, and nothing half-written."""

from __future__ import annotations

import hashlib
import logging
import subprocess
import sys
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest

from recdist import storage
from recdist.config import Config, SynthConfig, load_config
from recdist.data import dataset, splits, synth
from recdist.data.prepare import prepare
from recdist.errors import ConfigError, DataError, StorageError
from recdist.schema import RATINGS, SCHEMA_VERSION

HEADER = "userId,movieId,rating,timestamp\n"


def _config(**keys: object) -> Config:
    return load_config(None, {k.replace("__", "."): v for k, v in keys.items()})


def run(out: Path, **keys: object) -> dict:
    """prepare() with config keys written as section__key=value."""
    return prepare(_config(**keys), str(out))


def rows(out: Path) -> pl.DataFrame:
    """Every prepared rating with its original ids: (user_id, item_id, rating, timestamp, split as text)."""
    ratings = dataset.read_rank(str(out))
    users, items = dataset.read_users(str(out)), dataset.read_items(str(out))
    return (
        ratings.join(users.select("user_idx", "user_id"), on="user_idx")
        .join(items.select("item_idx", "item_id"), on="item_idx")
        .select("user_id", "item_id", "rating", "timestamp", pl.col("split").cast(pl.String))
        .sort("user_id", "item_id")
    )


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    """A small synthetic release (ml-20m's CSV format): 300 users with >= 20 ratings, distinct timestamps."""
    out = tmp_path_factory.mktemp("planted") / "synth"
    synth.write_synthetic(SynthConfig(n_users=300, n_items=400, n_ratings=24_000, seed=4), str(out))
    return out


@pytest.fixture(scope="module")
def planted_ratings(planted) -> pl.DataFrame:
    return pl.read_csv(planted / "ratings.csv").rename({"userId": "user_id", "movieId": "item_id"})


# --- the real ml-latest-small ---------------------------------------------------------------------------------


def test_real_ml_latest_small_end_to_end(ml_latest_small, tmp_path):
    manifest = run(tmp_path / "ds", source__path=str(ml_latest_small))
    raw = pl.read_csv(ml_latest_small / "ratings.csv")
    movies = pl.read_csv(ml_latest_small / "movies.csv")
    rated = raw["movieId"].unique().sort()
    assert (manifest["n_ratings"], manifest["n_users"], manifest["n_items"]) == (100_836, 610, rated.len())
    assert manifest["name"] == "ml-latest-small" and sum(manifest["splits"].values()) == 100_836

    users, items = dataset.read_users(str(tmp_path / "ds")), dataset.read_items(str(tmp_path / "ds"))
    assert users["user_idx"].to_list() == list(range(610)) and users["user_id"].to_list() == list(range(1, 611))
    assert items["item_idx"].to_list() == list(range(rated.len())) and items["item_id"].equals(rated, check_names=False)
    titled = items.join(movies, left_on="item_id", right_on="movieId", how="left")
    assert titled["title"].null_count() == 0 and (titled["title"] == titled["title_right"]).all()
    assert (titled["genres"] == titled["genres_right"]).all()

    back = rows(tmp_path / "ds")  # through the id maps, the shards give back exactly the file's ratings
    original = raw.select(
        pl.col("userId").alias("user_id"), pl.col("movieId").alias("item_id"), pl.col("rating").cast(pl.Float32),
        "timestamp",
    ).sort("user_id", "item_id")
    assert back.drop("split").equals(original)
    train = back.filter(pl.col("split") == "train")
    assert users["n_train"].sum() == items["n_train"].sum() == train.height == manifest["splits"]["train"]
    assert manifest["global_mean"] == pytest.approx(train["rating"].cast(pl.Float64).mean(), rel=1e-12)


# --- splits, on the written shards ---------------------------------------------------------------------------


def _per_user(frame: pl.DataFrame) -> pl.DataFrame:
    def ts(split: str, how: str) -> pl.Expr:
        col = pl.col("timestamp").filter(pl.col("split") == split)
        return (col.min() if how == "min" else col.max()).alias(f"{split}_{how}")

    return frame.group_by("user_id").agg(
        n=pl.len(),
        **{s: (pl.col("split") == s).sum() for s in ("train", "val", "test")},
        **{f"{s}_{h}": ts(s, h) for s in ("train", "val", "test") for h in ("min", "max")},
    )


@pytest.mark.parametrize("method", ["random", "user", "time", "user_time"])
def test_split_invariants_on_the_prepared_output(planted, planted_ratings, tmp_path, method):
    manifest = run(
        tmp_path / "ds", source__path=str(planted), prepare__split=method, prepare__val_fraction=0.1,
        prepare__test_fraction=0.2, prepare__holdout_k=2, prepare__seed=5, prepare__shards=3,
    )
    out = rows(tmp_path / "ds")
    n = planted_ratings.height
    # complete and disjoint: every input rating exactly once, in exactly one split
    assert out.height == n and out.select(pl.struct("user_id", "item_id").is_unique().all()).item()
    expected = planted_ratings.with_columns(pl.col("rating").cast(pl.Float32)).sort("user_id", "item_id")
    assert out.drop("split").equals(expected)
    counts = dict(out["split"].value_counts().iter_rows())
    assert counts == manifest["splits"] and min(counts.values()) > 0
    per_user = _per_user(out)

    if method == "random":  # each row's split is a function of (seed, user, item) alone
        assert abs(counts["test"] / n - 0.2) < 0.02 and abs(counts["val"] / n - 0.1) < 0.02
        direct = splits.random_split(planted_ratings, val_fraction=0.1, test_fraction=0.2, seed=5)
        assert out["split"].equals(direct.sort("user_id", "item_id")["split"].cast(pl.String))
    elif method == "user":  # each user's own shares (all have >= 20 ratings)
        assert (per_user["test"] == (per_user["n"] * 0.2 + 0.5).floor()).all()
        assert (per_user["val"] == (per_user["n"] * 0.1 + 0.5).floor()).all()
    elif method == "time":  # one global cut: no test rating before a train or val one
        assert counts["test"] == int(n * 0.2 + 0.5) and counts["val"] == int(n * 0.1 + 0.5)
        by = out.group_by("split").agg(lo=pl.col("timestamp").min(), hi=pl.col("timestamp").max())
        lo, hi = dict(zip(by["split"], by["lo"], strict=True)), dict(zip(by["split"], by["hi"], strict=True))
        assert hi["train"] <= lo["val"] and hi["val"] <= lo["test"]
    else:  # user_time: each user's last 2 are test, the 2 before val, per user in time
        assert (per_user["test"] == 2).all() and (per_user["val"] == 2).all()
        assert (per_user["train_max"] <= per_user["val_min"]).all()
        assert (per_user["val_max"] <= per_user["test_min"]).all()


def test_given_split_keeps_each_file_in_its_split(tmp_path):
    train = _write(tmp_path / "train.csv", HEADER + "1,10,4,100\n1,20,3.5,200\n2,10,5,300\n2,30,2,310\n")
    val = _write(tmp_path / "val.csv", HEADER + "1,30,1,400\n")
    test = _write(tmp_path / "test.csv", HEADER + "2,20,4.5,500\n")
    movies = _write(tmp_path / "movies.csv", "movieId,title,genres\n10,Ten (1990),Drama\n20,Twenty (2000),Comedy\n")
    manifest = run(
        tmp_path / "ds", source__train_path=str(train), source__val_path=str(val), source__test_path=str(test),
        source__items_path=str(movies), prepare__split="given",
    )
    assert manifest["splits"] == {"train": 4, "val": 1, "test": 1}
    out = rows(tmp_path / "ds")
    assert out.filter(pl.col("split") != "train").select("user_id", "item_id", "split").rows() == [
        (1, 30, "val"), (2, 20, "test"),
    ]
    items = dataset.read_items(str(tmp_path / "ds"))
    assert items["title"].to_list() == ["Ten (1990)", "Twenty (2000)", None]


def test_split_files_and_split_method_must_agree(tmp_path):
    train = _write(tmp_path / "train.csv", HEADER + "1,10,4,100\n")
    test = _write(tmp_path / "test.csv", HEADER + "2,10,4,100\n")
    with pytest.raises(ConfigError, match="prepare.split=given"):
        run(tmp_path / "a", source__train_path=str(train), source__test_path=str(test), prepare__split="random")
    with pytest.raises(ConfigError, match="no split files"):
        run(tmp_path / "b", source__path=str(train), prepare__split="given")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["test.csv", "train.csv"]


def test_given_split_without_a_val_file_carves_validation_out_of_train(tmp_path, caplog):
    pairs = [(u, i) for u in range(1, 41) for i in range(1, 11)]
    train = _write(tmp_path / "train.csv", HEADER + "".join(f"{u},{i},3,{u * 100 + i}\n" for u, i in pairs[:300]))
    test = _write(tmp_path / "test.csv", HEADER + "".join(f"{u},{i},4,{u * 100 + i}\n" for u, i in pairs[300:]))
    files = {"source__train_path": str(train), "source__test_path": str(test), "prepare__split": "given"}
    caplog.set_level(logging.INFO, logger="recdist")
    manifest = prepare(_config(**files, prepare__seed=7), str(tmp_path / "ds"))
    out = rows(tmp_path / "ds")
    users, items = out["user_id"].cast(pl.Int64), out["item_id"].cast(pl.Int64)
    hashed = splits.row_hash(users, items, 7) < int(0.1 * 2.0**64)  # the pair hash random_split uses
    was_train = [(u, i) in set(pairs[:300]) for u, i in out.select("user_id", "item_id").rows()]
    expected = [("val" if h else "train") if t else "test" for h, t in zip(hashed, was_train, strict=True)]
    assert out["split"].to_list() == expected
    n_val = expected.count("val")
    assert manifest["splits"] == {"train": 300 - n_val, "val": n_val, "test": 100}
    assert 10 <= manifest["splits"]["val"] <= 50 and manifest["val_carved_from_train"] == 0.1
    assert "no validation file" in caplog.text
    caplog.clear()

    manifest = prepare(_config(**files, prepare__val_fraction=0), str(tmp_path / "ds0"))
    assert manifest["splits"] == {"train": 300, "val": 0, "test": 100} and manifest["val_carved_from_train"] is None
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "without early stopping" in warned[0]
    caplog.clear()
    from recdist.train.run import _say_without_validation

    _say_without_validation(str(tmp_path / "ds0"), manifest, 7)  # what `recdist train` warns on that dataset
    assert [r.levelno for r in caplog.records] == [logging.WARNING] and "early stopping" in caplog.text


# --- values: finite ratings, timestamps in seconds --------------------------------------------------------------


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "Infinity"])
def test_non_finite_ratings_are_refused_with_a_fix_that_works(tmp_path, value):
    path = _write(tmp_path / "r.csv", HEADER + f"1,10,4,100\n1,20,{value},200\n")
    with pytest.raises(DataError, match="is not a finite number") as err:
        run(tmp_path / "ds", source__path=str(path))
    assert err.value.where == f"{path}, line 3" and "rating_scale=" not in err.value.fix  # no scale holds it
    with pytest.raises(ConfigError, match="rating_scale: .*finite"):  # the old fix: [0.5, inf]
        run(tmp_path / "ds", source__path=str(path), source__rating_scale=[0.5, float(value)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.csv"]


@pytest.mark.parametrize(("unit", "per_second"), [("ms", 10**3), ("us", 10**6), ("ns", 10**9)])
def test_timestamps_in_other_units_are_converted_to_seconds(tmp_path, caplog, unit, per_second):
    seconds = [1_100_000_000 + 60 * k for k in range(12)]
    lines = "".join(f"{1 + k % 3},{k},4,{t * per_second + per_second // 2}\n" for k, t in enumerate(seconds))
    path = _write(tmp_path / "r.csv", HEADER + lines)
    caplog.set_level(logging.INFO, logger="recdist")
    manifest = run(tmp_path / "ds", source__path=str(path))
    assert sorted(rows(tmp_path / "ds")["timestamp"].to_list()) == seconds  # floored to whole seconds
    assert manifest["timestamp_unit"] == unit
    assert "converted to seconds" in caplog.text


def test_timestamps_mixing_units_are_refused_naming_a_line_of_each(tmp_path):
    path = _write(tmp_path / "r.csv", HEADER + "1,10,4,1100000000\n1,20,4,1100000060000\n2,10,4,1100000120\n")
    with pytest.raises(DataError, match="mix units: 1100000000 reads as seconds .* 1100000060000 as milli") as err:
        run(tmp_path / "ds", source__path=str(path))
    assert err.value.where == f"{path}, line 2 and {path}, line 3"
    assert "--timestamp-col ''" in err.value.fix and not (tmp_path / "ds").exists()


# --- duplicates and filters ----------------------------------------------------------------------------------

# (1, 10) three times: first line 2.0, latest timestamp 4.5, last line 1.0, mean 2.5; (2, 10) twice, identical.
DUPLICATES = HEADER + "1,10,2.0,100\n1,20,3.0,50\n1,10,4.5,300\n2,10,1.0,10\n1,10,1.0,200\n2,10,1.0,10\n"


@pytest.mark.parametrize(
    "policy, rating, timestamp",
    [("first", 2.0, 100), ("last", 4.5, 300), ("mean", 2.5, 300)],
)
def test_duplicate_policies_are_applied_and_counted(tmp_path, policy, rating, timestamp):
    path = _write(tmp_path / "r.csv", DUPLICATES)
    manifest = run(
        tmp_path / "ds", source__path=str(path), prepare__duplicates=policy, prepare__val_fraction=0,
        prepare__test_fraction=0,
    )
    assert (manifest["n_raw"], manifest["duplicates_resolved"], manifest["n_ratings"]) == (6, 3, 3)
    assert rows(tmp_path / "ds").select("user_id", "item_id", "rating", "timestamp").rows() == [
        (1, 10, rating, timestamp), (1, 20, 3.0, 50), (2, 10, 1.0, 10),
    ]
    assert manifest["global_mean"] == pytest.approx((rating + 3.0 + 1.0) / 3)


def test_last_policy_breaks_timestamp_ties_by_line(tmp_path):
    path = _write(tmp_path / "r.csv", HEADER + "1,10,2.0,100\n1,10,3.5,100\n1,10,5.0,99\n")
    run(tmp_path / "ds", source__path=str(path), prepare__val_fraction=0, prepare__test_fraction=0)
    assert rows(tmp_path / "ds")["rating"].to_list() == [3.5]


def test_duplicates_error_names_both_lines(tmp_path):
    path = _write(tmp_path / "r.csv", DUPLICATES)
    with pytest.raises(DataError) as err:
        run(tmp_path / "ds", source__path=str(path), prepare__duplicates="error")
    assert "user 1 rated item 10 more than once" in str(err.value)
    assert f"{path}, line 2 and {path}, line 4" in str(err.value)
    assert not (tmp_path / "ds").exists()


# Item 1 rated by users 1-5, item 2 by 1-4, item 3 by 1-3, item 4 by 1, 2 and 7, item 5 by 6 and 7: 17 ratings.
FILTERS = HEADER + "".join(
    f"{u},{i},3,{100 * u + i}\n"
    for i, users in ((1, [1, 2, 3, 4, 5]), (2, [1, 2, 3, 4]), (3, [1, 2, 3]), (4, [1, 2, 7]), (5, [6, 7]))
    for u in users
)


@pytest.mark.parametrize(
    "keys, users, items, removed",
    [
        ({"top_items": 3}, [1, 2, 3, 4, 5], [1, 2, 3], {"top_items": 5}),  # items 3 and 4 tie: the smaller id stays
        ({"min_item_ratings": 3}, [1, 2, 3, 4, 5, 7], [1, 2, 3, 4], {"min_item_ratings": 2}),
        ({"min_user_ratings": 3}, [1, 2, 3], [1, 2, 3, 4], {"min_user_ratings": 6}),
        # users are counted on what the item filters left: user 7 keeps one rating (item 4) and goes
        ({"min_item_ratings": 3, "min_user_ratings": 2}, [1, 2, 3, 4], [1, 2, 3, 4],
         {"min_item_ratings": 2, "min_user_ratings": 2}),
        ({"top_items": 4, "min_item_ratings": 3, "min_user_ratings": 2}, [1, 2, 3, 4], [1, 2, 3, 4],
         {"top_items": 2, "min_user_ratings": 2}),
    ],
)
def test_filters_keep_the_planted_users_and_items(tmp_path, keys, users, items, removed):
    path = _write(tmp_path / "r.csv", FILTERS)
    manifest = run(tmp_path / "ds", source__path=str(path), **{f"prepare__{k}": v for k, v in keys.items()})
    expected = {"top_items": 0, "min_item_ratings": 0, "min_user_ratings": 0, **removed}
    expected.update(rows=sum(removed.values()), users=7 - len(users), items=5 - len(items))
    assert manifest["filtered"] == expected
    assert manifest["n_ratings"] == 17 - expected["rows"]
    ds = str(tmp_path / "ds")
    assert dataset.read_users(ds)["user_id"].to_list() == users
    assert dataset.read_items(ds)["item_id"].to_list() == items
    ratings = dataset.read_rank(ds)  # indices stay contiguous after filtering
    assert set(ratings["user_idx"]) == set(range(len(users))) and set(ratings["item_idx"]) == set(range(len(items)))


# --- shards and manifest -------------------------------------------------------------------------------------


def test_filters_that_leave_no_rating_are_refused(tmp_path):
    path = _write(tmp_path / "r.csv", FILTERS)
    with pytest.raises(DataError, match="the filters left no ratings .*min_user_ratings removed 17") as err:
        run(tmp_path / "ds", source__path=str(path), prepare__min_user_ratings=100)
    assert "min_user_ratings=100" in err.value.where and not (tmp_path / "ds").exists()


@pytest.mark.parametrize("shards", [1, 3, 7])
def test_shards_are_balanced_and_counted(planted, planted_ratings, tmp_path, shards):
    manifest = run(tmp_path / "ds", source__path=str(planted), prepare__shards=shards)
    files = dataset.shard_files(str(tmp_path / "ds"))
    assert [Path(f).name for f in files] == [f"part-{s:05d}.parquet" for s in range(shards)]
    sizes = [pq.read_metadata(f).num_rows for f in files]
    assert sizes == manifest["shard_rows"] and sum(sizes) == planted_ratings.height
    assert max(sizes) - min(sizes) <= 1
    for f in files:
        table = pq.read_table(f)
        assert table.schema.equals(RATINGS, check_metadata=False)
        assert set(table["split"].to_pylist()) == {"train", "val", "test"}  # every shard samples every split


def test_more_shards_than_ratings(tmp_path):
    path = _write(tmp_path / "r.csv", HEADER + "1,10,4,1\n1,20,4,2\n2,10,3,3\n")
    manifest = run(tmp_path / "ds", source__path=str(path), prepare__shards=5)
    assert sorted(manifest["shard_rows"]) == [0, 0, 1, 1, 1]
    assert dataset.read_rank(str(tmp_path / "ds")).height == 3


def test_manifest_records_what_was_prepared(planted, tmp_path):
    config = _config(source__path=str(planted / "ratings.csv"), prepare__shards=2)
    manifest = prepare(config, str(tmp_path / "ds"))
    assert dataset.read_manifest(str(tmp_path / "ds")) == manifest
    assert manifest["schema_version"] == SCHEMA_VERSION and manifest["kind"] == "dataset"
    assert manifest["rating_scale"] == [0.5, 5.0] and manifest["split_method"] == "random"
    assert manifest["source_checksum"] == "sha256:" + hashlib.sha256((planted / "ratings.csv").read_bytes()).hexdigest()
    assert manifest["config_hash"] == config.section_hash("source", "prepare")
    out = rows(tmp_path / "ds")
    assert manifest["splits"] == dict(out["split"].value_counts().iter_rows())
    assert (manifest["n_users"], manifest["n_items"], manifest["n_ratings"]) == (300, 400, 24_000)
    train = out.filter(pl.col("split") == "train")["rating"].cast(pl.Float64)
    assert manifest["global_mean"] == pytest.approx(train.mean(), rel=1e-12)

    other = prepare(
        _config(source__path=str(planted / "ratings.csv"), prepare__shards=2, prepare__seed=1),
        str(tmp_path / "other"),
    )
    assert other["config_hash"] != manifest["config_hash"]
    assert other["source_checksum"] == manifest["source_checksum"]


def test_same_config_gives_byte_identical_shards(planted, tmp_path):
    first = run(tmp_path / "a", source__path=str(planted), prepare__split="user", prepare__shards=4)
    second = run(tmp_path / "b", source__path=str(planted), prepare__split="user", prepare__shards=4)
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert a.keys() == b.keys() and len(a) == 7
    assert all(a[name] == b[name] for name in a if name != storage.MANIFEST)
    assert {**first, "created_at": None} == {**second, "created_at": None}
    run(tmp_path / "c", source__path=str(planted), prepare__split="user", prepare__shards=4, prepare__seed=9)
    assert _files(tmp_path / "c")["ratings/part-00000.parquet"] != a["ratings/part-00000.parquet"]


# --- never overwritten, never half-written -------------------------------------------------------------------


def test_existing_dataset_is_refused_without_overwrite_and_left_intact(planted, tmp_path):
    run(tmp_path / "ds", source__path=str(planted), prepare__shards=2)
    before = _files(tmp_path / "ds")
    with pytest.raises(StorageError, match="--overwrite"):  # refused before the (missing) source is even read
        run(tmp_path / "ds", source__path=str(tmp_path / "missing.csv"))
    assert _files(tmp_path / "ds") == before

    manifest = prepare(_config(source__path=str(planted), prepare__shards=3), str(tmp_path / "ds"),
                       overwrite=True)
    assert manifest["shards"] == 3 and len(dataset.shard_files(str(tmp_path / "ds"))) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_a_directory_that_is_not_a_dataset_is_never_replaced_silently(planted, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(StorageError, match="not a prepared dataset.*notes.txt"):
        run(tmp_path / "mine", source__path=str(planted))
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_failure_mid_write_leaves_nothing_and_keeps_the_old_dataset(planted, tmp_path, monkeypatch):
    from recdist.data import prepare as prepare_module

    run(tmp_path / "ds", source__path=str(planted), prepare__shards=2)
    before = _files(tmp_path / "ds")
    real_write = prepare_module.write_dataset

    def write_then_fail(*args, **kwargs):
        real_write(*args, **kwargs)  # the shards are on disk, the manifest is not
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare_module, "write_dataset", write_then_fail)
    with pytest.raises(KeyboardInterrupt):
        prepare(_config(source__path=str(planted), prepare__shards=5), str(tmp_path / "ds"), overwrite=True)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "new", source__path=str(planted))
    assert _files(tmp_path / "ds") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # no staging directory, no `new`


KILLED = """
import os, signal, sys
from recdist import storage
from recdist.config import load_config
from recdist.data.prepare import prepare
real = storage.write_json
def write_json(uri, obj):
    if uri.endswith(storage.MANIFEST):
        os.kill(os.getpid(), signal.SIGKILL)  # killed with every shard written, before the manifest
    real(uri, obj)
storage.write_json = write_json
prepare(load_config(None, {"source.path": sys.argv[1]}), sys.argv[2])
"""


def test_killed_prepare_leaves_nothing_that_looks_like_a_dataset(planted, tmp_path):
    out = tmp_path / "ds"
    killed = subprocess.run([sys.executable, "-c", KILLED, str(planted), str(out)], timeout=300)
    assert killed.returncode == -9
    assert not out.exists()
    leftovers = [p for p in tmp_path.iterdir()]
    assert len(leftovers) == 1 and leftovers[0].name.startswith("ds.staging-")  # its shards, no manifest
    assert not (leftovers[0] / storage.MANIFEST).exists()
    with pytest.raises(StorageError, match="no dataset"):
        dataset.read_manifest(str(out))
    assert run(out, source__path=str(planted))["n_ratings"] == 24_000  # the next run needs no --overwrite



def test_a_given_split_that_leaves_no_training_rating_is_refused(tmp_path):
    # the test file repeats every training pair: de-duplication keeps the later (test) line, train is empty
    train = _write(tmp_path / "train.csv", HEADER + "1,10,4,100\n2,20,3,200\n")
    test = _write(tmp_path / "test.csv", HEADER + "1,10,4,100\n2,20,3,200\n")
    with pytest.raises(DataError, match="no training ratings after the split \\(0 train, 0 val, 2 test\\)") as err:
        run(tmp_path / "ds", source__train_path=str(train), source__test_path=str(test), prepare__split="given")
    assert err.value.where == "train.csv" and "test/val files" in err.value.fix  # was a pydantic traceback
    assert sorted(p.name for p in tmp_path.iterdir()) == ["test.csv", "train.csv"]


def test_a_file_size_limit_stops_prepare_with_the_fix_and_nothing_half_written(planted, tmp_path):
    """A full disk without root: RLIMIT_FSIZE (`ulimit -f`) makes a write fail with EFBIG as ENOSPC would."""
    import resource

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 10, 16 << 10))

    out = tmp_path / "ds"
    args = ["prepare", "--path", str(planted / "ratings.csv"), "--out", str(out), "-q"]
    proc = subprocess.run(
        [sys.executable, "-m", "recdist", *args], capture_output=True, text=True, timeout=300, preexec_fn=limit
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr  # was exit 1, an OSError traceback
    assert "ulimit -f" in proc.stderr and "where:" in proc.stderr and "fix:" in proc.stderr
    assert not out.exists() and not list(tmp_path.iterdir())  # no staging directory left

# --- S3 in and out -------------------------------------------------------------------------------------------


@pytest.mark.s3
def test_prepare_reads_and_writes_s3(planted, tmp_path, s3_bucket):
    storage.write_bytes(f"{s3_bucket}/in/ratings.csv", (planted / "ratings.csv").read_bytes())
    storage.write_bytes(f"{s3_bucket}/in/movies.csv", (planted / "movies.csv").read_bytes())
    remote = run(f"{s3_bucket}/ds", source__path=f"{s3_bucket}/in", prepare__shards=2)
    local = run(tmp_path / "ds", source__path=str(planted), prepare__shards=2)
    skip = dict.fromkeys(("created_at", "config_hash", "name"))  # differ by path alone
    assert {**remote, **skip} == {**local, **skip}
    for name in ("ratings/part-00000.parquet", "ratings/part-00001.parquet", "items.parquet", "users.parquet"):
        assert storage.read_bytes(f"{s3_bucket}/ds/{name}") == (tmp_path / "ds" / name).read_bytes()
    assert storage.listdir(s3_bucket) == ["ds", "in"]  # no staging prefix left behind
    with pytest.raises(StorageError, match="--overwrite"):
        run(f"{s3_bucket}/ds", source__path=f"{s3_bucket}/in")

