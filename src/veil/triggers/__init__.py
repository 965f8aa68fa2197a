"""Pure, batched trigger functions (ART-style perturbations) that attacks compose.

Every function takes float images ``(B, C, H, W)`` in ``[0, 1]`` and trigger tensors, never global
state, and is differentiable in the images where the operation allows it.

===================  ========================================================================
module               what it provides
===================  ========================================================================
:mod:`.pattern`      seeded uniform/smooth noise, checkerboards, user images read with PIL
:mod:`.patch`        BadNets ``(1 - m) x + m p`` stamping and corner masks
:mod:`.blend`        Blended ``(1 - alpha) x + alpha k``
:mod:`.sinusoid`     SIG's horizontal sinusoid ``delta sin(2 pi j f / m)``
:mod:`.warp`         WaNet's warping grids and ``grid_sample`` warp
:mod:`.spectral`     FIBA's low-frequency amplitude-spectrum blending
:mod:`.multinomial`  the multinomial {-1, 0, +1} trigger: exact sampler (eq. 1) and SampleNet
:mod:`.unet`         the U-Net generator of image-dependent triggers
===================  ========================================================================
"""

from __future__ import annotations

from veil.triggers.blend import blend
from veil.triggers.multinomial import SampleNet, sample_trigger, train_samplenet
from veil.triggers.patch import corner_mask, stamp
from veil.triggers.pattern import checkerboard, load_image, smooth_noise, uniform_noise
from veil.triggers.sinusoid import add_signal, horizontal_sinusoid
from veil.triggers.spectral import amplitude_blend, amplitude_spectrum, low_frequency_mask
from veil.triggers.unet import UNet
from veil.triggers.warp import identity_grid, noise_grid, perturb_grid, warp, warping_grid

__all__ = [
    "SampleNet",
    "UNet",
    "add_signal",
    "amplitude_blend",
    "amplitude_spectrum",
    "blend",
    "checkerboard",
    "corner_mask",
    "horizontal_sinusoid",
    "identity_grid",
    "load_image",
    "low_frequency_mask",
    "noise_grid",
    "perturb_grid",
    "sample_trigger",
    "smooth_noise",
    "stamp",
    "train_samplenet",
    "uniform_noise",
    "warp",
    "warping_grid",
]
