"""Fourier heatmaps: a classifier's sensitivity to each 2-D Fourier basis.

Yin, Gontijo Lopes, Shlens, Cubuk & Gilmer (2019), "A Fourier Perspective on Model Robustness in
Computer Vision" (NeurIPS 2019), as restated in section 3 of Hammoud & Ghanem (2021), "Check Your
Other Door! Creating Backdoor Attacks in the Frequency Domain" (arXiv:2109.05507), eq. (1)::

    I~ = I + alpha * r * U_ij,    r uniform in {-1, +1}, one sign per image,

the error rate of the classifier on ``I~`` for every basis ``U_ij`` is the Fourier heatmap.

Index convention (used by everything in this module and by :mod:`veil.triggers.frequency`):
frequencies are indexed in **fftshift-ed** coordinates, as in the paper's figures: for an
``(H, W)`` spectrum, index ``(i, j)`` is the frequency ``(u, v) = (i - H // 2, j - W // 2)`` cycles
per image (rows, columns), so the zero frequency (DC) sits at ``(H // 2, W // 2)``, low frequencies
around it and the highest at the borders. The conjugate-symmetric partner of ``(i, j)`` is the
frequency ``(-u, -v)``, i.e. the index ``((2 * (H // 2) - i) % H, (2 * (W // 2) - j) % W)``
(:func:`conjugate_index`). A frequency is self-conjugate when it equals its partner: the DC and,
for even sides, the Nyquist frequencies (4 of them for even ``H`` and ``W``).

Example:
    >>> import torch
    >>> u = fourier_basis(16, 18, 32, 32)       # 2 cycles per image along the columns
    >>> round(float(u.norm()), 6)
    1.0
    >>> conjugate_index(16, 18, 32, 32)
    (16, 14)
"""

from __future__ import annotations

import io
import logging
import math
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from veil.inference import eval_mode

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_ALPHA",
    "conjugate_index",
    "conjugate_mirror",
    "fourier_bases",
    "fourier_basis",
    "fourier_heatmap",
    "frequency_pairs",
    "heatmap_figure",
    "load_heatmap",
    "save_heatmap",
    "top_k_mask",
]

#: L2 norm of the basis perturbation on images scaled to ``[0, 1]``: Yin et al. (2019) use a norm of
#: 4 for CIFAR-10 (32x32) heatmaps. A unit-norm basis times 4 is a cosine of amplitude
#: ``4 * sqrt(2 / (H W)) = 0.18`` (46 grey levels) at 32x32 -- large enough that a naturally trained
#: network's error rate varies strongly across frequencies, small enough to leave the object intact.
DEFAULT_ALPHA = 4.0


def conjugate_index(i: int, j: int, h: int, w: int) -> tuple[int, int]:
    """The fftshift-ed index of the conjugate-symmetric partner ``(-u, -v)`` of index ``(i, j)``."""
    return (2 * (h // 2) - i) % h, (2 * (w // 2) - j) % w


def conjugate_mirror(t: Tensor) -> Tensor:
    """``t`` over its last two axes (fftshift-ed ``(H, W)`` frequency coordinates) moved to the
    conjugate partners: ``out[..., i, j] = t[..., conj(i), conj(j)]``. A mask ``m`` is closed under
    conjugate symmetry exactly when ``conjugate_mirror(m) == m``."""
    h, w = t.shape[-2:]
    ri = (2 * (h // 2) - torch.arange(h, device=t.device)) % h
    rj = (2 * (w // 2) - torch.arange(w, device=t.device)) % w
    return t.index_select(-2, ri).index_select(-1, rj)


def frequency_pairs(h: int, w: int, include_dc: bool = True) -> list[tuple[int, int]]:
    """One representative fftshift-ed index per conjugate pair (the first in row-major order), in
    row-major order; self-conjugate frequencies appear once. ``(H W + s) / 2`` entries, where ``s``
    is the number of self-conjugate frequencies (4 for even sides: 514 for 32x32)."""
    out = []
    dc = (h // 2, w // 2)
    for i in range(h):
        for j in range(w):
            if (i, j) <= conjugate_index(i, j, h, w) and (include_dc or (i, j) != dc):
                out.append((i, j))
    return out


def fourier_bases(indices: list[tuple[int, int]], h: int, w: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """:func:`fourier_basis` for many indices at once: ``(len(indices), H, W)``."""
    n = len(indices)
    spec = torch.zeros(n, h, w, dtype=torch.complex128)
    rows = torch.arange(n)
    ii = torch.tensor([p[0] for p in indices], dtype=torch.long)
    jj = torch.tensor([p[1] for p in indices], dtype=torch.long)
    ci = (2 * (h // 2) - ii) % h
    cj = (2 * (w // 2) - jj) % w
    spec[rows, ii, jj] = 1.0
    spec[rows, ci, cj] = 1.0  # the same entry again for self-conjugate frequencies
    u = torch.fft.ifft2(torch.fft.ifftshift(spec, dim=(-2, -1))).real
    u = u / u.flatten(1).norm(dim=1).view(n, 1, 1)
    return u.to(dtype)


def fourier_basis(i: int, j: int, h: int, w: int) -> Tensor:
    """The real 2-D Fourier basis ``U_ij`` of section 3 of the paper: ``(H, W)``, unit Frobenius
    norm, whose DFT is non-zero only at the fftshift-ed index ``(i, j)`` and its conjugate partner
    (one entry for self-conjugate frequencies).

    ``U_ij`` is the normalised real part of the inverse DFT of a unit impulse at ``(i, j)``: a cosine
    ``cos(2 pi (u m / H + v n / W))`` with ``(u, v) = (i - H // 2, j - W // 2)``; so
    ``U_ij == U_conj(ij)``.
    """
    if not (0 <= i < h and 0 <= j < w):
        raise ValueError(f"frequency index ({i}, {j}) is outside a {h}x{w} spectrum")
    return fourier_bases([(i, j)], h, w)[0]


@torch.no_grad()
def fourier_heatmap(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    alpha: float = DEFAULT_ALPHA,
    batch_size: int = 1024,
    generator: torch.Generator | None = None,
    progress: bool = True,
    device: str | torch.device | None = None,
) -> Tensor:
    """The Fourier heatmap of ``model`` (Yin et al. 2019; Hammoud & Ghanem 2021, eq. 1).

    For every basis ``U_ij`` each image gets ``x + alpha * r * U_ij`` (the same ``U_ij`` on every
    channel, one random sign ``r`` per image and basis), **clamped to** ``[0, 1]`` so the network
    sees valid images, as a saved image would be; the heatmap holds the error rate (share of
    perturbed images not classified as their label, so images misclassified without perturbation
    count too). Each conjugate pair is evaluated once and mirrored, since ``U_ij`` and its partner
    are the same basis. Many (basis, image) combinations go through one forward pass: a batch holds
    ``batch_size // n_images`` bases times all images when the images fit in one batch, otherwise
    one basis times ``batch_size`` images.

    Args:
        model: a classifier taking float images in ``[0, 1]``; put in eval mode for the call and
            restored afterwards.
        images: ``(N, C, H, W)`` uint8 or float in ``[0, 1]``.
        labels: ``(N,)`` true labels.
        alpha: L2 norm of the perturbation per channel on the ``[0, 1]`` scale (4, Yin et al.).
        batch_size: images per forward pass.
        generator: source of the random signs (``None``: the global generator).
        progress: show a progress bar.
        device: where to run (default: the model's device).

    Returns:
        ``(H, W)`` float tensor of error rates in ``[0, 1]``, fftshift-ed (DC at the centre),
        on the CPU.
    """
    if images.dim() != 4:
        raise ValueError(f"images must be (N, C, H, W), got {tuple(images.shape)}")
    if labels.shape != images.shape[:1]:
        raise ValueError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
    n, _, h, w = images.shape
    if n == 0:
        raise ValueError("a Fourier heatmap needs at least one image")
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    x = images.to(dev)
    x = x.float().div(255.0) if x.dtype == torch.uint8 else x.float()
    y = labels.to(dev).long()
    pairs = frequency_pairs(h, w)
    bases = fourier_bases(pairs, h, w).to(dev)  # (P, H, W)
    # one sign per (basis, image), drawn up front so the result does not depend on batch_size
    signs = torch.randint(0, 2, (len(pairs), n), generator=generator).to(dev, torch.float32).mul_(2).sub_(1)
    errors = torch.zeros(len(pairs), dtype=torch.float64)
    per_basis = max(1, batch_size // n)  # bases per forward pass when all images fit in one
    img_chunk = min(n, batch_size)
    channels_last = dev.type == "cpu"
    bar = tqdm(total=len(pairs), desc="fourier heatmap", unit="basis", disable=not progress, leave=False)
    with eval_mode(model):
        for p0 in range(0, len(pairs), per_basis):
            p1 = min(len(pairs), p0 + per_basis)
            for i0 in range(0, n, img_chunk):
                i1 = min(n, i0 + img_chunk)
                xb = x[i0:i1]  # (b, C, H, W)
                pert = signs[p0:p1, i0:i1, None, None, None] * bases[p0:p1, None, None]  # (p, b, 1, H, W)
                batch = (xb.unsqueeze(0) + alpha * pert).clamp_(0, 1).flatten(0, 1)
                if channels_last:
                    batch = batch.contiguous(memory_format=torch.channels_last)
                with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                    pred = model(batch).argmax(1)
                wrong = (pred.view(p1 - p0, i1 - i0) != y[i0:i1]).sum(1)
                errors[p0:p1] += wrong.double().cpu()
            bar.update(p1 - p0)
    bar.close()
    heat = torch.zeros(h, w, dtype=torch.float64)
    ii = torch.tensor([p[0] for p in pairs])
    jj = torch.tensor([p[1] for p in pairs])
    heat[ii, jj] = errors / n
    heat[(2 * (h // 2) - ii) % h, (2 * (w // 2) - jj) % w] = errors / n
    return heat.float()


def top_k_mask(heatmap: Tensor, k: int, exclude_dc: bool = True) -> Tensor:
    """The ``k`` most sensitive frequencies of a heatmap as a mask closed under conjugate symmetry.

    ``k`` counts conjugate **pairs**: a frequency and its partner are one choice (they are one
    basis and one degree of freedom of a real image), so the mask has ``2 k`` entries, minus one
    for each chosen self-conjugate frequency. A pair's score is the larger of its two heatmap values
    (they are equal for a heatmap from :func:`fourier_heatmap`); ties go to the pair first in
    row-major order. The DC component (the image's mean brightness) is excluded by default.

    Args:
        heatmap: ``(H, W)`` fftshift-ed heatmap.
        k: number of pairs, ``1 <= k <=`` the number of pairs available.
        exclude_dc: leave out the zero frequency.

    Returns:
        ``(H, W)`` bool mask, fftshift-ed, with ``conjugate_mirror(mask) == mask``.
    """
    if heatmap.dim() != 2:
        raise ValueError(f"heatmap must be (H, W), got {tuple(heatmap.shape)}")
    h, w = heatmap.shape
    pairs = frequency_pairs(h, w, include_dc=not exclude_dc)
    if not 1 <= k <= len(pairs):
        raise ValueError(f"k must be in 1..{len(pairs)} for a {h}x{w} heatmap, got {k}")
    sym = torch.maximum(heatmap.double(), conjugate_mirror(heatmap.double()))
    scores = torch.tensor([float(sym[i, j]) for i, j in pairs], dtype=torch.float64)
    order = torch.sort(-scores, stable=True).indices[:k]
    mask = torch.zeros(h, w, dtype=torch.bool)
    for t in order.tolist():
        i, j = pairs[t]
        mask[i, j] = True
        mask[conjugate_index(i, j, h, w)] = True
    return mask


def heatmap_figure(heatmap: Tensor, mask: Tensor | None = None, title: str | None = None) -> bytes:
    """PNG of the heatmap beside the selected mask (the paper's Figure 3), with matplotlib Agg.

    Axes are labelled in cycles per image (fftshift-ed: the zero frequency at the centre).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    h, w = heatmap.shape
    extent = (-(w // 2) - 0.5, w - w // 2 - 0.5, h - h // 2 - 0.5, -(h // 2) - 0.5)
    ncols = 1 if mask is None else 2
    fig = Figure(figsize=(4.2 * ncols, 3.6), dpi=110)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    im = axes[0].imshow(heatmap.detach().cpu().numpy(), cmap="jet", vmin=0.0, vmax=1.0, extent=extent)
    axes[0].set_title("Fourier heatmap (error rate)")
    fig.colorbar(im, ax=axes[0], fraction=0.046, pad=0.04)
    if mask is not None:
        axes[1].imshow(mask.detach().cpu().float().numpy(), cmap="gray", vmin=0.0, vmax=1.0, extent=extent)
        n_pairs = (int(mask.sum()) + int((mask & _self_conjugate(h, w)).sum())) // 2
        axes[1].set_title(f"top-k mask ({int(mask.sum())} frequencies, {n_pairs} pairs)")
    for ax in axes:
        ax.set_xlabel("v (cycles / image, columns)")
        ax.set_ylabel("u (cycles / image, rows)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _self_conjugate(h: int, w: int) -> Tensor:
    i = torch.arange(h).view(-1, 1)
    j = torch.arange(w).view(1, -1)
    return (i == (2 * (h // 2) - i) % h) & (j == (2 * (w // 2) - j) % w)


def save_heatmap(path: str | Path, heatmap: Tensor) -> None:
    """Save a heatmap as safetensors (key ``"heatmap"``), atomically."""
    from veil.records import atomic_save_tensors

    atomic_save_tensors(path, {"heatmap": heatmap.detach().float().cpu().contiguous()})


def load_heatmap(path: str | Path) -> Tensor:
    """Load the ``"heatmap"`` tensor of a safetensors file: one written by :func:`save_heatmap` or
    the ``attack.safetensors`` of a finished ``frequency`` run."""
    from veil.errors import ConfigError
    from veil.records import load_tensors

    tensors = load_tensors(path)
    if "heatmap" not in tensors:
        raise ConfigError(f"{path} holds no 'heatmap' tensor (has: {', '.join(sorted(tensors)) or 'nothing'})")
    heat = tensors["heatmap"].float()
    if heat.dim() != 2 or not math.isfinite(float(heat.sum())):
        raise ConfigError(f"{path}: heatmap must be a finite (H, W) tensor, got shape {tuple(heat.shape)}")
    return heat
