"""A run's record on disk.

One folder per run, written atomically file by file (write to a temporary file in the same folder,
then ``os.replace``), so a crash never leaves a half-written file behind. Every defense and every
report reads runs through this module.

Layout::

    RUN/
      config.json          the full run configuration
      environment.json     veil version, git sha, torch version, device, python, platform
      poison_indices.json  {"poison": [...], "extra": [...]} rows of the training set
      history.json         per-epoch training log (loss, clean accuracy, attack success rate, time)
      checkpoint.pt        resumable training state (removed when the run finishes)
      model.safetensors    final classifier weights
      attack.safetensors   the attack's trigger state (patterns, generator weights), if any
      samples.safetensors  a few clean test images and their poisoned versions (uint8)
      samples.png          grid of clean / poisoned / amplified residual images
      metrics.json         final metrics; its presence marks the run as finished
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from veil.errors import CheckpointError, RecordError

CONFIG = "config.json"
ENVIRONMENT = "environment.json"
POISON_INDICES = "poison_indices.json"
HISTORY = "history.json"
CHECKPOINT = "checkpoint.pt"
MODEL = "model.safetensors"
ATTACK = "attack.safetensors"
SAMPLES = "samples.safetensors"
SAMPLES_PNG = "samples.png"
METRICS = "metrics.json"


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _publish(tmp: str, path: Path) -> None:
    """Give the temporary file normal permissions (mkstemp makes it 0600) and move it in place."""
    os.chmod(tmp, _umask_mode())
    os.replace(tmp, path)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        _publish(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    _atomic_write_bytes(Path(path), (json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n").encode())


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write raw bytes atomically."""
    _atomic_write_bytes(Path(path), data)


def atomic_save_tensors(path: str | Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> None:
    """Save tensors as safetensors, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        _publish(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_torch_save(path: str | Path, obj: Any) -> None:
    """``torch.save`` atomically (only for plain containers of tensors and numbers, which
    :func:`load_checkpoint` reads back with ``weights_only=True``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        _publish(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_tensors(path: str | Path) -> dict[str, Tensor]:
    """Load a safetensors file; a missing, truncated or corrupted file gives a clear error."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {path} does not exist")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"weights file {path} is corrupted or truncated ({exc})") from exc


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a training checkpoint with ``weights_only=True`` (never unpickles arbitrary objects)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupted zip/pickle data
        raise CheckpointError(f"checkpoint {path} is corrupted or truncated ({type(exc).__name__}: {exc})") from exc
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} does not hold a training state")
    return obj


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, Tensor):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"cannot serialise {type(obj).__name__} to JSON")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise RecordError(f"{path} does not exist") from None
    except json.JSONDecodeError as exc:
        raise RecordError(f"{path} is not valid JSON ({exc})") from exc


class RunRecord:
    """Accessor for one run folder (see the module docstring for its layout)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, name: str) -> Path:
        return self.root / name

    @property
    def finished(self) -> bool:
        return self.path(METRICS).is_file()

    def exists(self) -> bool:
        return self.root.is_dir()

    def require(self) -> RunRecord:
        """Raise :class:`RecordError` unless this is a finished run."""
        if not self.root.is_dir():
            raise RecordError(f"run folder {self.root} does not exist")
        if not self.finished:
            raise RecordError(f"{self.root} is not a finished run (no {METRICS})")
        return self

    def write_json(self, name: str, obj: Any) -> None:
        atomic_write_json(self.path(name), obj)

    def read_json(self, name: str) -> Any:
        return read_json(self.path(name))

    def config(self) -> dict[str, Any]:
        return self.read_json(CONFIG)

    def metrics(self) -> dict[str, Any]:
        return self.read_json(METRICS)

    def environment(self) -> dict[str, Any]:
        return self.read_json(ENVIRONMENT)

    def history(self) -> list[dict[str, Any]]:
        p = self.path(HISTORY)
        return self.read_json(HISTORY) if p.is_file() else []

    def poison_indices(self) -> dict[str, list[int]]:
        return self.read_json(POISON_INDICES)

    def save_tensors(self, name: str, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> None:
        atomic_save_tensors(self.path(name), tensors, metadata)

    def load_tensors(self, name: str) -> dict[str, Tensor]:
        return load_tensors(self.path(name))

    def model_state(self) -> dict[str, Tensor]:
        return self.load_tensors(MODEL)

    def attack_state(self) -> dict[str, Tensor]:
        p = self.path(ATTACK)
        return self.load_tensors(ATTACK) if p.is_file() else {}

    def samples(self) -> dict[str, Tensor]:
        return self.load_tensors(SAMPLES)
