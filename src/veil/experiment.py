"""One experiment: train a (possibly backdoored) classifier and record everything about it.

:func:`run_experiment` is what ``veil run`` calls: load data, let the attack learn its trigger and
poison the training set, train with the shared :class:`veil.train.Trainer` (resuming from a
checkpoint if the run was interrupted), evaluate clean accuracy, attack success rate and stealth,
and write the run record (see :mod:`veil.records`).
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import subprocess
import time
import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import veil
from veil import records as rec
from veil.attacks import Attack
from veil.data import ImageDataset, to_float
from veil.data.augment import CROP_PADDING
from veil.errors import RecordError
from veil.metrics import accuracy, stealth_metrics
from veil.models import create_model
from veil.runs import (  # noqa: F401  (LoadedRun, load_run re-exported)
    LoadedRun,
    RunConfig,
    check_run_memory,
    create_run_attack,
    eval_subset,
    load_run,
    load_run_data,
)
from veil.train import Trainer, predict, resolve_device

log = logging.getLogger(__name__)

#: config keys that may differ between an interrupted run and its resumption
_RESUME_IGNORED = {"out", "overwrite", "device", "progress", "lpips_weights", "lpips_net", "cache_dir", "data_root", "download", "recipe", "sources"}


def seed_everything(seed: int) -> None:
    """Seed the global RNGs and ask for deterministic kernels (once per run, before it starts)."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


def environment(device: torch.device) -> dict[str, Any]:
    """veil version, git sha of the source checkout (if any) and whether veil's source differs from
    it, torch version and device, and :func:`execution`."""
    sha, dirty = None, None
    src = Path(veil.__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=src, capture_output=True, text=True, timeout=5)
        if out.returncode == 0:
            sha = out.stdout.strip()
            # uncommitted changes to veil's own source: the sha alone does not name the code that ran
            status = subprocess.run(["git", "status", "--porcelain", "--", "."], cwd=src, capture_output=True,
                                    text=True, timeout=5)
            dirty = bool(status.stdout.strip()) if status.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        pass
    return {
        "veil_version": veil.__version__,
        "git_sha": sha,
        "git_dirty": dirty,
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "execution": execution(),
    }


def execution() -> dict[str, Any]:
    """Where the run ran: host, process, the executor and its job or task id (SLURM's array task,
    a Ray task, a ``veil sweep --jobs`` worker), and the visible devices."""
    from veil.claims import worker_identity

    return {**worker_identity(), "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "cuda_device_count": torch.cuda.device_count() if torch.cuda.is_available() else 0}


#: files and folders of a run record (what overwriting a run replaces); metrics first, so that a
#: folder being cleared stops reading as finished before anything else goes
_RECORD_FILES = (rec.METRICS, rec.CONFIG, rec.ENVIRONMENT, rec.POISON_INDICES, rec.HISTORY, rec.CHECKPOINT, rec.MODEL,
                 rec.ATTACK, rec.SAMPLES, rec.SAMPLES_PNG, "augment_autoencoder.safetensors")
_RECORD_DIRS = ("figures", "tables", "defenses", "analysis")
#: where ``--overwrite`` trains the new run until it finishes (inside the run folder)
STAGING = ".overwrite"
#: written while a finished staged run replaces the old one, so that an interrupted replacement
#: is completed (not redone) by the next command on the folder
PROMOTING = ".promoting"


def _check_folder(config: RunConfig) -> None:
    """Refuse an ``out`` that cannot take this run, without changing anything."""
    record = rec.RunRecord(config.out)
    root = record.root
    if root.exists() and not root.is_dir():
        raise RecordError(f"output path {root} exists and is not a folder")
    for parent in root.parents:
        if parent.exists():
            if not parent.is_dir():
                raise RecordError(f"output path {root} is under {parent}, which is a file")
            if not os.access(parent if not root.exists() else root, os.W_OK):
                raise RecordError(f"output folder {root if root.exists() else parent} is not writable")
            break
    if record.finished and not config.overwrite:
        raise RecordError(f"output folder {root} already holds a finished run; pass --overwrite to replace it")
    if not config.overwrite and record.path(rec.CHECKPOINT).is_file() and record.path(rec.CONFIG).is_file():
        _check_resumable(record, config)
    known = set(_RECORD_FILES) | set(_RECORD_DIRS)
    if root.is_dir() and not record.path(rec.CONFIG).is_file() and any(
            not p.name.startswith(".") and not (config.overwrite and p.name in known) for p in root.iterdir()):
        raise RecordError(f"output folder {root} is not empty and is not a veil run; choose another --out")


def _check_resumable(record: rec.RunRecord, config: RunConfig) -> None:
    old = {k: v for k, v in _recorded_config(record).items() if k not in _RESUME_IGNORED}
    new = {k: v for k, v in json_roundtrip(config.to_dict()).items() if k not in _RESUME_IGNORED}
    if old != new:
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        raise RecordError(
            f"output folder {record.root} holds an unfinished run with a different configuration "
            f"({', '.join(diff)}); pass --overwrite to replace it"
        )


def _clear(record: rec.RunRecord) -> None:
    for name in _RECORD_FILES:
        record.path(name).unlink(missing_ok=True)
    for sub in _RECORD_DIRS:
        shutil.rmtree(record.path(sub), ignore_errors=True)


def _prepare_folder(config: RunConfig) -> rec.RunRecord:
    """The record this run writes (the folder is locked and was checked by :func:`_check_folder`).

    ``--overwrite`` of a folder that holds a run (finished or not) trains the new one in
    ``RUN/.overwrite/`` and replaces the old one only when the new one has finished
    (:func:`_promote`), so a failing or interrupted run loses nothing of the old one; an
    interrupted overwrite resumes there.
    """
    record = rec.RunRecord(config.out)
    if config.overwrite and record.path(rec.CONFIG).is_file():
        staging = rec.RunRecord(record.path(STAGING))
        if staging.path(rec.CHECKPOINT).is_file() and staging.path(rec.CONFIG).is_file():
            try:
                _check_resumable(staging, config)
                return staging
            except RecordError:
                pass
        shutil.rmtree(staging.root, ignore_errors=True)
        staging.root.mkdir()
        return staging
    if config.overwrite:
        _clear(record)  # leftovers of a run that never wrote its config
        shutil.rmtree(record.path(STAGING), ignore_errors=True)
    return record


def _promote(staging: rec.RunRecord, final: rec.RunRecord) -> None:
    """Replace the run in ``final`` by the one finished in ``staging``. A marker file makes it
    resumable: the old run is cleared once (metrics first), then the staged files are moved in
    (metrics last), so the folder reads as finished only when everything is in place; a command
    that finds the marker or a finished staged run completes the move (:func:`_complete_promotion`)."""
    marker = final.path(PROMOTING)
    if not marker.is_file():
        rec.atomic_write_bytes(marker, b"")
        _clear(final)
    for entry in sorted(staging.root.iterdir(), key=lambda p: p.name == rec.METRICS):
        os.replace(entry, final.path(entry.name))
    staging.root.rmdir()
    marker.unlink(missing_ok=True)


def _complete_promotion(final: rec.RunRecord) -> None:
    """Finish a replacement a killed command left half done (the folder is locked)."""
    staging = rec.RunRecord(final.path(STAGING))
    if staging.finished or (final.path(PROMOTING).is_file() and staging.root.is_dir()):
        log.warning("completing the replacement of the run in %s that an earlier command left unfinished", final.root)
        _promote(staging, final)


def _discard_failed(record: rec.RunRecord, created: bool) -> None:
    """After a run failed before training started (no checkpoint): remove what it wrote."""
    if record.path(rec.CHECKPOINT).is_file():
        return  # training started: keep it for resuming
    if record.root.name == STAGING:
        shutil.rmtree(record.root, ignore_errors=True)
    elif created:
        shutil.rmtree(record.root, ignore_errors=True)
    else:
        _clear(record)


def _recorded_config(record: rec.RunRecord) -> dict[str, Any]:
    """A run's recorded ``config.json`` (JSON values), a field added since it was recorded
    filled in with its default."""
    defaults = json_roundtrip(
        {f.name: f.default for f in dataclasses.fields(RunConfig) if f.default is not dataclasses.MISSING}
    )
    return {**defaults, **record.config()}


def json_roundtrip(obj: Any) -> Any:
    import json

    return json.loads(json.dumps(obj, default=str))


def _lpips_model(config: RunConfig, device: torch.device) -> tuple[torch.nn.Module | None, str | None]:
    from veil.metrics.lpips import _MIN_SIDE_ALEX, load_lpips

    if config.lpips_net == "alex" and config.image_size < _MIN_SIDE_ALEX:  # found after training, not before
        note = (f"LPIPS (alex) needs images of at least {_MIN_SIDE_ALEX}x{_MIN_SIDE_ALEX} pixels; this run's are "
                f"{config.image_size}x{config.image_size}")
        log.warning("LPIPS not computed: %s", note)
        return None, note
    try:
        return load_lpips(config.lpips_weights, device=device, download=config.download, net=config.lpips_net), None
    except (FileNotFoundError, OSError) as exc:  # OSError: a failed download
        log.warning("LPIPS not computed: %s", exc)
        return None, str(exc)


def measure_stealth(config: RunConfig, attack: Attack, test: ImageDataset) -> tuple[dict[str, Any], str | None, Tensor, Tensor, Tensor]:
    """The stealth metrics a run records: over a seeded random sample of ``config.stealth_samples``
    test images whose label differs from the target (as the attack would be used; the test set is
    sorted by class), clean against triggered (quantised to 8 bits). Also what re-measures a
    finished run with today's metrics (``scripts/measure_stealth.py``).

    Returns:
        ``(stealth, lpips_note, rows, clean_x, poison_x)``: the metrics (with ``lpips_net``), why
        LPIPS is missing (or ``None``), the test rows and the two image batches.
    """
    targets = attack.target_labels(test.labels)
    eligible = torch.nonzero(test.labels != targets).flatten()
    pick = torch.randperm(eligible.numel(), generator=torch.Generator().manual_seed(config.seed))
    rows = eligible[pick[: config.stealth_samples]]
    clean_x = to_float(test.images[rows])
    poison_x = attack.apply_quantized(clean_x, test.labels[rows]).cpu()
    lpips_model, lpips_note = _lpips_model(config, torch.device("cpu"))
    stealth = stealth_metrics(clean_x, poison_x, lpips_model=lpips_model)
    stealth["lpips_net"] = config.lpips_net if lpips_model is not None else None
    return stealth, lpips_note, rows, clean_x, poison_x


def run_experiment(config: RunConfig) -> dict[str, Any]:
    """Train and evaluate one run, writing its record into ``config.out``; returns the metrics.

    Resumes from ``config.out/checkpoint.pt`` when the folder holds an interrupted run with the same
    configuration; refuses a folder holding a finished run unless ``config.overwrite``.
    """
    t_start = time.perf_counter()
    config.validate()
    device = resolve_device(config.device)
    init = _init_source(config)
    _check_folder(config)
    # everything that can be checked is checked before the folder is touched
    t0 = time.perf_counter()
    train, test = load_run_data(config)
    data_seconds = time.perf_counter() - t0
    check_run_memory(config, train.num_classes, train.image_shape, device)
    attack = create_run_attack(config, train.num_classes, train.image_shape)
    final = rec.RunRecord(config.out)
    created = not final.root.exists()
    with rec.FolderLock(final.root, f"veil run ({config.attack})"):
        record: rec.RunRecord | None = None
        try:
            _complete_promotion(final)
            _check_folder(config)  # again, now that no other command can change it
            record = _prepare_folder(config)
            metrics = _run(config, record, device, init, train, test, attack, data_seconds, t_start)
        except BaseException:
            if record is not None:
                _discard_failed(record, created)
            elif created:
                shutil.rmtree(final.root, ignore_errors=True)
            raise
        if record.root != final.root:
            _promote(record, final)
            log.info("replaced the finished run in %s", final.root)
    return metrics


def _run(config: RunConfig, record: rec.RunRecord, device: torch.device, init: Any, train: ImageDataset,
         test: ImageDataset, attack: Attack, data_seconds: float, t_start: float) -> dict[str, Any]:
    """The run itself, written into ``record`` (locked and prepared by :func:`run_experiment`)."""
    record.write_json(rec.CONFIG, config.to_dict())
    record.write_json(rec.ENVIRONMENT, environment(device))
    notes = attack.training_notes(train, CROP_PADDING if config.base_augment else 0, train.hflip and config.base_augment)
    for note in notes:
        log.warning("%s", note)
    from_paper = {k: getattr(config, k) for k, v in config.sources.items() if v == "paper"}
    if from_paper:
        log.info("%s: the paper's training settings (override any with its flag): %s", config.attack,
                 ", ".join(f"{k}={v}" for k, v in from_paper.items()))
    torch.manual_seed(config.seed)
    model = create_model(config.model, num_classes=train.num_classes, image_size=config.image_size, width=config.width)

    t0 = time.perf_counter()
    attack.fit(train, device=device, victim={"model": config.model, "width": config.width})
    if init is not None:
        _init_from_run(init, model, attack)
    poisoned = attack.training_set(train)
    fit_seconds = time.perf_counter() - t0
    _write_attack_outputs(record, attack)
    record.write_json(
        rec.POISON_INDICES,
        {"poison": poisoned.poison_indices.tolist(), "extra": poisoned.extra_indices.tolist(), "train_size": len(train)},
    )

    amp = not attack.full_precision
    eval_test = eval_subset(config, train, test)  # what the evaluations during training read
    # the poisoned test set is fixed unless the attack controls training (then it changes by epoch)
    static_eval = attack.poison_test(eval_test) if attack.kind != "train" else None

    def evaluate(m: torch.nn.Module) -> dict[str, float]:
        pt = static_eval if static_eval is not None else attack.poison_test(eval_test)
        return {
            "clean_accuracy": accuracy(predict(m, eval_test.images, amp=amp), eval_test.labels),
            "attack_success_rate": _asr(m, pt, amp),
            "eval_images": len(eval_test),
        }

    train_cfg = config.train_config(amp=amp)
    hooks = [h for h in [attack.training_hook()] if h is not None]
    if config.augment:
        from veil.augment import build_augment_hook

        hooks.append(
            build_augment_hook(
                config.augment, train, device=device, record_dir=record.root, seed=config.seed, progress=config.progress
            )
        )
    trainer = Trainer(
        model,
        poisoned,
        train_cfg,
        hooks=hooks,
        evaluate=evaluate,
        checkpoint=record.path(rec.CHECKPOINT),
        device=device,
        progress=config.progress,
        eval_every=config.eval_every,
    )
    history = trainer.fit()
    train_seconds = sum(h["seconds"] for h in history)
    record.write_json(rec.HISTORY, history)

    # the whole test set, once (the last epoch's evaluation already read it when eval_images covers it)
    t0 = time.perf_counter()
    model.eval()
    if eval_test is test:
        poisoned_test = static_eval if static_eval is not None else attack.poison_test(test)
        clean_acc, asr = history[-1]["clean_accuracy"], history[-1]["attack_success_rate"]
    else:
        poisoned_test = attack.poison_test(test)
        with torch.no_grad():
            clean_acc = accuracy(predict(model, test.images, amp=amp), test.labels)
            asr = _asr(model, poisoned_test, amp)
    test_eval_seconds = time.perf_counter() - t0

    t0 = time.perf_counter()

    stealth, lpips_note, rows, clean_x, poison_x = measure_stealth(config, attack, test)
    attack_metrics = attack.evaluate(model, test)
    _write_attack_outputs(record, attack)
    eval_seconds = time.perf_counter() - t0

    # record the trigger, weights and a sample grid
    state = attack.state_dict()
    if state:
        record.save_tensors(rec.ATTACK, state)
    record.save_tensors(rec.MODEL, {k: v for k, v in model.state_dict().items()}, metadata={"model": config.model})
    k = min(8, rows.numel())
    from veil.report.images import sample_grid_png

    clean_u8 = test.images[rows[:k]]
    poison_u8 = (poison_x[:k] * 255).round().clamp(0, 255).to(torch.uint8)
    record.save_tensors(rec.SAMPLES, {"clean": clean_u8, "poisoned": poison_u8, "labels": test.labels[rows[:k]]})
    rec.atomic_write_bytes(record.path(rec.SAMPLES_PNG), sample_grid_png(clean_u8, poison_u8))

    metrics: dict[str, Any] = {
        "clean_accuracy": clean_acc,
        "attack_success_rate": asr,
        "poison_count": poisoned.poison_count,
        "extra_count": int(poisoned.extra_indices.numel()),
        "train_size": len(train),
        "test_size": len(test),
        "asr_test_size": len(poisoned_test),
        "eval_images_during_training": len(eval_test),
        "stealth": stealth,
        "stealth_samples": int(rows.numel()),
        **({"attack_metrics": attack_metrics} if attack_metrics else {}),
        "timings": {
            "data_seconds": data_seconds,
            "attack_fit_seconds": fit_seconds,
            "train_seconds": train_seconds,
            "train_images_per_second": config.epochs * len(train) / max(train_seconds, 1e-9),
            "eval_seconds_during_training": sum(h.get("eval_seconds", 0.0) for h in history),
            "test_eval_seconds": test_eval_seconds,
            "final_eval_seconds": eval_seconds,
            "total_seconds": time.perf_counter() - t_start,
        },
        "attack": attack.describe(),
        "notes": [*notes, *[n for n in [lpips_note and f"lpips not computed: {lpips_note}"] if n]],
    }
    record.write_json(rec.METRICS, metrics)
    record.path(rec.CHECKPOINT).unlink(missing_ok=True)
    log.info(
        "%s: clean accuracy %.4f, attack success rate %.4f -> %s", config.attack, clean_acc, asr, config.out
    )
    return metrics


#: fields a run started with ``init_from`` shares with the run it starts from
_INIT_MATCH = ("attack", "dataset", "model", "width", "image_size", "all_targets", "mode")


def _init_source(config: RunConfig) -> tuple[Path, dict[str, Any], dict[str, Any]] | None:
    """The finished run ``config.init_from`` names: its folder, classifier and attack weights.
    Checked and read before the output folder is touched, so a bad ``init_from`` loses nothing.

    Raises:
        RecordError: the folder holds no finished run, is this run's output folder, or holds
            a run of another attack, dataset or model.
        CheckpointError: its weights are missing, truncated or corrupted.
    """
    if not config.init_from:
        return None
    src = rec.RunRecord(config.init_from).require()
    if src.root.resolve() == Path(config.out).resolve():
        raise RecordError(f"init_from {src.root} is this run's own output folder")
    old = _recorded_config(src)
    new = json_roundtrip(config.to_dict())
    diff = [k for k in _INIT_MATCH if old.get(k) != new.get(k)]
    if diff:
        raise RecordError(
            f"init_from {src.root} is a different run ("
            + ", ".join(f"{k}: {old.get(k)!r} there, {new.get(k)!r} here" for k in diff)
            + ")"
        )
    attack_state = src.attack_state() if src.path(rec.ATTACK).is_file() else {}
    return src.root, src.model_state(), attack_state


def _init_from_run(
    source: tuple[Path, dict[str, Any], dict[str, Any]], model: torch.nn.Module, attack: Attack
) -> None:
    """Load :func:`_init_source`'s weights into ``model`` and ``attack``."""
    root, state, attack_state = source
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise RecordError(f"{root / rec.MODEL} does not fit this run's model ({exc})") from exc
    if attack_state:
        attack.load_state_dict(attack_state)
    log.info("initialised the classifier%s from %s", " and the attack" if attack_state else "", root)


def _write_attack_outputs(record: rec.RunRecord, attack: Attack) -> None:
    """The attack's figures and tables into ``RUN/figures`` and ``RUN/tables``."""
    for name, png in attack.figures().items():
        rec.atomic_write_bytes(record.path("figures") / name, png)
    for name, table in attack.tables().items():
        rec.atomic_write_json(record.path("tables") / f"{name}.json", table)


def _asr(model: torch.nn.Module, poisoned_test: ImageDataset, amp: bool = True) -> float:
    """Share of the attack-success-rate set (test images whose true label differs from their
    target, already poisoned and relabelled by :meth:`Attack.poison_test`) classified as the target."""
    if len(poisoned_test) == 0:
        return float("nan")
    return accuracy(predict(model, poisoned_test.images, amp=amp), poisoned_test.labels)
