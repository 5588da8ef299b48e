"""One rank's training data as device tensors: whole-frame Arrow -> numpy -> torch, no per-row Python.

A rank reads its shards once (read_rank), splits them by the `split` column and keeps every split on its device
for the whole run; shuffling and batching then happen on the device (see solvers.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
import torch

from recdist import storage
from recdist.errors import DataError
from recdist.models.batch import Batch, Dims
from recdist.schema import INDEX_COLUMNS


@dataclass
class RankData:
    """The rows one rank trains and evaluates on.

    `context` is the whole training split (all ranks' rows), loaded only for models whose set_context reads
    every rating (Model.needs_context); the rank still iterates over its own shard `train` only.
    """

    train: Batch
    val: Batch | None
    test: Batch | None
    dims: Dims
    context: Batch | None = None

    def split(self, name: str) -> Batch | None:
        return {"train": self.train, "val": self.val, "test": self.test}[name]


def frame_to_batch(frame: pl.DataFrame, target: str, inputs: tuple[str, ...], device: torch.device) -> Batch:
    """A whole frame as one Batch on `device`, the `inputs` columns as its named features (one (rows, F) copy;
    pinned host memory for the copy when the device is CUDA)."""
    pin = device.type == "cuda"

    def move(array: np.ndarray, dtype: np.dtype) -> torch.Tensor:
        array = np.ascontiguousarray(array, dtype=dtype)
        if not array.flags.writeable:  # a zero-copy view of Arrow memory: torch wants its own
            array = array.copy()
        host = torch.from_numpy(array)
        if pin:
            host = host.pin_memory()
        return host.to(device, non_blocking=pin)

    features = None
    if inputs:
        features = move(frame.select(inputs).to_numpy(), np.float32)
    return Batch(
        user=move(frame["user_idx"].to_numpy(), np.int64),
        item=move(frame["item_idx"].to_numpy(), np.int64),
        target=move(frame[target].to_numpy(), np.float32),
        features=features,
        feature_names=tuple(inputs),
    )


def check_columns(uri: str, columns: list[str], names: list[str]) -> None:
    """Fail before reading, with the fix, when a column the model reads is absent from the table."""
    missing = [c for c in columns if c not in names]
    if missing:
        raise DataError(
            f"the training data has no column(s) {', '.join(missing)} (present: {', '.join(names)})",
            where=uri,
            fix="models fitting 'error' or reading 'pred_error' train on the scored output of the previous "
            "stage's inference, not on the prepared dataset",
        )


def check_values(frame: pl.DataFrame, columns: list[str], where: str) -> None:
    """Fail when a target or feature column holds nulls or NaN (they would poison every gradient)."""
    bad = [c for c in columns if frame[c].null_count() or frame[c].is_nan().any()]
    if bad:
        raise DataError(f"column(s) {', '.join(bad)} hold missing or NaN values", where=where)


def split_batches(
    frame: pl.DataFrame, target: str, inputs: tuple[str, ...], device: torch.device
) -> dict[str, Batch | None]:
    """train/val/test Batches of a frame with a `split` column (None for an empty val/test split)."""
    split = frame["split"]  # no cast: a Categorical compares its codes
    out: dict[str, Batch | None] = {}
    for name in ("train", "val", "test"):
        part = frame.filter(split == name)
        out[name] = frame_to_batch(part, target, inputs, device) if part.height or name == "train" else None
    return out


def load_rank_data(
    uri: str,
    *,
    target: str,
    inputs: tuple[str, ...] = (),
    rank: int = 0,
    world: int = 1,
    device: torch.device | str = "cpu",
    context: bool = False,
) -> RankData:
    """Read rank `rank`'s shards of a dataset or scored directory into device tensors.

    With `context=True` the whole training split is also loaded (every rank reads all shards' train rows).
    """
    from recdist.data import dataset  # the prepare helper's reader (shards r, r+W, ...)

    device = torch.device(device)
    columns = [*INDEX_COLUMNS, target, *inputs, "split"]
    manifest = dataset.read_manifest(uri)
    check_columns(uri, columns, storage.parquet_schema(dataset.shard_files(uri)[0]).names)
    frame = dataset.read_rank(uri, rank, world, columns=columns)
    check_values(frame, [target, *inputs], where=uri)
    parts = split_batches(frame, target, inputs, device)
    if not len(parts["train"]):
        raise DataError(
            f"rank {rank} of {world} received no training rows",
            where=uri,
            fix="use fewer workers, or prepare the dataset with more shards",
        )
    ctx = None
    if context:
        ctx = parts["train"]
        if world > 1:
            full = dataset.read_rank(uri, 0, 1, columns=columns)
            ctx = frame_to_batch(full.filter(pl.col("split") == "train"), target, inputs, device)
    return RankData(parts["train"], parts["val"], parts["test"], dataset.dims(manifest), ctx)
