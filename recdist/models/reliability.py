"""RNCF stages 2 and 3: MLPs on a trained MF's frozen factors.

Stage 2 (`reliability_mlp`) predicts stage 1's squared error (rating - mf_pred)^2 from (p_u, q_i, b_u, b_i)
and stage 1's prediction; stage 3 (`rating_mlp`) predicts the rating from the same inputs plus that predicted
error. attach(mf) copies the MF tables in as frozen buffers and only then builds the MLP (its input width
depends on the MF rank), from the generator state saved at construction, so the same seed still gives the
same weights.

Stage 1's prediction is read from the scored table's `mf_pred` column, not recomputed from the frozen
factors: with K-fold cross-fitting a training row's mf_pred comes from the fold model that never saw it, so
stages 2 and 3 learn from predictions as honest as the ones they meet on new rows (p_u . q_i of the full
model on its own training rows is in-sample, and an MLP trained on it learns to trust it too much).

Two traps of the seed are handled here: inputs are standardised per column (factors, biases, factor norms and
the MF prediction, with statistics frozen at attach), and stage 2's output is softplus(z) with z's bias set
from the mean target by set_context(train), so the net starts at the right level instead of collapsing to a
constant far from it; set_context also rejects targets that cannot be squared errors of an un-centred rating.
"""

from __future__ import annotations

import math
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
        """Copy the four tables, freeze their statistics and derive the per-user and per-item input rows."""
        for name in TABLES:
            setattr(self, name, tables[name].detach().float().clone())
        k = self.rank
        columns = list(range(k)) * cfg.use_factors + [k] * cfg.use_bias + [k + 1] * cfg.use_norms
        for side in ("user", "item"):
            full = self._side(getattr(self, f"{side}_factors"), getattr(self, f"{side}_bias"))
            stats = _column_stats(full)
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
    """Feed the factor vectors p_u and q_i themselves; without them the net sees only biases, norms and
    predictions (a small calibration net that cannot memorise users: better on small data)."""
    use_bias: bool = True
    """Feed the MF's user and item biases."""
    use_norms: bool = True
    """Feed the norms |p_u| and |q_i| (how much the MF knows about the user and the item)."""
    use_mf_pred: bool = True
    """Feed stage 1's prediction, the scored table's mf_pred (an MLP finds a dot product hard to compute from
    the factors)."""


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

    Their feature columns end with `mf_pred` (stage 1's prediction of the row)."""

    upstream: ClassVar[bool] = True
    inputs: ClassVar[tuple[str, ...]] = ("mf_pred",)
    extra_inputs: ClassVar[int] = 0
    head_std: ClassVar[float] = 0.0

    def __init__(self, config: OnMFConfig, dims: Dims, generator: torch.Generator):
        super().__init__(config, dims)
        self.frozen = FrozenMF()
        self.net: nn.Sequential | None = None
        self._init_state = generator.get_state()  # the MLP is drawn at attach, when the MF rank is known
        self._proj_key: tuple | None = None
        self._proj: tuple[torch.Tensor, torch.Tensor] | None = None

    def attach(self, mf: nn.Module) -> None:
        """Copy a trained MF-family model's factors and biases in as frozen buffers; build the MLP."""
        if not hasattr(mf, "factors"):
            raise ConfigError(
                f"{self.registry_name} needs an MF-family upstream model, got {type(mf).__name__}",
                fix="train stage 1 with mf, biased_mf, sigmoid_mf or mf_residual_mlp",
            )
        self._attach_tables(dict(mf.factors()))

    def resize_for(self, state: dict[str, torch.Tensor]) -> None:
        """Shape the frozen tables and the MLP like a saved state, before load_state_dict."""
        self._attach_tables({k.removeprefix("frozen."): v for k, v in state.items() if k.startswith("frozen.")})

    def _attach_tables(self, tables: dict[str, torch.Tensor]) -> None:
        device = tables["user_factors"].device
        self.frozen.load(tables, self.config)
        width = self.frozen.width + self.extra_inputs + self.config.use_mf_pred
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
            x = torch.cat([self.frozen.user_inputs[user], self.frozen.item_inputs[item], row], dim=-1)
            return self.net(x).squeeze(-1)
        first = self.net[0]
        per_user, per_item = self._projections()
        h = torch.addmm(per_user[user] + per_item[item], row, first.weight[:, self.frozen.width :].T)
        return self.net[1:](h).squeeze(-1)

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
        """Stage 1's prediction of each row: the last feature column."""
        if batch.features is None or batch.features.shape[-1] != len(self.inputs):
            raise DataError(
                f"{self.registry_name} needs the feature columns {', '.join(self.inputs)}",
                fix="train and score stages 2 and 3 on the previous stage's scored output (it has these columns)",
            )
        return batch.features[:, -1].float()

    def _row(self, batch: Batch) -> torch.Tensor:
        """The row's own inputs after the user's and the item's: (stage 1's prediction - global mean)."""
        cols = [(self._mf_pred(batch) - self.dims.global_mean).unsqueeze(-1)] if self.config.use_mf_pred else []
        return torch.cat(cols, dim=-1) if cols else batch.user.new_zeros((len(batch), 0), dtype=torch.float32)


@register("reliability_mlp", ReliabilityConfig)
class ReliabilityMLP(OnMF):
    """RNCF stage 2: MLP on frozen MF factors -> non-negative predicted squared error of the MF."""

    target = "error"
    head_std = 0.01

    def forward(self, batch: Batch) -> torch.Tensor:
        return F.softplus(self._mlp(batch, self._row(batch)))

    def set_context(self, train: Batch) -> None:
        """Start the output at the mean training error: the head's bias = softplus^-1(mean target).

        Raises DataError for targets that cannot be the squared errors of an MF on the rating scale.
        """
        if train.target is None or self.net is None:
            raise RuntimeError("reliability_mlp.set_context needs attach() first and a batch with targets")
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

    inputs = ("pred_error", "mf_pred")
    extra_inputs = 1

    def __init__(self, config: RatingConfig, dims: Dims, generator: torch.Generator):
        super().__init__(config, dims, generator)
        self.register_buffer("error_stats", torch.tensor([0.0, 1.0]))  # mean, std of log1p(pred_error)

    def _error_feature(self, batch: Batch) -> torch.Tensor:
        self._mf_pred(batch)  # checks the feature columns
        return torch.log1p(batch.features[:, :1].float().clamp_min(0))

    def forward(self, batch: Batch) -> torch.Tensor:
        err = (self._error_feature(batch) - self.error_stats[0]) / self.error_stats[1]
        correction = self._mlp(batch, torch.cat([self._row(batch), err], dim=-1))
        if self.config.skip:
            return self._mf_pred(batch) + correction
        return correction + self.dims.global_mean

    def set_context(self, train: Batch) -> None:
        """Standardise the predicted-error input with its training mean and spread."""
        e = self._error_feature(train)
        self.error_stats = torch.stack([e.mean(), e.std(correction=0).clamp_min(1e-6)]).to(self.error_stats)
