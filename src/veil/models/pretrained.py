"""ImageNet weights for veil's ``resnet18_imagenet`` (torchvision's ``resnet18``) and ``vit_b16``
(torchvision's ``vit_b_16`` or timm's ViT-B/16 / DeiT-B layout).

torchvision names the parts of a ResNet as veil does except the projection shortcut
(``downsample`` for veil's ``shortcut``) and the classifier (``fc`` for veil's ``head``), which is
left as it is: its ImageNet classes are not the run's. The weights come from a local file (a state
dict saved by ``torch.save``, loaded with ``weights_only=True``) or, with ``download=True``, from
torchvision's ``ResNet18_Weights.IMAGENET1K_V1`` / ``ViT_B_16_Weights.IMAGENET1K_V1`` (needs a
network). ImageNet-trained weights expect ImageNet's normalisation: build the model with
``mean=IMAGENET_MEAN, std=IMAGENET_STD`` (DeiT uses the same statistics).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from veil.errors import CheckpointError
from veil.models.vit import resize_pos_embed

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "load_torchvision_resnet18", "load_vit_b16", "torchvision_to_veil", "vit_to_veil"]

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
    state = _read(weights, download, "ResNet18_Weights")
    return _load(model, torchvision_to_veil(state))


def _read(weights: str | Path | None, download: bool, torchvision_weights: str) -> dict[str, Tensor]:
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise CheckpointError(f"ImageNet weights file {path} does not exist")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001
            raise CheckpointError(f"ImageNet weights file {path} is not a state dict of tensors ({type(exc).__name__})") from None
        if isinstance(state, dict) and isinstance(state.get("model"), dict):
            state = state["model"]  # timm / DeiT release checkpoints: {"model": state_dict}
        if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
            raise CheckpointError(f"ImageNet weights file {path} is not a state dict of tensors")
        return state
    if download:
        import torchvision.models

        return getattr(torchvision.models, torchvision_weights).IMAGENET1K_V1.get_state_dict(progress=False)
    raise CheckpointError("no ImageNet weights: pass a weights file, or download=True (needs a network)")


def _load(model: nn.Module, mapped: dict[str, Tensor]) -> nn.Module:
    try:
        missing, unexpected = model.load_state_dict(mapped, strict=False)
    except RuntimeError as exc:
        raise CheckpointError(f"the weights do not fit the model ({' '.join(str(exc).split())[:200]})") from None
    wrong = [k for k in missing if not k.startswith("head.") and k not in ("mean", "std")]
    if wrong or unexpected:
        raise CheckpointError(f"the weights do not fit the model (missing {wrong[:3]}, unexpected {list(unexpected)[:3]})")
    return model


_TV_BLOCK = {"ln_1": "norm1", "ln_2": "norm2", "self_attention.in_proj_weight": "attn.qkv.weight",
             "self_attention.in_proj_bias": "attn.qkv.bias", "self_attention.out_proj": "attn.proj",
             "mlp.0": "mlp.fc1", "mlp.3": "mlp.fc2", "mlp.linear_1": "mlp.fc1", "mlp.linear_2": "mlp.fc2"}


def vit_to_veil(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """ViT parameter names as veil's (:class:`veil.models.vit.VisionTransformer`), without the
    classifier, from torchvision's ``vit_b_16`` (``conv_proj``, ``encoder.layers.encoder_layer_i``)
    or timm's layout (``patch_embed.proj``, ``blocks.i``; DeiT-B, non-distilled)."""
    out: dict[str, Tensor] = {}
    for k, v in state.items():
        if k.startswith(("heads.", "head.", "head_dist.")) or k == "dist_token":
            continue
        if k.startswith("encoder.layers.encoder_layer_"):
            i, rest = k[len("encoder.layers.encoder_layer_"):].split(".", 1)
            for old, new in _TV_BLOCK.items():
                if rest.startswith(old):
                    rest = new + rest[len(old):]
                    break
            k = f"blocks.{i}.{rest}"
        else:
            k = {"class_token": "cls_token", "encoder.pos_embedding": "pos_embed"}.get(k, k)
            for old, new in (("conv_proj.", "patch_embed."), ("patch_embed.proj.", "patch_embed."), ("encoder.ln.", "norm.")):
                if k.startswith(old):
                    k = new + k[len(old):]
        out[k] = v
    return out


def load_vit_b16(model: nn.Module, weights: str | Path | None = None, download: bool = False) -> nn.Module:
    """Load ImageNet ViT-B/16 weights into ``model`` (a ``vit_b16``), all but its head.

    The position embeddings are resized bicubically to the model's patch grid when it was built
    for another image size (fine-tuning at another resolution, Dosovitskiy et al., Sec. 3.2).

    Args:
        weights: a state dict file in torchvision's ``vit_b_16`` layout or timm's (a DeiT release
            checkpoint ``{"model": ...}`` too); ``None`` with ``download`` fetches torchvision's
            ``ViT_B_16_Weights.IMAGENET1K_V1``.

    Raises:
        CheckpointError: no weights given, a file that is missing or not a matching state dict.
    """
    mapped = vit_to_veil(_read(weights, download, "ViT_B_16_Weights"))
    pos, own = mapped.get("pos_embed"), getattr(model, "pos_embed", None)
    if isinstance(pos, Tensor) and isinstance(own, Tensor) and pos.dim() == 3 and pos.shape[1] != own.shape[1]:
        n = pos.shape[1] - 1
        side = int(round(n**0.5))
        gh, gw = model.grid  # type: ignore[attr-defined]
        if side * side != n:
            raise CheckpointError(f"the weights' {n} position embeddings are not a square grid")
        mapped["pos_embed"] = resize_pos_embed(pos, (side, side), (gh, gw))
    return _load(model, mapped)
