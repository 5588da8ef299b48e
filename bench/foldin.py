"""A fold-in night against a plain warm start: stage 1 on day 2, its seconds, the rows it trains and its test RMSE.

    .venv/bin/python bench/nightly.py --one-command          # first: day 1, and day 2 cold and warm
    .venv/bin/python bench/foldin.py --repeat 3               # then this, on the same working directory

A fold-in (`pipeline.warm.fold_in: true`) trains only what changed since day 1: new users, users whose training
ratings differ, and new movies, over their rows alone; every other user and movie keeps day 1's factors and bias
(and the global mean stays day 1's). The plain warm start trains every row from day 1's tables. Each repeat runs
both as the pipeline's stage 1 does (`train_stage`, this process, Ray Train's local mode), alternating which goes
first, and prints the medians beside day 2's cold run's test RMSE (issue 16's goal for a warm night: within
0.002 of it) and the share of day 2's ratings whose stage-1 prediction the fold-in left exactly as day 1's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/recdist-bench/nightly", help="bench/nightly.py --one-command's")
    ap.add_argument("--repeat", type=int, default=1, help="fits of each kind, alternating which goes first")
    args = ap.parse_args()

    from recdist import logs
    from recdist.config import ClusterConfig, load_config
    from recdist.train.run import train_stage
    from recdist.train.warm import stage_source

    logs.setup(quiet=True)
    work = Path(args.workdir)
    day1, day2 = work / "warm" / "date=2026-12-01", work / "warm" / "date=2026-12-02"
    cold = work / "cold" / "date=2026-12-02"
    if not all((run / "outputs" / "_SUCCESS").exists() for run in (day1, day2, cold)):
        sys.exit(f"no nightly runs under {work}: run `bench/nightly.py --one-command --workdir {work}` first")
    cfg = load_config(str(day2 / "config.yaml"))
    source = stage_source(str(day1), "mf").to_json()
    kinds = {"warm start": cfg.pipeline.warm.model_copy(update={"fold_in": False}),
             "fold-in": cfg.pipeline.warm.model_copy(update={"fold_in": True})}  # fmt: skip
    runs: dict[str, list[dict]] = {kind: [] for kind in kinds}
    for i in range(max(1, args.repeat)):
        for kind in list(kinds) if i % 2 == 0 else list(kinds)[::-1]:
            out = work / "foldin" / kind.replace(" ", "-")
            clock = time.perf_counter()
            m = train_stage(str(day2 / "data"), cfg.stages.slot("mf"), ClusterConfig(workers=1), str(out),
                            warm_start=source, warm=kinds[kind], overwrite=True)  # fmt: skip
            runs[kind].append({"seconds": time.perf_counter() - clock, "metrics": m, "out": out})
    cold_rmse = json.loads((cold / "mf" / "model" / "metrics.json").read_text())["test"]["rmse"]
    same = unchanged_share(day1, day2, runs["fold-in"][-1]["out"])
    print(f"\nstage 1 on day 2 from day 1's model, {args.repeat} fit(s) of each, medians (this process, 2 CPUs)")
    print("\n| stage 1 on day 2 | seconds | epochs | test RMSE | against cold |\n|---|---:|---:|---:|---:|")
    cold_epochs = json.loads((cold / "mf" / "model" / "metrics.json").read_text())["epochs"]
    print(f"| cold (the nightly's run) | | {cold_epochs} | {cold_rmse:.4f} | |")
    for kind, fits in runs.items():
        m = fits[-1]["metrics"]
        seconds = statistics.median(f["seconds"] for f in fits)
        print(f"| {kind} | {seconds:.1f} | {m['epochs']} | {m['test']['rmse']:.4f} | "
              f"{m['test']['rmse'] - cold_rmse:+.4f} |")  # fmt: skip
    fold = runs["fold-in"][-1]["metrics"]
    print(f"\nthe fold-in left {same:.1%} of day 2's ratings with day 1's stage-1 prediction, to the bit")
    verdict = "met" if abs(fold["test"]["rmse"] - cold_rmse) <= 0.002 else "NOT MET"
    print(f"fold-in within 0.002 of the cold run's test RMSE: {verdict}")


def unchanged_share(day1: Path, day2: Path, model: Path) -> float:
    """The share of day 2's ratings whose user and movie rows (factors, bias) and the global mean are day 1's, so
    whose prediction is: both models' tables compared row by row, by original id."""
    import torch

    from recdist.data import dataset
    from recdist.models.io import load_model
    from recdist.train.warm import previous_rows

    before, after = (load_model(str(m)).state_dict() for m in (day1 / "mf" / "model", model))
    if not torch.equal(before["global_mean"], after["global_mean"]):
        return 0.0
    same = {}
    for side in ("user", "item"):
        ids = [getattr(dataset, f"read_{side}s")(str(d / "data")).sort(f"{side}_idx")[f"{side}_id"].to_numpy()
               for d in (day1, day2)]  # fmt: skip
        rows = previous_rows(*ids)
        known = rows >= 0
        kept = known.copy()  # a new user or movie has no day-1 row
        for table in (f"{side}_factors.weight", f"{side}_bias.weight"):
            now, then = after[table][torch.from_numpy(known)], before[table][torch.from_numpy(rows[known])]
            kept[known] &= (now == then).reshape(len(now), -1).all(1).numpy()
        same[side] = kept
    ratings = dataset.read_rank(str(day2 / "data"), columns=["user_idx", "item_idx"])
    return float((same["user"][ratings["user_idx"].to_numpy()] & same["item"][ratings["item_idx"].to_numpy()]).mean())


if __name__ == "__main__":
    main()
