"""What every job entrypoint shares: recdist importable from the working dir, `--out` from $RECDIST_OUT, `{date}`.

A job's arguments are exactly the `recdist <command>` flags. Two additions for scheduled runs, resolved here on
the cluster so no shell (the submitter's or the head's) has to expand anything:
  - without `--out`, the output is $RECDIST_OUT (the Kubernetes manifests set it from a ConfigMap);
  - `{date}` in any argument becomes the run date, YYYY-MM-DD: $RECDIST_RUN_DATE if set, else today in UTC.
"""

from __future__ import annotations

import os
import re
import sys
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT_ENV, DATE_ENV = "RECDIST_OUT", "RECDIST_RUN_DATE"


def job_args(argv: list[str], env: dict[str, str]) -> list[str]:
    """The CLI arguments for `argv`: --out added from $RECDIST_OUT when absent, `{date}` filled in."""
    args = list(argv)
    has_out = any(a in ("--out", "-o") or a.startswith("--out=") for a in args)
    if not has_out and env.get(OUT_ENV):
        args += ["--out", env[OUT_ENV]]
    date = env.get(DATE_ENV) or datetime.now(timezone.utc).strftime("%Y-%m-%d")
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", date):
        print(f"error: {DATE_ENV}={date!r} is not a date\n  fix:   write it as YYYY-MM-DD", file=sys.stderr)
        sys.exit(2)
    return [a.replace("{date}", date) for a in args]


def run(command: str) -> None:
    """`recdist <command> ARGS` in this process (the Ray job's driver); exit status 2 on user errors."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))  # the uploaded working dir, when recdist is not pip-installed
    from recdist.cli import main

    main([command, *job_args(sys.argv[1:], dict(os.environ))])
