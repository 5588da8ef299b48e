"""The model contract: every hook train/ and infer/ use, declared with its default on Model; seeded building blocks.

Every layer here is created without PyTorch's default init and initialised from the caller's torch.Generator,
so the same seed builds the same weights whatever else used the global RNG.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from recdist.config import Section
from recdist.models.batch import Batch, Dims

Target = Literal["rating", "error"]
#: What a model's prediction is, for the solvers that exploit it: "explicit_mf" is exactly mu + b_u + b_i + p.q
#: on its mf_tables() fitted by squared error with per-rating L2 (per-rating SGD, ALS); "autograd" is anything.
SolverFamily = Literal["autograd", "explicit_mf"]
#: A fused scoring path a model's predictions may take instead of forward(): "mf" scores link(mu + b_u + b_i +
#: p.q) from mf_tables() (recdist.infer.kernels).
ScoringKernel = Literal["mf"]


@dataclass
class MFTables:
    """A matrix factorisation's tables (views of the model's weights: in-place updates change the model) and
    what scores and fits them: prediction link(mu + b_u + b_i + p_u . q_i), per-rating L2 reg and reg_bias."""

    user_factors: torch.Tensor  # (n_users, k)
    item_factors: torch.Tensor  # (n_items, k)
    user_bias: torch.Tensor  # (n_users,)
    item_bias: torch.Tensor  # (n_items,)
    mu: float  # the global mean (in link units), added to every score
    link: Literal["identity", "sigmoid"]  # sigmoid: the score is squashed onto the rating range
    biased: bool  # False: plain MF, whose zero bias tables are frozen (training leaves them alone)
    reg: float  # L2 on the factor rows of each rating
    reg_bias: float  # L2 on the biases of each rating
    init_std: float  # std of the normal initial factors: a solver that starts afresh (Gibbs) draws the same

    def tensors(self) -> dict[str, torch.Tensor]:
        """The four tables by name (user_factors, item_factors, user_bias, item_bias)."""
        return {
            "user_factors": self.user_factors,
            "item_factors": self.item_factors,
            "user_bias": self.user_bias,
            "item_bias": self.item_bias,
        }

    def user_tensors(self) -> list[torch.Tensor]:
        """The user-side tables training changes."""
        return [self.user_factors, self.user_bias] if self.biased else [self.user_factors]

    def item_tensors(self) -> list[torch.Tensor]:
        """The item-side tables training changes."""
        return [self.item_factors, self.item_bias] if self.biased else [self.item_factors]


class Model(nn.Module):
    """Base of every registered model: its config and dims, and every hook of the contract with its default.

    Built as Model(config, dims, generator); forward(batch) -> (B,) predictions of `target`. Training and
    inference read only what is declared here (no probing): a model changes a default by overriding it.
    """

    registry_name: ClassVar[str]
    """The name it is registered under (set by registry.register)."""
    target: ClassVar[Target] = "rating"
    """The column the loss fits: "rating", or "error" (stage 2's squared error of stage 1)."""
    inputs: ClassVar[tuple[str, ...]] = ()
    """The named row features it reads (recdist.schema names), loaded into batch.features in this order."""
    upstream: ClassVar[bool] = False
    """True when attach(mf_model) must be called before training and scoring."""
    needs_context: ClassVar[bool] = False
    """True when set_context reads the whole training split: every rank then loads all of it (same state)."""
    solver_family: ClassVar[SolverFamily] = "autograd"
    """Which solvers may train it (recdist.train.solvers.SOLVERS; `auto` takes the first)."""
    scoring_kernel: ClassVar[ScoringKernel | None] = None
    """A fused CPU scoring path equal to forward() (recdist.infer.kernels), or None: forward() scores."""
    default_lr: ClassVar[float | None] = None
    """The autograd learning rate this model trains well with when train.lr is empty (None: the solver's)."""

    def __init__(self, config: Section, dims: Dims):
        super().__init__()
        self.config = config
        self.dims = dims

    def penalty(self, batch: Batch) -> torch.Tensor:
        """Regularisation for the rows of this batch, added to the data loss; none by default."""
        return torch.zeros((), device=batch.user.device)

    def training_batch(self, batch: Batch) -> Batch:
        """The batch a training step feeds to forward() and the loss: `batch` itself by default. A model that
        draws a mask per step (the autoencoder's hidden rows) returns it with `hidden` and loss `weight` set."""
        return batch

    def set_context(self, train: Batch) -> None:
        """Data-dependent set-up from the training rows before the first step (target means, standardisation,
        the autoencoder's ratings); no-op here. Set needs_context when it must see every rank's rows."""

    def attach(self, upstream: Model) -> None:
        """Take what it needs from a trained upstream model (stage 1's MF); only for `upstream` models."""
        raise TypeError(f"{self.registry_name} takes no upstream model")

    def resize_for(self, state: dict[str, torch.Tensor]) -> None:
        """Size the tensors that attach()/set_context() size like a saved state, before load_state_dict; no-op."""

    def use_statistics(self, state: dict[str, torch.Tensor]) -> list[str]:
        """Standardise with the statistics set_context()/attach() froze in a saved state `state` instead of its
        own; the names taken (none here: a model without such statistics)."""
        return []

    def mf_tables(self) -> MFTables | None:
        """The matrix factorisation inside it (candidates, cold-start biases, fast solvers), or None."""
        return None


def embedding(n: int, dim: int, std: float, generator: torch.Generator, *, frozen: bool = False) -> nn.Embedding:
    """An (n, dim) table drawn from N(0, std^2) (zeros when std == 0); `frozen` turns its gradient off."""
    table = nn.Embedding(n, dim, _weight=torch.empty(n, dim))  # not skip_init: its meta-device init imports dynamo
    with torch.no_grad():
        if std > 0:
            table.weight.normal_(0.0, std, generator=generator)
        else:
            table.weight.zero_()
    table.weight.requires_grad_(not frozen)
    return table


def linear(n_in: int, n_out: int, generator: torch.Generator, *, std: float | None = None) -> nn.Linear:
    """A linear layer with He-uniform weights (ReLU fan-in) and zero bias; `std` draws N(0, std^2) instead."""
    layer = nn.Linear(n_in, n_out, device="meta")  # no init; not skip_init: moving off "meta" imports sympy (0.8 s)
    layer.weight, layer.bias = nn.Parameter(torch.empty(n_out, n_in)), nn.Parameter(torch.empty(n_out))
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


DROPOUT_LEVELS = 1 << 16
"""A CPU dropout mask compares 16-bit random integers with round(p x 65,536): p to within 1/131,072."""


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """F.dropout, with the mask drawn four entries per 64-bit random word on a CPU from the same (seeded) global
    generator: 3x faster than PyTorch's CPU dropout, one draw per entry, which took 40% of stages 2 and 3's
    training epochs at ML-20M. On other devices (CUDA's fused kernel) F.dropout itself."""
    if not training or p == 0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, training)
    dropped = round(p * DROPOUT_LEVELS)
    if dropped >= DROPOUT_LEVELS:  # p within 1/131,072 of 1: every entry dropped
        return x * 0.0
    words = torch.empty((x.numel() + 3) // 4, dtype=torch.int64).random_(-(1 << 63), None)  # all 64 bits
    keep = words.view(torch.int16)[: x.numel()].view(x.shape) >= dropped - DROPOUT_LEVELS // 2
    return x * keep.to(x.dtype).mul_(DROPOUT_LEVELS / (DROPOUT_LEVELS - dropped))  # one product for autograd


class Dropout(nn.Dropout):
    """nn.Dropout by dropout() above (the same module otherwise: no state, `p`, train/eval)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


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
        layers += [linear(width, size, generator), nn.ReLU(inplace=True)]
        if dropout > 0:
            layers.append(Dropout(dropout))
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
