"""The attack API every attack in veil implements.

An attack is configured by a frozen dataclass (``Attack.Config``) whose defaults cite its paper.
An attack declares its :attr:`Attack.kind` (:data:`ATTACK_KINDS`). Data-poisoning attacks
(``"poison"``: BadNets, Blend, ...) implement :meth:`Attack.apply`, a pure batched trigger
function on images in ``[0, 1]``; attacks that learn a trigger first (``"fit"``: frequency)
override :meth:`Attack.fit`; attacks that control training (``"train"``: adaptive, multinomial,
ATTEQ) return a :class:`veil.train.TrainHook` from :meth:`Attack.training_hook`.

Poisoned images are quantised to 8 bits, as a saved poisoned image would be, both when the training
set is poisoned and when test images are poisoned to measure the attack success rate.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from torch import Tensor

from veil.data.base import ImageDataset, PoisonedDataset, quantize, to_float, to_uint8
from veil.errors import ConfigError
from veil.registry import Registry

if TYPE_CHECKING:
    from veil.train import TrainHook

log = logging.getLogger(__name__)

AttackKind = Literal["poison", "fit", "train"]
#: the kinds of attack and what each means for the run that mounts it
ATTACK_KINDS: dict[str, str] = {
    "poison": "poisons data only: its trigger is fixed by its options, and apply() works from the start",
    "fit": "fits its trigger first: fit() learns it (from a reference model, an optimisation) before "
    "apply() works, then it poisons data",
    "train": "controls the victim's training: training_hook() co-trains or reshapes training, and the "
    "poisoned images depend on training, so the hook poisons batches on the fly",
}

ATTACKS: Registry[type[Attack]] = Registry("attack")


def register_attack(name: str):  # type: ignore[no-untyped-def]
    """Class decorator: register an :class:`Attack` subclass under ``name``."""

    def decorator(cls: type[Attack]) -> type[Attack]:
        cls.name = name
        return ATTACKS.register(name)(cls)

    return decorator


@dataclass(frozen=True)
class AttackConfig:
    """Options every attack shares.

    Attributes:
        target: the target label (all-to-one).
        mode: ``"all2one"`` (every poisoned input goes to ``target``) or ``"all2all"``
            (label ``y`` goes to ``(y + 1) % num_classes``).
        poison_rate: share of the training set poisoned, in (0, 1]. For clean-label attacks it is
            the share of the target class that is poisoned.
        poison_count: absolute number of poisoned training images; overrides ``poison_rate``.
        seed: seed for the choice of poisoned rows and any random trigger.
    """

    target: int = 0
    mode: Literal["all2one", "all2all"] = "all2one"
    poison_rate: float = 0.1
    poison_count: int | None = None
    seed: int = 0


class Attack:
    """Base class of all attacks.

    Args:
        config: an instance of ``type(self).Config``.
        num_classes: number of classes of the victim's dataset.
        image_shape: ``(C, H, W)`` of the victim's images.

    Subclasses set ``Config`` to a frozen dataclass deriving from :class:`AttackConfig` and
    implement :meth:`apply`.
    """

    name: ClassVar[str] = "attack"
    Config: ClassVar[type[AttackConfig]] = AttackConfig
    #: clean-label attacks poison only target-class images and keep their labels
    clean_label: ClassVar[bool] = False
    #: what the attack is, for the run that mounts it (see :data:`ATTACK_KINDS`)
    kind: ClassVar[AttackKind] = "poison"
    #: attacks whose trigger lives below bfloat16's resolution (one grey level) set this True:
    #: ``veil run`` then trains without bfloat16 autocast on CUDA
    full_precision: ClassVar[bool] = False
    #: the run settings the attack's paper trains its victim with (RunConfig fields: optimizer,
    #: lr, batch_size, weight_decay, schedule, epochs, image_size, base_augment, ...). ``veil run``
    #: and sweeps use them for every setting the user (or a recipe) leaves unset, and record each
    #: setting's source; empty where the paper gives none (veil's defaults then apply)
    paper_training: ClassVar[dict[str, Any]] = {}
    #: run settings the paper gives per dataset (``{dataset: {setting: value}}``), over
    #: :attr:`paper_training` for that dataset (ATTEQ's target and poisoning ratio, section 5.1)
    paper_training_by_dataset: ClassVar[dict[str, dict[str, Any]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.kind not in ATTACK_KINDS:
            raise TypeError(f"{cls.__name__}.kind is {cls.kind!r}; kinds: {', '.join(ATTACK_KINDS)}")

    def __init__(self, config: AttackConfig, num_classes: int, image_shape: tuple[int, int, int]) -> None:
        if not isinstance(config, self.Config):
            raise TypeError(f"{type(self).__name__} needs a {self.Config.__name__}, got {type(config).__name__}")
        self.config = config
        self.num_classes = int(num_classes)
        self.image_shape = tuple(int(s) for s in image_shape)
        self._validate()

    # ------------------------------------------------------------------ construction
    @classmethod
    def memory_bytes(cls, config: AttackConfig, num_classes: int, image_shape: tuple[int, int, int], batch_size: int) -> int:
        """Estimated bytes the attack needs in training with ``config`` (a generator's weights and
        activations, say), computed *before* it is built so that ``veil run`` can refuse sizes that
        cannot fit (:mod:`veil.resources`). 0 for attacks whose state is a few images' worth."""
        return 0

    @classmethod
    def from_options(cls, num_classes: int, image_shape: tuple[int, int, int], **options: Any) -> Attack:
        """Build from keyword options, ignoring ``None`` values and refusing unknown names."""
        from veil.options import build_options

        config = build_options("attack", cls.name, cls.Config, options)
        return cls(config, num_classes, image_shape)

    def _validate(self) -> None:
        c = self.config
        if not 0 <= c.target < self.num_classes:
            raise ConfigError(f"target label {c.target} is outside the dataset's classes 0..{self.num_classes - 1}")
        if c.mode not in ("all2one", "all2all"):
            raise ConfigError(f"mode must be 'all2one' or 'all2all', got {c.mode!r}")
        if c.poison_count is None and not (0.0 < c.poison_rate <= 1.0):
            raise ConfigError(f"poison rate {c.poison_rate} is outside (0, 1]")
        if c.poison_count is not None and c.poison_count <= 0:
            raise ConfigError(f"poison count must be positive, got {c.poison_count}")
        if self.clean_label and c.mode != "all2one":
            raise ConfigError(f"attack {self.name!r} is clean-label and supports only mode 'all2one'")

    # ------------------------------------------------------------------ trigger
    def apply(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """Stamp the trigger on a batch.

        Args:
            x: float images ``(B, C, H, W)`` in ``[0, 1]``.
            y: their true labels ``(B,)`` (used by label-dependent triggers; may be ``None``).

        Returns:
            Poisoned float images, same shape, in ``[0, 1]`` (not yet quantised).
        """
        raise NotImplementedError

    def apply_test(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """The trigger used at test time (for the attack-success-rate set); :meth:`apply` unless
        the attack's paper uses a different test-time trigger (e.g. SIG's ``test_delta``)."""
        return self.apply(x, y)

    def _check_batch(self, x: Tensor) -> None:
        """Refuse a batch whose ``(C, H, W)`` differs from the attack's ``image_shape`` (the trigger
        tensors are built for that size)."""
        if x.dim() != 4 or tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(
                f"attack {self.name!r} was built for images {self.image_shape}, got a batch of shape {tuple(x.shape)}"
            )

    def fit(
        self, train: ImageDataset, device: torch.device | str = "cpu", victim: dict[str, Any] | None = None
    ) -> None:
        """Learn whatever the trigger needs before poisoning (no-op for fixed triggers).

        ``victim`` describes the classifier the run trains (``{"model": name, "width": width}``),
        for attacks whose paper builds a reference model like the victim; ``None`` when unknown."""

    def figures(self) -> dict[str, bytes]:
        """PNG figures the attack made while fitting (e.g. a Fourier heatmap), by file name; the run
        writes them to ``RUN/figures/`` and the report shows them."""
        return {}

    def tables(self) -> dict[str, dict[str, Any]]:
        """Tables ``{"title", "columns", "rows"}`` by name; written to ``RUN/tables/NAME.json``."""
        return {}

    def training_notes(self, train: ImageDataset, crop_padding: int, hflip: bool) -> list[str]:
        """Known ways this run's set-up weakens the attack, one sentence each: the victim's
        augmentation, or a poison budget measured too small (``docs/attacks/``).

        ``veil run`` logs each as a warning before training and keeps them in ``metrics["notes"]``.
        Poisoned images are stamped *before* the victim's augmentation (the data-poisoning threat
        model: the attacker hands over images, the victim augments them), so a trigger the random
        crop cuts off, or a flip mirrors, is not what the victim learns.

        Args:
            train: the clean training set the attack will poison.
            crop_padding: zero padding of the victim's random crop in pixels (0: no crop).
            hflip: whether the victim flips images horizontally.
        """
        return []

    def training_hook(self) -> TrainHook | None:
        """A hook that changes training (extra losses, generators, clipping), or ``None``."""
        return None

    def evaluate(self, model: torch.nn.Module, test: ImageDataset) -> dict[str, Any]:
        """Attack-specific measurements of the trained model on the clean test set (JSON-ready),
        after training; the run stores them as ``metrics["attack_metrics"]`` and writes
        :meth:`tables` and :meth:`figures` again afterwards, so those may show them."""
        return {}

    def target_labels(self, y: Tensor) -> Tensor:
        """The label each poisoned input should be classified as."""
        if self.config.mode == "all2all":
            return (y + 1) % self.num_classes
        return torch.full_like(y, self.config.target)

    # ------------------------------------------------------------------ poisoning
    def eligible_rows(self, dataset: ImageDataset) -> Tensor:
        """Rows that may be poisoned: target-class rows for clean-label attacks; rows whose label
        differs from the target for dirty-label all-to-one (so that every poisoned row teaches the
        backdoor); every row for all-to-all."""
        if self.clean_label:
            return torch.nonzero(dataset.labels == self.config.target).flatten()
        if self.config.mode == "all2one":
            return torch.nonzero(dataset.labels != self.config.target).flatten()
        return torch.arange(len(dataset))

    def poison_count_for(self, dataset: ImageDataset) -> int:
        """Number of rows to poison: ``poison_count`` if given, else ``round(rate * N)`` where ``N``
        is the training-set size (the target-class size for clean-label attacks). Attacks of kind
        ``"train"`` add poisoned *copies* of rows rather than replacing them, so a rate whose count
        exceeds the eligible rows takes them all: ``poison_rate=1.0`` is a copy of every row whose
        label is not the target."""
        eligible = self.eligible_rows(dataset).numel()
        if self.config.poison_count is not None:
            n = self.config.poison_count
        else:
            base = eligible if self.clean_label else len(dataset)
            n = max(1, round(self.config.poison_rate * base))
            if self.kind == "train":
                n = min(n, eligible)
        if n > eligible:
            raise ConfigError(
                f"cannot poison {n} images: only {eligible} training images are eligible for attack {self.name!r}"
            )
        return int(n)

    def select_poison_indices(self, dataset: ImageDataset) -> Tensor:
        """Choose the rows to poison, deterministically under ``config.seed``; sorted."""
        eligible = self.eligible_rows(dataset)
        n = self.poison_count_for(dataset)
        g = torch.Generator().manual_seed(self.config.seed)
        pick = torch.randperm(eligible.numel(), generator=g)[:n]
        return eligible[pick].sort().values

    def apply_quantized(
        self, x: Tensor, y: Tensor | None = None, batch_size: int = 512, test: bool = False
    ) -> Tensor:
        """:meth:`apply` (or :meth:`apply_test` when ``test``) in batches, clamped to ``[0, 1]`` and
        rounded to 8 bits."""
        fn = self.apply_test if test else self.apply
        outs = []
        with torch.no_grad():
            for i in range(0, x.shape[0], batch_size):
                yb = None if y is None else y[i : i + batch_size]
                outs.append(quantize(fn(x[i : i + batch_size], yb).clamp(0, 1)))
        return torch.cat(outs) if outs else x.clone()

    def poison(self, dataset: ImageDataset, indices: Tensor | None = None) -> PoisonedDataset:
        """Poison a training set.

        Args:
            dataset: the clean training set.
            indices: rows to poison; chosen by :meth:`select_poison_indices` when ``None``.

        Returns:
            A :class:`PoisonedDataset` whose images at ``poison_indices`` carry the trigger and whose
            labels there are the target labels (unchanged for clean-label attacks).
        """
        idx = self.select_poison_indices(dataset) if indices is None else torch.as_tensor(indices).long().sort().values
        images = dataset.images.clone()
        labels = dataset.labels.clone()
        if idx.numel():
            x = to_float(dataset.images[idx])
            y = dataset.labels[idx]
            images[idx] = to_uint8(self.apply_quantized(x, y))
            if not self.clean_label:
                labels[idx] = self.target_labels(y)
        log.info("%s poisoned %d of %d training images", self.name, idx.numel(), len(dataset))
        return PoisonedDataset(
            images=images,
            labels=labels,
            classes=dataset.classes,
            name=dataset.name,
            hflip=dataset.hflip,
            poison_indices=idx,
            original_labels=dataset.labels.clone(),
        )

    def training_set(self, dataset: ImageDataset) -> PoisonedDataset:
        """The training set the trainer gets: :meth:`poison` for attacks that poison data before
        training; attacks of kind ``"train"`` return the clean images with the rows their training
        hook poisons on the fly as ``poison_indices``."""
        return self.poison(dataset)

    def poison_test(self, dataset: ImageDataset) -> ImageDataset:
        """The attack-success-rate test set: every test image whose true label differs from its
        target label, with the trigger, labelled with the target label."""
        targets = self.target_labels(dataset.labels)
        keep = torch.nonzero(dataset.labels != targets).flatten()
        x = to_float(dataset.images[keep])
        poisoned = to_uint8(self.apply_quantized(x, dataset.labels[keep], test=True))
        return ImageDataset(poisoned, targets[keep], dataset.classes, dataset.name + "-poisoned", dataset.hflip)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Tensor]:
        """Tensors that define the trigger (patterns, generator weights), for the run record."""
        return {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore what :meth:`state_dict` returned."""

    def _state_tensor(self, state: dict[str, Tensor], key: str, like: Tensor) -> Tensor:
        """``state[key]`` as a float CPU tensor checked against the shape of ``like``, for
        :meth:`load_state_dict`; raises :class:`ConfigError` when missing or mis-shaped."""
        if key not in state:
            raise ConfigError(f"attack {self.name!r} state lacks {key!r} (has: {', '.join(sorted(state)) or 'nothing'})")
        value = torch.as_tensor(state[key]).detach().to("cpu", like.dtype)
        if value.shape != like.shape:
            raise ConfigError(
                f"attack {self.name!r} state {key!r} has shape {tuple(value.shape)}, expected {tuple(like.shape)}"
            )
        return value.clone()

    def describe(self) -> dict[str, Any]:
        """The attack's configuration as plain data."""
        return {"name": self.name, **dataclasses.asdict(self.config)}


def create_attack(name: str, num_classes: int, image_shape: tuple[int, int, int], **options: Any) -> Attack:
    """Create a registered attack by name, e.g. ``create_attack("badnets", 43, (3, 32, 32), target=0)``."""
    cls = ATTACKS.get(name)
    return cls.from_options(num_classes, image_shape, **options)


def list_attacks() -> list[str]:
    return ATTACKS.names()
