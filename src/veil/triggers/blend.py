"""Blended triggers (Chen et al. 2017): ``x' = (1 - alpha) * x + alpha * k``."""

from __future__ import annotations

from torch import Tensor

__all__ = ["blend"]


def blend(x: Tensor, pattern: Tensor, alpha: float | Tensor) -> Tensor:
    """Alpha-blend ``pattern`` into a batch.

    Args:
        x: images ``(B, C, H, W)`` in ``[0, 1]``.
        pattern: ``(C, H, W)`` (or broadcastable) in ``[0, 1]``.
        alpha: blend ratio in ``[0, 1]``; a scalar or a tensor broadcastable to ``x``.

    Returns:
        ``(B, C, H, W)`` in ``[0, 1]``; differentiable in ``x`` (and in ``pattern``/``alpha``).
    """
    k = pattern.to(device=x.device, dtype=x.dtype)
    return (1 - alpha) * x + alpha * k
