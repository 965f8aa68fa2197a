"""The clean reference classifier some attacks start from: the frequency attack's ``f_0`` (its
Fourier heatmap picks the trigger's frequencies) and the adaptive attack's benign model (the
attacked classifier is fine-tuned from it and clipped against it). Either a finished clean run
(``reference_run``) or one trained here on the clean training set, of the victim's architecture
unless the attack's options name another."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from veil.data.base import ImageDataset
from veil.errors import ConfigError

log = logging.getLogger(__name__)


def encode_architecture(name: str, width: int | None) -> Tensor:
    """``(name, width)`` as a uint8 tensor (``name:width``), for an attack's tensor state."""
    return torch.tensor(list(f"{name}:{'' if width is None else width}".encode("utf-8")), dtype=torch.uint8)


def decode_architecture(t: Tensor) -> tuple[str, int | None]:
    name, _, width = bytes(t.tolist()).decode("utf-8").partition(":")
    return name, int(width) if width else None


def reference_architecture(model: str | None, width: int | None, victim: dict[str, Any] | None) -> tuple[str, int | None]:
    """``(model, width)`` of a trained reference: ``model``/``width`` when given; else the victim's
    (``victim = {"model", "width"}``); else veil's CPU-scale ``preact_resnet18`` at width 16."""
    if model is not None:
        return model, width
    if victim is not None and victim.get("model"):
        return str(victim["model"]), width if width is not None else victim.get("width")
    return "preact_resnet18", width if width is not None else 16


def train_reference(train: ImageDataset, num_classes: int, name: str, width: int | None, epochs: int, seed: int,
                    device: torch.device | str, what: str) -> nn.Module:
    """A clean ``name`` classifier trained on ``train`` for ``epochs`` epochs of veil's training
    defaults, seeded with ``seed``; in eval mode."""
    from veil.models import create_model
    from veil.train import TrainConfig, Trainer

    ch, h, _ = train.image_shape
    log.info("%s: training the clean reference (%s, width %s, %d epochs) on %d images", what, name, width, epochs, len(train))
    model = create_model(name, num_classes=num_classes, image_size=h, width=width, in_channels=ch, seed=seed)
    Trainer(model, train, TrainConfig(epochs=epochs, seed=seed), device=device).fit()
    return model.eval()


def load_reference(run: str | Path, train: ImageDataset, num_classes: int, device: torch.device | str,
                   what: str) -> tuple[nn.Module, dict[str, Any]]:
    """The classifier of the finished clean run ``run``, checked against the training set (image
    size and classes; a different dataset is logged), and its recorded config."""
    from veil.models.loading import load_classifier
    from veil.train import resolve_device

    model, config = load_classifier(run, device=resolve_device(device))
    size = train.image_shape[1]
    if config.get("image_size", 32) != size:
        raise ConfigError(f"reference run {run} was trained on {config.get('image_size', 32)}px images, the attack is for {size}px")
    head = getattr(model, "head", None)
    if isinstance(head, nn.Linear) and head.out_features != num_classes:
        raise ConfigError(f"reference run {run} has {head.out_features} classes, the training set {num_classes}")
    if config.get("dataset") != train.name:
        log.warning("%s: reference run %s was trained on %r, the attack poisons %r", what, run, config.get("dataset"), train.name)
    return model, config


def analysis_cache(reference_run: str | Path | None, stem: str, train: ImageDataset, **settings: Any) -> Path | None:
    """Where an attack caches what it computed from ``reference_run`` (a heatmap, a fitted
    generator): ``REFERENCE_RUN/analysis/STEM-DATASET-nSIZE-HxW-SETTINGS.safetensors``, one file per
    training set (name and size), image size and ``settings`` (the options the result depends
    on), so that the points of a sweep over one reference run compute it once. ``None`` without
    a reference run."""
    if reference_run is None:
        return None
    _, h, w = train.image_shape
    parts = "-".join(f"{k}{v:g}" if isinstance(v, float) else f"{k}{v}" for k, v in settings.items())
    return Path(reference_run) / "analysis" / f"{stem}-{train.name}-n{len(train)}-{h}x{w}-{parts}.safetensors"


def write_analysis_cache(path: Path | None, tensors: dict[str, Tensor], what: str,
                         metadata: dict[str, str] | None = None) -> None:
    """Write a cache file atomically; a read-only reference run only logs that it could not."""
    from veil.records import atomic_save_tensors

    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_save_tensors(path, {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata)
    except OSError as exc:
        log.warning("%s: could not cache in %s (%s)", what, path, exc)
    else:
        log.info("%s: cached in %s", what, path)


def benign_reference(config: Any, train: ImageDataset, num_classes: int, device: torch.device | str,
                     victim: dict[str, Any] | None, what: str, why: str) -> tuple[nn.Module, tuple[str, int | None]]:
    """The benign model an attack that starts the victim from it needs (the adaptive attack's
    ``theta_c``, ATTEQ's ``F_V``): ``config.reference_run``'s, else one trained on ``train``
    (``config.reference_model`` / ``reference_width`` / ``reference_epochs``, of the victim's
    architecture by default); ``(model, (name, width))``. A benign model of another architecture
    than the victim's is refused (``why`` says why), before any training."""

    def check(arch: tuple[str, int | None]) -> None:
        if victim is not None and victim.get("model") and (victim["model"], victim.get("width")) != arch:
            raise ConfigError(f"the benign model is {arch[0]} (width {arch[1]}) but the victim is {victim['model']} "
                              f"(width {victim.get('width')}): {why}")

    if config.reference_run is not None:
        model, ref = load_reference(config.reference_run, train, num_classes, device, what)
        arch = (str(ref["model"]), ref.get("width"))
        check(arch)
        return model, arch
    arch = reference_architecture(config.reference_model, config.reference_width, victim)
    check(arch)
    return train_reference(train, num_classes, arch[0], arch[1], config.reference_epochs, config.seed, device, what), arch
