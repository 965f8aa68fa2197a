"""Warping triggers (WaNet, Nguyen & Tran, ICLR 2021).

The backdoor warping field follows the paper (Sec. 3.2) and its official code: a random
``k x k x 2`` field ``P`` with entries in ``[-1, 1]``, normalised by its mean absolute value,
upsampled bicubically to ``H x W``, scaled by the strength ``s`` and the image size, added to the
identity sampling grid, rescaled and clamped to ``[-1, 1]``::

    grid = clamp((identity + s * upsample(P / mean|P|) / size) * grid_rescale, -1, 1)
    x'   = grid_sample(x, grid, align_corners=True)

Grids are ``(1, H, W, 2)`` (or ``(B, H, W, 2)``) in :func:`torch.nn.functional.grid_sample`'s
convention: the last axis holds the normalised ``(x, y)`` = (column, row) coordinates.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["identity_grid", "noise_grid", "perturb_grid", "warp", "warping_grid"]


def identity_grid(height: int, width: int) -> Tensor:
    """The identity sampling grid ``(1, H, W, 2)`` with ``align_corners=True`` coordinates."""
    ys = torch.linspace(-1, 1, steps=height)
    xs = torch.linspace(-1, 1, steps=width)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack((gx, gy), dim=-1).unsqueeze(0)


def noise_grid(k: int, height: int, width: int, generator: torch.Generator) -> Tensor:
    """WaNet's random control field: ``(1, 2, k, k)`` uniform in ``[-1, 1]``, divided by its mean
    absolute value, bicubically upsampled (``align_corners=True``) to ``(1, H, W, 2)``."""
    ins = torch.rand((1, 2, k, k), generator=generator) * 2 - 1
    ins = ins / ins.abs().mean()
    up = F.interpolate(ins, size=(height, width), mode="bicubic", align_corners=True)
    return up.permute(0, 2, 3, 1).contiguous()


def warping_grid(identity: Tensor, noise: Tensor, s: float, grid_rescale: float = 1.0) -> Tensor:
    """The backdoor sampling grid ``clamp((identity + s * noise / size) * grid_rescale, -1, 1)``.

    The noise's x offsets are divided by the width and its y offsets by the height (the official
    code divides both by the height; identical for square images).
    """
    h, w = identity.shape[1], identity.shape[2]
    scale = torch.tensor([w, h], dtype=identity.dtype, device=identity.device)
    return ((identity + s * noise.to(identity) / scale) * grid_rescale).clamp(-1, 1)


def perturb_grid(grid: Tensor, n: int, generator: torch.Generator | None = None) -> Tensor:
    """WaNet's noise mode: ``n`` copies of ``grid`` each shifted by its own uniform random field in
    ``[-1, 1] / size`` (about one pixel), clamped to ``[-1, 1]``; ``(n, H, W, 2)``."""
    h, w = grid.shape[1], grid.shape[2]
    ins = torch.rand((n, h, w, 2), generator=generator) * 2 - 1
    scale = torch.tensor([w, h], dtype=grid.dtype)
    return (grid.cpu() + ins.to(grid.dtype) / scale).clamp(-1, 1).to(grid.device)


def warp(x: Tensor, grid: Tensor) -> Tensor:
    """Resample a batch ``(B, C, H, W)`` through ``grid`` (``(1 or B, H, W, 2)``) bilinearly with
    ``align_corners=True``; differentiable in ``x``."""
    g = grid.to(device=x.device, dtype=x.dtype)
    if g.shape[0] == 1 and x.shape[0] != 1:
        g = g.expand(x.shape[0], -1, -1, -1)
    return F.grid_sample(x, g, mode="bilinear", padding_mode="zeros", align_corners=True)
