"""Train one model data-parallel on Ray Train.

For `ray job submit`:

    ray job submit --working-dir . -- python jobs/train.py --data data/quickstart --model biased_mf --out runs/mf

It takes exactly the flags of `recdist train` (see `recdist train --help`) and the same config files.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir, when not pip-installed

from recdist.cli import main  # noqa: E402

if __name__ == "__main__":
    main(["train", *sys.argv[1:]])
