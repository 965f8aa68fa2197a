"""Options of the adaptive backdoor attack (:class:`AdaptiveConfig`) and the Table 3 values they
default to."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from veil.attacks.base import AttackConfig

#: Table 3, by mask (the paper pairs HILL with GTSRB and Sobel with CIFAR-10): threshold T,
#: HardTanh bound i (grey levels) and SSIM weight b of the HardTanh rows. Without a mask (the
#: ablation of section 4.5) the L2 loss replaces the bound (reading 8 of the spec): i is the whole
#: 0-255 range, so HardTanh bounds nothing the pixel clamp does not.
TABLE3 = {
    "hill": {"threshold": 1.0, "bound": 40.0, "ssim_weight": 2.0},
    "sobel": {"threshold": 10.0, "bound": 12.0, "ssim_weight": 0.0},
    "none": {"threshold": 0.0, "bound": 255.0, "ssim_weight": 0.0},
}
#: Table 3's clip ratio r by generator: 1e-3 for HardTanh, none (inf) for MPM
CLIP_BY_GENERATOR = {"hardtanh": 1e-3, "mpm": math.inf}


@dataclass(frozen=True)
class AdaptiveConfig(AttackConfig):
    """Options of the adaptive backdoor attack (defaults: Table 3; ``None`` means "Table 3's value
    for this mask and generator").

    Attributes:
        mask: texture mask, ``"hill"`` (eq. 1-3; Table 3's GTSRB rows, the default), ``"sobel"``
            (its CIFAR-10 rows) or ``"none"`` (the ablation of section 4.5: the trigger anywhere,
            held by the ``l2_weight`` loss instead of a HardTanh bound, which then defaults to 255).
        threshold: the mask's T on the 0-255 scale (HILL 1, Sobel 10).
        per_channel_mask: one mask per colour channel instead of one on luma for all of them.
        generator: ``"hardtanh"`` (eq. 4: the U-Net's output clipped to +-``bound`` grey levels) or
            ``"mpm"`` (eq. 5: modification probabilities, +-1 and +-2 pairs).
        bound: the HardTanh bound i in grey levels (HILL 40, Sobel 12, no mask 255: none).
        mpm_pairs: MPM pairs; ``2`` gives the +-1 and +-2 pairs of Table 3 (the trigger
            ``m1 + 2 m2`` in -3..3), ``1`` the +-1 pair alone.
        clip_ratio: r of section 3.5: after every step each classifier parameter stays within
            ``(1 +- r)`` times the benign classifier's value (HardTanh 1e-3, MPM ``inf``: no clip).
        clean_weight: a of eq. 6, the weight of the clean cross-entropy (1).
        ssim_weight: b of eq. 6, the weight of ``1 - SSIM(x, x_p)`` (HILL 2, Sobel 0).
        l2_weight: weight of the mean squared trigger (in grey levels / 255) in the loss, for the
            no-mask ablation (section 4.5: "common L2-norm loss"; the paper gives no value, 0 off).
        lr: the generator's Adam learning rate (not in the paper; the multinomial authors' 1e-3).
        width, levels: the U-Net's first-level channels and resolution levels (not in the paper;
            the multinomial authors' 64 and 5; 8 or so at CPU scale).
        samplenet_steps: steps of the TransformNet (the multinomial attack's SampleNet).
        reference_run: finished clean run whose classifier is the benign model ``theta_c`` the
            attacked one starts from and is clipped against; without it :meth:`fit` trains one.
        reference_model, reference_width, reference_epochs: the benign model :meth:`fit` trains
            (default: the victim's architecture, 4 epochs of veil's training defaults).
    """

    mask: Literal["hill", "sobel", "none"] = "hill"
    threshold: float | None = None
    per_channel_mask: bool = False
    generator: Literal["hardtanh", "mpm"] = "hardtanh"
    bound: float | None = None
    mpm_pairs: int = 2
    clip_ratio: float | None = None
    clean_weight: float = 1.0
    ssim_weight: float | None = None
    l2_weight: float = 0.0
    lr: float = 1e-3
    width: int = 64
    levels: int = 5
    samplenet_steps: int = 2000
    reference_run: str | None = None
    reference_model: str | None = None
    reference_width: int | None = None
    reference_epochs: int = 4

    # the values in force, Table 3's where an option is None
    @property
    def t(self) -> float:
        return TABLE3[self.mask]["threshold"] if self.threshold is None else float(self.threshold)

    @property
    def i(self) -> float:
        return TABLE3[self.mask]["bound"] if self.bound is None else float(self.bound)

    @property
    def r(self) -> float:
        return CLIP_BY_GENERATOR[self.generator] if self.clip_ratio is None else float(self.clip_ratio)

    @property
    def b(self) -> float:
        if self.ssim_weight is not None:
            return float(self.ssim_weight)
        return TABLE3[self.mask]["ssim_weight"] if self.generator == "hardtanh" else 0.0
