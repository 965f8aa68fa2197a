"""JPEG transform, convolutional autoencoder and the attacker's compression augmentation."""

from __future__ import annotations

import copy
import itertools
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from veil.augment import (
    AUTOENCODER_FILE,
    CompressionAugment,
    build_augment_hook,
    parse_augment,
)
from veil.autoencoder import (
    ConvAutoencoder,
    cached_autoencoder,
    load_autoencoder,
    reconstruction_mse,
    save_autoencoder,
    train_autoencoder,
)
from veil.data.base import ImageDataset, PoisonedDataset, to_uint8
from veil.errors import ConfigError
from veil.experiment import RunConfig
from veil.train import Batch, TrainConfig, Trainer
from veil.transforms import jpeg


@pytest.fixture(autouse=True)
def _one_thread():
    """These tensors are tiny: one thread is fastest (two threads spin against each other when the
    machine's cores are shared)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def smooth_images(n: int = 8, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Natural-looking test images: low-frequency colour fields plus a little texture."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g)
    x = nn.functional.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)
    x = x + 0.03 * torch.randn(n, 3, size, size, generator=g)
    return x.clamp(0, 1)


def smooth_dataset(n: int = 64, size: int = 16, seed: int = 0) -> ImageDataset:
    return ImageDataset(to_uint8(smooth_images(n, size, seed)), torch.arange(n) % 4, list("abcd"), "smooth", hflip=True)


# ---------------------------------------------------------------------- jpeg
def test_jpeg_keeps_shape_range_dtype_and_is_deterministic():
    x = smooth_images(4)
    y = jpeg(x, 75)
    assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device
    assert 0.0 <= float(y.min()) and float(y.max()) <= 1.0
    assert torch.equal(y, (y * 255).round() / 255)  # on the 8-bit grid
    assert torch.equal(y, jpeg(x, 75))
    assert jpeg(x[0], 75).shape == x[0].shape  # single image
    gray = jpeg(x[:, :1], 75)
    assert gray.shape == (4, 1, 32, 32)
    assert jpeg(x[:0], 75).shape == (0, 3, 32, 32)


def test_jpeg_error_grows_as_quality_falls():
    x = smooth_images(8)
    errors = [float((jpeg(x, q) - x).pow(2).mean()) for q in (100, 90, 70, 50, 20, 5)]
    assert errors[0] < 1e-3  # quality 100 is close to the input (PSNR > 30 dB, chroma subsampled)
    assert all(a < b for a, b in itertools.pairwise(errors)), errors
    assert float((jpeg(x, 100, subsampling=0) - x).pow(2).mean()) < 1e-4  # 4:4:4: nearly lossless


def test_jpeg_per_image_quality_matches_batch_quality():
    x = smooth_images(3)
    q = torch.tensor([95, 50, 10])
    y = jpeg(x, q)
    for i in range(3):
        assert torch.equal(y[i], jpeg(x[i : i + 1], int(q[i]))[0])


@pytest.mark.parametrize("quality", [0, 101, -5, torch.tensor([50, 0]), torch.tensor([50, 50, 50]), 50.5])
def test_jpeg_rejects_bad_quality(quality):
    with pytest.raises(ValueError, match="quality|qualities"):
        jpeg(smooth_images(2), quality)


def test_jpeg_rejects_bad_shape():
    with pytest.raises(ValueError, match="channels"):
        jpeg(torch.rand(2, 4, 8, 8), 90)


# ---------------------------------------------------------------------- parse_augment
def test_parse_augment_accepts_the_three_specs():
    assert parse_augment("jpeg") == ("jpeg",)
    assert parse_augment("autoencoder") == ("autoencoder",)
    assert parse_augment("jpeg+autoencoder") == ("jpeg", "autoencoder")
    assert parse_augment("autoencoder+jpeg") == ("jpeg", "autoencoder")


@pytest.mark.parametrize("spec", ["", "png", "jpeg+jpeg", "jpeg+", "jpeg,autoencoder", None])
def test_parse_augment_rejects_others_and_lists_valid_values(spec):
    with pytest.raises(ConfigError, match="jpeg, autoencoder, jpeg\\+autoencoder"):
        parse_augment(spec)


def test_run_config_validates_augment():
    config = RunConfig(attack="badnets", dataset="gtsrb_sample", model="preact_resnet18", out="x", augment="blur")
    with pytest.raises(ConfigError, match="unknown augmentation"):
        config.validate()


# ---------------------------------------------------------------------- augmentation hook
def _batch(n: int = 64, seed: int = 0, step: int = 0) -> Batch:
    return Batch(x=smooth_images(n, 16, seed), y=torch.zeros(n, dtype=torch.long), index=torch.arange(n), step=step, epoch=0)


def _fake_trainer(train=None):
    return SimpleNamespace(device=torch.device("cpu"), train_data=train)


def test_hook_replaces_about_p_of_the_images_with_jpeg_versions():
    hook = CompressionAugment(("jpeg",), p=0.5, quality=(60, 95), seed=0)
    changed = total = 0
    for s in range(4):
        b = _batch(128, seed=s, step=s)
        x0 = b.x.clone()
        out = hook.transform_batch(_fake_trainer(), b).x
        diff = (out - x0).flatten(1).abs().amax(1) > 0
        changed += int(diff.sum())
        total += diff.numel()
        # every changed image is a JPEG version of its input at a quality in range
        for i in torch.nonzero(diff).flatten()[:3].tolist():
            assert any(torch.equal(out[i], jpeg(x0[i : i + 1], q)[0]) for q in range(60, 96))
    assert 0.4 < changed / total < 0.6
    assert hook.on_epoch_end(None)["augment_fraction"] == pytest.approx(changed / total, abs=0.02)


def test_hook_is_deterministic_under_a_seed():
    outs = []
    for seed in (3, 3, 4):
        hook = CompressionAugment(("jpeg",), seed=seed)
        outs.append(hook.transform_batch(_fake_trainer(), _batch()).x)
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], outs[2])


def test_hook_state_round_trip_gives_the_same_next_batch():
    ae = ConvAutoencoder(3, hidden=4, latent_channels=2)
    hook = CompressionAugment(("jpeg", "autoencoder"), autoencoder=ae, seed=1)
    hook.transform_batch(_fake_trainer(), _batch(seed=1))
    state = copy.deepcopy(hook.state_dict())
    expected = hook.transform_batch(_fake_trainer(), _batch(seed=2)).x
    resumed = CompressionAugment(("jpeg", "autoencoder"), autoencoder=ae, seed=1)
    resumed.load_state_dict(state)
    assert torch.equal(resumed.transform_batch(_fake_trainer(), _batch(seed=2)).x, expected)


def test_hook_mixes_both_kinds_and_only_poisoned_limits_rows():
    ae = ConvAutoencoder(3, hidden=4, latent_channels=2)
    hook = CompressionAugment(("jpeg", "autoencoder"), p=1.0, autoencoder=ae, seed=0)
    chosen, _, kind = copy.deepcopy(hook).draw(64)
    assert bool(chosen.all()) and 0 < int(kind.sum()) < 64
    b = _batch()
    x0 = b.x.clone()
    out = hook.transform_batch(_fake_trainer(), b).x
    ae_rows = torch.nonzero(kind == 1).flatten()
    assert torch.allclose(out[ae_rows], ae.eval()(x0[ae_rows]), atol=1e-6)

    data = smooth_dataset(64)
    poisoned = PoisonedDataset(images=data.images, labels=data.labels, classes=data.classes, poison_indices=torch.tensor([2, 5]))
    only = CompressionAugment(("jpeg",), p=1.0, seed=0, only_poisoned=True)
    b = _batch()
    x0 = b.x.clone()
    out = only.transform_batch(_fake_trainer(poisoned), b).x
    changed = torch.nonzero((out - x0).flatten(1).abs().amax(1) > 0).flatten().tolist()
    assert changed == [2, 5]


def test_hook_rejects_bad_options():
    with pytest.raises(ConfigError):
        CompressionAugment(("jpeg",), p=1.5)
    with pytest.raises(ConfigError):
        CompressionAugment(("jpeg",), quality=(90, 50))
    with pytest.raises(ConfigError, match="autoencoder"):
        CompressionAugment(("autoencoder",))


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 4))

    def forward(self, x):
        return self.net(x)


def test_training_with_the_hook_resumes_to_the_same_weights(tmp_path):
    data = smooth_dataset(64)

    def make(ckpt):
        torch.manual_seed(0)
        cfg = TrainConfig(epochs=2, batch_size=16, lr=0.05, seed=0, channels_last=False, checkpoint_every=0)
        hook = CompressionAugment(("jpeg",), seed=0)
        return Trainer(_Tiny(), data, cfg, hooks=[hook], checkpoint=ckpt, device="cpu", progress=False)

    full = make(None)
    full.fit()
    interrupted = make(tmp_path / "ck.pt")
    interrupted.stop_after_steps = 5  # mid second epoch
    with pytest.raises(KeyboardInterrupt):
        interrupted.fit()
    resumed = make(tmp_path / "ck.pt")
    history = resumed.fit()
    for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    assert [h["augment_fraction"] for h in history] == [h["augment_fraction"] for h in full.history]


# ---------------------------------------------------------------------- autoencoder
def test_autoencoder_shapes_and_odd_sizes():
    ae = ConvAutoencoder()
    for shape in ((2, 3, 32, 32), (1, 3, 30, 27)):
        with torch.no_grad():
            y = ae(torch.rand(*shape))
        assert y.shape == shape and float(y.min()) >= 0 and float(y.max()) <= 1


def test_autoencoder_training_reduces_reconstruction_error_and_round_trips(tmp_path):
    data = smooth_dataset(64)
    kw = {"device": "cpu", "seed": 0, "progress": False, "hidden": 16, "latent_channels": 8}
    untrained = train_autoencoder(data, epochs=1, lr=1e-12, batch_size=32, **kw)
    trained = train_autoencoder(data, epochs=8, batch_size=8, lr=1e-2, **kw)
    before, after = reconstruction_mse(untrained, data.images), reconstruction_mse(trained, data.images)
    assert after < 0.6 * before, (before, after)
    assert trained.history[-1] < trained.history[0]

    path = tmp_path / "ae.safetensors"
    save_autoencoder(trained, path)
    loaded = load_autoencoder(path)
    x = torch.rand(2, 3, 16, 16)
    assert loaded.architecture() == {"in_channels": 3, "hidden": 16, "latent_channels": 8}
    with torch.no_grad():
        assert torch.equal(loaded(x), trained(x))


def test_cached_autoencoder_reuses_only_a_matching_model(tmp_path):
    data = smooth_dataset(32)
    path = tmp_path / "ae.safetensors"
    kw = {"epochs": 1, "batch_size": 16, "device": "cpu", "seed": 0, "progress": False}
    first = cached_autoencoder(path, data, **kw)
    stamp = path.stat().st_mtime_ns
    again = cached_autoencoder(path, data, **kw)
    assert path.stat().st_mtime_ns == stamp  # reused, not retrained
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(first(x), again(x))
    cached_autoencoder(path, smooth_dataset(32, seed=1), **kw)  # other images: retrained
    assert path.stat().st_mtime_ns != stamp


def test_build_augment_hook_caches_the_autoencoder_in_the_run_folder(tmp_path):
    data = smooth_dataset(32)
    hook = build_augment_hook("jpeg+autoencoder", data, device="cpu", record_dir=tmp_path, seed=0, autoencoder_epochs=1, progress=False)
    assert hook.kinds == ("jpeg", "autoencoder") and hook.autoencoder is not None
    assert (tmp_path / AUTOENCODER_FILE).is_file()
    assert build_augment_hook("jpeg", data, record_dir=tmp_path).autoencoder is None


def test_run_experiment_with_jpeg_and_autoencoder_augmentation(tmp_path):
    from veil.experiment import run_experiment
    from veil.records import RunRecord

    out = tmp_path / "aug"
    run_experiment(RunConfig(
        attack="badnets", dataset="gtsrb_sample", model="preact_resnet18", width=4, epochs=1, train_subset=430,
        test_subset=215, out=str(out), device="cpu", progress=False, stealth_samples=16, augment="jpeg+autoencoder",
    ))
    history = RunRecord(out).history()
    assert 0.4 < history[0]["augment_fraction"] < 0.6
    assert (out / AUTOENCODER_FILE).is_file()
