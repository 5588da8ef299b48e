"""RNCF stages 2 and 3: MLPs on a trained MF's frozen factors and on row features of stage 1's scored table.

Stage 2 (`reliability_mlp`) predicts stage 1's squared error (rating - mf_pred)^2; stage 3 (`rating_mlp`)
predicts the rating from the same inputs plus that predicted error. Their inputs: the MF's tables (factors,
biases, factor norms per user and item; optional), stage 1's prediction `mf_pred`, and the row's session
context (schema.SESSION_COLUMNS: stage 1's residuals on the user's training ratings rated around it; see
recdist.infer.session), read by name (batch.feature). attach(mf) copies the MF tables in as frozen buffers and
only then builds the MLP (its input width depends on the MF rank), from the generator state saved at
construction, so the same seed still gives the same weights.

Stage 1's prediction is read from the scored table's `mf_pred` column, not recomputed from the frozen
factors: with K-fold cross-fitting a training row's mf_pred comes from the fold model that never saw it, so
stages 2 and 3 learn from predictions as honest as the ones they meet on new rows. The MF's tables are not:
they are the full model's, fitted to every training row, so an MLP reading them can tell on a training row
what the rating was (the full model's p_u . q_i + biases is close to it) but not on a new row. On
ml-latest-small that costs stage 3 more than the tables give (bench/rncf_accuracy.py), hence use_factors,
use_bias and use_norms off there; they stay on by default (the paper's stage, and on the synthetic data,
where 14M ratings leave little to memorise, they help).

Two traps of the seed are handled here: inputs are standardised per column (factors, biases, factor norms,
session features; statistics frozen at attach and set_context), and stage 2's output is softplus(z) with z's
bias set from the mean target by set_context(train), so the net starts at the right level instead of
collapsing to a constant far from it; set_context also rejects targets that cannot be squared errors of an
un-centred rating.
"""

from __future__ import annotations

import math
from itertools import islice
from typing import ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from recdist.config import Section
from recdist.errors import ConfigError, DataError
from recdist.models.base import Model, head, mlp
from recdist.models.batch import Batch, Dims
from recdist.models.registry import register
from recdist.models.space import Knob, choice, integer, loguniform, uniform
from recdist.schema import MF_PRED, PRED_ERROR, SESSION_COLUMNS

TABLES = ("user_factors", "item_factors", "user_bias", "item_bias")


class FrozenMF(nn.Module):
    """A trained MF's tables as frozen buffers, and each user's and item's standardised input row.

    The input rows ([factors, (bias), (|factors|)] per user and per item, standardised per column) are derived
    from the tables once at load and not saved; a batch's inputs are then two gathers.
    """

    def __init__(self) -> None:
        super().__init__()
        for name in (*TABLES, "user_stats", "item_stats"):
            self.register_buffer(name, torch.zeros(0))
        for name in ("user_inputs", "item_inputs"):
            self.register_buffer(name, torch.zeros(0), persistent=False)

    @property
    def rank(self) -> int:
        return int(self.user_factors.shape[1]) if self.user_factors.dim() == 2 else 0

    def load(self, tables: dict[str, torch.Tensor], cfg: OnMFConfig) -> None:
        """Copy the four tables, freeze their statistics and derive the per-user and per-item input rows. Where
        `tables` holds user_stats / item_stats too (a saved state, or a fold-in keeping the previous run's), those
        standardise the rows instead of the tables' own."""
        for name in TABLES:
            setattr(self, name, tables[name].detach().float().clone())
        k = self.rank
        columns = list(range(k)) * cfg.use_factors + [k] * cfg.use_bias + [k + 1] * cfg.use_norms
        for side in ("user", "item"):
            full = self._side(getattr(self, f"{side}_factors"), getattr(self, f"{side}_bias"))
            given = tables.get(f"{side}_stats")
            stats = given.detach().float().clone() if given is not None and given.shape == (2, full.shape[1]) else None
            stats = _column_stats(full) if stats is None else stats
            setattr(self, f"{side}_stats", stats)
            setattr(self, f"{side}_inputs", ((full - stats[0]) / stats[1])[:, columns].contiguous())

    @property
    def width(self) -> int:
        """Input columns per row before stage 1's prediction: the user's and the item's."""
        return int(self.user_inputs.shape[1] + self.item_inputs.shape[1])

    @staticmethod
    def _side(factors: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """[factors, bias, |factors|] per row."""
        return torch.cat([factors, bias.unsqueeze(-1), factors.norm(dim=-1, keepdim=True)], dim=-1)


def _column_stats(table: torch.Tensor) -> torch.Tensor:
    """(2, C): per-column mean and standard deviation (floored so constant columns stay finite)."""
    return torch.stack([table.mean(0), table.std(0, correction=0).clamp_min(1e-6)])


class OnMFConfig(Section):
    """Inputs and MLP shape shared by the stages built on a frozen MF."""

    hidden: tuple[int, ...] = (64, 32)
    """Widths of the MLP's hidden layers."""
    dropout: float = Field(0.1, ge=0, lt=1)
    """Dropout after each hidden layer (training only)."""
    use_factors: bool = True
    """Feed the factor vectors p_u and q_i themselves. They are the full MF's, fitted to every training row:
    off, with cross-fitting, the net sees only inputs as honest on training rows as on new ones (better on
    small data such as ml-latest-small)."""
    use_bias: bool = True
    """Feed the MF's user and item biases (the full MF's, like the factors)."""
    use_norms: bool = True
    """Feed the norms |p_u| and |q_i| (how much the MF knows about the user and the item; the full MF's)."""
    use_mf_pred: bool = True
    """Feed stage 1's prediction, the scored table's mf_pred (an MLP finds a dot product hard to compute from
    the factors)."""
    use_session: bool = True
    """Feed the row's session context: per window, the shrunk mean of stage 1's residuals on the user's
    training ratings rated around it, their shrunk mean square, and log(1 + how many). MovieLens users rate
    in bursts whose ratings share a deviation from the MF: on ml-latest-small the largest gain stage 3 has."""
    session_prior: float = Field(3.0, gt=0)
    """Pseudo-count of the session means: with k neighbours a window's mean is sum / (k + prior)."""

    search_space: ClassVar[dict[str, Knob]] = {
        "params.hidden": choice((32,), (64, 32), (128, 64), (256, 128)),
        "params.dropout": uniform(0.0, 0.5),
        "train.lr": loguniform(0.0003, 0.01),
        "train.epochs": integer(3, 20),
    }


class ReliabilityConfig(OnMFConfig):
    """RNCF stage 2: predicted squared error of the MF from its frozen factors."""


class RatingConfig(OnMFConfig):
    """RNCF stage 3: rating from the frozen factors and the predicted error."""

    hidden: tuple[int, ...] = (128, 64)
    """Widths of the MLP's hidden layers (the paper: 512, 256, 256)."""
    dropout: float = Field(0.2, ge=0, lt=1)
    """Dropout after each hidden layer (training only)."""
    skip: bool = True
    """Predict stage 1's rating (mf_pred) plus an MLP correction starting at zero, instead of the global mean
    plus the MLP."""


class OnMF(Model):
    """Base of the stages that read a frozen MF: attach() copies it in and builds the MLP.

    Among their row features is `mf_pred` (stage 1's prediction of the row)."""

    upstream = True
    needs_context = True
    inputs: ClassVar[tuple[str, ...]] = (*SESSION_COLUMNS, MF_PRED)
    extra_inputs: ClassVar[int] = 0
    """Row inputs a subclass adds after the session features."""
    head_std: ClassVar[float] = 0.0

    def __init__(self, config: OnMFConfig, dims: Dims, generator: torch.Generator):
        super().__init__(config, dims)
        self.frozen = FrozenMF()
        self.net: nn.Sequential | None = None
        stats = torch.stack([torch.zeros(len(SESSION_COLUMNS)), torch.ones(len(SESSION_COLUMNS))])
        self.register_buffer("session_stats", stats)  # mean, std of each session feature on training rows
        self._init_state = generator.get_state()  # the MLP is drawn at attach, when the MF rank is known
        self._proj_key: tuple | None = None
        self._proj: tuple[torch.Tensor, torch.Tensor] | None = None

    def attach(self, upstream: Model) -> None:
        """Copy a trained MF-family model's factors and biases in as frozen buffers; build the MLP."""
        tables = upstream.mf_tables()
        if tables is None:
            raise ConfigError(
                f"{self.registry_name} needs an MF-family upstream model, got {type(upstream).__name__}",
                fix="train stage 1 with mf, biased_mf, sigmoid_mf or mf_residual_mlp",
            )
        self._attach_tables(tables.tensors())

    def resize_for(self, state: dict[str, torch.Tensor]) -> None:
        """Shape the frozen tables and the MLP like a saved state, before load_state_dict."""
        self._attach_tables({k.removeprefix("frozen."): v for k, v in state.items() if k.startswith("frozen.")})

    def use_statistics(self, state: dict[str, torch.Tensor]) -> list[str]:
        """Standardise every input with the statistics of `state` (a previous model's: its frozen tables' column
        means and spreads, its session and error features'), on this model's own frozen tables; the names taken.
        A fold-in keeps them with the weights, so a row whose inputs did not change predicts as it did."""
        own = dict(self.named_buffers())
        taken = [n for n in own if n.endswith("_stats") and n in state and state[n].shape == own[n].shape]
        tables = {name: getattr(self.frozen, name) for name in TABLES}
        self.frozen.load(tables | {n.removeprefix("frozen."): state[n] for n in taken if n.startswith("frozen.")},
                         self.config)  # fmt: skip
        for name in taken:
            if not name.startswith("frozen."):
                setattr(self, name, state[name].detach().clone().to(own[name]))
        return taken

    def _attach_tables(self, tables: dict[str, torch.Tensor]) -> None:
        device = tables["user_factors"].device
        self.frozen.load(tables, self.config)
        cfg = self.config
        width = self.frozen.width + cfg.use_mf_pred + len(SESSION_COLUMNS) * cfg.use_session + self.extra_inputs
        generator = torch.Generator().set_state(self._init_state)
        net = mlp(width, self.config.hidden, 1, self.config.dropout, generator, last_std=self.head_std)
        self.net = net.to(device)
        self.frozen.to(device)

    def _mlp(self, batch: Batch, row: torch.Tensor) -> torch.Tensor:
        """The MLP on [user's inputs, item's inputs, row features `row` (B, E)]: one output per row.

        Without autograd (inference) the first layer is applied in parts: the user and item parts are
        precomputed once per user and item (_projections), so a row costs two gathers of hidden-width vectors
        instead of a product with the whole input; same function, 2-3x faster on CPU.
        """
        if self.net is None:
            raise RuntimeError(f"{self.registry_name}: call attach(mf_model) before using the model")
        user, item = batch.user, batch.item
        if torch.is_grad_enabled():
            x = torch.cat(
                [self.frozen.user_inputs.index_select(0, user), self.frozen.item_inputs.index_select(0, item), row], -1
            )
            return self.net(x).squeeze(-1)
        first = self.net[0]
        per_user, per_item = self._projections()
        h = per_user.index_select(0, user).add_(per_item.index_select(0, item))  # index_select: 3-4x [] on CPU
        h = torch.addmm(h, row, first.weight[:, self.frozen.width :].T)
        for layer in islice(self.net, 1, None):  # not net[1:], which builds a new Sequential on every call
            h = layer(h)
        return h.squeeze(-1)

    def _projections(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(user_inputs @ W_u^T + bias, item_inputs @ W_i^T): the first layer's part of every user and item,
        cached until the weights or tables change."""
        first = self.net[0]
        key = (first.weight._version, first.weight.data_ptr(), first.bias._version, self.frozen.user_inputs.data_ptr())
        if self._proj_key != key:
            du = self.frozen.user_inputs.shape[1]
            w = first.weight.detach()
            self._proj = (
                torch.addmm(first.bias.detach(), self.frozen.user_inputs, w[:, :du].T),
                self.frozen.item_inputs @ w[:, du : self.frozen.width].T,
            )
            self._proj_key = key
        return self._proj

    def _mf_pred(self, batch: Batch) -> torch.Tensor:
        """Stage 1's prediction of each row (the mf_pred feature)."""
        if not batch.has_features(self.inputs):
            raise DataError(
                f"{self.registry_name} needs the feature columns {', '.join(self.inputs)}",
                fix="train and score stages 2 and 3 on the previous stage's scored output (it has these columns)",
            )
        return batch.feature(MF_PRED).float()

    def _row(self, batch: Batch, extra: tuple[torch.Tensor, ...] = ()) -> torch.Tensor:
        """The row's own inputs after the user's and the item's: (stage 1's prediction - global mean), the
        standardised session features, then the `extra` (B,) columns. (B, E), a transposed view of an (E, B) block:
        each input is computed as a contiguous vector (2x the speed of a (B, E) block's strided columns on a CPU),
        and the first layer's product reads the view as it is."""
        session = len(SESSION_COLUMNS) if self.config.use_session else 0
        out = torch.empty((self.config.use_mf_pred + session + len(extra), len(batch)), device=batch.user.device)
        if self.config.use_mf_pred:
            torch.sub(self._mf_pred(batch), self.dims.global_mean, out=out[0])
        if session:
            block = out[self.config.use_mf_pred : self.config.use_mf_pred + session]
            self._session(batch, out=block)
            block.sub_(self.session_stats[0].unsqueeze(1)).div_(self.session_stats[1].unsqueeze(1))
        for at, column in enumerate(extra, start=len(out) - len(extra)):
            out[at] = column
        return out.T

    def _session(self, batch: Batch, out: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 6): per window, sum / (n + prior), sum of squares / (n + prior), log1p(n) (before standardising);
        the transposed view of a (6, B) block, `out` when given."""
        self._mf_pred(batch)  # checks the feature columns
        f = batch.feature_block(SESSION_COLUMNS).float().T.contiguous()
        out = torch.empty_like(f) if out is None else out
        for w in range(0, len(SESSION_COLUMNS), 3):
            n = f[w + 2].clamp_min(0)
            denom = n + self.config.session_prior
            torch.div(f[w], denom, out=out[w])
            torch.div(f[w + 1], denom, out=out[w + 1])
            torch.log1p(n, out=out[w + 2])
        return out.T

    def set_context(self, train: Batch) -> None:
        """Freeze the session features' training mean and spread (standardisation)."""
        if self.config.use_session:
            x = self._session(train)
            self.session_stats = torch.stack([x.mean(0), x.std(0, correction=0).clamp_min(1e-6)]).to(self.session_stats)


@register("reliability_mlp", ReliabilityConfig)
class ReliabilityMLP(OnMF):
    """RNCF stage 2: MLP on frozen MF factors -> non-negative predicted squared error of the MF."""

    target = "error"
    head_std = 0.01

    def forward(self, batch: Batch) -> torch.Tensor:
        return F.softplus(self._mlp(batch, self._row(batch)))

    def set_context(self, train: Batch) -> None:
        """Start the output at the mean training error: the head's bias = softplus^-1(mean target).

        Also freezes the session features' statistics. Raises DataError for targets that cannot be the squared
        errors of an MF on the rating scale.
        """
        if train.target is None or self.net is None:
            raise RuntimeError("reliability_mlp.set_context needs attach() first and a batch with targets")
        super().set_context(train)
        target = train.target.float()
        mean = float(target.mean())
        worst = ((self.dims.rating_max - self.dims.rating_min) / 2) ** 2
        if float(target.min()) < 0 or not math.isfinite(mean) or mean > worst:
            raise DataError(
                f"stage-2 targets (mean {mean:.3g}, min {float(target.min()):.3g}) are not squared errors "
                f"of an MF on the rating scale {self.dims.rating_min}-{self.dims.rating_max}",
                fix="compute error = (rating - mf_pred)^2 with the un-centred rating and MF's rating-unit prediction",
            )
        with torch.no_grad():
            head(self.net).bias.fill_(_softplus_inverse(max(mean, 1e-4)))


def _softplus_inverse(y: float) -> float:
    return y + math.log(-math.expm1(-y))


@register("rating_mlp", RatingConfig)
class RatingMLP(OnMF):
    """RNCF stage 3: MF's prediction plus an MLP correction on frozen factors and the predicted error."""

    inputs = (PRED_ERROR, *SESSION_COLUMNS, MF_PRED)
    extra_inputs = 1

    def __init__(self, config: RatingConfig, dims: Dims, generator: torch.Generator):
        super().__init__(config, dims, generator)
        self.register_buffer("error_stats", torch.tensor([0.0, 1.0]))  # mean, std of log1p(pred_error)

    def _error_feature(self, batch: Batch) -> torch.Tensor:
        self._mf_pred(batch)  # checks the feature columns
        return torch.log1p(batch.feature(PRED_ERROR)[:, None].float().clamp_min(0))

    def forward(self, batch: Batch) -> torch.Tensor:
        err = (self._error_feature(batch) - self.error_stats[0]) / self.error_stats[1]
        correction = self._mlp(batch, self._row(batch, extra=(err.squeeze(1),)))
        if self.config.skip:
            return self._mf_pred(batch) + correction
        return correction + self.dims.global_mean

    def set_context(self, train: Batch) -> None:
        """Standardise the predicted-error and session inputs with their training means and spreads."""
        super().set_context(train)
        e = self._error_feature(train)
        self.error_stats = torch.stack([e.mean(), e.std(correction=0).clamp_min(1e-6)]).to(self.error_stats)
