"""The baseline attacks with default options on GTSRB and on the CIFAR-10 subset, at one budget.

Runs the points of ``examples/sweeps/baselines_gtsrb_cifar10subset.yaml`` through ``veil sweep``'s
runner (a finished point is read back, not retrained; an interrupted one resumes) and writes one
JSON record: for every attack and dataset the clean accuracy, the attack success rate, the clean
accuracy lost against the clean reference (``none``) of the same dataset and sweep, the training
time and throughput, the attack's augmentation notes, and the veil version and git commit each
point was trained with. The budget (optimiser steps and images seen) is recorded per dataset.

    python bench/bench_baselines.py --datasets ../shared/datasets --out bench/results_baselines.json

``--datasets DIR`` points both datasets at one folder holding ``gtsrb/`` and ``cifar10-subset/``;
``--attacks`` takes a comma-separated subset of the file's attacks; ``--set KEY=VALUE`` (repeatable)
overrides a ``veil run`` option in every point, e.g. ``--set epochs=1 --set train_subset=500`` for
a quick check (the overrides are recorded, and the points then go in their own folder).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

from veil import records as rec
from veil.errors import VeilError
from veil.experiment import environment
from veil.sweep import parse_sweep
from veil.sweep_exec import run_sweep
from veil.train import resolve_device

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SWEEP = REPO / "examples" / "sweeps" / "baselines_gtsrb_cifar10subset.yaml"
#: where each dataset of the sweep lives under ``--datasets DIR``
DATASET_FOLDERS = {"gtsrb": "", "imagefolder": "cifar10-subset"}


def _parse_set(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"bench_baselines: --set takes KEY=VALUE, got {item!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


def build_spec(path: Path, datasets: str | None, attacks: list[str] | None, overrides: dict[str, Any],
               runs_dir: str | None) -> dict[str, Any]:
    """The sweep file's mapping with the command line's changes applied."""
    spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    if attacks is not None:
        unknown = sorted(set(attacks) - set(spec["grid"]["attack"]))
        if unknown:
            raise SystemExit(f"bench_baselines: the sweep has no attack {', '.join(unknown)}; it has {', '.join(spec['grid']['attack'])}")
        spec["grid"]["attack"] = [a for a in spec["grid"]["attack"] if a in attacks]
    for entry in spec.get("runs", []):
        if datasets is not None:
            if entry["dataset"] not in DATASET_FOLDERS:
                raise SystemExit(f"bench_baselines: no folder known for dataset {entry['dataset']!r} under --datasets")
            entry["data_root"] = str(Path(datasets).resolve() / DATASET_FOLDERS[entry["dataset"]])
        for key in overrides:
            entry.pop(key, None)
    spec["base"] = {**spec.get("base", {}), **overrides}
    if runs_dir is not None:
        spec["out"] = str(Path(runs_dir).resolve())
    elif overrides:
        spec["out"] = spec["out"].rstrip("/") + "-" + ",".join(f"{k}={v}" for k, v in sorted(overrides.items()))
    return spec


def _point(p: Any, references: dict[str, float]) -> dict[str, Any]:
    c = p.config
    row: dict[str, Any] = {"attack": c.attack, "dataset": c.dataset, "data_root": c.data_root, "point": p.name,
                           "status": p.status}
    if p.metrics is None:
        return {**row, "error": p.error}
    m = p.metrics
    ref = references.get(c.data_root or "")
    env: dict[str, Any] = {}
    try:
        env = rec.RunRecord(c.out).environment()
    except VeilError:
        pass
    steps = math.ceil(m["train_size"] / c.batch_size) * c.epochs
    return {
        **row,
        "clean_accuracy": m["clean_accuracy"],
        "attack_success_rate": m["attack_success_rate"],
        "clean_reference_accuracy": ref,
        "clean_accuracy_drop": None if ref is None or c.attack == "none" else ref - m["clean_accuracy"],
        "poison_count": m["poison_count"],
        "epochs": c.epochs,
        "train_size": m["train_size"],
        "optimizer_steps": steps,
        "images_seen": c.epochs * m["train_size"],
        "train_seconds": m["timings"]["train_seconds"],
        "train_images_per_second": m["timings"]["train_images_per_second"],
        "total_seconds": m["timings"]["total_seconds"],
        "psnr": m.get("stealth", {}).get("psnr"),
        "notes": [n for n in m.get("notes", []) if not n.startswith("lpips")],
        "veil_version": env.get("veil_version"),
        "git_sha": env.get("git_sha"),
        "git_dirty": env.get("git_dirty"),
        "threads": env.get("threads"),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sweep", default=str(DEFAULT_SWEEP), help="the sweep file (default: the baselines table)")
    ap.add_argument("--datasets", default=None, help="folder holding gtsrb/ and cifar10-subset/ (default: the file's)")
    ap.add_argument("--attacks", default=None, help="comma-separated subset of the file's attacks")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a veil run option in every point")
    ap.add_argument("--runs", default=None, help="folder for the run folders (default: the file's out)")
    ap.add_argument("--device", default=None, help="auto, cpu or cuda (default: the file's)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: min(2, cores))")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--out", default="bench/results_baselines.json")
    args = ap.parse_args(argv)
    attacks = [a.strip() for a in args.attacks.split(",") if a.strip()] if args.attacks else None
    overrides = _parse_set(args.set)
    torch.set_num_threads(args.threads or min(2, os.cpu_count() or 1))
    path = Path(args.sweep)
    spec = build_spec(path, args.datasets, attacks, overrides, args.runs)
    try:
        sweep = parse_sweep(spec, base_dir=path.resolve().parent, source=path)
        result = run_sweep(sweep, device=args.device, progress=not args.no_progress, keep_going=True)
    except VeilError as exc:
        print(f"bench_baselines: error: {exc}", file=sys.stderr)
        return 2
    references = {p.config.data_root or "": p.metrics["clean_accuracy"]
                  for p in result.points if p.config.attack == "none" and p.metrics}
    record = {
        "benchmark": "baselines",
        "sweep": sweep.name,
        "source": str(path),
        "overrides": overrides,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "results": [_point(p, references) for p in result.points],
        "environment": environment(resolve_device(args.device or "auto")),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    rec.atomic_write_json(args.out, record)
    print(json.dumps({r["point"]: {k: r.get(k) for k in ("clean_accuracy", "attack_success_rate", "status")}
                      for r in record["results"]}, indent=2))
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
