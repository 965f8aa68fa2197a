"""Image-distance metrics that quantify how visible a trigger is.

Conventions, shared by every function here:

- Inputs are float tensors in ``[0, 1]`` of shape ``(B, C, H, W)``; a single image ``(C, H, W)``
  is treated as a batch of one. Both inputs must have the same shape (``ValueError`` otherwise)
  and a floating dtype (``TypeError`` otherwise).
- Per-image metrics return a tensor of shape ``(B,)`` in the inputs' dtype and on their device.
- The backdoor papers report MSE, PSNR and SSIM on the 8-bit scale ``[0, 255]``; so do these
  functions. Modification magnitudes are counted in whole grey levels, ``round(|x - y| * 255)``,
  because the images are 8-bit.
- No function prints, logs per call, or moves data between devices.
"""

from __future__ import annotations

from collections.abc import Sequence
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "mse",
    "psnr",
    "ssim",
    "ssim_3x3",
    "l1",
    "linf",
    "modification_histogram",
    "modified_fraction",
]

_MAX = 255.0
# SSIM constants of Wang et al. (2004), as used by skimage's structural_similarity.
_SSIM_SIGMA = 1.5
_SSIM_TRUNCATE = 3.5
_SSIM_RADIUS = int(_SSIM_TRUNCATE * _SSIM_SIGMA + 0.5)  # 5, as scipy.ndimage computes it
_SSIM_WIN = 2 * _SSIM_RADIUS + 1  # 11
_SSIM_K1 = 0.01
_SSIM_K2 = 0.03
_SSIM_CHUNK = 128  # images per chunk, to bound the float64 working memory


def _pair(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Check a pair of image tensors and return both as ``(B, C, H, W)``."""
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise TypeError(f"expected two torch.Tensor images, got {type(x).__name__} and {type(y).__name__}")
    if not x.is_floating_point() or not y.is_floating_point():
        raise TypeError(
            f"images must be float tensors in [0, 1], got {x.dtype} and {y.dtype} "
            "(convert uint8 images with veil.data.base.to_float)"
        )
    if x.shape != y.shape:
        raise ValueError(f"image shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
    if x.dim() == 3:
        return x.unsqueeze(0), y.unsqueeze(0)
    if x.dim() != 4:
        raise ValueError(f"images must have shape (B, C, H, W) or (C, H, W), got {tuple(x.shape)}")
    return x, y


def _levels(x: Tensor, y: Tensor) -> Tensor:
    """Per-sub-pixel modification magnitude in whole grey levels, ``round(|x - y| * 255)``, int64."""
    return (x - y).abs().mul(_MAX).round().long()


def mse(x: Tensor, y: Tensor) -> Tensor:
    r"""Mean squared error per image on the 0-255 scale.

    .. math:: \mathrm{MSE}(x, y) = \frac{1}{CHW} \sum_{c,h,w} \big(255\,(x_{chw} - y_{chw})\big)^2

    Args:
        x: images in ``[0, 1]``, ``(B, C, H, W)`` or ``(C, H, W)``.
        y: images of the same shape.

    Returns:
        ``(B,)`` tensor.

    Example:
        >>> mse(torch.zeros(1, 1, 2, 2), torch.full((1, 1, 2, 2), 1 / 255))
        tensor([1.])
    """
    x, y = _pair(x, y)
    return (x - y).mul(_MAX).square().flatten(1).mean(dim=1)


def psnr(x: Tensor, y: Tensor) -> Tensor:
    r"""Peak signal-to-noise ratio per image, in dB, with peak 255.

    .. math:: \mathrm{PSNR}(x, y) = 10 \log_{10} \frac{255^2}{\mathrm{MSE}(x, y)}

    with MSE on the 0-255 scale (:func:`mse`). Identical images have ``MSE = 0`` and PSNR ``+inf``;
    this function returns ``inf`` for them and leaves the aggregation choice to the caller
    (:func:`stealth_metrics` averages over the finite values).

    Args:
        x: images in ``[0, 1]``, ``(B, C, H, W)`` or ``(C, H, W)``.
        y: images of the same shape.

    Returns:
        ``(B,)`` tensor, ``inf`` where ``x == y``.

    Example:
        >>> psnr(torch.zeros(1, 1, 2, 2), torch.full((1, 1, 2, 2), 1 / 255))
        tensor([48.1308])
    """
    err = mse(x, y)
    return 10.0 * torch.log10(_MAX**2 / err)  # division by 0 gives inf, log10(inf) = inf


def _gaussian_window(dtype: torch.dtype, device: torch.device) -> Tensor:
    """The 1-D Gaussian of scipy.ndimage (sigma 1.5, truncate 3.5 -> 11 taps), normalised to sum 1."""
    t = torch.arange(-_SSIM_RADIUS, _SSIM_RADIUS + 1, dtype=dtype, device=device)
    g = torch.exp(-0.5 * (t / _SSIM_SIGMA) ** 2)
    return g / g.sum()


def _ssim_chunk(x: Tensor, y: Tensor, window: Tensor, data_range: Tensor | None, cov_norm: float) -> Tensor:
    """Mean SSIM per image of one chunk; ``window`` the separable 1-D weights, ``data_range`` per
    image ``(B,)`` on the 0-255 scale (``None``: 255), ``cov_norm`` the covariance correction."""
    b, c, h, w = x.shape
    x = x.reshape(b * c, 1, h, w).double().mul(_MAX)
    y = y.reshape(b * c, 1, h, w).double().mul(_MAX)
    stats = torch.cat([x, y, x * x, y * y, x * y], dim=1)  # (BC, 5, H, W)
    g = window.to(torch.float64)
    # separable 'valid' filtering: rows then columns, one group per statistic
    stats = F.conv2d(stats, g.view(1, 1, -1, 1).expand(5, 1, -1, 1), groups=5)
    stats = F.conv2d(stats, g.view(1, 1, 1, -1).expand(5, 1, 1, -1), groups=5)
    ux, uy, uxx, uyy, uxy = stats.unbind(dim=1)
    vx = (uxx - ux * ux) * cov_norm
    vy = (uyy - uy * uy) * cov_norm
    vxy = (uxy - ux * uy) * cov_norm
    rng = torch.full((b * c, 1, 1), _MAX, dtype=torch.float64, device=x.device) if data_range is None \
        else data_range.double().repeat_interleave(c).view(b * c, 1, 1)
    c1 = (_SSIM_K1 * rng) ** 2
    c2 = (_SSIM_K2 * rng) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.flatten(1).mean(dim=1).view(b, c).mean(dim=1)


def _check_ssim_size(x: Tensor, win: int, what: str) -> None:
    if x.shape[-1] < win or x.shape[-2] < win:
        raise ValueError(f"SSIM needs images of at least {win}x{win} pixels ({what}), got {x.shape[-2]}x{x.shape[-1]}")


def ssim(x: Tensor, y: Tensor) -> Tensor:
    r"""Mean structural similarity per image (Wang et al., IEEE TIP 2004), on the 0-255 scale.

    For each channel, local statistics are Gaussian-weighted (11x11 window, sigma 1.5):

    .. math::
        \mathrm{SSIM} = \frac{(2\mu_x\mu_y + C_1)(2\sigma_{xy} + C_2)}
                             {(\mu_x^2 + \mu_y^2 + C_1)(\sigma_x^2 + \sigma_y^2 + C_2)},
        \quad C_1 = (0.01 \cdot 255)^2,\ C_2 = (0.03 \cdot 255)^2,

    evaluated only where the window lies fully inside the image ('valid' filtering, i.e. the
    ``(H - 10) x (W - 10)`` map), averaged over positions and then over channels. This matches
    ``skimage.metrics.structural_similarity(a, b, gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=255, channel_axis=...)`` on the images scaled to
    ``[0, 255]`` (population, not sample, covariances). Computed in float64.

    Args:
        x: images in ``[0, 1]``, ``(B, C, H, W)`` or ``(C, H, W)``, with ``H, W >= 11``.
        y: images of the same shape.

    Returns:
        ``(B,)`` tensor; 1 for identical images.

    Raises:
        ValueError: on mismatched shapes or an image smaller than 11 pixels on a side.

    Example:
        >>> img = torch.rand(2, 3, 16, 16)
        >>> ssim(img, img)
        tensor([1., 1.])
    """
    x, y = _pair(x, y)
    _check_ssim_size(x, _SSIM_WIN, "its Gaussian window")
    g = _gaussian_window(torch.float64, x.device)
    out = [_ssim_chunk(xc, yc, g, None, 1.0) for xc, yc in zip(x.split(_SSIM_CHUNK), y.split(_SSIM_CHUNK))]
    if not out:
        return x.new_empty(0)
    return torch.cat(out).to(x.dtype)


def ssim_3x3(x: Tensor, y: Tensor) -> Tensor:
    """Mean SSIM per image as the ATTEQ authors' release measures it (seed paper 003's Table 3).

    Their ``QoE_metric.calculateSSIM`` calls ``skimage.metrics.structural_similarity(gt, predict,
    multichannel=True, win_size=3, data_range=gt.max() - gt.min())``: a 3x3 uniform window,
    sample covariances (the 9/8 correction), the clean image's value range (over all channels) as
    the data range, positions one pixel from the border left out, the mean over channels. A 3x3
    window sees far less of a small patch trigger's neighbourhood than :func:`ssim`'s 11x11
    Gaussian, so this reads closer to 1 (a 3x3 patch at 32x32 touches 25 of 900 positions here
    against 169 of 484 there). An image of one value has range 0; 1/255 is used instead.

    Args:
        x: clean images in ``[0, 1]``, ``(B, C, H, W)`` or ``(C, H, W)``, ``H, W >= 3``; the data
            range is read from these.
        y: triggered images of the same shape.

    Returns:
        ``(B,)`` tensor; 1 for identical images.

    Example:
        >>> img = torch.rand(2, 3, 8, 8)
        >>> ssim_3x3(img, img)
        tensor([1., 1.])
    """
    x, y = _pair(x, y)
    _check_ssim_size(x, 3, "its 3x3 window")
    w = torch.full((3,), 1.0 / 3.0, dtype=torch.float64, device=x.device)
    out = []
    for xc, yc in zip(x.split(_SSIM_CHUNK), y.split(_SSIM_CHUNK)):
        flat = xc.double().flatten(1) * _MAX
        rng = (flat.amax(1) - flat.amin(1)).clamp_min(1.0)
        out.append(_ssim_chunk(xc, yc, w, rng, 9.0 / 8.0))
    if not out:
        return x.new_empty(0)
    return torch.cat(out).to(x.dtype)


def l1(x: Tensor, y: Tensor) -> Tensor:
    r"""Mean absolute difference per image on the ``[0, 1]`` scale,
    :math:`\frac{1}{CHW} \sum |x - x'|`.

    Zhong et al.'s L1 (IJCAI 2022, Table 2, and the authors' code) is the same sum in grey levels,
    255 times this: :func:`veil.metrics.stealth_metrics` records both (``l1``, ``l1_grey_levels``).

    Args:
        x: images in ``[0, 1]``, ``(B, C, H, W)`` or ``(C, H, W)``.
        y: images of the same shape.

    Returns:
        ``(B,)`` tensor.

    Example:
        >>> l1(torch.zeros(1, 1, 2, 2), torch.tensor([[[[0.0, 0.2], [0.4, 0.2]]]]))
        tensor([0.2000])
    """
    x, y = _pair(x, y)
    return (x - y).abs().flatten(1).mean(dim=1)


def linf(x: Tensor, y: Tensor) -> Tensor:
    """Largest per-sub-pixel modification per image, in whole grey levels.

    ``max round(|x - y| * 255)`` over channels and pixels: the images are 8-bit, so the magnitude
    is rounded to the nearest integer level.

    Args:
        x: images in ``[0, 1]``, ``(B, C, H, W)`` or ``(C, H, W)``.
        y: images of the same shape.

    Returns:
        ``(B,)`` tensor of whole numbers, in the inputs' dtype.

    Example:
        >>> linf(torch.zeros(1, 1, 2, 2), torch.tensor([[[[0.0, 3 / 255], [7 / 255, 1 / 255]]]]))
        tensor([7.])
    """
    x, y = _pair(x, y)
    if x.numel() == 0:
        return x.new_zeros(x.shape[0])
    return _levels(x, y).flatten(1).amax(dim=1).to(x.dtype)


def modification_histogram(x: Tensor, y: Tensor, bins: Sequence[int] = (0, 1, 2, 3, 4)) -> dict[str, float]:
    """Distribution of per-sub-pixel modification magnitudes, in percent (Zhong et al., IJCAI 2022, Table 3).

    Each sub-pixel (one channel of one pixel of one image) is modified by
    ``round(|x - y| * 255)`` grey levels. The result gives the share (%) of all ``B * C * H * W``
    sub-pixels modified by exactly each level in ``bins`` and, under the key ``">=k"`` with
    ``k = bins[-1] + 1``, by ``k`` levels or more. The values sum to 100.

    Args:
        x: images in ``[0, 1]``, ``(B, C, H, W)`` or ``(C, H, W)``.
        y: images of the same shape.
        bins: the exact levels to report; must be ``0, 1, ..., k - 1`` (consecutive from 0).

    Returns:
        ``{"0": ..., "1": ..., "2": ..., "3": ..., "4": ..., ">=5": ...}`` for the default bins.

    Example:
        >>> d = torch.tensor([[[[0.0, 1 / 255], [1 / 255, 9 / 255]]]])
        >>> modification_histogram(torch.zeros(1, 1, 2, 2), d)
        {'0': 25.0, '1': 50.0, '2': 0.0, '3': 0.0, '4': 0.0, '>=5': 25.0}
    """
    bins = [int(b) for b in bins]
    if not bins or bins != list(range(len(bins))):
        raise ValueError(f"bins must be consecutive levels starting at 0, e.g. (0, 1, 2, 3, 4), got {tuple(bins)}")
    x, y = _pair(x, y)
    total = x.numel()
    if total == 0:
        raise ValueError("modification histogram of empty images is undefined")
    k = len(bins)
    counts = torch.bincount(_levels(x, y).clamp(max=k).flatten(), minlength=k + 1).tolist()
    hist = {str(b): 100.0 * counts[b] / total for b in bins}
    hist[f">={k}"] = 100.0 * counts[k] / total
    return hist


def modified_fraction(x: Tensor, y: Tensor) -> float:
    """Share in ``[0, 1]`` of all sub-pixels changed by at least one grey level.

    Example:
        >>> modified_fraction(torch.zeros(1, 1, 2, 2), torch.tensor([[[[0.0, 0.001], [1 / 255, 1.0]]]]))
        0.5
    """
    x, y = _pair(x, y)
    if x.numel() == 0:
        raise ValueError("modified fraction of empty images is undefined")
    return float((_levels(x, y) >= 1).double().mean().item())
