"""The Gibbs solver (Bayesian biased MF): planted structure recovered, seeded, the saved model = the sample average."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import N_ITEMS, N_USERS, planted_frame
from test_train import _digest, rank_data

from recdist.config import StageConfig, TrainConfig
from recdist.errors import ConfigError
from recdist.models.io import load_model, save_model
from recdist.train import checkpoint
from recdist.train.data import RankData
from recdist.train.gibbs import GibbsSolver, wishart
from recdist.train.loop import Trainer
from recdist.train.run import build_model, model_from_state
from recdist.train.solvers import default_lr

SHORT = {"rank": 3, "burn_in": 4, "thin": 2}


@pytest.fixture(scope="module")
def planted() -> RankData:
    return rank_data(planted_frame(n_rows=3000, rank=3, noise=0.3))


def make(data: RankData, model: str = "biased_mf", epochs: int = 12, seed: int = 0, **gibbs) -> Trainer:
    train = TrainConfig(solver="gibbs", epochs=epochs, patience=0, seed=seed, gibbs={**SHORT, **gibbs})
    stage = StageConfig(model=model, train=train)
    return Trainer(build_model(stage, data.dims), stage.train, data)


def _rmse(pred: torch.Tensor, target: torch.Tensor) -> float:
    return float((pred - target).square().mean().sqrt())


def test_gibbs_recovers_a_planted_low_rank_pattern(planted: RankData) -> None:
    trainer = make(planted, epochs=60, burn_in=10, thin=1)
    trainer.fit()
    test = planted.test
    baseline = _rmse(torch.full_like(test.target, planted.dims.global_mean), test.target)
    with torch.no_grad():
        biases_only = trainer.model.global_mean + trainer.model.user_bias(test.user)[:, 0]
        biases_only = biases_only + trainer.model.item_bias(test.item)[:, 0]
    final = trainer.final_metrics()
    # the noise is 0.3: the planted rank-3 structure is found (the biases alone and the mean are far worse)
    assert final["test"]["rmse"] < 0.45 < 0.6 * baseline
    assert final["test"]["rmse"] < 0.7 * _rmse(biases_only, test.target)
    assert trainer.best_epoch >= 10  # burn-in epochs are never the kept result


def test_gibbs_is_seeded(planted: RankData) -> None:
    runs = [make(planted, epochs=7, seed=s) for s in (3, 3, 4)]
    rows = [[{k: v for k, v in r.items() if k not in ("seconds", "rows_per_s")} for r in t.fit()] for t in runs]
    assert rows[0] == rows[1] and _digest(runs[0].model) == _digest(runs[1].model)
    assert rows[0] != rows[2]


def test_saved_model_predicts_the_average_of_the_kept_samples(planted: RankData, tmp_path) -> None:
    trainer = make(planted, epochs=11)  # burn-in 4, then sweeps 4, 6, 8, 10 kept
    solver = trainer.solver
    assert isinstance(solver, GibbsSolver)
    samples = []
    while not trainer.done:
        epoch = trainer.epoch
        trainer.train_epoch()
        if epoch >= 4 and (epoch - 4) % 2 == 0:
            samples.append((solver.user.clone(), solver.item.clone()))
    trainer.finish()
    assert len(samples) == 4 and trainer.best_epoch in (4, 6, 8, 10)
    kept = samples[: (trainer.best_epoch - 4) // 2 + 1]  # early stopping keeps the best average
    user, item = torch.meshgrid(torch.arange(N_USERS), torch.arange(N_ITEMS), indexing="ij")
    user, item = user.reshape(-1), item.reshape(-1)
    mu = planted.dims.global_mean
    average = torch.stack([mu + u[user, 3] + v[item, 3] + (u[user, :3] * v[item, :3]).sum(1) for u, v in kept]).mean(0)
    model = trainer.model
    assert model.user_factors.weight.shape == (N_USERS, 3 * len(kept))
    assert model.config.rank == 3 * len(kept)
    with torch.no_grad():
        assert torch.allclose(model.score(user, item).double(), average, atol=1e-5)
    save_model(model, str(tmp_path / "m"))
    loaded = load_model(str(tmp_path / "m"))  # a plain biased_mf of width 3 x samples
    assert loaded.registry_name == "biased_mf" and loaded.config.rank == 3 * len(kept)
    with torch.no_grad():
        assert torch.allclose(loaded.score(user, item).double(), average, atol=1e-5)
    stage = StageConfig(model="biased_mf", train=trainer.cfg)
    rebuilt = model_from_state(stage, planted.dims, model.state_dict())  # what `recdist train` commits
    with torch.no_grad():
        assert torch.equal(rebuilt.score(user, item), model.score(user, item))


def test_gibbs_resumes_from_a_checkpoint_identically(planted: RankData, tmp_path) -> None:
    whole = make(planted, epochs=10)
    rows = whole.fit()
    first = make(planted, epochs=10)
    for _ in range(7):  # mid-sampling: the model holds a wider average than a fresh one
        first.train_epoch()
    checkpoint.save_state(first.state_dict(), str(tmp_path), attempt=0)
    second = make(planted, epochs=10)
    second.load_state_dict(checkpoint.load_state(str(tmp_path)))
    resumed = second.fit()
    drop = ("seconds", "rows_per_s")
    assert [{k: v for k, v in r.items() if k not in drop} for r in resumed] == [
        {k: v for k, v in r.items() if k not in drop} for r in rows
    ]
    assert _digest(second.model) == _digest(whole.model)


def test_plain_mf_keeps_zero_biases(planted: RankData) -> None:
    trainer = make(planted, model="mf", epochs=8)
    trainer.fit()
    assert not trainer.model.user_bias.weight.any() and not trainer.model.item_bias.weight.any()
    assert math.isfinite(trainer.final_metrics()["val"]["rmse"])


def test_gibbs_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="keeps no sample"):
        TrainConfig(solver="gibbs", epochs=10, gibbs={"burn_in": 10})
    with pytest.raises(ConfigError, match="cannot train"):
        planted_data = rank_data(planted_frame(n_rows=200))
        stage = StageConfig(model="sigmoid_mf", train=TrainConfig(solver="gibbs", epochs=12))
        Trainer(build_model(stage, planted_data.dims), stage.train, planted_data)
    assert default_lr(build_model(StageConfig(model="biased_mf"), rank_data(planted_frame(200)).dims), "gibbs") is None


def test_wishart_draws_have_their_mean() -> None:
    rng = np.random.default_rng(0)
    scale = np.array([[2.0, 0.5], [0.5, 1.0]])
    mean = np.mean([wishart(scale, 7.0, rng) for _ in range(4000)], axis=0)
    np.testing.assert_allclose(mean, 7.0 * scale, rtol=0.05, atol=0.1)  # E = dof x scale
