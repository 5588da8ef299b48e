"""The model contract (lkpy style): one mixin of tests that every registered model passes on tiny planted data.

Each model is built from table sizes and a seeded generator, trained a few epochs with the real Trainer on a
dataset written in the real prepared layout (read back through load_rank_data), and must: lower its training
loss, beat the predictor of the mean target by a margin on validation and test rows, predict finite values
for new rows, come back from recdist.models.io with identical predictions, and give the same numbers for the
same seed. The RNCF stages 2 and 3 attach to a biased MF trained here first; stage 2 learns an error level
planted on the items. The autoencoder's masked loss gets its own checks at the end.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, ClassVar

import polars as pl
import pytest
import torch
from helpers import N_ITEMS, N_USERS, planted_frame, write_dataset

from recdist.config import StageConfig, TrainConfig
from recdist.models import registry
from recdist.models.base import Dropout, dropout, mlp
from recdist.models.batch import Batch
from recdist.models.io import load_model, save_model
from recdist.models.losses import data_loss
from recdist.train.data import RankData, load_rank_data
from recdist.train.loop import Trainer
from recdist.train.run import build_model

TIMING = ("seconds", "rows_per_s")
#: Every row's noise is +-sigma (not Gaussian) so a squared error mostly carries sigma^2: a learnable level.
QUIET, NOISY = 0.15, 0.9


def strip(rows: list[dict[str, float]]) -> list[dict[str, float]]:
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


def mean_rmse(data: RankData, split: str) -> float:
    """RMSE of predicting every row of `split` by the training mean of the target (the bar to beat)."""
    target = data.split(split).target
    return float((target - data.train.target.mean()).square().mean().sqrt())


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread is faster, and immune to other processes on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------- planted data


@pytest.fixture(scope="module")
def rating_data(tmp_path_factory) -> str:
    """Planted rank-3 ratings with biases, in the prepared-dataset layout (4 shards)."""
    return write_dataset(tmp_path_factory.mktemp("ratings") / "data", planted_frame(), shards=4)


def noisy_items_frame() -> pl.DataFrame:
    """Planted ratings with +-NOISY noise on odd items (also rated 1 star lower) and +-QUIET on even ones: an
    error level per item that stage 1's item biases carry, so stage 2 can learn it from them. The noise's
    sign is kept in a `noise_sign` column (not written to the dataset)."""
    frame = planted_frame(n_rows=3600, rank=2, noise=0.0)
    g = torch.Generator().manual_seed(11)
    sign = torch.randint(0, 2, (frame.height,), generator=g).float() * 2 - 1
    odd = torch.from_numpy(frame["item_idx"].to_numpy().copy()) % 2 == 1
    shift = torch.where(odd, -1.0, 0.0) + sign * torch.where(odd, NOISY, QUIET)
    rating = torch.from_numpy(frame["rating"].to_numpy().copy()) + shift
    return frame.with_columns(
        pl.Series("rating", rating.clamp(0.5, 5.0).numpy()), pl.Series("noise_sign", sign.numpy())
    )


@pytest.fixture(scope="module")
def stage1(tmp_path_factory) -> dict[str, Any]:
    """A biased MF trained on the noisy-items ratings, and the scored table stages 2 and 3 train on.

    As the pipeline's stage-1 inference writes them: mf_pred, error = (rating - mf_pred)^2 and the session
    context on every row. pred_error stands in for stage 2's output and is planted to carry the noise's sign
    (higher when the noise pushed the rating up): stage 3 can only beat stage 1 by reading it.
    """
    root = tmp_path_factory.mktemp("stage1")
    frame = noisy_items_frame()
    mf, mf_pred = fit_stage_1(root, frame, reg=0.02, epochs=25)
    error = (torch.from_numpy(frame["rating"].to_numpy().copy()) - mf_pred).square()
    item = torch.from_numpy(frame["item_idx"].to_numpy().copy()).long()
    level = torch.where(item % 2 == 1, NOISY**2, QUIET**2)  # the planted truth of the error
    sign = torch.from_numpy(frame["noise_sign"].to_numpy().copy())
    g = torch.Generator().manual_seed(5)
    pred_error = level * torch.exp(0.5 * sign + 0.1 * torch.randn(len(level), generator=g))
    extra = {"error": error.tolist(), "pred_error": pred_error.tolist(), "mf_pred": mf_pred.tolist()}
    extra |= session_of(frame.with_columns(mf_pred=pl.Series(mf_pred.numpy())))
    return {"mf": mf, "scored": write_dataset(root / "scored", frame, shards=2, extra=extra)}


def fit_stage_1(root, frame: pl.DataFrame, *, reg: float, epochs: int) -> tuple[torch.nn.Module, torch.Tensor]:
    """A rank-3 biased MF trained on `frame`, and its prediction of every row as stage-1 scoring writes it:
    clipped to the rating scale."""
    data = load_rank_data(write_dataset(root / "ratings", frame, shards=2), target="rating")
    stage = StageConfig(model="biased_mf", params={"rank": 3, "reg": reg}, train=train_config(epochs=epochs, lr=0.02))
    mf = build_model(stage, data.dims)
    Trainer(mf, stage.train, data).fit()
    mf.eval()
    user, item = (torch.from_numpy(frame[c].to_numpy().copy()).long() for c in ("user_idx", "item_idx"))
    with torch.no_grad():
        return mf, mf(Batch(user, item)).clamp(0.5, 5.0)


def session_of(frame: pl.DataFrame) -> dict[str, list[float]]:
    """The session columns the pipeline's stage-1 inference adds, as write_dataset's `extra`."""
    from recdist.infer.session import DEFAULT_SESSION, session_columns

    return session_columns(frame, DEFAULT_SESSION).to_dict(as_series=False)


# ------------------------------------------------------------------------------------------- the contract


def train_config(**overrides: Any) -> TrainConfig:
    """Tiny-data training: small global batches, constant rate, no early stop (the loss must fall anyway)."""
    settings = {"batch_size": 128, "epochs": 8, "lr": 0.01, "lr_schedule": "constant", "patience": 0}
    return TrainConfig(**{**settings, **overrides})


class ModelContract:
    """What every registered model must do. Subclasses name the model, its params and training settings."""

    model: ClassVar[str]
    params: ClassVar[dict[str, Any]] = {}
    train: ClassVar[dict[str, Any]] = {}
    margin: ClassVar[float] = 0.85
    """Validation and test RMSE must be below margin x the mean predictor's."""

    # -- hooks: how this model gets its data and its upstream

    @pytest.fixture(scope="class")
    @classmethod
    def source(cls, rating_data: str) -> str:
        return rating_data

    @pytest.fixture(scope="class")
    @classmethod
    def upstream(cls) -> torch.nn.Module | None:
        return None

    # -- fixtures shared by the class's tests

    @pytest.fixture(scope="class")
    @classmethod
    def data(cls, source: str) -> RankData:
        module = registry.get(cls.model).module
        return load_rank_data(source, target=module.target, inputs=tuple(module.inputs), context=module.needs_context)

    @classmethod
    def trained(cls, data: RankData, upstream: torch.nn.Module | None, seed: int = 0, **train: Any) -> Trainer:
        settings = train_config(seed=seed, **{**cls.train, **train})
        stage = StageConfig(model=cls.model, params=cls.params, train=settings)
        model = build_model(stage, data.dims)
        if upstream is not None:
            model.attach(upstream)
        trainer = Trainer(model, stage.train, data)
        trainer.fit()
        return trainer

    @pytest.fixture(scope="class")
    @classmethod
    def fitted(cls, data: RankData, upstream) -> Trainer:
        return cls.trained(data, upstream)

    # -- the tests

    def test_builds_from_sizes_and_a_seeded_generator(self, data: RankData) -> None:
        entry = registry.get(self.model)
        config = registry.validate(self.model, self.params)
        a, b = (entry.module(config, data.dims, torch.Generator().manual_seed(s)) for s in (1, 1))
        c = entry.module(config, data.dims, torch.Generator().manual_seed(2))
        assert entry.module.registry_name == self.model and entry.summary
        for name, tensor in a.state_dict().items():
            torch.testing.assert_close(tensor, b.state_dict()[name], rtol=0, atol=0)
        drawn = [n for n, t in a.state_dict().items() if t.numel() and not torch.equal(t, c.state_dict()[n])]
        assert drawn or self.model in ("reliability_mlp", "rating_mlp"), "the seed draws no weight"

    def test_loss_falls_and_beats_the_mean(self, fitted: Trainer, data: RankData) -> None:
        rows = fitted.history
        assert rows[-1]["train_loss"] < 0.9 * rows[0]["train_loss"]
        final = fitted.final_metrics()
        for split in ("val", "test"):
            assert final[split]["rmse"] < self.margin * mean_rmse(data, split), (split, final[split])

    def test_predicts_finite_values_for_new_rows(self, fitted: Trainer, data: RankData) -> None:
        model = fitted.model.eval()
        every = torch.arange(N_USERS * N_ITEMS)
        features = torch.ones(len(every), len(model.inputs)) if model.inputs else None
        with torch.no_grad():
            pred = model(Batch(every // N_ITEMS, every % N_ITEMS, features=features, feature_names=model.inputs))
        assert pred.shape == (N_USERS * N_ITEMS,) and torch.isfinite(pred).all()
        assert pred.std() > 0.05  # not collapsed to a constant (the seed's stage 2 did)

    def test_save_load_round_trip_predicts_identically(self, fitted: Trainer, data: RankData, tmp_path) -> None:
        save_model(fitted.model, str(tmp_path / "model"))
        loaded = load_model(str(tmp_path / "model"))
        assert type(loaded) is type(fitted.model) and loaded.config == fitted.model.config
        with torch.no_grad():
            torch.testing.assert_close(loaded(data.test), fitted.model.eval()(data.test), rtol=0, atol=0)

    def test_same_seed_same_numbers(self, data: RankData, upstream) -> None:
        """Two runs of the same seed agree to the bit (dropout and shuffles included); seeds matter as the
        build test shows."""
        a, b = (self.trained(data, upstream, seed=3, epochs=2) for _ in range(2))
        assert strip(a.history) == strip(b.history)
        with torch.no_grad():
            assert torch.equal(a.model.eval()(data.val), b.model.eval()(data.val))


# ------------------------------------------------------------------------------------------- every model


class TestMF(ModelContract):
    model = "mf"
    params = {"rank": 8}
    train = {"solver": "autograd", "lr": 0.05}


class TestBiasedMF(ModelContract):
    model = "biased_mf"
    params = {"rank": 8}
    train = {"solver": "autograd", "lr": 0.05}


class TestBiasedMFCompiledSGD(ModelContract):
    """The same model through the CPU default solver (the compiled per-rating SGD kernel)."""

    model = "biased_mf"
    params = {"rank": 8}
    train = {"solver": "sgd", "lr": 0.02, "epochs": 20}


class TestBiasedMFALS(ModelContract):
    model = "biased_mf"
    params = {"rank": 8, "reg": 0.05}
    train = {"solver": "als", "epochs": 4}


class TestSigmoidMF(ModelContract):
    model = "sigmoid_mf"
    params = {"rank": 8}
    train = {"lr": 0.05}


class TestMFResidualMLP(ModelContract):
    model = "mf_residual_mlp"
    params = {"rank": 8}
    train = {"lr": 0.03}


class TestNCF(ModelContract):
    model = "ncf_mlp"
    params = {"dim": 8}
    train = {"lr": 0.02, "epochs": 12}


class TestAutoencoder(ModelContract):
    model = "autoencoder"
    params = {"hidden": 32}
    train = {"lr": 0.01, "epochs": 12}


class OnStage1(ModelContract):
    """The RNCF stages 2 and 3: they train on stage 1's scored table, attached to its MF."""

    @pytest.fixture(scope="class")
    @classmethod
    def source(cls, stage1) -> str:
        return stage1["scored"]

    @pytest.fixture(scope="class")
    @classmethod
    def upstream(cls, stage1) -> torch.nn.Module:
        return stage1["mf"]

    def test_inference_is_the_plain_mlp_on_the_documented_inputs(self, fitted: Trainer, data: RankData) -> None:
        """Inference (the first layer in per-user, per-item and per-row parts, the row inputs computed as an
        (inputs x rows) block) equals the whole MLP on [user inputs, item inputs, row inputs] built by hand: stage
        1's prediction less the mean, each session window's sum and squares over (n + prior) and log1p(n)
        standardised, and stage 3's log1p of the predicted error standardised."""
        model, batch = fitted.model.eval(), data.test
        f = {name: batch.feature(name).float() for name in batch.feature_names}
        row = [f["mf_pred"] - model.dims.global_mean]
        session = []
        for window in ("short", "long"):
            n = f[f"sess_{window}_n"].clamp_min(0)
            prior = n + model.config.session_prior
            session += [f[f"sess_{window}_sum"] / prior, f[f"sess_{window}_sq"] / prior, n.log1p()]
        mean, std = model.session_stats
        row += [(x - mean[j]) / std[j] for j, x in enumerate(session)]
        if "pred_error" in f:
            row.append((f["pred_error"].clamp_min(0).log1p() - model.error_stats[0]) / model.error_stats[1])
        inputs = [model.frozen.user_inputs[batch.user], model.frozen.item_inputs[batch.item], torch.stack(row, 1)]
        with torch.no_grad():
            out = model.net(torch.cat(inputs, 1)).squeeze(1)
            want = torch.nn.functional.softplus(out) if model.target == "error" else f["mf_pred"] + out
            assert torch.allclose(model(batch), want, atol=1e-5)


class TestReliabilityMLP(OnStage1):
    """Stage 2 fits the squared error of stage 1: it must find the items' planted error levels."""

    model = "reliability_mlp"
    train = {"lr": 0.01, "epochs": 8}

    def test_predicted_error_is_higher_on_noisy_items(self, fitted: Trainer, data: RankData) -> None:
        with torch.no_grad():
            pred = fitted.model.eval()(data.test)
        noisy = data.test.item % 2 == 1
        assert pred[noisy].mean() > 4 * pred[~noisy].mean()
        assert (pred >= 0).all()  # a squared error


class TestRatingMLP(OnStage1):
    """Stage 3: stage 1's prediction plus an MLP correction from the factors and the predicted error."""

    model = "rating_mlp"
    train = {"lr": 0.005, "epochs": 8}

    def test_reads_the_predicted_error(self, fitted: Trainer, data: RankData, stage1) -> None:
        """pred_error carries the planted noise's sign here: stage 3 must beat stage 1 clearly with it."""
        with torch.no_grad():
            mf_rmse = (data.test.feature("mf_pred") - data.test.target).square().mean().sqrt()
        assert fitted.final_metrics()["test"]["rmse"] < 0.8 * float(mf_rmse)


#: Shift of every rating of a session (sign drawn per session): a mood no MF can know.
SESSION_SHIFT = 1.0


@pytest.fixture(scope="module")
def sessions(tmp_path_factory) -> dict[str, Any]:
    """Planted ratings rated in sessions of ten (ten seconds apart, sessions a day apart), every session's
    ratings shifted by +-SESSION_SHIFT; a biased MF on them, and its scored table (pred_error uninformative)."""
    root = tmp_path_factory.mktemp("sessions")
    frame = planted_frame(n_rows=2400, noise=0.2).sort("user_idx", maintain_order=True)
    position = pl.int_range(pl.len()).over("user_idx")
    frame = frame.with_columns(session=position // 10, timestamp=1_000_000 * pl.col("user_idx") + position % 10 * 10)
    frame = frame.with_columns(timestamp=pl.col("timestamp") + pl.col("session") * 86_400)
    g = torch.Generator().manual_seed(3)
    sign = torch.randint(0, 2, (N_USERS, 8), generator=g).float() * 2 - 1
    shift = SESSION_SHIFT * sign[frame["user_idx"].to_numpy().copy(), frame["session"].to_numpy().copy()]
    frame = frame.with_columns(rating=(pl.col("rating") + pl.Series(shift.numpy())).clip(0.5, 5.0)).drop("session")
    mf, mf_pred = fit_stage_1(root, frame, reg=0.05, epochs=20)
    extra = {"pred_error": [0.5] * frame.height, "mf_pred": mf_pred.tolist()}
    extra |= session_of(frame.with_columns(mf_pred=pl.Series(mf_pred.numpy())))
    return {"mf": mf, "scored": write_dataset(root / "scored", frame, shards=2, extra=extra)}


def test_stage_3_removes_a_planted_session_mood_only_through_the_session_context(sessions) -> None:
    """Each session's ratings share a +-1 shift: stage 3 on mf_pred and the session context (no MF tables) must
    beat stage 1 clearly (only a session's first rating has no earlier one to learn it from); the same net
    without the session context cannot."""
    data = load_rank_data(sessions["scored"], target="rating", inputs=registry.get("rating_mlp").module.inputs)
    mf_rmse = float((data.test.feature("mf_pred") - data.test.target).square().mean().sqrt())
    no_tables = {"use_factors": False, "use_bias": False, "use_norms": False}
    rmse = {}
    for use_session in (True, False):
        stage = StageConfig(
            model="rating_mlp", params={**no_tables, "use_session": use_session}, train=train_config(epochs=20)
        )
        model = build_model(stage, data.dims)
        model.attach(sessions["mf"])
        trainer = Trainer(model, stage.train, data)
        trainer.fit()
        rmse[use_session] = trainer.final_metrics()["test"]["rmse"]
    assert rmse[True] < 0.75 * mf_rmse, (rmse, mf_rmse)
    assert rmse[False] > 0.95 * mf_rmse, (rmse, mf_rmse)


CONTRACTS = [c for c in list(globals().values()) if isinstance(c, type) and issubclass(c, ModelContract)]


def test_every_registered_model_has_a_contract() -> None:
    assert set(registry.names()) <= {c.model for c in CONTRACTS if hasattr(c, "model")}


# ------------------------------------------------------------------------------------------- autoencoder mask


@pytest.fixture
def autoencoder(rating_data: str):
    data = load_rank_data(rating_data, target="rating", context=True)
    model = build_model(StageConfig(model="autoencoder", params={"hidden": 16, "dropout": 0.0}), data.dims)
    model.set_context(data.context)
    return model, data


def _with_values(model, value: torch.Tensor):
    """A copy of the autoencoder's context values (in place on the model), for perturbing known entries."""
    model.ctx_value = value
    return model


def test_autoencoder_hidden_entries_are_unknown_to_the_input(autoencoder) -> None:
    """A hidden row's own rating is absent from its item's input: perturbing it changes neither prediction
    nor loss of those rows; the same perturbation of visible rows does change them (the mask is real)."""
    model, data = autoencoder
    batch = Batch(data.train.user[:64], data.train.item[:64], data.train.target[:64])
    key = batch.item * N_USERS + batch.user
    own = torch.searchsorted(model.ctx_key, key)
    assert torch.equal(model.ctx_key[own], key)  # these rows are known entries of the context
    original = model.ctx_value.clone()
    perturbed = original.clone()
    perturbed[own] += 3.0

    model.train()
    model.config.hide_prob = 1.0
    model.config.input_dropout = 0.0
    results = []
    for value in (original, perturbed):
        torch.manual_seed(0)
        step = model.training_batch(batch)
        pred = _with_values(model, value)(step)
        results.append((pred, data_loss(pred, step)))
    assert step.hidden.all()
    # other rows of the same item may differ only through ratings that are not hidden: none here, all are
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=0, atol=0)

    model.config.hide_prob = 0.0  # visible: the rows' own ratings are in the input
    preds = []
    for value in (original, perturbed):
        step = model.training_batch(batch)
        preds.append(_with_values(model, value)(step))
    assert not step.hidden.any()
    assert (preds[0] - preds[1]).abs().max() > 1e-3


def test_autoencoder_loss_weighs_hidden_and_visible_rows(autoencoder) -> None:
    """With visible_weight 0 the loss ignores visible rows' targets entirely (even NaN); hidden ones count."""
    model, data = autoencoder
    batch = Batch(data.train.user[:256], data.train.item[:256], data.train.target[:256])
    model.train()
    model.config.visible_weight = 0.0
    torch.manual_seed(1)
    batch = model.training_batch(batch)
    pred = model(batch)
    hidden = batch.hidden
    assert hidden.any() and not hidden.all()
    base = data_loss(pred, batch)
    spoilt = replace(batch, target=torch.where(hidden, batch.target, torch.nan))
    torch.testing.assert_close(data_loss(pred, spoilt), base, rtol=0, atol=0)
    moved = replace(batch, target=torch.where(hidden, batch.target + 1.0, batch.target))
    assert data_loss(pred, moved) > base + 0.5


def test_autoencoder_never_reads_rows_outside_its_context(autoencoder) -> None:
    """Validation rows are unknown to the input: their values cannot change any prediction."""
    model, data = autoencoder
    model.eval()
    with torch.no_grad():
        before = model(data.val)
        spoilt = Batch(data.val.user, data.val.item, torch.full_like(data.val.target, 99.0))
        after = model(spoilt)
    torch.testing.assert_close(before, after, rtol=0, atol=0)
    key = data.val.item * N_USERS + data.val.user
    assert not torch.isin(key, model.ctx_key).any()


def test_cpu_dropout_drops_at_its_rate_keeps_the_mean_and_follows_the_seed() -> None:
    """base.dropout (every MLP's Dropout, the autoencoder's code): rate p, survivors scaled by 1/(1 - p), the mask
    from the seeded global generator, gradients through the same mask; identity in eval and at p = 0."""
    x = torch.ones(1000, 1000, requires_grad=True)
    for p in (0.1, 0.5):
        torch.manual_seed(3)
        y = dropout(x, p, True)
        dropped = float((y == 0).float().mean())
        assert abs(dropped - p) < 4 * (p * (1 - p) / x.numel()) ** 0.5
        assert torch.unique(y.detach()).tolist() == [0.0, pytest.approx(1 / (1 - p), rel=1e-4)]
        assert abs(float(y.detach().mean()) - 1.0) < 0.01
        torch.manual_seed(3)
        assert torch.equal(dropout(x, p, True), y)
        assert not torch.equal(dropout(x, p, True), y)  # the generator moved on
        y.sum().backward()
        assert torch.equal(x.grad, y.detach())  # d(sum y)/dx = mask x scale = y where x = 1
        x.grad = None
    assert dropout(x, 0.1, False) is x and torch.equal(dropout(x, 0.0, True), x)
    for p in (1.0, 1 - 1e-6):  # at p ~ 1 no survivor to scale (no 0 x inf)
        assert torch.equal(dropout(x, p, True), torch.zeros_like(x))
    layer = Dropout(0.1)
    assert torch.equal(layer.eval()(x), x) and float((layer.train()(x) == 0).float().mean()) > 0.09


def test_building_an_mlp_leaves_the_global_generator_alone() -> None:
    """Layers start from the caller's generator only: building a model does not move the global one (the
    stream dropout and shuffles draw from), so the same seed gives the same training whatever was built."""
    before = torch.get_rng_state()
    net = mlp(12, [8, 4], 1, 0.1, torch.Generator().manual_seed(0), last_std=0.01)
    again = mlp(12, [8, 4], 1, 0.1, torch.Generator().manual_seed(0), last_std=0.01)
    assert torch.equal(torch.get_rng_state(), before)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), again.state_dict().values(), strict=True))
    assert [type(m).__name__ for m in net] == ["Linear", "ReLU", "Dropout", "Linear", "ReLU", "Dropout", "Linear"]
