"""Training-step speed of veil's trainer in the contiguous and the channels-last layout (the first is
the baseline, measured in the same run), written as JSON.

Cases (each timed in the contiguous (NCHW) and the channels-last (NHWC) layout):

* ``classifier``: plain training steps of a registered classifier (``--model``, ``--width``,
  ``--image-size``, ``--batch-size``);
* ``multinomial``: the multinomial attack's co-training step, which adds a malicious copy of
  every row (so twice the images through the classifier) and trains the U-Net generator through
  SampleNet (generator width ``--generator-width``).

Each case runs ``--warmup`` untimed steps then ``--steps`` timed ones (the median step is
reported) on random uint8 images: speed does not depend on the pixels. Peak resident memory of the
process is reported at the end (``ru_maxrss``; it covers every case run before it).

    python bench/bench_layout.py --threads 2 --out bench/results_layout.json

Measured with 2 threads on the 2-core development machine (``bench/results_layout.json``, 20
timed steps): the PreAct-ResNet-18 step (width 16, 32x32, batch 64) took 0.108 s contiguous and
0.087 s channels-last (1.25 times as fast); the multinomial co-training step (batch 64 + 64
copies, generator width 8) 0.326 s and 0.269 s (1.21 times), since the generator and SampleNet
keep their layout.
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

from veil.attacks import create_attack
from veil.data.base import ImageDataset
from veil.models import create_model
from veil.records import atomic_write_json
from veil.train import Batch, StepContext, TrainConfig, Trainer, TrainHook


class _StepTimer(TrainHook):
    """Stamps the end of every step; the trainer's own loop does the work being timed."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def after_step(self, ctx: StepContext, batch: Batch) -> None:
        self.stamps.append(time.perf_counter())


def _data(n: int, size: int, num_classes: int, seed: int = 0) -> ImageDataset:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    labels = torch.arange(n) % num_classes
    return ImageDataset(images, labels, [str(i) for i in range(num_classes)], "random", hflip=False)


def time_case(case: str, channels_last: bool, args: argparse.Namespace) -> dict[str, float]:
    steps = args.warmup + args.steps
    num_classes = 43
    ds = _data(steps * args.batch_size, args.image_size, num_classes)
    model = create_model(args.model, num_classes, image_size=args.image_size, width=args.width, seed=0)
    cfg = TrainConfig(
        epochs=1,
        batch_size=args.batch_size,
        lr=1e-3,
        optimizer="adam",
        weight_decay=0.0,
        schedule="constant",
        augment=False,
        checkpoint_every=0,
        channels_last=channels_last,
    )
    timer = _StepTimer()
    hooks: list[TrainHook] = []
    train = ds
    if case == "multinomial":
        attack = create_attack(
            "multinomial", num_classes, (3, args.image_size, args.image_size),
            target=0, poison_rate=1.0, width=args.generator_width,
        )
        attack.fit(ds)
        train = attack.training_set(ds)
        hook = attack.training_hook()
        assert hook is not None
        hooks.append(hook)
    trainer = Trainer(model, train, cfg, hooks=[*hooks, timer], device="cpu", progress=False)
    start = time.perf_counter()
    trainer.fit()
    stamps = [start, *timer.stamps]
    durations = [b - a for a, b in itertools.pairwise(stamps)][args.warmup :]
    median = statistics.median(durations)
    images = args.batch_size * (2 if case == "multinomial" else 1)
    return {
        "median_step_seconds": median,
        "min_step_seconds": min(durations),
        "classifier_images_per_second": images / median,
        "rows_per_second": args.batch_size / median,
        "timed_steps": len(durations),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="preact_resnet18")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=64, help="rows per step (the multinomial case adds as many copies)")
    p.add_argument("--generator-width", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3, help="untimed first steps (at least 1)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cases", default="classifier,multinomial")
    p.add_argument("--out", type=Path, default=Path("bench/results_layout.json"))
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 1:
        p.error("--steps and --warmup must be at least 1 (the first step also times the hooks' setup)")
    cases = [c for c in args.cases.split(",") if c]
    unknown = sorted(set(cases) - {"classifier", "multinomial"})
    if unknown:
        p.error(f"unknown case(s) {', '.join(unknown)}; known: classifier, multinomial")
    torch.set_num_threads(args.threads)
    results: dict[str, dict[str, object]] = {}
    for case in cases:
        base = time_case(case, False, args)
        fast = time_case(case, True, args)
        results[case] = {
            "contiguous": base,
            "channels_last": fast,
            "channels_last_speedup": base["median_step_seconds"] / fast["median_step_seconds"],
        }
        print(f"{case}: {results[case]['channels_last_speedup']:.2f}x "
              f"({base['median_step_seconds']:.3f} s -> {fast['median_step_seconds']:.3f} s per step)")
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    record = {
        "benchmark": "train_layout",
        "arguments": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "results": results,
        "peak_rss_mib": peak_kib / 1024,
        "environment": {
            "torch": torch.__version__,
            "python": sys.version.split()[0],
            "machine": platform.machine(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, record)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
