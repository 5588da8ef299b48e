"""The scoring core: a whole Arrow batch of ratings through a model, prediction columns appended.

Shared by the Ray Data tasks (ray_data.py) and the plain scorer (scored.score_local), so both do the same work.
Cold-start rows (a user or movie without training ratings, or an index the model does not know) get the
fallback global mean + the known biases (and, for the reliability role, a fixed high expected error) and
are flagged in the `cold` column instead of being pushed through untrained embeddings.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from recdist.data.splits import split_is
from recdist.infer.kernels import kernel_for
from recdist.models.base import Model
from recdist.models.batch import Batch
from recdist.schema import ROLE_COLUMNS
from recdist.train.sampling import fold_of

ROLES = tuple(ROLE_COLUMNS)


@dataclass(frozen=True)
class ScoringPlan:
    """What a scoring task needs, all picklable: models, role, and the cold-start fallback."""

    models: tuple[str, ...]
    """Model URIs: [0] scores every row; with cross-fitting, [1 + k] scores the train rows of fold k."""
    role: str
    """mf (writes mf_pred, error), reliability (pred_error) or rating (pred_rating)."""
    global_mean: float
    rating_scale: tuple[float, float]
    known_users: tuple[np.ndarray, ...]
    """Per model: bool (n_users,) of the users it saw in training; others are cold for it."""
    known_items: tuple[np.ndarray, ...]
    fallback_model: str | None = None
    """MF model whose biases build the cold-start fallback (default: each model's own mf_tables(), if any)."""
    cold_error: float = 1.0
    """pred_error written for cold rows (reliability role): the error of the fallback, i.e. unreliable."""
    fold_seed: int = 0
    device: str = "cpu"
    forward_rows: int = 16384
    """Rows per model forward call: small enough that gathered factor rows and activations stay in the CPU
    cache (3x faster than 128k-row calls), big enough for efficient matrix products and few Python calls (stage
    2's 20M-row pass, two threads: 5.0-5.6 s against 5.2-6.5 s at 8,192 rows, alternated)."""

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"unknown scoring role {self.role!r}; expected one of {ROLES}")
        if not (len(self.models) == len(self.known_users) == len(self.known_items)):
            raise ValueError("one known_users / known_items mask per model")


def role_of(model: Model | type[Model]) -> str:
    """The scoring role a model plays by the model contract: error target -> reliability, upstream -> rating."""
    if model.target == "error":
        return "reliability"
    return "rating" if model.upstream else "mf"


@contextmanager
def one_thread() -> Iterator[None]:
    """PyTorch on one intra-op thread inside the block (restored after), for work that runs shards or blocks in
    threads of its own (score_local, topn.top_k_of): a thread per shard, each on one core, beats every shard's ops
    spread over all."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@torch.inference_mode()
def forward(
    model: Model, user: torch.Tensor, item: torch.Tensor, features: torch.Tensor | None, rows: int
) -> torch.Tensor:
    """model(Batch) over index tensors in slices of `rows` (features: the model's inputs, in order), on the
    model's device; result on CPU."""
    device = next(iter(model.parameters()), torch.empty(0)).device
    out = torch.empty(len(user), dtype=torch.float32)
    names = model.inputs if features is not None else ()
    for lo in range(0, len(user), rows):
        sl = slice(lo, lo + rows)
        f = None if features is None else features[sl]
        batch = Batch(user[sl], item[sl], features=f, feature_names=names).to(device)
        out[sl] = model(batch).float().cpu()
    return out


class Predictor:
    """Loads the plan's models once, then maps Arrow tables to Arrow tables with the role's columns added.

    models / fallback: the plan's models and its fallback model already loaded (a ranker shares one stage-1 model
    among its predictors); loaded from the plan's URIs when not given.
    """

    def __init__(self, plan: ScoringPlan, models: list[Model] | None = None, fallback: Model | None = None):
        from recdist.models.io import load_model

        self.plan = plan
        self.models = models if models is not None else [load_model(u, device=plan.device) for u in plan.models]
        for m in self.models:
            m.eval()
        on_cpu = plan.device == "cpu"
        self.kernels = [kernel_for(m) if on_cpu else None for m in self.models]
        shared = fallback if fallback is not None or not plan.fallback_model else load_model(plan.fallback_model)
        self.biases = [_biases(shared if shared is not None else m) for m in self.models]
        self.known_users = [torch.from_numpy(np.array(k, dtype=bool)) for k in plan.known_users]  # own, writable
        self.known_items = [torch.from_numpy(np.array(k, dtype=bool)) for k in plan.known_items]
        self.inputs = self.models[0].inputs

    def __call__(self, table: pa.Table) -> pa.Table:
        plan = self.plan
        user = _tensor(table["user_idx"]).long()
        item = _tensor(table["item_idx"]).long()
        features = torch.stack([_tensor(table[c]).float() for c in self.inputs], 1) if self.inputs else None
        which = self._route(table, user, item)
        pred = torch.empty(len(user), dtype=torch.float32)
        cold = torch.zeros(len(user), dtype=torch.bool)
        fallbacks: list[tuple[torch.Tensor, torch.Tensor]] = []  # (rows, the fallback prediction of each)
        for m, model in enumerate(self.models):
            rows = None if which is None else torch.nonzero(which == m).squeeze(1)
            u, i = (user, item) if rows is None else (user[rows], item[rows])
            known_u, known_i = _lookup(self.known_users[m], u), _lookup(self.known_items[m], i)
            known = known_u & known_i
            f = features if rows is None or features is None else features[rows]
            safe_u, safe_i = torch.where(known, u, 0), torch.where(known, i, 0)
            kernel = self.kernels[m]
            if kernel is not None:
                p = kernel(safe_u.numpy(), safe_i.numpy())
            else:
                p = forward(model, safe_u, safe_i, f, plan.forward_rows)
            lost = torch.nonzero(~known).squeeze(1)  # usually none: the fallback is built for these rows alone
            if plan.role != "reliability" and len(lost):
                fb = self._fallback(m, u[lost], i[lost], known_u[lost], known_i[lost])
                fallbacks.append((lost if rows is None else rows[lost], fb))
            if rows is None:
                pred, cold = p, ~known
            else:
                pred[rows], cold[rows] = p, ~known
        lo, hi = plan.rating_scale
        columns: dict[str, torch.Tensor] = {}
        if plan.role == "reliability":
            columns["pred_error"] = torch.where(cold, plan.cold_error, pred.clamp(min=0.0))
        else:
            final = pred.clone() if fallbacks else pred
            for at, fb in fallbacks:
                final[at] = fb
            final = final.clamp(lo, hi)
            if plan.role == "mf":
                rating = _tensor(table["rating"]).float()
                columns["mf_pred"] = final
                columns["error"] = (rating - final) ** 2
            else:
                columns["pred_rating"] = final
        if "cold" in table.column_names:
            cold |= _tensor(table["cold"]).bool()
        return _with_columns(table, {**columns, "cold": cold})

    def _route(self, table: pa.Table, user: torch.Tensor, item: torch.Tensor) -> torch.Tensor | None:
        """Which model scores each row: 0 (full model), or 1 + fold for training rows when cross-fitting."""
        folds = len(self.models) - 1
        if folds == 0:
            return None
        is_train = split_is(table["split"], "train")
        fold = fold_of(user.numpy(), item.numpy(), folds, self.plan.fold_seed).astype(np.int64)
        return torch.from_numpy(np.where(is_train, fold + 1, 0))

    def _fallback(
        self, m: int, user: torch.Tensor, item: torch.Tensor, known_u: torch.Tensor, known_i: torch.Tensor
    ) -> torch.Tensor:
        """Global mean + the biases (of model m's source) of whichever side that model knows."""
        out = torch.full((len(user),), float(self.plan.global_mean))
        for index, bias, known in ((user, self.biases[m][0], known_u), (item, self.biases[m][1], known_i)):
            if len(bias):
                ok = known & (index < len(bias))
                out += torch.where(ok, bias[index.clamp(0, len(bias) - 1)], 0.0)
        return out


def _biases(model: Model) -> tuple[torch.Tensor, torch.Tensor]:
    """(user_bias, item_bias) of an MF-family model; empty tensors for models without mf_tables()."""
    tables = model.mf_tables()
    if tables is None:
        return torch.zeros(0), torch.zeros(0)
    return tables.user_bias.float().cpu(), tables.item_bias.float().cpu()


def _lookup(mask: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """mask[index], False for indices outside the mask (negative or too large)."""
    inside = (index >= 0) & (index < len(mask))
    return inside & mask[index.clamp(0, max(len(mask) - 1, 0))] if len(mask) else torch.zeros_like(inside)


def _tensor(column: pa.ChunkedArray | pa.Array) -> torch.Tensor:
    """A numeric Arrow column as a CPU tensor (zero-copy for one chunk without nulls)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    if column.null_count:
        column = pc.fill_null(column, 0)
    with warnings.catch_warnings():  # read-only Arrow memory: fine, the tensors are never written to
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(column.to_numpy(zero_copy_only=False))


def _with_columns(table: pa.Table, columns: dict[str, torch.Tensor]) -> pa.Table:
    """The table with these columns replaced or appended (float32; bool stays bool)."""
    for name, values in columns.items():
        array = pa.array(values.numpy())
        if name in table.column_names:
            table = table.set_column(table.column_names.index(name), name, array)
        else:
            table = table.append_column(name, array)
    return table
