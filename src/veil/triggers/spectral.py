"""Frequency-domain triggers (FIBA, Feng et al., CVPR 2022).

FIBA blends the low-frequency part of an image's amplitude spectrum with a trigger image's and keeps
the image's phase (eq. 2-4 of the paper), per channel::

    X = FFT2(x),   A = |X|,   P = angle(X)
    A' = (1 - alpha * M) * A + alpha * M * A_t      # M: centred low-frequency square
    x' = clamp(Re(IFFT2(A' * exp(i P))), 0, 1)

``M`` is the square of side ``floor(beta * min(H, W))`` centred on the zero frequency after
``fftshift`` (rows ``H//2 - side//2`` to ``H//2 - side//2 + side - 1`` in shifted coordinates),
returned in unshifted FFT order by :func:`low_frequency_mask`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["amplitude_blend", "amplitude_spectrum", "low_frequency_mask"]

_EPS = 1e-12


def low_frequency_mask(height: int, width: int, beta: float) -> Tensor:
    """``(H, W)`` 0/1 mask of the centred low-frequency square of side ``max(1, floor(beta *
    min(H, W)))``, in unshifted FFT order (the zero frequency at ``[0, 0]``)."""
    side = max(1, math.floor(beta * min(height, width)))
    mask = torch.zeros(height, width)
    r0 = height // 2 - side // 2
    c0 = width // 2 - side // 2
    mask[r0 : r0 + side, c0 : c0 + side] = 1.0
    return torch.fft.ifftshift(mask, dim=(-2, -1))


def amplitude_spectrum(x: Tensor) -> Tensor:
    """Per-channel amplitude spectrum ``|FFT2(x)|`` over the last two axes (unshifted)."""
    return torch.fft.fft2(x, dim=(-2, -1)).abs()


def amplitude_blend(x: Tensor, trigger_amplitude: Tensor, alpha: float, mask: Tensor) -> Tensor:
    """Blend the masked amplitude spectrum of ``x`` towards ``trigger_amplitude``, keeping the phase.

    Args:
        x: images ``(B, C, H, W)`` in ``[0, 1]``.
        trigger_amplitude: ``(C, H, W)`` amplitude spectrum of the trigger image (unshifted).
        alpha: blend ratio in ``[0, 1]``.
        mask: ``(H, W)`` frequency mask in unshifted order (see :func:`low_frequency_mask`).

    Returns:
        ``Re(IFFT2(A' exp(iP)))`` of shape ``(B, C, H, W)``, *not* clamped; differentiable in ``x``.
        Where the image has no energy at a frequency its phase is undefined and taken as 0.
    """
    spec = torch.fft.fft2(x, dim=(-2, -1))
    amp = spec.abs()
    safe = amp > _EPS
    unit = torch.where(safe, spec / amp.clamp_min(_EPS), torch.ones_like(spec))
    m = mask.to(device=x.device, dtype=x.dtype)
    at = trigger_amplitude.to(device=x.device, dtype=x.dtype)
    new_amp = amp + alpha * m * (at - amp)
    return torch.fft.ifft2(new_amp * unit, dim=(-2, -1)).real
