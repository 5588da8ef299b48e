"""Batch inference with Ray Data: Parquet in, Parquet out.

For `ray job submit`:

    ray job submit --working-dir . -- python jobs/infer.py --model runs/mf --data data/quickstart --out runs/mf-scored

It takes exactly the flags of `recdist infer` (see `recdist infer --help`) and the same config files.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir, when not pip-installed

from recdist.cli import main  # noqa: E402

if __name__ == "__main__":
    main(["infer", *sys.argv[1:]])
