"""Train one model data-parallel on Ray Train, as a Ray job.

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/train.py --config configs/quickstart.yaml --data data/quickstart --stage mf --out runs/mf

Exactly the flags and config files of `recdist train` (see jobs/_entry.py for $RECDIST_OUT and `{date}`).
"""

from _entry import run

if __name__ == "__main__":
    run("train")
