"""The main job: raw ratings -> three RNCF stages (or one model) -> Parquet outputs and report.

For `ray job submit`:

    ray job submit --working-dir . -- python jobs/pipeline.py --config configs/quickstart.yaml --out runs/quickstart

It takes exactly the flags of `recdist pipeline` (see `recdist pipeline --help`) and the same config files.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir, when not pip-installed

from recdist.cli import main  # noqa: E402

if __name__ == "__main__":
    main(["pipeline", *sys.argv[1:]])
