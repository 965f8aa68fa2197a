"""Options of the multinomial-trigger attack (:class:`MultinomialConfig`) and the scale of its
changed-pixel loss."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from veil.attacks.base import AttackConfig


#: ``L_num`` = this times the changed share: the authors' code minimises ``mean |P|`` over the
#: ``P(+1)`` and ``P(-1)`` maps together, half the share eq. 6 sums; their ``beta`` is for that scale
NUM_LOSS_SCALE = 0.5


@dataclass(frozen=True)
class MultinomialConfig(AttackConfig):
    """Options of the multinomial-trigger attack (defaults: the paper, section 4.1, and the
    authors' code).

    Attributes:
        alpha: weight of the entanglement loss ``L_etg`` (0.3; 0 is the ablation of section 4.4).
        beta: initial weight of the changed-pixel loss ``L_num`` (0.1). ``L_num`` is on the
            authors' code's scale, half the changed share (:data:`NUM_LOSS_SCALE`); veil 0.1
            used the whole share, so its ``beta`` values are twice those that act the same now.
        beta_period: ``beta`` doubles every ``beta_period`` epochs (20) ...
        beta_reference_epochs: ... of a ``beta_reference_epochs``-epoch run (110, the paper's GTSRB
            budget): a run of ``E`` epochs doubles ``beta`` every ``beta_period * E /
            beta_reference_epochs`` epochs (counted in steps), so it doubles as many times (5 for
            any budget, ``beta`` ends at 3.2) at the same points of training. ``0`` takes
            ``beta_period`` in absolute epochs; ``beta_period=0`` keeps ``beta`` constant.
        beta_max: cap of the doubled ``beta`` (``0``: none). The paper's schedule never passes
            3.2 (0.1 doubled five times in 110 epochs); a warm-up started lower and doubled more
            often can be held at that value instead of growing past it.
        lr: Adam learning rate of the generator (1e-3).
        width: channels of the U-Net's first level (64 in the paper's code, 64 to 1024 over five
            levels); smaller is faster (16 or 8 at CPU scale).
        levels: U-Net resolution levels (5).
        all_targets: one probability pair per label; every poisoned row gets a malicious copy
            towards every label (the authors' code).
        entanglement: ``"squared"`` (eq. 5: mean squared feature difference) or ``"absolute"``
            (the mean absolute difference of the authors' code).
        num_loss: what ``L_num`` measures the changed share by: ``"expected"``,
            ``mean(P(+1) + P(-1))`` (the expectation of eq. 6 over the noise), or ``"sampled"``,
            the mean ``|trigger|`` of the SampleNet sample (eq. 6 as printed); either way the
            loss is :data:`NUM_LOSS_SCALE` times it, the authors' code's ``mean |P|`` over both maps.
        malicious_weight: weight of ``CE(malicious)`` in the classifier's loss (1, the paper: the
            benign and malicious means count alike). Not in the paper: where the victim cannot
            tell some triggered images from their clean originals, the two cross-entropies pull
            those images' prediction in opposite directions, and their ratio sets how many clean
            images end up in the target class against how many triggered ones miss it; below 1
            trades attack success rate for clean accuracy. Only with ``cls_weighting="per_set"``.
        malicious_weight_from: share of the training steps after which ``malicious_weight``
            applies; before it the weight is 1. Measured at 32x32: a weight of 0.5 from the first
            step delayed the victim's learning of the dense trigger (see
            docs/attacks/multinomial.md), so the shift belongs at the end, once the trigger is
            learned.
        num_budget: share of changed sub-pixels that ``L_num`` leaves free (not in the paper; 0
            by default): ``L_num`` becomes ``max(0, share - num_budget)`` over the batch, so a
            rising ``beta`` shrinks the trigger down to the budget and no further. The paper's
            ``beta`` schedule has no floor, so on a short budget the changed share ends wherever
            the last doubling left it; a budget spends all of a stated allowance (the 2 % of the
            CPU-scale target) on making the trigger learnable.
        samplenet_steps: training steps of SampleNet (:class:`veil.triggers.multinomial.SampleNetSpec`).
        asr_images_per_label: with ``all_targets``, test images per target label (drawn with
            the seed among those of other labels) in the attack-success-rate set.
        tint_weight: weight of a penalty on tinted triggers (not in the paper; 0 by default): the
            mean over malicious copies and channels of the squared spatial mean of the expected
            trigger ``P(+1) - P(-1)``. A trigger whose mean is a uniform colour shift is drowned
            out by photos' own colour differences; in all-targets co-training with ``beta=0``
            one label's map can saturate into such a tint and stay there (see the module's "All
            targets" notes and ``per_label_tint_share`` in :meth:`MultinomialAttack.evaluate`).
        generator_schedule: the generator's Adam rate over training. ``"constant"`` (the paper:
            ``lr`` throughout); ``"trainer"`` (not in the paper): ``lr`` times the classifier's
            schedule factor at each step (its current rate over its base rate), so with
            ``--schedule anneal`` the trigger stops moving while the classifier's rate anneals,
            instead of the classifier's last, smallest steps chasing a trigger still being
            reshaped at the full rate.
        noise_negatives: share of the benign rows (drawn per row and step) that carry random
            +-1 noise, kept with their true label (not in the paper; 0 by default): the noise is
            equation (1) with uniform maps, ``P(+1) = P(-1)`` = half the generator's mean
            modification probability in the batch, so it changes as many sub-pixels as the
            trigger does but without its image-dependent layout. A victim that answers the
            target for any faint noise also does for clean photos whose own pixel noise looks
            like it (bright images at 32x32, see docs/attacks/multinomial.md); these negatives
            make it tell the generator's trigger from noise (as WaNet's noise mode does for its
            warps).
        noise_negatives_from: share of the training steps after which ``noise_negatives``
            applies (0: from the first step).
    """

    alpha: float = 0.3
    beta: float = 0.1
    beta_period: float = 20.0
    beta_reference_epochs: float = 110.0
    beta_max: float = 0.0
    lr: float = 1e-3
    width: int = 64
    levels: int = 5
    all_targets: bool = False
    entanglement: Literal["squared", "absolute"] = "squared"
    num_loss: Literal["expected", "sampled"] = "expected"
    cls_weighting: Literal["per_set", "per_image"] = "per_set"
    malicious_weight: float = 1.0
    malicious_weight_from: float = 0.0
    num_budget: float = 0.0
    samplenet_steps: int = 2000
    asr_images_per_label: int = 300
    tint_weight: float = 0.0
    generator_schedule: Literal["constant", "trainer"] = "constant"
    noise_negatives: float = 0.0
    noise_negatives_from: float = 0.0
