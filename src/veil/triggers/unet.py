"""A U-Net generator (Ronneberger, Fischer & Brox, MICCAI 2015) for image-dependent triggers.

The shape of the generator used by the multinomial-trigger backdoor (Zhong, Qian & Zhang, IJCAI
2022, section 3.3, "a U-Net like generator"; the authors' public code): ``levels`` resolution
levels with ``width * 2**i`` channels (five levels, 64 to 1024 channels at ``width=64``); each
level is two 3x3 convolutions with BatchNorm and ReLU; 2x2 max-pooling down; nearest-neighbour
2x upsampling followed by a 3x3 convolution, BatchNorm and ReLU up; skip connections by
concatenation; a final 1x1 convolution to ``out_channels`` raw outputs (no activation: the caller
maps them, e.g. through ``0.5 * sigmoid``).

Image sides must be multiples of ``2 ** (levels - 1)`` (16 for five levels: 32x32 and 128x128 work).

Example:
    >>> net = UNet(3, 6, width=4)
    >>> net(torch.rand(2, 3, 32, 32)).shape
    torch.Size([2, 6, 32, 32])
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["UNet"]


def _conv_bn_relu(ch_in: int, ch_out: int) -> list[nn.Module]:
    return [
        nn.Conv2d(ch_in, ch_out, 3, 1, 1),
        nn.BatchNorm2d(ch_out),
        nn.ReLU(inplace=True),
    ]


class _DoubleConv(nn.Sequential):
    """Two (3x3 conv, BatchNorm, ReLU) layers."""

    def __init__(self, ch_in: int, ch_out: int) -> None:
        super().__init__(*_conv_bn_relu(ch_in, ch_out), *_conv_bn_relu(ch_out, ch_out))


class _Up(nn.Sequential):
    """Nearest-neighbour 2x upsampling, then (3x3 conv, BatchNorm, ReLU)."""

    def __init__(self, ch_in: int, ch_out: int) -> None:
        super().__init__(
            nn.Upsample(scale_factor=2, mode="nearest"), *_conv_bn_relu(ch_in, ch_out)
        )


class UNet(nn.Module):
    """U-Net: ``(B, in_channels, H, W)`` -> ``(B, out_channels, H, W)`` raw outputs.

    Args:
        in_channels: image channels (3).
        out_channels: output maps.
        width: channels of the first level (64 in the multinomial paper's code); level ``i`` has
            ``width * 2**i``.
        levels: resolution levels including the bottleneck (5 in the paper's code).
    """

    def __init__(
        self, in_channels: int, out_channels: int, width: int = 64, levels: int = 5
    ) -> None:
        super().__init__()
        if width < 1 or levels < 1 or in_channels < 1 or out_channels < 1:
            raise ValueError(
                f"U-Net needs positive channels, width and levels, got in={in_channels} out={out_channels} "
                f"width={width} levels={levels}"
            )
        self.in_channels, self.out_channels, self.width, self.levels = (
            in_channels,
            out_channels,
            width,
            levels,
        )
        chans = [width * 2**i for i in range(levels)]
        self.down = nn.ModuleList([_DoubleConv(in_channels, chans[0])])
        self.down.extend(_DoubleConv(chans[i - 1], chans[i]) for i in range(1, levels))
        self.pool = nn.MaxPool2d(2, 2)
        # decoder, deepest first: upsample level i to level i - 1, concatenate the skip, convolve
        self.up = nn.ModuleList(
            _Up(chans[i], chans[i - 1]) for i in range(levels - 1, 0, -1)
        )
        self.up_conv = nn.ModuleList(
            _DoubleConv(2 * chans[i - 1], chans[i - 1])
            for i in range(levels - 1, 0, -1)
        )
        self.head = nn.Conv2d(chans[0], out_channels, 1)

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this."""
        return 2 ** (self.levels - 1)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        m = self.size_multiple
        if h % m or w % m:
            raise ValueError(
                f"a {self.levels}-level U-Net needs image sides that are multiples of {m}, got {h}x{w}"
            )
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else self.pool(x))
            skips.append(x)
        x = skips.pop()
        for up, conv in zip(self.up, self.up_conv):
            x = conv(torch.cat((skips.pop(), up(x)), dim=1))
        return self.head(x)
