"""Top-N ranking with a run's models: a candidate model proposes movies, the later stages score them.

Scoring every (user, movie) pair with an MLP is out of reach at ML-20M size (3.7 billion pairs), so a cheap
model picks `candidates` movies per user and the final stages (stage 2's predicted error and stage 3's rating,
or a single model) score only those. The candidate model is stage 1's MF, or a model of which movies a user
rates (recdist/models/implicit.py: EASE, iALS), or the most-rated movies (models without mf_tables() and no
implicit model). The final order (`order`) is the predicted rating, the candidate score, or their blend: the
probability that the user rates the movie (the candidate score) times the probability that the rating reaches
the relevance threshold given the predicted rating and its predicted squared error.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np
import polars as pl
import pyarrow as pa
import torch

from recdist.infer.scoring import Predictor
from recdist.infer.session import empty_session
from recdist.infer.topn import Csr, mf_scores, popularity_top, top_k_of
from recdist.models.base import Model
from recdist.models.implicit import Implicit
from recdist.schema import SPLIT_TYPE

RANKED = {"user_idx": pl.Int32, "rank": pl.Int16, "item_idx": pl.Int32, "score": pl.Float32,
          "rank_score": pl.Float32, "reliability": pl.Float32, "mf_score": pl.Float32}  # fmt: skip
"""The columns of Ranker.rank()'s frame."""


@dataclass
class Ranker:
    """Ranks movies for users: MF factors for candidates, then Predictors of the later stages in order."""

    factors: dict[str, torch.Tensor] | None
    """MF tables with cold users' rows zeroed (they rank by mean + movie bias), or None: popularity pool."""
    global_mean: float
    allowed: torch.Tensor
    """bool (n_items,): movies with enough training ratings (only they are recommended)."""
    popularity: torch.Tensor
    """float (n_items,): training ratings per movie (the pool for models without factors)."""
    stages: list[Predictor]
    """Predictors applied in order to the candidate pairs (reliability then rating, or the single model)."""
    retrieval: Implicit | None = None
    """The model of which movies a user rates that proposes the candidates; None: the MF (or popularity)."""
    order: str = "rating"
    """Final order: `rating` (predicted rating), `candidate` (candidate score) or `blend` (see blend())."""
    threshold: float = 4.0
    """Where the blend's probability of a good rating is taken: the relevance threshold less half a rating step
    (a rating rounds up to 4 stars from 3.75 on a half-star scale)."""

    @staticmethod
    def build(
        mf: Model | None,
        stages: list[Predictor],
        n_train_items: np.ndarray,
        min_ratings: int = 1,
        *,
        retrieval: Implicit | None = None,
        order: str = "rating",
        threshold: float = 4.0,
    ) -> Ranker:
        """stages: the predictors applied in order to candidate pairs (their plans built from one TrainedOn);
        min_ratings: only movies with at least this many training ratings are ranked (and at least one)."""
        first = stages[0].plan
        tables = mf.mf_tables() if mf is not None else None
        factors, mean = None, None
        if tables is not None:
            factors = {k: v.float().cpu().clone() for k, v in tables.tensors().items()}
            cold = ~torch.from_numpy(np.asarray(first.known_users[0], dtype=bool))
            factors["user_factors"][cold] = 0.0
            factors["user_bias"][cold] = 0.0
            mean = tables.mu if tables.link == "identity" else None
        popularity = torch.from_numpy(np.asarray(n_train_items, dtype=np.float32))
        return Ranker(
            factors=factors,
            global_mean=first.global_mean if mean is None else mean,
            allowed=recommendable(n_train_items, min_ratings),
            popularity=popularity,
            stages=stages,
            retrieval=retrieval,
            order=order,
            threshold=threshold,
        )

    def candidates(self, users: torch.Tensor, k: int, exclude: Csr | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(candidate score, item) (U, k) per user, best first: the implicit model's, else MF's best unseen
        movies, else the most-rated unseen ones (score NaN). -inf marks padding slots: the user had fewer than k
        unseen movies left."""
        if self.retrieval is not None:
            columns = self.retrieval.columns
            tie = 1e-6 * self.popularity[columns] / self.popularity.max().clamp(min=1)  # cold users: most-rated first
            scores_of = lambda u: self.retrieval.column_scores(u).add_(tie)  # noqa: E731
            return top_k_of(scores_of, users, k, exclude=exclude, allowed=self.allowed, columns=columns)
        if self.factors is None:
            counts, items = popularity_top(self.popularity, users, k, exclude=exclude, allowed=self.allowed)
            return torch.where(torch.isfinite(counts), torch.nan, -torch.inf), items
        mf = partial(mf_scores, self.factors, self.global_mean)
        return top_k_of(mf, users, k, exclude=exclude, allowed=self.allowed)

    def rank(
        self, users: torch.Tensor, n: int, *, candidates: int, exclude: Csr | None = None, chunk: int = 8192
    ) -> pl.DataFrame:
        """The top n per user: columns user_idx, rank (1 = best), item_idx, score (predicted rating), rank_score
        (what the list is ordered by), reliability, mf_score (the candidate score)."""
        parts = []
        for lo in range(0, len(users), chunk):
            block = users[lo : lo + chunk].long()
            mf_score, items = self.candidates(block, max(candidates, n), exclude)
            valid = mf_score != -torch.inf
            pairs = _pairs(block.repeat_interleave(items.shape[1]), items.reshape(-1))
            for stage in self.stages:
                pairs = stage(pairs)
            score = _column(pairs, "pred_rating").reshape(items.shape)
            reliability = _column(pairs, "pred_error").reshape(items.shape)
            by = rank_score(self.order, mf_score, score, reliability, self.threshold)
            best, order = top_stable(torch.where(valid, by, -torch.inf), n)
            keep = torch.isfinite(best).reshape(-1)
            width = order.shape[1]
            parts.append(
                pl.DataFrame(
                    {
                        "user_idx": block.repeat_interleave(width).numpy().astype(np.int32),
                        "rank": np.tile(np.arange(1, width + 1, dtype=np.int16), len(block)),
                        "item_idx": items.gather(1, order).reshape(-1).numpy().astype(np.int32),
                        "score": score.gather(1, order).reshape(-1).numpy(),
                        "rank_score": best.reshape(-1).numpy(),
                        "reliability": reliability.gather(1, order).reshape(-1).numpy(),
                        "mf_score": mf_score.gather(1, order).reshape(-1).numpy().astype(np.float32),
                    }
                ).filter(pl.Series(keep.numpy()))
            )
        if not parts:  # no users (a fold-in night where nobody has anything new): the columns, no rows
            return pl.DataFrame(schema=RANKED)
        frame = pl.concat(parts)
        return frame.with_columns(pl.col("reliability").fill_nan(None), pl.col("mf_score").fill_nan(None))


def rank_score(
    order: str, candidate: torch.Tensor, rating: torch.Tensor, error: torch.Tensor, threshold: float
) -> torch.Tensor:
    """What the final list is ordered by. `rating`: the predicted rating; `candidate`: the candidate score;
    `blend`: P(rated) x P(rating >= threshold), with the candidate score (clipped at 0) as the first and the
    normal probability of the threshold given the predicted rating and its predicted squared error (stage 2;
    the variance of ratings where it has none) as the second."""
    if order == "rating":
        return rating
    if order == "candidate":
        return torch.nan_to_num(candidate, nan=0.0)  # popularity candidates: keep their order
    candidate = torch.nan_to_num(candidate, nan=1.0)
    spread = torch.sqrt(torch.where(torch.isfinite(error), error, torch.ones_like(error)).clamp(min=1e-3))
    good = torch.special.ndtr((rating - threshold) / spread)
    return (candidate.clamp(min=0) + 1e-6) * good


def recommendable(n_train_items: np.ndarray, min_ratings: int = 1) -> torch.Tensor:
    """bool (n_items,): the movies that may be recommended, those with at least `min_ratings` (and one)
    training ratings (pipeline.recommend_min_ratings)."""
    return torch.from_numpy(np.asarray(n_train_items) >= max(1, min_ratings))


def top_stable(score: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The n best (score, column) per row, equal scores in column order. Candidates come best MF score first, so
    ties of the final stage (which sees the same inputs for many of a generous rater's candidates, and clips at
    the top of the scale) fall back on stage 1's order instead of an arbitrary one."""
    best, order = torch.sort(score, dim=1, descending=True, stable=True)
    return best[:, :n], order[:, :n]


def _pairs(user: torch.Tensor, item: torch.Tensor) -> pa.Table:
    """Candidate (user, item) rows shaped like a stage-1 input (rating unknown: 0, split test; no rating time,
    so no session context: zeros)."""
    n = len(user)
    return pa.table(
        {
            "user_idx": pa.array(user.numpy().astype(np.int32)),
            "item_idx": pa.array(item.numpy().astype(np.int32)),
            "rating": pa.array(np.zeros(n, dtype=np.float32)),
            "timestamp": pa.array(np.zeros(n, dtype=np.int64)),
            "split": pa.DictionaryArray.from_arrays(
                pa.array(np.full(n, 2, dtype=np.int8)), ["train", "val", "test"]
            ).cast(SPLIT_TYPE),
            **empty_session(n),
        }
    )


def _column(table: pa.Table, name: str) -> torch.Tensor:
    if name not in table.column_names:
        return torch.full((table.num_rows,), torch.nan)
    return torch.from_numpy(table[name].to_numpy().astype(np.float32))
