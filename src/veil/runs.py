"""A run's configuration and a finished run brought back from its record.

:class:`RunConfig` is everything that defines a run (``config.json``); :func:`load_run` rebuilds a
finished run's classifier and attack from its record, which is what defenses and analyses start
from. Below the training orchestrator (:mod:`veil.experiment`) and the command line.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from veil import records as rec
from veil.attacks import ATTACKS, Attack
from veil.data import ImageDataset, PoisonedDataset, load_dataset, stratified_subset
from veil.data.datasets import DATASETS
from veil.errors import ConfigError
from veil.models import MODELS
from veil.models.loading import load_classifier
from veil.train import TrainConfig, resolve_device

log = logging.getLogger(__name__)

__all__ = [
    "EVAL_SHARE", "LoadedRun", "RunConfig", "check_run_memory", "create_run_attack", "eval_subset", "load_run", "load_run_data", "resolve_config",
]


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a run (written to ``config.json``).

    One flat record, so that ``config.json``, sweep files and recipes name each setting the same
    way. The training settings ``epochs``, ``batch_size``, ``lr``, ``weight_decay``, ``schedule``,
    ``anneal_fraction`` and ``optimizer`` are :class:`TrainConfig`'s fields, with its defaults and
    its documentation (:meth:`train_config` builds it; ``base_augment`` is its ``augment``); the
    attack is ``attack`` with its own options in ``attack_options``, validated by the attack's
    ``Config``; ``veil run``'s flags are made from these fields (:func:`veil.options.add_dataclass_arguments`).

    Attributes:
        attack: registered attack name (``none`` for a clean reference model).
        dataset: registered dataset name.
        model: registered model name.
        out: run folder.
        data_root: dataset folder (not needed for ``gtsrb_sample``).
        width: model base width (``None``: the architecture's default).
        image_size: square image side.
        poison_rate: share of the training set poisoned, in (0, 1].
        poison_count: absolute poisoned count (overrides ``poison_rate``).
        target: target label.
        mode: ``all2one`` or ``all2all``.
        all_targets: poison towards every label at once (attacks with an ``all_targets`` option,
            e.g. ``multinomial``); the attack's ASR set then covers every label.
        seed: seed of everything random in the run.
        attack_options: attack-specific options (see each attack's ``Config``).
        augment: extra training augmentation of the (poisoned) training images, e.g. ``jpeg``,
            ``autoencoder`` or ``jpeg+autoencoder`` (see :mod:`veil.augment`).
        base_augment: the trainer's standard augmentation (random crop with 4-pixel padding, plus
            horizontal flips where the dataset allows them). ``False`` trains on the images as
            they are, which some papers' victims do and which decides whether shift-sensitive
            triggers (the ``frequency`` attack's fixed-phase cosines) are learned at CPU scale.
        train_subset, test_subset: stratified subset sizes for CPU-scale runs.
        stealth_samples: test images the stealth metrics are averaged over.
        device: ``auto``, ``cpu`` or ``cuda``.
        download: download the dataset and the LPIPS backbone if missing (needs a network).
        cache_dir: decoded-dataset cache (``None``: ``$VEIL_CACHE`` or ``~/.cache/veil``).
        lpips_weights: folder holding ``alexnet_imagenet_features.pth`` (``None``: ``$VEIL_WEIGHTS``).
        lpips_net: the LPIPS network of the stealth metrics: ``alex`` (veil's default, the LPIPS
            authors' recommendation) or ``vgg`` (VGG-16 features, as the semantic-feature paper
            reports; its backbone ``vgg16_imagenet_features.pth`` in the weights folder, or
            torchvision's file in the torch hub cache). The record names it
            (``stealth.lpips_net``).
        init_from: a finished run whose classifier and attack weights (trigger generator) this
            run starts from instead of a fresh initialisation, to train a finished run further
            (optimiser state and schedule start afresh). Its attack, dataset, model, width and
            image size must be this run's.
        overwrite: replace a finished run in ``out``.
        progress: progress bars.
        eval_every: epochs between the clean-accuracy / success-rate evaluations during training
            (1: every epoch; 0: none before the end). The full test set is always evaluated once
            training ends; that is what ``metrics.json`` reports.
        eval_images: test images those evaluations during training use (a seeded stratified
            subset; its ASR set is the subset's images of other labels): ``"auto"`` (3 % of the
            training set's size, at least one image per class, so that they cost about 5 % of the training time or less, measured
            by ``bench/bench_eval.py``), ``"all"`` (the whole test set, veil 0.1's behaviour) or a
            number.
        recipe: the named recipe (:mod:`veil.recipes`) this run's settings came from, if any;
            settings given on the command line override the recipe's.
        sources: where each setting came from (``"user"``, ``"recipe"``, ``"paper"``: the
            attack's :attr:`~veil.attacks.Attack.paper_training`, ``"veil default"``), filled by
            :func:`resolve_config`; empty for a RunConfig built directly.
    """

    attack: str
    dataset: str
    model: str
    out: str
    data_root: str | None = None
    width: int | None = None
    image_size: int = 32
    epochs: int = TrainConfig.epochs
    batch_size: int = TrainConfig.batch_size
    lr: float = TrainConfig.lr
    weight_decay: float = TrainConfig.weight_decay
    schedule: str = TrainConfig.schedule
    anneal_fraction: float = TrainConfig.anneal_fraction
    optimizer: str = TrainConfig.optimizer
    poison_rate: float = 0.1
    poison_count: int | None = None
    target: int = 0
    mode: str = "all2one"
    all_targets: bool = False
    seed: int = 0
    attack_options: dict[str, Any] = field(default_factory=dict)
    augment: str | None = None
    base_augment: bool = TrainConfig.augment
    train_subset: int | None = None
    test_subset: int | None = None
    stealth_samples: int = 1000
    device: str = "auto"
    download: bool = False
    cache_dir: str | None = None
    lpips_weights: str | None = None
    lpips_net: str = "alex"
    init_from: str | None = None
    overwrite: bool = False
    progress: bool = True
    eval_every: int = 1
    eval_images: int | str = "auto"
    recipe: str | None = None
    sources: dict[str, str] = field(default_factory=dict)

    def validate(self) -> None:
        """Check names, types and ranges that can be checked without loading data."""
        from veil.options import check_types

        check_types(RunConfig, {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}, "run setting",
                    none_is_default=False)
        ATTACKS.get(self.attack)
        MODELS.get(self.model)
        DATASETS.get(self.dataset)
        if self.poison_count is None and not (0.0 < self.poison_rate <= 1.0):
            raise ConfigError(f"poison rate {self.poison_rate} is outside (0, 1]")
        if self.poison_count is not None and self.poison_count <= 0:
            raise ConfigError(f"poison count must be positive, got {self.poison_count}")
        if self.target < 0:
            raise ConfigError(f"target label {self.target} is negative")
        if self.image_size < 8:
            raise ConfigError(f"image size {self.image_size} is too small")
        for name, v in (("train subset", self.train_subset), ("test subset", self.test_subset),
                        ("stealth samples", self.stealth_samples), ("width", self.width)):
            if v is not None and v <= 0:
                raise ConfigError(f"{name} must be positive, got {v}")
        self.train_config()
        if self.eval_every < 0:
            raise ConfigError(f"eval_every must be 0 or more epochs, got {self.eval_every}")
        if not (self.eval_images in ("auto", "all") or (isinstance(self.eval_images, int) and self.eval_images > 0)):
            raise ConfigError(f"eval_images must be 'auto', 'all' or a positive number of test images, got {self.eval_images!r}")
        from veil.metrics.lpips import LPIPS_NETS

        if self.lpips_net not in LPIPS_NETS:
            raise ConfigError(f"unknown LPIPS network {self.lpips_net!r}; known: {', '.join(LPIPS_NETS)}")
        if self.augment:
            from veil.augment import parse_augment

            parse_augment(self.augment)
        from veil.models import model_class

        model_class(self.model).check_image_size(self.image_size)
        self.check_attack_options()

    def check_attack_options(self) -> None:
        """The attack options against the attack's Config, without building the attack (which may
        need data): names, and values its Config refuses."""
        from veil.options import build_options

        cls = ATTACKS.get(self.attack)
        shared = ("target", "mode", "poison_rate", "poison_count", "seed")
        clash = sorted(set(self.attack_options) & set(shared))
        if clash:
            raise ConfigError(f"attack option {clash[0]!r} is a run setting; set {clash[0]} directly, not under attack_options")
        build_options("attack", self.attack, cls.Config, {**self.attack_options, **{k: getattr(self, k) for k in shared}},
                      hidden=frozenset(shared))

    def train_config(self, amp: bool = True) -> TrainConfig:
        """The trainer's settings of this run (validated by TrainConfig itself)."""
        return TrainConfig(
            epochs=self.epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            weight_decay=self.weight_decay,
            schedule=self.schedule,
            anneal_fraction=self.anneal_fraction,
            optimizer=self.optimizer,
            seed=self.seed,
            augment=self.base_augment,
            amp=amp,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def field_docs(cls) -> dict[str, str]:
        """Each field's documentation as plain text: this class's, and :class:`TrainConfig`'s for
        the training settings."""
        from veil.options import attribute_docs

        return {**attribute_docs(TrainConfig), **attribute_docs(cls)}


def load_run_data(config: RunConfig) -> tuple[ImageDataset, ImageDataset]:
    """The run's training and test sets, with its stratified subsets."""
    kw = dict(image_size=config.image_size, download=config.download, cache_dir=config.cache_dir)
    train = load_dataset(config.dataset, config.data_root, "train", **kw)
    test = load_dataset(config.dataset, config.data_root, "test", **kw)
    for what, n, data in (("train", config.train_subset, train), ("test", config.test_subset, test)):
        if n is not None and n > len(data):
            raise ConfigError(f"{what} subset {n} is larger than the {what} set ({len(data)} images)")
    if config.train_subset:
        train = stratified_subset(train, config.train_subset, seed=config.seed)
    if config.test_subset:
        test = stratified_subset(test, config.test_subset, seed=config.seed)
    return train, test


#: RunConfig fields that say where and how a run goes, not what it trains: no source is recorded
_PLUMBING = ("out", "overwrite", "progress", "device", "download", "cache_dir", "lpips_weights", "recipe", "sources")


def resolve_config(given: dict[str, Any], recipe: dict[str, Any] | None = None, recipe_name: str | None = None) -> RunConfig:
    """A RunConfig from settings in order of precedence: ``given`` (the user's: flags, a sweep
    file's values, Python keywords), then ``recipe`` (a named recipe's run), then the attack's
    paper (:attr:`~veil.attacks.Attack.paper_training`), then RunConfig's defaults.
    ``attack_options`` merge option by option (the user's over the recipe's). ``sources`` records
    where each setting came from.

    Raises:
        ConfigError: no attack is named, or the attack is unknown.
    """
    recipe = dict(recipe or {})
    attack = given.get("attack", recipe.get("attack"))
    if attack is None:
        raise ConfigError("no attack given")
    cls = ATTACKS.get(attack)
    dataset = given.get("dataset", recipe.get("dataset"))
    paper = {**cls.paper_training, **cls.paper_training_by_dataset.get(str(dataset), {})}
    settings: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for f in dataclasses.fields(RunConfig):
        if f.name in ("sources", "recipe"):
            continue
        for source, values in (("user", given), ("recipe", recipe), ("paper", paper)):
            if f.name in values:
                settings[f.name], sources[f.name] = values[f.name], source
                break
        else:
            sources[f.name] = "veil default"
    options = {**dict(recipe.get("attack_options") or {}), **dict(given.get("attack_options") or {})}
    settings["attack_options"] = options
    sources["attack_options"] = "user" if given.get("attack_options") else "recipe" if options else "veil default"
    kept = {k: v for k, v in sources.items() if k not in _PLUMBING}
    return RunConfig(**settings, recipe=recipe_name, sources=kept)


#: share of the training set's size that ``eval_images="auto"`` evaluates during training
EVAL_SHARE = 0.03


def eval_subset(config: RunConfig, train: ImageDataset, test: ImageDataset) -> ImageDataset:
    """The test images evaluated during training (``config.eval_images``): ``test`` itself for
    ``"all"`` or a size at least the test set's, else a seeded stratified subset."""
    import math

    if config.eval_images == "all":
        return test
    if config.eval_images == "auto":  # at least one image of every class
        n = max(math.ceil(EVAL_SHARE * len(train)), int(test.labels.unique().numel()))
    else:
        n = int(config.eval_images)
    return test if n >= len(test) else stratified_subset(test, n, seed=config.seed + 1)


def create_run_attack(config: RunConfig, num_classes: int, image_shape: tuple[int, int, int]) -> Attack:
    """The run's attack; ``all_targets`` is passed only when set (attacks without the option
    then refuse it)."""
    from veil.options import build_options

    options = dict(config.attack_options)
    if config.all_targets:
        options["all_targets"] = True
    cls = ATTACKS.get(config.attack)
    attack_config = build_options("attack", config.attack, cls.Config, {**options, **_shared_options(config)})
    return cls(attack_config, num_classes, image_shape)


def _shared_options(config: RunConfig) -> dict[str, Any]:
    return dict(target=config.target, mode=config.mode, poison_rate=config.poison_rate,
                poison_count=config.poison_count, seed=config.seed)


def check_run_memory(config: RunConfig, num_classes: int, image_shape: tuple[int, int, int],
                     device: torch.device) -> None:
    """Refuse a run whose training cannot fit in ``device``'s memory (the classifier and the
    attack's own networks, estimated before either is built: :mod:`veil.resources`)."""
    from veil.options import build_options
    from veil.resources import check_fits, classifier_bytes, format_bytes

    cls = ATTACKS.get(config.attack)
    options = {**config.attack_options, **({"all_targets": True} if config.all_targets else {})}
    attack_config = build_options("attack", config.attack, cls.Config, {**options, **_shared_options(config)})
    attack_bytes = cls.memory_bytes(attack_config, num_classes, image_shape, config.batch_size)
    model_bytes = classifier_bytes(config.model, num_classes, config.image_size, config.width, config.batch_size,
                                   channels=image_shape[0])
    check_fits(attack_bytes + model_bytes,
               f"training {config.model} (width {config.width}, image size {config.image_size}, batch "
               f"{config.batch_size}: {format_bytes(model_bytes)}) with attack {config.attack!r} "
               f"({format_bytes(attack_bytes)})",
               "lower the image size, width, batch size or the attack's size options", device)


@dataclass
class LoadedRun:
    """A finished run brought back from its record: what defenses and analyses start from.

    Attributes:
        record: the run folder.
        config: the run's :class:`RunConfig`.
        model: the trained classifier, in eval mode on ``device``.
        attack: the attack with its trigger restored from ``attack.safetensors``.
    """

    record: rec.RunRecord
    config: RunConfig
    model: torch.nn.Module
    attack: Attack

    def data(self, data_root: str | None = None, cache_dir: str | None = None) -> tuple[ImageDataset, ImageDataset]:
        """The run's training and test sets (same subsets as the run; ``data_root`` overrides the
        recorded folder, e.g. on another machine)."""
        config = self.config
        if data_root is not None or cache_dir is not None:
            config = dataclasses.replace(
                config, data_root=data_root or config.data_root, cache_dir=cache_dir or config.cache_dir
            )
        return load_run_data(config)

    def poisoned_train(self, train: ImageDataset) -> PoisonedDataset:
        """The training set as the attack poisoned it (recorded poison indices)."""
        idx = torch.tensor(self.record.poison_indices()["poison"], dtype=torch.long)
        return self.attack.poison(train, indices=idx) if idx.numel() else self.attack.poison(train)


def load_run(run_dir: str | Path, device: str | torch.device = "cpu") -> LoadedRun:
    """Load a finished run's configuration, classifier weights and attack trigger.

    Raises:
        RecordError: the folder is missing or holds no finished run.
        CheckpointError: the weights file is missing, truncated or corrupted.
    """
    model, raw = load_classifier(run_dir, device=resolve_device(device))
    record = rec.RunRecord(run_dir)
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    config = RunConfig(**{k: v for k, v in raw.items() if k in fields})
    known = {f.name for f in dataclasses.fields(ATTACKS.get(config.attack).Config)}
    removed = sorted(set(config.attack_options) - known)
    if removed:  # options an older veil had (e.g. multinomial settle_fraction, removed in 0.2)
        log.warning("run %s was recorded with attack option(s) %s, which this veil no longer has; loading it without them",
                    run_dir, ", ".join(removed))
        config = dataclasses.replace(config, attack_options={k: v for k, v in config.attack_options.items() if k in known})
    num_classes = int(model.head.weight.shape[0])
    in_channels = int(getattr(model, "in_channels", 3))
    attack = create_run_attack(config, num_classes, (in_channels, config.image_size, config.image_size))
    attack.load_state_dict(record.attack_state())
    return LoadedRun(record=record, config=config, model=model, attack=attack)
