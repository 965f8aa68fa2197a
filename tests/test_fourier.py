"""Tests of veil.analysis.fourier: Fourier bases, heatmaps (Yin et al. 2019; Hammoud & Ghanem 2021
section 3), top-k masks and the heatmap figure."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from veil.analysis import (
    conjugate_index,
    conjugate_mirror,
    fourier_basis,
    fourier_heatmap,
    heatmap_figure,
    load_heatmap,
    save_heatmap,
    top_k_mask,
)
from veil.analysis.fourier import fourier_bases, frequency_pairs
from veil.errors import ConfigError


def shifted_dft(u: Tensor) -> Tensor:
    return torch.fft.fftshift(torch.fft.fft2(u.double()), dim=(-2, -1))


# ---------------------------------------------------------------------------------------- bases


@pytest.mark.parametrize(
    ("i", "j", "h", "w"),
    [(3, 7, 32, 32), (16, 18, 32, 32), (0, 5, 32, 32), (31, 31, 32, 32), (2, 9, 15, 12), (1, 4, 9, 9)],
)
def test_basis_has_unit_norm_and_two_dft_entries(i: int, j: int, h: int, w: int) -> None:
    u = fourier_basis(i, j, h, w)
    assert u.shape == (h, w) and u.dtype == torch.float32 and not u.is_complex()
    assert float(u.double().norm()) == pytest.approx(1.0, abs=1e-6)
    nonzero = {tuple(p) for p in (shifted_dft(u).abs() > 1e-6).nonzero().tolist()}
    assert nonzero == {(i, j), conjugate_index(i, j, h, w)}
    assert len(nonzero) == 2
    # the basis of the partner is the same basis
    torch.testing.assert_close(fourier_basis(*conjugate_index(i, j, h, w), h, w), u)


@pytest.mark.parametrize(("i", "j"), [(16, 16), (0, 0), (0, 16), (16, 0)])
def test_self_conjugate_basis_has_one_dft_entry(i: int, j: int) -> None:
    u = fourier_basis(i, j, 32, 32)
    assert conjugate_index(i, j, 32, 32) == (i, j)
    assert float(u.double().norm()) == pytest.approx(1.0, abs=1e-6)
    nonzero = (shifted_dft(u).abs() > 1e-6).nonzero().tolist()
    assert nonzero == [[i, j]]
    if (i, j) == (16, 16):  # DC at the centre: a constant image
        torch.testing.assert_close(u, torch.full((32, 32), 1 / 32))


def test_index_convention_and_pairs() -> None:
    # (16, 18) in a 32x32 shifted spectrum is u = 0, v = +2: two cycles along the columns, constant down rows
    u = fourier_basis(16, 18, 32, 32)
    assert torch.allclose(u, u[0].expand(32, 32))
    n = torch.arange(32, dtype=torch.float64)
    expected = torch.cos(2 * torch.pi * 2 * n / 32)
    torch.testing.assert_close(u[0].double() / u[0].double().norm(), expected / expected.norm(), atol=1e-6, rtol=0)
    # 4 self-conjugate frequencies for even sides, 1 (DC) for odd
    assert len(frequency_pairs(32, 32)) == (32 * 32 + 4) // 2
    assert len(frequency_pairs(15, 15)) == (15 * 15 + 1) // 2
    assert len(frequency_pairs(32, 32, include_dc=False)) == (32 * 32 + 4) // 2 - 1
    bases = fourier_bases(frequency_pairs(8, 8), 8, 8).double().flatten(1)
    gram = bases @ bases.T  # distinct pairs are orthonormal
    torch.testing.assert_close(gram, torch.eye(gram.shape[0], dtype=torch.float64), atol=1e-6, rtol=0)
    t = torch.arange(6 * 5).view(6, 5)
    m = conjugate_mirror(t)
    assert m[1, 2] == t[conjugate_index(1, 2, 6, 5)]
    assert torch.equal(conjugate_mirror(m), t)


# ---------------------------------------------------------------------------------------- heatmap


class Planted(nn.Module):
    """A two-class toy model sensitive to exactly one basis: class 0 while the projection of the
    channel mean onto ``U_ij`` stays within ``band`` of its clean value, class 1 otherwise. A
    perturbation ``alpha r U_ij`` moves the projection by ``alpha``; an orthogonal basis by 0."""

    def __init__(self, i: int, j: int, size: int, band: float) -> None:
        super().__init__()
        self.proj = nn.Linear(size * size, 1, bias=False)
        with torch.no_grad():
            self.proj.weight.copy_(fourier_basis(i, j, size, size).flatten())
        self.center = 0.0
        self.band = band

    def forward(self, x: Tensor) -> Tensor:
        z = self.proj(x.mean(1).flatten(1))
        d = (z - self.center).abs()
        return torch.cat([self.band - d, torch.zeros_like(d)], dim=1)


def grey_images(n: int, size: int, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return (0.5 + 0.02 * torch.randn(n, 3, size, size, generator=g)).clamp(0, 1)


@pytest.mark.parametrize(("i0", "j0"), [(3, 9), (8, 13)])
def test_heatmap_finds_a_planted_frequency(i0: int, j0: int) -> None:
    size, alpha = 16, 2.0
    model = Planted(i0, j0, size, band=alpha / 2)
    x = grey_images(10, size)
    with torch.no_grad():
        model.center = float(model.proj(x.mean(1).flatten(1)).mean())
    labels = torch.zeros(10, dtype=torch.long)
    assert (model(x).argmax(1) == 0).all()
    heat = fourier_heatmap(model, x, labels, alpha=alpha, batch_size=64, generator=torch.Generator().manual_seed(0), progress=False)
    assert heat.shape == (size, size) and heat.min() >= 0 and heat.max() <= 1
    partner = conjugate_index(i0, j0, size, size)
    flat = int(heat.argmax())
    assert (flat // size, flat % size) in {(i0, j0), partner}
    assert heat[i0, j0] == 1.0 and heat[partner] == 1.0
    others = heat.clone()
    others[i0, j0] = others[partner] = 0
    assert others.max() == 0.0
    assert torch.equal(heat, conjugate_mirror(heat))
    mask = top_k_mask(heat, 1)
    assert mask[i0, j0] and mask[partner] and int(mask.sum()) == 2


def test_heatmap_does_not_depend_on_batch_size_and_is_seeded() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 3))
    x = torch.rand(7, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    y = torch.arange(7) % 3
    runs = [
        fourier_heatmap(model, x, y, alpha=8.0, batch_size=bs, generator=torch.Generator().manual_seed(5), progress=False)
        for bs in (3, 16, 1000)
    ]
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])
    assert torch.equal(runs[0], conjugate_mirror(runs[0]))
    # uint8 input gives the same result as its float version
    u8 = (x * 255).round().to(torch.uint8)
    a = fourier_heatmap(model, u8, y, alpha=8.0, generator=torch.Generator().manual_seed(5), progress=False)
    b = fourier_heatmap(model, u8.float() / 255, y, alpha=8.0, generator=torch.Generator().manual_seed(5), progress=False)
    assert torch.equal(a, b)
    assert model.training  # the mode is restored


def test_heatmap_checks_its_inputs() -> None:
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError):
        fourier_heatmap(model, torch.rand(3, 8, 8), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError):
        fourier_heatmap(model, torch.rand(2, 3, 8, 8), torch.zeros(3, dtype=torch.long))


# ---------------------------------------------------------------------------------------- top-k


def test_top_k_mask_counts_pairs_and_is_conjugate_closed() -> None:
    g = torch.Generator().manual_seed(0)
    heat = torch.rand(32, 32, generator=g)
    heat = torch.maximum(heat, conjugate_mirror(heat))
    for k in (1, 4, 7):
        mask = top_k_mask(heat, k)
        assert mask.dtype == torch.bool and torch.equal(mask, conjugate_mirror(mask))
        assert not mask[16, 16]
        selfconj = sum(bool(mask[i, j]) for i, j in [(0, 0), (0, 16), (16, 0)])
        assert int(mask.sum()) == 2 * k - selfconj
        # the selected pairs score at least as high as every other non-DC frequency
        rest = heat.clone()
        rest[mask] = -1
        rest[16, 16] = -1
        assert heat[mask].min() >= rest.max()
    # the DC is excluded by default and included on request; a self-conjugate pick counts once
    peak = torch.zeros(32, 32)
    peak[16, 16] = 1.0
    peak[0, 16] = 0.9
    peak[3, 4] = peak[conjugate_index(3, 4, 32, 32)] = 0.8
    assert top_k_mask(peak, 1).nonzero().tolist() == [[0, 16]]
    assert top_k_mask(peak, 1, exclude_dc=False).nonzero().tolist() == [[16, 16]]
    assert int(top_k_mask(peak, 2).sum()) == 3
    with pytest.raises(ValueError):
        top_k_mask(peak, 0)
    with pytest.raises(ValueError):
        top_k_mask(peak, 600)


# ---------------------------------------------------------------------------------------- outputs


def test_heatmap_figure_and_file_round_trip(tmp_path) -> None:  # type: ignore[no-untyped-def]
    heat = torch.rand(32, 32)
    png = heatmap_figure(heat, top_k_mask(heat, 3))
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000
    assert heatmap_figure(heat)[:4] == b"\x89PNG"
    save_heatmap(tmp_path / "h.safetensors", heat)
    torch.testing.assert_close(load_heatmap(tmp_path / "h.safetensors"), heat)
    from veil.records import atomic_save_tensors

    atomic_save_tensors(tmp_path / "other.safetensors", {"x": torch.zeros(2)})
    with pytest.raises(ConfigError, match="heatmap"):
        load_heatmap(tmp_path / "other.safetensors")
