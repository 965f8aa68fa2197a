"""Backdoor attacks, one module per attack, registered by name on import.

==========  ======================================================  ============
name        paper                                                    label
==========  ======================================================  ============
none        clean reference (no backdoor)                            --
badnets     Gu et al. 2017, patch trigger                            dirty
blend       Chen et al. 2017, blended trigger                        dirty
sig         Barni et al. 2019, sinusoidal signal                     clean
wanet       Nguyen & Tran, ICLR 2021, warping                        dirty
fiba        Feng et al., CVPR 2022, amplitude-spectrum injection     dirty
frequency   Hammoud & Ghanem 2021, top-k heatmap frequencies         dirty
multinomial Zhong et al., IJCAI 2022, multinomial {-1,0,1} trigger   dirty
==========  ======================================================  ============

Example:
    >>> from veil.attacks import create_attack, list_attacks
    >>> "badnets" in list_attacks()
    True
    >>> attack = create_attack("badnets", num_classes=10, image_shape=(3, 32, 32), target=0)
"""

from __future__ import annotations

from veil.attacks import badnets, blend, fiba, none, sig, wanet  # noqa: F401  (register)
from veil.attacks import frequency  # noqa: F401  (register)
from veil.attacks import adaptive, atteq, multinomial, semantic  # noqa: F401  (register)
from veil.attacks.base import ATTACKS, Attack, AttackConfig, create_attack, list_attacks, register_attack

__all__ = ["ATTACKS", "Attack", "AttackConfig", "create_attack", "list_attacks", "register_attack"]
