"""Feature taps of a classifier and the U-Net-style decoder the semantic-feature attack builds on
them (Table I of the paper, read so that it upsamples).

:func:`tap_maps` runs a classifier once and returns the outputs of several of its modules (the
low-level maps for the skips and the high-level map for the trigger); :data:`SEMANTIC_TAPS` names
them per backbone. :class:`FeatureDecoder` maps the (attention-weighted) high-level map back to an
image: per skip, deepest first, a 2x2 transposed convolution with stride 2 to the skip's channels
and resolution, the skip concatenated, and a double 3x3 convolution (stride 1, padding 1, ReLU);
then plain up-blocks (channels halved) to the input resolution, and a 1x1 convolution to the
image's channels with a ReLU, clamped to ``[0, 1]`` (Table I), or, with ``residual=True``, added to
the clean image and clamped to ``[0, 1]``, the 1x1 convolution starting at zero (the decoder then
starts at the identity).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from veil.errors import ConfigError

__all__ = ["SEMANTIC_TAPS", "FeatureDecoder", "tap_maps", "taps_for"]

#: per backbone: the skip taps (shallow to deep) and the high-level tap. VGG: the stage outputs
#: after pooling (w at H/2, 2w at H/4, 4w at H/8; 8w at H/16: stage 4, the 512 channels of Table I
#: at w = 64); the ResNets: layer1-3 for the skips, layer4 for the trigger
SEMANTIC_TAPS: dict[str, tuple[tuple[str, ...], str]] = {
    "vgg16": (("stage1", "stage2", "stage3"), "stage4"),
    "vgg19": (("stage1", "stage2", "stage3"), "stage4"),
    "preact_resnet18": (("layer1", "layer2", "layer3"), "layer4"),
    "resnet18": (("layer1", "layer2", "layer3"), "layer4"),
}


def taps_for(model_name: str) -> tuple[tuple[str, ...], str]:
    """The skip and high-level taps of a backbone; a clear error for one without them."""
    if model_name not in SEMANTIC_TAPS:
        raise ConfigError(f"the semantic attack has no feature taps for a {model_name!r} surrogate; "
                          f"it supports {', '.join(sorted(SEMANTIC_TAPS))}")
    return SEMANTIC_TAPS[model_name]


def tap_maps(model: nn.Module, x: Tensor, layers: Sequence[str]) -> list[Tensor]:
    """The outputs of the modules ``layers`` of ``model`` in one forward pass on ``x`` (gradients
    flow to ``x`` unless the caller disables them)."""
    modules = dict(model.named_modules())
    missing = [name for name in layers if name not in modules]
    if missing:
        raise ConfigError(f"{type(model).__name__} has no module {missing[0]!r} to tap")
    found: dict[str, Tensor] = {}

    def hook(name: str):  # type: ignore[no-untyped-def]
        def fn(_m: nn.Module, _inp: object, out: Tensor) -> None:
            found[name] = out
        return fn

    handles = [modules[name].register_forward_hook(hook(name)) for name in layers]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return [found[name] for name in layers]


def _double_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, 1, 1), nn.ReLU(inplace=True), nn.Conv2d(cout, cout, 3, 1, 1),
                         nn.ReLU(inplace=True))


class FeatureDecoder(nn.Module):
    """Decoder from a high-level map ``(B, C_h, h, w)`` and skip maps (shallow to deep) to an image
    ``(B, out_channels, H, W)`` in ``[0, 1]``.

    Args:
        high: ``(channels, side)`` of the high-level map.
        skips: ``(channels, side)`` of each skip map, shallow to deep; each side must be a power
            of two times the next deeper one (its own deeper neighbour or the high map).
        out_channels: image channels; ``image_side``: the output's side.
        residual: output ``clamp(image + conv(.), 0, 1)`` (the clean image passed to
            :meth:`forward`), the last convolution initialised at zero, instead of
            ``min(relu(conv(.)), 1)``.
    """

    def __init__(self, high: tuple[int, int], skips: Sequence[tuple[int, int]], out_channels: int, image_side: int,
                 residual: bool = False) -> None:
        super().__init__()
        self.residual = residual
        c, side = high
        self.ups = nn.ModuleList()
        self.convs = nn.ModuleList()
        self.with_skip: list[bool] = []
        for skip_c, skip_side in reversed(list(skips)):
            if skip_side == side:
                self.ups.append(nn.Conv2d(c, skip_c, 1))
            elif skip_side == 2 * side:
                self.ups.append(nn.ConvTranspose2d(c, skip_c, 2, 2))
            else:
                raise ConfigError(f"a skip map of side {skip_side} cannot follow a map of side {side} (needs 1x or 2x)")
            self.convs.append(_double_conv(2 * skip_c, skip_c))
            self.with_skip.append(True)
            c, side = skip_c, skip_side
        while side < image_side:
            nxt = max(1, c // 2)
            self.ups.append(nn.ConvTranspose2d(c, nxt, 2, 2))
            self.convs.append(_double_conv(nxt, nxt))
            self.with_skip.append(False)
            c, side = nxt, 2 * side
        if side != image_side:
            raise ConfigError(f"the decoder reaches side {side}, not the image's {image_side}")
        self.out = nn.Conv2d(c, out_channels, 1)
        if residual:
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)

    def forward(self, high: Tensor, skips: Sequence[Tensor], image: Tensor | None = None) -> Tensor:
        """The decoded image; ``image`` (the clean input, ``(B, out_channels, H, W)``) is needed by
        the residual head and ignored otherwise."""
        x = high
        deep_first = list(reversed(list(skips)))
        k = 0
        for up, conv, has_skip in zip(self.ups, self.convs, self.with_skip):
            x = up(x)
            if has_skip:
                x = torch.cat([x, deep_first[k]], 1)
                k += 1
            x = conv(x)
        if self.residual:
            if image is None:
                raise ValueError("the residual decoder needs the clean image")
            return (image + self.out(x)).clamp(0.0, 1.0)
        return torch.relu(self.out(x)).clamp(max=1.0)
