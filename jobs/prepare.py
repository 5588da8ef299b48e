"""Prepare raw ratings into a sharded Parquet dataset.

For `ray job submit`:

    ray job submit --working-dir . -- python jobs/prepare.py --config configs/quickstart.yaml --out data/quickstart

It takes exactly the flags of `recdist prepare` (see `recdist prepare --help`) and the same config files.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir, when not pip-installed

from recdist.cli import main  # noqa: E402

if __name__ == "__main__":
    main(["prepare", *sys.argv[1:]])
