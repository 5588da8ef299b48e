"""Stable id maps across two days of the same source (prepare --previous): recdist.data.idmaps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from recdist.config import load_config
from recdist.data import dataset
from recdist.data.idmaps import keep_splits, stable_ids
from recdist.data.prepare import prepare

HEADER = "userId,movieId,rating,timestamp\n"


def _day(tmp: Path, name: str, lines: list[tuple[int, int, float, int]], **keys: object) -> str:
    src = tmp / f"{name}.csv"
    src.write_text(HEADER + "".join(f"{u},{i},{r},{t}\n" for u, i, r, t in lines))
    out = tmp / name
    prepare(load_config(None, {"source.path": str(src), "prepare.shards": 2, **keys}), str(out))
    return str(out)


def _ratings(uri: str) -> pl.DataFrame:
    users, items = dataset.read_users(uri), dataset.read_items(uri)
    return (
        dataset.read_rank(uri)
        .join(users.select("user_idx", "user_id"), on="user_idx")
        .join(items.select("item_idx", "item_id"), on="item_idx")
        .select("user_id", "item_id", "user_idx", "item_idx", pl.col("split").cast(pl.String))
    )


def _lines(users: range, items: range, seed: int) -> list[tuple[int, int, float, int]]:
    rng = np.random.default_rng(seed)
    return [(u, i, float(rng.integers(1, 6)), 1000 + 7 * u + i) for u in users for i in items if rng.random() < 0.6]


def test_stable_ids_keep_known_append_new_in_id_order():
    every, idx = stable_ids(pl.Series([30, 10, 20]), pl.Series("user_id", [5, 10, 30, 40]))
    assert every.to_list() == [30, 10, 20, 5, 40]  # 20 is gone: it keeps its index
    assert idx.tolist() == [3, 1, 0, 4]


def test_keep_splits_takes_the_previous_split_of_every_pair_it_held():
    """In the kept index space; yesterday's ratings in any order (as its shards hold them), today's sorted."""
    from recdist.data.splits import SPLIT

    today = pl.DataFrame({"user_idx": [1, 1, 2, 2, 3], "item_idx": [10, 20, 10, 99, 30]}).with_columns(
        split=pl.Series(["train", "test", "val", "test", "train"], dtype=SPLIT), rating=pl.Series([1.0, 2, 3, 4, 5])
    )
    yesterday = pl.DataFrame({"user_idx": [4, 2, 1, 3], "item_idx": [10, 10, 20, 10]}).with_columns(
        split=pl.Series(["val", "test", "test", "val"], dtype=SPLIT)
    )
    kept, changed = keep_splits(today, yesterday)
    assert kept["split"].to_list() == ["train", "test", "test", "test", "train"]  # (2, 10) keeps its test split
    assert kept.drop("split").equals(today.drop("split")) and kept.schema == today.schema and changed == 1
    assert keep_splits(today, yesterday.clear())[0].equals(today)
    shuffled = today[[3, 0, 4, 2, 1]]  # not sorted by (user_idx, item_idx): sorted for the lookup, rows kept in place
    again, changed = keep_splits(shuffled, yesterday)
    assert again.equals(kept[[3, 0, 4, 2, 1]]) and changed == 1


@pytest.mark.parametrize("runs", [1, 3, 8])
def test_find_sorted_agrees_with_a_binary_search_over_runs_of_queries(runs):
    """Queries in ascending runs (a dataset's sorted shards), present and absent, before, between and after the
    keys, repeated ones: each gets its key's position or -1, as numpy's searchsorted finds it."""
    from recdist.sorting import find_sorted

    rng = np.random.default_rng(runs)
    keys = np.unique(rng.integers(10, 5_000, 1_500))
    queries = np.sort(np.concatenate([rng.choice(keys, 900), rng.integers(0, 5_100, 300), [0, 9, 5_099]]))
    queries = np.concatenate([queries[s::runs] for s in range(runs)])  # each run ascending, the next from below
    at = np.searchsorted(keys, queries).clip(max=len(keys) - 1)
    expected = np.where(keys[at] == queries, at, -1)
    assert np.array_equal(find_sorted(keys, queries), expected)
    assert (expected == -1).any() and (expected >= 0).any()
    assert np.array_equal(find_sorted(keys[:0], queries[:5]), np.full(5, -1))


@pytest.mark.parametrize("split", ["random", "user", "time"])
def test_id_maps_and_splits_stable_across_two_days(tmp_path, split):
    # day 1: users 1..40, items 100..129; day 2: users 1-5 and items 100-102 gone, users 41..50 and
    # items 130..134 new
    day1 = _lines(range(1, 41), range(100, 130), seed=1)
    day2 = [r for r in day1 if r[0] > 5 and r[1] > 102] + _lines(range(41, 51), range(103, 135), seed=2)
    day2 += [(u, i, 3.0, 9000 + u) for u in range(6, 41) for i in range(130, 135) if (u + i) % 3 == 0]
    d1 = _day(tmp_path, "d1", day1, **{"prepare.split": split})
    d2 = _day(tmp_path, "d2", day2, **{"prepare.split": split, "prepare.previous": d1})

    u1, u2 = dataset.read_users(d1), dataset.read_users(d2)
    i1, i2 = dataset.read_items(d1), dataset.read_items(d2)
    # every id of day 1 keeps its index, gone ones included (with no training ratings)
    assert u2.head(u1.height)["user_id"].to_list() == u1["user_id"].to_list()
    assert i2.head(i1.height)["item_id"].to_list() == i1["item_id"].to_list()
    assert u2.filter(pl.col("user_id") <= 5)["n_train"].to_list() == [0] * 5
    assert i2.filter(pl.col("item_id") <= 102)["n_train"].to_list() == [0] * 3
    # new ones appended after, in id order; indices contiguous
    assert u2["user_id"].to_list()[u1.height :] == list(range(41, 51))
    assert i2["item_id"].to_list()[i1.height :] == list(range(130, 135))
    assert u2["user_idx"].to_list() == list(range(u2.height))
    m2 = dataset.read_manifest(d2)
    assert (m2["n_users"], m2["n_items"], m2["previous"]) == (50, 35, d1)

    # a rating's split never changes once made
    r1, r2 = _ratings(d1), _ratings(d2)
    both = r1.join(r2, on=["user_id", "item_id"], suffix="_2")
    assert both.height == len([r for r in day1 if r[0] > 5 and r[1] > 102])
    assert (both["split"] == both["split_2"]).all()
    assert (both["user_idx"] == both["user_idx_2"]).all() and (both["item_idx"] == both["item_idx_2"]).all()
    # shards sorted by (user_idx, item_idx) as without --previous
    whole = dataset.read_rank(d2).sort("user_idx", "item_idx")
    assert whole.height == len(day2)


def test_without_previous_the_random_split_already_hashes_original_ids(tmp_path):
    day1 = _lines(range(1, 41), range(100, 130), seed=1)
    day2 = [r for r in day1 if r[0] > 5] + _lines(range(41, 51), range(100, 135), seed=2)
    r1, r2 = _ratings(_day(tmp_path, "d1", day1)), _ratings(_day(tmp_path, "d2", day2))
    both = r1.join(r2, on=["user_id", "item_id"], suffix="_2")
    assert both.height > 0 and (both["split"] == both["split_2"]).all()


def test_a_previous_dataset_split_by_todays_rule_is_not_read_and_gives_the_same_dataset(tmp_path, caplog):
    """A random split is a function of (seed, user id, movie id): when yesterday's dataset says every one of its
    ratings follows today's rule (split_rule), today's prepare skips reading and looking up its 20M splits, and
    the dataset is the one the lookup gives."""
    from recdist.data.idmaps import read_previous
    from recdist.data.prepare import prepare_frame
    from recdist.data.sources import load_source

    day1 = _lines(range(1, 41), range(100, 130), seed=1)
    day2 = [r for r in day1 if r[0] > 5] + _lines(range(41, 51), range(100, 135), seed=2)
    d1 = _day(tmp_path, "d1", day1)
    rule = {"method": "random", "seed": 42, "val_fraction": 0.1, "test_fraction": 0.1}
    assert dataset.read_manifest(d1)["split_rule"] == rule
    with caplog.at_level("INFO", logger="recdist.data.prepare"):
        d2 = _day(tmp_path, "d2", day2, **{"prepare.previous": d1})
    assert "split by today's rule" in caplog.text and dataset.read_manifest(d2)["split_rule"] == rule

    (tmp_path / "d2.csv").write_text(HEADER + "".join(f"{u},{i},{r},{t}\n" for u, i, r, t in day2))
    cfg = load_config(None, {"source.path": str(tmp_path / "d2.csv"), "prepare.previous": d1})
    skipped, looked_up = (
        prepare_frame(load_source(cfg.source, cfg.synth), cfg.prepare, (0.5, 5.0), read_previous(d1, splits=read))
        for read in (False, True)
    )
    for name in ("ratings", "users", "items"):
        assert getattr(skipped, name).equals(getattr(looked_up, name)), name


def test_splits_kept_from_another_rule_are_read_and_kept_down_the_chain(tmp_path):
    """Day 1 split per user, day 2 at random keeping day 1's splits (so not all by its own rule: no split_rule),
    day 3 at random from day 2: day 2's splits are read, and day 1's still hold on day 3; a seed of its own
    also makes day 2 read day 1's."""
    day1 = _lines(range(1, 41), range(100, 130), seed=1)
    day2 = day1 + _lines(range(41, 46), range(100, 130), seed=2)
    day3 = day2 + _lines(range(46, 51), range(100, 130), seed=3)
    d1 = _day(tmp_path, "d1", day1, **{"prepare.split": "user"})
    d2 = _day(tmp_path, "d2", day2, **{"prepare.previous": d1})
    d3 = _day(tmp_path, "d3", day3, **{"prepare.previous": d2})
    assert dataset.read_manifest(d1)["split_rule"] is None and dataset.read_manifest(d2)["split_rule"] is None
    r1, r3 = _ratings(d1), _ratings(d3)
    both = r1.join(r3, on=["user_id", "item_id"], suffix="_3")
    assert both.height == len(day1) and (both["split"] == both["split_3"]).all()

    r = _ratings(_day(tmp_path, "r", day1))  # random, seed 42
    other = _day(tmp_path, "s", day2, **{"prepare.seed": 7, "prepare.previous": str(tmp_path / "r")})
    kept = r.join(_ratings(other), on=["user_id", "item_id"], suffix="_2")
    assert (kept["split"] == kept["split_2"]).all() and dataset.read_manifest(other)["split_rule"] is None
