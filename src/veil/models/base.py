"""The classifier interface every attack and defense in veil relies on.

A :class:`Classifier` takes float images in ``[0, 1]`` of shape ``(B, C, H, W)`` and normalises them
itself with fixed buffers ``mean`` and ``std`` (``(x - mean) / std``), so triggers, metrics and
defenses all work in pixel space and never need to know a model's normalisation. The defaults,
``mean = 0.5`` and ``std = 0.25`` per channel, map ``[0, 1]`` onto ``[-2, 2]``; they are buffers, so
they are saved in the ``state_dict`` with the weights.

Every classifier splits into ``features(x) -> (B, feature_dim)`` (penultimate features, after global
pooling) and ``classify(f) -> logits`` (the final ``nn.Linear``, ``head``), and names the stages whose
output maps defenses read (:meth:`Classifier.feature_layers`) and its last convolution
(:attr:`Classifier.last_conv`, the layer fine-pruning prunes; Liu et al., "Fine-Pruning: Defending
Against Backdooring Attacks on Deep Neural Networks", RAID 2018).

Models are registered by name with :func:`register_model` (a class decorator) and built with
:func:`veil.models.create_model`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from veil.errors import ConfigError
from veil.registry import Registry

log = logging.getLogger(__name__)

__all__ = [
    "Classifier",
    "MODELS",
    "register_model",
    "init_weights",
    "DEFAULT_MEAN",
    "DEFAULT_STD",
]

#: default per-channel normalisation: ``(x - 0.5) / 0.25`` maps ``[0, 1]`` onto ``[-2, 2]``
DEFAULT_MEAN = 0.5
DEFAULT_STD = 0.25

ImageSize = int | tuple[int, int]


class _StopForward(Exception):
    """Raised by the hook of :meth:`Classifier.feature_map` once the requested output is captured."""


class Classifier(nn.Module):
    """Base class of every model in veil.

    Args:
        num_classes: number of output logits (at least 2).
        in_channels: number of input channels (3 for RGB, 1 for grayscale).
        image_size: the image size the model is built for (``int`` or ``(H, W)``). Only models
            whose parameters depend on it (the ViT's position embedding) use it; CNNs pool globally
            and take any size from :attr:`min_size` up.
        mean: per-channel mean subtracted from the ``[0, 1]`` input; a number (same for every
            channel) or one value per channel. Default ``0.5``.
        std: per-channel standard deviation the input is divided by; a number or one value per
            channel. Default ``0.25``.

    Subclasses build their layers, set :attr:`feature_dim`, :attr:`head` (``nn.Linear(feature_dim,
    num_classes)``), :attr:`last_conv` and :attr:`_feature_layers`, and implement
    :meth:`_features` on normalised input.

    Attributes:
        name: the registered name (set by :func:`register_model`).
        default_width: the ``width`` used when :func:`~veil.models.create_model` gets ``None``.
        min_size: smallest image side the model accepts.
        size_multiple: image sides must be multiples of this (1 for CNNs, the patch size for ViTs).
        feature_dim: length of :meth:`features`' output.
        head: the final linear layer.
        last_conv: module path (as in ``named_modules()``) of the last convolution.
        config: the arguments :func:`~veil.models.create_model` built this model with (``{}`` when
            the class was instantiated directly); ``create_model(**model.config)`` rebuilds it.
    """

    name: ClassVar[str] = "classifier"
    default_width: ClassVar[int] = 64
    min_size: ClassVar[int] = 1
    size_multiple: ClassVar[int] = 1
    #: why :attr:`min_size` is what it is, quoted in the error message
    min_size_reason: ClassVar[str] = "smaller inputs leave no spatial extent to pool"
    #: why :attr:`size_multiple` is what it is, quoted in the error message
    size_multiple_reason: ClassVar[str] = ""

    feature_dim: int
    head: nn.Linear
    last_conv: str
    mean: Tensor
    std: Tensor

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        image_size: ImageSize = 32,
        mean: float | Sequence[float] | None = None,
        std: float | Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.num_classes = int(num_classes)
        self.in_channels = int(in_channels)
        self.image_size = _as_hw(image_size, type(self).name)
        self.register_buffer("mean", _channel_stats(mean, DEFAULT_MEAN, in_channels, "mean"))
        std_t = _channel_stats(std, DEFAULT_STD, in_channels, "std")
        if bool((std_t <= 0).any()):
            raise ConfigError(f"normalisation std must be positive, got {std_t.flatten().tolist()}")
        self.register_buffer("std", std_t)
        self._feature_layers: list[str] = []
        self.config: dict[str, Any] = {}

    # ------------------------------------------------------------------ the forward path
    def normalize(self, x: Tensor) -> Tensor:
        """``(x - mean) / std`` for ``x`` in ``[0, 1]`` of shape ``(B, C, H, W)``."""
        return (x - self.mean) / self.std

    def _features(self, x: Tensor) -> Tensor:
        """Penultimate features ``(B, feature_dim)`` of a *normalised* batch; subclasses implement."""
        raise NotImplementedError

    def features(self, x: Tensor) -> Tensor:
        """Penultimate features: ``(B, C, H, W)`` images in ``[0, 1]`` -> ``(B, feature_dim)``
        (after global pooling, before :attr:`head`)."""
        return self._features(self.normalize(x))

    def classify(self, f: Tensor) -> Tensor:
        """Logits ``(B, num_classes)`` from features ``(B, feature_dim)`` (the final linear layer)."""
        return self.head(f)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(B, num_classes)`` of images ``(B, C, H, W)`` in ``[0, 1]``;
        equals ``classify(features(x))``."""
        return self.head(self._features(self.normalize(x)))

    # ------------------------------------------------------------------ introspection
    def feature_layers(self) -> list[str]:
        """Module paths of the main stages whose output maps defenses read, shallow to deep
        (e.g. ``["layer1", "layer2", "layer3", "layer4"]`` for ResNets, the blocks for a ViT)."""
        return list(self._feature_layers)

    def feature_map(self, x: Tensor, layer: str) -> Tensor:
        """The output of module ``layer`` when the model runs on ``x``.

        Args:
            x: images ``(B, C, H, W)`` in ``[0, 1]``.
            layer: any module path from ``named_modules()``, usually one of
                :meth:`feature_layers` or :attr:`last_conv`.

        Returns:
            That module's output: ``(B, C', H', W')`` for convolutional stages, ``(B, N, D)``
            (tokens) for ViT blocks. The forward pass stops once it is computed, and the temporary
            hook is removed. Gradients flow to ``x`` unless the caller disables them.

        Raises:
            ConfigError: ``layer`` names no module.
        """
        module = self.get_module(layer)
        captured: list[Any] = []

        def hook(_m: nn.Module, _inp: Any, out: Any) -> None:
            captured.append(out)
            raise _StopForward

        handle = module.register_forward_hook(hook)
        try:
            self(x)
        except _StopForward:
            pass
        finally:
            handle.remove()
        if not captured:
            raise ConfigError(f"layer {layer!r} of model {self.name!r} did not run in the forward pass")
        return captured[0]

    def get_module(self, layer: str) -> nn.Module:
        """The submodule at path ``layer``; :class:`ConfigError` listing the feature layers if none."""
        modules = dict(self.named_modules())
        if layer not in modules:
            raise ConfigError(
                f"model {self.name!r} has no layer {layer!r}; feature layers: "
                f"{', '.join(self.feature_layers())}; last conv: {self.last_conv} "
                "(any path from named_modules() is accepted)"
            )
        return modules[layer]

    # ------------------------------------------------------------------ input sizes
    @classmethod
    def size_rule(cls, **options: Any) -> tuple[int, int]:
        """``(min_size, size_multiple)`` for a model built with ``options`` (ViTs read the patch size)."""
        return cls.min_size, cls.size_multiple

    @classmethod
    def check_image_size(cls, size: ImageSize, **options: Any) -> None:
        """Raise :class:`ConfigError` if this model cannot take images of side(s) ``size``.

        Args:
            size: an ``int`` (square images) or ``(H, W)``.
            options: the model's constructor options, for rules that depend on them (a ViT's
                ``patch_size``).
        """
        h, w = _as_hw(size, cls.name)
        min_size, multiple = cls.size_rule(**options)
        for side in (h, w):
            if side < min_size:
                raise ConfigError(
                    f"model {cls.name!r} cannot take image size {size}: sides must be at least "
                    f"{min_size} pixels ({cls.min_size_reason})"
                )
            if side % multiple:
                raise ConfigError(
                    f"model {cls.name!r} cannot take image size {size}: sides must be multiples of "
                    f"{multiple} ({cls.size_multiple_reason})"
                )

    def extra_repr(self) -> str:
        return f"name={self.name!r}, num_classes={self.num_classes}, feature_dim={self.feature_dim}"


MODELS: Registry[type[Classifier]] = Registry("model")


def register_model(name: str):  # type: ignore[no-untyped-def]
    """Class decorator: register a :class:`Classifier` subclass under ``name`` (sets ``cls.name``)."""

    def decorator(cls: type[Classifier]) -> type[Classifier]:
        if not (isinstance(cls, type) and issubclass(cls, Classifier)):
            raise TypeError(f"register_model({name!r}) needs a Classifier subclass, got {cls!r}")
        cls.name = name
        return MODELS.register(name)(cls)

    return decorator


def init_weights(model: nn.Module) -> None:
    """He (Kaiming) normal init for convolutions (fan-out, ReLU; He et al., "Delving Deep into
    Rectifiers", ICCV 2015), unit scale and zero shift for batch norms, PyTorch's default for
    linear layers."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)):
            if m.weight is not None:
                nn.init.ones_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def scaled_width(width: int | None, default: int) -> int:
    """``width`` or ``default`` when ``None``, checked to be a positive ``int``."""
    if width is None:
        return default
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ConfigError(f"width must be an integer >= 1, got {width!r}")
    return width


def _as_hw(size: Any, name: str) -> tuple[int, int]:
    if isinstance(size, int) and not isinstance(size, bool):
        h = w = size
    elif (
        isinstance(size, (tuple, list))
        and len(size) == 2
        and all(isinstance(s, int) and not isinstance(s, bool) for s in size)
    ):
        h, w = size
    else:
        raise ConfigError(f"model {name!r} cannot take image size {size!r}: expected an int or (height, width)")
    if h < 1 or w < 1:
        raise ConfigError(f"model {name!r} cannot take image size {size}: sides must be positive")
    return int(h), int(w)


def _channel_stats(value: float | Sequence[float] | None, default: float, channels: int, what: str) -> Tensor:
    if value is None:
        value = default
    t = torch.as_tensor(value, dtype=torch.float32).flatten()
    if t.numel() == 1:
        t = t.expand(channels).clone()
    if t.numel() != channels:
        raise ConfigError(f"normalisation {what} has {t.numel()} values but the model takes {channels} channels")
    if not bool(torch.isfinite(t).all()):
        raise ConfigError(f"normalisation {what} must be finite, got {t.tolist()}")
    return t.view(1, channels, 1, 1)
