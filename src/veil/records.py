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
      .veil-lock           the one-writer lock; while held: who (host, process, since when)

A run folder has one writer at a time (:class:`FolderLock`, an operating-system lock on
``.veil-lock``): ``veil run``, ``veil defend`` and sweep workers take it, and a second command on
the same folder gets a clear error; a killed process's lock is released by the system.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import tempfile
from pathlib import Path
from types import TracebackType
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
LOCK = ".veil-lock"


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
        # not torch's message: it suggests weights_only=False, which would run the file's code
        raise CheckpointError(f"checkpoint {path} is corrupted or truncated, or holds objects other than tensors and "
                              f"plain data ({type(exc).__name__}; refused: veil never unpickles such objects)") from None
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
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RecordError(f"{path} does not exist") from None
    except UnicodeDecodeError:
        raise RecordError(f"{path} is not UTF-8 text, so not a veil record") from None
    except json.JSONDecodeError as exc:
        raise RecordError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except OSError as exc:
        raise RecordError(f"{path} cannot be read ({exc.strerror or exc})") from None


class FolderLock:
    """The one-writer lock of a run (or sweep) folder: an exclusive ``flock`` on
    ``FOLDER/.veil-lock``, which holds the host, process id, command and start time of its holder.

    Use as a context manager (or :meth:`acquire` / :meth:`release`). The operating system releases
    the lock when its holder exits, however it exits, so a lock left by a killed process is simply
    taken; a live holder gives a :class:`RecordError` naming it. The lock file stays in the folder
    (empty when free). The folder is created if missing (unless ``create`` is False: then a
    missing folder is an error).
    """

    def __init__(self, folder: str | Path, what: str = "command", create: bool = True) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK
        self.what = what
        self.create = create
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def _holder(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            return data if isinstance(data, dict) else None
        except (OSError, ValueError):
            return None

    def acquire(self) -> FolderLock:
        import fcntl

        if self.folder.exists() and not self.folder.is_dir():
            raise RecordError(f"{self.folder} exists and is not a folder")
        if not self.create and not self.folder.is_dir():
            raise RecordError(f"run folder {self.folder} does not exist")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        except OSError as exc:
            raise RecordError(f"cannot write in {self.folder} ({exc.strerror or exc})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            holder = self._holder() or {}
            raise RecordError(
                f"{self.folder} is in use by another veil command ({holder.get('command', 'unknown')}, process "
                f"{holder.get('pid', '?')} on {holder.get('host', '?')} since {holder.get('since', '?')}); wait for it "
                "to finish") from None
        me = {"host": socket.gethostname(), "pid": os.getpid(), "command": self.what,
              "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(me).encode("utf-8"))
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)
            except OSError:
                pass
            os.close(self._fd)  # closing releases the flock
            self._fd = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.release()


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

    def _object(self, name: str, required: tuple[str, ...]) -> dict[str, Any]:
        obj = self.read_json(name)
        if not isinstance(obj, dict):
            raise RecordError(f"{self.path(name)} holds a JSON {type(obj).__name__}, not a veil record")
        missing = [k for k in required if k not in obj]
        if missing:
            raise RecordError(f"{self.path(name)} lacks {', '.join(missing)}, so it is not a veil record")
        return obj

    def config(self) -> dict[str, Any]:
        """``config.json`` as a mapping (keys may be missing: reports tolerate that)."""
        return self._object(CONFIG, ())

    def run_config(self) -> dict[str, Any]:
        """``config.json`` with the keys a run needs to be rebuilt (attack, dataset, model)."""
        return self._object(CONFIG, ("attack", "dataset", "model"))

    def metrics(self) -> dict[str, Any]:
        """``metrics.json`` as a mapping (keys may be missing: reports show them as missing)."""
        return self._object(METRICS, ())

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
