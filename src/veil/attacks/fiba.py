"""FIBA: a frequency-injection backdoor that blends low-frequency amplitude spectra.

Feng, Ma, Jiang, Tao, Xie & Luo (2022), "FIBA: Frequency-Injection based Backdoor Attack in Medical
Image Analysis", CVPR 2022 (arXiv:2112.01148). Per channel, eq. (2)-(4)::

    X = FFT2(x),  A_x = |X|,  P_x = angle(X),  A_t = |FFT2(t)|
    A' = (1 - alpha) * A_x + alpha * A_t   inside the centred low-frequency square M
    A' = A_x                               outside M
    x' = clamp(Re(IFFT2(A' * exp(i * P_x))), 0, 1)

``M`` is the square of side ``floor(beta * min(H, W))`` (at least 1) around the zero frequency
after ``fftshift``. Defaults from the paper: ``alpha = 0.15``, ``beta = 0.1``. The trigger image
``t`` is a seeded random smooth image (bicubically upsampled 4x4 noise) since veil ships no image,
or ``trigger_path`` (read with PIL, resized bilinearly). At the BadNets foundation budget the
defaults learned a backdoor on GTSRB (ASR 0.958) but not on the CIFAR-10 subset (0.137); the
recipe ``fiba/cifar10subset-cpu`` (``alpha=0.3``) did (``docs/attacks/baselines.md``).

Example:
    >>> from veil.attacks import create_attack
    >>> attack = create_attack("fiba", 10, (3, 32, 32), alpha=0.15, beta=0.1)
    >>> poisoned_train = attack.poison(train)  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from veil.attacks.base import Attack, AttackConfig, register_attack
from veil.data.base import ImageDataset
from veil.errors import ConfigError
from veil.triggers.pattern import load_image, smooth_noise
from veil.triggers.spectral import amplitude_blend, amplitude_spectrum, low_frequency_mask


@dataclass(frozen=True)
class FIBAConfig(AttackConfig):
    """FIBA options (Feng et al. 2022).

    Attributes:
        alpha: amplitude blend ratio in ``(0, 1]`` (0.15).
        beta: side of the low-frequency square as a share of ``min(H, W)``, in ``(0, 1]`` (0.1).
        trigger_path: an image file whose amplitude spectrum is injected; ``None`` for a seeded
            random smooth image.
    """

    alpha: float = 0.15
    beta: float = 0.1
    trigger_path: str | None = None


@register_attack("fiba")
class FIBA(Attack):
    """FIBA (Feng et al., CVPR 2022): low-frequency amplitude-spectrum blending, phase kept.

    Args:
        config: :class:`FIBAConfig` (``alpha=0.15``, ``beta=0.1``, ``trigger_path=None``).
        num_classes: number of classes.
        image_shape: ``(C, H, W)``.

    Trigger tensor (``state_dict``): ``trigger`` image ``(C, H, W)`` in ``[0, 1]``; its amplitude
    spectrum ``(C, H, W)`` and the frequency ``mask`` ``(H, W)`` are derived from it and the config.
    ``apply`` maps ``(B, C, H, W)`` to ``(B, C, H, W)``, differentiably in ``x``.

    Example:
        >>> attack = FIBA(FIBA.Config(), num_classes=10, image_shape=(3, 32, 32))
        >>> int(attack.mask.sum())  # a 3x3 band for 32x32 images
        9
    """

    Config = FIBAConfig

    def __init__(self, config: FIBAConfig, num_classes: int, image_shape: tuple[int, int, int]) -> None:
        super().__init__(config, num_classes, image_shape)
        _, h, w = self.image_shape
        self.mask = low_frequency_mask(h, w, self.config.beta)
        if self.config.trigger_path is not None:
            trigger = load_image(self.config.trigger_path, self.image_shape)
        else:
            trigger = smooth_noise(self.image_shape, torch.Generator().manual_seed(self.config.seed))
        self._set_trigger(trigger)

    def _set_trigger(self, trigger: Tensor) -> None:
        self.trigger = trigger
        self.trigger_amplitude = amplitude_spectrum(trigger)

    def _validate(self) -> None:
        super()._validate()
        c = self.config
        if not 0.0 < c.alpha <= 1.0:
            raise ConfigError(f"fiba alpha {c.alpha} is outside (0, 1]")
        if not 0.0 < c.beta <= 1.0:
            raise ConfigError(f"fiba beta {c.beta} is outside (0, 1]")

    def apply(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        self._check_batch(x)
        return amplitude_blend(x, self.trigger_amplitude, self.config.alpha, self.mask).clamp(0, 1)

    def training_notes(self, train: ImageDataset, crop_padding: int, hflip: bool) -> list[str]:
        return [
            "fiba: with default options at the foundation budget the backdoor was learned on GTSRB but not on "
            "natural images (the CIFAR-10 subset); the recipe fiba/cifar10subset-cpu (alpha 0.3) was "
            "(veil recipes; docs/attacks/baselines.md)"
        ]

    def state_dict(self) -> dict[str, Tensor]:
        return {"trigger": self.trigger.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self._set_trigger(self._state_tensor(state, "trigger", self.trigger))
