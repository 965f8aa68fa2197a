"""Residual Attention Network, CPU-scale.

Wang, Jiang, Qian, Yang, Li, Zhang, Wang and Tang, "Residual Attention Network for Image
Classification", CVPR 2017 (arXiv:1704.06904). Each attention module (section 3) splits its input
into a trunk branch ``T(x)`` (two pre-activation residual units, ``t = 2``) and a soft mask branch
``S(x)``: max-pool down and bilinear interpolation up, residual units at each level and a skip
unit between levels (one or two levels here, fewer in deeper stages), then
BN -> ReLU -> 1x1 conv -> BN -> ReLU -> 1x1 conv -> sigmoid, so ``S`` lies in ``(0, 1)`` with the
trunk's shape. The module outputs ``H = (1 + S(x)) * T(x)`` (attention residual learning, eq. 3),
between one pre-processing and one post-processing residual unit (``p = 1``).

This is a CPU-scale RAN that keeps the module structure: a CIFAR stem (one 3x3 conv, stride 1),
three stages of widths ``w, 2w, 4w`` and strides ``1, 2, 2`` (maps of 32, 16 and 8 pixels for
32x32 input), each a residual unit followed by ``modules_per_stage`` attention modules (default 1
per stage, RAN-56's 1-1-1 layout; ``(1, 2, 3)`` gives RAN-92's), then BN -> ReLU, global average
pooling and a linear head. Residual units are the pre-activation basic blocks of
:mod:`veil.models.preact_resnet` (3x3 convolutions, no bottleneck). The ATTEQ paper's victim is
RAN-92 at full scale (six attention modules, bottleneck units up to 2048 channels).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, ClassVar

import torch.nn.functional as F
from torch import Tensor, nn

from veil.errors import ConfigError
from veil.models.base import Classifier, init_weights, register_model, scaled_width
from veil.models.preact_resnet import PreActBlock

__all__ = ["AttentionModule", "ResidualAttentionNet", "SoftMaskBranch"]


def _upsample(x: Tensor, like: Tensor) -> Tensor:
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)


class SoftMaskBranch(nn.Module):
    """The soft mask branch ``S(x)`` of an attention module, values in ``(0, 1)``, shape of ``x``.

    ``levels`` times: 3x3 max-pool with stride 2, then a residual unit (``down``); a skip unit
    (``skips``) reads every level but the deepest. At the bottom one more unit (``bottom``); going
    up, bilinear interpolation to the level above, plus its skip, then a residual unit (``up``);
    a last interpolation to the input size and the 1x1-conv sigmoid head (``out``).
    """

    def __init__(self, channels: int, levels: int) -> None:
        super().__init__()
        if levels < 1:
            raise ConfigError(f"the soft mask branch needs at least one level, got {levels}")

        def unit() -> PreActBlock:
            return PreActBlock(channels, channels)

        self.down = nn.ModuleList(unit() for _ in range(levels))
        self.skips = nn.ModuleList(unit() for _ in range(levels - 1))
        self.bottom = unit()
        self.up = nn.ModuleList(unit() for _ in range(levels - 1))
        self.out = nn.Sequential(
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 1),
            nn.Sigmoid(),
        )

    def forward(self, x: Tensor) -> Tensor:
        skips: list[Tensor] = []
        out = x
        for i, unit in enumerate(self.down):
            out = unit(F.max_pool2d(out, 3, 2, 1))
            if i < len(self.skips):
                skips.append(self.skips[i](out))
        out = self.bottom(out)
        for i in reversed(range(len(self.up))):
            out = self.up[i](_upsample(out, skips[i]) + skips[i])
        return self.out(_upsample(out, x))


class AttentionModule(nn.Module):
    """Trunk and soft mask of one attention module: ``forward(x) = (1 + mask(x)) * trunk(x)``.

    The pre- and post-processing residual units sit around it in the stage (``pre<i>``,
    ``post<i>`` next to ``attention<i>`` in :class:`ResidualAttentionNet`'s stages).
    """

    def __init__(self, channels: int, levels: int) -> None:
        super().__init__()
        self.trunk = nn.Sequential(PreActBlock(channels, channels), PreActBlock(channels, channels))
        self.mask = SoftMaskBranch(channels, levels)

    def forward(self, x: Tensor) -> Tensor:
        return (1 + self.mask(x)) * self.trunk(x)


@register_model("ran")
class ResidualAttentionNet(Classifier):
    """Residual Attention Network (Wang et al., CVPR 2017), CPU-scale, CIFAR stem.

    Args:
        num_classes: number of classes.
        width: channels of the first stage (default 16); the stages have ``w, 2w, 4w`` channels
            and ``feature_dim = 4w``.
        in_channels, image_size, mean, std: see :class:`~veil.models.base.Classifier`.
        modules_per_stage: attention modules in each stage, an ``int`` for all three stages
            (default 1, RAN-56's layout) or a 3-tuple (``(1, 2, 3)`` is RAN-92's).

    Stage ``i`` (``"stage1"`` .. ``"stage3"``) is a ``nn.Sequential`` of ``"unit"`` (the
    residual unit, strided in stages 2 and 3) then ``"pre<j>"``, ``"attention<j>"``,
    ``"post<j>"`` for ``j = 1 .. modules_per_stage``; the soft mask has ``mask_levels`` =
    ``(2, 1, 1)`` down/up levels per stage. ``feature_layers()`` is the three stage outputs
    (before the final BN-ReLU); ``last_conv`` is ``"stage3.post<n>.conv2"``.
    """

    default_width = 16
    min_size = 8
    min_size_reason = "two stride-2 stages and the mask's max-pool need 8 pixels to keep a 1x1 mask map"
    mask_levels: ClassVar[tuple[int, int, int]] = (2, 1, 1)

    def __init__(
        self,
        num_classes: int,
        *,
        width: int | None = None,
        in_channels: int = 3,
        image_size: int | tuple[int, int] = 32,
        mean: Any = None,
        std: Any = None,
        modules_per_stage: int | tuple[int, int, int] = 1,
    ) -> None:
        super().__init__(num_classes, in_channels, image_size, mean, std)
        counts = _module_counts(modules_per_stage)
        w = scaled_width(width, self.default_width)
        self.modules_per_stage = counts
        self.conv1 = nn.Conv2d(in_channels, w, 3, 1, 1, bias=False)
        in_planes = w
        stages = []
        for i, (n, stride, levels) in enumerate(zip(counts, (1, 2, 2), self.mask_levels)):
            planes = w * 2**i
            layers: list[tuple[str, nn.Module]] = [("unit", PreActBlock(in_planes, planes, stride))]
            for j in range(1, n + 1):
                layers.append((f"pre{j}", PreActBlock(planes, planes)))
                layers.append((f"attention{j}", AttentionModule(planes, levels)))
                layers.append((f"post{j}", PreActBlock(planes, planes)))
            stages.append(nn.Sequential(OrderedDict(layers)))
            in_planes = planes
        self.stage1, self.stage2, self.stage3 = stages
        self.bn = nn.BatchNorm2d(in_planes)
        self.feature_dim = in_planes
        self.head = nn.Linear(in_planes, num_classes)
        self._feature_layers = ["stage1", "stage2", "stage3"]
        self.last_conv = f"stage3.post{counts[-1]}.conv2"
        #: module path of the last attention module (its output is :meth:`attention_map`'s source)
        self.last_attention = f"stage3.attention{counts[-1]}"
        init_weights(self)

    def _features(self, x: Tensor) -> Tensor:
        out = self.stage3(self.stage2(self.stage1(self.conv1(x))))
        out = F.relu(self.bn(out))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)

    def attention_map(self, x: Tensor) -> Tensor:
        """The last attention module's output ``H = (1 + S) * T``, averaged over channels.

        Args:
            x: images ``(B, C, H, W)`` in ``[0, 1]``.

        Returns:
            ``(B, h, w)`` at the last stage's resolution (``h = H / 4``: 8x8 for 32x32 input), not
            upsampled. The forward pass stops there; the model's mode (train/eval) is left as it
            is, and gradients flow to ``x`` unless the caller disables them.
        """
        return self.feature_map(x, self.last_attention).mean(dim=1)

    def soft_mask(self, x: Tensor) -> Tensor:
        """The last attention module's soft mask ``S`` in ``(0, 1)``, averaged over channels:
        ``(B, h, w)`` like :meth:`attention_map`."""
        return self.feature_map(x, f"{self.last_attention}.mask").mean(dim=1)


def _module_counts(value: Any) -> tuple[int, int, int]:
    counts = (value,) * 3 if isinstance(value, int) and not isinstance(value, bool) else value
    if (
        not isinstance(counts, (tuple, list))
        or len(counts) != 3
        or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in counts)
    ):
        raise ConfigError(
            f"modules_per_stage must be an integer >= 1 or three of them (e.g. (1, 2, 3)), got {value!r}"
        )
    return (int(counts[0]), int(counts[1]), int(counts[2]))
