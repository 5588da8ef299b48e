"""Stage-1 warm start: begin MF training from a previous run's factors and biases, mapped by original ids.

`previous_rows` and `warm_state` are pure (ids and tensors in, tensors out): known users and items keep the
previous rows, new ones keep the cold initialisation (the rows a cold run draws), gone ones are dropped.
`resolve` reads a previous pipeline run's stage 1 (local or s3://); `apply` is what a training worker calls.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from recdist import storage
from recdist.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from recdist.config import StageConfig
    from recdist.models.base import Model

log = logging.getLogger(__name__)

USER_TABLES = ("user_factors.weight", "user_bias.weight")
ITEM_TABLES = ("item_factors.weight", "item_bias.weight")
"""The state_dict entries of the MF family indexed by user_idx / item_idx (recdist.models.mf)."""


@dataclass(frozen=True)
class WarmStart:
    """Where a warm start reads from: recorded in the stage manifest, hashed into the stage's hash."""

    run: str
    """The previous pipeline run directory."""
    model: str
    """Its stage-1 model (RUN/mf/model)."""
    data: str
    """The dataset that model was trained on (its id maps say which row is which original id)."""
    stage_hash: str
    """The previous stage 1's hash: a previous run redone under the same path is another warm start."""

    def to_json(self) -> dict[str, str]:
        return asdict(self)


def resolve(spec: str, beside: str | None = None) -> WarmStart | None:
    """The WarmStart of `--warm-start PREVIOUS_RUN`: its committed stage 1 and the dataset it trained on.

    `auto`: the latest complete run beside the run directory `beside` (recdist.runs.latest_complete); None (a
    cold run, said in the log) when there is none.
    """
    if spec == "auto":
        from recdist.runs import latest_complete

        found = latest_complete(beside) if beside else None
        if found is None:
            log.info("--warm-start auto: no complete run beside %s, a cold run", beside)
            return None
        log.info("--warm-start auto: %s", found)
        spec = found
    run = storage.absolute(spec)
    stage_dir = storage.join(run, "mf")
    if not storage.is_committed(stage_dir):
        raise ConfigError(
            f"{run} has no committed stage 1 (mf/manifest.json) to warm-start from",
            where="--warm-start",
            fix="point at a pipeline run directory whose mf stage finished, or drop --warm-start for a cold run",
        )
    stage = storage.read_json(storage.join(stage_dir, storage.MANIFEST))
    model = storage.join(stage_dir, stage.get("model") or "model")
    trained_on = storage.read_json(storage.join(model, storage.MANIFEST))["data"]
    return WarmStart(run=run, model=model, data=trained_on, stage_hash=stage["stage_hash"])


def warm_train(stage: StageConfig, previous_model: str) -> StageConfig:
    """`stage` with the peak learning rate the previous model last trained at (its history's last epoch): a
    cold run's peak would throw the warm factors out of the minimum they start in. The schedule then goes on
    over this run's epochs as configured; a previous model without a history keeps `stage` as it is."""
    history_uri = storage.join(previous_model, "history.parquet")
    if not storage.exists(history_uri):
        return stage
    rows = pl.from_arrow(storage.read_parquet(history_uri, columns=["epoch", "lr"])).sort("epoch")
    at = rows["lr"].tail(1)
    if not len(at) or not at[0] or at[0] != at[0]:  # ALS: no learning rate
        return stage
    train = stage.train.model_copy(update={"lr": float(at[0])})
    return stage.model_copy(update={"train": train})


def previous_rows(previous_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """For each index of `ids` (original ids by index), the index of the same id in `previous_ids`; -1 if new."""
    lookup = pl.DataFrame({"_id": previous_ids.astype(np.int64), "_prev": np.arange(len(previous_ids), dtype=np.int64)})
    joined = pl.DataFrame({"_id": ids.astype(np.int64)}).join(lookup, on="_id", how="left", maintain_order="left")
    return joined["_prev"].fill_null(-1).to_numpy()


def warm_state(
    cold: dict[str, torch.Tensor],
    previous: dict[str, torch.Tensor],
    user_rows: np.ndarray,
    item_rows: np.ndarray,
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """`cold` (a freshly built model's state_dict) with the rows of known users and items taken from `previous`
    (the previous model's), by `previous_rows`; entries whose widths differ stay cold (and are named)."""
    import torch

    out, skipped = dict(cold), []
    for names, rows in ((USER_TABLES, user_rows), (ITEM_TABLES, item_rows)):
        known = rows >= 0
        for name in names:
            if name not in cold or name not in previous:
                continue
            if cold[name].shape[1:] != previous[name].shape[1:]:
                skipped.append(name)
                continue
            table = cold[name].clone()
            table[torch.from_numpy(known)] = previous[name][torch.from_numpy(rows[known])].to(table)
            out[name] = table
    return out, skipped


def apply(model: Model, warm: dict[str, Any], data: str) -> dict[str, int]:
    """Load the previous model named by `warm` (WarmStart.to_json) into `model`, which trains on `data`;
    counts of known and new users and items."""
    from recdist.data.dataset import read_items, read_users
    from recdist.models.io import load_model

    previous = load_model(warm["model"]).state_dict()
    users = previous_rows(read_users(warm["data"]).sort("user_idx")["user_id"].to_numpy(),
                          read_users(data).sort("user_idx")["user_id"].to_numpy())  # fmt: skip
    items = previous_rows(read_items(warm["data"]).sort("item_idx")["item_id"].to_numpy(),
                          read_items(data).sort("item_idx")["item_id"].to_numpy())  # fmt: skip
    state, skipped = warm_state(model.state_dict(), previous, users, items)
    if skipped:
        log.warning("warm start: %s differ in width from the previous model, initialised cold", ", ".join(skipped))
    model.load_state_dict(state)
    return {
        "known_users": int((users >= 0).sum()),
        "new_users": int((users < 0).sum()),
        "known_items": int((items >= 0).sum()),
        "new_items": int((items < 0).sum()),
    }
