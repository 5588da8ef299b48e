"""Prepare raw ratings into a sharded Parquet dataset, as a Ray job (the driver does the work, with Polars).

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/prepare.py --config configs/quickstart.yaml --out data/quickstart

Exactly the flags and config files of `recdist prepare` (see jobs/_entry.py for $RECDIST_OUT and `{date}`).
"""

from _entry import run

if __name__ == "__main__":
    run("prepare")
