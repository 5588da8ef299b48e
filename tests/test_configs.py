"""The shipped configs' stage 1 and the MF defaults are the ones bench/family.py chose (README: "Stage-1 defaults")."""

from __future__ import annotations

from pathlib import Path

import pytest

from recdist.config import load_config
from recdist.models import registry
from recdist.train import solvers

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
#: bench/family.py's choice for synthetic and ml-20m-sized data: biased MF, per-rating SGD, cosine schedule
FAMILY_STAGE_1 = {"rank": 32, "reg": 0.05, "reg_bias": 0.01}
FAMILY_TRAIN = {"solver": "sgd", "lr": 0.04, "epochs": 20, "lr_schedule": "cosine", "patience": 3}


@pytest.mark.parametrize("name", ["ml20m-cpu.yaml", "ml20m-gpu.yaml", "quickstart.yaml"])
def test_shipped_stage_1_is_the_family_choice(name):
    mf = load_config(str(CONFIGS / name)).stages.mf
    assert mf.model == "biased_mf"
    assert mf.params == FAMILY_STAGE_1
    assert {k: getattr(mf.train, k) for k in FAMILY_TRAIN} == FAMILY_TRAIN


def test_ml_latest_small_stage_1_keeps_the_real_data_regularisation():
    mf = load_config(str(CONFIGS / "ml-latest-small.yaml")).stages.mf
    assert mf.model == "biased_mf" and mf.params["reg"] == 0.08


def test_mf_defaults():
    """Out of the box (no config): rank 32, reg 0.08 (what real ml-latest-small needs), SGD at 0.04."""
    for name in ("mf", "biased_mf"):
        cfg = registry.validate(name, {})
        assert (cfg.rank, cfg.reg) == (32, 0.08)
    assert solvers.SGD_LR == 0.04
