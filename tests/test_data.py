from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_synthetic
from veil.data import BatchAugment, load_dataset, stratified_subset, to_float, to_uint8
from veil.data.augment import random_crop, random_hflip
from veil.errors import ConfigError, DatasetError


def test_stratified_subset_keeps_proportions_and_is_deterministic():
    ds = make_synthetic(n=400, num_classes=4)
    ds.labels[:200] = 0  # class 0 holds half of the rows
    sub = stratified_subset(ds, 100, seed=3)
    assert len(sub) == 100
    counts = torch.bincount(sub.labels, minlength=4)
    full = torch.bincount(ds.labels, minlength=4).float()
    assert torch.allclose(counts.float(), full / 4, atol=1)
    again = stratified_subset(ds, 100, seed=3)
    assert torch.equal(sub.images, again.images)
    other = stratified_subset(ds, 100, seed=4)
    assert not torch.equal(sub.images, other.images)


def test_stratified_subset_every_class_kept():
    ds = make_synthetic(n=430, num_classes=43)
    sub = stratified_subset(ds, 50, seed=0)
    assert len(sub) == 50
    assert torch.unique(sub.labels).numel() == 43


def test_uint8_float_roundtrip():
    x = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    assert torch.equal(to_uint8(to_float(x)), x)
    assert to_float(x).max() <= 1 and to_float(x).min() >= 0


def test_random_crop_is_a_shifted_window():
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).reshape(2, 1, 6, 6) + 1
    g = torch.Generator().manual_seed(0)
    out = random_crop(x, 2, g)
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for b in range(2):
        found = any(
            torch.equal(out[b], padded[b, :, i : i + 6, j : j + 6]) for i in range(5) for j in range(5)
        )
        assert found


def test_hflip_and_augment_flags():
    x = torch.rand(64, 3, 8, 8)
    g = torch.Generator().manual_seed(0)
    flipped = random_hflip(x, 1.0, g)
    assert torch.equal(flipped, x.flip(3))
    aug = BatchAugment(padding=0, hflip=False)
    assert torch.equal(aug(x, g), x)  # traffic signs: no flip, no crop when padding 0


def test_bundled_sample_loads_without_shared():
    train = load_dataset("gtsrb_sample", split="train")
    test = load_dataset("gtsrb_sample", split="test")
    assert train.images.dtype == torch.uint8 and train.images.shape[1:] == (3, 32, 32)
    assert train.num_classes == 43 and not train.hflip
    assert torch.unique(train.labels).numel() == 43
    assert len(test) > 500
    big = load_dataset("gtsrb_sample", split="test", image_size=64)
    assert big.images.shape[1:] == (3, 64, 64)


def _write_folder(root: Path, classes: int = 3, per: int = 4, size: int = 10) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in range(classes):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(per):
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(d / f"{i}.png")


def test_imagefolder_decodes_resizes_and_caches(tmp_path):
    _write_folder(tmp_path / "data")
    cache = tmp_path / "cache"
    ds = load_dataset("imagefolder", tmp_path / "data", "train", image_size=16, cache_dir=cache)
    assert ds.images.shape == (12, 3, 16, 16)
    assert ds.classes == ["class0", "class1", "class2"]
    assert torch.equal(ds.labels, torch.tensor([0] * 4 + [1] * 4 + [2] * 4))
    files = list(cache.glob("*.safetensors"))
    assert len(files) == 1
    again = load_dataset("imagefolder", tmp_path / "data", "train", image_size=16, cache_dir=cache)
    assert torch.equal(again.images, ds.images)
    # a changed folder is decoded again (new cache key)
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(tmp_path / "data/train/class0/new.png")
    changed = load_dataset("imagefolder", tmp_path / "data", "train", image_size=16, cache_dir=cache)
    assert len(changed) == 13


def test_missing_and_empty_folders_give_clear_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset("imagefolder", tmp_path / "nope", "train")
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no class folders"):
        load_dataset("imagefolder", tmp_path / "empty", "train")
    (tmp_path / "empty" / "train" / "a").mkdir()
    with pytest.raises(DatasetError, match="no images"):
        load_dataset("imagefolder", tmp_path / "empty", "train")
    with pytest.raises(DatasetError, match="no GTSRB data"):
        load_dataset("gtsrb", tmp_path, "train")
    with pytest.raises(ConfigError, match="unknown dataset 'mnist'"):
        load_dataset("mnist", tmp_path)
    with pytest.raises(DatasetError, match="needs a data folder"):
        load_dataset("gtsrb", None)


def test_gtsrb_imagefolder_layout(gtsrb_root):
    test = load_dataset("gtsrb", gtsrb_root, "test")
    assert len(test) == 12630 and test.num_classes == 43 and not test.hflip
    assert test.images.shape[1:] == (3, 32, 32)


def test_gtsrb_official_torchvision_layout(tmp_path):
    """torchvision's layout: GTSRB/Training/<class>/*.ppm and Final_Test/Images + GT-final_test.csv."""
    rng = np.random.default_rng(1)
    base = tmp_path / "gtsrb" / "GTSRB"
    for c in range(2):
        d = base / "Training" / f"{c:05d}"
        d.mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)).save(d / f"{i:05d}_00000.ppm")
    test_dir = base / "Final_Test" / "Images"
    test_dir.mkdir(parents=True)
    rows = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)).save(test_dir / f"{i:05d}.ppm")
        rows.append(f"{i:05d}.ppm;30;30;0;0;29;29;{i % 2}")
    (tmp_path / "gtsrb" / "GT-final_test.csv").write_text("\n".join(rows) + "\n")
    train = load_dataset("gtsrb", tmp_path, "train", cache_dir=tmp_path / "cache")
    test = load_dataset("gtsrb", tmp_path, "test", cache_dir=tmp_path / "cache")
    assert train.images.shape == (6, 3, 32, 32) and sorted(train.labels.tolist()) == [0, 0, 0, 1, 1, 1]
    assert test.images.shape == (4, 3, 32, 32) and test.labels.tolist() == [0, 1, 0, 1]


def test_stratified_subset_smaller_than_class_count_is_refused():
    ds = make_synthetic(n=430, num_classes=43)
    with pytest.raises(ConfigError, match="cannot hold the 43 classes"):
        stratified_subset(ds, 40)
