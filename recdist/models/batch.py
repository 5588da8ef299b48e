"""The typed batch between loader and model (torchrec style): index tensors, target, dense features."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class Batch:
    """A batch of (user, item) rows.

    `target` is what the loss fits (the rating; stage 2 fits the squared error). `features` holds extra dense
    inputs per row (stage 3: the predicted error), shape (B, F).
    """

    user: torch.Tensor  # int64 (B,)
    item: torch.Tensor  # int64 (B,)
    target: torch.Tensor | None = None  # float32 (B,)
    features: torch.Tensor | None = None  # float32 (B, F)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return Batch(
            **{
                f.name: (v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v)
                for f in fields(self)
                for v in [getattr(self, f.name)]
            }
        )

    def __len__(self) -> int:
        return int(self.user.shape[0])


@dataclass(frozen=True)
class Dims:
    """What a model is built from besides its config: table sizes and the rating scale."""

    n_users: int
    n_items: int
    global_mean: float = 3.5
    rating_min: float = 0.5
    rating_max: float = 5.0
