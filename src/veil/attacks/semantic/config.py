"""Options of the semantic-feature attack (:class:`SemanticConfig`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from veil.attacks.base import AttackConfig

#: section IV.A.4: lambda1 (the image loss's weight) by dataset; lambda2 is 0.1 for all three
LAMBDA1_BY_DATASET = {"gtsrb": 0.9, "gtsrb_sample": 0.9, "cifar10": 5.0, "imagenet": 5.0}
LAMBDA1_OTHER = 5.0


@dataclass(frozen=True)
class SemanticConfig(AttackConfig):
    """Options of the semantic-feature attack (defaults: the paper, section IV.A.4).

    Attributes:
        target: the target label (class 1 in the paper).
        lambda1: weight of the image loss ``sum ||x - x^||^2`` (eq. 6); ``None``: the paper's value
            for the training set's dataset (0.9 for GTSRB, 5 for CIFAR-10 and ImageNet, 5 for any
            other).
        lambda2: weight of the feature loss ``sum ||t - t^||^2`` (eq. 7; 0.1).
        attention_activation: ``"softmax"`` over channels (the paper's eq. 1) or ``"sigmoid"``
            (SENet's).
        attention_scale: the scores' multiplier: 1 (the paper: softmax scores sum to 1, so t is
            about M / C) or ``"channels"`` (C times the scores: mean weight 1).
        train_attention: train the attention's weights with the decoder on eq. 8 (True) or keep
            them at their seeded initialisation (False). With the paper's unscaled softmax the
            scores cannot all reach 1, so a trained attention cannot turn t into M and remove the
            trigger; with ``attention_scale="channels"`` it can, so that combination is refused.
        output: the decoder's image head: ``"image"`` (Table I: a 1x1 convolution and a ReLU
            that output the poisoned image, clamped to [0, 1]) or ``"residual"`` (``x^ = clamp(x +
            conv5, 0, 1)``, conv5 starting at zero, so the generator starts at the identity; the
            spec's reading 6 names it; measured reason: docs/attacks/semantic.md, "The output
            head, measured").
        reduction: the attention's bottleneck ratio (16, SENet's; the paper gives none).
        generator_epochs, generator_lr, generator_batch_size: the generator's SGD training on the
            clean training set (100 epochs at 0.01, the paper; batch 128 and momentum 0.9 are not
            in it).
        reference_run: a finished clean run of the victim's architecture: the surrogate whose
            maps the decoder reads and whose features the feature loss compares; without it
            :meth:`fit` trains one (``reference_epochs``, of the victim's architecture unless
            ``reference_model`` says otherwise).
        reference_model, reference_width, reference_epochs: that surrogate (100 epochs: the
            paper's victim training).
    """

    target: int = 1
    lambda1: float | None = None
    lambda2: float = 0.1
    attention_activation: Literal["softmax", "sigmoid"] = "softmax"
    attention_scale: Literal[1, "channels"] = 1
    train_attention: bool = True
    output: Literal["image", "residual"] = "image"
    reduction: int = 16
    generator_epochs: int = 100
    generator_lr: float = 0.01
    generator_batch_size: int = 128
    reference_run: str | None = None
    reference_model: str | None = None
    reference_width: int | None = None
    reference_epochs: int = 100
