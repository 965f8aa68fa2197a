"""Reports on run records: image grids and one self-contained HTML page.

- :mod:`veil.report.images`: :func:`image_grid`, :func:`amplified_residual` and
  :func:`sample_grid_png` (the clean / poisoned / residual grid a run saves as ``samples.png``).
- :mod:`veil.report.html`: :func:`write_report`, an offline HTML report across finished runs.

matplotlib is imported only when a report draws a chart.
"""

from __future__ import annotations

from veil.report.html import render_report, write_report
from veil.report.images import (
    amplified_residual,
    image_grid,
    png_bytes,
    residual_gain,
    sample_grid,
    sample_grid_png,
)

__all__ = [
    "amplified_residual",
    "image_grid",
    "png_bytes",
    "render_report",
    "residual_gain",
    "sample_grid",
    "sample_grid_png",
    "write_report",
]
