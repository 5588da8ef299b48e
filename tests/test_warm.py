"""Stage-1 warm start (recdist.train.warm): the mapping by original ids, without Ray."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from recdist import storage
from recdist.config import StageConfig, WarmConfig
from recdist.errors import ConfigError
from recdist.models import Dims
from recdist.train import warm
from recdist.train.run import build_model


def _mf(n_users: int, n_items: int, seed: int) -> torch.nn.Module:
    stage = StageConfig.model_validate({"model": "biased_mf", "params": {"rank": 4}, "train": {"seed": seed}})
    return build_model(stage, Dims(n_users=n_users, n_items=n_items, global_mean=3.5, rating_min=1, rating_max=5))


def test_previous_rows_maps_by_original_id():
    rows = warm.previous_rows(np.array([30, 10, 20]), np.array([10, 5, 30, 40]))
    assert rows.tolist() == [1, -1, 0, -1]


def test_a_known_users_factors_start_equal_to_yesterdays():
    yesterday = _mf(3, 2, seed=1)
    with torch.no_grad():
        yesterday.user_bias.weight.copy_(torch.tensor([[0.1], [0.2], [0.3]]))
        yesterday.item_bias.weight.copy_(torch.tensor([[-0.5], [0.5]]))
    # yesterday: users 30, 10, 20 and items 7, 8; today: user 20 gone, 5 and 40 new; item 7 gone, 9 new
    users = warm.previous_rows(np.array([30, 10, 20]), np.array([5, 10, 30, 40]))
    items = warm.previous_rows(np.array([7, 8]), np.array([8, 9]))
    today = _mf(4, 2, seed=2)
    cold = {k: v.clone() for k, v in today.state_dict().items()}
    state, skipped = warm.warm_state(today.state_dict(), yesterday.state_dict(), users, items)
    today.load_state_dict(state)
    assert skipped == []
    t, y = today.mf_tables(), yesterday.mf_tables()
    assert torch.equal(t.user_factors[1], y.user_factors[1]) and torch.equal(t.user_factors[2], y.user_factors[0])
    assert t.user_bias[1:3].tolist() == pytest.approx([0.2, 0.1])
    assert torch.equal(t.item_factors[0], y.item_factors[1]) and t.item_bias[0].item() == pytest.approx(0.5)
    # new users and items keep the cold initialisation, as a cold run draws it
    for name, row in (("user_factors.weight", 0), ("user_factors.weight", 3), ("item_factors.weight", 1)):
        assert torch.equal(state[name][row], cold[name][row])
    assert state["item_bias.weight"][1].item() == 0.0
    assert torch.equal(state["global_mean"], cold["global_mean"])  # today's mean


def test_a_different_rank_stays_cold_and_is_named():
    state, skipped = warm.warm_state(
        _mf(2, 2, 1).state_dict(), _mf(2, 2, 2).state_dict() | {"user_factors.weight": torch.zeros(2, 8)},
        np.array([0, 1]), np.array([0, 1]),
    )  # fmt: skip
    assert skipped == ["user_factors.weight"]


def test_warm_start_needs_a_committed_stage_1(tmp_path):
    with pytest.raises(ConfigError, match="no committed stage 1"):
        warm.resolve(str(tmp_path))
    assert warm.resolve("auto", beside=str(tmp_path / "date=2026-12-02")) is None  # none beside it: cold


def test_a_warm_start_whose_dataset_is_gone_is_refused_before_anything_runs(tmp_path):
    """Stage 1 committed, but the dataset it trained on deleted: its id maps are gone with it."""
    model = tmp_path / "run" / "mf" / "model"
    model.mkdir(parents=True)
    (model / "manifest.json").write_text(json.dumps({"data": str(tmp_path / "run" / "data")}))
    (tmp_path / "run" / "mf" / "manifest.json").write_text(json.dumps({"stage_hash": "h", "model": "model"}))
    with pytest.raises(ConfigError, match="is gone") as refused:
        warm.resolve(str(tmp_path / "run"))
    assert refused.value.where == "--warm-start" and "cold run" in refused.value.fix


def test_a_warm_start_is_part_of_stage_1s_hash_and_so_of_every_later_one():
    from recdist.config import load_config
    from recdist.pipeline import stage_hashes

    cfg = load_config(None, {})
    cold = stage_hashes(cfg, "data")
    first = warm.WarmStart(run="runs/d1", model="runs/d1/mf/model", data="data/d1", stage_hash="abc")
    hot, redone = stage_hashes(cfg, "data", first), stage_hashes(cfg, "data", replace(first, stage_hash="abd"))
    assert cold["prepare"] == hot["prepare"]
    assert all(cold[n] != hot[n] != redone[n] for n in ("mf", "reliability", "rating", "outputs"))
    assert stage_hashes(cfg, "data") == cold  # without a warm start: as before
    # warm stages 2 and 3: their own source joins their hash; pipeline.warm counts only where a stage starts warm
    both = stage_hashes(cfg, "data", {"mf": first, "reliability": replace(first, model="runs/d1/reliability/model")})
    assert both["mf"] == hot["mf"] and both["reliability"] != hot["reliability"]
    tighter = load_config(None, {"pipeline.warm.tolerance": 0.001})
    assert stage_hashes(tighter, "data") == cold and stage_hashes(tighter, "data", first)["mf"] != hot["mf"]


def test_a_warm_run_trains_at_the_rate_the_previous_run_ended_at(tmp_path):
    import polars as pl

    pl.DataFrame({"epoch": [0, 1, 2], "lr": [0.04, 0.02, 0.01]}).write_parquet(tmp_path / "history.parquet")
    stage = StageConfig.model_validate({"model": "biased_mf", "train": {"lr": 0.04, "epochs": 20}})
    ended = WarmConfig(lr_share=None, epochs=None)
    warmed = warm.warm_train(stage, str(tmp_path), ended)
    assert (warmed.train.lr, warmed.train.epochs, stage.train.lr) == (0.01, 20, 0.04)
    assert warm.warm_train(stage, str(tmp_path / "none"), ended).train.lr == 0.04  # no history: the stage's rate


def test_a_warm_stage_restarts_shorter_at_a_share_of_the_stages_peak(tmp_path):
    stage = StageConfig.model_validate({"model": "biased_mf", "train": {"lr": 0.04, "epochs": 20, "patience": 3}})
    warmed = warm.warm_train(stage, str(tmp_path)).train  # WarmConfig's defaults
    assert (warmed.lr, warmed.epochs, warmed.patience) == (0.01, 5, 1)
    assert (stage.train.lr, stage.train.epochs, stage.train.patience) == (0.04, 20, 3)
    short = warm.warm_train(stage, str(tmp_path), WarmConfig(patience=0, epochs=3, lr_share=0.5)).train
    assert (short.lr, short.epochs, short.patience) == (0.02, 3, 0)
    sgd_default = StageConfig.model_validate({"model": "biased_mf", "train": {"solver": "sgd"}})
    assert warm.warm_train(sgd_default, str(tmp_path)).train.lr == pytest.approx(0.01)  # 0.25 x SGD_LR
    one_epoch = StageConfig.model_validate({"model": "reliability_mlp", "train": {"epochs": 1, "lr": 0.004}})
    assert warm.warm_train(one_epoch, str(tmp_path)).train.epochs == 0  # stages 2-3: yesterday's weights as they are
    assert warm.warm_train(one_epoch, str(tmp_path), WarmConfig(mlp_epochs=None)).train.epochs == 1  # as `epochs`,
    assert warm.warm_train(one_epoch, str(tmp_path), WarmConfig(mlp_epochs=3)).train.epochs == 1  # never more
    assert warm.warm_train(stage, str(tmp_path), WarmConfig(mlp_epochs=0)).train.epochs == 5  # stage 1: `epochs`
    # new users and movies train at the stage's own peak: 4x the warm rate (0.25 x peak), 1x without a rate
    assert warm.new_row_rate(stage, warm.warm_train(stage, str(tmp_path))) == pytest.approx(4.0)
    assert warm.new_row_rate(sgd_default, warm.warm_train(sgd_default, str(tmp_path))) == pytest.approx(4.0)
    als = StageConfig.model_validate({"model": "biased_mf", "train": {"solver": "als"}})
    assert warm.new_row_rate(als, warm.warm_train(als, str(tmp_path))) == 1.0


def _metrics(model_dir, val_rmse):
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "metrics.json").write_text(json.dumps({"val": {"rmse": val_rmse}, "epochs": 3}))
    return str(model_dir)


def test_a_warm_stage_worse_than_the_previous_run_by_more_than_the_tolerance_falls_back(tmp_path):
    previous = _metrics(tmp_path / "before", 0.80)
    assert warm.fallback({"val": {"rmse": 0.8039}}, previous, 0.005) is None  # within 0.5% of 0.80
    worse = warm.fallback({"val": {"rmse": 0.805}, "epochs": 2}, previous, 0.005)
    assert worse == {"warm_val_rmse": 0.805, "previous_val_rmse": 0.80, "tolerance": 0.005, "warm_epochs": 2}
    assert warm.fallback({"val": {"rmse": 0.79}}, previous, -0.02) is not None  # a negative tolerance forces it
    assert warm.fallback({"val": {"rmse": 0.78}}, previous, -0.02) is None  # beat it by 2.5%
    assert warm.fallback({"val": {"rmse": None}}, previous, -1) is None  # no validation: nothing to compare
    assert warm.fallback({"val": {"rmse": 0.9}}, _metrics(tmp_path / "no-val", None), 0.0) is None


def test_started_reads_back_each_stages_start_from_its_models_metrics(tmp_path):
    """outputs/metrics.json's `start` (the report's "How this run started"): cold, warm with what it carried, or
    refit cold with why."""
    source = {"run": "runs/d1", "model": "runs/d1/mf/model", "fold_in": True, "folded": 2, "counts": {"new_users": 3}}
    fallback = {"warm_val_rmse": 0.9, "previous_val_rmse": 0.8, "tolerance": 0.005, "warm_epochs": 1}
    for name, metrics in (
        ("cold", {"epochs": 5}),
        ("warm", {"epochs": 2, "warm_start": source}),
        ("refit", {"epochs": 4, "warm_start": {"run": "runs/d1", "model": "m"}, "warm_fallback": fallback}),
    ):
        storage.write_json(str(tmp_path / name / "metrics.json"), metrics)
    got = warm.started({n: str(tmp_path / n) for n in ("cold", "warm", "refit")})
    assert got == {
        "cold": {"start": "cold", "epochs": 5},
        "warm": {"start": "warm", "epochs": 2, "from": "runs/d1", "fold_in": True, "folded": 2,
                 "counts": {"new_users": 3}},
        "refit": {"start": "refit cold", "epochs": 4, "from": "runs/d1", "fallback": fallback},
    }  # fmt: skip


def test_stage_2_weights_carry_over_only_when_every_parameter_fits():
    cold = {"net.0.weight": torch.zeros(3, 4), "net.0.bias": torch.zeros(3), "frozen.user_factors": torch.ones(2, 2)}
    previous = {"net.0.weight": torch.full((3, 4), 2.0), "net.0.bias": torch.ones(3)}
    previous["frozen.user_factors"] = torch.zeros(5, 2)  # yesterday's stage 1
    state, misfits = warm.same_weights(cold, previous, ["net.0.weight", "net.0.bias"])
    assert misfits == [] and torch.equal(state["net.0.weight"], previous["net.0.weight"])
    assert torch.equal(state["frozen.user_factors"], cold["frozen.user_factors"])  # today's frozen tables
    wider = previous | {"net.0.weight": torch.zeros(3, 6)}
    state, misfits = warm.same_weights(cold, wider, ["net.0.weight", "net.0.bias"])
    assert misfits == ["net.0.weight"] and state is cold  # all or nothing


def test_stage_2_starts_cold_when_its_model_params_or_input_width_changed(tmp_path):
    def manifest(where, model, params, upstream=None):
        where.mkdir(parents=True)
        body = {"model": model, "stage": {"params": params}, "upstream": upstream and str(upstream)}
        (where / "manifest.json").write_text(json.dumps(body))
        return where

    mf = manifest(tmp_path / "mf", "biased_mf", {"rank": 4})
    before = str(manifest(tmp_path / "rel", "reliability_mlp", {"hidden": [8]}, upstream=mf))
    today = StageConfig.model_validate({"model": "reliability_mlp", "params": {"hidden": [8]}})
    rank4 = StageConfig.model_validate({"model": "biased_mf", "params": {"rank": 4}})
    assert warm.misfit(before, today, rank4) is None
    assert "params differ" in warm.misfit(before, today.model_copy(update={"params": {"hidden": [16]}}), rank4)
    assert "rank went from 4 to 8" in warm.misfit(before, today, rank4.model_copy(update={"params": {"rank": 8}}))
    assert "this stage trains rating_mlp" in warm.misfit(before, StageConfig(model="rating_mlp"), rank4)


def test_a_warm_stage_2_model_starts_equal_to_yesterdays_weights_on_todays_frozen_tables(tmp_path):
    from recdist.models.io import save_model

    stage = StageConfig.model_validate({"model": "reliability_mlp", "params": {"hidden": [8]}, "train": {"seed": 0}})
    dims = Dims(n_users=3, n_items=2, global_mean=3.5, rating_min=1, rating_max=5)

    def reliability(mf_seed: int, seed: int) -> torch.nn.Module:
        model = build_model(stage.model_copy(update={"train": stage.train.model_copy(update={"seed": seed})}), dims)
        model.attach(_mf(3, 2, seed=mf_seed))
        return model

    yesterday = reliability(mf_seed=1, seed=1)
    with torch.no_grad():
        for p in yesterday.net.parameters():
            p.add_(1.0)  # trained: not what any seed draws
    save_model(yesterday, str(tmp_path / "reliability"))
    today = reliability(mf_seed=2, seed=2)
    todays_tables = today.frozen.user_factors.clone()
    counts = warm.apply(today, {"model": str(tmp_path / "reliability")})
    assert counts == {"parameters": len(list(today.parameters()))} and counts["parameters"] > 0
    for (name, p), (_, q) in zip(today.named_parameters(), yesterday.named_parameters(), strict=True):
        assert torch.equal(p, q), name
    assert torch.equal(today.frozen.user_factors, todays_tables)  # today's stage 1, not yesterday's
    wider = reliability(mf_seed=2, seed=2)
    wider.attach(build_model(StageConfig.model_validate({"model": "biased_mf", "params": {"rank": 8}}), dims))
    assert warm.apply(wider, {"model": str(tmp_path / "reliability")}) == {"parameters": 0}


def test_a_cold_stage_of_zero_epochs_is_refused_before_anything_runs(tmp_path):
    from recdist.config import ClusterConfig
    from recdist.train.run import train_stage

    stage = StageConfig.model_validate({"model": "biased_mf", "train": {"epochs": 0}})
    with pytest.raises(ConfigError, match="train.epochs is 0") as refused:
        train_stage(str(tmp_path / "data"), stage, ClusterConfig(), str(tmp_path / "out"))
    assert "pipeline.warm.mlp_epochs" in refused.value.fix and not (tmp_path / "out").exists()


def _rows(users: range, items: range, seed: int) -> list[tuple[int, int, int, int]]:
    """About 60% of the (user, movie) pairs given, as (user, movie, rating, timestamp)."""
    rng = np.random.default_rng(seed)
    return [(u, i, int(rng.integers(1, 6)), 1000 + 7 * u + i) for u in users for i in items if rng.random() < 0.6]


def _write_csv(path, rows: list[tuple[int, int, int, int]]) -> None:
    path.write_text("userId,movieId,rating,timestamp\n" + "".join(f"{u},{i},{r},{t}\n" for u, i, r, t in rows))


def _night(source, *, fold_in: bool = False):
    """A nightly run's config on a ratings CSV, sized for tiny data (every warm fit kept)."""
    from helpers import SMALL_RUN

    from recdist.config import load_config

    return load_config(
        None,
        {
            "source.path": str(source),
            **SMALL_RUN,
            "pipeline.outputs.recommend_min_ratings": 1,
            "pipeline.warm.tolerance": 1.0,  # tiny data: keep every warm fit
            "pipeline.warm.fold_in": fold_in,
            "stages.mf": {"model": "biased_mf", "params": {"rank": 4}, "train": {"epochs": 3, "solver": "sgd"}},
            "stages.reliability.train": {"epochs": 1, "batch_size": 256, "patience": 0},
            "stages.rating.train": {"epochs": 1, "batch_size": 256, "patience": 0},
        },
    )


def _ratings_by_user(data: str, every_split: bool) -> dict[int, set]:
    """Each user id's ratings as a set of (movie id, rating, time) by original ids: every rating with its time, or
    (every_split false) the training ones without it: what changed_users' fingerprints stand for."""
    import polars as pl

    from recdist.data import dataset

    frame = dataset.read_rank(data)
    if not every_split:
        frame = frame.filter(pl.col("split") == "train").with_columns(timestamp=pl.lit(0))
    users = dataset.read_users(data).sort("user_idx")["user_id"].to_numpy()
    items = dataset.read_items(data).sort("item_idx")["item_id"].to_numpy()
    out: dict[int, set] = {}
    for u, i, r, t in frame.select("user_idx", "item_idx", "rating", "timestamp").iter_rows():
        out.setdefault(int(users[u]), set()).add((int(items[i]), r, t))
    return out


@pytest.mark.slow
def test_a_warm_run_that_prepares_its_own_data_keeps_the_warm_starts_ids_and_splits(tmp_path):
    """The nightly manifests' one command (`pipeline --warm-start auto` with its own prepare stage): today's
    dataset keeps yesterday's indices and splits (the warm start's dataset as prepare.previous), so a known
    user's factors line up with their rows; new users and movies are appended. In process, no Ray."""

    from recdist.data import dataset
    from recdist.pipeline import _keeping_ids_of, run_pipeline

    day1_csv, day2_csv = tmp_path / "day1.csv", tmp_path / "day2.csv"
    yesterday = _rows(range(1, 41), range(100, 130), seed=1)
    _write_csv(day1_csv, yesterday)
    _write_csv(day2_csv, yesterday + _rows(range(1, 46), range(130, 133), 2) + _rows(range(41, 46), range(100, 130), 3))

    day1, day2 = tmp_path / "runs" / "date=2026-12-01", tmp_path / "runs" / "date=2026-12-02"
    run_pipeline(_night(day1_csv), str(day1))
    assert dataset.read_manifest(str(day1 / "data")).get("previous") is None  # a cold run: nothing to keep
    run_pipeline(_night(day2_csv), str(day2), warm_start="auto")

    assert dataset.read_manifest(str(day2 / "data"))["previous"] == str(day1 / "data")
    stage1 = json.loads((day2 / "mf" / "model" / "metrics.json").read_text())
    assert stage1["warm_start"]["data"] == str(day1 / "data")
    u1, u2 = (dataset.read_users(str(d / "data")) for d in (day1, day2))
    i1, i2 = (dataset.read_items(str(d / "data")) for d in (day1, day2))
    assert u2["user_id"].to_list() == u1["user_id"].to_list() + [41, 42, 43, 44, 45]  # kept, then appended
    assert i2["item_id"].to_list() == i1["item_id"].to_list() + [130, 131, 132]
    assert u2["user_idx"].to_list() == list(range(45))

    def splits(run):
        frame = dataset.read_rank(str(run / "data"), columns=["user_idx", "item_idx", "split"])
        return {(u, i): s for u, i, s in frame.iter_rows()}

    before, after = splits(day1), splits(day2)
    assert all(after[pair] == split for pair, split in before.items())  # same indices, same split

    explicit = _night(day2_csv)
    explicit.prepare.previous = str(tmp_path / "elsewhere")
    assert _keeping_ids_of(explicit, None) is explicit  # no warm start: nothing to keep
    warm_source = warm.resolve(str(day1))
    assert _keeping_ids_of(explicit, warm_source).prepare.previous == str(tmp_path / "elsewhere")  # the config's wins


def test_a_fold_in_trains_only_what_changed_and_leaves_every_other_row_as_yesterdays(tmp_path, caplog):
    """pipeline.warm.fold_in: day 2 adds new users, new movies, and new or re-rated ratings of a few known users.
    Every known user whose training ratings are the same on both days keeps yesterday's factors and bias to the
    bit, so does every known movie, and the global mean stays yesterday's, so their ratings predict as yesterday;
    the users whose training ratings changed (one only re-rated a movie: the same count) and the new rows train,
    over their rows alone. Stage 1 in this process (Ray Train's local mode), no Ray cluster."""
    import polars as pl

    from recdist.config import ClusterConfig, load_config
    from recdist.data import dataset
    from recdist.data.prepare import prepare
    from recdist.models.io import load_model
    from recdist.train.run import train_stage

    stage = StageConfig.model_validate({"model": "biased_mf", "params": {"rank": 4},
                                        "train": {"epochs": 3, "solver": "sgd", "lr": 0.02}})  # fmt: skip
    days: dict[str, str] = {}

    def prepared(day: str, rows: list) -> None:
        _write_csv(tmp_path / f"{day}.csv", rows)
        cfg = load_config(None, {"source.path": str(tmp_path / f"{day}.csv"), "prepare.shards": 2})
        cfg.prepare.previous = days.get("day1")
        days[day] = str(tmp_path / day / "data")
        prepare(cfg, days[day])

    yesterday = _rows(range(1, 41), range(100, 130), seed=1)
    prepared("day1", yesterday)
    ninth = dataset.read_users(days["day1"]).filter(pl.col("user_id") == 9)["user_idx"].item()
    first = dataset.read_rank(days["day1"]).filter((pl.col("user_idx") == ninth) & (pl.col("split") == "train"))
    movie = dataset.read_items(days["day1"]).filter(pl.col("item_idx") == first["item_idx"][0])["item_id"].item()
    rerated = next(r for r in yesterday if r[:2] == (9, movie))  # a training rating of user 9's, re-rated today
    today = [r for r in yesterday if r is not rerated] + [(9, movie, rerated[2] % 5 + 1, rerated[3] + 1)]
    today += _rows(range(3, 7), range(130, 133), seed=2) + _rows(range(41, 46), range(100, 130), seed=3)
    prepared("day2", today)
    train_stage(days["day1"], stage, ClusterConfig(workers=1), str(tmp_path / "day1" / "mf"))
    source = {"run": str(tmp_path / "day1"), "model": str(tmp_path / "day1" / "mf"), "data": days["day1"],
              "stage_hash": "h"}  # fmt: skip
    with caplog.at_level("INFO", logger="recdist.train.run"):
        metrics = train_stage(days["day2"], stage, ClusterConfig(workers=1), str(tmp_path / "day2" / "mf"),
                              warm_start=source, warm=WarmConfig(fold_in=True, tolerance=1.0))  # fmt: skip
    assert metrics["warm_start"]["fold_in"] is True and not metrics.get("warm_fallback")

    before, after = (_ratings_by_user(days[day], every_split=False) for day in ("day1", "day2"))
    changed = {u for u in after if before.get(u) != after[u]}
    assert 9 in changed and {41, 42, 43, 44, 45} <= changed and len(changed) < 15  # most known users: nothing new
    models = {day: load_model(str(tmp_path / day / "mf")).state_dict() for day in days}
    index = {day: {side: {int(i): n for n, i in enumerate(
        getattr(dataset, f"read_{side}s")(days[day]).sort(f"{side}_idx")[f"{side}_id"].to_numpy())}
        for side in ("user", "item")} for day in days}  # fmt: skip
    kept_users = [u for u in index["day1"]["user"] if u not in changed]
    for side, ids in (("user", kept_users), ("item", index["day1"]["item"])):
        for table in (f"{side}_factors.weight", f"{side}_bias.weight"):
            rows1 = models["day1"][table][[index["day1"][side][i] for i in ids]]
            rows2 = models["day2"][table][[index["day2"][side][i] for i in ids]]
            assert torch.equal(rows1, rows2), table  # frozen: yesterday's to the bit
    assert torch.equal(models["day1"]["global_mean"], models["day2"]["global_mean"])
    moved = [u for u in changed if u in index["day1"]["user"]]
    rows1 = models["day1"]["user_factors.weight"][[index["day1"]["user"][u] for u in moved]]
    rows2 = models["day2"]["user_factors.weight"][[index["day2"]["user"][u] for u in moved]]
    assert (rows1 != rows2).any(1).all()  # every changed known user trained
    said = next(r.getMessage() for r in caplog.records if "'changed_users'" in r.getMessage())
    assert f"'changed_users': {len(moved)}" in said and "'training_rows'" in said
    n_rows = int(said.split("'training_rows': ")[1].split("}")[0])
    assert 0 < n_rows < sum(len(v) for v in after.values()) / 2  # the rows that can move, not every rating
    counts = metrics["warm_start"]["counts"]  # what the log said, kept in the model's metrics.json (the report's)
    assert counts["changed_users"] == len(moved) and counts["training_rows"] == n_rows and counts["new_users"] == 5


def test_a_fold_in_needs_per_rating_sgd():
    als = StageConfig.model_validate({"model": "biased_mf", "train": {"solver": "als"}})
    with pytest.raises(ConfigError, match="fold_in") as refused:
        warm.folds_in(als, WarmConfig(fold_in=True))
    assert "solver: sgd" in refused.value.fix
    assert not warm.folds_in(als, WarmConfig())  # no fold-in asked
    stage_2 = StageConfig(model="reliability_mlp")  # keeps yesterday's weights and statistics when it trains none
    assert warm.folds_in(stage_2, WarmConfig(fold_in=True)) and not warm.folds_in(
        stage_2, WarmConfig(fold_in=True, mlp_epochs=None)
    )
    assert warm.folds_in(StageConfig.model_validate({"model": "biased_mf", "train": {"solver": "sgd"}}),
                         WarmConfig(fold_in=True))  # fmt: skip


@pytest.mark.slow
def test_a_fold_in_night_predicts_every_unchanged_rating_as_the_night_before_at_every_stage(tmp_path, caplog):
    """`pipeline --warm-start auto` with pipeline.warm.fold_in: stage 1 trains only what changed, and stages 2 and 3
    keep yesterday's weights, input statistics and global mean, so a rating of a user with nothing new of a movie
    that is not new gets yesterday's mf_pred (to the bit), pred_error and pred_rating (to float32 rounding), and
    the users with new ratings get new ones. In process, no Ray."""
    import polars as pl

    from recdist.data.dataset import read_manifest, read_rank
    from recdist.infer.scored import MAX_LAYERS, ScoreOptions, score_local
    from recdist.infer.session import DEFAULT_SESSION, SessionStep
    from recdist.pipeline import run_pipeline
    from recdist.schema import SESSION_COLUMNS

    caplog.set_level("INFO", logger="recdist.pipeline")
    yesterday = _rows(range(1, 61), range(100, 140), seed=1)
    today = yesterday + _rows(range(3, 9), range(140, 143), seed=2) + _rows(range(61, 66), range(100, 140), seed=3)
    _write_csv(tmp_path / "day1.csv", yesterday)
    _write_csv(tmp_path / "day2.csv", today)

    day1, day2 = tmp_path / "runs" / "date=2026-12-01", tmp_path / "runs" / "date=2026-12-02"
    run_pipeline(_night(tmp_path / "day1.csv", fold_in=True), str(day1))
    run_pipeline(_night(tmp_path / "day2.csv", fold_in=True), str(day2), warm_start="auto")
    outputs = json.loads((day2 / "outputs" / "metrics.json").read_text())
    for stage in ("mf", "reliability", "rating"):
        metrics = json.loads((day2 / stage / "model" / "metrics.json").read_text())
        assert metrics["warm_start"]["fold_in"] is True and not metrics.get("warm_fallback"), stage
        # stages 2 and 3 measure validation only: every split of every stage is the outputs stage's (scored tables)
        assert metrics["val"]["rmse"] > 0 and (metrics["test"] is None) == (stage != "mf"), stage
        assert {"train", "val", "test"} <= set(outputs[stage]), stage

    def scored(run, stage):  # by original ids, as the run's dataset names them
        users = pl.read_parquet(run / "data" / "users.parquet").select("user_idx", "user_id")
        items = pl.read_parquet(run / "data" / "items.parquet").select("item_idx", "item_id")
        frame = read_rank(str(run / stage / "scored"))  # a layered table's current rows
        return frame.join(users, on="user_idx").join(items, on="item_idx").drop("user_idx", "item_idx")

    new_raters = {r[0] for r in today[len(yesterday) :]}  # new users, and known ones with a new rating
    for stage, column in (("mf", "mf_pred"), ("reliability", "pred_error"), ("rating", "pred_rating")):
        both = scored(day1, stage).join(scored(day2, stage), on=["user_id", "item_id"], suffix="_2")
        same = both.filter(~pl.col("user_id").is_in(list(new_raters)))
        assert same.height > 0.8 * both.height
        assert (same[column] == same[f"{column}_2"]).all(), stage  # the night before's, to the bit
        moved = both.filter(pl.col("user_id").is_in(list(new_raters)))
        assert (moved[column] != moved[f"{column}_2"]).mean() > 0.5, stage
        # a layer of the moved users' rows over the night before's table: what scoring every row gives, row for row
        layers = read_manifest(str(day2 / stage / "scored"))["layers"]
        assert len(layers) == 2 and layers[0]["users"] is None and layers[1]["users"], stage
        again = tmp_path / f"again-{stage}"
        upstream = {"mf": "prepare", "reliability": "mf", "rating": "reliability"}[stage]
        source = day2 / "data" if stage == "mf" else day2 / upstream / "scored"
        fallback = None if stage == "mf" else str(day2 / "mf" / "model")
        features = (SessionStep(DEFAULT_SESSION),) if stage == "mf" else ()
        options = ScoreOptions(role=stage, fallback_model=fallback, features=features)
        score_local(str(day2 / stage / "model"), str(source), str(again), options)
        order = ["user_idx", "item_idx"]
        layered = read_rank(str(day2 / stage / "scored")).sort(order)
        full = read_rank(str(again)).sort(order)
        assert layered.select(*order, "cold", "split").equals(full.select(*order, "cold", "split")), stage
        # the MLP's matrix products round by how many users, items and rows they run over: a float32's last place
        assert (layered[column] - full[column]).abs().max() < 1e-6, stage
        assert layered.select(SESSION_COLUMNS).equals(full.select(SESSION_COLUMNS)), stage  # stage 1's, carried on
    start = json.loads((day2 / "outputs" / "metrics.json").read_text())["start"]  # what the report's section shows
    assert {n: (e["start"], e.get("fold_in"), e["from"]) for n, e in start.items()} == {
        n: ("warm", True, str(day1)) for n in ("mf", "reliability", "rating")
    }
    assert start["mf"]["folded"] == 1 and start["mf"]["counts"]["new_users"] == 5 and start["rating"]["epochs"] == 0
    for stage in ("mf", "reliability", "rating"):  # the layered tables' rows scored tonight, read back from them
        scored_tonight = read_manifest(str(day2 / stage / "scored"))["scoring"]["computed"]
        expected = {"computed": scored_tonight, "rows": len(today), "layers": 2, "max_layers": MAX_LAYERS}
        assert start[stage]["scored"] == expected, stage
        assert 0 < scored_tonight < len(today) / 2, stage
    assert json.loads((day1 / "outputs" / "metrics.json").read_text())["start"]["mf"] == {"start": "cold", "epochs": 3}
    taken = [r for r in caplog.records if "users' rows linked from" in r.getMessage()]
    assert [r.getMessage().split(":")[0] for r in taken] == ["mf", "reliability", "rating"]

    # the outputs: the users with nothing new keep yesterday's recommendations, row for row; the others are ranked
    # again (never a movie they rated since), with yesterday's EASE candidate model, which is not refitted
    recs = [pl.read_parquet(run / "outputs" / "recommendations" / "*.parquet") for run in (day1, day2)]
    kept = [r.filter(~pl.col("user_id").is_in(list(new_raters))) for r in recs]
    assert kept[0].height > 0 and kept[0].equals(kept[1])
    metrics = json.loads((day2 / "outputs" / "metrics.json").read_text())
    assert metrics["recommendations_kept"] == {"users": 60 - len(new_raters & set(range(1, 61))),
                                               "ranked": len(new_raters)}  # fmt: skip
    rated_today = {(u, i) for u, i, _, _ in today}
    for user, movie in recs[1].filter(pl.col("user_id").is_in(list(new_raters))).select("user_id", "movie_id").rows():
        assert (user, movie) not in rated_today
    assert (day2 / "outputs" / "candidate_model.safetensors").read_bytes() == (
        day1 / "outputs" / "candidate_model.safetensors"
    ).read_bytes()

    # pipeline.warm.refresh_every 2: the night after a fold-in starts warm without folding in, said in its config
    refresh = _night(tmp_path / "day2.csv", fold_in=True)
    refresh.pipeline.warm.refresh_every = 2
    day3 = tmp_path / "runs" / "date=2026-12-03"
    run_pipeline(refresh, str(day3), warm_start="auto")
    stage1 = json.loads((day3 / "mf" / "model" / "metrics.json").read_text())
    assert stage1["warm_start"]["run"] == str(day2) and "fold_in" not in stage1["warm_start"]
    assert "fold_in: false" in (day3 / "config.yaml").read_text()
    assert "recommendations_kept" not in json.loads((day3 / "outputs" / "metrics.json").read_text())
    assert warm.nights_folded_in(str(day2)) == 1 and warm.nights_folded_in(str(day3)) == 0


@pytest.mark.slow
def test_fold_in_nights_stack_layers_over_a_table_that_outlives_its_run_and_are_compacted_at_the_limit(
    tmp_path, monkeypatch, caplog
):
    """Three fold-in nights with a training sample (pipeline.train_share): each night's scored tables (and their
    samples) are the night before's files plus a layer, read as what scoring every row gives; deleting the first
    night (retention) leaves the third readable and verified; with the layer limit reached, a night writes whole,
    and so does a night whose session context differs from the night before's (stage 1 computes those columns;
    stages 2 and 3, whose inputs they are, start cold)."""
    import shutil

    import polars as pl

    from recdist import integrity
    from recdist.data.dataset import read_manifest, read_rank
    from recdist.infer import scored
    from recdist.infer.scored import ScoreOptions, score_local
    from recdist.pipeline import run_pipeline
    from recdist.train.sampling import TrainShare

    days = [_rows(range(1, 61), range(100, 140), seed=1)]
    days.append(days[0] + _rows(range(3, 6), range(140, 142), seed=2) + _rows(range(61, 64), range(100, 140), seed=3))
    days.append(days[1] + _rows(range(7, 9), range(142, 144), seed=4) + _rows(range(64, 66), range(100, 140), seed=5))
    runs = [tmp_path / "runs" / f"date=2026-12-0{k + 1}" for k in range(3)]
    for k, rows in enumerate(days):
        _write_csv(tmp_path / f"day{k + 1}.csv", rows)
        config = _night(tmp_path / f"day{k + 1}.csv", fold_in=True)
        config.pipeline.train_share.fraction = 0.5
        run_pipeline(config, str(runs[k]), warm_start="auto" if k else None)
    shutil.rmtree(runs[0])  # what keep_last does to the oldest night: its files live on in the later nights' tables
    order = ["user_idx", "item_idx"]
    for stage, column, upstream in (("reliability", "pred_error", "mf"), ("rating", "pred_rating", "reliability")):
        table = str(runs[2] / stage / "scored")
        integrity.verify(table, fix="re-run the night")
        assert [layer["users"] is None for layer in read_manifest(table)["layers"]] == [True, False, False]
        again = tmp_path / f"again-{stage}"
        share = TrainShare(0.5, config.prepare.seed) if stage == "reliability" else None  # stage 3 writes none
        options = ScoreOptions(role=stage, fallback_model=str(runs[2] / "mf" / "model"), share=share)
        score_local(str(runs[2] / stage / "model"), str(runs[2] / upstream / "scored"), str(again), options)
        for sub in ("", "sample") if share else ("",):
            layered = read_rank(f"{table}/{sub}" if sub else table).sort(order)
            full = read_rank(str(again / sub) if sub else str(again)).sort(order)
            assert layered.select(*order, "split").equals(full.select(*order, "split")), (stage, sub)
            assert (layered[column] - full[column]).abs().max() < 1e-6, (stage, sub)
    sample = str(runs[2] / "reliability" / "scored" / "sample")
    assert read_manifest(str(runs[2] / "reliability" / "scored"))["sample"]["n_ratings"] == read_rank(sample).height

    monkeypatch.setattr(scored, "MAX_LAYERS", 3)  # night 4 finds 3 layers: its tables are written whole
    _write_csv(tmp_path / "day4.csv", days[2] + _rows(range(66, 68), range(100, 140), seed=6))
    config = _night(tmp_path / "day4.csv", fold_in=True)
    config.pipeline.train_share.fraction = 0.5
    day4 = tmp_path / "runs" / "date=2026-12-04"
    run_pipeline(config, str(day4), warm_start="auto")
    assert all(read_manifest(str(day4 / s / "scored")).get("layers") is None for s in ("mf", "reliability", "rating"))
    assert read_rank(str(day4 / "rating" / "scored")).height == pl.read_csv(tmp_path / "day4.csv").height

    caplog.set_level("INFO", logger="recdist.pipeline")
    caplog.clear()
    (day4 / "rating" / "scored" / "ratings" / "part-00000.parquet").unlink()  # lost since: stage 3 scores every row
    day5 = tmp_path / "runs" / "date=2026-12-05"
    run_pipeline(config, str(day5), warm_start="auto")
    whole = [r.getMessage() for r in caplog.records if "every row scored, none taken from" in r.getMessage()]
    assert [m.split(":")[0] for m in whole] == ["rating"] and whole[0].endswith("ratings/part-00000.parquet is gone")
    assert read_rank(str(day5 / "rating" / "scored")).height == pl.read_csv(tmp_path / "day4.csv").height
    caplog.clear()
    config.pipeline.session.windows = (30, 300)  # the carried rows' session columns would be the old windows'
    run_pipeline(config, str(tmp_path / "runs" / "date=2026-12-06"), warm_start="auto")
    whole = [r.getMessage() for r in caplog.records if "every row scored, none taken from" in r.getMessage()]
    assert [m.split(":")[0] for m in whole] == ["mf", "reliability", "rating"]
    assert whole[0].endswith("pipeline.session differs")
    cold = [r.getMessage() for r in caplog.records if "starts cold, not from" in r.getMessage()]  # other inputs
    assert [m.split(":")[0] for m in cold] == ["reliability", "rating"]
    assert all(m.endswith("pipeline.session differs") for m in cold)


def test_changed_users_from_the_datasets_fingerprints_or_from_their_ratings(tmp_path):
    """changed_users tells whose ratings differ between two prepared datasets, by users.parquet's counts and
    fingerprints (every rating, or the training ones), or, for a dataset prepared before those columns, from its
    ratings: the same answer, checked against sets of (movie, rating) per user."""
    import pyarrow.parquet as pq

    from recdist.config import load_config
    from recdist.data import dataset
    from recdist.data.prepare import prepare

    yesterday = _rows(range(1, 31), range(100, 120), seed=4)
    today = [r if r[0] != 7 else (r[0], r[1], r[2] % 5 + 1, r[3]) for r in yesterday]  # user 7 re-rates them all
    today = [r if r[0] != 8 else (*r[:3], r[3] + 3600) for r in today]  # user 8 the same values, an hour later
    today += _rows(range(10, 16), range(120, 122), seed=5) + _rows(range(31, 34), range(100, 120), seed=6)
    days = {}
    for day, rows in (("day1", yesterday), ("day2", today)):
        _write_csv(tmp_path / f"{day}.csv", rows)
        cfg = load_config(None, {"source.path": str(tmp_path / f"{day}.csv"), "prepare.shards": 2})
        cfg.prepare.previous = days.get("day1")
        days[day] = str(tmp_path / day)
        prepare(cfg, days[day])

    def by_hand(every_split: bool) -> set[int]:
        before, after = (_ratings_by_user(days[day], every_split) for day in ("day1", "day2"))
        return {u for u in dataset.read_users(days["day2"])["user_id"].to_list() if before.get(u) != after.get(u)}

    def found(every_split: bool) -> set[int]:
        changed = warm.changed_users(days["day1"], days["day2"], every_split=every_split)
        ids = dataset.read_users(days["day2"]).sort("user_idx")["user_id"].to_numpy()
        return {int(u) for u in ids[changed]}

    assert {7, 8, 31, 32, 33} <= by_hand(True) and by_hand(False) <= by_hand(True) and len(by_hand(True)) < 20
    assert 8 not in by_hand(False)  # the same training ratings: stage 1's factors need not move
    assert (found(True), found(False)) == (by_hand(True), by_hand(False))
    for day in days.values():  # datasets prepared before the fingerprint columns: computed from the ratings
        users = pq.read_table(f"{day}/users.parquet")
        pq.write_table(users.select(["user_idx", "user_id", "n_train"]), f"{day}/users.parquet")
    assert (found(True), found(False)) == (by_hand(True), by_hand(False))


def test_a_fold_in_counts_its_nights_in_a_row_and_every_refresh_every_th_starts_warm_without_folding_in(tmp_path):
    """recdist.pipeline._refreshing: tonight's fold-in continues the previous run's count (its stage 1's
    warm_start.folded), and the refresh_every-th night in a row is a plain warm start (fold_in false), whose count
    the next night starts again from; without fold_in nothing changes."""
    from recdist.config import load_config
    from recdist.pipeline import _refreshing

    def night(name: str, start: dict | None) -> warm.WarmStart:
        where = tmp_path / name / "mf" / "model"
        where.mkdir(parents=True)
        (where / "metrics.json").write_text(json.dumps({"warm_start": start} if start else {}))
        return warm.WarmStart(run=str(tmp_path / name), model=str(where), data="d", stage_hash="h")

    cfg = load_config(None, {"pipeline.warm.fold_in": True, "pipeline.warm.refresh_every": 3})
    plain = night("d1", None)
    one = night("d2", {"run": plain.run, "fold_in": True, "folded": 1})
    two = night("d3", {"run": one.run, "fold_in": True, "folded": 2})
    older = night("d4", {"run": plain.run, "fold_in": True})  # a fold-in of before the count: one night
    assert [warm.nights_folded_in(n.run) for n in (plain, one, two, older)] == [0, 1, 2, 1]
    tonight = {n.run: _refreshing(cfg, n) for n in (plain, one, two)}
    assert [(c.pipeline.warm.fold_in, w.folded) for c, w in tonight.values()] == [(True, 1), (True, 2), (False, 0)]
    assert "folded" not in tonight[two.run][1].to_json() and tonight[plain.run][1].to_json()["folded"] == 1
    unfolded = load_config(None, {"pipeline.warm.refresh_every": 3})
    assert _refreshing(unfolded, two) == (unfolded, two)  # no fold-in asked: as it was
    assert _refreshing(cfg, None) == (cfg, None)


def test_rows_without_training_ratings_then_train_as_new_ones():
    """trained_rows: a known user or movie whose previous row had no training rating (its cold initialisation) is
    not frozen by a fold-in and trains at the new rows' rate, as a new one does."""
    rows = np.array([0, -1, 2, 1])  # today's rows -> previous rows (-1: new)
    assert warm.trained_rows(rows, np.array([5, 0, 3])).tolist() == [True, False, True, False]
