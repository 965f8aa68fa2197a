"""BadNets: a visible square patch trigger.

Gu, Dolan-Gavitt & Garg, "BadNets: Identifying Vulnerabilities in the Machine Learning Model Supply
Chain", 2017 (arXiv:1708.06733). The trigger is a square patch stamped at the bottom-right corner
with the mask-and-pattern formulation ``x' = (1 - m) * x + m * p``.

Defaults: a 3x3 black-and-white checkerboard 4 pixels from the right and bottom edges of a 32x32
image (the pattern ART's ``add_pattern_bd`` and TrojanZoo use), all-to-one to label 0, 10% of the
training set poisoned. The patch is stamped before the victim's augmentation (data poisoning), and
the standard random crop pads by 4 pixels: a patch touching the corner (``margin=0``) is then gone
from 40% of the crops of a poisoned image and cut in 30% (:func:`veil.triggers.patch.crop_survival`),
which on natural images with flips left no backdoor (CIFAR-10 subset, 16 epochs: ASR 0.10, against
1.00 with the margin of 4; ``docs/attacks/baselines.md``). The BadNets paper puts its MNIST
patterns in the bottom-right corner and its traffic-sign triggers on the sign itself, without a
distance to the border; veil reads "bottom-right, inside what a crop keeps". ``veil run`` says in
its log when a chosen margin lets the crop cut the patch. BackdoorBench's all-white 3x3 square
(``pattern="white"``) is invisible on the bright backgrounds of many GTSRB photos (measured on
veil 0.1's build with ``margin=0``, not re-measured since: 88.8 % attack success rate, the misses with a mean corner brightness of 201/255
against 52 for the hits); the checkerboard holds a white and a black pixel on any background.
``pattern="random"`` with ``patch_size=6`` gives the 6x6 colourful square of the multinomial paper.

Example:
    >>> from veil.attacks import create_attack
    >>> attack = create_attack("badnets", 10, (3, 32, 32), target=0, patch_size=3, pattern="white")
    >>> poisoned_train = attack.poison(train)          # doctest: +SKIP
    >>> asr_set = attack.poison_test(test)             # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from veil.attacks.base import Attack, AttackConfig, register_attack
from veil.data.base import ImageDataset
from veil.errors import ConfigError
from veil.triggers.patch import corner_mask, crop_survival, stamp
from veil.triggers.pattern import checkerboard, uniform_noise


@dataclass(frozen=True)
class BadNetsConfig(AttackConfig):
    """BadNets options.

    Attributes:
        patch_size: side of the square patch in pixels (3, BackdoorBench's default for 32x32).
        pattern: ``"white"`` (all ones), ``"checkerboard"`` (1-pixel black/white grid, white at
            the patch's top-left) or ``"random"`` (a seeded random colour per pixel and channel).
        margin: distance in pixels from the right and bottom edges (4, the padding of the
            victim's standard random crop, so that no crop cuts the patch; 0: in the corner).
    """

    patch_size: int = 3
    pattern: Literal["white", "checkerboard", "random"] = "checkerboard"
    margin: int = 4


@register_attack("badnets")
class BadNets(Attack):
    """BadNets (Gu et al. 2017): ``x' = (1 - m) * x + m * p`` with a square corner mask ``m``.

    Args:
        config: :class:`BadNetsConfig` (``patch_size=3``, ``pattern="checkerboard"``, ``margin=4``).
        num_classes: number of classes.
        image_shape: ``(C, H, W)``.

    Trigger tensors (``state_dict``): ``mask`` ``(1, H, W)`` in {0, 1} and ``pattern`` ``(C, H, W)``
    in ``[0, 1]`` (zero outside the patch). ``apply`` maps ``(B, C, H, W)`` to ``(B, C, H, W)``.

    Example:
        >>> attack = BadNets(BadNets.Config(patch_size=3, pattern="white"), num_classes=10, image_shape=(3, 32, 32))
        >>> attack.apply(torch.zeros(1, 3, 32, 32))[0, :, -7:-4, -7:-4].min().item()
        1.0
    """

    Config = BadNetsConfig

    def __init__(self, config: BadNetsConfig, num_classes: int, image_shape: tuple[int, int, int]) -> None:
        super().__init__(config, num_classes, image_shape)
        c = self.config
        self.mask = corner_mask(self.image_shape, c.patch_size, c.margin)
        full = self._full_pattern()
        self.pattern = full * self.mask

    def _validate(self) -> None:
        super()._validate()
        c = self.config
        _, h, w = self.image_shape
        if c.pattern not in ("white", "checkerboard", "random"):
            raise ConfigError(f"badnets pattern must be 'white', 'checkerboard' or 'random', got {c.pattern!r}")
        if c.patch_size < 1 or c.margin < 0 or c.patch_size + c.margin > min(h, w):
            raise ConfigError(f"a {c.patch_size}x{c.patch_size} patch {c.margin} px from the edge does not fit {h}x{w} images")

    def _full_pattern(self) -> Tensor:
        c, h, w = self.image_shape
        size, margin = self.config.patch_size, self.config.margin
        if self.config.pattern == "white":
            return torch.ones(c, h, w)
        if self.config.pattern == "checkerboard":
            # white at the patch's top-left pixel, whatever the image and patch size
            top, left = h - margin - size, w - margin - size
            board = checkerboard((c, h, w))
            return board if (top + left) % 2 == 0 else 1 - board
        g = torch.Generator().manual_seed(self.config.seed)
        patch = uniform_noise((c, size, size), g)
        full = torch.zeros(c, h, w)
        full[:, h - margin - size : h - margin, w - margin - size : w - margin] = patch
        return full

    def apply(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        self._check_batch(x)
        return stamp(x, self.mask, self.pattern)

    def training_notes(self, train: ImageDataset, crop_padding: int, hflip: bool) -> list[str]:
        c = self.config
        whole, gone = crop_survival(self.image_shape, c.patch_size, c.margin, crop_padding)
        if whole == 1.0:
            return []
        return [
            f"badnets: the {c.patch_size}x{c.patch_size} patch {c.margin} px from the edges is stamped before the "
            f"victim's random crop ({crop_padding}-pixel padding): {gone:.0%} of the crops of a poisoned image show "
            f"none of it and {1 - whole - gone:.0%} only part of it, yet keep the target label; a margin of "
            f"{crop_padding} or more keeps it whole"
        ]

    def state_dict(self) -> dict[str, Tensor]:
        return {"mask": self.mask.clone(), "pattern": self.pattern.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.mask = self._state_tensor(state, "mask", self.mask)
        self.pattern = self._state_tensor(state, "pattern", self.pattern)
