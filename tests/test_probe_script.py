"""scripts/probe_trigger_learnability.py: its fixed pattern and flat-site count."""

from __future__ import annotations

import pytest
import torch
from conftest import load_script


@pytest.fixture(scope="module")
def probe():  # type: ignore[no-untyped-def]
    return load_script("scripts/probe_trigger_learnability.py")


@pytest.mark.parametrize("signs", ["checker", "plus", "random"])
def test_fixed_pattern_is_one_grey_level_at_the_asked_density(probe, signs: str) -> None:  # type: ignore[no-untyped-def]
    p = probe.fixed_pattern((3, 32, 32), 0.1, signs, seed=3)
    assert set(p.unique().tolist()) <= {-1.0, 0.0, 1.0}
    assert 0.08 < float(p.abs().mean()) < 0.12
    assert torch.equal(p, probe.fixed_pattern((3, 32, 32), 0.1, signs, seed=3))
    if signs == "checker":
        i, j = torch.nonzero(p[0]).unbind(1)
        assert torch.equal(p[0][i, j], (((i + j) % 2) * 2 - 1).float())
    if signs == "plus":
        assert float(p.min()) == 0.0


def test_flat_sites_counts_sites_whose_neighbours_match(probe) -> None:  # type: ignore[no-untyped-def]
    flat = torch.full((4, 3, 10, 10), 128, dtype=torch.uint8)
    r = probe.flat_sites(flat)
    assert r["sites_per_image"] == 3 * 8 * 8
    assert r["within_0"] == [192.0, 192.0, 192.0]
    g = torch.Generator().manual_seed(0)
    noisy = torch.randint(0, 256, (4, 3, 10, 10), generator=g, dtype=torch.uint8)
    r = probe.flat_sites(noisy)
    assert r["within_0"][2] < 2 and r["within_2"][2] <= r["sites_per_image"]
