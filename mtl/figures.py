"""Figures for reports: matplotlib on the Agg backend (no display needed), rendered to PNG bytes.

Reports build the bytes first and write them with `mtl.atomic.write_bytes_atomic`, so a figure is never half written.
"""

from __future__ import annotations

import io
from typing import Any


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (imported on first use: most runs draw nothing)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    return plt


def png_bytes(fig: Any, dpi: int = 110) -> bytes:
    """The figure as PNG bytes; the figure is closed (pyplot keeps every open figure alive otherwise)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    pyplot().close(fig)
    return buffer.getvalue()
