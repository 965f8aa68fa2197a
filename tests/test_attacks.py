"""Tests of the baseline attacks: a contract every registered attack keeps, then attack-specific
behaviour (patch region, blend formula, clean-label SIG, WaNet noise mode, FIBA's spectrum)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_synthetic

from veil.attacks import ATTACKS, Attack, create_attack, list_attacks
from veil.data.base import ImageDataset, PoisonedDataset, quantize, to_float
from veil.errors import ConfigError
from veil.triggers import amplitude_blend, smooth_noise

NUM_CLASSES = 4
SHAPE = (3, 32, 32)
ALL = ATTACKS.names()
DIRTY = [n for n in ALL if n != "none" and not ATTACKS.get(n).clean_label]
CLEAN_LABEL = [n for n in ALL if ATTACKS.get(n).clean_label]
#: attacks whose trigger depends on the seed
RANDOM_TRIGGER = ["blend", "fiba", "wanet"]
#: a training set for the attacks' training notes
TRAIN = make_synthetic(64, num_classes=NUM_CLASSES)


#: options for attacks that learn their trigger in ``fit``, so that fitting is cheap: the frequency
#: attack reads a saved heatmap (set by ``_fit_files``) instead of training a reference model, and
#: gets a norm bound that uniform-noise images (flat spectrum) can meet; the semantic attack trains
#: a narrow surrogate and its generator for one epoch each (its defaults: 100 each)
FIT_OPTIONS: dict[str, dict[str, object]] = {
    "frequency": {"k": 2, "delta_p": 4.0},
    "semantic": {"reference_epochs": 1, "generator_epochs": 1, "reference_width": 4, "generator_batch_size": 32},
}


@pytest.fixture(scope="module", autouse=True)
def _fit_files(tmp_path_factory: pytest.TempPathFactory) -> None:
    from veil.analysis import save_heatmap

    path = tmp_path_factory.mktemp("fit") / "heatmap.safetensors"
    save_heatmap(path, torch.rand(SHAPE[1:], generator=torch.Generator().manual_seed(0)))
    FIT_OPTIONS["frequency"]["heatmap_path"] = str(path)


#: options that keep an attack's networks tiny in the contract tests (the multinomial attack's U-Net
#: generator has 31 M parameters at its default width 64). The adaptive attack's untrained HardTanh
#: generator outputs well under half a grey level, so its quantised trigger is empty until trained:
#: the contract runs its MPM generator (random probabilities change sub-pixels from the start)
#: without a mask (the synthetic images are too flat for HILL's)
SMALL_OPTIONS: dict[str, dict[str, object]] = {
    "multinomial": {"width": 4, "levels": 2},
    "adaptive": {"width": 4, "levels": 2, "generator": "mpm", "mask": "none", "samplenet_steps": 50},
}


#: attacks of kind "train" whose trigger only exists after ``fit`` (ATTEQ and its baselines): fitted
#: once, tiny, with the default options; every test's attack loads that trigger
STATE_FROM_FIT: dict[str, dict[str, object]] = {
    name: {"reference_width": 4, "reference_epochs": 1, "attention_width": 4, "attention_epochs": 1,
           "trigger_steps": 3, "mask_images": 8, "trigger_images": 16}
    for name in ("atteq", "robnet", "trojannn")
}
_FITTED: dict[str, dict[str, torch.Tensor]] = {}


def make(name: str, **options: object) -> Attack:
    """The attack with defaults (and ``options``); fitted on synthetic data if its kind is ``"fit"``."""
    options = {**SMALL_OPTIONS.get(name, {}), **options}
    if name in STATE_FROM_FIT:
        attack = create_attack(name, NUM_CLASSES, SHAPE, **{**STATE_FROM_FIT[name], **options})
        if name not in _FITTED:
            fitted = create_attack(name, NUM_CLASSES, SHAPE, **STATE_FROM_FIT[name])
            fitted.fit(make_synthetic(32, num_classes=NUM_CLASSES, seed=7))
            _FITTED[name] = fitted.state_dict()
        attack.load_state_dict(_FITTED[name])
        return attack
    if ATTACKS.get(name).kind != "fit":
        return create_attack(name, NUM_CLASSES, SHAPE, **options)
    attack = create_attack(name, NUM_CLASSES, SHAPE, **{**FIT_OPTIONS.get(name, {}), **options})
    attack.fit(make_synthetic(32, num_classes=NUM_CLASSES, seed=7))
    return attack


def rand_images(n: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.rand((n, *SHAPE), generator=torch.Generator().manual_seed(seed))


def smooth_images(n: int = 4, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([smooth_noise(SHAPE, g, grid=4) for _ in range(n)])


def changed_rows(a: ImageDataset, b: ImageDataset) -> torch.Tensor:
    return torch.nonzero((a.images != b.images).flatten(1).any(1)).flatten()


# ---------------------------------------------------------------------------------------- registry


def test_every_baseline_is_registered() -> None:
    assert {"none", "badnets", "blend", "sig", "wanet", "fiba"} <= set(list_attacks())
    assert list_attacks() == ALL


def test_unknown_option_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="no option"):
        make("badnets", alpha=0.3)


# ---------------------------------------------------------------------------------------- contract


@pytest.mark.parametrize("name", ALL)
def test_apply_keeps_shape_dtype_and_range(name: str) -> None:
    attack = make(name)
    x = rand_images()
    for fn in (attack.apply, attack.apply_test):
        out = fn(x, torch.arange(6) % NUM_CLASSES)
        assert out.shape == x.shape
        assert out.dtype == torch.float32
        assert out.min() >= 0 and out.max() <= 1
        assert torch.isfinite(out).all()
    assert torch.equal(x, rand_images()), "apply must not modify its input"


@pytest.mark.parametrize("name", [n for n in ALL if n != "none"])
def test_apply_refuses_other_image_sizes(name: str) -> None:
    with pytest.raises(ValueError):
        make(name).apply(torch.rand(2, 3, 16, 16))


@pytest.mark.parametrize("name", ALL)
def test_poison_contract(name: str, synthetic: ImageDataset) -> None:
    attack = make(name, target=1)
    before = synthetic.images.clone()
    out = attack.poison(synthetic)
    assert isinstance(out, PoisonedDataset)
    assert out.images.dtype == torch.uint8 and out.images.shape == synthetic.images.shape
    idx, extra = out.poison_indices, out.extra_indices
    expected = 0 if name == "none" else attack.poison_count_for(synthetic)
    assert idx.numel() == expected
    if name != "none":
        assert expected == max(1, round(attack.config.poison_rate * (16 if attack.clean_label else len(synthetic))))
    assert torch.equal(idx, idx.sort().values) and idx.unique().numel() == idx.numel()
    # images change only at poisoned (and extra) rows, and they do change there
    touched = torch.cat([idx, extra])
    changed = changed_rows(out, synthetic)
    assert set(changed.tolist()) <= set(touched.tolist())
    assert set(idx.tolist()) <= set(changed.tolist())
    # poisoned rows hold the quantised trigger
    y = synthetic.labels[idx]
    if idx.numel():
        expected_images = attack.apply_quantized(to_float(synthetic.images[idx]), y)
        assert torch.equal(to_float(out.images[idx]), expected_images)
    # labels: target at poison rows (dirty label), unchanged everywhere else
    assert torch.equal(out.original_labels, synthetic.labels)
    if attack.clean_label:
        assert torch.equal(out.labels, synthetic.labels)
        assert (synthetic.labels[idx] == 1).all()
    else:
        assert (out.labels[idx] == 1).all()
        keep = torch.ones(len(synthetic), dtype=torch.bool)
        keep[idx] = False
        assert torch.equal(out.labels[keep], synthetic.labels[keep])
    assert torch.equal(synthetic.images, before), "poison must not modify its input"


@pytest.mark.parametrize("name", ALL)
def test_poison_is_deterministic_under_the_seed(name: str, synthetic: ImageDataset) -> None:
    a = make(name, seed=3, poison_rate=0.25).poison(synthetic)
    b = make(name, seed=3, poison_rate=0.25).poison(synthetic)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert torch.equal(a.poison_indices, b.poison_indices) and torch.equal(a.extra_indices, b.extra_indices)
    c = make(name, seed=4, poison_rate=0.25).poison(synthetic)
    if name == "none":
        assert c.poison_count == 0 and torch.equal(c.images, synthetic.images)
    else:
        assert not torch.equal(a.poison_indices, c.poison_indices)


@pytest.mark.parametrize("name", ALL)
def test_poison_test_set(name: str, synthetic: ImageDataset) -> None:
    attack = make(name, target=2)
    asr = attack.poison_test(synthetic)
    non_target = synthetic.labels != 2
    assert len(asr) == int(non_target.sum())
    assert (asr.labels == 2).all()
    assert asr.images.dtype == torch.uint8
    expected = attack.apply_quantized(to_float(synthetic.images[non_target]), synthetic.labels[non_target], test=True)
    assert torch.equal(to_float(asr.images), expected)


@pytest.mark.parametrize("name", ALL)
def test_all_to_all(name: str, synthetic: ImageDataset) -> None:
    if name in CLEAN_LABEL:
        with pytest.raises(ConfigError, match="clean-label"):
            make(name, mode="all2all")
        return
    attack = make(name, mode="all2all", poison_rate=0.25)
    out = attack.poison(synthetic)
    idx = out.poison_indices
    assert torch.equal(out.labels[idx], (synthetic.labels[idx] + 1) % NUM_CLASSES)
    asr = attack.poison_test(synthetic)
    assert len(asr) == len(synthetic)
    assert torch.equal(asr.labels, (synthetic.labels + 1) % NUM_CLASSES)


@pytest.mark.parametrize("name", ALL)
def test_state_dict_round_trip(name: str) -> None:
    a = make(name, seed=0)
    b = make(name, seed=1)
    x = rand_images()
    if name in RANDOM_TRIGGER:
        assert not torch.equal(a.apply(x), b.apply(x)), "different seeds should give different triggers"
    state = a.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    b.load_state_dict(state)
    assert torch.equal(a.apply(x), b.apply(x))
    assert torch.equal(a.apply_test(x), b.apply_test(x))
    if state:
        with pytest.raises(ConfigError):
            b.load_state_dict({})


@pytest.mark.parametrize("name", ALL)
def test_config_errors(name: str, synthetic: ImageDataset) -> None:
    for bad in ({"target": NUM_CLASSES}, {"target": -1}, {"poison_rate": 0.0}, {"poison_rate": 1.5}):
        with pytest.raises(ConfigError):
            make(name, **bad)
    too_many = make(name, poison_count=len(synthetic) + 1)
    if name == "none":
        assert too_many.poison(synthetic).poison_count == 0
    else:
        with pytest.raises(ConfigError, match="eligible"):
            too_many.poison(synthetic)


@pytest.mark.parametrize("name", ["badnets", "blend", "fiba", "wanet"])
def test_apply_is_differentiable(name: str) -> None:
    attack = make(name)
    x = smooth_images(2).clamp(0.05, 0.95).requires_grad_(True)
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    (attack.apply(x) * w).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------- none


def test_none_poisons_nothing(synthetic: ImageDataset) -> None:
    attack = make("none", poison_rate=0.9)
    out = attack.poison(synthetic)
    assert out.poison_count == 0 and out.extra_indices.numel() == 0
    assert torch.equal(out.images, synthetic.images) and torch.equal(out.labels, synthetic.labels)
    asr = attack.poison_test(synthetic)
    assert torch.equal(asr.images, synthetic.images[synthetic.labels != 0])


# ---------------------------------------------------------------------------------------- badnets


def test_badnets_changes_only_the_patch() -> None:
    x = rand_images()
    out = make("badnets").apply(x)
    diff = (out != x).any(1)[0]
    # the default patch: 3x3, 4 px (the crop's padding) from the right and bottom edges
    region = torch.zeros(32, 32, dtype=torch.bool)
    region[-7:-4, -7:-4] = True
    assert not diff[~region].any()
    # the default 3x3 checkerboard: white on the diagonal corners and centre, black elsewhere
    board = torch.tensor([[1.0, 0, 1], [0, 1, 0], [1, 0, 1]])
    assert (out[:, :, -7:-4, -7:-4] == board).all()
    corner = make("badnets", margin=0).apply(x)
    assert (corner[:, :, -3:, -3:] == board).all()


@pytest.mark.parametrize(("size", "margin", "image"), [(3, 0, 32), (3, 4, 32), (4, 1, 32), (6, 2, 20), (3, 0, 8)])
def test_crop_survival_matches_the_trainers_random_crop(size: int, margin: int, image: int) -> None:
    from veil.data.augment import CROP_PADDING, random_crop
    from veil.triggers.patch import corner_mask, crop_survival

    shape = (1, image, image)
    mask = corner_mask(shape, size, margin)
    crops = random_crop(mask.expand(6000, 1, image, image), CROP_PADDING, torch.Generator().manual_seed(0))
    seen = crops.flatten(1).sum(1)
    whole, gone = crop_survival(shape, size, margin, CROP_PADDING)
    assert (seen == size * size).float().mean().item() == pytest.approx(whole, abs=0.02)
    assert (seen == 0).float().mean().item() == pytest.approx(gone, abs=0.02)
    assert crop_survival(shape, size, margin, 0) == (1.0, 0.0)


def test_crop_survival_of_the_corner_patch() -> None:
    from veil.triggers.patch import crop_survival

    assert crop_survival((3, 32, 32), 3, 0, 4) == pytest.approx((25 / 81, 32 / 81))
    assert crop_survival((3, 32, 32), 3, 4, 4) == (1.0, 0.0)
    with pytest.raises(ValueError):
        crop_survival((3, 32, 32), 3, 0, -1)


def test_badnets_says_when_the_crop_cuts_its_patch() -> None:
    (note,) = make("badnets", margin=0).training_notes(TRAIN, crop_padding=4, hflip=True)
    assert "40%" in note and "30%" in note and "margin of 4" in note
    assert make("badnets", margin=0).training_notes(TRAIN, crop_padding=0, hflip=True) == []
    assert make("badnets").training_notes(TRAIN, crop_padding=4, hflip=True) == []
    assert make("badnets", margin=3).training_notes(TRAIN, crop_padding=4, hflip=False)


def test_sig_wanet_and_fiba_notes_state_the_measured_budget_limits() -> None:
    (note,) = make("sig", poison_rate=0.25).training_notes(TRAIN, crop_padding=4, hflip=True)
    assert "poisons 4 images of the target class, 6.25% of the training set" in note
    (note,) = make("fiba").training_notes(TRAIN, crop_padding=0, hflip=False)
    assert note.startswith("fiba:") and "natural images" in note
    (note,) = make("wanet").training_notes(TRAIN, crop_padding=0, hflip=False)
    assert note.startswith("wanet:") and "without it" in note
    assert make("blend").training_notes(TRAIN, crop_padding=4, hflip=True) == []


def test_a_run_logs_and_records_the_training_notes(tmp_path, caplog) -> None:
    import json
    import logging

    from veil.experiment import RunConfig, run_experiment

    common = dict(attack="badnets", dataset="gtsrb_sample", model="preact_resnet18", width=2, epochs=1,
                  train_subset=172, test_subset=86, device="cpu", progress=False, stealth_samples=8)
    with caplog.at_level(logging.WARNING, logger="veil.experiment"):
        run_experiment(RunConfig(**common, attack_options={"margin": 0}, out=str(tmp_path / "corner")))
    assert any("show none of it" in r.message for r in caplog.records)

    def attack_notes(run: str) -> list[str]:
        notes = json.loads((tmp_path / run / "metrics.json").read_text())["notes"]
        return [n for n in notes if not n.startswith("lpips")]

    (note,) = attack_notes("corner")
    assert note.startswith("badnets: the 3x3 patch 0 px")
    run_experiment(RunConfig(**common, attack_options={"margin": 0}, base_augment=False, out=str(tmp_path / "nocrop")))
    assert attack_notes("nocrop") == []


@pytest.mark.parametrize("pattern", ["white", "checkerboard", "random"])
def test_badnets_patterns(pattern: str) -> None:
    attack = make("badnets", patch_size=6, pattern=pattern, margin=1)
    out = attack.apply(torch.full((1, *SHAPE), 0.5))
    patch = out[0, :, -7:-1, -7:-1]
    outside = out[0].clone()
    outside[:, -7:-1, -7:-1] = 0.5
    assert (outside == 0.5).all()
    if pattern == "white":
        assert (patch == 1).all()
    elif pattern == "checkerboard":
        assert patch[:, 0, 0].eq(1).all() and patch[:, 0, 1].eq(0).all() and patch[:, 1, 1].eq(1).all()
        assert patch.sum() == 3 * 18
    else:
        assert patch.unique().numel() > 10
        assert torch.equal(patch, quantize(patch))
        other = make("badnets", patch_size=6, pattern="random", margin=1, seed=1)
        assert not torch.equal(other.pattern, attack.pattern)
        other.load_state_dict(attack.state_dict())
        assert torch.equal(other.apply(out), attack.apply(out))


def test_badnets_bad_patch_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        make("badnets", patch_size=33)
    with pytest.raises(ConfigError):
        make("badnets", pattern="stripes")


# ---------------------------------------------------------------------------------------- blend


def test_blend_equals_formula() -> None:
    attack = make("blend", alpha=0.3)
    x = rand_images()
    k = attack.pattern
    assert k.shape == SHAPE and k.min() >= 0 and k.max() <= 1
    torch.testing.assert_close(attack.apply(x), 0.7 * x + 0.3 * k)


def test_blend_pattern_from_image(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from PIL import Image

    path = tmp_path / "kitty.png"
    Image.new("RGB", (50, 40), (255, 0, 51)).save(path)
    attack = make("blend", pattern_path=str(path))
    assert attack.pattern.shape == SHAPE
    torch.testing.assert_close(attack.pattern[:, 5, 5], torch.tensor([1.0, 0.0, 0.2]))
    with pytest.raises(ConfigError, match="not found"):
        make("blend", pattern_path=str(tmp_path / "missing.png"))
    with pytest.raises(ConfigError):
        make("blend", alpha=0.0)


# ---------------------------------------------------------------------------------------- sig


def test_sig_is_clean_label_and_poisons_only_the_target_class(synthetic: ImageDataset) -> None:
    attack = make("sig", target=3, poison_rate=0.5)
    assert attack.clean_label
    out = attack.poison(synthetic)
    assert out.poison_count == 8  # half of the 16 class-3 rows
    assert (synthetic.labels[out.poison_indices] == 3).all()
    assert torch.equal(out.labels, synthetic.labels)
    assert set(changed_rows(out, synthetic).tolist()) <= set(out.poison_indices.tolist())


def test_sig_signal_and_test_delta() -> None:
    x = torch.full((1, *SHAPE), 0.5)
    attack = make("sig")
    diff = attack.apply(x) - x
    j = torch.arange(32, dtype=torch.float32)
    expected = (20 / 255) * torch.sin(2 * math.pi * j * 6 / 32)
    torch.testing.assert_close(diff[0, 1, 7], expected)
    assert torch.equal(diff[0, 0], diff[0, 2]) and torch.equal(diff[0, :, 0], diff[0, :, 9])
    assert torch.equal(attack.apply_test(x), attack.apply(x))
    strong = make("sig", test_delta=40)
    torch.testing.assert_close(strong.apply_test(x) - x, 2 * diff)
    torch.testing.assert_close(strong.apply(x), attack.apply(x))


# ---------------------------------------------------------------------------------------- wanet


def test_wanet_noise_mode(synthetic: ImageDataset) -> None:
    attack = make("wanet", target=0)
    out = attack.poison(synthetic)
    idx, extra = out.poison_indices, out.extra_indices
    assert idx.numel() == 6 and extra.numel() == 2 * 6
    assert not set(idx.tolist()) & set(extra.tolist())
    assert torch.equal(extra, extra.sort().values)
    assert torch.equal(out.labels[extra], synthetic.labels[extra])
    assert set(extra.tolist()) <= set(changed_rows(out, synthetic).tolist())
    # noise-mode images differ from the plain backdoor warp
    plain = attack.apply_quantized(to_float(synthetic.images[extra]))
    assert not torch.equal(to_float(out.images[extra]), plain)


def test_wanet_noise_mode_options(synthetic: ImageDataset) -> None:
    assert make("wanet", cross_ratio=0).poison(synthetic).extra_indices.numel() == 0
    capped = make("wanet", poison_rate=0.5).poison(synthetic)  # 32 poisoned, 64 wanted, 32 left
    assert capped.extra_indices.numel() == len(synthetic) - capped.poison_count
    with pytest.raises(ConfigError):
        make("wanet", k=1)


def test_wanet_warp_is_small_and_smooth() -> None:
    x = smooth_images(4)
    attack = make("wanet")
    change = (attack.apply(x) - x).abs().mean()
    assert 0 < change < 0.02
    grid = attack.grid
    assert grid.shape == (1, 32, 32, 2) and grid.abs().max() <= 1
    # the displacement is about s pixels: well under two pixels everywhere
    shift_px = (grid - attack.identity_grid).abs() * 31 / 2
    assert shift_px.max() < 2.0
    # with s = 0 the warp is the identity (up to interpolation round-off)
    torch.testing.assert_close(make("wanet", s=0.0).apply(x), x, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------- fiba


def test_fiba_keeps_phase_and_changes_only_low_frequency_amplitude() -> None:
    attack = make("fiba")
    x = (0.5 + 0.2 * (smooth_images(2, seed=5) - 0.5)).double()
    out = attack.apply(x.float()).double()
    assert 0 < out.min() and out.max() < 1  # clamp inactive, so this is the raw blend
    fx, fo = torch.fft.fft2(x), torch.fft.fft2(out)
    ax, ao = fx.abs(), fo.abs()
    mask = attack.mask.bool()
    assert int(mask.sum()) == 9 and mask[0, 0]  # 3x3 band around the zero frequency
    # outside the band the spectrum is untouched
    torch.testing.assert_close(fo[..., ~mask], fx[..., ~mask], atol=1e-3, rtol=0)
    # inside, the amplitude is (1 - alpha) A_x + alpha A_t
    at = attack.trigger_amplitude.double()
    expected = 0.85 * ax + 0.15 * at
    torch.testing.assert_close(ao[..., mask], expected.expand_as(ax)[..., mask], rtol=1e-4, atol=1e-3)
    assert (ao[..., mask] - ax[..., mask]).abs().max() > 0.1
    # the phase is kept wherever the image has energy (float32 round-off aside) ...
    strong = ax > 1e-2
    dphase = torch.angle(fo * fx.conj())
    assert dphase[strong].abs().max() < 1e-2
    # ... and exactly by the trigger function itself, before clamping, in float64
    raw = amplitude_blend(x, at, 0.15, attack.mask.double())
    fr = torch.fft.fft2(raw)
    assert torch.angle(fr * fx.conj())[ax > 1e-9].abs().max() < 1e-8
    torch.testing.assert_close(fr.abs()[..., mask], expected.expand_as(ax)[..., mask])


def test_fiba_trigger_options(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from PIL import Image

    path = tmp_path / "trigger.png"
    Image.new("RGB", (32, 32), (0, 128, 255)).save(path)
    attack = make("fiba", trigger_path=str(path), beta=0.2)
    assert int(attack.mask.sum()) == 36
    torch.testing.assert_close(attack.trigger[:, 0, 0], torch.tensor([0.0, 128 / 255, 1.0]))
    for bad in ({"alpha": 0.0}, {"beta": 1.5}):
        with pytest.raises(ConfigError):
            make("fiba", **bad)
