"""Input transformations shared by augmentations and pre-processing defenses.

:func:`jpeg` is the JPEG compression of Section 5.4 of the frequency-domain backdoor paper
("Defending against frequency-based backdoor attacks"): the defender compresses every input before
classification, which removes the high-frequency content a frequency trigger lives in; the attacker
answers by training on JPEG-compressed images (:mod:`veil.augment`).
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image
from torch import Tensor


def _check_quality(quality: Tensor) -> None:
    if quality.numel() and (int(quality.min()) < 1 or int(quality.max()) > 100):
        bad = quality[(quality < 1) | (quality > 100)][0].item()
        raise ValueError(f"JPEG quality must be an integer in 1..100, got {bad}")


def jpeg(x: Tensor, quality: int | Tensor, subsampling: int | None = None) -> Tensor:
    """Compress every image of a batch as JPEG with Pillow and decode it back.

    The images are first quantised to 8 bits (as a saved image would be), encoded in memory at the
    given quality and decoded again; the result is what a model would see after the image was
    stored as a ``.jpg`` file. Not differentiable.

    Args:
        x: float images ``(B, C, H, W)`` in ``[0, 1]`` with ``C`` 1 (grayscale) or 3 (RGB); a single
            ``(C, H, W)`` image is accepted too. Values outside ``[0, 1]`` are clamped.
        quality: JPEG quality in ``1..100`` (libjpeg scale; 100 is the least lossy), either one
            integer for the whole batch or an integer tensor of shape ``(B,)`` with one quality
            per image.
        subsampling: chroma subsampling passed to Pillow (0: 4:4:4, 1: 4:2:2, 2: 4:2:0);
            ``None`` keeps Pillow's default, 4:2:0, which is what common JPEG writers use.

    Returns:
        Float images of the same shape, device and dtype as ``x``, in ``[0, 1]`` on the 8-bit grid.

    Raises:
        ValueError: a quality outside ``1..100``, a ``(B,)`` quality tensor of the wrong length,
            or an unsupported channel count.

    Example:
        >>> x = torch.rand(2, 3, 32, 32)
        >>> jpeg(x, 90).shape
        torch.Size([2, 3, 32, 32])
    """
    single = x.dim() == 3
    if single:
        x = x.unsqueeze(0)
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"jpeg needs images (B, C, H, W) with 1 or 3 channels, got shape {tuple(x.shape)}")
    b = x.shape[0]
    q = torch.as_tensor(quality).detach().cpu()
    if q.is_floating_point() and not bool((q == q.round()).all()):
        raise ValueError(f"JPEG quality must be an integer in 1..100, got {quality}")
    q = q.long()
    if q.dim() == 0:
        q = q.expand(b)
    elif q.shape != (b,):
        raise ValueError(f"per-image JPEG qualities must have shape ({b},), got {tuple(q.shape)}")
    _check_quality(q)
    if b == 0:
        return x.clone()

    arr = x.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    gray = arr.shape[-1] == 1
    out = np.empty_like(arr)
    kwargs = {} if subsampling is None else {"subsampling": int(subsampling)}
    for i in range(b):
        img = Image.fromarray(arr[i, :, :, 0] if gray else arr[i], mode="L" if gray else "RGB")
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=int(q[i]), **kwargs)
        buf.seek(0)
        with Image.open(buf) as dec:
            dec = dec.convert("L" if gray else "RGB")
            a = np.asarray(dec)
        out[i] = a[..., None] if gray else a
    y = torch.from_numpy(out).permute(0, 3, 1, 2).to(device=x.device, dtype=x.dtype if x.is_floating_point() else torch.float32)
    y = y.div_(255.0).contiguous()
    return y.squeeze(0) if single else y
