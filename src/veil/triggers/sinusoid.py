"""Sinusoidal signal triggers (SIG, Barni et al. 2019): ``v(i, j) = delta * sin(2 pi j f / m)``."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["add_signal", "horizontal_sinusoid"]


def horizontal_sinusoid(image_shape: tuple[int, int, int], delta: float, freq: float) -> Tensor:
    """The horizontal sinusoid of Barni et al. (2019), eq. (5), as a ``(C, H, W)`` tensor.

    ``v(i, j) = delta * sin(2 * pi * j * freq / m)`` where ``j`` is the column and ``m`` the image
    width; constant along columns and across channels.

    Args:
        image_shape: ``(C, H, W)``.
        delta: amplitude on the ``[0, 1]`` scale (Barni et al.'s 20 grey levels is ``20 / 255``).
        freq: number of periods across the width.
    """
    c, h, w = image_shape
    j = torch.arange(w, dtype=torch.float64)
    row = delta * torch.sin(2 * math.pi * j * freq / w)
    return row.float().view(1, 1, w).expand(c, h, w).clone()


def add_signal(x: Tensor, signal: Tensor) -> Tensor:
    """Add a signal to a batch and clamp to ``[0, 1]``: ``clip(x + v)``; ``(B, C, H, W)``."""
    return (x + signal.to(device=x.device, dtype=x.dtype)).clamp(0, 1)
