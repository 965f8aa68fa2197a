"""The adaptive backdoor attack: texture masks, the two generators, eq. 6 and the parameter clip."""

from __future__ import annotations

import json
import math

import pytest
import torch

from veil.attacks import create_attack
from veil.attacks.adaptive import AdaptiveAttack, AdaptiveHook, ParameterClip, clip_bounds
from veil.cli import main
from veil.data.base import ImageDataset, to_float
from veil.errors import ConfigError
from veil.models import create_model
from veil.train import Batch, TrainConfig, Trainer
from veil.triggers.texture import hill_cost, hill_mask, sobel_mask

SIZE = 16


def smooth_and_noisy(n: int = 8, seed: int = 0) -> torch.Tensor:
    """Half the images a smooth gradient (little texture), half uniform noise (all texture)."""
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0.2, 0.8, SIZE).view(1, 1, 1, SIZE).expand(n // 2, 3, SIZE, SIZE)
    noise = torch.rand(n - n // 2, 3, SIZE, SIZE, generator=g)
    return torch.cat([ramp, noise])


def photos(n: int = 32) -> torch.Tensor:
    """Traffic signs from the bundled GTSRB sample, 32x32."""
    from veil.data import load_dataset

    return to_float(load_dataset("gtsrb_sample", split="test").images[:: 1075 // n][:n])


def data(n: int = 48, classes: int = 4, seed: int = 0) -> ImageDataset:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    base = (labels.view(-1, 1, 1, 1) * 50 + 30).expand(n, 3, SIZE, SIZE)
    images = (base + torch.randint(-30, 30, (n, 3, SIZE, SIZE), generator=g)).clamp(0, 255).to(torch.uint8)
    return ImageDataset(images, labels, [str(i) for i in range(classes)], "synthetic", hflip=False)


def attack(**options: object) -> AdaptiveAttack:
    kw = {"width": 4, "levels": 3, "reference_epochs": 1, "poison_rate": 1.0, "samplenet_steps": 200, **options}
    a = create_attack("adaptive", 4, (3, SIZE, SIZE), **kw)
    assert isinstance(a, AdaptiveAttack)
    return a


# ---------------------------------------------------------------------- masks
def test_hill_mask_of_a_constant_image_is_empty_and_of_noise_full():
    flat = torch.full((2, 3, 32, 32), 0.5)
    assert hill_mask(flat, 1.0).sum() == 0
    noise = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    assert hill_mask(noise, 1.0).mean() == 1.0
    # a linear ramp has no high-frequency residual: no texture, empty mask
    ramp = smooth_and_noisy()[:4]
    assert hill_mask(ramp, 1.0).sum() == 0
    # on traffic signs a larger T gives a larger mask; one mask per image, broadcast to the channels
    x = photos()
    sizes = [float(hill_mask(x, t).mean()) for t in (0.01, 0.05, 0.1, 0.5, 1.0, 100.0)]
    assert sizes == sorted(sizes) and sizes[0] < 0.2 < 0.8 < sizes[-1]
    m = hill_mask(x, 1.0)
    assert m.shape == x.shape and torch.equal(m[:, 0], m[:, 1]) and torch.equal(m[:, 1], m[:, 2])
    assert hill_cost(x).shape == (x.shape[0], 1, 32, 32)
    # within 7 pixels (the 15x15 mean's radius) of a pixel whose 3x3 residual is exactly 0 the
    # mask is 0 (the capped cost): flat columns 0-7 give zero residuals up to column 5 (the 3x3
    # high-pass and mean each reach one column), so the mask starts at column 5 + 7 + 1 = 13
    half = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    half[..., :, :8] = 0.5
    m = hill_mask(half, 1.0)[0, 0]
    assert m[:, :13].sum() == 0 and m[:, 13:].float().mean() == 1.0


def test_sobel_mask_shrinks_as_the_threshold_grows():
    x = photos()
    sizes = [float(sobel_mask(x, t).mean()) for t in (0.0, 5.0, 10.0, 50.0, 200.0, 2000.0)]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] == 1.0 and sizes[-1] == 0.0
    assert len(set(sizes)) == len(sizes)
    per_channel = sobel_mask(x, 10.0, per_channel=True)
    assert per_channel.shape == x.shape


# ---------------------------------------------------------------------- clip
def test_the_clip_keeps_every_parameter_within_its_bounds_for_negative_and_zero_values():
    benign = {"w": torch.tensor([-2.0, -1e-3, 0.0, 1e-3, 3.0]), "count": torch.tensor(5)}
    lo, hi = clip_bounds(benign["w"], 0.1)
    assert torch.allclose(lo, torch.tensor([-2.2, -1.1e-3, 0.0, 0.9e-3, 2.7]))
    assert torch.allclose(hi, torch.tensor([-1.8, -0.9e-3, 0.0, 1.1e-3, 3.3]))
    model = torch.nn.Module()
    model.w = torch.nn.Parameter(torch.tensor([5.0, 5.0, 5.0, -5.0, -5.0]))
    model.register_buffer("count", torch.tensor(99))
    ParameterClip(benign, 0.1).apply(model)
    assert torch.allclose(model.w.data, torch.tensor([-1.8, -0.9e-3, 0.0, 0.9e-3, 2.7]))
    assert int(model.count) == 99  # integer buffers are left alone
    model.w.data.fill_(7.0)
    ParameterClip(benign, math.inf).apply(model)  # no clip
    assert (model.w.data == 7.0).all()


# ---------------------------------------------------------------------- generators
def test_hardtanh_trigger_is_bounded_and_inside_the_mask():
    a = attack(bound=12.0, mask="sobel")
    x = smooth_and_noisy()
    a.generator.apply(lambda m: torch.nn.init.constant_(m.bias, 100.0) if isinstance(m, torch.nn.Conv2d) and m.bias is not None else None)
    t = a.exact_trigger(x)
    assert t.abs().max() <= 12.0 and t.abs().max() > 0
    assert (t[a.texture_mask(x) == 0] == 0).all()
    x_p = a.apply_quantized(x)
    assert ((x_p - x).abs() * 255).max() <= 12.5


def test_no_mask_ablation_replaces_the_bound_by_the_l2_loss():
    # reading 8: without a mask the L2 loss, not HardTanh's 40 grey levels, holds the trigger
    a = attack(mask="none", l2_weight=1.0)
    assert a.config.i == 255.0 and a.config.b == 0.0
    x = smooth_and_noisy()
    a.generator.apply(lambda m: torch.nn.init.constant_(m.bias, 100.0) if isinstance(m, torch.nn.Conv2d) and m.bias is not None else None)
    t = a.exact_trigger(x)
    assert (a.texture_mask(x) == 1).all() and t.abs().max() > 40.0
    assert attack(mask="none", l2_weight=1.0, bound=40.0).config.i == 40.0
    with pytest.raises(ConfigError, match="replaces the HardTanh bound by an L2 loss: set l2_weight"):
        attack(mask="none")


@pytest.mark.parametrize(("pairs", "largest"), [(2, 3), (1, 1)])
def test_mpm_changes_are_integers_within_the_range(pairs, largest):
    a = attack(generator="mpm", mask="none", mpm_pairs=pairs)
    x = smooth_and_noisy(16)
    t = a.exact_trigger(x)
    assert torch.equal(t, t.round()) and t.abs().max() <= largest
    assert set(t.unique().tolist()) <= set(range(-largest, largest + 1)) and (t != 0).any()
    x_p = a.apply_quantized(x)
    delta = (x_p - x) * 255
    assert delta.abs().max() <= largest + 0.5
    # deterministic: the same images give the same trigger
    assert torch.equal(a.exact_trigger(x), t)


def _trainer(a: AdaptiveAttack, ds: ImageDataset, epochs: int = 1, seed: int = 0) -> Trainer:
    a.fit(ds, victim={"model": "preact_resnet18", "width": 4})
    model = create_model("preact_resnet18", num_classes=4, width=4, image_size=SIZE, seed=seed)
    cfg = TrainConfig(epochs=epochs, batch_size=16, lr=0.05, seed=seed, checkpoint_every=0)
    return Trainer(model, a.training_set(ds), cfg, hooks=[a.training_hook()], device="cpu", progress=False)


@pytest.mark.parametrize("generator", ["hardtanh", "mpm"])
def test_the_loss_is_equation_6_and_its_gradients_reach_the_generator(generator):
    import torch.nn.functional as F

    from veil.metrics.image import ssim

    a = attack(generator=generator, ssim_weight=2.0, clean_weight=0.5, reference_model="preact_resnet18",
               reference_width=4)
    ds = data()
    t = _trainer(a, ds)
    hook = t.hooks[0]
    assert isinstance(hook, AdaptiveHook)
    hook.setup(t.context())
    idx = torch.arange(16)
    batch = hook.transform_batch(t.context(0), Batch(x=to_float(t.images[idx]), y=t.labels[idx], index=idx, step=0, epoch=0))
    src = t.labels[idx] != 0
    assert batch.x.shape[0] == 16 + int(src.sum()) and (batch.y[16:] == 0).all()
    features, logits = t._forward(batch.x)
    total = hook.batch_loss(t.context(0), batch, features, logits)
    p = hook._pending
    expected = (F.cross_entropy(logits[16:], batch.y[16:]) + 0.5 * F.cross_entropy(logits[:16], batch.y[:16])
                + 2.0 * (1 - ssim(p["x_src"], p["x_p"]).mean()))
    assert total.item() == pytest.approx(expected.item(), rel=1e-5)
    total.backward()
    assert any(q.grad is not None and q.grad.abs().sum() > 0 for q in a.generator.parameters())


def test_cotraining_starts_from_the_benign_model_stays_clipped_and_is_deterministic():
    def run(seed: int = 0) -> tuple[AdaptiveAttack, Trainer]:
        a = attack(seed=seed, reference_model="preact_resnet18", reference_width=4)
        t = _trainer(a, data(), epochs=2, seed=seed)
        t.fit()
        return a, t

    a1, t1 = run()
    a2, t2 = run()
    for (k, v1), v2 in zip(a1.state_dict().items(), a2.state_dict().values()):
        assert torch.equal(v1, v2), k
    for (k, v1), v2 in zip(t1.model.state_dict().items(), t2.model.state_dict().values()):
        assert torch.equal(v1, v2), k
    r = a1.config.r
    for k, v in a1.benign_state.items():
        got = t1.model.state_dict()[k]
        if v.is_floating_point():
            lo, hi = clip_bounds(v, r)
            assert (got >= lo - 1e-7).all() and (got <= hi + 1e-7).all(), k
    # the generator learned something: its weights moved
    fresh = attack(reference_model="preact_resnet18", reference_width=4)
    assert any(not torch.equal(v, w) for (k, v), w in zip(a1.state_dict().items(), fresh.state_dict().values())
               if k.startswith("generator."))
    assert "adaptive_poisoned_ce" in t1.history[-1]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"clip_ratio": -1.0}, "clip_ratio must be a non-negative number"),
        ({"mask": "laplace"}, "mask must be 'hill' or 'sobel' or 'none', got 'laplace'"),
        ({"generator": "tanh"}, "generator must be 'hardtanh' or 'mpm'"),
        ({"mpm_pairs": 3}, "mpm_pairs must be 1"),
        ({"bound": 0.0}, "bound must be positive"),
        ({"threshold": float("nan")}, "threshold must be a non-negative number"),
    ],
)
def test_bad_options_are_clear_errors(options, message):
    with pytest.raises(ConfigError, match=message):
        attack(**options)


def test_table3_defaults_by_mask_and_generator():
    a = create_attack("adaptive", 43, (3, 32, 32))
    c = a.config
    assert (c.mask, c.generator, c.t, c.i, c.r, c.b, c.clean_weight, c.target) == ("hill", "hardtanh", 1.0, 40.0, 1e-3, 2.0, 1.0, 0)
    s = create_attack("adaptive", 10, (3, 32, 32), mask="sobel").config
    assert (s.t, s.i, s.r, s.b) == (10.0, 12.0, 1e-3, 0.0)
    m = create_attack("adaptive", 43, (3, 32, 32), generator="mpm").config
    assert m.r == math.inf and m.b == 0.0 and m.mpm_pairs == 2


@pytest.mark.slow
def test_a_tiny_run_records_the_papers_measures(tmp_path):
    out = tmp_path / "run"
    args = ["-q", "run", "--attack", "adaptive", "--dataset", "gtsrb_sample", "--model", "preact_resnet18", "--width", "4",
            "--epochs", "1", "--train-subset", "430", "--test-subset", "215", "--stealth-samples", "16",
            "--attack-opt", "width=4", "--attack-opt", "reference_epochs=1", "--out", str(out)]
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert config["poison_rate"] == 1.0 and config["sources"]["poison_rate"] == "paper"
    am = metrics["attack_metrics"]
    assert am["inside_mask"] == 1.0 and am["linf"] <= 40 and 0 <= am["benign_asr"] <= 1
    assert am["max_relative_change"] <= 1e-3 * (1 + 1e-3)  # r, up to float32 rounding of the bounds
    assert -1 <= am["trigger_similarity"] <= 1
