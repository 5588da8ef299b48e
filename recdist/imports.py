"""Imports a process will need later, started early in a background thread: a module's first import runs its code
once, and Python's import lock makes a later `import` of it wait for the one in progress instead of running it
again. For imports that take a second or more (torch._dynamo, matplotlib) ahead of work that releases the GIL
meanwhile (Parquet, Polars, PyTorch, the compiled kernels)."""

from __future__ import annotations

import importlib
import sys
import threading


def prefetch(*modules: str) -> None:
    """Import those of `modules` not imported yet, in order, in a background thread. A failing import is skipped
    and left to the foreground's own `import`, which raises it where it is needed."""
    missing = [name for name in modules if name not in sys.modules]
    if missing:
        threading.Thread(target=_import_all, args=(missing,), name="recdist-imports").start()


def _import_all(modules: list[str]) -> None:
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - the foreground import reports it
            continue
