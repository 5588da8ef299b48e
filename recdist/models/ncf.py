"""NCF-style MLP: user and item embeddings concatenated through an MLP with dropout.

r = mu + b_u + b_i + MLP([e_u, e_i]) (or the same score through a sigmoid scaled onto the rating range).
The biases carry the easy part (user and item means) so the MLP spends its capacity on interactions.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field

from recdist.config import Section
from recdist.models.base import Model, embedding, logit_of, mlp, row_l2, scaled_sigmoid
from recdist.models.batch import Batch, Dims
from recdist.models.registry import register
from recdist.models.space import Knob, choice, mlp_knobs


class NCFConfig(Section):
    """Neural collaborative filtering, MLP tower over concatenated embeddings."""

    dim: int = Field(32, ge=1)
    """Length of each user and item embedding."""
    hidden: tuple[int, ...] = (64, 32)
    """Widths of the MLP's hidden layers."""
    dropout: float = Field(0.2, ge=0, lt=1)
    """Dropout after each hidden layer (training only)."""
    reg: float = Field(0.02, ge=0)
    """L2 weight on the embedding rows of each rating (mean over the batch of |e_u|^2 + |e_i|^2)."""
    reg_bias: float = Field(0.01, ge=0)
    """L2 weight on b_u and b_i, per rating."""
    init_std: float = Field(0.1, gt=0)
    """Standard deviation of the normal initial embeddings."""
    sigmoid_output: bool = False
    """Squash the score with a sigmoid onto [rating_min, rating_max] instead of adding it to the mean."""

    search_space: ClassVar[dict[str, Knob]] = {"params.dim": choice(16, 32, 64, 128), **mlp_knobs(0.1)}


@register("ncf_mlp", NCFConfig)
class NCFMLP(Model):
    """NCF-style MLP over concatenated user and item embeddings, plus user and item biases."""

    def __init__(self, config: NCFConfig, dims: Dims, generator: torch.Generator):
        super().__init__(config, dims)
        self.user_embedding = embedding(dims.n_users, config.dim, config.init_std, generator)
        self.item_embedding = embedding(dims.n_items, config.dim, config.init_std, generator)
        self.user_bias = embedding(dims.n_users, 1, 0.0, generator)
        self.item_bias = embedding(dims.n_items, 1, 0.0, generator)
        self.tower = mlp(2 * config.dim, config.hidden, 1, config.dropout, generator, last_std=0.01)
        mu = logit_of(dims.global_mean, dims) if config.sigmoid_output else dims.global_mean
        self.register_buffer("global_mean", torch.tensor(mu, dtype=torch.float32))

    def forward(self, batch: Batch) -> torch.Tensor:
        e = torch.cat([self.user_embedding(batch.user), self.item_embedding(batch.item)], dim=-1)
        bias = self.user_bias(batch.user).squeeze(-1) + self.item_bias(batch.item).squeeze(-1)
        z = self.global_mean + bias + self.tower(e).squeeze(-1)
        return scaled_sigmoid(z, self.dims) if self.config.sigmoid_output else z

    def penalty(self, batch: Batch) -> torch.Tensor:
        cfg = self.config
        emb = row_l2(self.user_embedding(batch.user), self.item_embedding(batch.item))
        bias = row_l2(self.user_bias(batch.user), self.item_bias(batch.item))
        return cfg.reg * emb + cfg.reg_bias * bias
