"""Warm start: begin a stage's training from the previous run's model of the same stage.

Stage 1 (MF): the factors and biases, mapped by original ids: `previous_rows` and `warm_state` are pure (ids and
tensors in, tensors out): known users and items keep the previous rows, new ones keep the cold initialisation (the
rows a cold run draws), gone ones are dropped; `carry_tables` loads them before the solver sees the rows, with
per-row rates (a fold-in, WarmConfig.fold_in: only new and changed users and new items train). Stages 2 and 3
(MLPs on the frozen stage-1 tables): the trained weights as they were, when the model, its params and its input
width are the same (`same_weights`, `apply`); their frozen tables are today's, and so are their standardisations
but in a fold-in night, which keeps yesterday's (Model.use_statistics). `nights_folded_in` counts a run of fold-ins
(WarmStart.folded); `changed_users` tells whose ratings changed between two datasets. `resolve` and
`stage_source` read a previous pipeline run (local or s3://); `warm_train` is the warm stage's training settings
(recdist.config.WarmConfig); `fallback` tells when a warm stage came out worse than the previous run's; `started`
reads back how each stage of a run started.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from recdist import storage
from recdist.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from recdist.config import StageConfig, WarmConfig
    from recdist.models.base import Model
    from recdist.train.data import RankData

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
    folded: int = 0
    """Stage 1 of a fold-in: the fold-in nights in a row this one makes (recdist.pipeline._refreshing); 0: none."""

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        if not self.folded:  # a warm start that is no fold-in hashes as before there were any
            del out["folded"]
        return out


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


def warm_epochs(stage: StageConfig, settings: WarmConfig) -> int:
    """The most epochs a warm `stage` trains (settings.epochs, or settings.mlp_epochs for a model on stage 1's frozen
    tables; never more than its own train.epochs); 0: the previous weights as they are."""
    from recdist.models import registry

    most = settings.mlp_epochs if registry.get(stage.model).module.upstream else settings.epochs
    return min(stage.train.epochs if most is None else most, stage.train.epochs)


def warm_train(stage: StageConfig, previous_model: str, settings: WarmConfig | None = None) -> StageConfig:
    """`stage` as a warm stage trains it (recdist.config.WarmConfig `settings`, default its defaults): at most
    settings.epochs (settings.mlp_epochs for a model on stage 1's frozen tables; 0: none, the previous weights
    as they are), patience settings.patience, its peak learning rate settings.lr_share of the stage's own, or
    (lr_share empty) the rate the previous model last trained at (its history's last epoch). A stage without a
    learning rate (ALS) keeps none."""
    from recdist.config import WarmConfig

    settings = settings or WarmConfig()
    update: dict[str, Any] = {"patience": settings.patience, "epochs": warm_epochs(stage, settings)}
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


def nights_folded_in(run: str) -> int:
    """How many fold-in nights in a row the pipeline run `run` ended (its stage 1's metrics.json: warm_start.folded;
    1 for a fold-in that did not count, 0 when stage 1 did not fold in)."""
    trained = storage.join(run, "mf", "model", "metrics.json")
    start = (storage.read_json(trained).get("warm_start") or {}) if storage.exists(trained) else {}
    return int(start.get("folded") or 1) if start.get("fold_in") else 0


def folds_in(stage: StageConfig, settings: WarmConfig) -> bool:
    """Whether a warm `stage` is part of a fold-in (settings.fold_in): stage 1 trains only what changed, and a stage
    2 or 3 that keeps yesterday's weights as they are (no epochs) keeps yesterday's input statistics with them.
    ConfigError when stage 1's solver has no per-row rates to freeze rows with (only per-rating SGD has)."""
    from recdist.models import registry
    from recdist.train.solvers import solver_name

    module = registry.get(stage.model).module
    if not settings.fold_in:
        return False
    if module.upstream:  # stages 2 and 3 of a fold-in night: yesterday's weights and statistics, when kept as they are
        return warm_epochs(stage, settings) == 0
    if solver_name(module, stage.train.solver) != "sgd":
        raise ConfigError(
            f"pipeline.warm.fold_in freezes rows through per-rating SGD's per-row rates; stage 1 trains "
            f"{stage.model} with solver {stage.train.solver}",
            where="pipeline.warm.fold_in",
            fix="set stages.mf.train.solver: sgd, or pipeline.warm.fold_in: false (every row of a warm stage 1 trains)",
        )
    return True


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


def started(models: dict[str, str]) -> dict[str, Any]:
    """How each stage of a run started, from its model's metrics.json (`models`: stage -> model directory): `cold`,
    `warm` (from `from`, with `fold_in`, `folded`: the night's count in a run of fold-ins, and `counts`: what the warm
    start carried over) or `refit cold` (`fallback`: the warm fit's and the previous validation RMSE); `epochs`
    trained. outputs/metrics.json's `start` section, which the report shows."""
    out: dict[str, Any] = {}
    for stage, model in models.items():
        metrics = storage.read_json(storage.join(model, "metrics.json"))
        warm, worse = metrics.get("warm_start") or {}, metrics.get("warm_fallback")
        entry: dict[str, Any] = {"start": "refit cold" if worse else "warm" if warm else "cold"}
        entry["epochs"] = metrics.get("epochs")
        if warm:
            entry["from"] = warm.get("run")
            entry.update({k: warm[k] for k in ("fold_in", "folded", "counts") if k in warm})
        if worse:
            entry["fallback"] = worse
        out[stage] = entry
    return out


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


def apply(model: Model, warm: dict[str, Any]) -> dict[str, Any]:
    """Load the weights of the previous model named by `warm` (WarmStart.to_json) into `model` (stages 2 and 3:
    not of the MF family), after its data-dependent set-up (Trainer's prepare_model): the parameters taken (0
    and a warning when they do not fit: a cold start). With warm['fold_in'] (the run's stage 1 a fold-in, these
    weights kept as they are) the previous model's input statistics too (Model.use_statistics), so a row whose
    inputs did not change since then predicts as it did."""
    from recdist.models.io import load_model

    previous = load_model(warm["model"]).state_dict()
    names = [name for name, _ in model.named_parameters()]
    state, misfits = same_weights(model.state_dict(), previous, names)
    if misfits:
        log.warning("warm start: %s do not fit the previous model, trained cold", ", ".join(misfits[:4]))
        return {"parameters": 0}
    model.load_state_dict(state)
    counts = {"parameters": len(names)}
    if warm.get("fold_in"):
        counts["statistics"] = len(model.use_statistics(previous))
    return counts


@dataclass(frozen=True)
class Carried:
    """What a stage-1 warm start carried over: the per-row learning rates of today's users and items (multiples of
    the schedule's rate, Solver.warm_rows; 0: the row is frozen, a fold-in) and the counts the log shows."""

    user_rates: np.ndarray
    item_rates: np.ndarray
    counts: dict[str, int]

    def rows_of(self, data: RankData) -> RankData:
        """`data` with only the training rows that can move (a user or an item not frozen): a fold-in trains
        over what changed, not over every rating; without frozen rows `data` as it is."""
        if self.user_rates.all() and self.item_rates.all():
            return data
        import torch

        train = data.train
        moves = (self.user_rates[train.user.cpu().numpy()] > 0) | (self.item_rates[train.item.cpu().numpy()] > 0)
        return replace(data, train=train.take(torch.from_numpy(np.flatnonzero(moves)).to(train.user.device)))


def carry_tables(model: Model, warm: dict[str, Any], data: str) -> Carried:
    """Load the previous MF-family model named by `warm` into `model`, which trains on the dataset `data`, by
    original ids (warm_state), before a solver sees the rows. New users and items train at warm['new_row_rate']
    x the rate (so do known ones that had no training rating then: trained_rows). With warm['fold_in']
    (recdist.config.WarmConfig.fold_in) only what changed trains: new users, users whose training ratings differ
    from the previous dataset's (changed_users) and new items; every other
    row is frozen (rate 0) and, as `model` was built with the previous global mean (recdist.train.run.built_with),
    a frozen user's rating of a frozen item predicts exactly as before. A fold-in whose tables differ in width is a
    plain warm start (said)."""
    from recdist.data.dataset import read_items, read_users
    from recdist.models.io import load_model

    previous = load_model(warm["model"]).state_dict()
    sides = {side: [read(uri).sort(f"{side}_idx") for uri in (warm["data"], data)]
             for side, read in (("user", read_users), ("item", read_items))}  # fmt: skip
    users, items = (previous_rows(*(t[f"{side}_id"].to_numpy() for t in sides[side])) for side in ("user", "item"))
    state, skipped = warm_state(model.state_dict(), previous, users, items)
    if skipped:
        log.warning("warm start: %s differ in width from the previous model, initialised cold", ", ".join(skipped))
    rate = float(warm.get("new_row_rate", 1.0))
    trained = {side: trained_rows(rows, sides[side][0]["n_train"].to_numpy()) for side, rows in
               (("user", users), ("item", items))}  # fmt: skip
    user_rates = np.where(trained["user"], 1.0, rate).astype(np.float32)
    item_rates = np.where(trained["item"], 1.0, rate).astype(np.float32)
    counts = {
        "known_users": int((users >= 0).sum()),
        "new_users": int((users < 0).sum()),
        "known_items": int((items >= 0).sum()),
        "new_items": int((items < 0).sum()),
    }
    if warm.get("fold_in") and skipped:
        log.warning("fold-in: the previous tables do not fit, so every row trains (a plain warm start)")
    elif warm.get("fold_in"):
        moved = changed_users(warm["data"], data)
        user_rates[trained["user"] & ~moved] = 0.0
        item_rates[trained["item"]] = 0.0
        counts["changed_users"] = int(((users >= 0) & moved).sum())
    model.load_state_dict(state)
    return Carried(user_rates, item_rates, counts)


def trained_rows(rows: np.ndarray, n_train_before: np.ndarray) -> np.ndarray:
    """bool per row of today's table: its previous row (previous_rows; -1 new) had training ratings, so its factors
    were trained. The others (new, or known without a training rating then: their cold initialisation) train as a
    cold run's rows do: at the new-row rate, never frozen by a fold-in."""
    known = rows >= 0
    out = np.zeros(len(rows), bool)
    out[known] = n_train_before[rows[known]] > 0
    return out


def changed_users(previous_data: str, data: str, *, every_split: bool = False) -> np.ndarray:
    """For each user index of the dataset `data`, whether their training ratings (every_split: all their ratings,
    a rating's time included) differ from the previous dataset's: new users, and known ones whose count or
    fingerprint differ (the datasets' users.parquet; recdist.data.idmaps.fingerprints, computed from the ratings
    for a dataset prepared before them)."""
    users = [_fingerprinted(uri, every_split) for uri in (previous_data, data)]
    user_rows = previous_rows(*(u["user_id"].to_numpy() for u in users))
    count, prints = (users[1][c].to_numpy() for c in ("count", "print"))
    before_count, before_prints = (users[0][c].to_numpy() for c in ("count", "print"))
    known = user_rows >= 0
    rows = user_rows[known]
    same = np.zeros(len(user_rows), bool)
    same[known] = (count[known] == before_count[rows]) & (prints[known] == before_prints[rows])
    return ~same


def _fingerprinted(uri: str, every_split: bool) -> pl.DataFrame:
    """user_id, count, print per user index of the dataset `uri`: its users.parquet's counts and fingerprints of
    every rating with its time (every_split) or of the training ones; for a dataset prepared without them,
    computed from its ratings (a read of every rating: 0.1 s per million)."""
    from recdist.data.dataset import read_items, read_rank, read_users
    from recdist.data.idmaps import fingerprints, rating_hashes

    users = read_users(uri).sort("user_idx")
    count, fingerprint = ("n_ratings", "fingerprint") if every_split else ("n_train", "train_fingerprint")
    if fingerprint in users.columns and users[fingerprint].null_count() == 0:
        return users.select("user_id", pl.col(count).alias("count"), pl.col(fingerprint).alias("print"))
    rows = read_rank(uri, columns=["user_idx", "item_idx", "rating", "timestamp", "split"])
    if not every_split:
        rows = rows.filter(pl.col("split") == "train")
    user, item_ids = rows["user_idx"].to_numpy(), read_items(uri).sort("item_idx")["item_id"].to_numpy()
    when = rows["timestamp"].fill_null(0).to_numpy() if every_split else None  # as prepare's `fingerprint`
    hashes = rating_hashes(item_ids[rows["item_idx"].to_numpy()], rows["rating"].to_numpy(), when)
    prints = fingerprints(user, hashes, users.height)
    return users.select("user_id").with_columns(
        pl.Series("count", np.bincount(user, minlength=users.height)), pl.Series("print", prints)
    )
