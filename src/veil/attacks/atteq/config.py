"""Options of the ATTEQ attack and its two baselines (:class:`AtteqConfig`, :class:`RobNetConfig`,
:class:`TrojanNNConfig`) and the per-dataset values of section 5.1 they default to."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from veil.attacks.base import AttackConfig

#: section 5.1 by dataset: trigger side l, boosting factor theta (transparency: 0.4 at 32 pixels,
#: 0.7 at 224, :data:`TRANSPARENCY_BY_SIZE`); the target and poisoning ratio are run settings
#: (``AtteqAttack.paper_training_by_dataset``)
BY_DATASET = {
    "gtsrb": {"trigger_size": 3, "theta": 21.0},
    "gtsrb_sample": {"trigger_size": 3, "theta": 21.0},
    "cifar10": {"trigger_size": 4, "theta": 3.0},
    "cifar100": {"trigger_size": 2, "theta": 4.0},
    "imagenette": {"trigger_size": 8, "theta": 2.0},
}
#: any other dataset: GTSRB's values (the paper's CPU-scale target in veil)
OTHER = BY_DATASET["gtsrb"]
#: section 5.1: transparency 0.4 for the 32-pixel datasets, 0.7 for the 224-pixel ones
TRANSPARENCY_BY_SIZE = ((64, 0.4), (10**9, 0.7))


@dataclass(frozen=True)
class AtteqConfig(AttackConfig):
    """Options of ATTEQ (defaults: the paper, section 5.1, and the readings of the project's spec).

    Attributes:
        target: the target label (section 5.1: 10 on GTSRB, 2 on CIFAR-10, 0 on CIFAR-100, 3 on
            ImageNette: run settings, ``AtteqAttack.paper_training_by_dataset``; 0 here).
        poison_rate: share of the training rows that get poisoned copies (5 %: GTSRB and CIFAR-10).
        trigger_size: the trigger's side l (the mask has l * l pixels); ``None``: the paper's for
            the training set's dataset (3 GTSRB, 4 CIFAR-10, 2 CIFAR-100, 8 ImageNette).
        transparency: alpha of the blend ``(1 - M) x + M ((1 - alpha) delta + alpha x)``; ``None``:
            0.4 for images up to 64 pixels, 0.7 above (the paper's 32- and 224-pixel values).
        theta: gradient boosting through the selected neuron (1: off); ``None``: the paper's for
            the dataset (21 GTSRB, 3 CIFAR-10, 4 CIFAR-100, 2 ImageNette).
        mask: ``"attention"`` (eq. 5-6, from a residual attention network) or ``"corner"`` (the
            bottom-right square: RobNet's "Base").
        rounds: co-optimisation rounds (Algorithm 1; 3, the release's fixed count). The run's
            epochs are split evenly between them; each round but the first re-optimises the
            trigger against the current model.
        alternation: ``"epoch"`` (the release: inside each round the 1st, 3rd, ... epochs train on
            clean data only, the others on the poisoned mix), ``"round"`` (the paper's text: odd
            rounds clean only, even rounds mixed; with 3 rounds it ends clean), ``"none"``.
        qoe_weight: eta on ``1 - SSIM(x, x_t)`` in the trigger loss (0.1, eq. 7; 0 for the opaque
            ablation modes).
        linf_weight: lambda on ``||x_t - x||_inf`` in the trigger loss (the paper gives no value:
            0.1).
        trigger_steps, trigger_lr, trigger_images: the trigger's Adam optimisation per round
            (steps, rate on ``[0, 1]`` pixels, clean training images it is optimised over).
        neuron_rule: ``"activations"`` (section 4.3: the neuron of the head's input active on the
            most clean target-class images) or ``"weights"`` (TrojanNN's).
        mask_images: clean target-class training images whose attention maps are averaged (N).
        attention_run: a finished run of the ``ran`` model on the same data (the attacker's
            residual attention network); without it :meth:`fit` trains one (``attention_width``,
            ``attention_epochs``).
        reference_run: a finished clean run of the victim's architecture: the benign model
            ``F_V`` training starts from and the first trigger is optimised against; without it
            :meth:`fit` trains one (``reference_epochs``).
    """

    poison_rate: float = 0.05
    trigger_size: int | None = None
    transparency: float | None = None
    theta: float | None = None
    mask: Literal["attention", "corner"] = "attention"
    rounds: int = 3
    alternation: Literal["epoch", "round", "none"] = "epoch"
    qoe_weight: float = 0.1
    linf_weight: float = 0.1
    trigger_steps: int = 300
    trigger_lr: float = 0.05
    trigger_images: int = 512
    neuron_rule: Literal["activations", "weights"] = "activations"
    mask_images: int = 100
    attention_run: str | None = None
    attention_width: int = 16
    attention_epochs: int = 4
    reference_run: str | None = None
    reference_model: str | None = None
    reference_width: int | None = None
    reference_epochs: int = 4


@dataclass(frozen=True)
class RobNetConfig(AtteqConfig):
    """RobNet (Gong et al.; ATTEQ's "Base"): a model-dependent opaque square trigger in the
    bottom-right corner, optimised once to excite the selected neuron, one round of retraining on
    the poisoned mix (no alternation, no QoE term, no boosting)."""

    mask: Literal["attention", "corner"] = "corner"
    rounds: int = 1
    alternation: Literal["epoch", "round", "none"] = "none"
    transparency: float | None = 0.0
    theta: float | None = 1.0
    qoe_weight: float = 0.0
    linf_weight: float = 0.0


@dataclass(frozen=True)
class TrojanNNConfig(RobNetConfig):
    """TrojanNN (Liu et al., NDSS 2018): RobNet's fixed square, the neuron chosen by its incoming
    weights (the largest sum of absolute weights into it), one round of retraining."""

    neuron_rule: Literal["activations", "weights"] = "weights"
