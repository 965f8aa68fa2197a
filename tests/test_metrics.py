"""Tests for veil.metrics: hand-computed values on tiny tensors, an independent SSIM reference,
and LPIPS against the values published by its authors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.ndimage import gaussian_filter, uniform_filter

from veil.errors import CheckpointError
from veil.metrics import (
    accuracy,
    attack_success_rate,
    find_lpips_backbone,
    l1,
    linf,
    load_lpips,
    lpips_available,
    lpips_distance,
    modification_histogram,
    modified_fraction,
    mse,
    per_label_success_rate,
    psnr,
    ssim,
    ssim_3x3,
    stealth_metrics,
)
from veil.metrics.lpips import BACKBONE_FILE, TORCHVISION_FILE, WEIGHTS_ENV

# ----------------------------------------------------------------------------- classification


def test_accuracy_indices_and_logits() -> None:
    labels = torch.tensor([0, 1, 2, 1])
    assert accuracy(torch.tensor([0, 1, 1, 1]), labels) == 0.75
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 3.0, 1.0], [0.1, 0.0, 0.0]])
    assert accuracy(logits, labels) == 0.5


def test_accuracy_errors() -> None:
    with pytest.raises(ValueError):
        accuracy(torch.tensor([0, 1]), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError):
        accuracy(torch.tensor([0.0, 1.0]), torch.tensor([0, 1]))  # float 1-D is ambiguous
    with pytest.raises(ValueError):
        accuracy(torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long))


def test_asr_excludes_rows_already_in_target_class() -> None:
    true = torch.tensor([0, 0, 1, 2, 3, 1])
    preds = torch.tensor([0, 0, 0, 0, 3, 0])
    # target 0: rows 0, 1 are excluded; of rows 2..5, rows 2, 3, 5 hit -> 3 / 4
    assert attack_success_rate(preds, 0, true) == 0.75
    assert attack_success_rate(preds, torch.zeros(6, dtype=torch.long), true) == 0.75
    logits = torch.nn.functional.one_hot(preds, 4).float()
    assert attack_success_rate(logits, 0, true) == 0.75


def test_asr_all_to_all_targets() -> None:
    true = torch.tensor([0, 1, 2, 3])
    target = (true + 1) % 4
    preds = torch.tensor([1, 2, 0, 0])
    assert attack_success_rate(preds, target, true) == 0.75


def test_asr_errors() -> None:
    with pytest.raises(ValueError, match="undefined"):
        attack_success_rate(torch.tensor([1, 1]), 1, torch.tensor([1, 1]))
    with pytest.raises(ValueError):
        attack_success_rate(torch.tensor([1, 1]), torch.tensor([1, 1, 1]), torch.tensor([0, 0]))
    with pytest.raises(ValueError):
        attack_success_rate(torch.tensor([1, 1]), 1, torch.tensor([0, 0, 0]))


def test_per_label_success_rate() -> None:
    true = torch.tensor([0, 1, 2, 0, 2, 2, 1])
    target = torch.tensor([1, 1, 1, 2, 0, 0, 2])
    preds = torch.tensor([1, 1, 0, 2, 0, 1, 1])
    # label 0: rows 4 (hit), 5 (miss) -> 0.5; label 1: row 1 excluded, rows 0 (hit), 2 (miss) -> 0.5
    # label 2: rows 3 (hit), 6 (miss) -> 0.5; label 3: no rows -> nan
    rates = per_label_success_rate(preds, target, true, num_classes=4)
    assert rates.shape == (4,) and rates.dtype == torch.float64
    torch.testing.assert_close(rates[:3], torch.tensor([0.5, 0.5, 0.5], dtype=torch.float64))
    assert math.isnan(rates[3].item())
    rates = per_label_success_rate(torch.tensor([2, 2, 0]), 2, torch.tensor([0, 2, 1]), num_classes=3)
    assert rates[2].item() == 0.5 and math.isnan(rates[0].item()) and math.isnan(rates[1].item())
    with pytest.raises(ValueError):
        per_label_success_rate(preds, target, true, num_classes=2)  # target label 2 out of range


# ----------------------------------------------------------------------------- image metrics


def _grey(values: list[list[float]]) -> torch.Tensor:
    """A (1, 1, H, W) image from grey levels 0..255."""
    return torch.tensor(values, dtype=torch.float32).div(255).view(1, 1, len(values), len(values[0]))


def test_hand_computed_2x2() -> None:
    x = _grey([[10, 20], [30, 40]])
    y = _grey([[11, 18], [33, 40]])  # differences +1, -2, +3, 0 grey levels
    torch.testing.assert_close(mse(x, y), torch.tensor([(1 + 4 + 9 + 0) / 4]))
    torch.testing.assert_close(psnr(x, y), torch.tensor([10 * math.log10(255**2 / 3.5)]))
    torch.testing.assert_close(l1(x, y), torch.tensor([(1 + 2 + 3 + 0) / 255 / 4]))
    torch.testing.assert_close(linf(x, y), torch.tensor([3.0]))
    assert modified_fraction(x, y) == 0.75
    assert modification_histogram(x, y) == {"0": 25.0, "1": 25.0, "2": 25.0, "3": 25.0, "4": 0.0, ">=5": 0.0}


def test_unbatched_input_and_symmetry() -> None:
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(3, 12, 13, generator=g), torch.rand(3, 12, 13, generator=g)
    for fn in (mse, psnr, ssim, l1, linf):
        out = fn(x, y)
        assert out.shape == (1,)
        torch.testing.assert_close(out, fn(y, x))
        torch.testing.assert_close(out, fn(x[None], y[None]))


def test_identical_images() -> None:
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    assert torch.isinf(psnr(x, x)).all() and (psnr(x, x) > 0).all()
    torch.testing.assert_close(ssim(x, x), torch.ones(2))
    assert mse(x, x).eq(0).all() and l1(x, x).eq(0).all() and linf(x, x).eq(0).all()
    assert modified_fraction(x, x) == 0.0
    assert modification_histogram(x, x)["0"] == 100.0


def test_constant_offset() -> None:
    x = torch.full((1, 3, 12, 12), 100 / 255)
    y = torch.full((1, 3, 12, 12), 110 / 255)
    torch.testing.assert_close(mse(x, y), torch.tensor([100.0]))
    torch.testing.assert_close(psnr(x, y), torch.tensor([20 * math.log10(255 / 10)]))
    torch.testing.assert_close(linf(x, y), torch.tensor([10.0]))
    # flat images: zero variances and covariance, so SSIM is the luminance term alone
    c1 = (0.01 * 255) ** 2
    expected = (2 * 100 * 110 + c1) / (100**2 + 110**2 + c1)
    torch.testing.assert_close(ssim(x, y), torch.tensor([expected]), rtol=0, atol=1e-6)
    assert modification_histogram(x, y)[">=5"] == 100.0


def test_histogram_counts() -> None:
    # 2 images x 1 channel x 4 x 5 = 40 sub-pixels with magnitudes 0 x10, 1 x8, 2 x6, 3 x4, 4 x2, >=5 x10
    magnitudes = [0] * 10 + [1] * 8 + [2] * 6 + [3] * 4 + [4] * 2 + [5, 6, 9, 17, 30, 64, 100, 128, 200, 255]
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(2))
    levels = torch.tensor(magnitudes, dtype=torch.float32)[perm].view(2, 1, 4, 5)
    sign = torch.where(torch.rand(2, 1, 4, 5, generator=torch.Generator().manual_seed(3)) < 0.5, -1.0, 1.0)
    x = torch.where(sign > 0, torch.zeros(()), levels).div(255)
    y = torch.where(sign > 0, levels, torch.zeros(())).div(255)
    hist = modification_histogram(x, y)
    assert list(hist) == ["0", "1", "2", "3", "4", ">=5"]
    expected = {"0": 25.0, "1": 20.0, "2": 15.0, "3": 10.0, "4": 5.0, ">=5": 25.0}
    for key, value in expected.items():
        assert hist[key] == pytest.approx(value)
    assert sum(hist.values()) == pytest.approx(100.0)
    assert modified_fraction(x, y) == pytest.approx(0.75)
    torch.testing.assert_close(linf(x, y), levels.flatten(1).amax(1))
    assert modification_histogram(x, y, bins=(0, 1)) == pytest.approx({"0": 25.0, "1": 20.0, ">=2": 55.0})
    with pytest.raises(ValueError):
        modification_histogram(x, y, bins=(1, 2))


def test_sub_level_changes_round_to_zero() -> None:
    x = torch.zeros(1, 1, 2, 2)
    y = torch.tensor([[[[0.4 / 255, 0.6 / 255], [1.4 / 255, 0.0]]]])
    torch.testing.assert_close(linf(x, y), torch.tensor([1.0]))
    assert modified_fraction(x, y) == 0.5
    assert modification_histogram(x, y)["0"] == 50.0


def _ssim_reference(a: np.ndarray, b: np.ndarray, window: str = "gaussian") -> float:
    """skimage's structural_similarity re-implemented with scipy.ndimage on (C, H, W) float64 in
    [0, 255]: ``"gaussian"`` as (gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
    data_range=255, channel_axis=0); ``"uniform3"`` as the ATTEQ release calls it (win_size=3,
    data_range=a.max() - a.min(), channel_axis=0, otherwise the defaults: a uniform window and
    sample covariances)."""
    if window == "gaussian":
        rng, pad, norm = 255.0, 5, 1.0  # pad: int(3.5 * 1.5 + 0.5)
        f = lambda im: gaussian_filter(im, sigma=1.5, truncate=3.5, mode="reflect")  # noqa: E731
    else:
        rng, pad, norm = float(a.max() - a.min()), 1, 9 / 8
        f = lambda im: uniform_filter(im, size=3, mode="reflect")  # noqa: E731
    c1, c2 = (0.01 * rng) ** 2, (0.03 * rng) ** 2
    values = []
    for x, y in zip(a, b):
        ux, uy = f(x), f(y)
        vx, vy, vxy = (f(x * x) - ux * ux) * norm, (f(y * y) - uy * uy) * norm, (f(x * y) - ux * uy) * norm
        s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
        values.append(s[pad:-pad, pad:-pad].mean())
    return float(np.mean(values))


def _ssim_windowed(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM by explicit 11x11 Gaussian windows (slow; small images only)."""
    t = np.arange(-5, 6)
    g = np.exp(-(t**2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    per_channel = []
    for x, y in zip(a, b):
        maps = []
        for i in range(x.shape[0] - 10):
            for j in range(x.shape[1] - 10):
                px, py = x[i : i + 11, j : j + 11], y[i : i + 11, j : j + 11]
                mx, my = (w * px).sum(), (w * py).sum()
                sx, sy = (w * (px - mx) ** 2).sum(), (w * (py - my) ** 2).sum()
                sxy = (w * (px - mx) * (py - my)).sum()
                maps.append((2 * mx * my + c1) * (2 * sxy + c2) / ((mx**2 + my**2 + c1) * (sx + sy + c2)))
        per_channel.append(np.mean(maps))
    return float(np.mean(per_channel))


def test_ssim_matches_independent_reference() -> None:
    g = torch.Generator().manual_seed(4)
    x = torch.rand(3, 3, 32, 29, generator=g)
    noise = torch.randn(3, 3, 32, 29, generator=g) * torch.tensor([0.02, 0.1, 0.3]).view(3, 1, 1, 1)
    y = (x + noise).clamp(0, 1)
    ours = ssim(x, y)
    for i in range(3):
        ref = _ssim_reference(x[i].double().numpy() * 255, y[i].double().numpy() * 255)
        assert ours[i].item() == pytest.approx(ref, abs=1e-5)
    assert ours[0] > ours[1] > ours[2]
    small_x, small_y = x[:1, :, :13, :14], y[:1, :, :13, :14]
    ref = _ssim_windowed(small_x[0].double().numpy() * 255, small_y[0].double().numpy() * 255)
    assert ssim(small_x, small_y).item() == pytest.approx(ref, abs=1e-5)


def test_ssim_3x3_matches_the_release_measurement() -> None:
    g = torch.Generator().manual_seed(7)
    x = torch.rand(3, 3, 20, 17, generator=g) * 0.6 + 0.2  # a range below 1: the data range is the image's
    noise = torch.randn(3, 3, 20, 17, generator=g) * torch.tensor([0.01, 0.05, 0.3]).view(3, 1, 1, 1)
    y = (x + noise).clamp(0, 1)
    ours = ssim_3x3(x, y)
    for i in range(3):
        ref = _ssim_reference(x[i].double().numpy() * 255, y[i].double().numpy() * 255, "uniform3")
        assert ours[i].item() == pytest.approx(ref, abs=1e-5)
    assert ours[0] > ours[1] > ours[2]
    # a 3x3 patch: the 3x3 window sees less of it than the 11x11 Gaussian does
    patched = x.clone()
    patched[:, :, 8:11, 8:11] = 1.0
    assert bool((ssim_3x3(x, patched) > ssim(x, patched)).all())
    torch.testing.assert_close(ssim_3x3(x, x), torch.ones(3))
    flat = torch.full((1, 3, 5, 5), 0.5)
    assert ssim_3x3(flat, flat).item() == pytest.approx(1.0)  # range 0: one grey level instead
    with pytest.raises(ValueError, match="3x3"):
        ssim_3x3(torch.rand(1, 3, 2, 8), torch.rand(1, 3, 2, 8))


def test_ssim_too_small() -> None:
    ssim(torch.rand(1, 1, 11, 11), torch.rand(1, 1, 11, 11))  # exactly the window: fine
    with pytest.raises(ValueError, match="11x11"):
        ssim(torch.rand(1, 3, 10, 32), torch.rand(1, 3, 10, 32))


@pytest.mark.parametrize("fn", [mse, psnr, ssim, l1, linf, modification_histogram, modified_fraction, stealth_metrics])
def test_shape_mismatch_raises(fn) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="shapes differ"):
        fn(torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 15))
    with pytest.raises(ValueError):
        fn(torch.rand(16, 16), torch.rand(16, 16))
    with pytest.raises(TypeError):
        fn(torch.zeros(1, 3, 16, 16, dtype=torch.uint8), torch.zeros(1, 3, 16, 16, dtype=torch.uint8))


def test_stealth_metrics_without_lpips() -> None:
    g = torch.Generator().manual_seed(5)
    clean = torch.randint(0, 256, (4, 3, 16, 16), generator=g).float().div(255)
    poisoned = clean.clone()
    poisoned[1:, :, :2, :2] = ((clean[1:, :, :2, :2] * 255 + 2).clamp(max=255)).round() / 255
    out = stealth_metrics(clean, poisoned)
    json.dumps(out, allow_nan=False)
    assert out["lpips"] is None
    assert out["identical_fraction"] == 0.25
    assert out["psnr"] == pytest.approx(float(psnr(clean[1:], poisoned[1:]).mean()), rel=1e-6)
    assert out["ssim"] == pytest.approx(float(ssim(clean, poisoned).mean()), rel=1e-6)
    assert out["ssim_3x3"] == pytest.approx(float(ssim_3x3(clean, poisoned).mean()), rel=1e-6)
    assert 0 < out["ssim_3x3"] < 1
    assert out["mse"] == pytest.approx(float(mse(clean, poisoned).mean()), rel=1e-6)
    assert out["linf"] == 2 and isinstance(out["linf"], int)
    # the multinomial paper's L1 is in grey levels: 4 of 256 pixels x 3 channels x 3 images changed,
    # each by 2 levels at most (clipped at 255), over 4 images of 768 sub-pixels
    assert out["l1_grey_levels"] == pytest.approx(out["l1"] * 255)
    assert 0 < out["l1_grey_levels"] <= 2 * 4 * 3 * 3 / (4 * 768) + 1e-9
    assert out["histogram"] == modification_histogram(clean, poisoned)
    assert out["modified_fraction"] == modified_fraction(clean, poisoned)
    same = stealth_metrics(clean, clean)
    assert same["psnr"] is None and same["identical_fraction"] == 1.0 and same["ssim"] == pytest.approx(1.0)
    json.dumps(same, allow_nan=False)


# ----------------------------------------------------------------------------- LPIPS


def _png(path: Path) -> torch.Tensor:
    array = np.array(Image.open(path).convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array).permute(2, 0, 1).float().div(255)


@pytest.fixture(scope="module")
def lpips_model(weights_dir: Path) -> torch.nn.Module:
    if not (weights_dir / BACKBONE_FILE).is_file():
        pytest.skip(f"{weights_dir / BACKBONE_FILE} not found")
    return load_lpips(weights_dir)


def test_lpips_published_values(lpips_model: torch.nn.Module, weights_dir: Path) -> None:
    ref = _png(weights_dir / "ex_ref.png")
    p0, p1 = _png(weights_dir / "ex_p0.png"), _png(weights_dir / "ex_p1.png")
    d = lpips_distance(lpips_model, torch.stack([ref, ref]), torch.stack([p0, p1]))
    assert d.shape == (2,)
    assert d[0].item() == pytest.approx(0.722, abs=1e-3)
    assert d[1].item() == pytest.approx(0.138, abs=1e-3)
    torch.testing.assert_close(lpips_distance(lpips_model, ref, p1), d[1:])  # (C, H, W) input
    torch.testing.assert_close(lpips_distance(lpips_model, torch.stack([ref, ref]), torch.stack([p0, p1]),
                                              batch_size=1), d)
    assert lpips_distance(lpips_model, ref, ref).abs().item() < 1e-6
    assert not any(p.requires_grad for p in lpips_model.parameters()) and not lpips_model.training


def test_lpips_in_stealth_metrics(lpips_model: torch.nn.Module) -> None:
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    y = (x + 0.05).clamp(0, 1)
    out = stealth_metrics(x, y, lpips_model)
    json.dumps(out, allow_nan=False)
    assert out["lpips"] == pytest.approx(float(lpips_distance(lpips_model, x, y).mean()), rel=1e-6)
    assert out["lpips"] > 0
    with pytest.raises(ValueError, match="31x31"):
        lpips_distance(lpips_model, torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16))


@pytest.fixture
def no_default_weights(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No $VEIL_WEIGHTS and an empty torch hub cache; returns the hub folder."""
    hub = tmp_path / "hub"
    hub.mkdir()
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    return hub


def test_lpips_missing_folder(no_default_weights: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    assert not lpips_available(missing)
    assert find_lpips_backbone(missing) is None
    with pytest.raises(FileNotFoundError) as info:
        load_lpips(missing)
    message = str(info.value)
    assert str(missing / BACKBONE_FILE) in message
    assert WEIGHTS_ENV in message and "weights_dir" in message
    assert str(no_default_weights / "checkpoints" / TORCHVISION_FILE) in message


def test_lpips_truncated_file(no_default_weights: Path, tmp_path: Path, weights_dir: Path) -> None:
    source = weights_dir / BACKBONE_FILE
    if not source.is_file():
        pytest.skip(f"{source} not found")
    folder = tmp_path / "broken"
    folder.mkdir()
    data = source.read_bytes()
    (folder / BACKBONE_FILE).write_bytes(data[: len(data) // 2])
    assert lpips_available(folder)
    with pytest.raises(CheckpointError, match=BACKBONE_FILE):
        load_lpips(folder)
    torch.save({"0.weight": torch.zeros(3)}, folder / BACKBONE_FILE)  # readable, wrong tensors
    with pytest.raises(CheckpointError, match=BACKBONE_FILE):
        load_lpips(folder)


def test_lpips_env_and_hub_cache(no_default_weights: Path, monkeypatch: pytest.MonkeyPatch,
                                 weights_dir: Path, lpips_model: torch.nn.Module) -> None:
    monkeypatch.setenv(WEIGHTS_ENV, str(weights_dir))
    assert find_lpips_backbone() == weights_dir / BACKBONE_FILE
    monkeypatch.delenv(WEIGHTS_ENV)
    assert not lpips_available()
    # a torchvision-style full AlexNet checkpoint in the hub cache
    features = torch.load(weights_dir / BACKBONE_FILE, map_location="cpu", weights_only=True)
    full = {f"features.{k}": v for k, v in features.items()}
    full["classifier.1.weight"] = torch.zeros(4, 9216)
    (no_default_weights / "checkpoints").mkdir()
    torch.save(full, no_default_weights / "checkpoints" / TORCHVISION_FILE)
    assert lpips_available()
    model = load_lpips()
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    y = x.flip(-1)
    torch.testing.assert_close(lpips_distance(model, x, y), lpips_distance(lpips_model, x, y))


def test_lpips_vgg_loads_a_users_vgg16_backbone_and_reads_it_in_the_right_slices(tmp_path, monkeypatch) -> None:
    """net="vgg": the backbone file's features[i] land in the slices lpips reads (checked against
    torchvision's VGG-16 features with the same weights); a missing file names what it looked for;
    an AlexNet file is not a VGG-16 backbone."""
    import torchvision

    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError, match="vgg16_imagenet_features.pth"):
        load_lpips(tmp_path, net="vgg")
    assert not lpips_available(tmp_path, net="vgg")
    torch.manual_seed(0)
    features = torchvision.models.vgg16().features.eval()
    torch.save(features.state_dict(), tmp_path / "vgg16_imagenet_features.pth")
    model = load_lpips(tmp_path, net="vgg")
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model.net.slice1(model.scaling_layer(x * 2 - 1))
        theirs = features[:4](model.scaling_layer(x * 2 - 1))
    torch.testing.assert_close(ours, theirs)
    y = (x + 0.1).clamp(0, 1)
    d = lpips_distance(model, x, y)
    assert d.shape == (2,) and (d > 0).all() and lpips_distance(model, x, x).abs().max().item() < 1e-6
    torch.save(torchvision.models.alexnet().features.state_dict(), tmp_path / "wrong.pth")
    with pytest.raises(CheckpointError, match="not a VGG-16 features state dict"):
        load_lpips(tmp_path / "wrong.pth", net="vgg")
    with pytest.raises(ValueError, match="unknown LPIPS network 'squeeze'"):
        load_lpips(tmp_path, net="squeeze")


def test_measure_stealth_script_reproduces_a_runs_record(tmp_path, weights_dir, capsys) -> None:
    """scripts/measure_stealth.py re-measures a finished run on the run's own test images: the
    figures it gives are the record's; a folder without a run exits 2 and names it."""
    from conftest import load_script

    from veil.experiment import run_experiment
    from veil.runs import RunConfig

    run = tmp_path / "badnets"
    metrics = run_experiment(RunConfig(attack="badnets", dataset="gtsrb_sample", model="preact_resnet18", width=4,
                                       epochs=1, train_subset=215, test_subset=215, out=str(run), device="cpu",
                                       progress=False, stealth_samples=32, lpips_weights=str(weights_dir)))
    script = load_script("scripts/measure_stealth.py")
    assert script.main([str(run), "--out", str(tmp_path / "stealth.json")]) == 0
    again = json.loads((tmp_path / "stealth.json").read_text())[str(run)]
    assert json.loads(capsys.readouterr().out)[str(run)] == again
    assert again["stealth_samples"] == 32
    for key in ("ssim", "ssim_3x3", "psnr", "lpips", "linf", "modified_fraction"):
        assert again[key] == pytest.approx(metrics["stealth"][key], rel=1e-6), key
    assert script.main([str(tmp_path / "nothing")]) == 2
    assert "nothing" in capsys.readouterr().err
