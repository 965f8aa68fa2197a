"""Claims on sweep points: which worker runs a point now, so that two workers never run it at once.

A claim is ``OUT/.claims/NAME.json`` holding the claimant's host, process id, job or task id, start
time and a heartbeat (seconds since the epoch) that a thread refreshes while the point runs. A
worker takes a point only if it holds no live claim. A claim is stale, and is taken over, when its
heartbeat is older than ``stale_after`` seconds (the claimant's host died or lost the shared file
system) or, on the claimant's own host, when its process no longer exists (a killed worker is taken
over at once); so is a claim made under this process's own job id (a requeued SLURM task takes its
point back). Every decision is made under a short mutex (``OUT/.claims/.mutex``, created with
``O_EXCL``, which is atomic on local file systems and on NFS v3 and later), so two workers that see
the same stale claim cannot both take it over. ``OUT/.claims/NAME.log`` keeps one line per claim
taken (who, when, and whose stale claim it replaced), for audits and tests.

Claims only guard who starts a point; a run folder also has its operating-system lock
(:class:`veil.records.FolderLock`), and an interrupted point resumes from its checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger(__name__)

__all__ = ["CLAIMS_DIR", "Claim", "claim_point", "claim_status", "clear_stale", "worker_identity"]

CLAIMS_DIR = ".claims"
#: a claim whose heartbeat is older than this (seconds) is stale
STALE_AFTER = float(os.environ.get("VEIL_CLAIM_STALE_AFTER", "300"))
#: how often the holder refreshes its heartbeat (seconds)
HEARTBEAT = float(os.environ.get("VEIL_CLAIM_HEARTBEAT", "30"))
_MUTEX = ".mutex"
_MUTEX_STALE = 60.0


def worker_identity() -> dict[str, Any]:
    """Who is running: host, process id, and the job or task id of the engine that started it
    (SLURM's array job and task, a Ray task, a ``--jobs`` worker: ``VEIL_TASK_ID``)."""
    env = os.environ
    job = env.get("VEIL_TASK_ID")
    if job is None and env.get("SLURM_JOB_ID"):
        job = env["SLURM_JOB_ID"]
        if env.get("SLURM_ARRAY_JOB_ID"):
            job = f"{env['SLURM_ARRAY_JOB_ID']}_{env.get('SLURM_ARRAY_TASK_ID', '')}"
    return {"host": socket.gethostname(), "pid": os.getpid(), "job": job, "executor": env.get("VEIL_EXECUTOR", "local")}


def _read(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claim_status(claim: dict[str, Any] | None, stale_after: float = STALE_AFTER) -> str:
    """``"free"`` (no claim), ``"live"`` or ``"stale"`` for a claim's content. A claim made under
    this process's own job or task id by another process (a requeued SLURM task) is stale."""
    if not claim:
        return "free"
    me = worker_identity()
    if me["job"] and claim.get("job") == me["job"] and (claim.get("host"), claim.get("pid")) != (me["host"], me["pid"]):
        return "stale"
    if claim.get("host") == socket.gethostname() and isinstance(claim.get("pid"), int) and not _alive(claim["pid"]):
        return "stale"
    beat = claim.get("heartbeat")
    if not isinstance(beat, (int, float)) or time.time() - beat > stale_after:
        return "stale"
    return "live"


@contextlib.contextmanager
def _mutex(folder: Path, timeout: float = 30.0) -> Iterator[None]:
    path = folder / _MUTEX
    deadline = time.monotonic() + timeout
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            try:
                if time.time() - path.stat().st_mtime > _MUTEX_STALE:  # its holder died inside the mutex
                    path.unlink(missing_ok=True)
                    continue
            except FileNotFoundError:
                continue
            if time.monotonic() > deadline:
                raise TimeoutError(f"the claims mutex {path} stayed taken for {timeout:.0f} s") from None
            time.sleep(0.02)
    try:
        os.close(fd)
        yield
    finally:
        path.unlink(missing_ok=True)


def _write(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(data), encoding="utf-8")
    os.replace(tmp, path)


class Claim:
    """A held claim on one point; refreshes its heartbeat in a thread until :meth:`release`."""

    def __init__(self, path: Path, data: dict[str, Any], heartbeat: float = HEARTBEAT) -> None:
        self.path = path
        self.data = data
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(heartbeat,), daemon=True, name=f"claim {path.stem}")
        self._thread.start()

    def _beat(self, every: float) -> None:
        while not self._stop.wait(every):
            current = _read(self.path)
            if current is None or current.get("token") != self.data["token"]:
                log.warning("claim %s was taken over by %s", self.path, (current or {}).get("host"))
                return
            self.data["heartbeat"] = time.time()
            try:
                _write(self.path, self.data)
            except OSError as exc:  # a full or unreachable disk: the claim goes stale, the run goes on
                log.warning("cannot refresh the claim %s (%s)", self.path, exc)

    def release(self) -> None:
        """Stop the heartbeat and remove the claim (if it is still this one)."""
        self._stop.set()
        self._thread.join(timeout=5)
        with _mutex(self.path.parent):
            current = _read(self.path)
            if current is not None and current.get("token") == self.data["token"]:
                self.path.unlink(missing_ok=True)

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def claim_point(sweep_out: str | Path, name: str, stale_after: float = STALE_AFTER,
                heartbeat: float = HEARTBEAT) -> tuple[Claim | None, dict[str, Any] | None]:
    """Try to claim point ``name`` of the sweep in ``sweep_out``.

    Returns:
        ``(claim, None)`` when this process now holds it (a stale claim taken over is logged), or
        ``(None, holder)`` when a live claim of another worker holds it.
    """
    folder = Path(sweep_out) / CLAIMS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    with _mutex(folder):
        current = _read(path)
        status = claim_status(current, stale_after)
        if status == "live":
            return None, current
        now = time.time()
        data = {**worker_identity(), "since": now, "heartbeat": now, "token": uuid.uuid4().hex}
        _write(path, data)
        line = {k: data[k] for k in ("host", "pid", "job", "executor", "since")}
        if status == "stale":
            line["took_over"] = {k: current.get(k) for k in ("host", "pid", "job")} if current else None
            log.warning("point %s: taking over the stale claim of %s (process %s)", name,
                        (current or {}).get("host"), (current or {}).get("pid"))
        with open(folder / f"{name}.log", "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")
    return Claim(path, data, heartbeat), None


def clear_stale(sweep_out: str | Path, name: str, stale_after: float = STALE_AFTER) -> bool:
    """Remove a stale claim on ``name`` (one left by a worker killed after its point finished);
    ``True`` if one was removed."""
    folder = Path(sweep_out) / CLAIMS_DIR
    path = folder / f"{name}.json"
    if not path.exists():
        return False
    with _mutex(folder):
        if claim_status(_read(path), stale_after) != "stale":
            return False
        path.unlink(missing_ok=True)
    return True
