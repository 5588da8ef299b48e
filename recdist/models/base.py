"""The model contract's defaults (target, inputs, upstream, penalty, set_context) and seeded building blocks.

Every layer here is created without PyTorch's default init (skip_init) and initialised from the caller's
torch.Generator, so the same seed builds the same weights whatever else used the global RNG.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import nn
from torch.nn.utils import skip_init

from recdist.config import Section
from recdist.models.batch import Batch, Dims


class Model(nn.Module):
    """Base of every registered model: holds its config and dims, and the contract's no-op defaults."""

    registry_name: ClassVar[str]
    target: ClassVar[str] = "rating"
    """The column the loss fits: "rating", or "error" (stage 2)."""
    inputs: ClassVar[tuple[str, ...]] = ()
    """Extra float columns read into batch.features, in order."""
    upstream: ClassVar[bool] = False
    """True when attach(mf_model) must be called before training."""
    default_lr: ClassVar[float | None] = None
    """The autograd learning rate this model trains well with when train.lr is empty (None: the solver's)."""

    def __init__(self, config: Section, dims: Dims):
        super().__init__()
        self.config = config
        self.dims = dims

    def penalty(self, batch: Batch) -> torch.Tensor:
        """Regularisation for the rows of this batch; none by default."""
        return torch.zeros((), device=batch.user.device)

    def set_context(self, train: Batch) -> None:
        """Data-dependent set-up from the training rows (target means, the autoencoder's ratings); no-op here."""


def embedding(n: int, dim: int, std: float, generator: torch.Generator, *, frozen: bool = False) -> nn.Embedding:
    """An (n, dim) table drawn from N(0, std^2) (zeros when std == 0); `frozen` turns its gradient off."""
    table = skip_init(nn.Embedding, n, dim)
    with torch.no_grad():
        if std > 0:
            table.weight.normal_(0.0, std, generator=generator)
        else:
            table.weight.zero_()
    table.weight.requires_grad_(not frozen)
    return table


def linear(n_in: int, n_out: int, generator: torch.Generator, *, std: float | None = None) -> nn.Linear:
    """A linear layer with He-uniform weights (ReLU fan-in) and zero bias; `std` draws N(0, std^2) instead."""
    layer = skip_init(nn.Linear, n_in, n_out)
    with torch.no_grad():
        if std is None:
            bound = math.sqrt(6.0 / n_in)
            layer.weight.uniform_(-bound, bound, generator=generator)
        elif std > 0:
            layer.weight.normal_(0.0, std, generator=generator)
        else:
            layer.weight.zero_()
        layer.bias.zero_()
    return layer


def mlp(
    n_in: int, hidden: Sequence[int], n_out: int, dropout: float, generator: torch.Generator, *, last_std: float
) -> nn.Sequential:
    """Linear-ReLU-Dropout blocks then a linear head whose weights start at N(0, last_std^2) (0: a zero head).

    A zero (or tiny) head makes a residual MLP start as the identity of what it corrects, so it can only
    learn to improve on it; the blocks below still get gradients once the head moves.
    """
    layers: list[nn.Module] = []
    width = n_in
    for size in hidden:
        layers += [linear(width, size, generator), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = size
    layers.append(linear(width, n_out, generator, std=last_std))
    return nn.Sequential(*layers)


def head(net: nn.Sequential) -> nn.Linear:
    """The output layer of an mlp()."""
    last = net[-1]
    assert isinstance(last, nn.Linear)
    return last


def row_l2(*rows: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of the summed squares of each row's embeddings (classic per-rating SGD L2)."""
    return sum(r.pow(2).reshape(r.shape[0], -1).sum(1) for r in rows).mean()


def logit_of(value: float, dims: Dims) -> float:
    """The logit that a sigmoid scaled into [rating_min, rating_max] maps to `value` (clamped inside)."""
    span = dims.rating_max - dims.rating_min
    frac = min(max((value - dims.rating_min) / span, 1e-3), 1 - 1e-3)
    return math.log(frac / (1 - frac))


def scaled_sigmoid(z: torch.Tensor, dims: Dims) -> torch.Tensor:
    """sigmoid(z) stretched onto [rating_min, rating_max]."""
    return dims.rating_min + (dims.rating_max - dims.rating_min) * torch.sigmoid(z)
