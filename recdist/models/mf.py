"""Matrix factorisation, stage 1 of RNCF: plain, biased, and sigmoid-squashed.

All three keep their tensors as nn.Embedding weights named user_factors, item_factors, user_bias and
item_bias, so a fast solver can update them in place (mf_tables() returns views of those weights), and all
three compute mu + b_u + b_i + p_u . q_i. Plain `mf` keeps zero, frozen bias tables (`use_bias = False`):
its prediction is the global-mean offset plus the dot product. mu is the training mean from Dims, a frozen
buffer: centring the ratings lets the factors start at zero without a long climb to the mean.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field

from recdist.config import Section
from recdist.models.base import MFTables, Model, embedding, logit_of, row_l2, scaled_sigmoid
from recdist.models.batch import Batch, Dims
from recdist.models.registry import register
from recdist.models.space import Knob, choice, integer, loguniform


class MFConfig(Section):
    """Plain matrix factorisation: r = mu + p_u . q_i."""

    rank: int = Field(32, ge=1)
    """Length of each user and item factor vector (32: what bench/family.py found to hold across its data)."""
    reg: float = Field(0.08, ge=0)
    """L2 weight on the factor rows of each rating, added per rating as in classic SGD MF
    (loss = mean over the batch of (r - r_hat)^2 + reg * (|p_u|^2 + |q_i|^2))."""
    init_std: float = Field(0.1, gt=0)
    """Standard deviation of the normal initial factors (not tiny: p = q = 0 is a saddle SGD leaves slowly)."""

    search_space: ClassVar[dict[str, Knob]] = {
        "params.rank": choice(16, 32, 64, 128, 256),
        "params.reg": loguniform(0.01, 0.2),
        "train.lr": loguniform(0.003, 0.05),
        "train.epochs": integer(10, 60),
    }
    """What `recdist tune` searches by default (recdist.models.space)."""


class BiasedMFConfig(MFConfig):
    """Biased matrix factorisation: r = mu + b_u + b_i + p_u . q_i."""

    reg_bias: float = Field(0.01, ge=0)
    """L2 weight on b_u and b_i, per rating like `reg` (biases need less shrinkage than factors)."""

    search_space: ClassVar[dict[str, Knob]] = {
        "params.rank": choice(32, 64, 128, 256, 512),
        "params.reg": loguniform(0.02, 0.2),
        "params.reg_bias": loguniform(0.001, 0.1),
        "train.lr": loguniform(0.003, 0.03),
        "train.lr_schedule": choice("constant", "cosine"),
        "train.epochs": integer(20, 120),
        "train.solver": choice("auto", "gibbs"),
    }
    """On ml-latest-small (bench/tune.py) the best SGD settings are wide and strongly regularised, trained long at
    a constant rate (rank 256-512, reg 0.1, lr 0.01, 60-70 epochs): the space reaches them. train.solver: auto
    (SGD, the stage's own, so the first trial is its settings) or gibbs. The gibbs solver
    (Bayesian MF: train.gibbs's defaults, rank 10 per sample) reads only train.epochs of these knobs (more sweeps,
    more samples averaged); it beat tuned SGD there and on bench/family.py's data (README, Bayesian MF)."""


class SigmoidMFConfig(BiasedMFConfig):
    """Biased MF squashed by a sigmoid onto [rating_min, rating_max]; biases and factors in logit units."""

    rank: int = Field(64, ge=1)
    """Length of each user and item factor vector (trained by autograd; not part of bench/family.py's choice)."""
    init_std: float = Field(0.01, gt=0)
    """Standard deviation of the normal initial factors (logit units; trained by autograd, which needs no push)."""

    search_space: ClassVar[dict[str, Knob]] = {
        "params.rank": choice(16, 32, 64, 128),
        "params.reg": loguniform(0.001, 0.2),
        "params.reg_bias": loguniform(0.0001, 0.05),
        "train.lr": loguniform(0.001, 0.03),
        "train.epochs": integer(5, 40),
    }


class MFBase(Model):
    """Shared body of the MF family: four embedding tables and the biased dot product.

    Its prediction is link(mu + b_u + b_i + p.q) on mf_tables() and nothing else: the fused MF kernel scores
    it, and with the identity link the fast MF solvers train it. A subclass that adds to forward() declares
    scoring_kernel = None and solver_family = "autograd" (mf_residual_mlp)."""

    solver_family = "explicit_mf"
    scoring_kernel = "mf"
    use_bias: ClassVar[bool] = True
    """False: the bias tables are zeros and frozen (solvers must leave them alone)."""
    link: ClassVar[Literal["identity", "sigmoid"]] = "identity"
    """How the score becomes a rating: "identity" or "sigmoid" (scaled onto the rating range)."""

    def __init__(self, config: MFConfig, dims: Dims, generator: torch.Generator):
        super().__init__(config, dims)
        k, std = config.rank, config.init_std
        self.user_factors = embedding(dims.n_users, k, std, generator)
        self.item_factors = embedding(dims.n_items, k, std, generator)
        frozen = not self.use_bias
        self.user_bias = embedding(dims.n_users, 1, 0.0, generator, frozen=frozen)
        self.item_bias = embedding(dims.n_items, 1, 0.0, generator, frozen=frozen)
        mu = logit_of(dims.global_mean, dims) if self.link == "sigmoid" else dims.global_mean
        self.register_buffer("global_mean", torch.tensor(mu, dtype=torch.float32))

    def score(self, user: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
        """mu + b_u + b_i + p_u . q_i, before the link."""
        dot = (self.user_factors(user) * self.item_factors(item)).sum(-1)
        return self.global_mean + self.user_bias(user).squeeze(-1) + self.item_bias(item).squeeze(-1) + dot

    def forward(self, batch: Batch) -> torch.Tensor:
        z = self.score(batch.user, batch.item)
        return scaled_sigmoid(z, self.dims) if self.link == "sigmoid" else z

    def penalty(self, batch: Batch) -> torch.Tensor:
        """reg * mean(|p_u|^2 + |q_i|^2) [+ reg_bias * mean(b_u^2 + b_i^2)] over the batch's rows."""
        cfg = self.config
        loss = cfg.reg * row_l2(self.user_factors(batch.user), self.item_factors(batch.item))
        if self.use_bias:
            loss = loss + cfg.reg_bias * row_l2(self.user_bias(batch.user), self.item_bias(batch.item))
        return loss

    def set_tables(
        self,
        user_factors: torch.Tensor,
        item_factors: torch.Tensor,
        user_bias: torch.Tensor,
        item_bias: torch.Tensor,
    ) -> None:
        """Replace the four tables (biases (n,)); the factors may change width (a Gibbs sample average is s * rank
        wide, recdist.train.gibbs) and config.rank follows it, so model.json describes the stored tensors."""
        for table, value in ((self.user_factors, user_factors), (self.item_factors, item_factors)):
            table.weight.data = value.detach().contiguous()
            table.embedding_dim = int(value.shape[1])
        self.user_bias.weight.data = user_bias.detach().reshape(-1, 1).contiguous()
        self.item_bias.weight.data = item_bias.detach().reshape(-1, 1).contiguous()
        width = int(user_factors.shape[1])
        if width != self.config.rank:
            self.config = self.config.model_copy(update={"rank": width})

    def resize_for(self, state: dict[str, torch.Tensor]) -> None:
        """Factor tables as wide as the saved ones (a Gibbs sample average is wider than its rank)."""
        saved = state.get("user_factors.weight")
        if saved is not None and saved.shape[1] != self.user_factors.weight.shape[1]:
            t = self.mf_tables()
            width = saved.shape[1]
            zeros = [t.user_factors.new_zeros(len(f), width) for f in (t.user_factors, t.item_factors)]
            self.set_tables(*zeros, t.user_bias, t.item_bias)

    def mf_tables(self) -> MFTables:
        """Views of the weights (no copy): in-place updates to them update the model. Biases are (n,)."""
        return MFTables(
            user_factors=self.user_factors.weight.detach(),
            item_factors=self.item_factors.weight.detach(),
            user_bias=self.user_bias.weight.detach().squeeze(-1),
            item_bias=self.item_bias.weight.detach().squeeze(-1),
            mu=float(self.global_mean),
            link=self.link,
            biased=self.use_bias,
            reg=float(self.config.reg),
            reg_bias=float(self.config.reg_bias) if self.use_bias else 0.0,
            init_std=float(self.config.init_std),
        )


@register("mf", MFConfig)
class MF(MFBase):
    """Plain matrix factorisation: r = mu + p_u . q_i (global-mean offset, no biases)."""

    use_bias = False


@register("biased_mf", BiasedMFConfig)
class BiasedMF(MFBase):
    """Biased matrix factorisation: r = mu + b_u + b_i + p_u . q_i (RNCF stage 1)."""


@register("sigmoid_mf", SigmoidMFConfig)
class SigmoidMF(MFBase):
    """Biased MF through a sigmoid scaled onto the rating range: predictions never leave it."""

    link = "sigmoid"
    solver_family = "autograd"  # the fast MF solvers fit the identity link only
