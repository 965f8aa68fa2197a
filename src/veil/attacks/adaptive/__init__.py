"""Adaptive backdoor attack (CMES 2023, the seed paper ``adaptive-backdoor-attack.txt``).

What the code implements:

* **Texture mask** (section 3.4, eq. 1-3; :mod:`veil.triggers.texture`): HILL's cost ``W <= T``
  (``mask="hill"``, T = 1, Table 3's GTSRB rows) or the Sobel gradient magnitude ``G >= T``
  (``mask="sobel"``, T = 10, its CIFAR-10 rows), on luma, one mask per image broadcast to the
  channels (reading 3 of the project's spec ``specs/adaptive.md``), computed on the image the trigger is
  added to, so the victim's crop moves mask and trigger together (reading 4).
* **Generator** (eq. 4, 5): veil's U-Net (:class:`veil.triggers.unet.UNet`). HardTanh: ``g =
  hardtanh(U(x), -i, i)`` grey levels (i = 40 with HILL, 12 with Sobel). MPM: probability pairs
  ``(p+, p-) = sigmoid / 2`` sampled exactly by eq. 5 at test time and when the poisoned set is
  written, and through the TransformNet of Table 1 in training, which is the multinomial attack's
  SampleNet (shared, :mod:`veil.triggers.multinomial`); the +-1 and +-2 pairs are two independent
  pairs, ``t = m1 + 2 m2`` in -3..3 (reading 2). The trigger is ``M(x) * g``.
* **Training** (eq. 6): ``L = CE(x_p, target) + a CE(x, y) + b (1 - SSIM(x, x_p))`` (the text
  swaps the two cross-entropies' names; ``l_ssim`` read as ``1 - SSIM``: reading 5), a = 1,
  b = 2 for the GTSRB HardTanh row and 0 elsewhere; generator and classifier updated together,
  every training row with a poisoned copy (reading 7; ``poison_rate`` 1.0 as the paper training).
  The classifier starts from a benign classifier the attacker trained (``reference_run``, or
  trained by ``fit``, of the victim's architecture).
* **Parameter clip** (section 3.5; Algorithm 1 is missing from the text): after every step each
  parameter stays within ``[(1 - r) theta_c, (1 + r) theta_c]``, bounds ordered for negative
  values, zeros pinned (reading 6). BatchNorm running statistics are clipped the same way: they
  are part of the classifier the victim receives, and leaving them free would let the backdoor
  hide there (integer counters are left alone). r = 1e-3 for HardTanh, none (``inf``) for MPM.
* **Defaults**: Table 3, by mask and generator (``None`` options resolve to its values:
  :data:`veil.attacks.adaptive.config.TABLE3`); target 0. The paper gives no optimiser, rates,
  epochs, batch, U-Net width or augmentation: the generator's Adam rate 1e-3 and the U-Net's
  width 64 and 5 levels are the multinomial authors' (the same group's network); the
  classifier's training is veil's defaults, and CPU recipes say what they change.
* **Ablation** (section 4.5): ``mask="none"`` with ``l2_weight`` > 0, the trigger anywhere with an
  L2 penalty instead of the HardTanh bound (reading 8: the bound defaults to 255, none).
* **Evaluation** (:meth:`AdaptiveAttack.evaluate`): L-inf, changed share, share inside the mask,
  the largest relative parameter change, pairwise trigger similarity, and the benign model's
  success rate on the same triggered images (the spec's "check worth making").
"""

from veil.attacks.adaptive.attack import AdaptiveAttack
from veil.attacks.adaptive.config import AdaptiveConfig
from veil.attacks.adaptive.hook import AdaptiveHook, ParameterClip, clip_bounds

__all__ = ["AdaptiveAttack", "AdaptiveConfig", "AdaptiveHook", "ParameterClip", "clip_bounds"]
