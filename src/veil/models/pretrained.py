"""ImageNet weights for veil's ``resnet18_imagenet``, from torchvision's ``resnet18``.

torchvision names the parts of a ResNet as veil does except the projection shortcut
(``downsample`` for veil's ``shortcut``) and the classifier (``fc`` for veil's ``head``), which is
left as it is: its ImageNet classes are not the run's. The weights come from a local file (a state
dict saved by ``torch.save``, loaded with ``weights_only=True``) or, with ``download=True``, from
torchvision's ``ResNet18_Weights.IMAGENET1K_V1`` (needs a network). ImageNet-trained weights
expect ImageNet's normalisation: build the model with ``mean=IMAGENET_MEAN, std=IMAGENET_STD``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from veil.errors import CheckpointError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def torchvision_to_veil(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """torchvision ResNet parameter names as veil's, without the ``fc`` classifier."""
    out = {}
    for k, v in state.items():
        if k.startswith("fc."):
            continue
        out[k.replace(".downsample.", ".shortcut.")] = v
    return out


def load_torchvision_resnet18(model: nn.Module, weights: str | Path | None = None, download: bool = False) -> nn.Module:
    """Load ImageNet ResNet-18 weights into ``model`` (a ``resnet18_imagenet``), all but its head.

    Args:
        weights: a torchvision ``resnet18`` state dict file; ``None`` with ``download`` fetches
            torchvision's ``IMAGENET1K_V1`` weights.

    Raises:
        CheckpointError: no weights given, a file that is missing or not a matching state dict.
    """
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise CheckpointError(f"ImageNet weights file {path} does not exist")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001
            raise CheckpointError(f"ImageNet weights file {path} is not a state dict of tensors ({type(exc).__name__})") from None
    elif download:
        from torchvision.models import ResNet18_Weights

        state = ResNet18_Weights.IMAGENET1K_V1.get_state_dict(progress=False)
    else:
        raise CheckpointError("no ImageNet weights: pass a weights file, or download=True (needs a network)")
    mapped = torchvision_to_veil(state)
    try:
        missing, unexpected = model.load_state_dict(mapped, strict=False)
    except RuntimeError as exc:
        raise CheckpointError(f"the weights do not fit the model ({' '.join(str(exc).split())[:200]})") from None
    wrong = [k for k in missing if not k.startswith("head.") and k not in ("mean", "std")]
    if wrong or unexpected:
        raise CheckpointError(f"the weights do not fit the model (missing {wrong[:3]}, unexpected {list(unexpected)[:3]})")
    return model
