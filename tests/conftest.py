"""Shared fixtures.

``../shared`` (the project's shared data: GTSRB, LPIPS weights) is found through the environment
variable ``VEIL_SHARED`` or, by default, beside the repository root.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import ModuleType

import pytest
import torch

from veil.data.base import ImageDataset

REPO = Path(__file__).resolve().parents[1]


def shared_dir() -> Path:
    return Path(os.environ.get("VEIL_SHARED", REPO.parent / "shared"))


@pytest.fixture(scope="session")
def shared() -> Path:
    path = shared_dir()
    if not path.is_dir():
        pytest.skip(f"shared data folder {path} not found (set VEIL_SHARED)")
    return path


@pytest.fixture(scope="session")
def weights_dir(shared: Path) -> Path:
    return shared / "weights"


@pytest.fixture(scope="session")
def gtsrb_root(shared: Path) -> Path:
    return shared / "datasets"


@pytest.fixture(autouse=True)
def _threads() -> None:
    torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def one_thread():
    """One torch thread for the test (tiny models train faster and reproducibly on one)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_synthetic(n: int = 64, num_classes: int = 4, size: int = 32, seed: int = 0) -> ImageDataset:
    """A small random uint8 dataset with balanced labels."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    labels = torch.arange(n) % num_classes
    return ImageDataset(images, labels, [str(i) for i in range(num_classes)], "synthetic", hflip=True)


@pytest.fixture
def synthetic() -> ImageDataset:
    return make_synthetic()


def load_script(relative: str) -> ModuleType:
    """Import a script of the repository (``scripts/...``, ``bench/...``) as a module."""
    path = Path(__file__).resolve().parents[1] / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run_cli(args, capsys):
    """``veil -q ARGS`` in this process: (exit status, stdout, stderr)."""
    from veil.cli import main

    code = main(["-q", *args])
    out, err = capsys.readouterr()
    return code, out, err
