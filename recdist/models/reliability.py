"""RNCF stages 2 and 3: MLPs on a trained MF's frozen factors.

Stage 2 (`reliability_mlp`) predicts stage 1's squared error (rating - mf_pred)^2 from (p_u, q_i, b_u, b_i);
stage 3 (`rating_mlp`) predicts the rating from the same inputs plus that predicted error. attach(mf) copies
the MF tables in as frozen buffers and only then builds the MLP (its input width depends on the MF rank), from
the generator state saved at construction, so the same seed still gives the same weights.

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
from recdist.models.base import Model, head, mlp, scaled_sigmoid
from recdist.models.batch import Batch, Dims
from recdist.models.registry import register

TABLES = ("user_factors", "item_factors", "user_bias", "item_bias")


class FrozenMF(nn.Module):
    """A trained MF's tables as frozen buffers, its prediction, and standardised per-row inputs."""

    def __init__(self) -> None:
        super().__init__()
        for name in (*TABLES, "user_stats", "item_stats"):
            self.register_buffer(name, torch.zeros(0))
        self.register_buffer("global_mean", torch.zeros(()))
        self.register_buffer("sigmoid", torch.zeros(()))  # 1.0: the MF's score goes through a scaled sigmoid

    @property
    def rank(self) -> int:
        return int(self.user_factors.shape[1]) if self.user_factors.dim() == 2 else 0

    def load(self, tables: dict[str, torch.Tensor]) -> None:
        """Copy the four tables (plus global_mean and sigmoid when given) and freeze their statistics."""
        for name in TABLES:
            setattr(self, name, tables[name].detach().float().clone())
        for name in ("global_mean", "sigmoid"):
            if name in tables:
                setattr(self, name, tables[name].detach().float().clone().reshape(()))
        self.user_stats = _column_stats(self._side(self.user_factors, self.user_bias))
        self.item_stats = _column_stats(self._side(self.item_factors, self.item_bias))

    @staticmethod
    def _side(factors: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """[factors, bias, |factors|] per row."""
        return torch.cat([factors, bias.unsqueeze(-1), factors.norm(dim=-1, keepdim=True)], dim=-1)

    def predict(self, user: torch.Tensor, item: torch.Tensor, dims: Dims) -> torch.Tensor:
        """The MF's own prediction mu + b_u + b_i + p_u . q_i (through its link) in rating units."""
        z = (self.user_factors[user] * self.item_factors[item]).sum(-1)
        z = z + self.global_mean + self.user_bias[user] + self.item_bias[item]
        return torch.where(self.sigmoid > 0.5, scaled_sigmoid(z, dims), z)

    def inputs(self, user: torch.Tensor, item: torch.Tensor, cfg: OnMFConfig, dims: Dims) -> torch.Tensor:
        """Standardised [p_u, q_i, (b_u, b_i), (|p_u|, |q_i|), (mf prediction)] for each row."""
        k = self.rank
        u = (self._side(self.user_factors[user], self.user_bias[user]) - self.user_stats[0]) / self.user_stats[1]
        i = (self._side(self.item_factors[item], self.item_bias[item]) - self.item_stats[0]) / self.item_stats[1]
        cols = [u[:, :k], i[:, :k]]
        if cfg.use_bias:
            cols += [u[:, k : k + 1], i[:, k : k + 1]]
        if cfg.use_norms:
            cols += [u[:, k + 1 :], i[:, k + 1 :]]
        if cfg.use_mf_pred:
            cols.append((self.predict(user, item, dims) - dims.global_mean).unsqueeze(-1))
        return torch.cat(cols, dim=-1)


def _column_stats(table: torch.Tensor) -> torch.Tensor:
    """(2, C): per-column mean and standard deviation (floored so constant columns stay finite)."""
    return torch.stack([table.mean(0), table.std(0, correction=0).clamp_min(1e-6)])


class OnMFConfig(Section):
    """Inputs and MLP shape shared by the stages built on a frozen MF."""

    hidden: tuple[int, ...] = (64, 32)
    """Widths of the MLP's hidden layers."""
    dropout: float = Field(0.1, ge=0, lt=1)
    """Dropout after each hidden layer (training only)."""
    use_bias: bool = True
    """Feed the MF's user and item biases as well as the factors."""
    use_norms: bool = True
    """Feed the norms |p_u| and |q_i| (how much the MF knows about the user and the item)."""
    use_mf_pred: bool = True
    """Feed the MF's own prediction (an MLP finds a dot product hard to compute from the factors)."""


class ReliabilityConfig(OnMFConfig):
    """RNCF stage 2: predicted squared error of the MF from its frozen factors."""


class RatingConfig(OnMFConfig):
    """RNCF stage 3: rating from the frozen factors and the predicted error."""

    hidden: tuple[int, ...] = (128, 64)
    """Widths of the MLP's hidden layers (the paper: 512, 256, 256)."""
    dropout: float = Field(0.2, ge=0, lt=1)
    """Dropout after each hidden layer (training only)."""
    skip: bool = True
    """Predict MF's rating plus an MLP correction (starting at zero) instead of the global mean plus the MLP."""


class OnMF(Model):
    """Base of the stages that read a frozen MF: attach() copies it in and builds the MLP."""

    upstream: ClassVar[bool] = True
    extra_inputs: ClassVar[int] = 0
    head_std: ClassVar[float] = 0.0

    def __init__(self, config: OnMFConfig, dims: Dims, generator: torch.Generator):
        super().__init__(config, dims)
        self.frozen = FrozenMF()
        self.net: nn.Sequential | None = None
        self._init_state = generator.get_state()  # the MLP is drawn at attach, when the MF rank is known

    def attach(self, mf: nn.Module) -> None:
        """Copy a trained MF-family model's factors and biases in as frozen buffers; build the MLP."""
        if not hasattr(mf, "factors"):
            raise ConfigError(
                f"{self.registry_name} needs an MF-family upstream model, got {type(mf).__name__}",
                fix="train stage 1 with mf, biased_mf, sigmoid_mf or mf_residual_mlp",
            )
        tables = dict(mf.factors())
        tables["global_mean"] = mf.global_mean
        tables["sigmoid"] = torch.tensor(float(getattr(mf, "link", "identity") == "sigmoid"))
        self._attach_tables(tables)

    def resize_for(self, state: dict[str, torch.Tensor]) -> None:
        """Shape the frozen tables and the MLP like a saved state, before load_state_dict."""
        self._attach_tables({k.removeprefix("frozen."): v for k, v in state.items() if k.startswith("frozen.")})

    def _attach_tables(self, tables: dict[str, torch.Tensor]) -> None:
        device = tables["user_factors"].device
        self.frozen.load(tables)
        width = 2 * self.frozen.rank + self.extra_inputs
        width += 2 * self.config.use_bias + 2 * self.config.use_norms + self.config.use_mf_pred
        generator = torch.Generator().set_state(self._init_state)
        net = mlp(width, self.config.hidden, 1, self.config.dropout, generator, last_std=self.head_std)
        self.net = net.to(device)
        self.frozen.to(device)

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        if self.net is None:
            raise RuntimeError(f"{self.registry_name}: call attach(mf_model) before using the model")
        return self.net(x).squeeze(-1)


@register("reliability_mlp", ReliabilityConfig)
class ReliabilityMLP(OnMF):
    """RNCF stage 2: MLP on frozen MF factors -> non-negative predicted squared error of the MF."""

    target = "error"
    head_std = 0.01

    def forward(self, batch: Batch) -> torch.Tensor:
        x = self.frozen.inputs(batch.user, batch.item, self.config, self.dims)
        return F.softplus(self._mlp(x))

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

    inputs = ("pred_error",)
    extra_inputs = 1

    def __init__(self, config: RatingConfig, dims: Dims, generator: torch.Generator):
        super().__init__(config, dims, generator)
        self.register_buffer("error_stats", torch.tensor([0.0, 1.0]))  # mean, std of log1p(pred_error)

    def _error_feature(self, batch: Batch) -> torch.Tensor:
        if batch.features is None or batch.features.shape[-1] != 1:
            raise DataError(
                "rating_mlp needs one feature column, pred_error",
                fix="train stage 3 on stage 2's scored output (it has the pred_error column)",
            )
        return torch.log1p(batch.features.float().clamp_min(0))

    def forward(self, batch: Batch) -> torch.Tensor:
        err = (self._error_feature(batch) - self.error_stats[0]) / self.error_stats[1]
        x = torch.cat([self.frozen.inputs(batch.user, batch.item, self.config, self.dims), err], dim=-1)
        if self.config.skip:
            base = self.frozen.predict(batch.user, batch.item, self.dims)
        else:
            base = torch.full_like(batch.user, 0, dtype=torch.float32) + self.dims.global_mean
        return base + self._mlp(x)

    def set_context(self, train: Batch) -> None:
        """Standardise the predicted-error input with its training mean and spread."""
        e = self._error_feature(train)
        self.error_stats = torch.stack([e.mean(), e.std(correction=0).clamp_min(1e-6)]).to(self.error_stats)
