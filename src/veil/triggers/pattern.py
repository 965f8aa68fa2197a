"""Trigger patterns: seeded random noise, smooth random images, checkerboards and user images.

Every function returns a float tensor ``(C, H, W)`` in ``[0, 1]`` quantised to the 8-bit grid, so a
pattern saved in a run record and reloaded is bit-identical to the one used to poison.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from veil.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = ["checkerboard", "load_image", "smooth_noise", "uniform_noise"]


def _q(x: Tensor) -> Tensor:
    return x.clamp(0, 1).mul(255.0).round().div(255.0)


def uniform_noise(shape: tuple[int, int, int], generator: torch.Generator) -> Tensor:
    """I.i.d. uniform noise in ``[0, 1]`` of ``shape`` ``(C, H, W)``, quantised to 8 bits."""
    return _q(torch.rand(shape, generator=generator))


def smooth_noise(shape: tuple[int, int, int], generator: torch.Generator, grid: int = 4) -> Tensor:
    """A smooth random image: uniform noise on a ``grid x grid`` lattice, bicubically upsampled to
    ``(H, W)``, clamped and quantised. Its energy sits in the lowest frequencies.

    Args:
        shape: ``(C, H, W)``.
        generator: the source of randomness.
        grid: lattice size (coarser lattice, smoother image).
    """
    c, h, w = shape
    coarse = torch.rand((1, c, grid, grid), generator=generator)
    return _q(F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=True)[0])


def checkerboard(shape: tuple[int, int, int], first_white: bool = True) -> Tensor:
    """A one-pixel black/white checkerboard ``(C, H, W)``; the top-left pixel is white when
    ``first_white``."""
    c, h, w = shape
    ii = torch.arange(h).view(h, 1)
    jj = torch.arange(w).view(1, w)
    board = ((ii + jj) % 2 == (0 if first_white else 1)).float()
    return board.expand(c, h, w).clone()


def load_image(path: str | Path, shape: tuple[int, int, int]) -> Tensor:
    """Read an image file with PIL and resize it (bilinear) to ``shape`` ``(C, H, W)``.

    One-channel shapes read the image as greyscale, three-channel shapes as RGB.

    Raises:
        ConfigError: the file is missing or not an image PIL can read, or ``C`` is not 1 or 3.
    """
    from PIL import Image, UnidentifiedImageError

    c, h, w = shape
    if c not in (1, 3):
        raise ConfigError(f"image patterns need 1 or 3 channels, got {c}")
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"trigger image {str(p)!r} not found")
    try:
        with Image.open(p) as img:
            img = img.convert("L" if c == 1 else "RGB").resize((w, h), Image.BILINEAR)
            data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    except (UnidentifiedImageError, OSError) as exc:
        raise ConfigError(f"cannot read trigger image {str(p)!r}: {exc}") from exc
    log.debug("loaded trigger image %s as %s", p, shape)
    return data.view(h, w, c).permute(2, 0, 1).float().div(255.0).contiguous()
