"""Multinomial triggers: sample a {-1, 0, +1} grey-level trigger from per-pixel probabilities.

Zhong, Qian & Zhang, "Imperceptible Backdoor Attack: From Input Space to Feature Representation",
IJCAI 2022 (arXiv:2205.03190), section 3.3. A generator gives, for every sub-pixel (channel, row,
column), the probabilities ``p_plus`` of a +1 and ``p_minus`` of a -1 grey-level change, each in
``[0, 0.5]`` (:func:`modification_probabilities`: ``0.5 * sigmoid``); the trigger is a sample of
that three-outcome (multinomial) distribution:

* :func:`sample_trigger`: equation (1), the exact step function of a uniform noise ``n``:
  ``-1`` if ``n < p_minus``, ``+1`` if ``n > 1 - p_plus``, else ``0``. Used at test time and when
  the poisoned set is written.
* :class:`SampleNet`: the paper's Table 1 MLP (3 -> 16 -> 32 -> 1; ReLU, ReLU, Tanh) on the inputs
  ``(n, p_plus, p_minus)``, trained beforehand to imitate equation (1)
  (:func:`train_samplenet`) and then frozen, so that the classifier's loss reaches the generator
  through a differentiable sampler during training.
* :func:`samplenet_imitation_error`: how closely a SampleNet imitates equation (1).

Run ``python scripts/measure_samplenet.py`` to train a SampleNet and print its imitation error.

Example:
    >>> p_plus, p_minus = torch.full((1, 3, 4, 4), 0.1), torch.full((1, 3, 4, 4), 0.2)
    >>> t = sample_trigger(p_plus, p_minus, torch.rand(1, 3, 4, 4))
    >>> set(t.unique().tolist()) <= {-1.0, 0.0, 1.0}
    True
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)

__all__ = [
    "SampleNet",
    "SampleNetSpec",
    "cached_samplenet",
    "modification_probabilities",
    "sample_trigger",
    "samplenet_imitation_error",
    "train_samplenet",
]

#: the largest probability of either change (``0.5 * sigmoid``), so the two never overlap
P_MAX = 0.5


def modification_probabilities(logits: Tensor) -> tuple[Tensor, Tensor]:
    """``(p_plus, p_minus)`` from generator outputs ``(B, 2 * K, H, W)``.

    The first ``K`` maps give ``P(+1)``, the last ``K`` give ``P(-1)``, each through
    ``0.5 * sigmoid`` (section 3.3) so that ``p_plus + p_minus <= 1``.

    Returns:
        two ``(B, K, H, W)`` tensors in ``[0, 0.5]``.
    """
    if logits.dim() != 4 or logits.shape[1] % 2:
        raise ValueError(
            f"generator outputs must be (B, 2K, H, W), got {tuple(logits.shape)}"
        )
    k = logits.shape[1] // 2
    p = P_MAX * torch.sigmoid(logits)
    return p[:, :k], p[:, k:]


def sample_trigger(p_plus: Tensor, p_minus: Tensor, noise: Tensor) -> Tensor:
    """Equation (1): the exact, non-differentiable multinomial sample.

    Args:
        p_plus: probability of a +1 change, in ``[0, 0.5]``, any shape.
        p_minus: probability of a -1 change, in ``[0, 0.5]``, same shape.
        noise: uniform noise in ``[0, 1)``, same shape.

    Returns:
        the trigger, in grey levels, with values in ``{-1, 0, +1}`` (the inputs' dtype):
        ``-1`` where ``noise < p_minus``, ``+1`` where ``noise > 1 - p_plus``, ``0`` elsewhere. With
        ``noise ~ U(0, 1)``, ``P(+1) = p_plus`` and ``P(-1) = p_minus``.
    """
    if not (p_plus.shape == p_minus.shape == noise.shape):
        raise ValueError(
            f"p_plus, p_minus and noise must have one shape, got {tuple(p_plus.shape)}, "
            f"{tuple(p_minus.shape)}, {tuple(noise.shape)}"
        )
    minus = (noise < p_minus).to(p_plus.dtype)
    plus = (noise > 1 - p_plus).to(p_plus.dtype)
    return plus - minus


class SampleNet(nn.Module):
    """The differentiable stand-in for equation (1) (Table 1 of the paper).

    ``Linear(3, 16) -> ReLU -> Linear(16, 32) -> ReLU -> Linear(32, 1) -> Tanh`` applied to every
    sub-pixel's ``(n, p_plus, p_minus)``; the output, in ``(-1, 1)``, is the soft trigger in grey
    levels. Train it with :func:`train_samplenet`, then freeze it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(3, 16),
            nn.ReLU(),
            nn.Linear(16, 32),
            nn.ReLU(),
            nn.Linear(32, 1),
            nn.Tanh(),
        )

    def forward(self, noise: Tensor, p_plus: Tensor, p_minus: Tensor) -> Tensor:
        """Soft trigger, same shape as the inputs (any shape, all equal)."""
        if not (p_plus.shape == p_minus.shape == noise.shape):
            raise ValueError("noise, p_plus and p_minus must have one shape")
        inputs = torch.stack((noise, p_plus, p_minus), dim=-1)
        return self.net(inputs).squeeze(-1)


@dataclass(frozen=True)
class SampleNetSpec:
    """How :func:`train_samplenet` trains a SampleNet (defaults: about 3 s on one CPU core).

    With the defaults (seed 0) the measured imitation error (:func:`samplenet_imitation_error`) is
    a mean absolute error of 0.013 grey levels, 99.94 % agreement of the rounded output with
    equation (1), and at most 0.023 between the soft trigger's mean and ``p_plus - p_minus``.

    Attributes:
        steps: Adam steps.
        batch_size: random ``(n, p_plus, p_minus)`` triples per step.
        lr: peak learning rate (cosine decay to 0).
        seed: seed of the initialisation and of the training triples.
    """

    steps: int = 2000
    batch_size: int = 2048
    lr: float = 1e-2
    seed: int = 0


def _random_inputs(n: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """Uniform noise in [0, 1) and probabilities in [0, 0.5]; half of the probabilities are drawn
    near 0 (``0.5 * u**3``), where a trained generator's sparse triggers live."""
    noise = torch.rand(n, generator=generator)
    u = torch.rand(2, n, generator=generator)
    sparse = torch.rand(2, n, generator=generator) < 0.5
    p = P_MAX * torch.where(sparse, u**3, u)
    return noise, p[0], p[1]


def train_samplenet(spec: SampleNetSpec = SampleNetSpec()) -> SampleNet:
    """Train a SampleNet to imitate equation (1) by mean squared error, deterministically under
    ``spec.seed`` (the global RNG is left untouched); returned frozen and in eval mode.

    Trains on one thread (the matrices are tiny: more threads only add overhead) and on the CPU.
    """
    if spec.steps < 1 or spec.batch_size < 1 or not spec.lr > 0:
        raise ValueError(f"invalid SampleNet training spec {spec}")
    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        net = _train(spec)
    finally:
        torch.set_num_threads(threads)
    log.debug("SampleNet trained in %.1fs (%s)", time.perf_counter() - t0, spec)
    return net


def _train(spec: SampleNetSpec) -> SampleNet:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        net = SampleNet()
    g = torch.Generator().manual_seed(spec.seed + 1)
    opt = torch.optim.Adam(net.parameters(), lr=spec.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / spec.steps))
    )
    net.train()
    for _ in range(spec.steps):
        noise, pp, pm = _random_inputs(spec.batch_size, g)
        loss = F.mse_loss(net(noise, pp, pm), sample_trigger(pp, pm, noise))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return net.eval().requires_grad_(False)


_CACHE: dict[SampleNetSpec, dict[str, Tensor]] = {}


def cached_samplenet(spec: SampleNetSpec = SampleNetSpec()) -> SampleNet:
    """:func:`train_samplenet`, trained once per process and spec (later calls copy the weights)."""
    if spec not in _CACHE:
        _CACHE[spec] = {
            k: v.clone() for k, v in train_samplenet(spec).state_dict().items()
        }
    net = SampleNet()
    net.load_state_dict(_CACHE[spec])
    return net.eval().requires_grad_(False)


@torch.no_grad()
def samplenet_imitation_error(
    net: nn.Module, samples: int = 200_000, seed: int = 12345
) -> dict[str, float]:
    """How closely ``net`` imitates equation (1), on fresh random inputs (as in training: noise
    uniform, probabilities half uniform in [0, 0.5], half concentrated near 0).

    Returns:
        ``mean_abs_error``: mean ``|S(n, p) - t(n, p)|`` in grey levels;
        ``agreement``: share of samples where ``round(S)`` equals the exact sample ``t``;
        ``expectation_error``: over a 21 x 21 grid of ``(p_plus, p_minus)`` in ``[0, 0.5]^2``, the
        largest ``|E_n[S] - (p_plus - p_minus)|`` (the soft trigger's mean against the exact one),
        ``E_n`` over 2,000 noise values.
    """
    g = torch.Generator().manual_seed(seed)
    noise, pp, pm = _random_inputs(samples, g)
    soft = net(noise, pp, pm)
    hard = sample_trigger(pp, pm, noise)
    grid = torch.linspace(0, P_MAX, 21)
    gp, gm = torch.meshgrid(grid, grid, indexing="ij")
    n = torch.rand(2000, generator=g)
    gp_, gm_, n_ = (
        gp.reshape(-1, 1).expand(-1, 2000),
        gm.reshape(-1, 1).expand(-1, 2000),
        n.expand(441, -1),
    )
    mean_soft = net(n_.contiguous(), gp_.contiguous(), gm_.contiguous()).mean(dim=1)
    return {
        "mean_abs_error": float((soft - hard).abs().mean()),
        "agreement": float((soft.round() == hard).double().mean()),
        "expectation_error": float((mean_soft - (gp - gm).reshape(-1)).abs().max()),
    }

