"""Batch inference core, ranking, metrics and cross-fitting folds: plain PyTorch/Polars on tiny tables."""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
import torch

from recdist.config import Section
from recdist.infer import metrics, topn
from recdist.infer.plan import known_mask
from recdist.infer.scoring import Predictor, ScoringPlan, role_of
from recdist.manifest import RunModels
from recdist.models.base import MFTables, Model
from recdist.models.batch import Batch, Dims
from recdist.schema import SPLIT_TYPE
from recdist.train.sampling import drop_fold, fold_of


class TinyMF(Model):
    """A hand-built biased MF satisfying the model contract (forward, mf_tables; the defaults for the rest)."""

    def __init__(self, p: torch.Tensor, q: torch.Tensor, bu: torch.Tensor, bi: torch.Tensor, mean: float):
        super().__init__(Section(), Dims(len(p), len(q), global_mean=mean))
        self.p, self.q, self.bu, self.bi = (torch.nn.Parameter(t.float()) for t in (p, q, bu, bi))
        self.mean = mean

    def forward(self, batch: Batch) -> torch.Tensor:
        u, i = batch.user, batch.item
        return self.mean + self.bu[u] + self.bi[i] + (self.p[u] * self.q[i]).sum(1)

    def mf_tables(self) -> MFTables:
        p, q, bu, bi = (t.detach() for t in (self.p, self.q, self.bu, self.bi))
        return MFTables(p, q, bu, bi, mu=self.mean, link="identity", biased=True, reg=0.0, reg_bias=0.0, init_std=0.1)


class Constant(Model):
    """Predicts one number for every row: shows which model scored which row."""

    def __init__(self, value: float, target: str = "rating", inputs: tuple[str, ...] = ()):
        super().__init__(Section(), Dims(1, 1))
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.value, self.target, self.inputs = value, target, inputs

    def forward(self, batch: Batch) -> torch.Tensor:
        base = torch.full((len(batch),), self.value) + self.w
        return base if batch.features is None else base + batch.features.sum(1)


def ratings(users, items, values, splits) -> pa.Table:
    return pa.table(
        {
            "user_idx": pa.array(users, pa.int32()),
            "item_idx": pa.array(items, pa.int32()),
            "rating": pa.array(values, pa.float32()),
            "timestamp": pa.array([0] * len(users), pa.int64()),
            "split": pa.array(splits, pa.string()).dictionary_encode().cast(SPLIT_TYPE),
        }
    )


def plan(role: str, known_users, known_items, n_models: int = 1, **kw) -> ScoringPlan:
    return ScoringPlan(
        models=tuple(f"m{k}" for k in range(n_models)),
        role=role,
        global_mean=3.0,
        rating_scale=(0.5, 5.0),
        known_users=tuple(np.array(known_users, bool) for _ in range(n_models)),
        known_items=tuple(np.array(known_items, bool) for _ in range(n_models)),
        **kw,
    )


@pytest.fixture
def mf() -> TinyMF:
    g = torch.Generator().manual_seed(0)
    return TinyMF(
        torch.randn(3, 2, generator=g),
        torch.randn(4, 2, generator=g),
        torch.tensor([0.5, -0.5, 0.2]),
        torch.tensor([0.1, 0.3, -0.4, 1.0]),
        3.0,
    )


def test_mf_role_adds_prediction_and_squared_error_against_the_uncentred_rating(mf):
    table = ratings([0, 1, 2, 0], [0, 1, 2, 3], [4.0, 3.0, 1.0, 5.0], ["train", "train", "val", "test"])
    out = Predictor(plan("mf", [1, 1, 1], [1, 1, 1, 1]), models=[mf])(table)
    with torch.no_grad():
        expect = mf(Batch(torch.tensor([0, 1, 2, 0]), torch.tensor([0, 1, 2, 3]))).clamp(0.5, 5.0)
    assert out.column_names == [*table.column_names, "mf_pred", "error", "cold"]
    assert np.allclose(out["mf_pred"].to_numpy(), expect.numpy(), atol=1e-6)
    assert np.allclose(out["error"].to_numpy(), (np.array([4, 3, 1, 5]) - expect.numpy()) ** 2, atol=1e-5)
    assert out["mf_pred"].type == pa.float32() and out["split"].type == SPLIT_TYPE
    assert not any(out["cold"].to_pylist())


def test_cold_users_and_items_get_mean_plus_known_bias_and_are_flagged(mf):
    # user 2 and item 3 had no training ratings; user 7 / item 9 lie beyond the model's tables
    table = ratings([2, 0, 7, 1, 2], [0, 3, 1, 9, 3], [3.0] * 5, ["test"] * 5)
    out = Predictor(plan("mf", [1, 1, 0], [1, 1, 1, 0]), models=[mf])(table)
    pred = out["mf_pred"].to_numpy()
    assert out["cold"].to_pylist() == [True, True, True, True, True]
    assert pred[0] == pytest.approx(3.0 + 0.1)  # unknown user: mean + b_item
    assert pred[1] == pytest.approx(3.0 + 0.5)  # unknown item: mean + b_user
    assert pred[2] == pytest.approx(3.0 + 0.3)  # user beyond the table: mean + b_item, no crash
    assert pred[3] == pytest.approx(3.0 - 0.5)
    assert pred[4] == pytest.approx(3.0)


def test_reliability_role_clamps_at_zero_and_marks_cold_rows_unreliable():
    table = ratings([0, 1, 1], [0, 0, 1], [3.0] * 3, ["train", "val", "test"])
    table = table.append_column("cold", pa.array([False, True, False]))
    model = Constant(-0.2, target="error")
    assert role_of(model) == "reliability"
    out = Predictor(plan("reliability", [1, 1], [1, 0], cold_error=1.7), models=[model])(table)
    assert out["pred_error"].to_pylist() == pytest.approx([0.0, 0.0, 1.7])
    assert out["cold"].to_pylist() == [False, True, True]  # upstream flag kept, own cold rows added


def test_rating_role_reads_the_models_input_columns_in_order():
    table = ratings([0, 1], [0, 1], [3.0, 4.0], ["train", "test"]).append_column(
        "pred_error", pa.array([0.25, 1.0], pa.float32())
    )
    model = Constant(3.0, inputs=("pred_error",))
    out = Predictor(plan("rating", [1, 1], [1, 1]), models=[model])(table)
    assert out["pred_rating"].to_pylist() == pytest.approx([3.25, 4.0])


def test_crossfitting_routes_each_training_row_to_the_fold_model_that_did_not_see_it():
    rng = np.random.default_rng(0)
    users, items = rng.integers(0, 50, 400), rng.integers(0, 40, 400)
    splits = np.where(np.arange(400) % 5 == 0, "test", "train")
    table = ratings(users, items, [3.0] * 400, splits)
    models = [Constant(1.0), Constant(2.0), Constant(3.0), Constant(4.0)]  # full + 3 fold models
    out = Predictor(plan("mf", [1] * 50, [1] * 40, n_models=4, fold_seed=7), models=models)(table)
    fold = fold_of(users, items, 3, 7)
    expect = np.where(splits == "train", fold + 2.0, 1.0)
    assert np.array_equal(out["mf_pred"].to_numpy(), expect.astype(np.float32))


def test_folds_are_deterministic_balanced_and_drop_only_training_rows():
    rng = np.random.default_rng(1)
    u, i = rng.integers(0, 10_000, 60_000), rng.integers(0, 3_000, 60_000)
    k = fold_of(u, i, 5, seed=3)
    assert np.array_equal(k, fold_of(u.copy(), i.copy(), 5, seed=3))
    assert not np.array_equal(k, fold_of(u, i, 5, seed=4))
    assert np.all(np.abs(np.bincount(k) / len(k) - 0.2) < 0.01)
    frame = pl.from_arrow(ratings(u[:1000], i[:1000], [3.0] * 1000, ["train", "val", "test", "train"] * 250))
    kept = drop_fold(frame, 2, 5, seed=3)
    dropped = frame.join(kept, on=["user_idx", "item_idx"], how="anti")
    assert set(dropped["split"].cast(pl.String)) == {"train"}
    assert set(fold_of(dropped["user_idx"].to_numpy(), dropped["item_idx"].to_numpy(), 5, 3)) == {2}
    assert known_mask(np.array([0, 2, 2]), 4).tolist() == [True, False, True, False]


def test_fold_and_share_hashes_are_pinned():
    """A rating's fold and training-share membership never change with library versions (fixed numbers), and
    they come from the splits' pair hash with their own salt (the same pairs, a different split)."""
    from recdist.data.splits import pair_hash
    from recdist.train.sampling import in_share

    u, i = np.array([0, 1, 2, 3, 138_492, 5]), np.array([0, 7, 3, 26_743, 1, 5])
    assert fold_of(u, i, 5, seed=3).tolist() == [4, 4, 2, 2, 3, 2]
    assert in_share(u, i, 0.5, seed=7).tolist() == [False, False, True, False, True, True]
    assert pair_hash(u, i, salt=0).tolist()[:3] == [0, 7191089600892374487, 12918135221727111561]


def test_split_metrics_sum_over_shards():
    a = pl.DataFrame({"split": ["train", "test"], "rating": [4.0, 2.0], "p": [3.0, 2.5]})
    b = pl.DataFrame({"split": ["test"], "rating": [5.0], "p": [3.5]})
    sums = pl.concat([metrics.error_sums(a, "p"), metrics.error_sums(b, "p")])
    m = metrics.split_metrics(sums)
    assert m["train"] == {"rmse": 1.0, "mae": 1.0, "n": 1}
    assert m["test"]["rmse"] == pytest.approx(math.sqrt((0.25 + 2.25) / 2))
    assert m["test"]["mae"] == pytest.approx(1.0)


def test_error_sums_equal_a_group_by_skip_nulls_and_show_nans():
    """Per-split sums against Polars' own group-by on random rows with nulls in both columns (skipped); a NaN
    prediction (a value, not a null) makes its split's sums NaN instead of vanishing."""
    g = np.random.default_rng(3)
    n = 1_000
    frame = pl.DataFrame(
        {
            "split": g.choice(["train", "val", "test"], n),
            "rating": pl.Series(g.integers(1, 6, n), dtype=pl.Int64),
            "p": pl.Series(g.uniform(1, 5, n), dtype=pl.Float32),
        }
    ).with_columns(
        rating=pl.when(pl.Series(g.random(n) < 0.1)).then(None).otherwise(pl.col("rating")),
        p=pl.when(pl.Series(g.random(n) < 0.1)).then(None).otherwise(pl.col("p")),
    )
    got = metrics.error_sums(frame, "p").sort("split")
    d = pl.col("rating").cast(pl.Float64) - pl.col("p").cast(pl.Float64)
    want = (
        frame.drop_nulls()
        .group_by("split")
        .agg(n=pl.len().cast(pl.Int64), sse=(d**2).sum(), sae=d.abs().sum())
        .sort("split")
    )
    assert got["split"].to_list() == want["split"].to_list() and got["n"].to_list() == want["n"].to_list()
    assert np.allclose(got["sse"].to_numpy(), want["sse"].to_numpy(), rtol=1e-12)
    assert np.allclose(got["sae"].to_numpy(), want["sae"].to_numpy(), rtol=1e-12)
    assert got["n"].sum() < n  # nulls were there to skip
    nan = frame.drop_nulls().with_columns(p=pl.when(pl.col("split") == "val").then(float("nan")).otherwise("p"))
    sums = metrics.error_sums(nan, "p").sort("split")
    assert [math.isnan(v) for v in sums["sse"]] == [False, False, True]  # test, train, val


def test_reliability_deciles_are_equal_sized_and_ordered_on_a_planted_signal():
    rng = np.random.default_rng(0)
    noise_sd = rng.uniform(0.1, 2.0, 5_000)
    frame = pl.DataFrame(
        {
            "rating": 3.0 + rng.normal(0, noise_sd),
            "pred_rating": np.full(5_000, 3.0),
            "pred_error": noise_sd**2 + rng.normal(0, 0.05, 5_000),
        }
    )
    deciles = metrics.reliability_deciles(frame)
    assert deciles["decile"].to_list() == list(range(1, 11))
    assert set(deciles["n"].to_list()) == {500}
    assert deciles["rmse"][0] < 0.5 * deciles["rmse"][9]
    assert metrics.spearman(frame["pred_error"], (frame["rating"] - 3.0) ** 2) > 0.3


@pytest.mark.parametrize("n", [7, 1_003])
def test_reliability_deciles_and_spearman_match_polars_ranks_with_ties(n):
    """One stable sort gives what Polars' ordinal ranks, group-by and Spearman give, ties and tiny tables too."""
    rng = np.random.default_rng(n)
    frame = pl.DataFrame(
        {
            "rating": rng.integers(1, 6, n).astype(np.float32),
            "pred_rating": rng.normal(3.5, 1.0, n).astype(np.float32),
            "pred_error": rng.integers(0, 5, n).astype(np.float32) / 4,  # heavy ties
        }
    )
    diff = pl.col("rating").cast(pl.Float64) - pl.col("pred_rating").cast(pl.Float64)
    value = pl.col("pred_error").cast(pl.Float64)
    expected = (
        frame.with_columns(decile=((pl.col("pred_error").rank("ordinal").cast(pl.Int64) - 1) * 10 // n + 1))
        .group_by("decile")
        .agg(
            n=pl.len(), lo=value.min(), hi=value.max(), mean=value.mean(), mse=(diff**2).mean(), mae=diff.abs().mean()
        )
        .sort("decile")
    )
    got = metrics.reliability_deciles(frame)
    assert got["decile"].to_list() == expected["decile"].to_list()
    assert got["n"].to_list() == expected["n"].to_list()
    for ours, theirs in (("pred_error_min", "lo"), ("pred_error_max", "hi"), ("mean_pred_error", "mean")):
        np.testing.assert_allclose(got[ours].to_numpy(), expected[theirs].to_numpy())
    np.testing.assert_allclose(got["mse"].to_numpy(), expected["mse"].to_numpy())
    np.testing.assert_allclose(got["mae"].to_numpy(), expected["mae"].to_numpy())
    observed = (frame["rating"] - frame["pred_rating"]) ** 2
    reference = pl.DataFrame({"a": frame["pred_error"], "b": observed}).select(pl.corr("a", "b", method="spearman"))
    assert metrics.spearman(frame["pred_error"], observed) == pytest.approx(reference.item(), abs=1e-6)


def test_ranking_metrics_on_a_hand_counted_case():
    top = torch.tensor([[5, 1, 2], [0, 3, 4], [7, 8, 9]])
    rel_users, rel_items = torch.tensor([0, 0, 1]), torch.tensor([1, 6, 4])  # user 2 has none: not counted
    m = metrics.ranking_metrics(top, rel_users, rel_items, k=3)
    assert m["users"] == 2
    assert m["precision@3"] == pytest.approx((1 / 3 + 1 / 3) / 2)
    assert m["recall@3"] == pytest.approx((1 / 2 + 1 / 1) / 2)
    ndcg0 = (1 / math.log2(3)) / (1 + 1 / math.log2(3))
    ndcg1 = (1 / math.log2(4)) / 1
    assert m["ndcg@3"] == pytest.approx((ndcg0 + ndcg1) / 2)


def test_mf_top_n_matches_brute_force_and_skips_seen_and_disallowed_items(mf):
    f = mf.mf_tables().tensors()
    seen = topn.Csr.build(torch.tensor([0, 0, 2]), torch.tensor([3, 1, 0]), 3)
    allowed = torch.tensor([True, True, False, True])
    mf = partial(topn.mf_scores, f, 3.0)
    scores, items = topn.top_k_of(mf, torch.arange(3), 2, exclude=seen, allowed=allowed, chunk=2)
    wide_scores, wide_items = topn.top_k_of(mf, torch.arange(3), 9, exclude=seen, allowed=allowed, chunk=2)
    assert wide_items.shape == (3, 4)  # k is cut to the 4 items
    assert torch.equal(wide_items[:, :2], items) and torch.equal(wide_scores[:, :2], scores)
    full = 3.0 + f["user_bias"][:, None] + f["item_bias"][None, :] + f["user_factors"] @ f["item_factors"].T
    for u, banned in enumerate([{3, 1, 2}, {2}, {0, 2}]):
        ok = [i for i in range(4) if i not in banned]
        best = sorted(ok, key=lambda i: -full[u, i])[:2]
        got = [int(i) for i, s in zip(items[u], scores[u], strict=True) if s > -math.inf]
        assert got == best[: len(got)] and len(got) == min(2, len(ok))


def test_top_k_in_cache_sized_blocks_equals_one_block(monkeypatch) -> None:
    """The default blocks (SCORE_BLOCK_BYTES of scores per thread, at least 16 rows) cut 100 rows into 7 blocks: the
    same scores and items as one block of every row, masks and ties included."""
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (100, 50), generator=g).float()  # many ties: the lower column first
    seen = topn.Csr.build(torch.randint(0, 100, (300,), generator=g), torch.randint(0, 50, (300,), generator=g), 100)
    allowed = torch.rand(50, generator=g) > 0.2
    rows = torch.randperm(100, generator=g)
    calls: list[int] = []

    def score(block: torch.Tensor) -> torch.Tensor:
        calls.append(len(block))
        return scores[block]

    whole = topn.top_k_of(score, rows, 5, exclude=seen, allowed=allowed, chunk=100 * torch.get_num_threads())
    monkeypatch.setattr(topn, "SCORE_BLOCK_BYTES", 4 * 50 * 16)
    calls.clear()
    blocked = topn.top_k_of(score, rows, 5, exclude=seen, allowed=allowed)
    assert max(calls) == 16 and sum(calls) == 1 + 100  # the width probe, then blocks of 16 rows
    assert torch.equal(blocked[0], whole[0]) and torch.equal(blocked[1], whole[1])


def test_cosine_neighbours_find_the_planted_twin():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.1], [0.1, -3.0]])
    cos, idx = topn.cosine_neighbours(q, torch.tensor([0, 1]), 1)
    assert idx[:, 0].tolist() == [2, 0] or idx[:, 0].tolist() == [2, 2]
    assert cos[0, 0] == pytest.approx(float(torch.nn.functional.cosine_similarity(q[0], q[2], dim=0)))


def test_cosine_neighbours_among_allowed_movies_equal_a_scan():
    """Only the allowed movies are scored (a query may be outside them); the answer is a brute-force scan's."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(30, 4, generator=g)
    allowed = torch.rand(30, generator=g) < 0.5
    queries = torch.arange(30)
    cos, idx = topn.cosine_neighbours(q, queries, 3, allowed=allowed)
    unit = torch.nn.functional.normalize(q, dim=1)
    for row, item in enumerate(queries.tolist()):
        full = unit[item] @ unit.T
        ranked = sorted((j for j in range(30) if allowed[j] and j != item), key=lambda j: -float(full[j]))[:3]
        assert idx[row].tolist() == ranked
        assert cos[row].tolist() == pytest.approx([float(full[j]) for j in ranked], abs=1e-6)


def test_fold_in_recovers_a_users_planted_factors():
    g = torch.Generator().manual_seed(0)
    q, bi = torch.randn(200, 4, generator=g), torch.randn(200, generator=g) * 0.3
    p_true, bu_true = torch.tensor([0.5, -1.0, 0.3, 0.8]), 0.4
    items = torch.arange(0, 200, 5)
    r = 3.5 + bu_true + bi[items] + q[items] @ p_true
    p, bu = topn.fold_in(q, bi, 3.5, items, r, reg=1e-6)
    assert torch.allclose(p, p_true, atol=1e-3) and bu == pytest.approx(bu_true, abs=1e-3)


@pytest.mark.parametrize("name", ["mf", "biased_mf", "sigmoid_mf"])
def test_mf_kernel_scores_exactly_what_the_model_predicts(name):
    from recdist.infer.kernels import MFKernel
    from recdist.models import registry

    dims = Dims(n_users=50, n_items=40, global_mean=3.4)
    model = registry.get(name).module(registry.validate(name, {"rank": 6}), dims, torch.Generator().manual_seed(1))
    with torch.no_grad():
        for table in model.mf_tables().tensors().values():  # biases and factors away from their initial zeros
            table.normal_(0, 0.5, generator=torch.Generator().manual_seed(2))
    assert model.scoring_kernel == "mf"
    rng = np.random.default_rng(0)
    user, item = rng.integers(0, 50, 1000).astype(np.int32), rng.integers(0, 40, 1000).astype(np.int32)
    with torch.no_grad():
        expect = model(Batch(torch.from_numpy(user).long(), torch.from_numpy(item).long()))
    assert torch.allclose(MFKernel(model)(user, item), expect, atol=1e-5)


def test_models_that_are_more_than_mf_are_not_given_the_kernel():
    from recdist.infer.kernels import kernel_for
    from recdist.models import registry

    model = registry.get("mf_residual_mlp").module(
        registry.validate("mf_residual_mlp", {"rank": 4}), Dims(5, 5), torch.Generator().manual_seed(0)
    )
    assert kernel_for(model) is None and kernel_for(Constant(1.0)) is None


@pytest.mark.parametrize("name", ["reliability_mlp", "rating_mlp"])
def test_stage_2_and_3_inference_path_equals_the_training_path(name):
    """Without autograd the first layer is split into precomputed user and item parts: same numbers."""
    from recdist.models import registry

    dims = Dims(n_users=30, n_items=20, global_mean=3.5)
    g = torch.Generator().manual_seed(3)
    mf = registry.get("biased_mf").module(registry.validate("biased_mf", {"rank": 5}), dims, g)
    with torch.no_grad():
        for table in mf.mf_tables().tensors().values():
            table.normal_(0, 0.4, generator=g)
    model = registry.get(name).module(registry.validate(name, {"hidden": [16, 8], "dropout": 0.0}), dims, g)
    model.attach(mf)
    with torch.no_grad():
        model.net[-1].weight.normal_(0, 0.3, generator=g)  # a head that is not (almost) zero
    model.eval()
    user, item = torch.randint(0, 30, (500,), generator=g), torch.randint(0, 20, (500,), generator=g)
    features = torch.rand(500, len(model.inputs), generator=g) * 3 + 0.5
    batch = Batch(user, item, features=features, feature_names=model.inputs)
    with torch.enable_grad():
        slow = model(batch).detach()
    with torch.no_grad():
        fast = model(batch)
        model.net[0].weight.add_(0.1)  # a weight change is seen: the per-user parts are recomputed
        changed = model(batch)
    with torch.enable_grad():
        changed_slow = model(batch).detach()
    assert torch.allclose(fast, slow, atol=1e-5) and torch.allclose(changed, changed_slow, atol=1e-5)
    assert not torch.allclose(fast, changed)


def test_train_share_is_a_seeded_hash_sample_of_training_rows_plus_every_validation_row():
    from recdist.train.sampling import TrainShare, in_share

    rng = np.random.default_rng(2)
    u, i = rng.integers(0, 5000, 100_000), rng.integers(0, 2000, 100_000)
    picked = in_share(u, i, 0.25, seed=7)
    assert abs(picked.mean() - 0.25) < 0.01
    assert np.array_equal(picked, in_share(u.copy(), i.copy(), 0.25, seed=7))  # the same rows in every stage
    assert not np.array_equal(picked, in_share(u, i, 0.25, seed=8))
    assert np.all(in_share(u, i, 0.5, seed=7)[picked])  # nested: a bigger share keeps the smaller one's rows
    splits = np.array(["train", "val", "test", "train", "train"] * 20_000)
    table = ratings(u, i, [3.0] * len(u), splits)
    keep = TrainShare(0.25, seed=7).keep(table).to_numpy(zero_copy_only=False)
    assert np.all(keep[splits == "val"]) and not np.any(keep[splits == "test"])
    assert np.array_equal(keep[splits == "train"], picked[splits == "train"])


# ------------------------------------------------------------------------------------------- session context


def session_frame() -> pl.DataFrame:
    """User 0 rates around t = 1000-1600 (residual r - mf_pred in the comments); user 1 once; one row untimed."""
    return pl.DataFrame(
        {
            "user_idx": [0, 0, 0, 0, 0, 1, 0],
            "timestamp": [1000, 1030, 1050, 1100, 1600, 1040, None],
            "split": ["train", "val", "train", "test", "train", "train", "train"],
            "rating": [4.0, 5.0, 3.5, 1.0, 2.0, 5.0, 4.0],  # residuals +1, (val), +0.5, (test), -1, +2, +1
            "mf_pred": [3.0] * 7,
        },
        schema_overrides={"user_idx": pl.Int32, "timestamp": pl.Int64},
    )


def test_a_rows_session_holds_the_users_earlier_training_residuals_only():
    from recdist.infer.session import SESSION_COLUMNS, SessionSpec, session_columns

    got = session_columns(session_frame(), SessionSpec((60, 600)))
    assert got.columns == list(SESSION_COLUMNS) and all(got[c].dtype == pl.Float32 for c in got.columns)
    # per row: (short sum, sq, n) over [t - 60, t], (long sum, sq, n) over [t - 600, t]; never the row itself,
    # a validation or test rating, another user's rating or an untimed one
    expect = [
        [0, 0, 0, 0, 0, 0],  # the first rating: nothing before it
        [1, 1, 1, 1, 1, 1],  # val row: the train rating 30 s before
        [1, 1, 1, 1, 1, 1],  # not the val rating between them
        [0.5, 0.25, 1, 1.5, 1.25, 2],  # test row: one rating within a minute, two within ten
        [0, 0, 0, 1.5, 1.25, 2],  # 600 s back reaches t = 1000 (inclusive), not the test row
        [0, 0, 0, 0, 0, 0],  # user 1: user 0's ratings are not its session
        [0, 0, 0, 0, 0, 0],  # no timestamp: no session
    ]
    np.testing.assert_allclose(got.to_numpy(), np.array(expect, dtype=np.float32), atol=1e-6)
    later = session_columns(session_frame(), SessionSpec((60, 600), future=True))
    assert later.row(0) == pytest.approx((0.5, 0.25, 1, -0.5, 1.25, 2))  # ratings after it count too


def test_the_session_context_is_blind_to_validation_and_test_ratings_and_keeps_row_order():
    from recdist.infer.session import SessionSpec, session_columns

    frame = session_frame()
    spec = SessionSpec((60, 600), future=True)
    flipped = frame.with_columns(
        rating=pl.when(pl.col("split") == "train").then(pl.col("rating")).otherwise(5.5 - pl.col("rating"))
    )
    assert session_columns(frame, spec).equals(session_columns(flipped, spec))
    order = [3, 6, 0, 5, 2, 4, 1]
    shuffled = session_columns(frame[order], spec)
    assert shuffled.equals(session_columns(frame, spec)[order])


def test_the_session_context_equals_a_brute_force_count_on_random_ratings() -> None:
    """Many users, ties in time, untimed rows, every split: each row's sums against a direct scan of its user."""
    from recdist.infer.session import SESSION_COLUMNS, SessionSpec, session_columns

    rng = np.random.default_rng(3)
    n = 3000
    time = rng.integers(0, 400, n).astype(float)  # many ties within a user
    time[rng.random(n) < 0.05] = np.nan
    frame = pl.DataFrame(
        {
            "user_idx": rng.integers(0, 40, n).astype(np.int32),
            "timestamp": pl.Series(time, nan_to_null=True).cast(pl.Int64),
            "split": rng.choice(["train", "val", "test"], n, p=[0.7, 0.1, 0.2]),
            "rating": rng.integers(1, 11, n) / 2,
            "mf_pred": rng.uniform(1, 5, n),
        }
    )
    for spec in (SessionSpec((30, 120)), SessionSpec((30, 120), future=True)):
        got = session_columns(frame, spec).to_numpy()
        user, t, split = frame["user_idx"].to_numpy(), frame["timestamp"].to_numpy(), frame["split"].to_numpy()
        resid = frame["rating"].to_numpy() - frame["mf_pred"].to_numpy()
        timed = ~np.isnan(t.astype(float))
        expect = np.zeros((n, len(SESSION_COLUMNS)))
        for r in np.flatnonzero(timed):
            for w, window in enumerate(spec.windows):
                after = window if spec.future else 0
                near = (user == user[r]) & timed & (split == "train") & (np.arange(n) != r)
                near &= (t >= t[r] - window) & (t <= t[r] + after)
                if near.any():
                    expect[r, 3 * w : 3 * w + 3] = resid[near].sum(), (resid[near] ** 2).sum(), near.sum()
        np.testing.assert_allclose(got, expect, atol=1e-4)


def test_equal_final_scores_keep_the_candidates_order() -> None:
    from recdist.infer.ranker import top_stable

    score = torch.tensor([[4.9, 5.0, 5.0, 3.0, 5.0], [1.0, 2.0, 3.0, 4.0, 5.0]])
    best, order = top_stable(score, 3)
    assert order.tolist() == [[1, 2, 4], [4, 3, 2]]
    assert best.tolist() == [[5.0, 5.0, 5.0], [5.0, 4.0, 3.0]]


def test_only_movies_with_enough_training_ratings_are_recommendable() -> None:
    from recdist.infer.ranker import recommendable

    n_train = np.array([0, 1, 4, 5, 30])
    assert recommendable(n_train).tolist() == [False, True, True, True, True]  # never an unrated movie
    assert recommendable(n_train, 5).tolist() == [False, False, False, True, True]


def test_a_ranker_reads_the_dataset_once_and_loads_each_model_once(monkeypatch):
    """Before: three plans each re-read every shard, and the stage-1 model was loaded four times."""
    from recdist.infer import outputs, plan
    from recdist.models import io, registry

    dims = Dims(n_users=30, n_items=20, global_mean=3.5)
    g = torch.Generator().manual_seed(3)
    mf = registry.get("biased_mf").module(registry.validate("biased_mf", {"rank": 5}), dims, g)
    built = {"mf": mf}
    for name in ("reliability_mlp", "rating_mlp"):
        built[name] = registry.get(name).module(registry.validate(name, {"hidden": [8]}), dims, g)
        built[name].attach(mf)
    loads: list[str] = []
    reads: list[str] = []

    def load_model(uri, device="cpu"):
        loads.append(uri.rsplit("/", 1)[-1])
        return built[uri.rsplit("/", 1)[-1]]

    def trained_on(data, folds=0, fold_seed=0):
        reads.append(data)
        known = (np.ones(30, dtype=bool),), (np.ones(20, dtype=bool),)
        return plan.TrainedOn(3.5, (0.5, 5.0), known[0], known[1], spread=1.0)

    monkeypatch.setattr(io, "load_model", load_model)
    monkeypatch.setattr(outputs, "trained_on", trained_on)
    monkeypatch.setattr("recdist.data.dataset.read_items", lambda data: pl.DataFrame({"n_train": [5] * 20}))
    models = RunModels(data="/d", scored="/s", final="/rating_mlp", mf="/mf", reliability="/reliability_mlp")
    ranker = outputs.ranker_for(models)
    assert reads == ["/d"] and sorted(loads) == ["mf", "rating_mlp", "reliability_mlp"]
    assert ranker.stages[0].models[0] is mf and all(len(s.biases[0][0]) == 30 for s in ranker.stages)
    ranked = ranker.rank(torch.arange(3), 2, candidates=5)
    assert ranked.height == 6 and ranked["reliability"].null_count() == 0
    none = ranker.rank(torch.arange(0), 2, candidates=5)  # a fold-in night where nobody has anything new
    assert none.height == 0 and none.schema == ranked.schema


def test_a_ray_data_pass_drops_the_operator_reservation_in_its_own_context_only():
    """Ray Data's per-operator reservation read an empty budget for the first second of every pass after the
    cluster's first (one task started, the rest a second later); the pass runs in a copy without it."""
    import ray.data

    from recdist.infer.ray_data import _context

    context = _context()  # first: Ray's own default context is built inside it, with its warnings silenced
    current = ray.data.DataContext.get_current()
    assert context is not current and not context.op_resource_reservation_enabled
    assert current.op_resource_reservation_enabled  # Ray's default, left as it was
