"""Biased MF plus an MLP residual on the concatenated factors (the seed's one-stage model).

r = mu + b_u + b_i + p_u . q_i + MLP([p_u, q_i]). The MLP's head starts at zero, so training begins from
plain biased MF and the residual only learns what the dot product misses.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field

from recdist.models.base import mlp
from recdist.models.batch import Batch, Dims
from recdist.models.mf import BiasedMFConfig, MFBase
from recdist.models.registry import register
from recdist.models.space import Knob, choice, mlp_knobs


class MFResidualMLPConfig(BiasedMFConfig):
    """Biased MF with an MLP residual on [p_u, q_i]."""

    rank: int = Field(32, ge=1)
    """Length of each user and item factor vector."""
    init_std: float = Field(0.01, gt=0)
    """Standard deviation of the normal initial factors (trained by autograd, which needs no push off zero)."""
    hidden: tuple[int, ...] = (64, 32)
    """Widths of the residual MLP's hidden layers."""
    dropout: float = Field(0.2, ge=0, lt=1)
    """Dropout after each hidden layer (training only)."""

    search_space: ClassVar[dict[str, Knob]] = {"params.rank": choice(16, 32, 64, 128), **mlp_knobs(0.2)}


@register("mf_residual_mlp", MFResidualMLPConfig)
class MFResidualMLP(MFBase):
    """Biased MF plus an MLP residual on the concatenated factors (one-stage model)."""

    solver_family = "autograd"
    scoring_kernel = None  # forward adds the residual: not the MF kernel's score

    def __init__(self, config: MFResidualMLPConfig, dims: Dims, generator: torch.Generator):
        super().__init__(config, dims, generator)
        self.residual = mlp(2 * config.rank, config.hidden, 1, config.dropout, generator, last_std=0.0)

    def forward(self, batch: Batch) -> torch.Tensor:
        p, q = self.user_factors(batch.user), self.item_factors(batch.item)
        base = self.global_mean + self.user_bias(batch.user).squeeze(-1) + self.item_bias(batch.item).squeeze(-1)
        return base + (p * q).sum(-1) + self.residual(torch.cat([p, q], dim=-1)).squeeze(-1)
