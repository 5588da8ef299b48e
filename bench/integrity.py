"""What verifying a committed directory costs at MovieLens-20M size (recdist/integrity.py): the checksums a commit
computes (file_entries) and the check every reader makes (integrity.check), on a 20M-row scored table.

    .venv/bin/python bench/integrity.py                 # 20,000,263 rows in 16 shards, in a temp directory
    .venv/bin/python bench/integrity.py --rows 2000000  # smaller

Prints the table's bytes, then seconds and GB/s of: the write with and without Parquet page checksums, the
commit's file_entries (rows + sha256 per file), and a reader's check (sizes + sha256 + extra files), warm cache.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from recdist import integrity, storage
from recdist.manifest import DatasetManifest, file_entries
from recdist.schema import SCORED_PARQUET, SPLIT_TYPE

N_20M = 20_000_263


def shard(rng: np.random.Generator, n: int) -> pa.Table:
    """A scored-table shard: RATINGS columns plus stage 1's prediction, error and session context columns."""
    split = pa.DictionaryArray.from_arrays(pa.array(rng.integers(0, 3, n), pa.int8()), ["train", "val", "test"])
    cols = {
        "user_idx": pa.array(np.sort(rng.integers(0, 138_493, n)).astype(np.int32)),
        "item_idx": pa.array(rng.integers(0, 26_744, n).astype(np.int32)),
        "rating": pa.array((rng.integers(1, 11, n) / 2).astype(np.float32)),
        "timestamp": pa.array(rng.integers(789_652_009, 1_427_784_002, n)),
        "split": split.cast(SPLIT_TYPE),
    }
    for name in ("mf_pred", "error", "s1", "s2", "s3", "s4", "s5", "s6"):
        cols[name] = pa.array(rng.normal(3.5, 1, n).astype(np.float32))
    return pa.table(cols)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=N_20M)
    parser.add_argument("--shards", type=int, default=16)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    parts = [shard(rng, args.rows // args.shards + (s < args.rows % args.shards)) for s in range(args.shards)]
    with tempfile.TemporaryDirectory(prefix="recdist-integrity-") as tmp:
        table, write_s = {}, {False: [], True: []}
        for rep in range(2):  # alternated, best of two: the machine is shared
            for checksums in (False, True):
                folder = Path(tmp) / f"scored-{checksums}-{rep}"
                t0 = time.perf_counter()
                for s, part in enumerate(parts):
                    storage.write_parquet(
                        part, str(folder / "ratings" / f"part-{s:05d}.parquet"), write_page_checksum=checksums,
                        **SCORED_PARQUET,
                    )  # fmt: skip
                write_s[checksums].append(time.perf_counter() - t0)
                table[checksums] = str(folder)
        best = {k: min(v) for k, v in write_s.items()}
        data = table[True]
        size = sum(p.stat().st_size for p in Path(data).rglob("*.parquet"))
        print(f"scored table: {args.rows:,} rows, {args.shards} shards, {size / 1e9:.2f} GB")
        print(f"write (Parquet writer only, best of 2): {best[False]:.2f} s without page checksums, "
              f"{best[True]:.2f} s with ({100 * (best[True] / best[False] - 1):+.1f} %)")  # fmt: skip
        t0 = time.perf_counter()
        entries = file_entries(data)
        commit_s = time.perf_counter() - t0
        DatasetManifest(
            n_users=1, n_items=1, n_ratings=args.rows, splits={}, rating_scale=(0.5, 5.0), global_mean=3.5,
            files=entries,
        ).write(data)  # fmt: skip
        print(f"commit: file_entries (rows + sha256): {commit_s:.2f} s ({size / 1e9 / commit_s:.2f} GB/s)")
        check_s = float("inf")
        for _ in range(2):
            t0 = time.perf_counter()
            assert integrity.check(data) == []
            check_s = min(check_s, time.perf_counter() - t0)
        print(f"read: integrity.check (file set, sizes, sha256): {check_s:.2f} s ({size / 1e9 / check_s:.2f} GB/s)")


if __name__ == "__main__":
    main()
