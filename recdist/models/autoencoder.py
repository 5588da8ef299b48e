"""Item-based autoencoder (AutoRec-like) on normalised preferences, with masked hidden/visible training.

Each item is the vector of its users' normalised ratings (rating minus the global mean, the item's and the
user's damped mean offsets; unknown ratings are simply absent). The encoder is a weighted sum of per-user
columns (an EmbeddingBag over the item's known ratings, scaled by 1/sqrt(count)), so only the items in a
batch are ever built and no n_users x n_items matrix exists. The decoder reads the code back only at the
users asked for: pred(u, i) = mu + b_u + b_i + V_u . g(W r_i + c) + d_u.

Training batches are ordinary rating rows (user, item, target). For a training step, training_batch() hides
each row's own rating from its item's input with probability `hide_prob` (batch.hidden), so the loss on a
hidden row is a true held-out reconstruction; the other rows are visible (plain AutoRec reconstruction). It
weights hidden rows by `hidden_weight` and visible rows by `visible_weight` (batch.weight, which the loss in
losses.py applies). Rows not in the training context at all (validation, test) always count as hidden.
"""

from __future__ import annotations

from dataclasses import replace
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from recdist.config import Section
from recdist.models.base import Model, dropout, embedding, row_l2
from recdist.models.batch import Batch, Dims
from recdist.models.registry import register
from recdist.models.space import Knob, choice, integer, loguniform, uniform

ACTIVATIONS = {"sigmoid": torch.sigmoid, "tanh": torch.tanh, "elu": F.elu, "relu": F.relu}
CONTEXT = ("ctx_key", "ctx_value", "ctx_indptr")


class AutoencoderConfig(Section):
    """Item-based autoencoder over the user x item matrix of normalised ratings."""

    hidden: int = Field(256, ge=1)
    """Size of each item's code."""
    activation: Literal["sigmoid", "tanh", "elu", "relu"] = "tanh"
    """Non-linearity of the code."""
    dropout: float = Field(0.1, ge=0, lt=1)
    """Dropout on the code (training only)."""
    hide_prob: float = Field(0.8, ge=0, le=1)
    """Chance that a training row's own rating is hidden from its item's input (then reconstructed)."""
    hidden_weight: float = Field(1.0, ge=0)
    """Loss weight of hidden rows (held-out reconstruction: what prediction needs)."""
    visible_weight: float = Field(0.25, ge=0)
    """Loss weight of visible rows (reconstruction of a rating the input contained)."""
    input_dropout: float = Field(0.0, ge=0, lt=1)
    """Chance that each other known rating is dropped from an item's input in training (denoising)."""
    reg: float = Field(0.03, ge=0)
    """L2 weight on the encoder column and decoder row of each batch row's user, per rating."""
    init_std: float = Field(0.05, gt=0)
    """Standard deviation of the normal initial encoder and decoder weights."""
    mean_damping: float = Field(1000.0, ge=0)
    """Damping of the item and user mean offsets: sum / (count + damping), so rare ones shrink to 0. Large values
    leave the offsets to the network (its user biases and item codes), which predicts better (bench/accuracy.py)."""

    search_space: ClassVar[dict[str, Knob]] = {
        "params.hidden": choice(128, 256, 512),
        "params.dropout": uniform(0.0, 0.5),
        "params.hide_prob": uniform(0.5, 1.0),
        "params.reg": loguniform(0.003, 0.3),
        "train.lr": loguniform(0.0005, 0.01),
        "train.epochs": integer(10, 40),
    }


@register("autoencoder", AutoencoderConfig)
class Autoencoder(Model):
    """Item-based autoencoder (AutoRec-like) on normalised ratings, masked hidden/visible loss."""

    default_lr = 0.002
    needs_context = True

    def __init__(self, config: AutoencoderConfig, dims: Dims, generator: torch.Generator):
        super().__init__(config, dims)
        h = config.hidden
        self.encoder = embedding(dims.n_users, h, config.init_std, generator)
        self.encoder_bias = nn.Parameter(torch.zeros(h))
        self.decoder = embedding(dims.n_users, h, config.init_std, generator)
        self.decoder_bias = embedding(dims.n_users, 1, 0.0, generator)
        self.register_buffer("global_mean", torch.tensor(dims.global_mean, dtype=torch.float32))
        self.register_buffer("user_offset", torch.zeros(dims.n_users))
        self.register_buffer("item_offset", torch.zeros(dims.n_items))
        # The training ratings, sorted by key = item * n_users + user; item i owns ctx_indptr[i]:ctx_indptr[i+1].
        self.register_buffer("ctx_key", torch.zeros(0, dtype=torch.int64))
        self.register_buffer("ctx_value", torch.zeros(0))
        self.register_buffer("ctx_indptr", torch.zeros(dims.n_items + 1, dtype=torch.int64))

    def set_context(self, train: Batch) -> None:
        """Store the training ratings (normalised, sorted by item) that every item's input is built from."""
        if train.target is None:
            raise RuntimeError("autoencoder.set_context needs the training ratings as batch targets")
        user, item, rating = train.user.long(), train.item.long(), train.target.float()
        n_users, n_items, damp = self.dims.n_users, self.dims.n_items, self.config.mean_damping
        mu = rating.mean()
        item_offset = _damped_mean(item, rating - mu, n_items, damp)
        user_offset = _damped_mean(user, rating - mu - item_offset[item], n_users, damp)
        value = rating - mu - item_offset[item] - user_offset[user]
        key, order = torch.sort(item * n_users + user)
        self.global_mean = mu.reshape(()).to(self.global_mean)
        self.item_offset, self.user_offset = item_offset, user_offset
        self.ctx_key, self.ctx_value = key, value[order]
        self.ctx_indptr = torch.searchsorted(key, torch.arange(n_items + 1, device=key.device) * n_users)

    def resize_for(self, state: dict[str, torch.Tensor]) -> None:
        """Size the context buffers like a saved state, before load_state_dict."""
        for name in CONTEXT:
            setattr(self, name, torch.empty_like(state[name], device=getattr(self, name).device))

    def training_batch(self, batch: Batch) -> Batch:
        """The batch with `hidden` (rows whose own rating is hidden from the input: drawn with hide_prob among
        the known ones, and every row outside the context) and the loss `weight` of hidden and visible rows."""
        if not self.training:
            return batch
        _, known = self._locate(batch)
        hidden = ~known | (known & (torch.rand(known.shape, device=known.device) < self.config.hide_prob))
        weight = torch.where(hidden, self.config.hidden_weight, self.config.visible_weight)
        return replace(batch, hidden=hidden, weight=weight)

    def forward(self, batch: Batch) -> torch.Tensor:
        user, item = batch.user.long(), batch.item.long()
        n_users = self.dims.n_users
        items, inv = torch.unique(item, return_inverse=True)
        pos, bag = self._entries(items)
        if self.training:
            loc, known = self._locate(batch)
            drop = torch.zeros_like(pos, dtype=torch.bool)
            if batch.hidden is not None:  # the hidden rows' own ratings leave their items' inputs
                drop = torch.isin(pos, loc[batch.hidden & known])
            if self.config.input_dropout > 0:
                drop |= torch.rand(pos.shape, device=pos.device) < self.config.input_dropout
            pos, bag = pos[~drop], bag[~drop]

        kept = torch.bincount(bag, minlength=items.numel())
        weight = self.ctx_value[pos] * kept.clamp_min(1).float().rsqrt()[bag]
        offsets = torch.cumsum(kept, 0) - kept
        code = F.embedding_bag(
            self.ctx_key[pos] % n_users,
            self.encoder.weight,
            offsets,
            mode="sum",
            per_sample_weights=weight,
            sparse=self.encoder.sparse,  # the trainer may switch the tables to sparse gradients
        )
        code = ACTIVATIONS[self.config.activation](code + self.encoder_bias)
        code = dropout(code, self.config.dropout, self.training)
        out = (self.decoder(user) * code[inv]).sum(-1) + self.decoder_bias(user).squeeze(-1)
        return self.global_mean + self.user_offset[user] + self.item_offset[item] + out

    def _locate(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's position in the context and whether it is there (a training rating)."""
        key = batch.item.long() * self.dims.n_users + batch.user.long()
        nnz = self.ctx_key.numel()
        loc = torch.searchsorted(self.ctx_key, key).clamp_max(max(nnz - 1, 0))
        known = self.ctx_key[loc] == key if nnz else torch.zeros_like(key, dtype=torch.bool)
        return loc, known

    def _entries(self, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Context positions of every known rating of `items`, and the index (into items) each belongs to."""
        starts = self.ctx_indptr[items]
        counts = self.ctx_indptr[items + 1] - starts
        bag = torch.repeat_interleave(torch.arange(items.numel(), device=items.device), counts)
        first = torch.cumsum(counts, 0) - counts
        pos = starts[bag] + torch.arange(bag.numel(), device=items.device) - first[bag]
        return pos, bag

    def penalty(self, batch: Batch) -> torch.Tensor:
        """reg * mean over the rows of |W_u|^2 + |V_u|^2 (the row user's encoder column and decoder row)."""
        return self.config.reg * row_l2(self.encoder(batch.user), self.decoder(batch.user))


def _damped_mean(index: torch.Tensor, values: torch.Tensor, n: int, damping: float) -> torch.Tensor:
    """Per-index sum(values) / (count + damping), zeros where an index has no values."""
    total = torch.zeros(n, device=values.device).index_add_(0, index, values)
    count = torch.bincount(index, minlength=n).float()
    return total / (count + damping).clamp_min(1e-9)
