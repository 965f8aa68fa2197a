"""Wide residual network WRN-34-10.

Zagoruyko and Komodakis, "Wide Residual Networks", BMVC 2016 (arXiv:1605.07146): a 3x3 stem
convolution with 16 channels, three stages of ``n = (depth - 4) / 6`` pre-activation basic blocks
"B(3,3)" (BN -> ReLU -> 3x3 conv -> BN -> ReLU -> [dropout] -> 3x3 conv) with widths
``16k, 32k, 64k`` and strides ``1, 2, 2``, then BN -> ReLU -> global average pooling -> linear
(Table 1). WRN-34-10 (``depth = 34``, ``k = 10``, 5 blocks per stage) is the usual model of
adversarial-robustness work (Madry et al. 2018; Zhang et al., TRADES, 2019).
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from veil.errors import ConfigError
from veil.models.base import Classifier, init_weights, register_model, scaled_width

__all__ = ["WideBlock", "WideResNet", "WRN34_10"]


class WideBlock(nn.Module):
    """Pre-activation basic block with optional dropout between the convolutions; when the shape
    changes the shortcut is a strided 1x1 convolution of the pre-activated input."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(self.dropout(F.relu(self.bn2(out))))
        return out + shortcut


class WideResNet(Classifier):
    """Wide ResNet (Zagoruyko and Komodakis, BMVC 2016).

    Args:
        num_classes: number of classes.
        width: channels of the stem (default 16); the stages have ``w*k, 2*w*k, 4*w*k`` channels
            and ``feature_dim = 4*w*k`` (640 for WRN-34-10 at the default width).
        in_channels, image_size, mean, std: see :class:`~veil.models.base.Classifier`.
        depth: total depth, ``6n + 4`` (default 34).
        widen_factor: ``k`` (default 10).
        dropout: dropout rate between the two convolutions of each block (default 0, the
            paper's value for CIFAR without dropout).

    ``feature_layers()`` is ``["layer1", "layer2", "layer3"]`` (block outputs, before the final
    BN-ReLU); ``last_conv`` is ``"layer3.{n-1}.conv2"`` (``"layer3.4.conv2"`` for WRN-34-10).
    """

    default_width = 16
    min_size = 8
    min_size_reason = "two stride-2 stages need 8 pixels to keep a 2x2 map"
    default_depth = 34
    default_widen_factor = 10

    def __init__(
        self,
        num_classes: int,
        *,
        width: int | None = None,
        in_channels: int = 3,
        image_size: int | tuple[int, int] = 32,
        mean: Any = None,
        std: Any = None,
        depth: int | None = None,
        widen_factor: int | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(num_classes, in_channels, image_size, mean, std)
        depth = self.default_depth if depth is None else depth
        k = self.default_widen_factor if widen_factor is None else widen_factor
        if not isinstance(depth, int) or depth < 10 or (depth - 4) % 6:
            raise ConfigError(f"wide resnet depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, 34, 40, ...), got {depth!r}")
        if not isinstance(k, int) or k < 1:
            raise ConfigError(f"wide resnet widen_factor must be an integer >= 1, got {k!r}")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {dropout}")
        n = (depth - 4) // 6
        w = scaled_width(width, self.default_width)
        self.depth, self.widen_factor = depth, k
        self.conv1 = nn.Conv2d(in_channels, w, 3, 1, 1, bias=False)
        in_planes = w
        stages = []
        for i, stride in enumerate((1, 2, 2)):
            planes = w * k * 2**i
            blocks = []
            for s in [stride] + [1] * (n - 1):
                blocks.append(WideBlock(in_planes, planes, s, dropout))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.bn = nn.BatchNorm2d(in_planes)
        self.feature_dim = in_planes
        self.head = nn.Linear(in_planes, num_classes)
        self._feature_layers = ["layer1", "layer2", "layer3"]
        self.last_conv = f"layer3.{n - 1}.conv2"
        init_weights(self)

    def _features(self, x: Tensor) -> Tensor:
        out = self.conv1(x)
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.relu(self.bn(out))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)


@register_model("wrn34_10")
class WRN34_10(WideResNet):
    """WRN-34-10: depth 34 (5 blocks per stage), widen factor 10."""

    default_depth = 34
    default_widen_factor = 10
