"""Analyses of trained classifiers.

==================  =========================================================================
module              what it provides
==================  =========================================================================
:mod:`.fourier`     Fourier bases, Fourier heatmaps (Yin et al. 2019), top-k frequency masks
                    and the heatmap figure (Hammoud & Ghanem 2021, section 3 and Figure 3)
==================  =========================================================================
"""

from __future__ import annotations

from veil.analysis.fourier import (
    conjugate_index,
    conjugate_mirror,
    fourier_basis,
    fourier_heatmap,
    heatmap_figure,
    load_heatmap,
    save_heatmap,
    top_k_mask,
)

__all__ = [
    "conjugate_index",
    "conjugate_mirror",
    "fourier_basis",
    "fourier_heatmap",
    "heatmap_figure",
    "load_heatmap",
    "save_heatmap",
    "top_k_mask",
]
