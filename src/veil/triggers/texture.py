"""Texture masks: where an image has enough texture to hide a change (the adaptive backdoor
attack, CMES 2023, section 3.4).

Pure, batched functions of images ``(B, C, H, W)`` in ``[0, 1]``; the filters work on the 0-255
scale, on the luma ``0.299 R + 0.587 G + 0.114 B`` (one mask per image, broadcast to the channels)
or, with ``per_channel=True``, on every channel alone. They return float masks of 0 and 1, shaped
like the input.

* :func:`hill_mask` (eq. 1-3): the HILL steganographic cost (Li et al. 2014). ``R = X * F_h``
  with the high-pass ``F_h = [[-1, 2, -1], [2, -4, 2], [-1, 2, -1]]``; ``rho = 1 / (|R| * F_1 +
  eps)`` with ``F_1`` the 3x3 mean; ``W = rho * F_2`` with ``F_2`` the 15x15 mean; the mask is
  ``W <= T`` (a larger ``T`` gives a larger mask). As the reference HILL code: symmetric padding,
  ``eps = 1e-10`` and the cost capped at ``1e10`` before the 15x15 mean, so within about 7 pixels
  of a perfectly flat pixel the mask is 0.
* :func:`sobel_mask`: the gradient magnitude ``sqrt((X * S_x)^2 + (X * S_y)^2)`` of the Sobel
  filters; the mask is ``G >= T`` (a larger ``T`` gives a smaller mask).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["hill_cost", "hill_mask", "luma", "sobel_magnitude", "sobel_mask"]

_HIGH_PASS = ((-1.0, 2.0, -1.0), (2.0, -4.0, 2.0), (-1.0, 2.0, -1.0))
_SOBEL_X = ((-1.0, 0.0, 1.0), (-2.0, 0.0, 2.0), (-1.0, 0.0, 1.0))
HILL_EPS = 1e-10
HILL_CAP = 1e10


def luma(x: Tensor) -> Tensor:
    """ITU-R 601 luma ``(B, 1, H, W)`` of RGB images (a one-channel image is returned as it is)."""
    if x.dim() != 4:
        raise ValueError(f"images must be (B, C, H, W), got {tuple(x.shape)}")
    if x.shape[1] == 1:
        return x
    if x.shape[1] != 3:
        raise ValueError(f"luma needs 1 or 3 channels, got {x.shape[1]}")
    w = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def _symmetric_index(n: int, p: int, device: torch.device) -> Tensor:
    i = torch.arange(-p, n + p, device=device) % (2 * n)
    return torch.where(i >= n, 2 * n - 1 - i, i)


def _symmetric_pad(x: Tensor, p: int) -> Tensor:
    """numpy's ``symmetric`` padding (the edge repeated, mirrored again past the far edge) by ``p``
    on both spatial sides."""
    if p == 0:
        return x
    h, w = x.shape[-2:]
    x = x.index_select(-2, _symmetric_index(h, p, x.device))
    return x.index_select(-1, _symmetric_index(w, p, x.device))


def _filter(x: Tensor, kernel: Tensor) -> Tensor:
    """``x`` ``(N, 1, H, W)`` correlated with ``kernel`` ``(k, k)``, symmetric padding, same size."""
    k = kernel.shape[-1]
    return F.conv2d(_symmetric_pad(x, k // 2), kernel.view(1, 1, k, k).to(x))


def _planes(x: Tensor, per_channel: bool) -> Tensor:
    """The 0-255 planes ``(B * C', 1, H, W)`` the filters run on (C' = C or 1)."""
    src = x if per_channel else luma(x)
    b, c, h, w = src.shape
    return src.reshape(b * c, 1, h, w).double() * 255.0


def _broadcast(mask: Tensor, x: Tensor, per_channel: bool) -> Tensor:
    b, c, h, w = x.shape
    return mask.view(b, c if per_channel else 1, h, w).expand(b, c, h, w).to(x.dtype)


def hill_cost(x: Tensor, per_channel: bool = False) -> Tensor:
    """HILL's smoothed embedding cost ``W`` (eq. 2) of images in ``[0, 1]``, shaped ``(B, C', H, W)``
    (``C' = 1`` on luma); low where the image is textured."""
    planes = _planes(x, per_channel)
    residual = _filter(planes, torch.tensor(_HIGH_PASS, dtype=torch.float64))
    rho = 1.0 / (_filter(residual.abs(), torch.full((3, 3), 1.0 / 9, dtype=torch.float64)) + HILL_EPS)
    rho = rho.clamp(max=HILL_CAP)
    cost = _filter(rho, torch.full((15, 15), 1.0 / 225, dtype=torch.float64))
    b, c, h, w = x.shape
    return cost.view(b, c if per_channel else 1, h, w)


def hill_mask(x: Tensor, threshold: float = 1.0, per_channel: bool = False) -> Tensor:
    """Eq. 3: 1 where HILL's cost is at most ``threshold``, 0 elsewhere, shaped like ``x``."""
    cost = hill_cost(x, per_channel)
    return _broadcast(cost <= threshold, x, per_channel)


def sobel_magnitude(x: Tensor, per_channel: bool = False) -> Tensor:
    """Sobel gradient magnitude on the 0-255 scale, ``(B, C', H, W)``."""
    planes = _planes(x, per_channel)
    sx = torch.tensor(_SOBEL_X, dtype=torch.float64)
    g = torch.sqrt(_filter(planes, sx) ** 2 + _filter(planes, sx.t().contiguous()) ** 2)
    b, c, h, w = x.shape
    return g.view(b, c if per_channel else 1, h, w)


def sobel_mask(x: Tensor, threshold: float = 10.0, per_channel: bool = False) -> Tensor:
    """1 where the Sobel gradient magnitude is at least ``threshold``, 0 elsewhere, shaped like ``x``."""
    return _broadcast(sobel_magnitude(x, per_channel) >= threshold, x, per_channel)
