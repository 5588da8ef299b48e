"""The whole nightly run, warm against cold, on two days of a synthetic set: wall seconds per stage and in total.

    .venv/bin/python bench/nightly.py                      # 20,000,263 synthetic ratings (the ML-20M shape)
    .venv/bin/python bench/nightly.py --ratings 1000000    # a quicker look

Day 1 = the synthetic set (recdist.data.synth) minus its latest 2% of ratings by timestamp (new users and movies
among them); day 2 = all of it. Each day is prepared as a nightly job prepares it (`recdist prepare`, day 2 with
`--previous` day 1), then `recdist pipeline --data DAY` runs with configs/ml20m-cpu.yaml's stages: day 1 cold, day
2 cold, and day 2 warm from day 1's run (`--warm-start`). Every command runs in a fresh process, timed from spawn
to exit (interpreter, imports, every stage). The nightly job's time is day 2's prepare plus its pipeline. Goal
(issue 16): the warm nightly run takes <= 50% of a cold one's time on the 20M set.

`--fold-in` makes the warm run a fold-in (`--set pipeline.warm.fold_in=true`: only new and changed users and new
movies train, over their rows). `--one-command` times the night as the Kubernetes manifests run it instead: one
`recdist pipeline --path DAY
--out PARENT/date=...` per night, its own prepare stage included, day 2 cold and day 2 `--warm-start auto` (whose
prepare keeps day 1's dataset's indices and splits, as `--previous` does); the job is that one command.

`--ratings-file PATH --config CONFIG` runs it on real ratings instead (e.g. ../shared/data/ml-latest-small/ratings.csv
with configs/ml-latest-small.yaml). With `--one-command` it also prints how much of each user's top-10 each day-2
run changed against day 1's (recdist.drift).

This VM's speed drifts by 20-40% within an hour, enough to move one bench's ratio by 0.1. `--repeat N` runs day 2's
prepare, cold and warm runs N times, alternating which of cold and warm goes first, and prints each repeat's ratio
and the medians (the verdict is the median's).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

GOAL = 0.5
CONFIG = ROOT / "configs" / "ml20m-cpu.yaml"
STAGES = ("mf", "reliability", "rating", "outputs")


def recdist(*args: str) -> float:
    """`python -m recdist ARGS --quiet` in a fresh process; its wall seconds (exits on failure)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "recdist", *args, "--quiet"], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"recdist {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratings", type=int, help="synthetic ratings (default: the synth section's, 20,000,263)")
    ap.add_argument("--latest", type=float, default=0.02, help="share of the latest ratings day 1 lacks")
    ap.add_argument("--workdir", default="/tmp/recdist-bench/nightly", help="working directory (replaced)")
    ap.add_argument("--repeat", type=int, default=1, help="day 2's prepare, cold and warm runs this many times")
    ap.add_argument("--one-command", action="store_true", help="each night one pipeline command with its own prepare")
    ap.add_argument("--fold-in", action="store_true", help="the warm run a fold-in (pipeline.warm.fold_in: true)")
    ap.add_argument("--ratings-file", help="real ratings instead (a ratings.csv: userId,movieId,rating,timestamp)")
    ap.add_argument("--config", default=str(CONFIG), help="the runs' config (default configs/ml20m-cpu.yaml)")
    args = ap.parse_args()
    config = Path(args.config)

    import polars as pl

    from recdist.config import SynthConfig
    from recdist.data.synth import generate

    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    synth = SynthConfig() if args.ratings is None else SynthConfig(
        n_ratings=args.ratings,
        n_users=max(100, int(138_493 * args.ratings / 20_000_263)),
        n_items=max(100, int(26_744 * args.ratings / 20_000_263)),
    )  # fmt: skip
    ratings = pl.read_csv(args.ratings_file) if args.ratings_file else generate(synth)[0]
    cut = ratings["timestamp"].sort()[int(ratings.height * (1 - args.latest))]
    ratings.filter(pl.col("timestamp") < cut).write_parquet(work / "day1.parquet")
    ratings.write_parquet(work / "day2.parquet")
    changed = what_changed(ratings, cut)
    del ratings
    load_before = os.getloadavg()[0]

    def prepare(day: str, *extra: str) -> float:
        out = str(work / f"{day}-data")
        return recdist("prepare", "--config", str(config), "--path", str(work / f"{day}.parquet"), "--out", out, *extra)

    def pipeline(name: str, day: str, *extra: str) -> float:
        return recdist("pipeline", "--config", str(config), "--data", str(work / f"{day}-data"),
                       "--out", str(work / name), *extra)  # fmt: skip

    def night(name: str, day: str, *extra: str) -> float:  # the manifests' one command, prepare inside
        return recdist("pipeline", "--config", str(config), "--path", str(work / f"{day}.parquet"),
                       "--out", str(work / name), *extra)  # fmt: skip

    if args.one_command:  # day 1 beside the warm day 2 (what `auto` finds), the cold day 2 apart
        night("warm/date=2026-12-01", "day1")
        names, stages_shown = ("cold/date=2026-12-02", "warm/date=2026-12-02"), ("prepare", *STAGES)
    else:
        prepare("day1")
        pipeline("day1", "day1")
        names, stages_shown = ("day2-cold", "day2-warm"), STAGES
    repeats: list[dict[str, float]] = []  # per repeat: prepare, the two commands' wall and every stage's seconds
    for i in range(max(1, args.repeat)):
        for name in names:
            shutil.rmtree(work / name, ignore_errors=True)
        figures = {"prepare": 0.0}  # --one-command: inside each command
        if not args.one_command:
            figures["prepare"] = prepare("day2", "--previous", str(work / "day1-data"), "--overwrite")
        for name in names if i % 2 == 0 else names[::-1]:  # alternate which goes first: drift hits both alike
            warm = name == names[1]
            fold_in = ("--set", "pipeline.warm.fold_in=true") if args.fold_in else ()
            if args.one_command:
                figures[name] = night(name, "day2", *(("--warm-start", "auto", *fold_in) if warm else ()))
            else:
                start = ("--warm-start", str(work / "day1"), *fold_in) if warm else ()
                figures[name] = pipeline(name, "day2", *start)
            stages = json.loads((work / name / "manifest.json").read_text())["stages"]
            figures.update({f"{name}:{stage}": float(stages[stage]["seconds"]) for stage in stages_shown})
        repeats.append(figures)

    def median(key: str) -> float:
        return statistics.median(r[key] for r in repeats)

    def ratio(r: dict[str, float]) -> float:
        return (r["prepare"] + r[names[1]]) / (r["prepare"] + r[names[0]])

    metrics = {name: json.loads((work / name / "outputs" / "metrics.json").read_text()) for name in names}
    day2_data = work / names[0] / "data" if args.one_command else work / "day2-data"
    n = json.loads((day2_data / "manifest.json").read_text())["n_ratings"]
    print(f"\nNightly run on day 2: {n:,} ratings ({args.latest:.0%} newer than day 1), {os.cpu_count()} CPUs, "
          f"config {config.name}; load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after")  # fmt: skip
    if len(repeats) > 1:
        print(f"{len(repeats)} repeats, cold and warm alternating which runs first; seconds are medians over them")
    prepared = median("prepare")
    print("\n| seconds | cold | warm | warm / cold |\n|---|---:|---:|---:|")
    if not args.one_command:
        print(f"| prepare (`--previous` day 1; the same for both) | {prepared:.1f} | {prepared:.1f} | 1.00 |")
    for stage in stages_shown:
        c, w = (median(f"{name}:{stage}") for name in names)
        print(f"| {stage} | {c:.1f} | {w:.1f} | {w / c:.2f} |")
    cold, warm = median(names[0]), median(names[1])
    print(f"| pipeline command, wall | {cold:.1f} | {warm:.1f} | {warm / cold:.2f} |")
    ratios = [ratio(r) for r in repeats]
    job = statistics.median(ratios)
    job_name = "one pipeline command" if args.one_command else "prepare + pipeline"
    print(f"| **nightly job** ({job_name}) | **{prepared + cold:.1f}** | **{prepared + warm:.1f}** | "
          f"**{job:.2f}** |")  # fmt: skip
    if len(repeats) > 1:
        print(f"\nthe nightly job's warm / cold in each repeat: {', '.join(f'{x:.2f}' for x in ratios)}")
    print(
        f"\nwhat changed: day 2's {changed['new_ratings']:,} new ratings come from {changed['users']:,} users "
        f"({changed['users'] / changed['all_users']:.1%} of {changed['all_users']:,}; {changed['new_users']:,} of them "
        f"new), whose ratings are {changed['rows'] / n:.1%} of day 2's rows: all a night that redid only what changed "
        "would touch"
    )
    epochs = [json.loads((work / name / "mf" / "model" / "metrics.json").read_text())["epochs"] for name in names]
    print(f"\nstage-1 epochs: cold {epochs[0]}, warm {epochs[1]}{' (a fold-in)' if args.fold_in else ''}")
    for name, m in metrics.items():
        ndcg = m["ranking"]
        print(f"{name}: test RMSE stage 1 {m['mf']['test']['rmse']:.4f}, stage 3 {m['rating']['test']['rmse']:.4f}; "
              f"NDCG@10 {ndcg['rating']['ndcg@10']:.4f} (popularity {ndcg['popularity']['ndcg@10']:.4f})")  # fmt: skip
    if args.one_command:  # how much of each user's top-10 each day-2 run changed (recdist.drift, against day 1)
        from recdist.drift import compare

        for name in names:
            top = compare(str(work / "warm/date=2026-12-01/outputs"), str(work / name / "outputs"))["top10"]
            print(f"{name}: each user's top-10 against day 1's: mean overlap@10 {top['mean']:.4f}, "
                  f"{top['unchanged_share']:.1%} of the lists unchanged")  # fmt: skip
    verdict = "met" if job <= GOAL else "NOT MET"
    what = "the median of the repeats" if len(repeats) > 1 else "one run each"
    print(f"\nwarm / cold, the whole nightly job: {job:.2f}, {what} (goal <= {GOAL}): {verdict}")


def what_changed(ratings, cut: int) -> dict[str, int]:
    """Day 2's ratings newer than day 1 (timestamp >= cut): how many, from how many users (how many of them new),
    and how many day-2 rows those users hold."""
    import polars as pl

    newer = pl.col("timestamp") >= cut
    users = ratings.filter(newer)["userId"].unique()
    known = ratings.filter(~newer)["userId"].unique()
    return {
        "new_ratings": int(ratings.filter(newer).height),
        "users": users.len(),
        "new_users": int((~users.is_in(known.implode())).sum()),
        "all_users": int(ratings["userId"].n_unique()),
        "rows": int(ratings["userId"].is_in(users.implode()).sum()),
    }


if __name__ == "__main__":
    main()
