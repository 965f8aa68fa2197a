"""A small Vision Transformer for 32x32 images.

Dosovitskiy et al., "An Image is Worth 16x16 Words: Transformers for Image Recognition at Scale",
ICLR 2021 (arXiv:2010.11929): the image is cut into ``p x p`` patches, each linearly embedded
(a ``p x p`` convolution with stride ``p``), a learned class token is prepended and learned position
embeddings added (Eq. 1); pre-norm transformer blocks follow (LayerNorm -> multi-head
self-attention -> residual, LayerNorm -> MLP with GELU -> residual; Eqs. 2-3), and the final
LayerNorm of the class token is the feature the linear head reads (Eq. 4).

``vit_small`` is sized for CIFAR/GTSRB, not the paper's ViT-S: patch 4 (64 tokens at 32x32),
embedding dimension 192 with 3 heads of 64 (as DeiT-Ti, Touvron et al., ICML 2021), 6 blocks,
MLP ratio 4. ``vit_b16`` is the paper's ViT-B/16 (patch 16, width 768, 12 heads, 12 blocks, 196
tokens at 224x224, LayerNorm epsilon 1e-6 as torchvision's and timm's), the network of ATTEQ's ViT
experiments; :func:`veil.models.pretrained.load_vit_b16` loads torchvision's or timm's (DeiT-B)
ImageNet weights into it. Image sides must be multiples of the patch size; at a size other than the one it was
built for, the position embeddings are resized bicubically (as when fine-tuning at another
resolution, Dosovitskiy et al., Sec. 3.2).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from veil.errors import ConfigError
from veil.models.base import Classifier, register_model, scaled_width

__all__ = ["Attention", "Mlp", "Block", "VisionTransformer", "ViTB16", "ViTSmall", "default_heads", "resize_pos_embed"]


def default_heads(dim: int, head_dim: int = 64) -> int:
    """Heads for embedding dimension ``dim``: the largest divisor of ``dim`` not above
    ``dim // head_dim`` (at least 1), so heads are about ``head_dim`` wide and always divide ``dim``
    (192 -> 3, 384 -> 6, 32 -> 1, 200 -> 2)."""
    cap = max(1, dim // head_dim)
    return max(h for h in range(1, cap + 1) if dim % h == 0)


def resize_pos_embed(pos: Tensor, grid: tuple[int, int], size: tuple[int, int]) -> Tensor:
    """Position embeddings ``(1, 1 + gh * gw, D)`` of a ``grid`` of patches, the class token's first,
    resized bicubically to a ``size`` grid (Dosovitskiy et al., Sec. 3.2); the class token's kept."""
    cls_pos, patch_pos = pos[:, :1], pos[:, 1:]
    d = patch_pos.shape[-1]
    patch_pos = patch_pos.reshape(1, grid[0], grid[1], d).permute(0, 3, 1, 2)
    patch_pos = F.interpolate(patch_pos, size=size, mode="bicubic", align_corners=False)
    return torch.cat([cls_pos, patch_pos.permute(0, 2, 3, 1).reshape(1, size[0] * size[1], d)], 1)


class Attention(nn.Module):
    """Multi-head self-attention (Vaswani et al., NeurIPS 2017) with a fused QKV projection."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    """``fc2(gelu(fc1(x)))``; ``fc1``'s outputs are the block's hidden units."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block (Dosovitskiy et al., Eqs. 2-3)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, eps: float = 1e-5) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, max(1, int(dim * mlp_ratio)))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(Classifier):
    """Vision Transformer (Dosovitskiy et al., ICLR 2021) with a class token.

    Args:
        num_classes: number of classes.
        width: embedding dimension (default 192).
        in_channels, mean, std: see :class:`~veil.models.base.Classifier`.
        image_size: the size the position embeddings are built for (default 32); sides must be
            multiples of ``patch_size``. Other multiples work at run time (embeddings resized).
        patch_size: patch side (default 4).
        depth: number of transformer blocks (default 6).
        num_heads: attention heads; must divide ``width``. Default: :func:`default_heads`
            (heads of about 64 channels).
        mlp_ratio: MLP hidden width over ``width`` (default 4).

    ``feature_dim = width``. ``feature_layers()`` is ``["blocks.0", ..., "blocks.{depth-1}"]``; their
    outputs are token maps ``(B, 1 + N, width)`` (class token first). A ViT has no convolution after
    the patch embedding, so ``last_conv`` names the first MLP layer of the last block,
    ``"blocks.{depth-1}.mlp.fc1"``: its output units (``mlp_ratio * width``, the last layer of
    neurons before the residual stream) play the role of the last convolution's channels for
    fine-pruning. Its output is ``(B, 1 + N, hidden)``, units on the last axis.
    """

    default_width = 192
    default_patch_size: ClassVar[int] = 4
    default_depth: ClassVar[int] = 6
    #: LayerNorm epsilon (PyTorch's default; ViT-B/16 uses the reference implementations' 1e-6)
    norm_eps: ClassVar[float] = 1e-5
    min_size = 4
    size_multiple = 4
    min_size_reason = "an image must hold at least one patch"
    size_multiple_reason = "the image is cut into whole patches"

    def __init__(
        self,
        num_classes: int,
        *,
        width: int | None = None,
        in_channels: int = 3,
        image_size: int | tuple[int, int] = 32,
        mean: Any = None,
        std: Any = None,
        patch_size: int | None = None,
        depth: int | None = None,
        num_heads: int | None = None,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__(num_classes, in_channels, image_size, mean, std)
        dim = scaled_width(width, self.default_width)
        p = self.default_patch_size if patch_size is None else patch_size
        depth = self.default_depth if depth is None else depth
        if isinstance(p, bool) or not isinstance(p, int) or p < 1:
            raise ConfigError(f"patch_size must be an integer >= 1, got {p!r}")
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ConfigError(f"depth must be an integer >= 1, got {depth!r}")
        if num_heads is None:
            num_heads = default_heads(dim)
        if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1 or dim % num_heads:
            raise ConfigError(f"num_heads must be a positive divisor of the width {dim}, got {num_heads!r}")
        if not mlp_ratio > 0:
            raise ConfigError(f"mlp_ratio must be positive, got {mlp_ratio}")
        self.check_image_size(image_size, patch_size=p)
        self.patch_size, self.depth, self.num_heads = p, depth, num_heads
        self.grid = (self.image_size[0] // p, self.image_size[1] // p)
        self.patch_embed = nn.Conv2d(in_channels, dim, p, p)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid[0] * self.grid[1], dim))
        self.blocks = nn.Sequential(*(Block(dim, num_heads, mlp_ratio, self.norm_eps) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim, eps=self.norm_eps)
        self.feature_dim = dim
        self.head = nn.Linear(dim, num_classes)
        self._feature_layers = [f"blocks.{i}" for i in range(depth)]
        self.last_conv = f"blocks.{depth - 1}.mlp.fc1"
        self._init()

    @classmethod
    def size_rule(cls, **options: Any) -> tuple[int, int]:
        p = options.get("patch_size")
        if isinstance(p, bool) or not isinstance(p, int) or p < 1:
            p = cls.default_patch_size  # an invalid value is reported by the constructor
        return p, p

    def _init(self) -> None:
        """Truncated-normal (std 0.02) position embeddings, class token and linear weights, zero
        biases (as timm's ViT); the patch embedding keeps PyTorch's default init."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _pos_embed(self, gh: int, gw: int) -> Tensor:
        if (gh, gw) == self.grid:
            return self.pos_embed
        return resize_pos_embed(self.pos_embed, self.grid, (gh, gw))

    def _features(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        p = self.patch_size
        if h % p or w % p:
            raise ConfigError(
                f"model {self.name!r} cannot take image size {(h, w)}: sides must be multiples of {p} "
                f"({self.size_multiple_reason})"
            )
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), tokens], 1)
        tokens = tokens + self._pos_embed(h // p, w // p)
        tokens = self.norm(self.blocks(tokens))
        return tokens[:, 0]

    def processed_forward(self, x: Tensor, order: Tensor | None = None, keep: Tensor | None = None) -> Tensor:
        """Logits with the patch tokens processed before the position embeddings are added (the
        patch processing of Doan et al., AAAI 2023).

        Args:
            x: images ``(B, C, H, W)`` in ``[0, 1]``.
            order: PatchShuffle, a permutation per image ``(B, N)`` of the ``N`` patches: position
                ``i`` receives the content of patch ``order[:, i]`` (and keeps its own embedding).
            keep: PatchDrop, patch indices per image ``(B, K)``: only these patches (each with its
                own position embedding) and the class token enter the encoder.

        With neither, equals ``forward(x)``.
        """
        xn = self.normalize(x)
        h, w = xn.shape[-2:]
        p = self.patch_size
        self.check_image_size((h, w), patch_size=p)
        tokens = self.patch_embed(xn).flatten(2).transpose(1, 2)  # (B, N, D)
        b, n, d = tokens.shape
        pos = self._pos_embed(h // p, w // p)
        cls_pos, patch_pos = pos[:, :1], pos[:, 1:].expand(b, -1, -1)
        for name, idx in (("order", order), ("keep", keep)):
            if idx is not None and (idx.dim() != 2 or idx.shape[0] != b or idx.dtype != torch.long
                                    or bool((idx < 0).any()) or bool((idx >= n).any())):
                raise ConfigError(f"{name} must be (B, K) patch indices in [0, {n}) for {b} images, got {tuple(idx.shape)}")
        if order is not None:
            if order.shape[1] != n:
                raise ConfigError(f"order must permute all {n} patches, got {order.shape[1]}")
            tokens = tokens.gather(1, order.to(tokens.device)[..., None].expand(-1, -1, d))
        tokens = tokens + patch_pos
        if keep is not None:
            tokens = tokens.gather(1, keep.to(tokens.device)[..., None].expand(-1, -1, d))
        tokens = torch.cat([self.cls_token.expand(b, -1, -1) + cls_pos, tokens], 1)
        return self.head(self.norm(self.blocks(tokens))[:, 0])


@register_model("vit_small")
class ViTSmall(VisionTransformer):
    """Small ViT for 32x32 images: patch 4, width 192, 3 heads, 6 blocks, MLP ratio 4."""

    default_width = 192
    default_patch_size = 4
    default_depth = 6


@register_model("vit_b16")
class ViTB16(VisionTransformer):
    """ViT-B/16 (Dosovitskiy et al., Table 1): patch 16, width 768, 12 heads, 12 blocks, MLP ratio
    4, for 224x224 images (``image_size=224``); sides must be multiples of 16."""

    default_width = 768
    default_patch_size = 16
    default_depth = 12
    norm_eps = 1e-6
    min_size = 16
    size_multiple = 16
