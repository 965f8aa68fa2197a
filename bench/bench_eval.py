"""What the evaluation during training costs: the BadNets foundation run with veil 0.1's evaluation
(the whole test set after every epoch, ``eval_images=all``) and with the default (``auto``: a seeded
stratified subset of 3 % of the training set's size), side by side.

Both runs train the same model on the same data with the same seed; evaluation does not touch
training, so their final clean accuracy and attack success rate (always on the whole test set) must
agree, and the JSON says whether they do. For each it records the training time, the time spent
evaluating during training and its share of the training time, the time of the final whole-test
evaluation, and the per-epoch curves.

    python bench/bench_eval.py --data-root ../shared/datasets --out bench/results_eval.json

``--set KEY=VALUE`` (repeatable) overrides a ``veil run`` option of both runs (e.g. ``--set
epochs=1 --set train_subset=2000`` for a quick check); ``--runs DIR`` is where the two run folders
go (finished runs there are read back, not retrained).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from pathlib import Path
from typing import Any

import torch

from veil import records as rec
from veil.experiment import environment, run_experiment, seed_everything
from veil.options import parse_option
from veil.runs import RunConfig
from veil.train import resolve_device

REPO = Path(__file__).resolve().parents[1]
#: the foundation command: full GTSRB, PreActResNet-18 width 16, 4 epochs, BadNets defaults
FOUNDATION = dict(attack="badnets", dataset="gtsrb", model="preact_resnet18", width=16, epochs=4, poison_rate=0.1,
                  target=0, seed=0)
MODES = {"veil-0.1 (all, every epoch)": "all", "default (auto)": "auto"}


def _parse_set(items: list[str]) -> dict[str, Any]:
    try:
        return dict(parse_option(item, "--set") for item in items)
    except argparse.ArgumentTypeError as exc:
        raise SystemExit(f"bench_eval: {exc}") from None


def _row(name: str, mode: str, metrics: dict[str, Any], history: list[dict[str, Any]], env: dict[str, Any]) -> dict[str, Any]:
    t = metrics["timings"]
    during = t.get("eval_seconds_during_training", sum(h.get("eval_seconds", 0.0) for h in history))
    return {
        "name": name,
        "eval_images": mode,
        "eval_images_during_training": metrics.get("eval_images_during_training", metrics["test_size"]),
        "test_size": metrics["test_size"],
        "clean_accuracy": metrics["clean_accuracy"],
        "attack_success_rate": metrics["attack_success_rate"],
        "train_seconds": t["train_seconds"],
        "eval_seconds_during_training": during,
        "eval_share_of_training": during / max(t["train_seconds"], 1e-9),
        "test_eval_seconds": t.get("test_eval_seconds"),
        "curve": [
            {k: h[k] for k in ("epoch", "clean_accuracy", "attack_success_rate", "eval_seconds", "seconds") if k in h}
            for h in history
        ],
        "git_sha": env.get("git_sha"),
        "git_dirty": env.get("git_dirty"),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-root", default=os.path.join(os.environ.get("VEIL_SHARED", str(REPO.parent / "shared")), "datasets"),
                    help="the folder holding gtsrb/ (default $VEIL_SHARED/datasets)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results_eval.json"))
    ap.add_argument("--runs", default=str(REPO / "runs" / "bench-eval"), help="folder for the two run folders")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a veil run option")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    overrides = _parse_set(args.set)
    unknown = sorted(set(overrides) - {f for f in RunConfig.__dataclass_fields__})
    if unknown or "eval_images" in overrides:
        raise SystemExit(f"bench_eval: cannot set {', '.join(unknown or ['eval_images'])}")
    runs = Path(args.runs) / (",".join(f"{k}={v}" for k, v in sorted(overrides.items())) or "foundation")
    rows = []
    for name, mode in MODES.items():
        config = RunConfig(**{**FOUNDATION, **overrides}, data_root=args.data_root, device=args.device,
                           eval_images=mode, out=str(runs / mode), progress=False)
        record = rec.RunRecord(config.out)
        if not record.finished:
            seed_everything(config.seed)
            run_experiment(config)
        rows.append(_row(name, mode, record.metrics(), record.history(), record.environment()))
    old, new = rows
    result = {
        "bench": "bench_eval",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python bench/bench_eval.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "run": {**FOUNDATION, **overrides},
        "environment": environment(resolve_device(args.device)),
        "torch_threads": torch.get_num_threads(),
        "runs": rows,
        "same_final_figures": (old["clean_accuracy"], old["attack_success_rate"])
        == (new["clean_accuracy"], new["attack_success_rate"]),
        "eval_seconds_saved_during_training": old["eval_seconds_during_training"] - new["eval_seconds_during_training"],
    }
    rec.atomic_write_json(Path(args.out), result)
    for r in rows:
        print(f"{r['name']}: clean acc {r['clean_accuracy']:.4f}  ASR {r['attack_success_rate']:.4f}  train {r['train_seconds']:.0f}s  "
              f"eval during training {r['eval_seconds_during_training']:.1f}s ({r['eval_share_of_training']:.1%})  "
              f"final test eval {r['test_eval_seconds'] or 0:.1f}s")
    print(f"same final figures: {result['same_final_figures']}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
