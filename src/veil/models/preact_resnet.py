"""Pre-activation ResNet-18.

He, Zhang, Ren and Sun, "Identity Mappings in Deep Residual Networks", ECCV 2016
(arXiv:1603.05027): residual units ordered BN -> ReLU -> conv (Fig. 4e), with an extra BN -> ReLU
after the last unit before pooling. CIFAR-style stem (one 3x3 conv, stride 1, no max-pool), four
stages of two basic blocks with widths ``w, 2w, 4w, 8w`` and strides ``1, 2, 2, 2``, global average
pooling and a linear head. This is the standard victim model of the backdoor literature
(BackdoorBench, WaNet, LIRA), there at ``w = 64``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch.nn.functional as F
from torch import Tensor, nn

from veil.models.base import Classifier, init_weights, register_model, scaled_width

__all__ = ["PreActBlock", "PreActResNet18"]


class PreActBlock(nn.Module):
    """Pre-activation basic block: ``x + conv(relu(bn(conv(relu(bn(x))))))``; when the shape
    changes the shortcut is a strided 1x1 convolution of the pre-activated input."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


@register_model("preact_resnet18")
class PreActResNet18(Classifier):
    """Pre-activation ResNet-18 (He et al., ECCV 2016) with a CIFAR stem.

    Args:
        num_classes: number of classes.
        width: channels of the first stage (default 64); stages have ``w, 2w, 4w, 8w`` channels
            and ``feature_dim = 8w``.
        in_channels, image_size, mean, std: see :class:`~veil.models.base.Classifier`.

    ``feature_layers()`` is ``["layer1", ..., "layer4"]`` (block outputs, before the final
    BN-ReLU); ``last_conv`` is ``"layer4.1.conv2"``.
    """

    default_width = 64
    min_size = 8
    min_size_reason = "three stride-2 stages need 8 pixels to keep a 1x1 map"
    num_blocks: ClassVar[tuple[int, int, int, int]] = (2, 2, 2, 2)

    def __init__(
        self,
        num_classes: int,
        *,
        width: int | None = None,
        in_channels: int = 3,
        image_size: int | tuple[int, int] = 32,
        mean: Any = None,
        std: Any = None,
    ) -> None:
        super().__init__(num_classes, in_channels, image_size, mean, std)
        w = scaled_width(width, self.default_width)
        self.conv1 = nn.Conv2d(in_channels, w, 3, 1, 1, bias=False)
        in_planes = w
        stages = []
        for i, (n, stride) in enumerate(zip(self.num_blocks, (1, 2, 2, 2))):
            planes = w * 2**i
            blocks = []
            for s in [stride] + [1] * (n - 1):
                blocks.append(PreActBlock(in_planes, planes, s))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.bn = nn.BatchNorm2d(in_planes)
        self.feature_dim = in_planes
        self.head = nn.Linear(in_planes, num_classes)
        self._feature_layers = ["layer1", "layer2", "layer3", "layer4"]
        self.last_conv = f"layer4.{self.num_blocks[-1] - 1}.conv2"
        init_weights(self)

    def _features(self, x: Tensor) -> Tensor:
        out = self.conv1(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.relu(self.bn(out))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)
