"""All stealth metrics of a trigger in one JSON-serialisable dict.

:func:`stealth_metrics` gathers the image distances of :mod:`veil.metrics.image` and, when a
model is given, LPIPS (:mod:`veil.metrics.lpips`); it is what a run records under ``stealth``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from veil.metrics.image import (
    _SSIM_WIN,
    _pair,
    l1,
    linf,
    mse,
    modification_histogram,
    modified_fraction,
    psnr,
    ssim,
    ssim_3x3,
)
from veil.metrics.lpips import lpips_distance

__all__ = ["stealth_metrics"]


def _finite_mean(values: Tensor) -> float | None:
    finite = values[torch.isfinite(values)]
    return float(finite.double().mean().item()) if finite.numel() else None


def stealth_metrics(clean: Tensor, poisoned: Tensor, lpips_model: torch.nn.Module | None = None) -> dict[str, Any]:
    """All stealth metrics between clean images and their triggered versions, as plain Python values.

    Keys (all JSON-serialisable; per-image metrics are averaged over the batch):

    - ``"psnr"``: mean PSNR in dB over the images that were modified. Unmodified images have an
      infinite PSNR; they are left out of the mean (as a per-image average otherwise becomes
      ``inf``) and counted in ``"identical_fraction"``. ``None`` when no image was modified.
    - ``"identical_fraction"``: share of images left bit-for-bit unchanged (PSNR ``inf``).
    - ``"ssim"``: mean SSIM (:func:`ssim`); ``None`` for images smaller than 11x11.
    - ``"ssim_3x3"``: mean SSIM as the ATTEQ release measures it (:func:`ssim_3x3`: 3x3 uniform
      window, the clean image's range); ``None`` for images smaller than 3x3.
    - ``"mse"``: mean MSE on the 0-255 scale; ``"l1"``: mean L1 on ``[0, 1]``;
      ``"l1_grey_levels"``: the same in grey levels, the L1 of Zhong et al. (IJCAI 2022, Table 2).
    - ``"linf"``: largest modification over the whole batch, in grey levels (``int``).
    - ``"lpips"``: mean LPIPS (:func:`veil.metrics.lpips.lpips_distance`), ``None`` when
      ``lpips_model`` is ``None``. The model must be on the images' device.
    - ``"modified_fraction"``: see :func:`modified_fraction`.
    - ``"histogram"``: see :func:`modification_histogram` (percentages).

    Args:
        clean: clean images in ``[0, 1]``, ``(B, C, H, W)`` or ``(C, H, W)``.
        poisoned: triggered images of the same shape.
        lpips_model: a model from :func:`veil.metrics.lpips.load_lpips`, or ``None`` to skip LPIPS.

    Example:
        >>> x = torch.rand(4, 3, 32, 32)
        >>> sorted(stealth_metrics(x, x.clamp(0.1, 0.9)))[:4]
        ['histogram', 'identical_fraction', 'l1', 'linf']
    """
    clean, poisoned = _pair(clean, poisoned)
    if clean.shape[0] == 0 or clean.numel() == 0:
        raise ValueError("stealth metrics of an empty batch are undefined")
    p = psnr(clean, poisoned)
    small = clean.shape[-1] < _SSIM_WIN or clean.shape[-2] < _SSIM_WIN
    lpips_value: float | None = None
    if lpips_model is not None:
        lpips_value = float(lpips_distance(lpips_model, clean, poisoned).double().mean().item())
    return {
        "psnr": _finite_mean(p),
        "identical_fraction": float(torch.isinf(p).double().mean().item()),
        "ssim": None if small else float(ssim(clean, poisoned).double().mean().item()),
        "ssim_3x3": None if min(clean.shape[-2:]) < 3 else float(ssim_3x3(clean, poisoned).double().mean().item()),
        "mse": float(mse(clean, poisoned).double().mean().item()),
        "l1": float(l1(clean, poisoned).double().mean().item()),
        "l1_grey_levels": float(l1(clean, poisoned).double().mean().item()) * 255.0,
        "linf": int(linf(clean, poisoned).max().item()),
        "lpips": lpips_value,
        "modified_fraction": modified_fraction(clean, poisoned),
        "histogram": modification_histogram(clean, poisoned),
    }
