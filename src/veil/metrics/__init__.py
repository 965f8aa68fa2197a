"""Metrics as pure tensor functions: clean accuracy, attack success rate and stealth metrics.

- :mod:`veil.metrics.classification`: :func:`accuracy`, :func:`attack_success_rate`,
  :func:`per_label_success_rate`.
- :mod:`veil.metrics.image`: MSE, PSNR and SSIM on the 0-255 scale (and SSIM as the
  ATTEQ release measures it), L1, L-infinity, the
  modification histogram of Zhong et al. (IJCAI 2022).
- :mod:`veil.metrics.lpips`: LPIPS (alex, v0.1), loaded offline by :func:`load_lpips`.
- :mod:`veil.metrics.stealth`: :func:`stealth_metrics`, which gathers them all into a
  JSON-serialisable dict.

Images are float tensors in ``[0, 1]`` of shape ``(B, C, H, W)`` (or one ``(C, H, W)`` image).
"""

from __future__ import annotations

from veil.metrics.classification import accuracy, attack_success_rate, per_label_success_rate
from veil.metrics.image import (
    l1,
    linf,
    modification_histogram,
    modified_fraction,
    mse,
    psnr,
    ssim,
    ssim_3x3,
)
from veil.metrics.lpips import find_lpips_backbone, load_lpips, lpips_available, lpips_distance
from veil.metrics.stealth import stealth_metrics

__all__ = [
    "accuracy",
    "attack_success_rate",
    "per_label_success_rate",
    "mse",
    "psnr",
    "ssim",
    "ssim_3x3",
    "l1",
    "linf",
    "modification_histogram",
    "modified_fraction",
    "stealth_metrics",
    "load_lpips",
    "lpips_available",
    "lpips_distance",
    "find_lpips_backbone",
]
