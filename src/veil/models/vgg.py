"""VGG-16 and VGG-19 with batch normalisation.

Simonyan and Zisserman, "Very Deep Convolutional Networks for Large-Scale Image Recognition",
ICLR 2015 (arXiv:1409.1556), configurations D (VGG-16) and E (VGG-19) of Table 1: five stages of
3x3 convolutions (stride 1, padding 1) each followed by 2x2 max-pooling, with BatchNorm after every
convolution (Ioffe and Szegedy, ICML 2015). As in the CIFAR versions the backdoor literature trains,
the three 4096-wide fully connected layers are replaced by global average pooling and one linear
layer, so ``feature_dim`` is the last stage's width.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch.nn.functional as F
from torch import Tensor, nn

from veil.models.base import Classifier, init_weights, register_model, scaled_width

__all__ = ["ConvBNReLU", "VGG", "VGG16", "VGG19"]


class ConvBNReLU(nn.Module):
    """3x3 convolution -> BatchNorm -> ReLU."""

    def __init__(self, in_planes: int, planes: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_planes, planes, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(planes)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


class VGG(Classifier):
    """VGG with BatchNorm (Simonyan and Zisserman, ICLR 2015); subclasses fix the depth.

    Args:
        num_classes: number of classes.
        width: channels of the first stage (default 64); the five stages have
            ``w, 2w, 4w, 8w, 8w`` channels and ``feature_dim = 8w``.
        in_channels, image_size, mean, std: see :class:`~veil.models.base.Classifier`.

    Stage ``i`` is ``stage{i}``: a sequence of :class:`ConvBNReLU` followed by a max-pool.
    ``feature_layers()`` is ``["stage1", ..., "stage5"]`` (after pooling); ``last_conv`` is the
    last convolution of ``stage5`` (``"stage5.2.conv"`` for VGG-16).
    """

    default_width = 64
    min_size = 32
    min_size_reason = "five 2x2 max-pools need 32 pixels to keep a 1x1 map"
    #: convolutions per stage (Table 1 of the paper)
    convs_per_stage: ClassVar[tuple[int, int, int, int, int]] = (2, 2, 3, 3, 3)

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
        in_planes = in_channels
        for i, (n, mult) in enumerate(zip(self.convs_per_stage, (1, 2, 4, 8, 8)), start=1):
            layers: list[nn.Module] = []
            for _ in range(n):
                layers.append(ConvBNReLU(in_planes, w * mult))
                in_planes = w * mult
            layers.append(nn.MaxPool2d(2, 2))
            self.add_module(f"stage{i}", nn.Sequential(*layers))
        self.feature_dim = in_planes
        self.head = nn.Linear(in_planes, num_classes)
        self._feature_layers = [f"stage{i}" for i in range(1, 6)]
        self.last_conv = f"stage5.{self.convs_per_stage[-1] - 1}.conv"
        init_weights(self)

    def _features(self, x: Tensor) -> Tensor:
        out = self.stage1(x)
        out = self.stage5(self.stage4(self.stage3(self.stage2(out))))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)


@register_model("vgg16")
class VGG16(VGG):
    """VGG-16 with BatchNorm (configuration D): ``[2, 2, 3, 3, 3]`` convolutions per stage."""

    convs_per_stage = (2, 2, 3, 3, 3)


@register_model("vgg19")
class VGG19(VGG):
    """VGG-19 with BatchNorm (configuration E): ``[2, 2, 4, 4, 4]`` convolutions per stage."""

    convs_per_stage = (2, 2, 4, 4, 4)
