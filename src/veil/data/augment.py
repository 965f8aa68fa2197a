"""Batched training augmentation as tensor operations on the training device.

The standard CIFAR recipe (random crop with 4-pixel zero padding, horizontal flip) applied to a
whole batch at once instead of per-sample PIL transforms. Flips are only used where they keep the
label (never for traffic signs, where a flip turns "keep left" into "keep right").
"""

from __future__ import annotations

import torch
from torch import Tensor

#: zero padding of the trainer's random crop (the standard CIFAR recipe); a crop shifts the image
#: by up to this many pixels in each direction
CROP_PADDING = 4


def random_crop(x: Tensor, padding: int, generator: torch.Generator | None = None) -> Tensor:
    """Random crop of every image in ``x`` (B, C, H, W) after zero padding by ``padding``."""
    if padding <= 0:
        return x
    b, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (padding, padding, padding, padding))
    dev = x.device
    ox = torch.randint(0, 2 * padding + 1, (b,), generator=generator).to(dev)
    oy = torch.randint(0, 2 * padding + 1, (b,), generator=generator).to(dev)
    rows = (oy[:, None] + torch.arange(h, device=dev)[None, :])  # (B, H)
    cols = (ox[:, None] + torch.arange(w, device=dev)[None, :])  # (B, W)
    bi = torch.arange(b, device=dev)[:, None, None]
    # gather (B, C, H, W): index padded[b, :, rows[b, i], cols[b, j]]
    out = padded.permute(0, 2, 3, 1)[bi, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()


def random_hflip(x: Tensor, p: float = 0.5, generator: torch.Generator | None = None) -> Tensor:
    """Flip each image horizontally with probability ``p``."""
    flip = (torch.rand(x.shape[0], generator=generator) < p).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(3), x)


class BatchAugment:
    """Random crop with padding and (optionally) horizontal flip on a float batch in ``[0, 1]``."""

    def __init__(self, padding: int = CROP_PADDING, hflip: bool = True) -> None:
        self.padding = padding
        self.hflip = hflip

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        x = random_crop(x, self.padding, generator)
        if self.hflip:
            x = random_hflip(x, 0.5, generator)
        return x

    def __repr__(self) -> str:
        return f"BatchAugment(padding={self.padding}, hflip={self.hflip})"
