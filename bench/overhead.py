"""Where the quickstart's wall seconds go: per stage, compute against everything else, and the whole command's
wall time in a fresh process (interpreter, imports and Ray start-up included).

    .venv/bin/python bench/overhead.py                        # configs/quickstart.yaml, once
    .venv/bin/python bench/overhead.py --repeat 3 --json before.json

Each run is `python -m recdist pipeline --config CONFIG --out OUT` (the README's command) in a fresh process, timed
from spawn to exit. The split comes from what the run writes: RUN/manifest.json (each stage's wall seconds),
RUN/<stage>/model/metrics.json `overhead` (rank 0's fit: start = controller, worker processes, imports and
process group; data load; setup = model, upstream, solver; compute = the epochs with their validation and the
final evaluation; report = Ray Train reports and checkpoints between epochs; stop = the final report and
checkpoint and the controller's shutdown; commit = writing the model directory) and the stage's `scoring`
figures (Ray Data: actor start-up before the first shard, actor compute from the first shard's start to the last
one's end, the stage-1 session context pass). "other" is the stage's remainder: input checks, committing the
scored table and the stage. prepare and outputs run no Ray: all of their time counts as compute here.

Goals (issue 15): the quickstart end to end <= 40 s on 2 cores; per-stage overhead (wall - compute) <= 5 s.
The machine is shared: the load average (1 min) is printed before and after every run.
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
GOALS = {"end_to_end_s": 40.0, "stage_overhead_s": 5.0}
MODEL_STAGES = ("mf", "reliability", "rating", "single")
COLUMNS = ("start", "data_load", "setup", "report", "stop", "commit", "score_start", "other")


def run_once(config: str, out: Path, extra: list[str]) -> dict:
    """One fresh-process pipeline run; its wall time, load averages and the per-stage split."""
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"}
    cmd = [sys.executable, "-m", "recdist", "pipeline", "--config", config, "--out", str(out), *extra]
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"pipeline failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    manifest = json.loads((out / "manifest.json").read_text())
    stages = {name: split(out, name, float(info["seconds"])) for name, info in manifest["stages"].items() if info}
    outside = wall - sum(s["wall"] for s in stages.values())
    return {
        "end_to_end_s": round(wall, 2),
        "load_before": round(load_before, 2),
        "load_after": round(os.getloadavg()[0], 2),
        "outside_stages_s": round(outside, 2),
        "stages": stages,
    }


def split(run: Path, name: str, wall: float) -> dict:
    """A stage's wall seconds as compute + the overhead columns (all seconds)."""
    row = {"wall": wall, **{c: 0.0 for c in COLUMNS}}
    if name not in MODEL_STAGES:
        return {**row, "compute": wall, "overhead": 0.0}
    metrics = json.loads((run / name / "model" / "metrics.json").read_text())
    fit = metrics.get("overhead") or {}
    scoring = json.loads((run / name / "manifest.json").read_text()).get("scoring") or {}
    compute = fit.get("compute_s", 0.0)
    for key in ("start", "data_load", "setup", "report", "stop", "commit"):
        row[key] = float(fit.get(f"{key}_s", 0.0))
    row["start_in_process"] = float(fit.get("process_s", 0.0))  # part of start, not a column of its own
    row["checkpoints"] = int(fit.get("checkpoints", 0))
    score_compute = float(scoring.get("actor_seconds", scoring.get("seconds", 0.0)))
    score_compute += float(scoring.get("session_seconds", 0.0))
    row["score_start"] = float(scoring.get("startup_seconds", 0.0))
    compute += score_compute
    known = compute + sum(row[c] for c in COLUMNS if c != "other")
    row["other"] = max(0.0, wall - known)
    row.update(compute=compute, overhead=wall - compute, fit=float(fit.get("fit_s", 0.0)), score_compute=score_compute)
    return row


def _verdict(value: float, limit: float) -> str:
    return "met" if round(value, 1) <= limit else "NOT MET"


def print_run(figures: dict, title: str) -> None:
    print(
        f"\n{title}: {figures['end_to_end_s']:.1f} s end to end (load average {figures['load_before']:.1f} "
        f"before, {figures['load_after']:.1f} after); outside the stages (interpreter, imports, Ray start "
        f"and shutdown) {figures['outside_stages_s']:.1f} s"
    )
    head = ["stage", "wall", "compute", "overhead", *COLUMNS]
    print("\n| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for name, row in figures["stages"].items():
        cells = [f"{row[k]:.1f}" for k in ("wall", "compute", "overhead", *COLUMNS)]
        print(f"| {name} | " + " | ".join(cells) + " |")
    notes = [
        f"{name}: {row['start_in_process']:.1f} s of start in the worker process, {row['checkpoints']} checkpoint(s)"
        for name, row in figures["stages"].items()
        if "checkpoints" in row
    ]
    if notes:
        print("\n" + "; ".join(notes))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "quickstart.yaml"))
    ap.add_argument("--out", default="/tmp/recdist-bench/overhead", help="run directory (replaced)")
    ap.add_argument("--repeat", type=int, default=1, help="runs, one after the other")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    ap.add_argument("--json", help="also write every run's figures here")
    ap.add_argument("--quiet", action="store_true", help="run the pipeline with --quiet (no per-epoch lines)")
    args = ap.parse_args()
    extra = [x for kv in args.set for x in ("--set", kv)] + (["--quiet"] if args.quiet else [])

    runs = []
    for i in range(args.repeat):
        figures = run_once(args.config, Path(args.out), extra)
        runs.append(figures)
        print_run(figures, f"run {i + 1}/{args.repeat}")
    walls = [r["end_to_end_s"] for r in runs]
    worst = max(row["overhead"] for r in runs for row in r["stages"].values())
    best_runs_worst = min(max(row["overhead"] for row in r["stages"].values()) for r in runs)
    median = statistics.median(walls)
    print(
        f"\nend to end: median {median:.1f} s, min {min(walls):.1f} s over {len(walls)} run(s) "
        f"(goal <= {GOALS['end_to_end_s']:.0f} s): {_verdict(median, GOALS['end_to_end_s'])}"
    )
    limit = GOALS["stage_overhead_s"]
    verdict = _verdict(worst, limit) if worst <= limit or best_runs_worst > limit else "NOT MET in the worst run"
    print(
        f"largest per-stage overhead: {best_runs_worst:.1f} s in the best run, {worst:.1f} s in the worst "
        f"(goal <= {limit:.0f} s): {verdict}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"config": args.config, "set": args.set, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
