"""The typed batch between loader and model (torchrec style): index tensors, target, named dense features."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class Batch:
    """A batch of (user, item) rows.

    `target` is what the loss fits (the rating; stage 2 fits the squared error). `features` holds extra dense
    inputs per row, shape (B, F), keyed by `feature_names` (as torchrec's KeyedTensor keys its values): models
    read them by name with feature() / feature_block(), never by position. `weight` and `hidden` are set for a
    training step only (Model.training_batch): the loss weight of each row, and the rows whose own target is
    held out of the model's input (the autoencoder's masked reconstruction).
    """

    user: torch.Tensor  # int64 (B,)
    item: torch.Tensor  # int64 (B,)
    target: torch.Tensor | None = None  # float32 (B,)
    features: torch.Tensor | None = None  # float32 (B, F)
    feature_names: tuple[str, ...] = ()  # F names, in column order
    weight: torch.Tensor | None = None  # float32 (B,): the row's weight in the loss (None: all rows weigh 1)
    hidden: torch.Tensor | None = None  # bool (B,): rows whose own target the model must not read

    def __post_init__(self) -> None:
        width = 0 if self.features is None else int(self.features.shape[-1])
        if width != len(self.feature_names):
            raise ValueError(f"{width} feature column(s) but {len(self.feature_names)} name(s): {self.feature_names}")

    def feature(self, name: str) -> torch.Tensor:
        """The (B,) column of feature `name` (a view); KeyError when the batch has no such feature."""
        return self.features[:, self._column(name)]

    def feature_block(self, names: tuple[str, ...]) -> torch.Tensor:
        """(B, len(names)): these features side by side (a view when they are adjacent and in order)."""
        at = [self._column(n) for n in names]
        if at == list(range(at[0], at[0] + len(at))):
            return self.features[:, at[0] : at[0] + len(at)]
        return self.features[:, at]

    def _column(self, name: str) -> int:
        if name not in self.feature_names:
            raise KeyError(f"the batch has no feature {name!r} (it has: {', '.join(self.feature_names) or 'none'})")
        return self.feature_names.index(name)

    def has_features(self, names: tuple[str, ...]) -> bool:
        """True when every one of `names` is a feature of this batch."""
        return all(n in self.feature_names for n in names)

    def take(self, idx: torch.Tensor) -> Batch:
        """The rows `idx` (one gather per tensor)."""
        return Batch(
            user=self.user[idx],
            item=self.item[idx],
            target=_rows(self.target, idx),
            features=_rows(self.features, idx),
            feature_names=self.feature_names,
            weight=_rows(self.weight, idx),
            hidden=_rows(self.hidden, idx),
        )

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


def _rows(tensor: torch.Tensor | None, idx: torch.Tensor) -> torch.Tensor | None:
    return None if tensor is None else tensor[idx]


@dataclass(frozen=True)
class Dims:
    """What a model is built from besides its config: table sizes and the rating scale."""

    n_users: int
    n_items: int
    global_mean: float = 3.5
    rating_min: float = 0.5
    rating_max: float = 5.0
