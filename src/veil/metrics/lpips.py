"""LPIPS perceptual distance (Zhang et al., "The Unreasonable Effectiveness of Deep Features as a
Perceptual Metric", CVPR 2018), version 0.1, network ``alex`` (veil's default) or ``vgg`` (the
semantic-feature paper's), loaded without a network connection.

The metric comes from the ``lpips`` package on PyPI. Its linear calibration layers (``alex.pth``,
``vgg.pth``, v0.1) ship inside that package; the backbones (ImageNet weights) normally download
through torchvision. :func:`load_lpips` never downloads: it builds the model with random weights
and loads both parts from files with ``torch.load(..., weights_only=True)`` (no arbitrary
unpickling).

The backbone is looked for, in order, in

1. the ``weights_dir`` argument: a folder holding ``alexnet_imagenet_features.pth`` (the state dict of
   ``torchvision.models.alexnet().features``; for ``vgg``, ``vgg16_imagenet_features.pth``, that of
   ``torchvision.models.vgg16().features``), or that file itself;
2. the folder named by the environment variable ``VEIL_WEIGHTS`` (same file names);
3. torchvision's cache, ``torch.hub.get_dir()/checkpoints/alexnet-owt-7be5be79.pth`` (or
   ``vgg16-397923af.pth``: the full torchvision state dict, as a past
   ``alexnet(weights="IMAGENET1K_V1")`` or ``vgg16(...)`` left it).

The project's shared offline weights folder (``$VEIL_WEIGHTS``) holds the AlexNet backbone only.

Example:
    >>> model = load_lpips("path/to/weights")          # doctest: +SKIP
    >>> lpips_distance(model, clean, poisoned)          # doctest: +SKIP
    tensor([0.0123, 0.0098, ...])
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import torch
from torch import Tensor

from veil.errors import CheckpointError
from veil.metrics.image import _pair

__all__ = [
    "BACKBONE_FILE",
    "BACKBONE_FILES",
    "LPIPS_NETS",
    "TORCHVISION_FILE",
    "WEIGHTS_ENV",
    "find_lpips_backbone",
    "lpips_available",
    "load_lpips",
    "lpips_distance",
]

logger = logging.getLogger(__name__)

BACKBONE_FILE = "alexnet_imagenet_features.pth"
"""File name of the AlexNet ``features`` state dict looked for in a weights folder."""
TORCHVISION_FILE = "alexnet-owt-7be5be79.pth"
"""File name of torchvision's ImageNet AlexNet checkpoint in the torch hub cache."""
#: the networks veil can load: net -> (backbone file in a weights folder, torchvision hub file)
BACKBONE_FILES = {"alex": (BACKBONE_FILE, TORCHVISION_FILE), "vgg": ("vgg16_imagenet_features.pth", "vgg16-397923af.pth")}
LPIPS_NETS = tuple(BACKBONE_FILES)
WEIGHTS_ENV = "VEIL_WEIGHTS"
"""Environment variable naming a folder that holds :data:`BACKBONE_FILE`."""

_MIN_SIDE_ALEX = 31  # smallest image side AlexNet's five LPIPS stages accept


def _check_net(net: str) -> tuple[str, str]:
    if net not in BACKBONE_FILES:
        raise ValueError(f"unknown LPIPS network {net!r}; known: {', '.join(LPIPS_NETS)}")
    return BACKBONE_FILES[net]


def _candidates(weights_dir: str | Path | None, net: str = "alex") -> list[Path]:
    """Backbone files to try, in search order."""
    folder_file, hub_file = _check_net(net)
    paths: list[Path] = []
    for folder in (weights_dir, os.environ.get(WEIGHTS_ENV) or None):
        if folder is None:
            continue
        p = Path(folder).expanduser()
        paths.append(p if p.is_file() else p / folder_file)
    paths.append(Path(torch.hub.get_dir()) / "checkpoints" / hub_file)
    return paths


def find_lpips_backbone(weights_dir: str | Path | None = None, net: str = "alex") -> Path | None:
    """The first existing backbone file of ``net`` in the search order, or ``None``.

    Args:
        weights_dir: a folder holding the backbone file (``alexnet_imagenet_features.pth``,
            ``vgg16_imagenet_features.pth``), or that file; optional.
        net: ``"alex"`` or ``"vgg"``.
    """
    for path in _candidates(weights_dir, net):
        if path.is_file():
            return path
    return None


def lpips_available(weights_dir: str | Path | None = None, net: str = "alex") -> bool:
    """Whether :func:`load_lpips` can find a backbone of ``net`` (the file is not read)."""
    return find_lpips_backbone(weights_dir, net) is not None


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    """``torch.load(path, weights_only=True)`` to the CPU; any failure is a CheckpointError."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, bad pickle, disallowed global, unreadable file
        raise CheckpointError(f"cannot read weights file {path}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"weights file {path} does not hold a state dict of tensors")
    return state


def _lpips_linear_file(net: str = "alex") -> Path:
    import lpips

    return Path(lpips.__file__).resolve().parent / "weights" / "v0.1" / f"{net}.pth"


def _build_state(model: torch.nn.Module, backbone: dict[str, Tensor], backbone_path: Path,
                 linear: dict[str, Tensor], linear_path: Path, net: str = "alex") -> dict[str, Tensor]:
    """The LPIPS model's full state dict with the backbone and linear layers filled in."""
    if any(k.startswith("features.") for k in backbone):  # a full torchvision checkpoint
        backbone = {k[len("features."):]: v for k, v in backbone.items() if k.startswith("features.")}
    state = dict(model.state_dict())
    problems: list[str] = []

    def put(dst: str, src: str, table: dict[str, Tensor]) -> None:
        if src not in table:
            problems.append(f"missing {src}")
        elif table[src].shape != state[dst].shape:
            problems.append(f"{src} has shape {tuple(table[src].shape)}, expected {tuple(state[dst].shape)}")
        else:
            state[dst] = table[src]

    # lpips.pretrained_networks.alexnet (and .vgg16) copy torchvision's features[i] into
    # net.slice<k> under the name str(i), so net.slice<k>.<i>.weight comes from features key <i>.weight.
    n_backbone = 0
    for name in state:
        if name.startswith("net.slice"):
            put(name, name.split(".", 2)[2], backbone)
            n_backbone += 1
    if problems or n_backbone == 0:
        raise CheckpointError(f"weights file {backbone_path} is not {'an AlexNet' if net == 'alex' else 'a VGG-16'} features state dict: "
                              + "; ".join(problems[:4]))
    for name in state:
        if name.startswith("lins."):  # lins.<k>.* is the same module as lin<k>.*
            index, rest = name[len("lins."):].split(".", 1)
            put(name, f"lin{index}.{rest}", linear)
        elif name.startswith("lin"):
            put(name, name, linear)
    if problems:
        raise CheckpointError(f"weights file {linear_path} is not an LPIPS {net} v0.1 file: " + "; ".join(problems[:4]))
    return state


def download_backbone(net: str = "alex") -> Path:
    """Fetch torchvision's ImageNet AlexNet (or VGG-16) into the torch hub cache (needs a network)
    and return the file, which :func:`find_lpips_backbone` then finds."""
    from torchvision.models import AlexNet_Weights, VGG16_Weights

    _, hub_file = _check_net(net)
    weights = AlexNet_Weights.IMAGENET1K_V1 if net == "alex" else VGG16_Weights.IMAGENET1K_V1
    weights.get_state_dict(progress=True, check_hash=True)
    return Path(torch.hub.get_dir()) / "checkpoints" / hub_file


def load_lpips(
    weights_dir: str | Path | None = None, device: str | torch.device = "cpu", download: bool = False,
    net: str = "alex",
) -> torch.nn.Module:
    """LPIPS (v0.1, ``net``) with published weights, built offline, in eval mode with frozen parameters.

    Args:
        weights_dir: a folder holding the backbone file (``alexnet_imagenet_features.pth``, or
            ``vgg16_imagenet_features.pth`` for ``vgg``), or that file. When it is ``None`` or
            lacks the file, ``$VEIL_WEIGHTS`` and then the torch hub cache are tried (see the
            module docstring).
        device: where to put the model.
        download: when no backbone is found, fetch torchvision's into the torch hub cache first.
        net: ``"alex"`` (veil's default; the LPIPS authors' recommended metric) or ``"vgg"``
            (VGG-16 features, as the semantic-feature paper reports).

    Returns:
        an ``lpips.LPIPS`` module; call it as ``model(x, y, normalize=True)`` on ``[0, 1]`` images
        for a differentiable loss, or use :func:`lpips_distance` for evaluation.

    Raises:
        FileNotFoundError: no backbone file was found; the message lists the places searched.
        CheckpointError: a weights file is truncated, corrupted, or holds the wrong tensors.
    """
    folder_file, _ = _check_net(net)
    what = {"alex": "AlexNet", "vgg": "VGG-16"}[net]
    path = find_lpips_backbone(weights_dir, net)
    if path is None and download:
        download_backbone(net)
        path = find_lpips_backbone(weights_dir, net)
    if path is None:
        searched = "\n  ".join(str(p) for p in _candidates(weights_dir, net))
        raise FileNotFoundError(
            f"LPIPS ({net}) needs the ImageNet {what} backbone and none was found. Looked for:\n  "
            f"{searched}\nPass the folder holding {folder_file} (the LPIPS {what} backbone) as "
            f"weights_dir, or set the environment variable {WEIGHTS_ENV} to that folder."
        )
    if weights_dir is not None and path != _candidates(weights_dir, net)[0]:
        logger.warning("no LPIPS backbone in %s; using %s instead", weights_dir, path)
    backbone = _read_state_dict(path)
    linear_path = _lpips_linear_file(net)
    if not linear_path.is_file():
        raise CheckpointError(f"the lpips package lacks its linear weights {linear_path}; reinstall lpips")
    linear = _read_state_dict(linear_path)

    import lpips

    with warnings.catch_warnings():  # torchvision's "pretrained is deprecated" warnings from lpips
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(net=net, version="0.1", pretrained=False, pnet_rand=True, verbose=False)
    model.load_state_dict(_build_state(model, backbone, path, linear, linear_path, net), strict=True)
    for param in model.parameters():
        param.requires_grad_(False)
    logger.debug("LPIPS %s v0.1 loaded: backbone %s, linear layers %s", net, path, linear_path)
    return model.eval().to(device)


def lpips_distance(model: torch.nn.Module, x: Tensor, y: Tensor, batch_size: int = 64) -> Tensor:
    """LPIPS distance per image pair, without gradients.

    Args:
        model: from :func:`load_lpips`, on the same device as the images (nothing is moved). It is
            switched to eval mode if it was in training mode.
        x: images in ``[0, 1]``, ``(B, C, H, W)`` or ``(C, H, W)``, RGB (``C = 3``) or grey
            (``C = 1``, repeated to three channels), at least 31x31 pixels for AlexNet.
        y: images of the same shape.
        batch_size: pairs per forward pass, to bound memory.

    Returns:
        ``(B,)`` tensor in the images' dtype; 0 for identical images.

    Raises:
        ValueError: on mismatched shapes, a channel count other than 1 or 3, or too small images.
    """
    x, y = _pair(x, y)
    if x.shape[1] not in (1, 3):
        raise ValueError(f"LPIPS needs RGB (3-channel) or grey (1-channel) images, got {x.shape[1]} channels")
    if getattr(model, "pnet_type", None) == "alex" and min(x.shape[-2:]) < _MIN_SIDE_ALEX:
        raise ValueError(f"LPIPS (alex) needs images of at least {_MIN_SIDE_ALEX}x{_MIN_SIDE_ALEX} pixels, "
                         f"got {x.shape[-2]}x{x.shape[-1]}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if model.training:
        model.eval()
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None else torch.float32
    out: list[Tensor] = []
    with torch.no_grad():
        for xc, yc in zip(x.split(batch_size), y.split(batch_size)):
            if xc.shape[1] == 1:
                xc, yc = xc.expand(-1, 3, -1, -1), yc.expand(-1, 3, -1, -1)
            out.append(model(xc.to(dtype), yc.to(dtype), normalize=True).flatten())
    if not out:
        return x.new_empty(0)
    return torch.cat(out).to(x.dtype)
