"""The scoring plan of a pass, built without Ray: what a dataset's training rows tell every model of a run.

`trained_on(data)` reads a dataset once (its manifest, which users and movies have training ratings, the spread
of the training ratings; with cross-fitting, each fold model's training rows); `plan_for` then builds the plan of
any model of the run from it with no further reading. The pipeline reads the dataset once per run and passes
the same `TrainedOn` to every stage's pass and to the ranker.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from recdist import storage
from recdist.data.splits import split_is
from recdist.infer.scoring import ROLES, ScoringPlan, role_of
from recdist.train.sampling import fold_of


@dataclass(frozen=True)
class TrainedOn:
    """What a model trained on the train split of a dataset knows of it (all picklable, no Ray)."""

    global_mean: float
    rating_scale: tuple[float, float]
    known_users: tuple[np.ndarray, ...]
    """bool (n_users,) per model: [0] the full training split; [1 + k] the training rows outside fold k."""
    known_items: tuple[np.ndarray, ...]
    spread: float
    """Mean squared deviation of the training ratings from the mean: the error of the mean predictor."""
    fold_seed: int = 0

    @property
    def folds(self) -> int:
        return len(self.known_users) - 1


def trained_on(data: str, folds: int = 0, fold_seed: int = 0) -> TrainedOn:
    """Read `data` once: the full model trained on its train split, fold model k on the train rows outside fold k.

    Without folds the masks come from users/items.parquet (n_train) and only the rating and split columns are
    read; with folds the training rows' indices are read too.
    """
    from recdist.data.dataset import read_manifest, read_rank

    manifest = read_manifest(data)
    n_users, n_items = int(manifest["n_users"]), int(manifest["n_items"])
    mean = float(manifest["global_mean"])
    if folds or not _has_counts(data):
        train = read_rank(data, columns=["user_idx", "item_idx", "split"]).filter(pl.col("split") == "train")
        user, item = train["user_idx"].to_numpy(), train["item_idx"].to_numpy()
        known_users, known_items = [known_mask(user, n_users)], [known_mask(item, n_items)]
        if folds:
            fold = fold_of(user, item, folds, fold_seed)
            for k in range(folds):
                known_users.append(known_mask(user[fold != k], n_users))
                known_items.append(known_mask(item[fold != k], n_items))
    else:  # users/items.parquet count each one's training ratings: no need to read the ratings for the masks
        known_users, known_items = [_trained(data, "users", n_users)], [_trained(data, "items", n_items)]
    return TrainedOn(
        global_mean=mean,
        rating_scale=tuple(float(x) for x in manifest["rating_scale"]),  # type: ignore[arg-type]
        known_users=tuple(known_users),
        known_items=tuple(known_items),
        spread=_train_spread(data, mean),
        fold_seed=fold_seed,
    )


def plan_for(
    view: TrainedOn,
    model_uri: str,
    role: str | None = None,
    *,
    fold_models: tuple[str, ...] = (),
    fallback_model: str | None = None,
    device: str = "cpu",
) -> ScoringPlan:
    """The plan of the model at `model_uri` (and its fold models) over the dataset `view` describes; no reading
    but the model's description when `role` is not given (from the model contract: see scoring.role_of)."""
    if role is None:
        from recdist.models.io import model_class

        role = role_of(model_class(model_uri))
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; expected one of {ROLES}")
    if fold_models and len(fold_models) != view.folds:
        raise ValueError(f"{len(fold_models)} fold models for a dataset read with {view.folds} folds")
    n = 1 + len(fold_models)
    return ScoringPlan(  # absolute paths: the actors' working directory is not ours
        models=tuple(storage.absolute(m) for m in (model_uri, *fold_models)),
        role=role,
        global_mean=view.global_mean,
        rating_scale=view.rating_scale,
        known_users=view.known_users[:n],
        known_items=view.known_items[:n],
        fallback_model=storage.absolute(fallback_model) if fallback_model else None,
        cold_error=view.spread,
        fold_seed=view.fold_seed,
        device=device,
    )


def known_mask(index: np.ndarray, size: int) -> np.ndarray:
    """bool (size,): which indices occur at least once (users or items a model was trained on)."""
    return np.bincount(index.astype(np.int64), minlength=size)[:size] > 0


def _has_counts(data: str) -> bool:
    return all(storage.exists(storage.join(data, f"{side}.parquet")) for side in ("users", "items"))


def _trained(data: str, side: str, size: int) -> np.ndarray:
    """bool (size,): the users (or items) with at least one training rating, from {side}.parquet's n_train."""
    table = storage.read_parquet(storage.join(data, f"{side}.parquet"), columns=[f"{side[:-1]}_idx", "n_train"])
    mask = np.zeros(size, dtype=bool)
    idx = table[f"{side[:-1]}_idx"].to_numpy()
    mask[idx] = table["n_train"].to_numpy() > 0
    return mask


def _train_spread(data: str, mean: float) -> float:
    """Mean squared deviation of the training ratings from the global mean: the error of the mean predictor."""
    from recdist.data.dataset import shards

    total, n = 0.0, 0
    for shard in shards(data):
        t = shard.read(["rating", "split"])
        rating = t["rating"].to_numpy()[split_is(t["split"], "train")].astype(np.float64)
        total, n = total + float(((rating - mean) ** 2).sum()), n + len(rating)
    return total / n if n else 1.0
