"""Figures rendered to PNG bytes on matplotlib's Agg canvas: no pyplot, so no global backend state in workers."""

from __future__ import annotations

import io
from typing import Any

from recdist import imports

MODULES = ("matplotlib.figure", "matplotlib.backends.backend_agg")
"""What drawing a figure imports (0.6-0.7 s in a new process)."""


def prefetch() -> None:
    """Start importing MODULES in the background (recdist.imports), ahead of a figure drawn later."""
    imports.prefetch(*MODULES)


def png_bytes(fig: Any, *, tight_bbox: bool = False) -> bytes:
    """The figure as PNG: laid out tight (tight_layout), or cropped to its contents (`tight_bbox`)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    if tight_bbox:
        fig.savefig(buf, format="png", bbox_inches="tight")
    else:
        fig.tight_layout()
        fig.savefig(buf, format="png")
    return buf.getvalue()
