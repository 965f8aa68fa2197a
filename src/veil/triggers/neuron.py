"""Model-dependent triggers on a mask: the parts ATTEQ (attention mask, neuron-boosted QoE trigger)
shares with its baselines TrojanNN (a trigger that excites a chosen neuron on a fixed mask) and
RobNet (the same on a corner square).

* :func:`attention_mask`: ATTEQ's eq. 5-6: of ``N`` attention maps, the one nearest their mean
  (``H_opt``), and its top ``l * l`` pixels as the mask.
* :func:`corner_mask`: the bottom-right ``l x l`` square (RobNet's and TrojanNN's fixed mask).
* :func:`select_neuron`: the neuron "with the highest number of activations" over clean images
  (the count of ``a_j > 0``, ties by the mean activation), and TrojanNN's rule (the largest sum of
  absolute incoming weights).
* :func:`blend`: ``x_t = (1 - M) x + M ((1 - alpha) delta + alpha x)``, ``alpha`` the transparency.
* :class:`BoostNeuron`: identity forward; backward multiplies the gradient through neuron ``e``
  by ``theta`` (ATTEQ's gradient boosting, ``grad_e := theta grad_e``).
* :func:`optimise_trigger`: eq. 7 and 9 read as ``-a_e(x_t) + eta (1 - SSIM(x, x_t)) + lambda
  ||x_t - x||_inf``, Adam steps on ``delta`` (only the masked pixels move), clamped to ``[0, 1]``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from veil.errors import ConfigError
from veil.metrics.image import ssim


def _check_size(size: int, h: int, w: int) -> None:
    if size < 1 or size > min(h, w):
        raise ConfigError(f"trigger size {size} does not fit {h}x{w} images (it must be 1 to {min(h, w)})")


def nearest_to_mean(maps: Tensor) -> int:
    """Index of the map (``(N, H, W)``) nearest, in L2, to the mean of all ``N`` (eq. 6's ``H_opt``)."""
    mean = maps.mean(0, keepdim=True)
    return int((maps - mean).flatten(1).pow(2).sum(1).argmin())


def attention_mask(maps: Tensor, size: int, image_hw: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """``(mask, H_opt)``: the maps ``(N, h, w)`` upsampled bilinearly to ``image_hw``, ``H_opt`` the
    one nearest their mean, the mask ``(H, W)`` its top ``size * size`` pixels (exactly that many;
    ties go to the lower flat index)."""
    h, w = image_hw
    _check_size(size, h, w)
    up = F.interpolate(maps.float().unsqueeze(1), size=(h, w), mode="bilinear", align_corners=False).squeeze(1)
    heat = up[nearest_to_mean(up)]
    mask = torch.zeros(h * w)
    order = torch.argsort(heat.flatten(), descending=True, stable=True)
    mask[order[: size * size]] = 1.0
    return mask.view(h, w), heat


def corner_mask(size: int, image_hw: tuple[int, int]) -> Tensor:
    """The bottom-right ``size x size`` square as an ``(H, W)`` mask."""
    h, w = image_hw
    _check_size(size, h, w)
    mask = torch.zeros(h, w)
    mask[h - size :, w - size :] = 1.0
    return mask


def select_neuron(features: Tensor) -> int:
    """The neuron (column of ``features``, ``(N, D)``) active (``> 0``) on the most rows; ties by
    the mean activation."""
    counts = (features > 0).sum(0)
    best = torch.nonzero(counts == counts.max()).flatten()
    return int(best[features[:, best].double().mean(0).argmax()])


def select_neuron_by_weights(weight: Tensor) -> int:
    """TrojanNN's rule: the output unit (row of ``weight``, any trailing shape) with the largest sum
    of absolute incoming weights."""
    return int(weight.detach().abs().flatten(1).sum(1).argmax())


def blend(x: Tensor, delta: Tensor, mask: Tensor, transparency: float) -> Tensor:
    """``(1 - M) x + M ((1 - alpha) delta + alpha x)``: ``x`` ``(B, C, H, W)``, ``delta`` ``(C, H, W)``,
    ``mask`` ``(H, W)``, ``alpha`` the transparency (0: the trigger replaces the masked pixels; 1:
    the image is unchanged)."""
    m = mask.to(x.device, x.dtype)
    return (1 - m) * x + m * ((1 - transparency) * delta.to(x.device, x.dtype) + transparency * x)


class BoostNeuron(torch.autograd.Function):
    """Identity in the forward pass; the backward pass multiplies the gradient of column
    ``neuron`` of a ``(B, D)`` tensor by ``theta`` (ATTEQ's gradient boosting)."""

    @staticmethod
    def forward(ctx: Any, features: Tensor, neuron: int, theta: float) -> Tensor:  # type: ignore[override]
        ctx.neuron, ctx.theta = neuron, theta
        return features.view_as(features)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        scale = torch.ones(grad.shape[1], device=grad.device, dtype=grad.dtype)
        scale[ctx.neuron] = ctx.theta
        return grad * scale, None, None


def trigger_loss(model: nn.Module, x: Tensor, delta: Tensor, mask: Tensor, neuron: int, *, transparency: float,
                 theta: float = 1.0, qoe_weight: float = 0.0, linf_weight: float = 0.0) -> tuple[Tensor, dict[str, float]]:
    """Eq. 7 on a batch: ``-theta-boosted a_e(x_t) + eta (1 - SSIM) + lambda ||x_t - x||_inf`` (means
    over the batch) and its parts."""
    x_t = blend(x, delta, mask, transparency)
    features = BoostNeuron.apply(model.features(x_t), neuron, float(theta))  # type: ignore[attr-defined]
    activation = features[:, neuron].mean()
    loss = -activation
    parts = {"activation": float(activation.detach())}
    if qoe_weight:
        dissimilarity = 1 - ssim(x, x_t).mean()
        loss = loss + qoe_weight * dissimilarity
        parts["ssim"] = 1 - float(dissimilarity.detach())
    if linf_weight:
        linf = (x_t - x).abs().flatten(1).amax(1).mean()
        loss = loss + linf_weight * linf
        parts["linf"] = float(linf.detach())
    return loss, parts


def optimise_trigger(model: nn.Module, images: Tensor, delta: Tensor, mask: Tensor, neuron: int, *,
                     transparency: float, theta: float = 1.0, qoe_weight: float = 0.0, linf_weight: float = 0.0,
                     steps: int = 300, lr: float = 0.05, batch_size: int = 64,
                     generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, float]]:
    """Optimise ``delta`` (``(C, H, W)`` in ``[0, 1]``, warm start) against the frozen ``model`` on
    float ``images`` ``(N, C, H, W)`` by Adam; returns the new ``delta`` and the last batch's loss
    parts. The model's mode and ``requires_grad`` flags are restored afterwards."""
    dev = images.device
    delta = delta.detach().clone().to(dev).requires_grad_(True)
    opt = torch.optim.Adam([delta], lr=lr)
    was_training = model.training
    flags = [p.requires_grad for p in model.parameters()]
    model.eval().requires_grad_(False)
    parts: dict[str, float] = {}
    try:
        for _ in range(steps):
            idx = torch.randint(0, images.shape[0], (min(batch_size, images.shape[0]),), generator=generator)
            loss, parts = trigger_loss(model, images[idx.to(dev)], delta, mask, neuron, transparency=transparency,
                                       theta=theta, qoe_weight=qoe_weight, linf_weight=linf_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                delta.clamp_(0, 1)
    finally:
        model.train(was_training)
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
    return delta.detach(), parts
