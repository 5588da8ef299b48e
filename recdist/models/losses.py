"""Losses, outside the models (torchrec style): the data term a solver minimises (plus the model's penalty).

Everything the loss needs comes in as arguments: the prediction and the batch, whose per-row `weight` a model's
training_batch() may have set (the autoencoder's hidden and visible rows).
"""

from __future__ import annotations

import torch

from recdist.models.batch import Batch


def data_loss(pred: torch.Tensor, batch: Batch) -> torch.Tensor:
    """MSE of pred against batch.target; weighted by batch.weight when the batch has one (weighted_mse)."""
    if batch.target is None:
        raise ValueError("the batch has no target to fit")
    if batch.weight is None:
        return torch.mean((pred - batch.target) ** 2)
    return weighted_mse(pred, batch.target, batch.weight.to(pred.dtype))


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """sum(weight * (pred - target)^2) / sum(weight).

    A row of weight 0 is ignored entirely, whatever its target (even NaN): its error never enters the sum.
    """
    err = torch.where(weight > 0, (pred - target) ** 2, torch.zeros_like(pred))
    return (weight * err).sum() / weight.sum().clamp_min(1e-12)
