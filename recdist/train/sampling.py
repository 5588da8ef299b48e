"""Which training rows a model trains on: K-fold cross-fitting of stage 1 (which fold a training rating falls in,
the per-fold training sets) and the seeded share of training rows stages 2 and 3 may train on (TrainShare).

Both are hashes of (user, item), so the fold models' training sets and the scorer that routes each training
row to the model that never saw it agree without storing a fold column, and stages 2 and 3 sample the same rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
import pyarrow as pa

from recdist.data.splits import pair_hash, split_is

SAMPLE = "sample"
"""Sub-directory of a scored table holding the TrainShare dataset, when one was asked for."""

_FOLD_SALT = 0xBF58476D1CE4E5B9
"""The folds' and the share's salt is seed * this (mod 2**64): not the splits' salt, so they are independent."""


def _hash(user: np.ndarray, item: np.ndarray, seed: int) -> np.ndarray:
    return pair_hash(user, item, seed * _FOLD_SALT)


def fold_of(user: np.ndarray, item: np.ndarray, folds: int, seed: int = 0) -> np.ndarray:
    """The fold (0..folds-1) of each (user, item) pair: its pair hash modulo folds."""
    return (_hash(user, item, seed) % np.uint64(folds)).astype(np.int8)


def in_share(user: np.ndarray, item: np.ndarray, share: float, seed: int = 0) -> np.ndarray:
    """bool: the pairs in a seeded `share` (0-1] of all pairs, by pair hash (independent of the folds' seed)."""
    h = _hash(user, item, seed + 0x5EED) >> np.uint64(11)  # 53 bits: exact in float64
    return h.astype(np.float64) < share * float(1 << 53)


@dataclass(frozen=True)
class TrainShare:
    """Also write, beside a scored table, the dataset `sample/` of its training rows in a seeded `share` plus every
    validation row (no test row: the pipeline measures test itself): what stages 2 and 3 train on when they need
    not see every training rating."""

    share: float
    seed: int = 0

    def keep(self, table: pa.Table) -> pa.Array:
        user, item = (table[c].to_numpy() for c in ("user_idx", "item_idx"))
        is_val, is_train = (split_is(table["split"], name) for name in ("val", "train"))
        return pa.array(is_val | (is_train & in_share(user, item, self.share, self.seed)))


def drop_fold(ratings: pl.DataFrame, fold: int, folds: int, seed: int = 0) -> pl.DataFrame:
    """The ratings without the training rows of `fold`: fold model `fold` trains on the other K-1 folds.

    Validation and test rows stay (early stopping and test metrics as for the full model).
    """
    k = fold_of(ratings["user_idx"].to_numpy(), ratings["item_idx"].to_numpy(), folds, seed)
    held_out = pl.Series(k == fold) & (ratings["split"] == "train")
    return ratings.filter(~held_out)


def write_fold_dataset(data: str, out: str, fold: int, folds: int, seed: int = 0) -> dict:
    """Commit at `out` a copy of the dataset without the training rows of `fold` (fold model's training set).

    Same layout, users and items (indices unchanged); the manifest's counts and training mean are recomputed.
    """
    from recdist import storage
    from recdist.data.dataset import read_manifest, read_rank
    from recdist.manifest import Crossfit, DatasetManifest, file_entries, relative
    from recdist.schema import RATINGS

    source = read_manifest(data)
    kept = drop_fold(read_rank(data), fold, folds, seed)
    table = kept.select(RATINGS.names).to_arrow().cast(RATINGS)
    shards = max(1, int(source.get("shards", 1)))
    splits = {s: 0 for s in ("train", "val", "test")}
    splits.update(dict(kept.group_by(pl.col("split").cast(pl.String)).len().iter_rows()))
    train_mean = kept.filter(pl.col("split") == "train")["rating"].mean()
    with storage.staged_output(out, overwrite=True) as tmp:
        for s in range(shards):
            lo, hi = s * table.num_rows // shards, (s + 1) * table.num_rows // shards
            storage.write_parquet(table.slice(lo, hi - lo), storage.join(tmp, "ratings", f"part-{s:05d}.parquet"))
        for name in ("users.parquet", "items.parquet"):
            storage.write_bytes(storage.join(tmp, name), storage.read_bytes(storage.join(data, name)))
        inherited = {k: v for k, v in source.items() if k not in ("shard_rows", "files", "created_at")}
        manifest = DatasetManifest.model_validate(
            {
                **inherited,
                "n_ratings": table.num_rows,
                "splits": splits,
                "global_mean": float(train_mean) if train_mean is not None else source["global_mean"],
                "shards": shards,
                "shard_rows": None,
                "crossfit": Crossfit(source=relative(data, out), held_out_fold=fold, folds=folds, seed=seed),
                "files": file_entries(tmp),
            }
        )
        manifest.write(tmp)
    return manifest.model_dump(mode="json")
