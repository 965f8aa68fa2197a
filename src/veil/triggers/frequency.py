"""The frequency-domain trigger of Hammoud & Ghanem (2021), "Check Your Other Door! Creating
Backdoor Attacks in the Frequency Domain" (arXiv:2109.05507), section 4, stage 2, eq. (4)-(6).

Per channel ``c`` the components of the image's spectrum at the selected frequencies ``M`` (the
top-k of a Fourier heatmap, closed under conjugate symmetry) are **replaced** by one real value
``A_c``; every other component is kept::

    X_c = FFT2(x_c)                       (orthonormal DFT, fftshift-ed coordinates)
    X'_c = A_c          on M
    X'_c = X_c          outside M
    x'_c = clamp(Re(IFFT2(X'_c)), 0, 1)

Why replacement and not eq. (4)-(6) as printed: the printed ``F^-1(F(S) . M + A)`` multiplies the
spectrum by the 0/1 mask ``M``, which would delete every frequency *outside* the top-k (the image
would become ``k`` cosines), whereas the text says the method "simply swap[s] or chang[es] the
value of the components of the top-k most sensitive 2D Fourier Bases". Replacement is the printed
formula with ``M`` complemented, ``F(S) . (1 - M) + A`` with ``A`` zero outside ``M`` (eq. 3).

Realness: ``M`` is closed under conjugate symmetry and ``A_c`` is real, so ``X'_c`` stays
conjugate-symmetric and the inverse DFT is real up to round-off; the real part is taken.

Units: the DFT is orthonormal (``norm="ortho"``), so by Parseval a value ``a`` at a pair of
conjugate frequencies is a cosine of L2 norm ``sqrt(2) |a|`` (``|a|`` for a self-conjugate
frequency) on the ``[0, 1]`` scale, whatever the image size.

Masks use the fftshift-ed index convention of :mod:`veil.analysis.fourier` (zero frequency at
``(H // 2, W // 2)``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from veil.analysis.fourier import conjugate_mirror

__all__ = ["frequency_trigger", "replace_spectrum"]


def _check(x: Tensor, mask: Tensor, values: Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"images must be (B, C, H, W), got {tuple(x.shape)}")
    if mask.shape != x.shape[-2:]:
        raise ValueError(f"mask must be (H, W) = {tuple(x.shape[-2:])}, got {tuple(mask.shape)}")
    if values.shape != x.shape[1:2]:
        raise ValueError(f"values must hold one real value per channel ({x.shape[1]},), got {tuple(values.shape)}")
    if values.is_complex():
        raise ValueError("values must be real (a complex value would make the image complex)")
    m = mask.bool()
    if not torch.equal(m, conjugate_mirror(m)):
        raise ValueError("the frequency mask must be closed under conjugate symmetry (see veil.analysis.top_k_mask)")


def replace_spectrum(x: Tensor, mask: Tensor, values: Tensor) -> Tensor:
    """The spectrum of the triggered images, before the inverse DFT.

    Args:
        x: images ``(B, C, H, W)``.
        mask: ``(H, W)`` bool (or 0/1) mask of the selected frequencies, fftshift-ed, closed under
            conjugate symmetry.
        values: ``(C,)`` real value ``A_c`` per channel (orthonormal-DFT units).

    Returns:
        Complex ``(B, C, H, W)`` orthonormal spectrum, **unshifted** (ready for
        ``torch.fft.ifft2(..., norm="ortho")``), equal to ``values[c]`` on ``mask`` and to the
        spectrum of ``x`` elsewhere. Differentiable in ``x``.
    """
    _check(x, mask, values)
    spec = torch.fft.fft2(x, dim=(-2, -1), norm="ortho")
    m = torch.fft.ifftshift(mask.to(device=x.device).bool(), dim=(-2, -1))
    a = values.to(device=x.device, dtype=x.dtype).view(1, -1, 1, 1).to(spec.dtype)
    return torch.where(m, a, spec)


def frequency_trigger(x: Tensor, mask: Tensor, values: Tensor, clamp: bool = True) -> Tensor:
    """Replace the selected frequencies of every channel by that channel's value (eq. 4-6 read as
    replacement; see the module docstring).

    Args:
        x: float images ``(B, C, H, W)`` in ``[0, 1]``.
        mask: ``(H, W)`` fftshift-ed frequency mask closed under conjugate symmetry.
        values: ``(C,)`` real values ``A_c``.
        clamp: clamp the result to ``[0, 1]``.

    Returns:
        ``(B, C, H, W)`` real images (the real part of the inverse DFT, whose imaginary part is
        round-off), clamped to ``[0, 1]`` unless ``clamp=False``; differentiable in ``x``.

    Example:
        >>> from veil.analysis import top_k_mask
        >>> mask = top_k_mask(torch.rand(32, 32), k=4)
        >>> out = frequency_trigger(torch.full((2, 3, 32, 32), 0.5), mask, torch.tensor([0.2, -0.1, 0.05]))
        >>> out.shape
        torch.Size([2, 3, 32, 32])
    """
    out = torch.fft.ifft2(replace_spectrum(x, mask, values), dim=(-2, -1), norm="ortho").real.to(x.dtype)
    return out.clamp(0, 1) if clamp else out
