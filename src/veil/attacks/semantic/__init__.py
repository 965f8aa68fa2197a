"""Semantic-feature attack (the seed paper ``semantic-feature-attack.txt``, seed paper 000).

Data-only poisoning: the attacker trains (or is given, ``reference_run``) a clean surrogate of the
victim's architecture and cannot touch the victim's training. What the code implements, with the
readings of the project's spec ``specs/semantic.md`` it chose:

* **Feature taps** (:data:`veil.triggers.decoder.SEMANTIC_TAPS`): one forward pass of the frozen
  surrogate gives three low-level maps (the skips) and the last high-level map ``M``: VGG-16/19's
  stages 1-3 and stage 4 (8w channels at H/16: Table I's 512 at w = 64), the ResNets' layer1-3 and
  layer4. Other backbones are refused with a clear error.
* **Channel attention** (eq. 1-2; reading 1: GAP first, softmax last): ``s = softmax_C(W2
  ReLU(W1 GAP(M)))``, ``t = M * s``; the trigger is ``t``. Reading 3: the attention is trained
  with the decoder on eq. 8 with the paper's unscaled softmax, whose scores sum to 1 and so cannot
  all reach 1: a trained attention cannot turn ``t`` back into ``M`` (which would remove the
  trigger). The scaled variant (``attention_scale="channels"``) is allowed only with a frozen,
  seeded attention (``train_attention=False``); SENet's sigmoid is an option.
* **Generator** (Table I; reading 4: it upsamples): per skip, deepest first, a 2x2 transposed
  convolution with stride 2, the clean image's skip map concatenated (reading 5: every skip
  carries the original maps), a double 3x3 convolution; plain up-blocks to the input resolution;
  a 1x1 convolution with ReLU, clamped to [0, 1] and quantised to 8 bits when written (reading 6).
  Built from the taps' shapes, so it fits each backbone (:class:`veil.triggers.decoder.FeatureDecoder`).
  ``output="residual"`` (reading 6's option, not the default): ``x^ = clamp(x + conv5, 0, 1)`` with
  conv5 from zero, the identity at the start; measured in docs/attacks/semantic.md.
* **Losses** (eq. 6-8): ``lambda1 sum ||x - x^||^2 + lambda2 sum ||t - t^||^2``, ``t^ = M(x^)``
  through the frozen surrogate; per-image sums on [0, 1] images averaged over the batch (reading
  7). lambda1 0.9 on GTSRB and 5 elsewhere (``None`` resolves by the training set's dataset),
  lambda2 0.1.
* **Training and poisoning** (section III.A, IV.A): the generator by SGD at 0.01 for 100 epochs
  (momentum 0.9 and batch 128 are not in the paper), on the clean training set; then 10 % of the
  training rows (of other labels than the target) replaced by ``x^`` and labelled 1, the
  paper's target. The victim's paper training: SGD, momentum 0.9, rate 0.01, 100 epochs.
* **Evaluation**: the run's stealth metrics (PSNR, SSIM, MSE via L2, LPIPS) over 1,000 test
  images, ``feature_relative_error`` (how close ``t^`` is to ``t``) and ``benign_asr`` (the clean
  surrogate's success rate on the same poisoned images).
"""

from veil.attacks.semantic.attack import ChannelAttention, SemanticAttack
from veil.attacks.semantic.config import SemanticConfig

__all__ = ["ChannelAttention", "SemanticAttack", "SemanticConfig"]
