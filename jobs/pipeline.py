"""The main job for `ray job submit`: raw ratings -> three RNCF stages (or one model) -> Parquet outputs, report.

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/pipeline.py --config configs/quickstart.yaml --out runs/quickstart

Exactly the flags and config files of `recdist pipeline`; without --out it writes to $RECDIST_OUT, and
`{date}` in an argument is the run date (see jobs/_entry.py).
"""

from _entry import run

if __name__ == "__main__":
    run("pipeline")
