"""Patch triggers (BadNets): the mask-and-pattern formulation ``x' = (1 - m) * x + m * p``."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["corner_mask", "crop_survival", "stamp"]


def corner_mask(image_shape: tuple[int, int, int], size: int, margin: int = 0) -> Tensor:
    """A ``(1, H, W)`` binary mask of a ``size x size`` square at the bottom-right corner, ``margin``
    pixels from the right and bottom edges."""
    _, h, w = image_shape
    if size <= 0 or size + margin > min(h, w) or margin < 0:
        raise ValueError(f"a {size}x{size} patch {margin} px from the edge does not fit a {h}x{w} image")
    mask = torch.zeros(1, h, w)
    mask[:, h - margin - size : h - margin, w - margin - size : w - margin] = 1.0
    return mask


def stamp(x: Tensor, mask: Tensor, pattern: Tensor) -> Tensor:
    """Stamp ``pattern`` where ``mask`` is on: ``(1 - m) * x + m * p``.

    Args:
        x: images ``(B, C, H, W)`` in ``[0, 1]``.
        mask: ``(1, H, W)`` or ``(C, H, W)`` in ``[0, 1]`` (fractional values blend).
        pattern: ``(C, H, W)`` in ``[0, 1]``.

    Returns:
        ``(B, C, H, W)``; differentiable in ``x``.
    """
    m = mask.to(device=x.device, dtype=x.dtype)
    p = pattern.to(device=x.device, dtype=x.dtype)
    return x * (1 - m) + m * p


def crop_survival(image_shape: tuple[int, int, int], size: int, margin: int, padding: int) -> tuple[float, float]:
    """How a bottom-right ``size x size`` patch ``margin`` pixels from the edges fares under a random
    crop with ``padding`` pixels of zero padding (offsets uniform in ``0..2 * padding`` per axis, as
    :func:`veil.data.augment.random_crop` draws them), when the patch is stamped before the crop.

    Returns:
        ``(whole, gone)``: the shares of crops in which the patch is entirely inside the crop, and in
        which none of it is. A horizontal flip moves the patch but never cuts it, so it changes
        neither share. Example: a 3x3 patch in the corner of a 32x32 image under the standard
        4-pixel crop is whole in 25/81 of the crops and gone in 32/81.
    """
    _, h, w = image_shape
    corner_mask(image_shape, size, margin)  # same checks
    if padding < 0:
        raise ValueError(f"crop padding must be >= 0, got {padding}")

    def axis(n: int) -> tuple[float, float]:
        lo, hi = n - margin - size, n - margin - 1  # the patch's first and last row (or column)
        offsets = range(2 * padding + 1)  # the crop shows rows o - padding .. o - padding + n - 1
        whole = sum(o - padding <= lo and o - padding + n - 1 >= hi for o in offsets)
        gone = sum(o - padding + n - 1 < lo or o - padding > hi for o in offsets)
        return whole / len(offsets), gone / len(offsets)

    (wr, gr), (wc, gc) = axis(h), axis(w)
    return wr * wc, 1.0 - (1.0 - gr) * (1.0 - gc)
