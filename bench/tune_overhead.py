"""What a `recdist tune` trial costs: a 3-trial search of biased_mf (10 epochs each) on ml-latest-small.

    nice -n 10 .venv/bin/python bench/tune_overhead.py                        # this tree
    PYTHONPATH=/path/to/other/tree nice -n 10 .venv/bin/python bench/tune_overhead.py   # another version

On its own local Ray cluster of 2 CPUs (bench/accuracy.py's split, seed 42); prints trials.parquet's rows (wall
seconds per trial) and the search's wall time, best/ not retrained. The first trial is the stage's own settings:
its validation RMSE is the same whichever way a version runs its trials.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from accuracy import DEFAULT_DATA, prepare  # noqa: E402

SPACE = {
    "train.epochs": 10,
    "params.reg": 0.08,
    "params.reg_bias": 0.01,
    "train.lr_schedule": None,
    "params.rank": [32, 64],
    "train.lr": {"loguniform": [0.005, 0.02]},
}


def main() -> None:
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    import polars as pl
    import ray

    import recdist
    from recdist.config import ClusterConfig, StageConfig, TuneBudget
    from recdist.tune.search import tune_stage

    print("recdist from", Path(recdist.__file__).parent, flush=True)
    with tempfile.TemporaryDirectory(prefix="recdist-bench-tune-overhead-") as tmp:
        data = prepare(Path(DEFAULT_DATA), 42, os.path.join(tmp, "data"))
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
        out = os.path.join(tmp, "tune")
        stage = StageConfig(model="biased_mf", train={"patience": 0})
        budget = TuneBudget(trials=3, grace_epochs=10, space=SPACE)
        started = time.perf_counter()
        tune_stage(data, stage, ClusterConfig(), out, budget=budget, retrain_best=False, overwrite=True)
        wall = time.perf_counter() - started
        trials = pl.read_parquet(os.path.join(out, "trials.parquet"))
    print(trials.select("trial_id", "status", "val_rmse", "epochs", "seconds"))
    print(
        f"search wall {wall:.1f} s; trial seconds median {trials['seconds'].median():.1f}; "
        f"load average {os.getloadavg()[0]:.0f}"
    )


if __name__ == "__main__":
    main()
