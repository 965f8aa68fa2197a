"""The clean reference: an "attack" that poisons nothing.

Training on its output gives the clean baseline every attack is compared with. ``apply`` is the
identity, so the attack success rate measured on a clean model is the share of clean non-target
test images that the model classifies as the target label (its natural false-positive rate for the
target class), not zero.

Example:
    >>> from veil.attacks import create_attack
    >>> attack = create_attack("none", num_classes=10, image_shape=(3, 32, 32))
    >>> attack.poison_count_for(train)  # doctest: +SKIP
    0
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from veil.attacks.base import Attack, AttackConfig, register_attack
from veil.data.base import ImageDataset, PoisonedDataset


@dataclass(frozen=True)
class NoneConfig(AttackConfig):
    """No options beyond :class:`AttackConfig`; ``poison_rate`` and ``poison_count`` are validated
    but ignored, and ``target``/``mode`` only define the "ASR" test set."""


@register_attack("none")
class NoAttack(Attack):
    """The clean reference (no backdoor).

    * ``apply(x)`` returns ``x`` unchanged, ``(B, C, H, W)`` in ``[0, 1]``.
    * ``poison(train)`` returns a :class:`PoisonedDataset` with the same images and labels and no
      ``poison_indices``, whatever ``poison_rate`` or ``poison_count`` say.
    * ``poison_test(test)`` returns the non-target test images, unchanged, labelled with the target:
      a clean model's "ASR" on it is how often it predicts the target for clean non-target images.

    Example:
        >>> attack = NoAttack(NoAttack.Config(target=0), num_classes=10, image_shape=(3, 32, 32))
        >>> x = torch.rand(2, 3, 32, 32)
        >>> bool(torch.equal(attack.apply(x), x))
        True
    """

    Config = NoneConfig

    def apply(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        return x

    def poison_count_for(self, dataset: ImageDataset) -> int:
        return 0

    def select_poison_indices(self, dataset: ImageDataset) -> Tensor:
        return torch.empty(0, dtype=torch.long)

    def poison(self, dataset: ImageDataset, indices: Tensor | None = None) -> PoisonedDataset:
        """A copy of ``dataset`` as a :class:`PoisonedDataset` with no poisoned rows (``indices`` is
        ignored)."""
        return PoisonedDataset(
            images=dataset.images.clone(),
            labels=dataset.labels.clone(),
            classes=dataset.classes,
            name=dataset.name,
            hflip=dataset.hflip,
            poison_indices=torch.empty(0, dtype=torch.long),
            original_labels=dataset.labels.clone(),
        )
