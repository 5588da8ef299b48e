"""The stage-1 warm start through the pipeline: two nightly runs, the second `--warm-start auto`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import SMALL_RUN

from recdist.config import WarmConfig, load_config
from recdist.models.io import load_model
from recdist.pipeline import run_pipeline

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _config():
    return load_config(
        None,
        {
            "source.dataset": "synthetic",
            "synth": {"n_users": 200, "n_items": 80, "n_ratings": 5000, "min_user_ratings": 5, "seed": 1},
            **SMALL_RUN,
            "stages.mf": {"model": "biased_mf", "params": {"rank": 4}, "train": {"epochs": 4, "solver": "sgd"}},
            "stages.reliability.train": {"epochs": 1, "batch_size": 512, "patience": 0},
            "stages.rating.train": {"epochs": 1, "batch_size": 512, "patience": 0},
        },
    )


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def test_a_nightly_run_warm_starts_stage_1_from_the_last_complete_run(ray_cluster, tmp_path):
    day1, day2 = tmp_path / "date=2026-12-01", tmp_path / "date=2026-12-02"
    run_pipeline(_config(), str(day1))
    loose = _config()  # stages 2 and 3 barely train on tiny data: keep every warm fit, whatever its RMSE
    loose.pipeline.warm = WarmConfig(tolerance=1.0)
    run_pipeline(loose, str(day2), warm_start="auto")

    run = _json(day2 / "manifest.json")
    assert run["status"] == "complete" and run["warm_start"]["run"] == str(day1)
    stage1, stage1_before = _json(day2 / "mf" / "manifest.json"), _json(day1 / "mf" / "manifest.json")
    assert stage1["warm_start"]["model"] == str(day1 / "mf" / "model")
    assert stage1["warm_start"]["stage_hash"] == stage1_before["stage_hash"] != stage1["stage_hash"]
    model = _json(day2 / "mf" / "model" / "manifest.json")
    assert model["warm_start"]["run"] == str(day1)
    history_lr = _json(day1 / "mf" / "model" / "metrics.json")["train_config"]["lr"]
    assert model["stage"]["train"]["lr"] is not None and model["stage"]["train"]["lr"] <= (history_lr or 1)
    assert model["stage"]["train"]["patience"] == 1  # pipeline.warm.patience
    for name in ("reliability", "rating"):  # stages 2 and 3 start from yesterday's weights too, in their hash
        stage, before = _json(day2 / name / "manifest.json"), _json(day1 / name / "manifest.json")
        assert stage["warm_start"]["model"] == str(day1 / name / "model") and stage.get("warm_fallback") is None
        assert stage["warm_start"]["stage_hash"] == before["stage_hash"]
        assert _json(day2 / name / "model" / "manifest.json")["warm_start"]["run"] == str(day1)
        # pipeline.warm.mlp_epochs = 0: yesterday's weights as they were, on today's stage-1 tables
        assert _json(day2 / name / "model" / "metrics.json")["epochs"] == 0
        today, yesterday = (load_model(str(run / name / "model")) for run in (day2, day1))
        for (key, p), (_, q) in zip(today.named_parameters(), yesterday.named_parameters(), strict=True):
            assert torch.equal(p, q), key
        assert not torch.equal(today.frozen.user_factors, yesterday.frozen.user_factors)
    assert "the previous weights kept, validation RMSE" in "".join(p.read_text() for p in (day2 / "logs").iterdir())

    # day 3 must beat day 2 by a full RMSE point (tolerance -1): every warm fit falls back to a cold one
    strict = _config()
    strict.pipeline.warm = WarmConfig(tolerance=-1.0)
    day3 = tmp_path / "date=2026-12-03"
    run_pipeline(strict, str(day3), warm_start=str(day2))
    stage1, metrics = _json(day3 / "mf" / "manifest.json"), _json(day3 / "mf" / "model" / "metrics.json")
    assert stage1["warm_fallback"]["tolerance"] == -1.0 and stage1["warm_start"]["run"] == str(day2)
    assert metrics["warm_fallback"]["previous_val_rmse"] == _json(day2 / "mf" / "model" / "metrics.json")["val"]["rmse"]
    assert metrics["train_config"]["patience"] == strict.stages.mf.train.patience  # the cold fit's settings
    assert _json(day3 / "mf" / "model" / "manifest.json")["warm_fallback"] == metrics["warm_fallback"]
    for name in ("reliability", "rating"):  # their inputs moved with the cold stage 1: they start cold
        assert "warm_start" not in _json(day3 / name / "model" / "metrics.json")
    log_text = "".join(p.read_text() for p in (day3 / "logs").iterdir())
    assert "refitting cold" in log_text and "reliability: starts cold: mf was refit cold" in log_text


@pytest.mark.s3
@pytest.mark.timeout(900)
def test_a_warm_start_through_s3(ray_cluster, s3_server, s3_bucket):
    from recdist import storage

    day1, day2 = f"{s3_bucket}/runs/date=2026-12-01", f"{s3_bucket}/runs/date=2026-12-02"
    run_pipeline(_config(), day1)
    loose = _config()  # keep every warm fit (tiny data); a fold-in night, on the same ratings: nothing changed
    loose.pipeline.warm = WarmConfig(tolerance=1.0, fold_in=True)
    run_pipeline(loose, day2, warm_start="auto")  # found by listing the bucket's runs/ prefix

    run = storage.read_json(f"{day2}/manifest.json")
    assert run["status"] == "complete" and run["warm_start"]["run"] == day1
    for name in ("mf", "reliability", "rating"):
        stage = storage.read_json(f"{day2}/{name}/manifest.json")
        assert stage["warm_start"]["model"] == f"{day1}/{name}/model" and stage.get("warm_fallback") is None
    metrics = storage.read_json(f"{day2}/mf/model/metrics.json")
    assert metrics["warm_start"]["data"] == f"{day1}/data"  # yesterday's id maps, read from the bucket
    assert metrics["warm_start"]["fold_in"] is True and metrics["warm_start"]["folded"] == 1
    # every user had nothing new: each one's scores and recommendations are taken from the bucket's day 1
    outputs = storage.read_json(f"{day2}/outputs/metrics.json")
    n_users = storage.read_json(f"{day2}/data/manifest.json")["n_users"]
    assert outputs["recommendations_kept"] == {"users": n_users, "ranked": 0}
    for name, column in (("reliability", "pred_error"), ("rating", "pred_rating")):
        before, now = (storage.read_parquet(f"{day}/{name}/scored/ratings/part-00000.parquet", columns=[column])
                       for day in (day1, day2))  # fmt: skip
        assert before.equals(now), name
        linked = storage.read_json(f"{day2}/{name}/scored/manifest.json")["layers"]  # server-side copies, no layer
        assert [layer["users"] for layer in linked] == [None] and linked[0]["files"], name
