"""Image grids for records and reports.

Every function here takes images as ``(K, C, H, W)`` tensors, either ``uint8`` in ``[0, 255]`` or
float in ``[0, 1]`` (values outside are clipped), with ``C`` equal to 1 (grayscale) or 3 (RGB).

The standard grid of a run (``samples.png``, also embedded in the HTML report) has three rows:
the clean test images, their poisoned versions, and the amplified residual
``|poisoned - clean|`` (see :func:`amplified_residual`), which makes an invisible trigger visible.

Layout of :func:`image_grid`, so callers can predict the size of the picture: every image is
upscaled by ``scale`` with nearest-neighbour sampling (32x32 becomes 64x64 at ``scale=2``) and
placed in a cell; cells are separated from each other and from the border by ``pad`` pixels of
the background colour. Without labels a grid of rows with ``K_r`` images of size ``H_r x W_r`` is::

    width  = pad + max_r K_r * (W_r * scale + pad)
    height = pad + sum_r (H_r * scale + pad)

With labels, a label column of ``label_width(labels)`` pixels is added on the left.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence

import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

log = logging.getLogger(__name__)

#: background / separator colour of grids
BACKGROUND = (255, 255, 255)
#: colour of row labels
LABEL_COLOUR = (40, 40, 40)


def _as_batch(images: Tensor, what: str = "images") -> Tensor:
    """``(K, C, H, W)`` view of ``images``; a single ``(C, H, W)`` image becomes a batch of one."""
    if not isinstance(images, Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(images).__name__}")
    if images.dim() == 3:
        images = images.unsqueeze(0)
    if images.dim() != 4:
        raise ValueError(f"{what} must have shape (K, C, H, W), got {tuple(images.shape)}")
    if images.shape[1] not in (1, 3):
        raise ValueError(f"{what} must have 1 or 3 channels, got {images.shape[1]} (shape {tuple(images.shape)})")
    return images


def _to_float(images: Tensor) -> Tensor:
    """``uint8`` or float images as ``float32`` in ``[0, 1]`` on the CPU."""
    images = images.detach().cpu()
    if images.dtype == torch.uint8:
        return images.float().div(255.0)
    if not images.is_floating_point():
        raise TypeError(f"images must be uint8 or floating point, got {images.dtype}")
    return images.float().nan_to_num(0.0).clamp(0.0, 1.0)


def _to_uint8_hwc(images: Tensor) -> Tensor:
    """``(K, C, H, W)`` images as ``uint8`` RGB ``(K, H, W, 3)``."""
    if images.dtype == torch.uint8:
        out = images.detach().cpu()
    else:
        out = _to_float(images).mul(255.0).round().to(torch.uint8)
    if out.shape[1] == 1:
        out = out.expand(-1, 3, -1, -1)
    return out.permute(0, 2, 3, 1).contiguous()


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=12)
    except TypeError:  # Pillow < 10.1 has no size argument
        return ImageFont.load_default()


def label_width(labels: Sequence[str] | None, pad: int = 2) -> int:
    """Width in pixels of the label column :func:`image_grid` adds for ``labels`` (0 without)."""
    if not labels:
        return 0
    font = _font()
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    widest = max(draw.textlength(str(text), font=font) for text in labels)
    return int(widest + 0.999) + 4 * pad


def image_grid(
    rows: Sequence[Tensor],
    labels: Sequence[str] | None = None,
    scale: int = 2,
    pad: int = 2,
) -> Image.Image:
    """Lay out rows of images as one RGB picture.

    Args:
        rows: one ``(K, C, H, W)`` tensor per row (``uint8`` or float in ``[0, 1]``). Rows may
            hold different numbers or sizes of images; a row with ``K == 0`` is left blank.
        labels: optional text per row, drawn left of the row with PIL's default font.
        scale: integer nearest-neighbour upscaling factor (default 2, so 32x32 images show at
            64x64).
        pad: separator width in pixels between cells and around the border (default 2).

    Returns:
        A ``PIL.Image.Image`` in mode ``"RGB"``; see the module docstring for its size. Use
        :func:`png_bytes` to encode it.

    Example:
        >>> grid = image_grid([torch.zeros(4, 3, 32, 32, dtype=torch.uint8)], scale=2, pad=2)
        >>> grid.size
        (266, 68)
    """
    if not rows:
        raise ValueError("image_grid needs at least one row")
    if labels is not None and len(labels) != len(rows):
        raise ValueError(f"got {len(labels)} labels for {len(rows)} rows")
    if int(scale) != scale or scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale}")
    if pad < 0:
        raise ValueError(f"pad must be non-negative, got {pad}")
    scale = int(scale)
    batches = [_to_uint8_hwc(_as_batch(row, f"row {i}")) for i, row in enumerate(rows)]

    left = label_width(labels, pad)
    row_heights = [b.shape[1] * scale for b in batches]
    width = pad + max(b.shape[0] * (b.shape[2] * scale + pad) for b in batches) + left
    height = pad + sum(h + pad for h in row_heights)
    canvas = Image.new("RGB", (max(width, 1), max(height, 1)), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font = _font() if labels else None

    y = pad
    for r, batch in enumerate(batches):
        k, h, w, _ = batch.shape
        if k:
            # upscale the whole row at once: (K, H, W, 3) -> (K, H*s, W*s, 3)
            big = batch.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2).numpy()
            x = left + pad
            for i in range(k):
                canvas.paste(Image.fromarray(big[i], mode="RGB"), (x, y))
                x += w * scale + pad
        if labels is not None and font is not None:
            text = str(labels[r])
            top, bottom = draw.textbbox((0, 0), text, font=font)[1::2]
            ty = y + max(0, (h * scale - (bottom - top)) // 2) - top
            draw.text((2 * pad, ty), text, fill=LABEL_COLOUR, font=font)
        y += row_heights[r] + pad
    return canvas


def png_bytes(image: Image.Image) -> bytes:
    """Encode a PIL image as PNG bytes (no metadata)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def residual_gain(clean: Tensor, poisoned: Tensor) -> float:
    """The gain :func:`amplified_residual` uses by default: ``1 / max |poisoned - clean|`` over the
    whole batch (residual in ``[0, 1]`` units), or ``1.0`` if the images are identical."""
    clean_f, poisoned_f = _pair(clean, poisoned)
    peak = float((poisoned_f - clean_f).abs().max()) if clean_f.numel() else 0.0
    return 1.0 / peak if peak > 0 else 1.0


def _pair(clean: Tensor, poisoned: Tensor) -> tuple[Tensor, Tensor]:
    clean_b, poisoned_b = _as_batch(clean, "clean"), _as_batch(poisoned, "poisoned")
    if clean_b.shape != poisoned_b.shape:
        raise ValueError(f"clean {tuple(clean_b.shape)} and poisoned {tuple(poisoned_b.shape)} differ in shape")
    return _to_float(clean_b), _to_float(poisoned_b)


def amplified_residual(clean: Tensor, poisoned: Tensor, gain: float | None = None) -> Tensor:
    """``|poisoned - clean|`` amplified for display.

    The residual is taken per channel in ``[0, 1]`` units (``uint8`` inputs are divided by 255),
    multiplied by ``gain`` and clipped to ``[0, 1]``.

    Args:
        clean: ``(K, C, H, W)`` or ``(C, H, W)`` clean images, ``uint8`` or float in ``[0, 1]``.
        poisoned: the poisoned versions, same shape (dtype may differ).
        gain: fixed amplification factor (e.g. ``10.0``; use one to compare runs by eye). By
            default (``None``) the gain is ``1 / max`` of the residual over the whole batch (see
            :func:`residual_gain`), so the largest change in the batch shows at full brightness
            and the relative sizes of changes are kept. An all-zero residual stays black.

    Returns:
        A ``float32`` tensor in ``[0, 1]`` with the shape of ``clean``, on the CPU.
    """
    clean_f, poisoned_f = _pair(clean, poisoned)
    if gain is None:
        gain = residual_gain(clean_f, poisoned_f)
    elif not gain > 0:
        raise ValueError(f"gain must be positive, got {gain}")
    out = (poisoned_f - clean_f).abs().mul_(float(gain)).clamp_(0.0, 1.0)
    return out.reshape(clean.shape) if clean.dim() == 3 else out


def sample_grid(
    clean: Tensor,
    poisoned: Tensor,
    gain: float | None = None,
    scale: int = 2,
    labels: bool = True,
) -> Image.Image:
    """The standard three-row grid: clean, poisoned and amplified residual images.

    Args:
        clean, poisoned: ``(K, C, H, W)`` images, ``uint8`` or float in ``[0, 1]``.
        gain: residual gain (see :func:`amplified_residual`); the gain used is written in the
            residual row's label.
        scale: nearest-neighbour upscaling factor.
        labels: draw row labels ("clean", "poisoned", "|diff| xN") on the left.
    """
    used_gain = residual_gain(clean, poisoned) if gain is None else float(gain)
    residual = amplified_residual(clean, poisoned, used_gain)
    names = ["clean", "poisoned", f"|diff| x{used_gain:.3g}"] if labels else None
    return image_grid([_as_batch(clean), _as_batch(poisoned), residual], labels=names, scale=scale)


def sample_grid_png(
    clean: Tensor,
    poisoned: Tensor,
    gain: float | None = None,
    scale: int = 2,
    labels: bool = True,
) -> bytes:
    """:func:`sample_grid` encoded as PNG bytes (what a run writes as ``samples.png``)."""
    return png_bytes(sample_grid(clean, poisoned, gain=gain, scale=scale, labels=labels))
