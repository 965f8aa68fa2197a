"""Blended: an alpha-blended full-image trigger.

Chen, Liu, Li, Lu & Song, "Targeted Backdoor Attacks on Deep Learning Systems Using Data
Poisoning", 2017 (arXiv:1712.05526), blended-injection strategy, eq. (2):
``x' = (1 - alpha) * x + alpha * k``.

Chen et al. blend a Hello Kitty image or a random-noise pattern; veil ships no image, so the default
``k`` is seeded uniform random noise at the image size (the paper's random-pattern variant).
``pattern_path`` blends any image instead (read with PIL, resized bilinearly). ``alpha=0.2`` is
the training blend ratio of Chen et al. and BackdoorBench, used at test time too.

Example:
    >>> from veil.attacks import create_attack
    >>> attack = create_attack("blend", 10, (3, 32, 32), alpha=0.2)
    >>> poisoned_train = attack.poison(train)  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from veil.attacks.base import Attack, AttackConfig, register_attack
from veil.errors import ConfigError
from veil.triggers.blend import blend
from veil.triggers.pattern import load_image, uniform_noise


@dataclass(frozen=True)
class BlendConfig(AttackConfig):
    """Blended options.

    Attributes:
        alpha: blend ratio in ``(0, 1]`` (0.2, Chen et al. 2017).
        pattern_path: an image file to blend; ``None`` for seeded uniform noise.
    """

    alpha: float = 0.2
    pattern_path: str | None = None


@register_attack("blend")
class Blend(Attack):
    """Blended (Chen et al. 2017): ``x' = (1 - alpha) * x + alpha * k``.

    Args:
        config: :class:`BlendConfig` (``alpha=0.2``, ``pattern_path=None``).
        num_classes: number of classes.
        image_shape: ``(C, H, W)``.

    Trigger tensor (``state_dict``): ``pattern`` ``k`` of shape ``(C, H, W)`` in ``[0, 1]``.
    ``apply`` maps ``(B, C, H, W)`` to ``(B, C, H, W)``.

    Example:
        >>> attack = Blend(Blend.Config(alpha=0.2), num_classes=10, image_shape=(3, 32, 32))
        >>> attack.apply(torch.rand(4, 3, 32, 32)).shape
        torch.Size([4, 3, 32, 32])
    """

    Config = BlendConfig

    def __init__(self, config: BlendConfig, num_classes: int, image_shape: tuple[int, int, int]) -> None:
        super().__init__(config, num_classes, image_shape)
        if self.config.pattern_path is not None:
            self.pattern = load_image(self.config.pattern_path, self.image_shape)
        else:
            self.pattern = uniform_noise(self.image_shape, torch.Generator().manual_seed(self.config.seed))

    def _validate(self) -> None:
        super()._validate()
        if not 0.0 < self.config.alpha <= 1.0:
            raise ConfigError(f"blend alpha {self.config.alpha} is outside (0, 1]")

    def apply(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        self._check_batch(x)
        return blend(x, self.pattern, self.config.alpha)

    def state_dict(self) -> dict[str, Tensor]:
        return {"pattern": self.pattern.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.pattern = self._state_tensor(state, "pattern", self.pattern)
