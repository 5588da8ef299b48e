"""Batch inference with Ray Data (Parquet in, Parquet out with prediction columns), as a Ray job.

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/infer.py --model runs/mf --data data/quickstart --out runs/mf-scored

Exactly the flags of `recdist infer` (see jobs/_entry.py for $RECDIST_OUT and `{date}`).
"""

from _entry import run

if __name__ == "__main__":
    run("infer")
