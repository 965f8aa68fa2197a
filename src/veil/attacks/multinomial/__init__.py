"""Multinomial-trigger backdoor with feature-representation entanglement.

Zhong, Qian & Zhang, "Imperceptible Backdoor Attack: From Input Space to Feature Representation",
IJCAI 2022 (arXiv:2205.03190; authors' code: github.com/Ekko-zn/IJCAI2022-Backdoor).

* **Trigger** (section 3.3): a U-Net generator ``G`` (:class:`veil.triggers.unet.UNet`) maps a
  benign image to, per colour channel and per target label, the probabilities ``P(+1)`` and
  ``P(-1)`` of a one-grey-level change (``0.5 * sigmoid``, so each is in ``[0, 0.5]``). The trigger
  is a sample of that multinomial distribution: in training through the frozen, differentiable
  SampleNet (Table 1), at test time and when the poisoned set is written through the exact step
  function of equation (1) (:mod:`veil.triggers.multinomial`). Poisoned images are quantised to 8
  bits, so every change is exactly one grey level.
* **Training** (equations 2, 5, 6, 7): the attack controls training. Its :class:`MultinomialHook`
  adds, to every batch, malicious copies of the poisoned rows in it (the authors' code: every row,
  towards every label; here the rows of ``poison_rate``, ``1.0`` for the authors' recipe) and
  trains the classifier and the generator jointly on

      L = CE(benign, y) + CE(malicious, y_target) + alpha * L_etg + beta * L_num

  with ``L_etg`` the mean squared distance (eq. 5) between the penultimate features of the
  malicious images and ``f_benign``, the mean feature of the clean training images of their
  target label (recomputed, model in eval mode, at the start of every epoch, as in the authors'
  code), and ``L_num`` half the share of changed sub-pixels (eq. 6 normalised by ``C * H * W``,
  halved as the authors' code's ``mean |P|`` over both maps is, which ``beta = 0.1`` is for).
  ``beta`` doubles every ``beta_period`` epochs of the paper's ``beta_reference_epochs``-epoch
  budget, scaled to the run's epochs (see :meth:`MultinomialHook.beta_at`).
* **Modes**: one target (``target``), all targets at once (``all_targets=True``: one probability
  pair per label, ``--all-targets`` on the command line), and the library's ``all2all``.
* **Evaluation** (:meth:`MultinomialAttack.evaluate`): the paper's L1 (grey levels per sub-pixel),
  the modification-magnitude histogram (Table 3), the share of modified sub-pixels, per-label
  attack success rate (Figure 3) and the feature-space distance between malicious images and the
  clean target-class images (section 3.4; ``alpha=0`` is the ablation of section 4.4).

* **Scale**: at 32x32 on a CPU budget the paper's ``beta`` schedule shrinks the trigger before
  the victim learns it; the options that are not in the paper (``num_budget``,
  ``noise_negatives``, ``malicious_weight``, ``generator_schedule``, ``tint_weight``) and the
  measurements behind them are in ``docs/attacks/multinomial.md``; the recipe is
  ``examples/sweeps/multinomial_gtsrb32_cpu.yaml``.

Example:
    >>> from veil.attacks import create_attack
    >>> attack = create_attack("multinomial", 43, (3, 32, 32), target=0, width=16, poison_rate=1.0)
    >>> attack.fit(train)                   # trains SampleNet (seconds)        # doctest: +SKIP
    >>> hook = attack.training_hook()       # give it to veil.train.Trainer     # doctest: +SKIP
"""

from __future__ import annotations

from veil.attacks.multinomial.attack import MultinomialAttack
from veil.attacks.multinomial.config import NUM_LOSS_SCALE, MultinomialConfig
from veil.attacks.multinomial.hook import MultinomialHook

__all__ = ["NUM_LOSS_SCALE", "MultinomialAttack", "MultinomialConfig", "MultinomialHook"]
