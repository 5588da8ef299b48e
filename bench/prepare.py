"""Time `recdist prepare` on the synthetic ml-20m CSV (20,000,263 ratings) into 8 shards.

    .venv/bin/python bench/prepare.py                # full size (target: <= 15 s wall, <= 4 GiB peak)
    .venv/bin/python bench/prepare.py --rows 1000000 # a smaller run

The synthetic release is written once by recdist.data.synth.write_synthetic and reused from the cache
directory printed. Each repeat prepares it in a fresh subprocess, which reports the wall time of
`prepare()` alone (imports excluded), its peak RSS (the kernel's high-water mark, ru_maxrss) and rows/s.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

CHILD = "--child"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=20_000_263, help="synthetic ratings (default: ml-20m's count)")
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=1, help="timed runs (each in a fresh process)")
    ap.add_argument("--cache", default=os.environ.get("RECDIST_BENCH_DIR", "/tmp/recdist-bench"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config overrides")
    args = ap.parse_args()

    source = os.path.join(args.cache, f"synth-{args.rows}")
    out = os.path.join(args.cache, f"prepared-{args.rows}")
    _ensure_synthetic(args.rows, source)
    print(f"source: {source} ({os.path.getsize(os.path.join(source, 'ratings.csv')) / 2**20:,.0f} MiB CSV)")
    print(f"output: {out}   cores: {os.cpu_count()} (shared with other jobs: figures may be pessimistic)")
    for i in range(args.repeat):
        t0 = time.perf_counter()
        child = subprocess.run(
            [sys.executable, __file__, CHILD, source, out, str(args.shards), *args.set],
            check=True, capture_output=True, text=True,
        )
        total = time.perf_counter() - t0
        result = json.loads(child.stdout.strip().splitlines()[-1])
        sys.stderr.write(child.stderr)
        print(
            f"run {i + 1}: prepare {result['seconds']:.2f} s wall ({total:.2f} s with interpreter start), "
            f"peak RSS {result['peak_rss_gib']:.2f} GiB, {result['rows'] / result['seconds'] / 1e6:.2f} M rows/s, "
            f"{result['rows']:,} rows -> {args.shards} shards ({result['mib']:.0f} MiB Parquet)"
        )


def _ensure_synthetic(rows: int, source: str) -> None:
    from recdist.config import SynthConfig
    from recdist.data.synth import MARKER, write_synthetic

    if os.path.exists(os.path.join(source, MARKER)):
        return
    share = rows / 20_000_263
    cfg = SynthConfig(
        n_ratings=rows,
        n_users=max(50, round(138_493 * share)),
        n_items=max(50, round(26_744 * share**0.5)),
    )
    t0 = time.perf_counter()
    write_synthetic(cfg, source, overwrite=True, progress=True)
    print(f"wrote the synthetic release in {time.perf_counter() - t0:.1f} s")


def _child(source: str, out: str, shards: str, overrides: list[str]) -> None:
    from recdist.config import load_config, parse_override
    from recdist.data.prepare import prepare

    cfg = load_config(
        None, {"source.path": source, "prepare.shards": int(shards), **dict(map(parse_override, overrides))}
    )
    t0 = time.perf_counter()
    manifest = prepare(cfg, out, overwrite=True, progress=True)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    folder = os.path.join(out, "ratings")
    mib = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)) / 2**20
    print(json.dumps({"seconds": seconds, "peak_rss_gib": peak / 2**30, "rows": manifest["n_ratings"], "mib": mib}))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == CHILD:
        _child(*sys.argv[2:5], sys.argv[5:])
    else:
        main()
