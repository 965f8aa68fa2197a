"""Tests of the frequency-domain backdoor (Hammoud & Ghanem 2021): the replacement trigger of
eq. (4)-(6) and the ``frequency`` attack (heatmap -> top-k mask -> calibrated per-channel values)."""

from __future__ import annotations

import json

import pytest
import torch

from veil.analysis import conjugate_mirror, save_heatmap, top_k_mask
from veil.attacks import create_attack, list_attacks
from veil.attacks.frequency import FrequencyAttack
from veil.data.base import ImageDataset, PoisonedDataset, quantize, to_float, to_uint8
from veil.errors import ConfigError
from veil.records import atomic_save_tensors, load_tensors
from veil.triggers import smooth_noise
from veil.triggers.frequency import frequency_trigger, replace_spectrum

SHAPE = (3, 32, 32)


def make_synthetic(n: int = 64, num_classes: int = 4, seed: int = 0, size: int = 32) -> ImageDataset:
    """Smooth random images (natural-image-like spectra: little energy at high frequencies), whose
    own content at the selected frequencies costs little to remove. Uniform noise has a flat
    spectrum, and replacing 12 of its components alone moves it by an L2 norm of about 1."""
    g = torch.Generator().manual_seed(seed)
    images = torch.stack([smooth_noise((3, size, size), g, grid=4) for _ in range(n)])
    labels = torch.arange(n) % num_classes
    return ImageDataset(to_uint8(images), labels, [str(i) for i in range(num_classes)], "synthetic")


def shifted_spectrum(x: torch.Tensor) -> torch.Tensor:
    return torch.fft.fftshift(torch.fft.fft2(x, norm="ortho"), dim=(-2, -1))


def heat(seed: int = 0, size: int = 32) -> torch.Tensor:
    """A random heatmap that, like a naturally trained network's, rises towards high frequencies."""
    h = torch.rand(size, size, generator=torch.Generator().manual_seed(seed))
    r = torch.arange(size, dtype=torch.float32) - size // 2
    radius = (r.view(-1, 1) ** 2 + r.view(1, -1) ** 2).sqrt()
    h = 0.3 * h + 0.7 * radius / radius.max()
    return torch.maximum(h, conjugate_mirror(h))


def greyish(n: int = 3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (0.5 + 0.03 * torch.randn(n, *SHAPE, generator=g, dtype=torch.float64)).clamp(0, 1)


def fitted(**options: object) -> FrequencyAttack:
    attack = create_attack("frequency", 4, SHAPE, **options)
    attack.fit(make_synthetic(64), heatmap=heat())
    assert isinstance(attack, FrequencyAttack)
    return attack


# ---------------------------------------------------------------------------------------- trigger


def test_trigger_replaces_only_the_selected_frequencies() -> None:
    x = greyish()
    mask = top_k_mask(heat(), 5)
    values = torch.tensor([0.4, -0.25, 0.1], dtype=torch.float64)
    out = frequency_trigger(x, mask, values)
    raw = torch.fft.ifft2(replace_spectrum(x, mask, values), norm="ortho")
    assert raw.imag.abs().max() < 1e-12  # the inverse is real: M is conjugate-closed, A real
    assert 0 < out.min() and out.max() < 1  # no clamping happened, so out is the raw trigger
    torch.testing.assert_close(out, raw.real)
    fx, fo = shifted_spectrum(x), shifted_spectrum(out)
    # outside M nothing changes ...
    assert (fo[..., ~mask] - fx[..., ~mask]).abs().max() < 1e-4
    # ... inside M every component of channel c equals A_c (real)
    for c in range(3):
        torch.testing.assert_close(fo[:, c][:, mask], torch.full_like(fo[:, c][:, mask], complex(values[c])), atol=1e-6, rtol=0)
    assert (fo[..., mask] - fx[..., mask]).abs().max() > 0.05
    # float32 in, float32 out, range kept under clamping
    far = frequency_trigger(torch.rand(2, *SHAPE), mask, 50 * values.float())
    assert far.dtype == torch.float32 and far.min() >= 0 and far.max() <= 1


def test_trigger_is_differentiable_and_checks_its_inputs() -> None:
    mask = top_k_mask(heat(), 3)
    values = torch.tensor([0.2, -0.1, 0.05])
    x = greyish(2).float().requires_grad_(True)
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    (frequency_trigger(x, mask, values) * w).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    half = torch.zeros(32, 32, dtype=torch.bool)
    half[3, 7] = True  # its partner (29, 25) is missing
    with pytest.raises(ValueError, match="conjugate"):
        frequency_trigger(x, half, values)
    with pytest.raises(ValueError):
        frequency_trigger(x, mask, values[:2])
    with pytest.raises(ValueError):
        frequency_trigger(x, mask[:16], values)


# ---------------------------------------------------------------------------------------- attack


def test_registered_and_unfitted_apply_is_refused() -> None:
    assert "frequency" in list_attacks()
    attack = create_attack("frequency", 4, SHAPE)
    assert attack.kind == "fit" and attack.state_dict() == {} and attack.figures() == {}
    with pytest.raises(RuntimeError, match="fit"):
        attack.apply(torch.rand(1, *SHAPE))


def test_fit_respects_delta_p_and_uses_distinct_channel_values() -> None:
    train = make_synthetic(64)
    for delta_p in (0.3, 0.8):
        attack = create_attack("frequency", 4, SHAPE, delta_p=delta_p, k=4, poison_count=20)
        attack.fit(train, heatmap=heat())
        # the bound holds on average over the poisoned training images (the calibration rows)
        poisoned = attack.poison(train)
        idx = poisoned.poison_indices
        pert = to_float(poisoned.images[idx]) - to_float(train.images[idx])
        mean_l2 = float(pert.flatten(1).norm(dim=1).mean())
        assert mean_l2 < delta_p and mean_l2 > 0.9 * delta_p  # just under the bound
        assert attack.calibration["mean_l2"] == pytest.approx(mean_l2, rel=1e-5)
        v = attack.values
        assert v is not None and v.shape == (3,) and len(set(v.tolist())) == 3
        torch.testing.assert_close(v / v[0], torch.tensor([1.0, -0.6, 0.3]))
        assert int(attack.mask.sum()) == 8 and torch.equal(attack.mask, conjugate_mirror(attack.mask))
    ratios = create_attack("frequency", 4, SHAPE, channel_ratios=[0.5, 1.0, -1.0])
    ratios.fit(train, heatmap=heat())
    torch.testing.assert_close(ratios.values / ratios.values[1], torch.tensor([0.5, 1.0, -1.0]))


def test_fit_is_deterministic_under_the_seed() -> None:
    a, b = fitted(seed=2), fitted(seed=2)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key])
    x = torch.rand(4, *SHAPE, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a.apply(x), b.apply(x))


def test_contract_and_state_round_trip(tmp_path) -> None:  # type: ignore[no-untyped-def]
    train = make_synthetic(64)
    attack = fitted(target=1, poison_count=10)
    out = attack.poison(train)
    assert isinstance(out, PoisonedDataset) and out.poison_count == 10
    assert (out.labels[out.poison_indices] == 1).all()
    changed = torch.nonzero((out.images != train.images).flatten(1).any(1)).flatten()
    assert set(changed.tolist()) <= set(out.poison_indices.tolist())
    torch.testing.assert_close(
        to_float(out.images[out.poison_indices]),
        attack.apply_quantized(to_float(train.images[out.poison_indices]), train.labels[out.poison_indices]),
    )
    x = torch.rand(5, *SHAPE, generator=torch.Generator().manual_seed(3))
    y = attack.apply(x)
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
    # the state as a run record stores it (safetensors) restores the trigger without refitting
    atomic_save_tensors(tmp_path / "attack.safetensors", attack.state_dict())
    other = create_attack("frequency", 4, SHAPE, seed=9)
    other.load_state_dict(load_tensors(tmp_path / "attack.safetensors"))
    assert torch.equal(other.apply(x), y)
    assert other.mask.dtype == torch.bool
    assert "fourier_heatmap.png" in other.figures()
    tables = other.tables()
    json.dumps(tables)
    assert len(tables["frequency_mask"]["rows"]) == attack.config.k
    with pytest.raises(ConfigError):
        other.load_state_dict({})
    bad = dict(attack.state_dict())
    bad["mask"] = torch.zeros(32, 32, dtype=torch.bool)
    with pytest.raises(ConfigError, match="conjugate"):
        other.load_state_dict(bad)
    with pytest.raises(ValueError):
        other.apply(torch.rand(1, 3, 16, 16))


def test_heatmap_path_and_figure(tmp_path) -> None:  # type: ignore[no-untyped-def]
    save_heatmap(tmp_path / "heat.safetensors", heat(4))
    attack = create_attack("frequency", 4, SHAPE, heatmap_path=str(tmp_path / "heat.safetensors"), k=2)
    attack.fit(make_synthetic(32))
    assert torch.equal(attack.mask, top_k_mask(heat(4), 2))
    assert attack.figures()["fourier_heatmap.png"][:4] == b"\x89PNG"
    # an earlier frequency run's attack.safetensors is a valid heatmap file too
    atomic_save_tensors(tmp_path / "attack.safetensors", attack.state_dict())
    again = create_attack("frequency", 4, SHAPE, heatmap_path=str(tmp_path / "attack.safetensors"), k=2)
    again.fit(make_synthetic(32))
    assert torch.equal(again.state_dict()["values"], attack.state_dict()["values"])


def test_fit_from_a_reference_run(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """``reference_run``: the heatmap comes from a finished run's model (a fake, untrained record;
    16x16 images to keep the heatmap cheap)."""
    from veil.experiment import RunConfig
    from veil.models import create_model
    from veil.records import RunRecord

    run = RunRecord(tmp_path / "clean")
    run.root.mkdir()
    cfg = RunConfig(attack="none", dataset="synthetic", model="preact_resnet18", out=str(run.root), width=4, image_size=16)
    run.write_json("config.json", cfg.to_dict())
    model = create_model("preact_resnet18", num_classes=4, width=4, image_size=16, seed=0)
    run.save_tensors("model.safetensors", dict(model.state_dict()))
    run.write_json("metrics.json", {})
    attack = create_attack("frequency", 4, (3, 16, 16), reference_run=str(run.root), heatmap_images=4, k=3)
    attack.fit(make_synthetic(32, size=16))
    assert attack.heatmap.shape == (16, 16) and torch.equal(attack.heatmap, conjugate_mirror(attack.heatmap))
    assert torch.equal(attack.mask, top_k_mask(attack.heatmap, 3))
    # the heatmap is cached in the reference run, and a second fit reuses it without the model
    cache = attack.heatmap_cache_path(make_synthetic(32, size=16))
    assert cache is not None and cache.is_file() and cache.parent == run.root / "analysis"
    (run.root / "model.safetensors").unlink()
    again = create_attack("frequency", 4, (3, 16, 16), reference_run=str(run.root), heatmap_images=4, k=3)
    again.fit(make_synthetic(32, size=16))
    assert torch.equal(again.heatmap, attack.heatmap)
    run.save_tensors("model.safetensors", dict(model.state_dict()))
    with pytest.raises(ConfigError, match="16px"):
        create_attack("frequency", 4, SHAPE, reference_run=str(run.root)).fit(make_synthetic(8))


def test_fit_trains_a_tiny_reference_model() -> None:
    """Neither heatmap nor reference run: ``fit`` trains ``f_0`` (stage 1, step 1)."""
    shape = (3, 16, 16)
    attack = create_attack("frequency", 4, shape, reference_width=4, reference_epochs=1, heatmap_images=4, k=2)
    attack.fit(make_synthetic(48, size=16), device="cpu")
    assert attack.heatmap.min() >= 0 and attack.heatmap.max() <= 1
    x = to_float(make_synthetic(8, size=16).images)
    assert torch.equal(quantize(attack.apply(x)), attack.apply_quantized(x))


@pytest.mark.parametrize(
    "bad",
    [{"k": 0}, {"k": 600}, {"delta_p": 0.0}, {"alpha": -1.0}, {"channel_ratios": (1.0, 1.0, 0.5)},
     {"channel_ratios": (1.0, 0.5)}, {"channel_ratios": (0.0, 0.0, 0.0)}, {"heatmap_images": 0}],
)
def test_config_errors(bad: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        create_attack("frequency", 4, SHAPE, **bad)


def test_an_impossible_bound_is_a_clear_error() -> None:
    attack = create_attack("frequency", 4, SHAPE, delta_p=1e-3, k=20)
    with pytest.raises(ConfigError, match="delta_p"):
        attack.fit(make_synthetic(16), heatmap=heat())


def test_the_run_is_told_when_the_crop_shifts_the_trigger() -> None:
    attack = create_attack("frequency", 4, SHAPE)
    (note,) = attack.training_notes(make_synthetic(8), crop_padding=4, hflip=False)
    assert note.startswith("frequency:") and "--no-base-augment" in note
    assert attack.training_notes(make_synthetic(8), crop_padding=0, hflip=False) == []


def test_a_trained_reference_is_of_the_victims_architecture_unless_named() -> None:
    from veil.attacks import create_attack

    def arch(victim=None, **options):  # type: ignore[no-untyped-def]
        return create_attack("frequency", 4, (3, 16, 16), **options).reference_architecture(victim)

    assert arch() == ("preact_resnet18", 16)  # no victim known: veil's CPU-scale reference
    assert arch({"model": "vgg16", "width": 8}) == ("vgg16", 8)
    assert arch({"model": "vgg16", "width": None}) == ("vgg16", None)
    assert arch({"model": "vgg16", "width": 8}, reference_width=4) == ("vgg16", 4)
    assert arch({"model": "vgg16", "width": 8}, reference_model="resnet18") == ("resnet18", None)
