"""SIG: a clean-label backdoor with a sinusoidal signal.

Barni, Kallas & Tondi, "A New Backdoor Attack in CNNs by Training Set Corruption Without Label
Poisoning", ICIP 2019 (arXiv:1902.11237). A fraction of the *target-class* training images get the
horizontal sinusoid of eq. (5), ``v(i, j) = delta * sin(2 * pi * j * f / m)`` (``j`` the column,
``m`` the width), added and clipped; labels are kept. Defaults: ``delta = 20`` grey levels (of 255)
and ``f = 6``.

At test time the same signal is added by default. Barni et al. also test with a stronger signal
than the one used for poisoning in some settings; ``test_delta`` sets the test-time amplitude.
As for every clean-label attack in veil, ``poison_rate`` is the share of the target class poisoned.
At the BadNets foundation budget the default 0.1 learned no backdoor on GTSRB or the CIFAR-10
subset; the recipes ``sig/cifar10subset-cpu`` (the whole target class, ``poison_rate=1.0``) and
``sig/gtsrb-cpu`` (the whole of the largest class, ``test_delta=40``) did (``docs/attacks/baselines.md``).

Example:
    >>> from veil.attacks import create_attack
    >>> attack = create_attack("sig", 10, (3, 32, 32), target=0, poison_rate=0.3)
    >>> poisoned_train = attack.poison(train)  # only class-0 rows change, labels kept  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from veil.attacks.base import Attack, AttackConfig, register_attack
from veil.data.base import ImageDataset
from veil.errors import ConfigError
from veil.triggers.sinusoid import add_signal, horizontal_sinusoid


@dataclass(frozen=True)
class SIGConfig(AttackConfig):
    """SIG options.

    Attributes:
        delta: signal amplitude in grey levels of 255 (20, Barni et al. 2019).
        freq: periods across the image width (6, Barni et al. 2019).
        test_delta: test-time amplitude in grey levels; ``None`` means ``delta``.
    """

    delta: float = 20.0
    freq: float = 6.0
    test_delta: float | None = None


@register_attack("sig")
class SIG(Attack):
    """SIG (Barni et al. 2019), clean-label: ``x' = clip(x + v)``, ``v(i, j) = delta sin(2 pi j f / m)``.

    Args:
        config: :class:`SIGConfig` (``delta=20``, ``freq=6``, ``test_delta=None`` = ``delta``;
            only ``mode="all2one"``).
        num_classes: number of classes.
        image_shape: ``(C, H, W)``.

    Trigger tensors (``state_dict``): ``signal`` and ``test_signal``, each ``(C, H, W)`` on the
    ``[0, 1]`` scale. ``apply`` / ``apply_test`` map ``(B, C, H, W)`` to ``(B, C, H, W)``.

    Example:
        >>> attack = SIG(SIG.Config(target=0), num_classes=10, image_shape=(3, 32, 32))
        >>> attack.clean_label
        True
    """

    Config = SIGConfig
    clean_label = True

    def __init__(self, config: SIGConfig, num_classes: int, image_shape: tuple[int, int, int]) -> None:
        super().__init__(config, num_classes, image_shape)
        c = self.config
        test_delta = c.delta if c.test_delta is None else c.test_delta
        self.signal = horizontal_sinusoid(self.image_shape, c.delta / 255.0, c.freq)
        self.test_signal = horizontal_sinusoid(self.image_shape, test_delta / 255.0, c.freq)

    def _validate(self) -> None:
        super()._validate()
        c = self.config
        if not 0.0 < c.delta <= 255.0:
            raise ConfigError(f"sig delta {c.delta} is outside (0, 255] grey levels")
        if c.test_delta is not None and not 0.0 < c.test_delta <= 255.0:
            raise ConfigError(f"sig test_delta {c.test_delta} is outside (0, 255] grey levels")
        if c.freq <= 0:
            raise ConfigError(f"sig freq must be positive, got {c.freq}")

    def apply(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """The training signal: ``clip(x + v)`` with amplitude ``delta``."""
        self._check_batch(x)
        return add_signal(x, self.signal)

    def apply_test(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """The test signal: ``clip(x + v)`` with amplitude ``test_delta``."""
        self._check_batch(x)
        return add_signal(x, self.test_signal)

    def training_notes(self, train: ImageDataset, crop_padding: int, hflip: bool) -> list[str]:
        n = self.poison_count_for(train)
        return [
            f"sig is clean-label: it poisons {n} images of the target class, {n / max(len(train), 1):.2%} of the "
            "training set; at the foundation budget 10% of the target class (the default rate) learned no "
            "backdoor; the recipes sig/cifar10subset-cpu (the whole class) and sig/gtsrb-cpu (the whole of "
            "the largest class and a stronger test signal) did (veil recipes; docs/attacks/baselines.md)"
        ]

    def state_dict(self) -> dict[str, Tensor]:
        return {"signal": self.signal.clone(), "test_signal": self.test_signal.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.signal = self._state_tensor(state, "signal", self.signal)
        self.test_signal = self._state_tensor(state, "test_signal", self.test_signal)
