"""Top-N ranking: the popularity baseline by hand, the implicit candidate models against their closed forms,
and the final order of the candidates."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest
import torch

from recdist.infer.outputs import RankingProtocol, Rated, sampled_users, vs_popularity
from recdist.infer.ranker import rank_score, recommendable
from recdist.infer.topn import Csr, popularity_top, top_k_of
from recdist.models.implicit import fit_ease, fit_ials

# 5 users x 6 movies. Training ratings per user, validation ratings, test ratings (rating given).
TRAIN = {0: [0, 1, 2], 1: [0, 1, 3], 2: [0, 2, 4], 3: [1, 2, 3], 4: [0]}
VAL = {0: [3], 4: [5]}
TEST = {0: {4: 4.5}, 1: {2: 4.0, 5: 5.0}, 2: {1: 3.5, 3: 5.0}, 3: {0: 2.0}, 4: {2: 4.0, 1: 4.5}}
N_USERS, N_ITEMS = 5, 6


def fixture() -> tuple[pl.DataFrame, pl.DataFrame, torch.Tensor]:
    rows = [(u, i, False, split is TRAIN) for split in (TRAIN, VAL) for u, items in split.items() for i in items]
    rows += [(u, i, True, False) for u, rated in TEST.items() for i in rated]
    pairs = pl.DataFrame(rows, schema=["user_idx", "item_idx", "is_test", "is_train"], orient="row")
    test = pl.DataFrame(
        [(u, i, r) for u, rated in TEST.items() for i, r in rated.items()],
        schema=["user_idx", "item_idx", "rating"],
        orient="row",
    )
    n_train = torch.bincount(torch.tensor([i for items in TRAIN.values() for i in items]), minlength=N_ITEMS)
    return pairs, test, n_train


def test_one_sort_of_every_rating_gives_each_split_list_by_hand() -> None:
    """Rated: all rated, train + validation (the evaluation masks them) and train (EASE's rows), per user."""
    pairs, _, _ = fixture()
    rated = Rated.of(pairs.sample(fraction=1.0, shuffle=True, seed=3), N_USERS)  # any input order

    def lists(csr: Csr) -> dict[int, list[int]]:
        return {u: sorted(csr.indices[csr.indptr[u] : csr.indptr[u + 1]].tolist()) for u in range(N_USERS)}

    def expected(*splits: dict) -> dict[int, list[int]]:
        return {u: sorted(i for split in splits for i in split.get(u, [])) for u in range(N_USERS)}

    assert lists(rated.train()) == expected(TRAIN)
    assert lists(rated.known()) == expected(TRAIN, VAL)
    assert lists(rated.all) == expected(TRAIN, VAL, {u: list(r) for u, r in TEST.items()})
    train = rated.train()
    assert sorted(zip(train.rows().tolist(), train.indices.tolist(), strict=True)) == sorted(
        (u, i) for u, items in TRAIN.items() for i in items
    )


def test_ranking_sample_is_the_same_people_whatever_their_indices_and_keeps_them_as_users_come() -> None:
    """The evaluated users are drawn by their original ids: two datasets indexing the same people differently
    sample the same people, and a day with 2% more users keeps all but about 2% of yesterday's sample (a seeded
    draw over indices shared nothing: the drift table's NDCG change compared two random groups)."""
    rng = np.random.default_rng(0)
    ids = rng.choice(10**9, 5000, replace=False)
    first = ids[sampled_users(np.arange(5000), ids, 500, seed=7)]
    order = rng.permutation(5000)  # another dataset's indices for the same people
    assert np.array_equal(np.sort(ids[order][sampled_users(np.arange(5000), ids[order], 500, seed=7)]), np.sort(first))
    grown = np.concatenate([ids, rng.choice(np.arange(10**9, 2 * 10**9), 100, replace=False)])
    kept = np.isin(grown[sampled_users(np.arange(5100), grown, 500, seed=7)], first).mean()
    assert 0.95 <= kept < 1.0
    other = ids[sampled_users(np.arange(5000), ids, 500, seed=8)]
    assert np.isin(other, first).mean() < 0.3  # the seed still draws another sample
    assert len(first) == 500 and len(set(first.tolist())) == 500


def test_popularity_baseline_by_hand() -> None:
    pairs, test, n_train = fixture()
    assert n_train.tolist() == [4, 3, 3, 2, 1, 0]
    allowed = recommendable(n_train.numpy(), min_ratings=2)  # movies 0-3; 1 and 2 tie: movie order
    protocol = RankingProtocol.build(Rated.of(pairs, N_USERS).known(), test, N_USERS, k=2, threshold=4.0)
    assert protocol is not None
    # users with a relevant test rating: 0, 1, 2, 4 (user 3's only test rating is 2.0)
    assert protocol.users.tolist() == [0, 1, 2, 4]
    counts, items = popularity_top(n_train, protocol.users, 2, exclude=protocol.exclude, allowed=allowed)
    lists = [
        [int(i) for i, c in zip(row, crow, strict=True) if c > -math.inf]
        for row, crow in zip(items, counts, strict=True)
    ]
    # user 0 rated 0-2 in training and 3 in validation: nothing left; user 1 has rated 0, 1, 3; user 2 0, 2, 4;
    # user 4 rated 0 (and 5 in validation)
    assert lists == [[], [2], [1, 3], [1, 2]]

    got = protocol.popularity(n_train, allowed)
    d2 = 1 / math.log2(3)
    # user 0: no hit (its relevant movie 4 has one training rating); user 1: hit at 1 of relevant {2, 5};
    # user 2: hit at 2 of relevant {3}; user 4: hits at 1 and 2 of relevant {1, 2}
    precision = (0 + 1 / 2 + 1 / 2 + 2 / 2) / 4
    recall = (0 + 1 / 2 + 1 / 1 + 2 / 2) / 4
    ndcg = (0 + 1 / (1 + d2) + d2 / 1 + (1 + d2) / (1 + d2)) / 4
    assert got["users"] == 4
    assert got["precision@2"] == pytest.approx(precision)
    assert got["recall@2"] == pytest.approx(recall)
    assert got["ndcg@2"] == pytest.approx(ndcg, rel=1e-6)
    ratio = vs_popularity({"popularity": got, "rating": {**got, "ndcg@2": 2 * ndcg}}, k=2)
    assert ratio == {"rating": pytest.approx(2.0)}


def test_popularity_top_scores_few_columns_but_equals_a_scan_of_every_movie() -> None:
    """popularity_top looks at the n + (most seen) most-rated movies only; a brute-force scan agrees, ties in
    movie order, users with too few unseen movies padded with empty (-inf) slots."""
    rng = np.random.default_rng(3)
    n_users, n_items, n = 40, 60, 5
    n_train = torch.from_numpy(rng.integers(0, 8, n_items))  # many ties
    allowed = torch.from_numpy(rng.random(n_items) < 0.8)
    seen = [rng.choice(n_items, size=int(rng.integers(0, 55)), replace=False) for _ in range(n_users)]
    rows = torch.from_numpy(np.concatenate([np.full(len(s), u) for u, s in enumerate(seen)]))
    exclude = Csr.build(rows, torch.from_numpy(np.concatenate(seen)), n_users)
    users = torch.arange(n_users)
    counts, items = popularity_top(n_train, users, n, exclude=exclude, allowed=allowed)
    assert counts.shape == items.shape == (n_users, n)
    for u in range(n_users):
        ranked = sorted((-int(n_train[i]), i) for i in range(n_items) if allowed[i] and i not in set(seen[u]))
        want = [i for _, i in ranked[:n]]
        got = [int(i) for i, c in zip(items[u], counts[u], strict=True) if c > -math.inf]
        assert got == want


def test_empty_slots_never_count_as_hits() -> None:
    from recdist.infer.metrics import ranking_metrics

    # row 1's empty slot (-1) must not hit row 0's relevant last movie (the keys row * n + item would collide)
    top = torch.tensor([[0, 1], [2, -1]])
    m = ranking_metrics(top, torch.tensor([0, 1]), torch.tensor([2, 0]), k=2)
    assert m["precision@2"] == 0.0


def _pairs(seed: int = 0, n_users: int = 30, n_items: int = 12) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = (rng.random((n_users, n_items)) < 0.3).astype(np.float64)
    u, i = np.nonzero(x)
    return torch.from_numpy(u), torch.from_numpy(i), x


def test_ease_is_the_closed_form() -> None:
    users, items, x = _pairs()
    model = fit_ease(users, items, *x.shape, reg=0.5)
    g = x.T @ x
    p = np.linalg.inv(g + 0.5 * np.diag(g).mean() * np.eye(len(g)))
    b = -p / np.diag(p)[None, :]
    np.fill_diagonal(b, 0.0)
    scores = model.scores(torch.arange(x.shape[0]))
    np.testing.assert_allclose(scores.numpy(), x @ b, atol=1e-5)


@pytest.mark.parametrize("condition", [1e2, 1e9])
def test_spd_inverse_in_float32_only_where_it_is_accurate(condition: float, monkeypatch) -> None:
    """EASE's inverse: float32 for a well-conditioned matrix (as accurate as the float32 weights need), float64
    when float32's residual is too large (a weakly regularised Gram) -- the float64 answer either way, to the
    accuracy each precision allows."""
    from recdist.models import implicit

    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(300, 300, generator=g, dtype=torch.float64))
    a = q @ torch.diag(torch.logspace(0, np.log10(condition), 300, dtype=torch.float64)) @ q.T
    exact = torch.linalg.inv(a)
    calls = []
    monkeypatch.setattr(
        implicit.torch.linalg, "cholesky", lambda m: calls.append(m.dtype) or torch.linalg.cholesky_ex(m)[0]
    )
    p = implicit.spd_inverse(a)
    assert p.dtype == torch.float64
    assert float(torch.linalg.norm(p - exact) / torch.linalg.norm(exact)) < (1e-5 if condition < 1e3 else 1e-6)
    assert calls == ([] if condition < 1e3 else [torch.float64])  # the float64 redo only where needed


def test_ease_scores_a_block_of_columns_at_a_time_with_the_same_sums(monkeypatch) -> None:
    from recdist.models import implicit

    users, items, x = _pairs()
    whole = fit_ease(users, items, *x.shape, reg=0.5).column_scores(torch.arange(x.shape[0]))
    monkeypatch.setattr(implicit, "block_columns", lambda m: 3)  # uneven blocks: the last one is narrower
    model = fit_ease(users, items, *x.shape, reg=0.5)
    assert len(model._weight_blocks) == -(-x.shape[1] // 3) > 1
    assert torch.equal(model.column_scores(torch.arange(x.shape[0])), whole)


def test_an_ease_weight_block_fits_a_cores_l2_cache() -> None:
    from recdist.models.implicit import BLOCK_BYTES, block_columns

    assert block_columns(4_000) == 64  # ML-20M's 4,000 modelled movies: 1 MB blocks
    for m in (1, 10, 700, 2_000, 4_000, 13_000, 100_000):
        width = block_columns(m)
        assert width % 16 == 0 and 16 <= width <= 512
        assert m * width * 4 <= BLOCK_BYTES or width == 16  # the narrowest block may exceed it for huge m


@pytest.mark.parametrize("threads", [1, 3, 50])  # 50: more threads than users, empty blocks dropped
def test_the_gram_matrix_from_blocks_of_users_in_threads_is_exact(threads: int) -> None:
    from recdist.models.implicit import _gram, _matrix

    users, items, x = _pairs()
    matrix = _matrix(users.numpy(), items.numpy(), *x.shape)
    assert np.array_equal(_gram(matrix, threads), (x.T @ x).astype(np.float32))


def test_ease_scores_only_the_modelled_movies() -> None:
    users, items, x = _pairs()
    modelled = torch.zeros(x.shape[1], dtype=torch.bool)
    modelled[:6] = True
    scores = fit_ease(users, items, *x.shape, reg=0.5, modelled=modelled).scores(torch.arange(3))
    assert torch.isinf(scores[:, 6:]).all() and torch.isfinite(scores[:, :6]).all()


def test_top_k_over_the_modelled_columns_equals_the_full_width_ranking() -> None:
    """EASE's candidates ranked on its modelled columns alone (`columns`) are the full-width ranking's, with seen
    and not-allowed movies skipped by item id."""
    users, items, x = _pairs(4, n_users=30)
    modelled = torch.zeros(x.shape[1], dtype=torch.bool)
    modelled[[1, 3, 4, 6, 8, 9]] = True
    model = fit_ease(users, items, *x.shape, reg=0.5, modelled=modelled)
    seen = Csr.build(users[:40], items[:40], x.shape[0])
    allowed = torch.ones(x.shape[1], dtype=torch.bool)
    allowed[[3, 5]] = False
    rows = torch.arange(x.shape[0])
    full_s, full_i = top_k_of(model.scores, rows, 4, exclude=seen, allowed=allowed, chunk=7)
    s, i = top_k_of(model.column_scores, rows, 4, exclude=seen, allowed=allowed, chunk=7, columns=model.columns)
    finite = torch.isfinite(s)
    assert torch.equal(s, full_s) and torch.equal(i[finite], full_i[finite])  # equal scores in item order
    assert finite.sum() > 30 and torch.allclose(model.scores(rows).gather(1, i)[finite], s[finite])
    assert not seen_pairs(seen, i, finite)
    unmasked = top_k_of(model.column_scores, rows, 4, columns=model.columns)[1]
    assert seen_pairs(seen, unmasked, torch.ones_like(finite))  # the check above can fail
    assert not torch.isin(i[finite], torch.tensor([0, 2, 3, 5, 7])).any()


@pytest.mark.parametrize("k", [1, 5, 40])
@pytest.mark.parametrize("mapped", [False, True])
def test_top_k_equals_a_sort_by_score_then_column(k: int, mapped: bool) -> None:
    """The compiled selection against a plain sort: many ties (in column order), NaN and -inf never chosen,
    -0.0 equal to 0.0, seen and not-allowed items skipped, rows with fewer than k left, rising rows (the
    selection's buffer refills most often), more rows than one block per thread."""
    g = np.random.default_rng(k)
    n_rows, n_items = 23, 300
    scores = g.integers(-20, 20, size=(n_rows, n_items)).astype(np.float32) / 4
    scores[g.random(scores.shape) < 0.05] = np.nan
    scores[g.random(scores.shape) < 0.05] = -np.inf
    scores[g.random(scores.shape) < 0.05] = -0.0
    scores[3] = np.arange(n_items)  # rising
    scores[4, 10:] = np.nan  # fewer than k left
    columns = torch.from_numpy(np.sort(g.choice(400, n_items, replace=False))) if mapped else None
    items = columns.numpy() if mapped else np.arange(n_items)
    seen_rows = torch.from_numpy(g.integers(0, n_rows, 600))
    seen = Csr.build(seen_rows, torch.from_numpy(g.integers(0, 400 if mapped else n_items, 600)), n_rows)
    allowed = torch.from_numpy(g.random(400 if mapped else n_items) < 0.9)
    block = torch.from_numpy(scores)
    got_s, got_i = top_k_of(
        lambda rows: block[rows].clone(),
        torch.arange(n_rows),
        k,
        exclude=seen,
        allowed=allowed,
        chunk=6,
        columns=columns,
    )
    which, banned = seen.gather(torch.arange(n_rows))
    skip = set(zip(which.tolist(), banned.tolist(), strict=True))
    for r in range(n_rows):
        ok = [
            (float(scores[r, c]), int(items[c]))
            for c in range(n_items)
            if allowed[items[c]] and (r, int(items[c])) not in skip and scores[r, c] > -np.inf
        ]
        best = sorted(ok, key=lambda pair: (-pair[0], pair[1]))[:k]
        assert got_i[r, : len(best)].tolist() == [item for _, item in best]
        assert got_s[r, : len(best)].tolist() == [score for score, _ in best]
        assert torch.isneginf(got_s[r, len(best) :]).all()


def seen_pairs(seen: Csr, items: torch.Tensor, finite: torch.Tensor) -> set[tuple[int, int]]:
    """The (row, item) pairs of a top-k result that `seen` holds."""
    which, cols = seen.gather(torch.arange(len(items)))
    ranked = {(int(r), int(items[r, j])) for r, j in zip(*torch.nonzero(finite, as_tuple=True), strict=True)}
    return ranked & set(zip(which.tolist(), cols.tolist(), strict=True))


def test_ials_last_half_step_is_exact() -> None:
    """After the item step, the item factors minimise the weighted objective with the users' fixed."""
    users, items, x = _pairs(1)
    alpha, reg = 4.0, 0.1
    model = fit_ials(users, items, *x.shape, rank=4, alpha=alpha, reg=reg, iterations=3)
    p, q = model.user_factors.double(), model.item_factors.double()
    c = 1 + alpha * x
    lam = reg * x.sum(0).mean()  # mean pairs per item
    grad = -2 * ((c * (x - p.numpy() @ q.numpy().T)).T @ p.numpy()) + 2 * lam * q.numpy()
    assert np.abs(grad).max() < 1e-3
    # the fit ranks a user's own movies above the others on average
    s = model.scores(torch.arange(x.shape[0])).numpy()
    assert s[x == 1].mean() > s[x == 0].mean() + 0.3


def test_rank_score_orders() -> None:
    candidate = torch.tensor([[0.9, 0.5, -0.1]])
    rating = torch.tensor([[3.0, 4.5, 5.0]])
    error = torch.tensor([[1.0, 1.0, float("nan")]])
    assert torch.equal(rank_score("rating", candidate, rating, error, 4.0), rating)
    assert torch.equal(rank_score("candidate", candidate, rating, error, 4.0), candidate)
    blend = rank_score("blend", candidate, rating, error, 4.0)
    # P(rated) x P(rating >= 4): 0.9 x Phi(-1) = 0.143 < 0.5 x Phi(0.5) = 0.346; a negative score counts ~0
    assert blend[0, 0] == pytest.approx(0.9 * 0.158655, rel=1e-3)
    assert blend[0, 1] == pytest.approx(0.5 * 0.691462, rel=1e-3)
    assert blend[0, 2] < 1e-5


def test_ease_max_items_keeps_the_most_rated() -> None:
    users, items, x = _pairs(2)
    model = fit_ease(users, items, *x.shape, reg=0.5, max_items=4)
    counts = x.sum(0)
    assert sorted(model.items.tolist()) == sorted(np.argsort(-counts, kind="stable")[:4].tolist())


def test_ease_from_a_user_sample_still_scores_every_user() -> None:
    users, items, x = _pairs(3, n_users=40)
    model = fit_ease(users, items, *x.shape, reg=0.5, max_users=10)
    full = fit_ease(users, items, *x.shape, reg=0.5)
    scores = model.scores(torch.arange(x.shape[0]))
    assert torch.isfinite(scores).all() and not torch.allclose(model.weights, full.weights)
    # a user is scored from their own row: those with the same movies get the same scores
    assert torch.equal(scores[0], (torch.from_numpy(x[0]).float() @ model.weights))
