"""Image classifiers in a registry.

Every model is a :class:`Classifier`: it takes float images in ``[0, 1]`` of shape ``(B, C, H, W)``,
normalises them itself (fixed ``mean``/``std`` buffers, default 0.5/0.25 per channel) and exposes
``features``/``classify``/``feature_map``/``feature_layers``/``last_conv`` for attacks and defenses.

Example:
    >>> import torch
    >>> from veil.models import create_model, list_models
    >>> model = create_model("preact_resnet18", num_classes=43, width=16, seed=0)
    >>> model(torch.rand(2, 3, 32, 32)).shape
    torch.Size([2, 43])

Registered families (CIFAR stems for 32x32 inputs, global average pooling so larger inputs work):

==================  =============================================  ======================
name                paper                                          ``width`` (default)
==================  =============================================  ======================
preact_resnet18     He et al., ECCV 2016 (identity mappings)       first stage (64)
resnet18/34/50      He et al., CVPR 2016                           first stage (64)
resnet18_imagenet   He et al., CVPR 2016 (ImageNet stem, 128 px+)   first stage (64)
vgg16, vgg19        Simonyan & Zisserman, ICLR 2015 (+BatchNorm)   first stage (64)
densenet121         Huang et al., CVPR 2017 (DenseNet-BC)          growth rate k (32)
wrn34_10            Zagoruyko & Komodakis, BMVC 2016               stem; stages 16k.. (16)
vit_small           Dosovitskiy et al., ICLR 2021 (patch 4)        embedding dim (192)
vit_b16             Dosovitskiy et al., ICLR 2021 (ViT-B/16, 224)  embedding dim (768)
ran                 Wang et al., CVPR 2017 (Residual Attention)    first stage (16)
==================  =============================================  ======================
"""

from __future__ import annotations

import fnmatch
import inspect
import logging
from typing import Any

import torch

from veil.errors import ConfigError
from veil.models import densenet, preact_resnet, ran, resnet, vgg, vit, wrn  # noqa: F401  (registers)
from veil.models.base import DEFAULT_MEAN, DEFAULT_STD, MODELS, Classifier, register_model

log = logging.getLogger(__name__)

__all__ = [
    "Classifier",
    "DEFAULT_MEAN",
    "DEFAULT_STD",
    "MODELS",
    "create_model",
    "list_models",
    "model_class",
    "register_model",
]

_BASE_ARGS = ("num_classes", "image_size", "width", "in_channels")


def list_models(pattern: str | None = None) -> list[str]:
    """Registered model names, sorted; ``pattern`` filters them with shell wildcards (``"resnet*"``)."""
    names = MODELS.names()
    return [n for n in names if fnmatch.fnmatchcase(n, pattern)] if pattern else names


def model_class(name: str) -> type[Classifier]:
    """The class registered as ``name`` (for :meth:`Classifier.check_image_size` and metadata)."""
    return MODELS.get(name)


def create_model(
    name: str,
    num_classes: int,
    image_size: int | tuple[int, int] = 32,
    width: int | None = None,
    in_channels: int = 3,
    *,
    seed: int | None = None,
    **kw: Any,
) -> Classifier:
    """Build a registered classifier.

    Args:
        name: a name from :func:`list_models`.
        num_classes: number of classes (at least 2).
        image_size: the input side (``int``) or ``(H, W)``; checked against the model's minimum
            size and size multiple. CNNs take any size from their minimum up at run time; the ViT
            builds its position embeddings for this size.
        width: the model's base width (see each family; ``None`` for its default).
        in_channels: input channels (3 for RGB).
        seed: if given, the weights are initialised from ``torch.manual_seed(seed)`` inside
            :func:`torch.random.fork_rng`, so the same seed gives the same weights and the global
            random state is left as it was. ``None`` draws from the global generator.
        kw: family options (``mean``, ``std``, ``depth``, ``patch_size``, ...); unknown ones are
            refused.

    Returns:
        The model in training mode, on the CPU, in float32. ``model.config`` holds the arguments,
        so ``create_model(**model.config)`` builds the same architecture.

    Raises:
        ConfigError: unknown name or option, ``num_classes < 2``, ``width < 1``, or an image size
            the model cannot take.
    """
    cls = MODELS.get(name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ConfigError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    if width is not None and (isinstance(width, bool) or not isinstance(width, int) or width < 1):
        raise ConfigError(f"width must be an integer >= 1 (or None for the default), got {width!r}")
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise ConfigError(f"in_channels must be an integer >= 1, got {in_channels!r}")
    accepted = [
        p.name
        for p in inspect.signature(cls.__init__).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in _BASE_ARGS
    ]
    unknown = sorted(set(kw) - set(accepted))
    if unknown:
        raise ConfigError(
            f"model {name!r} has no option(s) {', '.join(unknown)}; options: {', '.join(sorted(accepted)) or '(none)'}"
        )
    cls.check_image_size(image_size, **kw)
    args: dict[str, Any] = dict(width=width, in_channels=in_channels, image_size=image_size, **kw)
    if seed is None:
        model = cls(num_classes, **args)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = cls(num_classes, **args)
    model.config = {"name": name, "num_classes": num_classes, **args}
    log.debug(
        "created %s: %d classes, width %s, %.2fM parameters",
        name,
        num_classes,
        width,
        sum(p.numel() for p in model.parameters()) / 1e6,
    )
    return model
