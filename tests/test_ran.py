"""The Residual Attention Network (``ran``): shapes, the attention module's ``(1 + S) * T``, the
attention map, seeding and gradients into the soft mask branch."""

from __future__ import annotations

import pytest
import torch

from veil.errors import ConfigError
from veil.models import create_model
from veil.models.ran import AttentionModule, ResidualAttentionNet


def images(n: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("size", [32, 64])
def test_logits_shape(size: int) -> None:
    m = create_model("ran", 7, image_size=size, width=4, seed=0).eval()
    with torch.no_grad():
        out = m(images(2, size))
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    assert isinstance(m, ResidualAttentionNet) and m.feature_dim == 16


def test_attention_map_and_soft_mask() -> None:
    # train mode: BatchNorm uses batch statistics (an untrained model's running statistics are the
    # identity in eval mode, so the stream grows and the float32 sigmoid saturates to 0 and 1)
    m = create_model("ran", 5, width=4, seed=0).train()
    x = images(3)
    with torch.no_grad():
        amap = m.attention_map(x)
        mask = m.soft_mask(x)
        s = m.feature_map(x, f"{m.last_attention}.mask")
    assert amap.shape == (3, 8, 8) and torch.isfinite(amap).all()
    assert mask.shape == (3, 8, 8)
    assert s.shape == (3, 16, 8, 8)
    assert bool((s > 0).all()) and bool((s < 1).all())
    assert m.last_attention == "stage3.attention1"
    assert all(not mod._forward_hooks for mod in m.modules())


def test_attention_module_returns_one_plus_mask_times_trunk() -> None:
    torch.manual_seed(0)
    module = AttentionModule(6, levels=2).eval()
    x = torch.randn(2, 6, 12, 12)
    with torch.no_grad():
        s, t = module.mask(x), module.trunk(x)
        h = module(x)
    assert s.shape == t.shape == h.shape == x.shape
    assert bool((s > 0).all()) and bool((s < 1).all())
    torch.testing.assert_close(h, (1 + s) * t)


def test_modules_per_stage_layout() -> None:
    m = create_model("ran", 5, width=4, modules_per_stage=(1, 2, 3), seed=0)
    names = dict(m.named_modules())
    assert "stage2.attention2" in names and "stage3.attention3" in names and "stage1.attention2" not in names
    assert m.last_conv == "stage3.post3.conv2" and m.last_attention == "stage3.attention3"
    assert m.feature_layers() == ["stage1", "stage2", "stage3"]
    with pytest.raises(ConfigError, match="modules_per_stage"):
        create_model("ran", 5, width=4, modules_per_stage=0)
    with pytest.raises(ConfigError, match="modules_per_stage"):
        create_model("ran", 5, width=4, modules_per_stage=(1, 2))


def test_same_seed_same_parameters() -> None:
    a = create_model("ran", 5, width=4, seed=0)
    b = create_model("ran", 5, width=4, seed=0)
    c = create_model("ran", 5, width=4, seed=1)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["conv1.weight"], c.state_dict()["conv1.weight"])


def test_gradients_reach_the_mask_branch() -> None:
    m = create_model("ran", 5, width=4, seed=0).train()
    m(images(2)).sum().backward()
    mask_params = [(n, p) for n, p in m.named_parameters() if ".mask." in n]
    assert len(mask_params) > 10
    for n, p in mask_params:
        assert p.grad is not None and p.grad.abs().sum() > 0, n
