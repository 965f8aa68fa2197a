"""ResNet-18, -34 and -50 with a CIFAR stem, and ResNet-18 with the ImageNet stem.

He, Zhang, Ren and Sun, "Deep Residual Learning for Image Recognition", CVPR 2016
(arXiv:1512.03385): post-activation residual blocks (conv -> BN -> ReLU, addition, ReLU), the
ImageNet block counts (Table 1: basic blocks ``[2, 2, 2, 2]`` and ``[3, 4, 6, 3]``, bottleneck
blocks ``[3, 4, 6, 3]`` with expansion 4), stage widths ``w, 2w, 4w, 8w`` and strides
``1, 2, 2, 2``; but for 32x32 inputs the stem is one 3x3 convolution with stride 1 and no max-pool
(as in the CIFAR models the backdoor literature trains). Projection shortcuts (1x1 conv + BN,
option B) where the shape changes; the bottleneck's stride sits on its 3x3 convolution.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch.nn.functional as F
from torch import Tensor, nn

from veil.models.base import Classifier, init_weights, register_model, scaled_width

__all__ = ["BasicBlock", "Bottleneck", "ResNet", "ResNet18", "ResNet18ImageNet", "ResNet34", "ResNet50"]


def _projection(in_planes: int, planes: int, stride: int) -> nn.Module | None:
    if stride == 1 and in_planes == planes:
        return None
    return nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions (He et al. 2016, Fig. 5 left)."""

    expansion: ClassVar[int] = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _projection(in_planes, planes, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = self.shortcut(x) if self.shortcut is not None else x
        return F.relu(out + shortcut)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> 1x1 bottleneck with 4x expansion (He et al. 2016, Fig. 5 right)."""

    expansion: ClassVar[int] = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = _projection(in_planes, out_planes, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = self.shortcut(x) if self.shortcut is not None else x
        return F.relu(out + shortcut)


class ResNet(Classifier):
    """Post-activation ResNet (He et al., CVPR 2016) with a CIFAR stem; subclasses fix the depth.

    Args:
        num_classes: number of classes.
        width: channels of the first stage (default 64); stage ``i`` has ``w * 2**i`` channels
            (times 4 at the output of bottleneck blocks), so ``feature_dim`` is ``8w`` for
            ResNet-18/34 and ``32w`` for ResNet-50.
        in_channels, image_size, mean, std: see :class:`~veil.models.base.Classifier`.

    ``feature_layers()`` is ``["layer1", ..., "layer4"]``; ``last_conv`` is the last convolution of
    the last block (``"layer4.1.conv2"`` for ResNet-18). Note that in a post-activation block that
    convolution's output is added to the identity shortcut before the ReLU.
    """

    default_width = 64
    min_size = 8
    min_size_reason = "three stride-2 stages need 8 pixels to keep a 1x1 map"
    block: ClassVar[type[BasicBlock] | type[Bottleneck]] = BasicBlock
    num_blocks: ClassVar[tuple[int, int, int, int]] = (2, 2, 2, 2)
    #: ``"cifar"``: one 3x3 convolution, stride 1, no max-pool; ``"imagenet"``: the paper's 7x7
    #: convolution with stride 2 and a 3x3 max-pool with stride 2 (for 128- or 224-pixel input)
    stem: ClassVar[str] = "cifar"

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
        if self.stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, w, 7, 2, 3, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_channels, w, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        in_planes = w
        stages = []
        for i, (n, stride) in enumerate(zip(self.num_blocks, (1, 2, 2, 2))):
            planes = w * 2**i
            blocks = []
            for s in [stride] + [1] * (n - 1):
                blocks.append(self.block(in_planes, planes, s))
                in_planes = planes * self.block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.feature_dim = in_planes
        self.head = nn.Linear(in_planes, num_classes)
        self._feature_layers = ["layer1", "layer2", "layer3", "layer4"]
        last = "conv3" if self.block is Bottleneck else "conv2"
        self.last_conv = f"layer4.{self.num_blocks[-1] - 1}.{last}"
        init_weights(self)

    def _features(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        if self.stem == "imagenet":
            out = F.max_pool2d(out, 3, 2, 1)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)


@register_model("resnet18")
class ResNet18(ResNet):
    """ResNet-18: basic blocks ``[2, 2, 2, 2]`` (He et al., CVPR 2016, Table 1)."""

    block = BasicBlock
    num_blocks = (2, 2, 2, 2)


@register_model("resnet18_imagenet")
class ResNet18ImageNet(ResNet18):
    """ResNet-18 with the ImageNet stem (7x7 convolution, stride 2, and a 3x3 max-pool: He et al.,
    CVPR 2016, Table 1) for 128- or 224-pixel input: the adaptive paper's Selected-ImageNet
    classifier and the multinomial paper's. Its state dict maps onto torchvision's ``resnet18``
    (:func:`veil.models.pretrained.load_torchvision_resnet18`), so ImageNet weights load into it."""

    stem = "imagenet"
    min_size = 32
    min_size_reason = "the stride-2 stem, the max-pool and three stride-2 stages need 32 pixels to keep a 1x1 map"


@register_model("resnet34")
class ResNet34(ResNet):
    """ResNet-34: basic blocks ``[3, 4, 6, 3]`` (He et al., CVPR 2016, Table 1)."""

    block = BasicBlock
    num_blocks = (3, 4, 6, 3)


@register_model("resnet50")
class ResNet50(ResNet):
    """ResNet-50: bottleneck blocks ``[3, 4, 6, 3]``, expansion 4 (He et al., CVPR 2016, Table 1)."""

    block = Bottleneck
    num_blocks = (3, 4, 6, 3)
