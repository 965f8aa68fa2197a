"""ATTEQ (the seed paper ``atteq-nn-attention-qoe-attack.txt``, seed paper 003) and the two baselines
that share its machinery, RobNet (Gong et al., the paper's "Base") and TrojanNN (Liu et al., NDSS
2018). A malicious training provider: it controls the victim's training. What the code implements,
with the readings of the project's spec ``specs/atteq.md`` it chose:

* **Benign model** ``F_V``: ``reference_run``'s, or trained by ``fit``; training starts from it
  (Algorithm 1: ``F_A^0 = F_V``).
* **Attention mask** (section 4.2, eq. 5-6): a residual attention network (``veil.models.ran``,
  a CPU-scale RAN with the module structure kept; ``attention_run`` or trained by ``fit``) maps
  ``mask_images`` clean target-class images; the last module's channel-mean map is upsampled
  bilinearly, ``H_opt`` is the map nearest their mean, the mask its top ``l * l`` pixels
  (:func:`veil.triggers.neuron.attention_mask`). ``mask="corner"``: the bottom-right square.
* **Neuron** (section 4.3; reading 5): of the head's input (the penultimate features: veil's CNNs
  pool globally into one linear layer, and a ViT's is the class token after the final LayerNorm),
  the one active on the most clean target-class images, ties by the mean. TrojanNN: the largest sum
  of absolute incoming weights (of the last convolution's output channel).
* **Trigger** (eq. 7, 9; readings 2-4, 6): ``-a_e(x_t) + eta (1 - SSIM(x, x_t)) + lambda
  ||x_t - x||_inf`` by Adam on the masked pixels, ``x_t = (1 - M) x + M ((1 - alpha) delta +
  alpha x)``; boosting multiplies the gradient through neuron ``e`` by ``theta``
  (:class:`veil.triggers.neuron.BoostNeuron`). The loss depends on ``a_e`` only through the
  boosted column, so ``theta`` rescales the activation term against the QoE and L-inf terms.
* **Co-optimisation** (eq. 3-4, Algorithm 1; reading 9): ``rounds`` (3) rounds over the run's
  epochs; each round but the first re-optimises the trigger, warm-started, against the current
  model; the poisoned copies (of the rows at ``poison_indices``, appended to their batches, as the
  release appends them to the originals) carry the current trigger.
* **Alternating retraining** (section 4.4; reading 7): ``alternation="epoch"`` (the default, the
  release's: inside a round the 1st, 3rd, ... epochs are clean only) or ``"round"`` (the paper's
  text: odd rounds clean only; with 3 rounds the run ends clean-only, which the spec expects to
  erase the backdoor) or ``"none"``.
* **Defaults** (section 5.1): by dataset (``trigger_size``, ``theta``; the target and poisoning
  ratio as run settings), transparency 0.4 up to 64 pixels and 0.7 above, eta 0.1; lambda (no value
  in the paper) 0.1; the victim's retraining as the release's (Adam 1e-3, batch 64, 90 epochs).
* **Baselines**: ``robnet`` (corner mask, opaque, one round, no alternation, no QoE, no boosting)
  and ``trojannn`` (the same with TrojanNN's neuron rule).
"""

from veil.attacks.atteq.attack import AtteqAttack, RobNetAttack, TrojanNNAttack
from veil.attacks.atteq.config import AtteqConfig, RobNetConfig, TrojanNNConfig

__all__ = ["AtteqAttack", "AtteqConfig", "RobNetAttack", "RobNetConfig", "TrojanNNAttack", "TrojanNNConfig"]
