"""Warm start: begin a stage's training from the previous run's model of the same stage.

Stage 1 (MF): the factors and biases, mapped by original ids: `previous_rows` and `warm_state` are pure (ids and
tensors in, tensors out): known users and items keep the previous rows, new ones keep the cold initialisation (the
rows a cold run draws), gone ones are dropped. Stages 2 and 3 (MLPs on the frozen stage-1 tables): the trained
weights as they were, when the model, its params and its input width are the same (`same_weights`); their
frozen tables and standardisations stay today's. `resolve` and `stage_source` read a previous pipeline run
(local or s3://); `warm_train` is the warm stage's training settings (recdist.config.WarmConfig); `fallback`
tells when a warm stage came out worse than the previous run's; `apply` is what a training worker calls.
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

    from recdist.config import StageConfig, WarmConfig
    from recdist.models.base import Model
    from recdist.train.solvers import Solver

log = logging.getLogger(__name__)

USER_TABLES = ("user_factors.weight", "user_bias.weight")
ITEM_TABLES = ("item_factors.weight", "item_bias.weight")
"""The state_dict entries of the MF family indexed by user_idx / item_idx (recdist.models.mf)."""


@dataclass(frozen=True)
class WarmStart:
    """Where a stage's warm start reads from: recorded in the stage manifest, hashed into the stage's hash."""

    run: str
    """The previous pipeline run directory."""
    model: str
    """Its model of the same stage (RUN/<stage>/model)."""
    data: str
    """What that model was trained on (stage 1: the dataset, whose id maps say which row is which original id)."""
    stage_hash: str
    """The previous stage's hash: a previous run redone under the same path is another warm start."""

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
    found = stage_source(storage.absolute(spec), "mf")
    if found is None:
        raise ConfigError(
            f"{storage.absolute(spec)} has no committed stage 1 (mf/manifest.json) to warm-start from",
            where="--warm-start",
            fix="point at a pipeline run directory whose mf stage finished, or drop --warm-start for a cold run",
        )
    if not storage.is_committed(found.data):  # its id maps map the previous factors (and a prepare keeps them)
        raise ConfigError(
            f"the dataset {found.data}, which {found.run}'s stage 1 trained on, is gone: its id maps are what "
            "carries that model's factors over",
            where="--warm-start",
            fix="restore that dataset, point --warm-start at another run, or drop --warm-start for a cold run",
        )
    return found


def stage_source(run: str, stage: str) -> WarmStart | None:
    """The WarmStart of the previous run `run`'s stage `stage` (mf, reliability, rating); None when that stage is
    not committed there."""
    stage_dir = storage.join(run, stage)
    if not storage.is_committed(stage_dir):
        return None
    manifest = storage.read_json(storage.join(stage_dir, storage.MANIFEST))
    model = storage.join(stage_dir, manifest.get("model") or "model")
    trained_on = storage.read_json(storage.join(model, storage.MANIFEST))["data"]
    return WarmStart(run=run, model=model, data=trained_on, stage_hash=manifest["stage_hash"])


def misfit(
    previous_model: str, stage: StageConfig, upstream: StageConfig | None = None, previous_upstream: str | None = None
) -> str | None:
    """Why a stage 2/3 `stage` cannot start from `previous_model` (a model name, params or stage-1 rank that
    differs: another architecture or input width), or None when its weights fit. `upstream`: today's stage-1
    config (its rank sets the input width); `previous_upstream`: the stage-1 model `previous_model` was trained
    on (default: the one its manifest names, where it was then)."""
    before = storage.read_json(storage.join(previous_model, storage.MANIFEST))
    if before.get("model") != stage.model:
        return f"the previous model is {before.get('model')}, this stage trains {stage.model}"
    if before.get("stage", {}).get("params", {}) != stage.model_dump(mode="json")["params"]:
        return "its params differ from the previous model's"
    previous_upstream = previous_upstream or before.get("upstream")
    if upstream is not None and previous_upstream:
        previous = storage.read_json(storage.join(previous_upstream, storage.MANIFEST))
        ranks = (_rank(previous["model"], previous["stage"].get("params", {})), _rank(upstream.model, upstream.params))
        if ranks[0] != ranks[1]:
            return f"stage 1's rank went from {ranks[0]} to {ranks[1]} (another input width)"
    return None


def _default_lr(stage: StageConfig) -> float | None:
    """The learning rate `stage` trains at when train.lr is empty (recdist.train.solvers.default_lr)."""
    from recdist.models import registry
    from recdist.train.solvers import default_lr

    return default_lr(registry.get(stage.model).module, stage.train.solver)


def _rank(model: str, params: dict[str, Any]) -> int | None:
    """The factor width of a stage-1 model (an MF-family config's rank; None for another model)."""
    from recdist.models import registry
    from recdist.models.mf import MFConfig

    config = registry.validate(model, params)
    return config.rank if isinstance(config, MFConfig) else None


def warm_train(stage: StageConfig, previous_model: str, settings: WarmConfig | None = None) -> StageConfig:
    """`stage` as a warm stage trains it (recdist.config.WarmConfig `settings`, default its defaults): at most
    settings.epochs (settings.mlp_epochs for a model on stage 1's frozen tables; 0: none, the previous weights
    as they are), patience settings.patience, its peak learning rate settings.lr_share of the stage's own, or
    (lr_share empty) the rate the previous model last trained at (its history's last epoch). A stage without a
    learning rate (ALS) keeps none."""
    from recdist.config import WarmConfig
    from recdist.models import registry

    settings = settings or WarmConfig()
    most = settings.mlp_epochs if registry.get(stage.model).module.upstream else settings.epochs
    epochs = min(stage.train.epochs if most is None else most, stage.train.epochs)
    update: dict[str, Any] = {"patience": settings.patience, "epochs": epochs}
    history_uri = storage.join(previous_model, "history.parquet")
    if settings.lr_share is not None:
        peak = stage.train.lr if stage.train.lr is not None else _default_lr(stage)
        if peak is not None:
            update["lr"] = peak * settings.lr_share
    elif storage.exists(history_uri):
        rows = pl.from_arrow(storage.read_parquet(history_uri, columns=["epoch", "lr"])).sort("epoch")
        at = rows["lr"].tail(1)
        if len(at) and at[0] and at[0] == at[0]:  # ALS: no learning rate (null or NaN)
            update["lr"] = float(at[0])
    return stage.model_copy(update={"train": stage.train.model_copy(update=update)})


def fallback(metrics: dict[str, Any], previous_model: str, tolerance: float) -> dict[str, Any] | None:
    """Why a warm stage's result (its metrics.json content) is refit cold: its validation RMSE is worse than the
    previous model's by more than `tolerance` times the previous one; None when it is not (or either has no
    validation RMSE)."""
    previous = storage.read_json(storage.join(previous_model, "metrics.json")).get("val", {}).get("rmse")
    warm = (metrics.get("val") or {}).get("rmse")
    if previous is None or warm is None or warm - previous <= tolerance * previous:
        return None
    return {
        "warm_val_rmse": warm,
        "previous_val_rmse": previous,
        "tolerance": tolerance,
        "warm_epochs": metrics.get("epochs"),
    }


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


def same_weights(
    cold: dict[str, torch.Tensor], previous: dict[str, torch.Tensor], names: list[str]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """`cold` with the entries `names` (a model's trainable parameters) taken from `previous` when every one of
    them is there with the same shape; else `cold` as it is and the names that do not fit (all or nothing: half
    a network from yesterday is no warm start)."""
    misfits = [n for n in names if n not in previous or previous[n].shape != cold[n].shape]
    if misfits:
        return cold, misfits
    return {**cold, **{n: previous[n].to(cold[n]) for n in names}}, []


def new_row_rate(stage: StageConfig, warm_stage: StageConfig) -> float:
    """How many times the warm stage's learning rate its new users and items train at: the cold stage's peak over
    the warm one's (new rows start as a cold fit's do), 1 without a learning rate."""
    cold, warm = stage.train.lr or _default_lr(stage), warm_stage.train.lr
    return float(cold / warm) if cold and warm else 1.0


def apply(model: Model, warm: dict[str, Any], data: str, solver: Solver | None = None) -> dict[str, Any]:
    """Load the previous model named by `warm` (WarmStart.to_json) into `model`, which trains on `data`, after
    the model's data-dependent set-up (Trainer's prepare_model); what was carried over. An MF-family model:
    counts of known and new users and items, the new ones trained at warm['new_row_rate'] x the rate (`solver`'s
    warm_rows); another: the parameters taken (0 and a warning when they do not fit: a cold start)."""
    from recdist.models.io import load_model

    previous = load_model(warm["model"]).state_dict()
    if model.mf_tables() is None:
        names = [name for name, _ in model.named_parameters()]
        state, misfits = same_weights(model.state_dict(), previous, names)
        if misfits:
            log.warning("warm start: %s do not fit the previous model, trained cold", ", ".join(misfits[:4]))
            return {"parameters": 0}
        model.load_state_dict(state)
        return {"parameters": len(names)}
    from recdist.data.dataset import read_items, read_users

    users = previous_rows(read_users(warm["data"]).sort("user_idx")["user_id"].to_numpy(),
                          read_users(data).sort("user_idx")["user_id"].to_numpy())  # fmt: skip
    items = previous_rows(read_items(warm["data"]).sort("item_idx")["item_id"].to_numpy(),
                          read_items(data).sort("item_idx")["item_id"].to_numpy())  # fmt: skip
    state, skipped = warm_state(model.state_dict(), previous, users, items)
    if skipped:
        log.warning("warm start: %s differ in width from the previous model, initialised cold", ", ".join(skipped))
    model.load_state_dict(state)
    if solver is not None:
        solver.warm_rows(users < 0, items < 0, float(warm.get("new_row_rate", 1.0)))
    return {
        "known_users": int((users >= 0).sum()),
        "new_users": int((users < 0).sum()),
        "known_items": int((items >= 0).sum()),
        "new_items": int((items < 0).sum()),
    }
