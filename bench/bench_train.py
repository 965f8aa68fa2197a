"""Training-throughput benchmark: veil's tensor-batched loop against a per-sample PIL DataLoader.

Measures, in one run, on the same model, batch size and data:

* ``veil_images_per_second``: :class:`veil.train.Trainer` (uint8 data on the device, batched crop
  augmentation as tensor ops);
* ``dataloader_images_per_second``: a ``torch.utils.data.DataLoader`` over a dataset that returns
  PIL images through torchvision's per-sample transforms (``RandomCrop(32, padding=4)``,
  ``ToTensor``), the way BackdoorBench and BackdoorBox feed data;
* ``speedup``: the ratio of the two;
* ``outside_forward_backward_share``: the share of a veil training step spent outside the model's
  forward and backward passes (batch gathering, augmentation, optimiser step).

Writes JSON (to ``--out`` and stdout)::

    python bench/bench_train.py --data-root ../shared/datasets --out bench/results.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

import veil
from veil.data import BatchAugment, load_dataset, to_float
from veil.models import create_model
from veil.records import atomic_write_json
from veil.train import TrainConfig, Trainer


class PILDataset(Dataset):
    """Per-sample PIL pipeline (decode to PIL, random crop, to tensor) as the toolkits do it."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        from torchvision import transforms

        self.pils = [Image.fromarray(img.permute(1, 2, 0).numpy()) for img in images]
        self.labels = labels.tolist()
        self.tf = transforms.Compose([transforms.RandomCrop(images.shape[-1], padding=4), transforms.ToTensor()])

    def __len__(self) -> int:
        return len(self.pils)

    def __getitem__(self, i: int):  # type: ignore[no-untyped-def]
        return self.tf(self.pils[i]), self.labels[i]


def bench_dataloader(model, data, batch_size: int, steps: int, workers: int) -> float:
    ds = PILDataset(data.images[: batch_size * (steps + 3)], data.labels[: batch_size * (steps + 3)])
    loader = DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=True,
                        persistent_workers=workers > 0)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    model.train()
    it = iter(loader)
    for _ in range(3):  # warm-up
        x, y = next(it)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    t0 = time.perf_counter()
    n = 0
    for x, y in it:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        n += x.shape[0]
    return n / (time.perf_counter() - t0)


def bench_veil(model, data, batch_size: int, steps: int) -> float:
    sub = data.subset(torch.arange(batch_size * (steps + 3)))
    trainer = Trainer(model, sub, TrainConfig(epochs=1, batch_size=batch_size, checkpoint_every=0), device="cpu", progress=False)
    # warm-up steps are timed separately by running one short epoch first
    warm = data.subset(torch.arange(batch_size * 3))
    Trainer(model, warm, TrainConfig(epochs=1, batch_size=batch_size, checkpoint_every=0), device="cpu", progress=False).fit()
    t0 = time.perf_counter()
    trainer.fit()
    return len(sub) / (time.perf_counter() - t0)


def step_breakdown(model, data, batch_size: int, steps: int) -> dict[str, float]:
    """Time each phase of the veil step (same operations as Trainer._step)."""
    model = model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    aug = BatchAugment(4, hflip=False)
    g = torch.Generator().manual_seed(0)
    images, labels = data.images, data.labels
    t = {"data": 0.0, "forward": 0.0, "backward": 0.0, "optimizer": 0.0}
    for s in range(steps + 3):
        t0 = time.perf_counter()
        idx = torch.randint(0, len(images), (batch_size,), generator=g)
        x = aug(to_float(images[idx]), g)
        y = labels[idx]
        t1 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        t2 = time.perf_counter()
        loss.backward()
        t3 = time.perf_counter()
        opt.step()
        t4 = time.perf_counter()
        if s >= 3:
            t["data"] += t1 - t0
            t["forward"] += t2 - t1
            t["backward"] += t3 - t2
            t["optimizer"] += t4 - t3
    total = sum(t.values())
    return {f"{k}_seconds_per_step": v / steps for k, v in t.items()} | {
        "outside_forward_backward_share": (t["data"] + t["optimizer"]) / total
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", default=None, help="GTSRB folder; the bundled sample when omitted")
    ap.add_argument("--model", default="preact_resnet18")
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers for the baseline")
    ap.add_argument("--out", default="bench/results.json")
    args = ap.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1)) if os.environ.get("VEIL_BENCH_THREADS") is None else torch.set_num_threads(int(os.environ["VEIL_BENCH_THREADS"]))
    data = load_dataset("gtsrb", args.data_root, "train") if args.data_root else load_dataset("gtsrb_sample", split="train")
    data = data.subset(torch.randperm(len(data), generator=torch.Generator().manual_seed(0)))

    def fresh():  # type: ignore[no-untyped-def]
        return create_model(args.model, num_classes=data.num_classes, width=args.width, seed=0)

    veil_ips = bench_veil(fresh(), data, args.batch_size, args.steps)
    loader_ips = bench_dataloader(fresh(), data, args.batch_size, args.steps, args.workers)
    loader0_ips = bench_dataloader(fresh(), data, args.batch_size, args.steps, 0)
    breakdown = step_breakdown(fresh(), data, args.batch_size, args.steps)
    result = {
        "benchmark": "train_throughput",
        "model": args.model,
        "width": args.width,
        "batch_size": args.batch_size,
        "image_size": data.image_shape[-1],
        "steps": args.steps,
        "veil_images_per_second": veil_ips,
        "dataloader_images_per_second": loader_ips,
        "dataloader_workers": args.workers,
        "dataloader_0_workers_images_per_second": loader0_ips,
        "speedup": veil_ips / loader_ips,
        "speedup_vs_0_workers": veil_ips / loader0_ips,
        **breakdown,
        "environment": {
            "veil_version": veil.__version__,
            "torch_version": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
        },
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
