"""DenseNet-BC-121 with a CIFAR stem.

Huang, Liu, van der Maaten and Weinberger, "Densely Connected Convolutional Networks", CVPR 2017
(arXiv:1608.06993): four dense blocks of ``[6, 12, 24, 16]`` bottleneck layers
(BN -> ReLU -> 1x1 conv to ``4k`` channels -> BN -> ReLU -> 3x3 conv to ``k`` channels, output
concatenated to the input; the "B" in DenseNet-BC), joined by transition layers that halve the
channels (compression 0.5, the "C") and the resolution (BN -> ReLU -> 1x1 conv -> 2x2 average pool),
then BN -> ReLU -> global average pooling -> linear. For 32x32 inputs the stem is one 3x3
convolution with ``2k`` output channels, stride 1, and no max-pool.

Here ``width`` is the growth rate ``k`` (default 32, the paper's DenseNet-121).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from veil.errors import ConfigError
from veil.models.base import Classifier, init_weights, register_model, scaled_width

__all__ = ["DenseLayer", "DenseBlock", "Transition", "DenseNet121"]


class DenseLayer(nn.Module):
    """Bottleneck layer: ``cat([x, conv3x3(relu(bn(conv1x1(relu(bn(x))))))])`` adding ``growth`` channels."""

    def __init__(self, in_planes: int, growth: int, bn_size: int = 4) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, bn_size * growth, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(bn_size * growth)
        self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, 1, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        return torch.cat([x, out], 1)


class DenseBlock(nn.Sequential):
    """``n`` dense layers; the output has ``in_planes + n * growth`` channels."""

    def __init__(self, n: int, in_planes: int, growth: int, bn_size: int = 4) -> None:
        super().__init__(*(DenseLayer(in_planes + i * growth, growth, bn_size) for i in range(n)))
        self.out_planes = in_planes + n * growth


class Transition(nn.Module):
    """BN -> ReLU -> 1x1 conv -> 2x2 average pool (halves the resolution)."""

    def __init__(self, in_planes: int, out_planes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(in_planes)
        self.conv = nn.Conv2d(in_planes, out_planes, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.avg_pool2d(self.conv(F.relu(self.bn(x))), 2)


@register_model("densenet121")
class DenseNet121(Classifier):
    """DenseNet-BC-121 (Huang et al., CVPR 2017) with a CIFAR stem.

    Args:
        num_classes: number of classes.
        width: the growth rate ``k`` (default 32). The stem has ``2k`` channels; with ``k = 32``
            ``feature_dim`` is 1024, as in the paper.
        in_channels, image_size, mean, std: see :class:`~veil.models.base.Classifier`.
        compression: channel reduction of the transition layers, in ``(0, 1]`` (default 0.5).

    ``feature_layers()`` is ``["dense1", ..., "dense4"]`` (dense-block outputs);
    ``last_conv`` is the 3x3 convolution of the last layer of ``dense4`` (``"dense4.15.conv2"``),
    whose ``k`` output channels are the last ones concatenated before pooling.
    """

    default_width = 32
    min_size = 8
    min_size_reason = "three 2x2 average pools need 8 pixels to keep a 1x1 map"
    block_sizes: ClassVar[tuple[int, int, int, int]] = (6, 12, 24, 16)

    def __init__(
        self,
        num_classes: int,
        *,
        width: int | None = None,
        in_channels: int = 3,
        image_size: int | tuple[int, int] = 32,
        mean: Any = None,
        std: Any = None,
        compression: float = 0.5,
    ) -> None:
        super().__init__(num_classes, in_channels, image_size, mean, std)
        if not 0.0 < compression <= 1.0:
            raise ConfigError(f"densenet compression must be in (0, 1], got {compression}")
        growth = scaled_width(width, self.default_width)
        planes = 2 * growth
        self.conv1 = nn.Conv2d(in_channels, planes, 3, 1, 1, bias=False)
        for i, n in enumerate(self.block_sizes, start=1):
            block = DenseBlock(n, planes, growth)
            self.add_module(f"dense{i}", block)
            planes = block.out_planes
            if i < len(self.block_sizes):
                out = max(1, int(planes * compression))
                self.add_module(f"trans{i}", Transition(planes, out))
                planes = out
        self.bn = nn.BatchNorm2d(planes)
        self.feature_dim = planes
        self.head = nn.Linear(planes, num_classes)
        self._feature_layers = [f"dense{i}" for i in range(1, len(self.block_sizes) + 1)]
        self.last_conv = f"dense{len(self.block_sizes)}.{self.block_sizes[-1] - 1}.conv2"
        init_weights(self)

    def _features(self, x: Tensor) -> Tensor:
        out = self.conv1(x)
        out = self.trans1(self.dense1(out))
        out = self.trans2(self.dense2(out))
        out = self.trans3(self.dense3(out))
        out = F.relu(self.bn(self.dense4(out)))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)
