"""Top-N ranking with a run's models: MF proposes candidates, the final stage re-ranks them.

Scoring every (user, movie) pair with an MLP is out of reach at ML-20M size (3.7 billion pairs), so the MF
score (a matrix product) picks `candidates` movies per user and the final stage (stage 3 with stage 2's
predicted error, or a single model) scores only those. Models without mf_tables() (NCF, autoencoder) take
the most-rated movies as their candidate pool.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
import pyarrow as pa
import torch

from recdist.infer.scoring import Predictor
from recdist.infer.session import empty_session
from recdist.infer.topn import Csr, top_n
from recdist.models.base import Model
from recdist.schema import SPLIT_TYPE


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

    @staticmethod
    def build(mf: Model | None, stages: list[Predictor], n_train_items: np.ndarray, min_ratings: int = 1) -> Ranker:
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
        )

    def candidates(self, users: torch.Tensor, k: int, exclude: Csr | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(mf_score, item) (U, k) per user: MF's best unseen movies, or the most-rated unseen ones (score NaN).

        -inf marks padding slots: the user had fewer than k unseen movies left.
        """
        if self.factors is not None:
            return top_n(self.factors, self.global_mean, users, k, exclude=exclude, allowed=self.allowed)
        fake = {
            "user_factors": torch.zeros(int(users.max()) + 1 if len(users) else 1, 1),
            "item_factors": torch.zeros(len(self.popularity), 1),
            "user_bias": torch.zeros(int(users.max()) + 1 if len(users) else 1),
            "item_bias": torch.log1p(self.popularity),
        }
        scores, items = top_n(fake, 0.0, users, k, exclude=exclude, allowed=self.allowed)
        return torch.where(torch.isfinite(scores), torch.nan, -torch.inf), items

    def rank(
        self, users: torch.Tensor, n: int, *, candidates: int, exclude: Csr | None = None, chunk: int = 8192
    ) -> pl.DataFrame:
        """The top n per user: columns user_idx, rank (1 = best), item_idx, score, reliability, mf_score."""
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
            score = torch.where(valid, score, -torch.inf)
            best, order = top_stable(score, n)
            keep = torch.isfinite(best).reshape(-1)
            width = order.shape[1]
            parts.append(
                pl.DataFrame(
                    {
                        "user_idx": block.repeat_interleave(width).numpy().astype(np.int32),
                        "rank": np.tile(np.arange(1, width + 1, dtype=np.int16), len(block)),
                        "item_idx": items.gather(1, order).reshape(-1).numpy().astype(np.int32),
                        "score": best.reshape(-1).numpy(),
                        "reliability": reliability.gather(1, order).reshape(-1).numpy(),
                        "mf_score": mf_score.gather(1, order).reshape(-1).numpy().astype(np.float32),
                    }
                ).filter(pl.Series(keep.numpy()))
            )
        frame = pl.concat(parts) if parts else pl.DataFrame()
        return frame.with_columns(pl.col("reliability").fill_nan(None), pl.col("mf_score").fill_nan(None))


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
