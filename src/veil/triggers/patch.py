"""Patch triggers (BadNets): the mask-and-pattern formulation ``x' = (1 - m) * x + m * p``."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["corner_mask", "stamp"]


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
