"""Time `recdist synth` and `recdist prepare` at ml-20m size: 20,000,263 ratings into the default 8 shards.

    .venv/bin/python bench/prepare.py                 # prepare the cached synthetic release (target: <= 15 s, <= 4 GiB)
    .venv/bin/python bench/prepare.py --time-synth    # also (re)generate it, timed
    .venv/bin/python bench/prepare.py --rows 1000000  # a smaller run

The synthetic release is written by recdist.data.synth.write_synthetic into the cache directory printed and
reused. Every timed step runs in a fresh subprocess, which reports the wall time of the work alone (imports
excluded), its CPU time over all threads (what a busy machine inflates least: on 2 idle cores, wall is
about half of it or more), its peak RSS (the kernel's high-water mark, ru_maxrss) and rows/s.
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
TARGET_SECONDS, TARGET_GIB = 15.0, 4.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=20_000_263, help="synthetic ratings (default: ml-20m's count)")
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=1, help="timed prepare runs (each in a fresh process)")
    ap.add_argument("--time-synth", action="store_true", help="regenerate the synthetic release, timed")
    ap.add_argument("--cache", default=os.environ.get("RECDIST_BENCH_DIR", "/tmp/recdist-bench"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config overrides")
    args = ap.parse_args()

    source = os.path.join(args.cache, f"synth-{args.rows}")
    out = os.path.join(args.cache, f"prepared-{args.rows}")
    print(f"cores: {os.cpu_count()} (shared with other jobs while measured: figures may be pessimistic)")
    if args.time_synth or not os.path.exists(os.path.join(source, "synth.json")):
        r = _run("synth", source, str(args.rows))
        print(
            f"synth: {r['seconds']:.2f} s wall ({r['total']:.2f} s with interpreter start), {r['cpu']:.1f} s CPU, "
            f"peak RSS {r['peak_rss_gib']:.2f} GiB, {r['rows']:,} ratings, {r['users']:,} users, "
            f"{r['items']:,} movies ({r['mib']:.0f} MiB CSV)"
        )
    print(f"source: {source}\noutput: {out}")
    for i in range(args.repeat):
        r = _run("prepare", source, out, str(args.shards), *args.set)
        verdict = "within" if r["seconds"] <= TARGET_SECONDS and r["peak_rss_gib"] <= TARGET_GIB else "OVER"
        print(
            f"prepare run {i + 1}: {r['seconds']:.2f} s wall ({r['total']:.2f} s with interpreter start), "
            f"{r['cpu']:.1f} s CPU, "
            f"peak RSS {r['peak_rss_gib']:.2f} GiB, {r['rows'] / r['seconds'] / 1e6:.2f} M rows/s, "
            f"{r['rows']:,} rows -> {args.shards} shards ({r['mib']:.0f} MiB Parquet); "
            f"{verdict} the target of {TARGET_SECONDS:g} s and {TARGET_GIB:g} GiB"
        )


def _run(*child_args: str) -> dict:
    """One step in a fresh interpreter; its last stdout line is the JSON it measured."""
    t0 = time.perf_counter()
    child = subprocess.run([sys.executable, __file__, CHILD, *child_args], capture_output=True, text=True)
    sys.stderr.write(child.stderr)
    if child.returncode:
        sys.exit(f"{child_args[0]} failed with exit code {child.returncode}")
    return {**json.loads(child.stdout.strip().splitlines()[-1]), "total": time.perf_counter() - t0}


def _synth(source: str, rows: str) -> dict:
    from recdist.config import SynthConfig
    from recdist.data.synth import write_synthetic

    share = int(rows) / 20_000_263
    cfg = SynthConfig(
        n_ratings=int(rows), n_users=max(50, round(138_493 * share)), n_items=max(50, round(26_744 * share**0.5))
    )
    t0, cpu0 = time.perf_counter(), _cpu()
    summary = write_synthetic(cfg, source, overwrite=True)
    seconds, cpu = time.perf_counter() - t0, _cpu() - cpu0
    mib = os.path.getsize(os.path.join(source, "ratings.csv")) / 2**20
    return {
        "seconds": seconds, "cpu": cpu, "peak_rss_gib": _peak_gib(), "rows": summary["n_ratings"],
        "users": summary["n_users"], "items": summary["n_items"], "mib": mib,
    }  # fmt: skip


def _prepare(source: str, out: str, shards: str, *overrides: str) -> dict:
    from recdist.config import load_config, parse_override
    from recdist.data.prepare import prepare

    cfg = load_config(
        None, {"source.path": source, "prepare.shards": int(shards), **dict(map(parse_override, overrides))}
    )
    t0, cpu0 = time.perf_counter(), _cpu()
    manifest = prepare(cfg, out, overwrite=True)
    seconds, cpu = time.perf_counter() - t0, _cpu() - cpu0
    folder = os.path.join(out, "ratings")
    mib = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)) / 2**20
    return {"seconds": seconds, "cpu": cpu, "peak_rss_gib": _peak_gib(), "rows": manifest["n_ratings"], "mib": mib}


def _cpu() -> float:
    """CPU seconds of this process, all threads: what other jobs on the machine cannot inflate."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == CHILD:
        from recdist import logs

        logs.setup()  # the step's own lines (each timed step) on stderr, which the parent passes on
        step = {"synth": _synth, "prepare": _prepare}[sys.argv[2]]
        print(json.dumps(step(*sys.argv[3:])))
    else:
        main()
