"""Losses, outside the models (torchrec style): MSE on the target, masked weighted MSE for the autoencoder.

objective() is what a solver minimises and already includes the model's penalty(batch): do not add it
again. data_loss() is the same without the penalty (the train_loss a history reports).
"""

from __future__ import annotations

import torch
from torch import nn

from recdist.models.batch import Batch


def objective(model: nn.Module, pred: torch.Tensor, batch: Batch) -> torch.Tensor:
    """data_loss + model.penalty(batch): the scalar to backpropagate. `model` may be DDP-wrapped."""
    return data_loss(model, pred, batch) + _unwrap(model).penalty(batch)


def data_loss(model: nn.Module, pred: torch.Tensor, batch: Batch) -> torch.Tensor:
    """MSE of pred against batch.target; for a model that hides rows (autoencoder), the masked weighted MSE.

    A model with a `last_hidden` mask (set by its latest forward) gets hidden rows weighted by its
    config.hidden_weight and visible rows by config.visible_weight.
    """
    if batch.target is None:
        raise ValueError("the batch has no target to fit")
    m = _unwrap(model)
    hidden = getattr(m, "last_hidden", None)
    if hidden is None:
        return torch.mean((pred - batch.target) ** 2)
    if hidden.shape != pred.shape:
        raise ValueError("the model's last_hidden mask is from another batch: call forward on this batch first")
    cfg = m.config
    return masked_mse(pred, batch.target, hidden, hidden_weight=cfg.hidden_weight, visible_weight=cfg.visible_weight)


def masked_mse(
    pred: torch.Tensor, target: torch.Tensor, hidden: torch.Tensor, *, hidden_weight: float, visible_weight: float
) -> torch.Tensor:
    """Weighted mean squared error: hidden rows weigh `hidden_weight`, visible ones `visible_weight`.

    A row of weight 0 is ignored entirely, whatever its target (even NaN): its error never enters the sum.
    """
    weight = torch.where(hidden, hidden_weight, visible_weight).to(pred.dtype)
    err = torch.where(weight > 0, (pred - target) ** 2, torch.zeros_like(pred))
    return (weight * err).sum() / weight.sum().clamp_min(1e-12)


def rmse(pred: torch.Tensor, target: torch.Tensor) -> float:
    return float(torch.sqrt(torch.mean((pred.float() - target.float()) ** 2)))


def mae(pred: torch.Tensor, target: torch.Tensor) -> float:
    return float(torch.mean(torch.abs(pred.float() - target.float())))


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel wrapper (or the model itself)."""
    return getattr(model, "module", model)
