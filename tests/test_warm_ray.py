"""The stage-1 warm start through the pipeline: two nightly runs, the second `--warm-start auto`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import SMALL_RUN

from recdist.config import load_config
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
    run_pipeline(_config(), str(day2), warm_start="auto")

    run = _json(day2 / "manifest.json")
    assert run["status"] == "complete" and run["warm_start"]["run"] == str(day1)
    stage1, stage1_before = _json(day2 / "mf" / "manifest.json"), _json(day1 / "mf" / "manifest.json")
    assert stage1["warm_start"]["model"] == str(day1 / "mf" / "model")
    assert stage1["warm_start"]["stage_hash"] == stage1_before["stage_hash"] != stage1["stage_hash"]
    model = _json(day2 / "mf" / "model" / "manifest.json")
    assert model["warm_start"]["run"] == str(day1)
    history_lr = _json(day1 / "mf" / "model" / "metrics.json")["train_config"]["lr"]
    assert model["stage"]["train"]["lr"] is not None and model["stage"]["train"]["lr"] <= (history_lr or 1)
