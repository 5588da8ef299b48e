"""The analyst tables of a run (RUN/outputs/<table>/, recdist.tables): predictions, recommendations, item and
user factors, similar movies, reliability deciles, and metrics.json, all with original ids and titles.

Reads the final scored table a shard per thread (memory: a shard per thread plus the index columns), so it scales to
ML-20M; the evaluation uses the test split only for measuring, never for choosing anything.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import torch

from recdist import logs, storage, tables
from recdist.config import PipelineConfig
from recdist.data.dataset import Shard, shards
from recdist.infer import metrics as m
from recdist.infer.plan import TrainedOn, plan_for, trained_on
from recdist.infer.ranker import Ranker, recommendable
from recdist.infer.topn import Csr, cosine_neighbours, mf_scores, popularity_top, top_k_of
from recdist.manifest import RunModels, resolve
from recdist.models.implicit import Implicit, fit_ease, fit_ials
from recdist.schema import (
    EXPECTED_ABS_ERROR,
    ITEM_FACTORS,
    PREDICTIONS,
    RECOMMENDATIONS,
    RELIABILITY_DECILES,
    SESSION_COLUMNS,
    SIMILAR_ITEMS,
    USER_FACTORS,
)
from recdist.tables import Stamp
from recdist.train.warm import started

log = logging.getLogger(__name__)

CANDIDATE_MODEL = "candidate_model.safetensors"
"""outputs/: the EASE candidate model the recommendations were ranked with (the movies it models and their
item-item weights): what a fold-in night ranks with again, and `recdist recommend` for more rows than stored."""
RANKING_SALT = 0x52616E6B
"""pair_hash's salt for the ranking metrics' user sample ("Rank"), apart from the splits' and folds'."""


@dataclass(frozen=True)
class Carry:
    """What a fold-in night's outputs take over from the previous run's (recdist.pipeline decides when: stage 1 a
    fold-in and stages 2 and 3 on the previous weights, the previous run's user and movie indices, the same
    output settings): the users with nothing new keep their recommendations, and the candidate model is kept."""

    outputs: str
    """The previous run's committed outputs folder."""
    unchanged: np.ndarray
    """bool per user index: no rating added, gone or changed since the previous run (any split)."""
    candidate_model: str | None = None
    """The previous run's CANDIDATE_MODEL, when it has one."""


def ranker_for(
    models: RunModels,
    min_ratings: int = 1,
    trained: TrainedOn | None = None,
    ranking: dict[str, Any] | None = None,
    train: Csr | None = None,
    candidate_model: str | None = None,
) -> Ranker:
    """The run's ranker: candidates from `ranking['rank_candidates']` (default stage 1's MF), scored by stages 1-3
    in turn (or the single model) and ordered by `ranking['rank_order']` (default the predicted rating), among
    movies with at least `min_ratings` training ratings (pipeline.outputs.recommend_min_ratings). `ranking` holds
    the pipeline's ranking keys (ranking_settings()); `train`: user -> training movies when the caller has them
    (else read from the dataset). candidate_model: a saved EASE model (CANDIDATE_MODEL) to rank with, not refitted.

    The dataset is read once (`trained`, else read here) and the stage-1 model loaded once: its predictor, the
    later stages' cold-start fallback and the candidates share it.
    """
    from recdist.data.dataset import read_items, read_manifest
    from recdist.infer.scoring import Predictor
    from recdist.models.io import load_model

    ranking = ranking or {}
    view = trained if trained is not None else trained_on(models.data)
    mf = load_model(models.mf) if models.mf else None
    stages = []
    if models.reliability:  # stages 2 and 3 read stage 1's prediction (mf_pred) of each candidate
        stages.append(Predictor(plan_for(view, models.mf, "mf"), models=[mf]))
        stages.append(
            Predictor(plan_for(view, models.reliability, "reliability", fallback_model=models.mf), fallback=mf)
        )
    stages.append(Predictor(plan_for(view, models.final, "rating", fallback_model=models.mf), fallback=mf))
    n_train = read_items(models.data)["n_train"].to_numpy()
    kind = ranking.get("rank_candidates", "mf")
    retrieval = None
    if kind != "mf":
        manifest = read_manifest(models.data)
        allowed = recommendable(n_train, min_ratings)
        n_users = int(manifest["n_users"])
        if kind == "ease" and candidate_model is not None:
            retrieval = load_candidates(candidate_model, models.data, n_users, len(n_train), train)
        else:
            with logs.timed(log, f"candidate model {kind}"):
                retrieval = fit_candidates(models.data, kind, n_users, len(n_train), allowed, ranking, train=train)
    order = ranking.get("rank_order", "rating")
    threshold = float(ranking.get("relevance_threshold", 4.0))
    if order == "blend":  # a rating reaches the threshold when its unrounded value is half a step below it
        threshold -= rating_step(models.data) / 2
    return Ranker.build(mf, stages, n_train, min_ratings, retrieval=retrieval, order=order, threshold=threshold)


def rating_step(data: str) -> float:
    """The smallest gap between the distinct training ratings of a prepared dataset (0.5 for half stars, 1 for
    whole stars; 0 when there is only one)."""
    from recdist.data.dataset import read_rank

    values = np.unique(read_rank(data, columns=["rating"])["rating"].to_numpy())
    return float(np.diff(values).min()) if len(values) > 1 else 0.0


def ranking_settings(cfg: PipelineConfig) -> dict[str, Any]:
    """The pipeline keys that decide how recommendations are ranked (also kept in the outputs manifest)."""
    keys = ("rank_candidates", "rank_order", "ease_reg", "ease_max_items", "ease_max_users")
    return {**{k: getattr(cfg.outputs, k) for k in keys}, "relevance_threshold": cfg.evaluation.relevance_threshold}


def fit_candidates(
    data: str,
    kind: str,
    n_users: int,
    n_items: int,
    allowed: torch.Tensor,
    ranking: dict[str, Any],
    train: Csr | None = None,
) -> Implicit:
    """Fit the implicit model `kind` (ease, ials) on the training ratings of the prepared dataset `data` (`train`:
    them as user -> movies, when the caller has them)."""
    train = train if train is not None else _training_history(data, n_users)
    users, items = train.rows(), train.indices
    if kind == "ease":
        reg, cap, sample = (
            float(ranking.get("ease_reg", 4.0)),
            ranking.get("ease_max_items"),
            ranking.get("ease_max_users"),
        )
        return fit_ease(
            users, items, n_users, n_items, reg=reg, modelled=allowed, max_items=cap, max_users=sample, history=train
        )
    return fit_ials(users, items, n_users, n_items, rank=32, alpha=10.0, reg=0.1)


def _training_history(data: str, n_users: int) -> Csr:
    """user -> training movies of the prepared dataset `data` (what a candidate model scores each user from)."""
    from recdist.data.dataset import read_rank

    rows = read_rank(data, columns=["user_idx", "item_idx", "split"]).filter(pl.col("split") == "train")
    return rated_csr(rows, n_users)


def save_candidates(model: Implicit, out: str) -> None:
    """Write an EASE candidate model's movies and weights as out/CANDIDATE_MODEL (tensors, no pickle)."""
    from safetensors.torch import save

    assert model.items is not None and model.weights is not None
    tensors = {"items": model.items.contiguous(), "weights": model.weights.contiguous()}
    storage.write_bytes(storage.join(out, CANDIDATE_MODEL), save(tensors, metadata={"kind": model.kind}))


def load_candidates(uri: str, data: str, n_users: int, n_items: int, history: Csr | None = None) -> Implicit:
    """The EASE model saved at `uri` (save_candidates), scoring each user of the dataset `data` from `history`
    (user -> training movies; read from `data` when not given): the same movie indices as when it was saved."""
    from safetensors.torch import load

    history = history if history is not None else _training_history(data, n_users)
    tensors = load(storage.read_bytes(uri))
    log.info("candidate model ease: %s (%d movies), not refitted", uri, len(tensors["items"]))
    return Implicit(kind="ease", n_items=n_items, history=history, items=tensors["items"], weights=tensors["weights"])


def write_outputs(
    models: RunModels,
    out: str,
    cfg: PipelineConfig,
    stamp: Stamp,
    *,
    seed: int = 0,
    trained: TrainedOn | None = None,
    carry: Carry | None = None,
) -> dict[str, Any]:
    """Write every analyst table under `out` (a staging directory), each file stamped with `stamp`; return
    metrics.json's content (`rows`: the rows of every table written). trained: the run's view of the dataset's
    training rows (read here when not given). carry: a fold-in night's (Carry): the previous candidate model, and
    the previous recommendations of the users with nothing new (the others' are ranked)."""
    from recdist.data.dataset import read_items, read_manifest, read_users

    n_users = int(read_manifest(models.scored)["n_users"])
    users = read_users(models.data).select("user_idx", "user_id", "n_train")
    items = read_items(models.data).select("item_idx", "item_id", "title", "genres", "n_train")
    rows: dict[str, int] = {}
    with logs.timed(log, "predictions and accuracy"):
        result, test, pairs, cold = _prediction_tables(models, out, stamp, users, items)
    rows["predictions"] = int(pairs.height)
    rated = Rated.of(pairs, n_users)
    del pairs
    final_name = "rating" if models.reliability is not None else "single"
    with logs.timed(log, "ranking metrics"):
        ranking = ranking_settings(cfg)
        train = rated.train() if ranking["rank_candidates"] != "mf" else None  # an implicit model's rows
        kept = carry.candidate_model if carry is not None else None
        ranker = ranker_for(models, cfg.outputs.recommend_min_ratings, trained, ranking, train, candidate_model=kept)
        if ranker.retrieval is not None and ranker.retrieval.kind == "ease":
            save_candidates(ranker.retrieval, out)
        ids = np.zeros(n_users, np.int64)
        ids[users["user_idx"].to_numpy()] = users["user_id"].to_numpy()
        result["ranking"] = _ranking(ranker, rated.known(), test, cfg, n_users, final_name, seed=seed, user_ids=ids)
    if models.reliability is not None:
        deciles = _to_schema(_deciles(test), RELIABILITY_DECILES)
        rows["reliability_deciles"] = _write(deciles, out, "reliability_deciles", stamp)
        result["reliability_deciles"] = deciles.to_pylist()
        result["reliability_summary"] = _reliability_summary(pl.from_arrow(deciles), test)

    with logs.timed(log, "recommendations"):
        shown = cfg.outputs
        ranked = torch.arange(n_users) if carry is None else torch.from_numpy(np.flatnonzero(~carry.unchanged))
        recs = _recommendations(ranker.rank(ranked, shown.top_n, candidates=shown.candidates, exclude=rated.all),
                                users, items)  # fmt: skip
        if carry is not None:
            recs = _with_kept(recs, carry, users, items)
            result["recommendations_kept"] = {"users": int(carry.unchanged.sum()), "ranked": len(ranked)}
        rows["recommendations"] = _write(recs, out, "recommendations", stamp)

    if ranker.factors is not None:
        with logs.timed(log, "item and user factors, similar movies"):
            rows["item_factors"] = _write(_item_factors(ranker.factors, items, cfg), out, "item_factors", stamp)
            rows["user_factors"] = _write(_user_factors(ranker.factors, users), out, "user_factors", stamp)
            rows["similar_items"] = _write(_similar(ranker.factors, items, cfg), out, "similar_items", stamp)
    result["rows"] = rows
    result["cold"] = cold
    result["start"] = started(models.histories)  # cold, warm or refit cold, per stage
    for role, figures in layered_scores(models.scored).items():  # a fold-in night's: what was scored tonight
        if role in result["start"]:
            result["start"][role]["scored"] = figures
    storage.write_json(storage.join(out, "metrics.json"), result)
    return result


def layered_scores(final: str) -> dict[str, dict[str, int]]:
    """Of each layered scored table behind the final one (its `scored_from` chain), by role (mf, reliability,
    rating): the rows scored tonight (`computed`), its rows, its layers and the most before it is written whole."""
    from recdist.data.dataset import read_manifest
    from recdist.infer.scored import MAX_LAYERS

    found: dict[str, dict[str, int]] = {}
    table: str | None = final
    while table is not None:
        manifest = read_manifest(table)
        if manifest.get("kind") != "scored":
            break
        scoring = manifest.get("scoring") or {}
        if manifest.get("layers") and "computed" in scoring:
            found[scoring["role"]] = {
                "computed": int(scoring["computed"]),
                "rows": int(manifest["n_ratings"]),
                "layers": len(manifest["layers"]),
                "max_layers": MAX_LAYERS,
            }
        table = resolve(manifest["scored_from"], table) if manifest.get("scored_from") else None
    return found


def _write(table: pa.Table, out: str, name: str, stamp: Stamp) -> int:
    """Write a whole table as its folder's one part; its rows."""
    tables.write_table(table, out, name, stamp)
    return table.num_rows


def expected_abs_error(pred_error: pl.Expr) -> pl.Expr:
    """Stage 2's predicted squared error as the expected absolute error in stars, sqrt(2/pi x pred_error): the mean
    of |e| for a normal error e of that variance (schema.EXPECTED_ABS_ERROR)."""
    return (pred_error.cast(pl.Float64).clip(lower_bound=0.0) * (2.0 / np.pi)).sqrt()


def _prediction_tables(
    models: RunModels, out: str, stamp: Stamp, users: pl.DataFrame, items: pl.DataFrame
) -> tuple[dict[str, Any], pl.DataFrame, pl.DataFrame, dict[str, Any]]:
    """One pass over the final scored table: the predictions table and the accuracy of each stage, shards in
    threads (Polars and Parquet's writer release the GIL; memory: one shard per thread).

    Returns the metrics by stage (and `baselines`: m.mean_baselines), the test rows, every (user, item, is_test,
    is_train) pair and the cold-start counts.
    """
    from concurrent.futures import ThreadPoolExecutor

    files = shards(models.scored)
    parts: list[_ShardSums] = []
    one = partial(_prediction_shard, out=out, stamp=stamp, names=_Names.of(users, items))
    pool = ThreadPoolExecutor(storage.shard_threads(len(files)))
    with logs.Progress(log, "predictions", len(files)) as progress, pool:
        for part in pool.map(one, enumerate(files)):  # in shard order: the same sums whatever the timing
            parts.append(part)
            progress.update(len(parts))
    sums = {name: [p.errors[name] for p in parts if name in p.errors] for name in ("mf", "reliability", "rating")}
    if models.reliability is not None:
        result = {name: m.split_metrics(pl.concat(sums[name])) for name in ("mf", "reliability", "rating")}
    else:
        result = {"single": m.split_metrics(pl.concat(sums["rating"]))}
    tests = pl.concat([p.test for p in parts])
    result["baselines"] = m.mean_baselines(pl.concat([p.items for p in parts]), tests)
    cold = pl.concat([p.cold for p in parts]).group_by("split").agg(pl.col("n", "cold").sum()).sort("split")
    counts = {r["split"]: {"rows": int(r["n"]), "cold": int(r["cold"])} for r in cold.iter_rows(named=True)}
    return result, tests, pl.concat([p.seen for p in parts]), counts


@dataclass(frozen=True)
class _Names:
    """Original ids and titles by index position (user_idx, item_idx): a gather per row instead of a join."""

    user_id: np.ndarray
    movie_id: np.ndarray
    title: pl.Series

    @staticmethod
    def of(users: pl.DataFrame, items: pl.DataFrame) -> _Names:
        def by_index(frame: pl.DataFrame, index: str, column: str) -> pl.Series:
            n = int(frame[index].max()) + 1 if frame.height else 0
            full = pl.DataFrame({index: np.arange(n, dtype=np.int64)})
            return full.join(frame.select(pl.col(index).cast(pl.Int64), column), on=index, how="left")[column]

        return _Names(
            user_id=by_index(users, "user_idx", "user_id").to_numpy(),
            movie_id=by_index(items, "item_idx", "item_id").to_numpy(),
            title=by_index(items, "item_idx", "title"),
        )


@dataclass(frozen=True)
class _ShardSums:
    """What the accuracy figures need from one scored shard (partial sums, added over shards)."""

    errors: dict[str, pl.DataFrame]
    """m.error_sums by stage (mf, reliability, rating) where the shard has the stage's prediction."""
    items: pl.DataFrame
    """m.item_sums: count and sum of each movie's training ratings."""
    cold: pl.DataFrame
    """Rows and cold rows per split."""
    test: pl.DataFrame
    """The test rows (ids, rating, predictions)."""
    seen: pl.DataFrame
    """Every rated (user_idx, item_idx, is_test, is_train)."""


def _prediction_shard(job: tuple[int, Shard], *, out: str, stamp: Stamp, names: _Names) -> _ShardSums:
    """Write scored shard `job` = (n, shard) as part n of the predictions table (a file per split); its partial
    sums."""
    n, shard = job
    wanted = [c for c in storage.parquet_schema(shard.uri).names if c not in SESSION_COLUMNS]  # stages 2-3 read
    frame = pl.from_arrow(shard.read(wanted))
    assert isinstance(frame, pl.DataFrame)
    for part in frame.partition_by("split", maintain_order=True):  # a file per split: no filter of the titles
        tables.write_table(_predictions(part, names), out, "predictions", stamp, part=n)
    codes = m.split_codes(frame["split"])
    errors = {"rating": m.error_sums(frame, "pred_rating", codes=codes)}
    if "mf_pred" in frame.columns:
        errors["mf"] = m.error_sums(frame, "mf_pred", codes=codes)
    if "pred_error" in frame.columns and "error" in frame.columns:
        errors["reliability"] = m.error_sums(frame, "pred_error", target="error", codes=codes)
    code, splits = codes
    is_test, is_train = (
        pl.Series(code == splits.index(s) if s in splits else np.zeros(len(code), bool)) for s in ("test", "train")
    )
    cold = frame["cold"].to_numpy() if "cold" in frame.columns else np.zeros(len(code), bool)
    keep = [c for c in ("user_idx", "item_idx", "rating", "mf_pred", "pred_rating", "pred_error") if c in frame]
    return _ShardSums(
        errors=errors,
        items=m.item_sums(frame, codes=codes),
        cold=pl.DataFrame(
            {
                "split": splits,
                "n": np.bincount(code, minlength=len(splits)),
                "cold": np.bincount(code, weights=cold, minlength=len(splits)).astype(np.int64),
            }
        ),
        test=frame.filter(is_test).select(keep),
        seen=frame.select("user_idx", "item_idx").with_columns(is_test=is_test, is_train=is_train),
    )


def _predictions(frame: pl.DataFrame, names: _Names) -> pa.Table:
    """Scored rows as the analyst table: original ids, title, split, rating time, rating and the predictions
    (stage 2's as the expected absolute error)."""
    for name in ("pred_error", "mf_pred"):
        if name not in frame.columns:
            frame = frame.with_columns(pl.lit(None, pl.Float32).alias(name))
    if "cold" not in frame.columns:
        frame = frame.with_columns(cold=pl.lit(False))
    user, item = frame["user_idx"].to_numpy(), frame["item_idx"].to_numpy()
    named = frame.with_columns(
        user_id=pl.Series(names.user_id[user]),
        movie_id=pl.Series(names.movie_id[item]),
        title=names.title.gather(item),
        rated_at=pl.from_epoch(pl.col("timestamp"), time_unit="s"),
        **{EXPECTED_ABS_ERROR: expected_abs_error(pl.col("pred_error"))},
    )
    return _to_schema(named, PREDICTIONS)


def _ranking(
    ranker: Ranker,
    known: Csr,
    test: pl.DataFrame,
    cfg: PipelineConfig,
    n_users: int,
    name: str,
    *,
    seed: int,
    user_ids: np.ndarray | None = None,
) -> dict[str, Any]:
    """Precision/Recall/NDCG@k on test for the popularity baseline, MF's own ranking and the final ranking.

    Candidates: movies the user has no train or validation rating for; relevant: test ratings at or above
    the threshold. Users without a relevant test rating are skipped; `ranking_users` samples users by a seeded
    hash of their original ids (`user_ids`, per user index: sampled_users).
    `vs_popularity` holds each ranking's NDCG@k over the popularity baseline's.
    """
    k, ev, shown = cfg.evaluation.ranking_k, cfg.evaluation, cfg.outputs
    protocol = RankingProtocol.build(
        known, test, n_users, k, ev.relevance_threshold, sample=ev.ranking_users, seed=seed, user_ids=user_ids
    )
    if protocol is None:
        return {"users": 0}
    out: dict[str, Any] = {
        "k": k,
        "relevance_threshold": ev.relevance_threshold,
        "candidates": shown.candidates,
        "min_ratings": shown.recommend_min_ratings,
        "rank_candidates": shown.rank_candidates
        if ranker.retrieval is not None or ranker.factors is not None
        else "popularity",
        "rank_order": shown.rank_order,
        "popularity": protocol.popularity(ranker.popularity, ranker.allowed),
    }
    if ranker.factors is not None:
        mf = partial(mf_scores, ranker.factors, ranker.global_mean)
        mf_score, mf_items = top_k_of(mf, protocol.users, k, exclude=protocol.exclude, allowed=ranker.allowed)
        out["mf"] = protocol.score(torch.where(mf_score > -torch.inf, mf_items, -1))
    ranked = ranker.rank(protocol.users, k, candidates=shown.candidates, exclude=protocol.exclude)
    out[name] = protocol.score(_top_matrix(ranked, protocol.row_of, len(protocol.users), k))
    out["vs_popularity"] = vs_popularity(out, k)
    return out


def vs_popularity(ranking: dict[str, Any], k: int) -> dict[str, float]:
    """NDCG@k of every ranking in `ranking` over the popularity baseline's (> 1: better than popularity)."""
    key = f"ndcg@{k}"
    base = ranking.get("popularity", {}).get(key)
    return {
        name: (r[key] / base if base else float("nan"))
        for name, r in ranking.items()
        if isinstance(r, dict) and key in r and name != "popularity"
    }


@dataclass(frozen=True)
class Rated:
    """Every rated (user, movie) of a run as one user -> movies Csr with each entry's split: the three lists a run
    masks (recommendations: all; the evaluation: train and validation; EASE: train) from one sort."""

    all: Csr
    is_test: torch.Tensor
    is_train: torch.Tensor
    """bool, one per entry of `all`."""

    @staticmethod
    def of(pairs: pl.DataFrame, n_users: int) -> Rated:
        """pairs: (user_idx, item_idx, is_test, is_train), a row per rating."""
        user, item = (torch.from_numpy(pairs[c].to_numpy().astype(np.int64)) for c in ("user_idx", "item_idx"))
        csr, order = Csr.build_ordered(user, item, n_users)
        flags = (torch.from_numpy(pairs[c].to_numpy())[order] for c in ("is_test", "is_train"))
        return Rated(csr, *flags)

    def known(self) -> Csr:
        """user -> movies rated in train or validation."""
        return self.all.subset(~self.is_test)

    def train(self) -> Csr:
        """user -> movies rated in train."""
        return self.all.subset(self.is_train)


@dataclass(frozen=True)
class RankingProtocol:
    """Who is ranked and what counts as a hit: the same for every ranking compared (models and popularity)."""

    users: torch.Tensor
    """int64 (U,): the users evaluated (those with a relevant test rating), ascending."""
    row_of: np.ndarray
    """int64 (n_users,): each user's row in `users`, -1 if not evaluated."""
    exclude: Csr
    """user -> movies rated in train or validation (never ranked)."""
    rel_rows: torch.Tensor
    rel_items: torch.Tensor
    """The relevant (row, item) pairs: test ratings at or above the threshold."""
    k: int

    @staticmethod
    def build(
        known: Csr,
        test: pl.DataFrame,
        n_users: int,
        k: int,
        threshold: float,
        *,
        sample: int = 0,
        seed: int = 0,
        user_ids: np.ndarray | None = None,
    ) -> RankingProtocol | None:
        """known: user -> movies rated in train or validation (Rated.known); test: the test rows (user_idx,
        item_idx, rating); user_ids: each user index's original id, by which `sample` users are drawn (default:
        the indices)."""
        relevant = test.filter(pl.col("rating") >= threshold).select("user_idx", "item_idx")
        users = np.unique(relevant["user_idx"].to_numpy())
        if sample and len(users) > sample:
            users = sampled_users(users, user_ids[users] if user_ids is not None else users, sample, seed)
        if len(users) == 0:
            return None
        row_of = np.full(n_users, -1, dtype=np.int64)
        row_of[users] = np.arange(len(users))
        rel = relevant.filter(pl.Series(row_of[relevant["user_idx"].to_numpy()] >= 0))
        return RankingProtocol(
            users=torch.from_numpy(users.astype(np.int64)),
            row_of=row_of,
            exclude=known,
            rel_rows=torch.from_numpy(row_of[rel["user_idx"].to_numpy()]),
            rel_items=torch.from_numpy(rel["item_idx"].to_numpy().astype(np.int64)),
            k=k,
        )

    def score(self, top_items: torch.Tensor) -> dict[str, float]:
        """Precision/Recall/NDCG@k of a (U, >=k) item matrix in the order of `users` (-1: empty slot)."""
        return m.ranking_metrics(top_items, self.rel_rows, self.rel_items, self.k)

    def popularity(self, n_train: torch.Tensor, allowed: torch.Tensor) -> dict[str, float]:
        """The baseline: the most-rated allowed movies in training that the user has not rated."""
        counts, items = popularity_top(n_train, self.users, self.k, exclude=self.exclude, allowed=allowed)
        return self.score(torch.where(counts > -torch.inf, items, -1))


def sampled_users(users: np.ndarray, ids: np.ndarray, sample: int, seed: int) -> np.ndarray:
    """The `sample` of `users` (indices) whose original `ids` hash lowest under `seed` (pair_hash with its own
    salt), ascending: the same people in every run and on every day, whatever their indices, and a user set that
    gains or loses a few users keeps all but those few of its sample. A figure compared across runs (the drift
    table's NDCG change) then compares the same users, not two random draws."""
    from recdist.data.splits import pair_hash

    hashes = pair_hash(ids, np.full(len(ids), seed, np.int64), RANKING_SALT)
    return np.sort(users[np.argsort(hashes, kind="stable")[:sample]])


def _top_matrix(ranked: pl.DataFrame, row_of: np.ndarray, n_rows: int, k: int) -> torch.Tensor:
    """(n_rows, k) item matrix from a rank() frame; -1 where a user got fewer than k movies."""
    top = torch.full((n_rows, k), -1, dtype=torch.long)
    rows = torch.from_numpy(row_of[ranked["user_idx"].to_numpy()])
    cols = torch.from_numpy(ranked["rank"].to_numpy().astype(np.int64) - 1)
    top[rows, cols] = torch.from_numpy(ranked["item_idx"].to_numpy().astype(np.int64))
    return top


def _deciles(test: pl.DataFrame) -> pl.DataFrame:
    """The calibration table: by decile of stage 2's predicted error, the expected absolute error (range and
    mean) against the observed errors of the final and of the MF prediction on test."""
    test = test.with_columns(expected_abs_error(pl.col("pred_error")).alias(EXPECTED_ABS_ERROR))
    test = test.filter(pl.col(EXPECTED_ABS_ERROR).is_not_null())
    order = m.ordinal_order(test[EXPECTED_ABS_ERROR].to_numpy())  # both predictions binned by one sort
    final = m.reliability_deciles(test, pred="pred_rating", reliability=EXPECTED_ABS_ERROR, order=order)
    if "mf_pred" in test.columns:
        mf = m.reliability_deciles(test, pred="mf_pred", reliability=EXPECTED_ABS_ERROR, order=order)
        return final.join(mf.select("decile", mf_mae="mae", mf_rmse="rmse"), on="decile")
    return final.with_columns(mf_mae=pl.lit(None, pl.Float64), mf_rmse=pl.lit(None, pl.Float64))


def _reliability_summary(deciles: pl.DataFrame, test: pl.DataFrame) -> dict[str, float]:
    """The headline: most vs least reliable decile, and rank correlation of predicted and observed error."""
    if deciles.height == 0:
        return {}
    first, last = deciles.row(0, named=True), deciles.row(deciles.height - 1, named=True)
    observed = (test["rating"].cast(pl.Float64) - test["pred_rating"].cast(pl.Float64)) ** 2
    return {
        "most_reliable_rmse": first["rmse"],
        "least_reliable_rmse": last["rmse"],
        "ratio": last["rmse"] / first["rmse"] if first["rmse"] else float("nan"),
        "spearman_pred_vs_observed_sq_error": m.spearman(test["pred_error"], observed),
    }


def _recommendations(recs: pl.DataFrame, users: pl.DataFrame, items: pl.DataFrame) -> pa.Table:
    joined = (
        analyst_recommendations(recs)
        .join(users.select("user_idx", "user_id"), on="user_idx", how="left")
        .join(items.select("item_idx", "item_id", "title"), on="item_idx", how="left")
        .rename({"item_id": "movie_id"})
        .sort("user_id", "rank")
        .select(RECOMMENDATIONS.names)
    )
    return _to_schema(joined, RECOMMENDATIONS)


def _with_kept(ranked: pa.Table, carry: Carry, users: pl.DataFrame, items: pl.DataFrame) -> pa.Table:
    """`ranked` (the recommendations of the users with something new) and the previous run's recommendations of
    the users with nothing new, under today's titles, in the table's order."""
    previous = tables.read_table(carry.outputs, "recommendations")
    assert previous is not None, "recdist.pipeline._carry keeps recommendations only from outputs that have them"
    same = users.filter(pl.Series(carry.unchanged[users["user_idx"].to_numpy()]))["user_id"]
    titles = items.select(pl.col("item_id").alias("movie_id"), "title")
    kept = previous.filter(pl.col("user_id").is_in(same.implode())).drop("title")
    kept = kept.join(titles, on="movie_id", how="left")
    merged = pl.concat([pl.from_arrow(ranked), kept.select(RECOMMENDATIONS.names)], how="vertical_relaxed")
    return _to_schema(merged.sort("user_id", "rank"), RECOMMENDATIONS)


def analyst_recommendations(ranked: pl.DataFrame) -> pl.DataFrame:
    """A Ranker.rank() frame in the analysts' names: reliability as the expected absolute error, the candidate
    score that breaks ties of rank_score."""
    error = expected_abs_error(pl.col("reliability")).cast(pl.Float32).alias(EXPECTED_ABS_ERROR)
    return ranked.with_columns(error).rename({"mf_score": "candidate_score"})


def _user_factors(factors: dict[str, torch.Tensor], users: pl.DataFrame) -> pa.Table:
    """Users with training ratings: stage 1's bias and factors (cold users have none)."""
    known = users["n_train"].to_numpy() > 0
    frame = (
        users.filter(pl.Series(known))
        .select("user_id", "n_train")
        .with_columns(
            bias=pl.Series(factors["user_bias"].reshape(-1).numpy()[known]),
            factors=pl.Series(list(factors["user_factors"].numpy()[known]), dtype=pl.List(pl.Float32)),
        )
    )
    return _to_schema(frame, USER_FACTORS)


def _item_factors(factors: dict[str, torch.Tensor], items: pl.DataFrame, cfg: PipelineConfig) -> pa.Table:
    """Movies with training ratings: bias, factors and the first two principal components of the factors.

    The components are fitted on movies with at least `similar_min_ratings` training ratings (rarely rated
    movies keep factors near their initial noise) and signed so that the most-rated movie scores >= 0.
    """
    q = factors["item_factors"].double()
    n_train = torch.from_numpy(items["n_train"].to_numpy().astype(np.int64))
    fit = n_train >= max(1, cfg.outputs.similar_min_ratings)
    if int(fit.sum()) < 3:
        fit = n_train > 0
    centre = q[fit].mean(0)
    _, _, v = torch.linalg.svd(q[fit] - centre, full_matrices=False)
    pcs = (q - centre) @ v[:2].T if v.shape[0] >= 2 else torch.zeros(len(q), 2, dtype=torch.float64)
    top = int(torch.argmax(n_train))
    pcs *= torch.where(pcs[top] < 0, -1.0, 1.0)
    known = (n_train > 0).numpy()
    frame = (
        items.filter(pl.Series(known))
        .select(movie_id=pl.col("item_id"), title=pl.col("title"), genres=pl.col("genres"), n_train=pl.col("n_train"))
        .with_columns(
            bias=pl.Series(factors["item_bias"].numpy()[known]),
            pc1=pl.Series(pcs[:, 0].float().numpy()[known]),
            pc2=pl.Series(pcs[:, 1].float().numpy()[known]),
            factors=pl.Series(list(factors["item_factors"].numpy()[known]), dtype=pl.List(pl.Float32)),
        )
    )
    return _to_schema(frame, ITEM_FACTORS)


def _similar(factors: dict[str, torch.Tensor], items: pl.DataFrame, cfg: PipelineConfig) -> pa.Table:
    """The k nearest movies by cosine of factors, among movies with enough training ratings."""
    n_train = torch.from_numpy(items["n_train"].to_numpy().astype(np.int64))
    allowed = n_train >= max(1, cfg.outputs.similar_min_ratings)
    queries = torch.nonzero(allowed).squeeze(1)
    if int(allowed.sum()) < 2:
        return SIMILAR_ITEMS.empty_table()
    cos, idx = cosine_neighbours(factors["item_factors"], queries, cfg.outputs.similar_k, allowed=allowed)
    width = idx.shape[1]
    ids = items["item_id"].to_numpy()
    titles = items["title"]
    frame = pl.DataFrame(
        {
            "movie_id": np.repeat(ids[queries.numpy()], width),
            "rank": np.tile(np.arange(1, width + 1, dtype=np.int16), len(queries)),
            "similar_movie_id": ids[idx.reshape(-1).numpy()],
            "similar_title": titles.gather(pl.Series(idx.reshape(-1).numpy())),
            "cosine": cos.reshape(-1).numpy(),
        }
    ).filter(pl.col("cosine").is_finite())
    return _to_schema(frame, SIMILAR_ITEMS)


def rated_csr(pairs: pl.DataFrame, n_users: int) -> Csr:
    """user -> rated items, from a frame of (user_idx, item_idx)."""
    user, item = (torch.from_numpy(pairs[c].to_numpy().astype(np.int64)) for c in ("user_idx", "item_idx"))
    return Csr.build(user, item, n_users)


def _to_schema(frame: pl.DataFrame, schema: pa.Schema) -> pa.Table:
    return frame.select(schema.names).to_arrow().cast(schema)
