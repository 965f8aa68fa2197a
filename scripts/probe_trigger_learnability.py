"""Can a victim learn a one-grey-level trigger at all, at this image size and training budget?

The multinomial attack (``veil.attacks.multinomial``) changes sub-pixels by exactly one grey level.
Before spending a long run on it, this probe answers two questions on real data:

1. **Flat sites** (``flat_sites``): per image, how many sub-pixels have all four neighbours within
   ``k`` grey levels of them. A +-1 change at such a site stands out of its neighbourhood; at a
   noisy site it is buried in the image's own variation.
2. **Learnability** (``probe``): the victim is trained on clean images plus copies carrying a
   *fixed*, deterministic +-1 pattern (the easiest case for the victim: no sampling noise, no
   generator to follow) relabelled to the target, and the attack success rate on the test set is
   reported next to ``clean_target_rate``, the share of the same test images classified as the
   target without the pattern. An attack success rate at ``clean_target_rate`` means the pattern
   was not learned; the copies then act as label noise.

Writes one JSON file (``--out``). Example (2 cores, about 20 s per epoch)::

    python scripts/probe_trigger_learnability.py --data-root ../shared/datasets \\
        --init runs/clean-gtsrb-preact16-nocrop/model.safetensors --density 0.5 --epochs 8 \\
        --optimizer adam --lr 1e-3 --out probe.json
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from veil.data import load_dataset, stratified_subset
from veil.data.base import to_float
from veil.models import create_model
from veil.records import atomic_write_json

log = logging.getLogger("probe")


def flat_sites(images: torch.Tensor, ks: tuple[int, ...] = (0, 1, 2)) -> dict[str, list[float]]:
    """Per image, the count of interior sub-pixels whose four neighbours are all within ``k``
    grey levels; returns the 5/25/50 % quantiles over the images for each ``k``."""
    x = images.int()
    c = x[:, :, 1:-1, 1:-1]
    nb = torch.stack((x[:, :, :-2, 1:-1], x[:, :, 2:, 1:-1], x[:, :, 1:-1, :-2], x[:, :, 1:-1, 2:]))
    d = (nb - c).abs().amax(0).flatten(1)
    q = torch.tensor([0.05, 0.25, 0.5])
    return {
        f"within_{k}": (d <= k).sum(1).float().quantile(q).tolist() for k in ks
    } | {"sites_per_image": int(d.shape[1])}


def fixed_pattern(shape: tuple[int, int, int], density: float, signs: str, seed: int) -> torch.Tensor:
    """A deterministic pattern in {-1, 0, 1}: ``density`` of the sub-pixels, signs alternating
    like a checkerboard (``checker``), all +1 (``plus``) or random (``random``)."""
    g = torch.Generator().manual_seed(seed)
    c, h, w = shape
    mask = (torch.rand(shape, generator=g) < density).float()
    if signs == "checker":
        i, j = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        s = (((i + j) % 2) * 2 - 1).float().expand(c, h, w)
    elif signs == "plus":
        s = torch.ones(shape)
    else:
        s = (torch.rand(shape, generator=g) < 0.5).float() * 2 - 1
    return mask * s


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", required=True)
    p.add_argument("--dataset", default="gtsrb")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--train-subset", type=int, default=8000)
    p.add_argument("--test-subset", type=int, default=1500)
    p.add_argument("--model", default="preact_resnet18")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--init", help="safetensors weights to start from (default: from scratch)")
    p.add_argument("--density", type=float, default=0.02, help="share of sub-pixels changed")
    p.add_argument("--signs", choices=("checker", "plus", "random"), default="checker")
    p.add_argument("--copies", type=float, default=0.3, help="triggered copies per batch row")
    p.add_argument("--target", type=int, default=0)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    train = load_dataset(a.dataset, a.data_root, "train", image_size=a.image_size)
    test = load_dataset(a.dataset, a.data_root, "test", image_size=a.image_size)
    train = stratified_subset(train, min(a.train_subset, len(train)), seed=a.seed)
    test = stratified_subset(test, min(a.test_subset, len(test)), seed=a.seed)
    pattern = fixed_pattern(train.image_shape, a.density, a.signs, a.seed + 1)
    model = create_model(a.model, num_classes=train.num_classes, width=a.width, seed=a.seed)
    if a.init:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(a.init))
    opt = (
        torch.optim.Adam(model.parameters(), lr=a.lr)
        if a.optimizer == "adam"
        else torch.optim.SGD(model.parameters(), lr=a.lr, momentum=0.9, weight_decay=5e-4)
    )

    def triggered(u8: torch.Tensor) -> torch.Tensor:
        return (to_float(u8) + pattern / 255.0).clamp(0, 1)

    keep = test.labels != a.target

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        model.eval()
        xs = to_float(test.images)
        out = {
            "clean_accuracy": float((model(xs).argmax(1) == test.labels).float().mean()),
            "attack_success_rate": float(
                (model(triggered(test.images[keep])).argmax(1) == a.target).float().mean()
            ),
            "clean_target_rate": float((model(xs[keep]).argmax(1) == a.target).float().mean()),
        }
        model.train()
        return out

    history = [{"epoch": 0, **evaluate()}]
    log.info("%s", history[-1])
    for epoch in range(1, a.epochs + 1):
        t0 = time.perf_counter()
        order = torch.randperm(len(train))
        for i in range(0, len(train), a.batch_size):
            b = order[i : i + a.batch_size]
            k = max(1, round(b.numel() * a.copies))
            x = torch.cat((to_float(train.images[b]), triggered(train.images[b[:k]])))
            y = torch.cat((train.labels[b], torch.full((k,), a.target, dtype=torch.long)))
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        history.append({"epoch": epoch, "seconds": time.perf_counter() - t0, **evaluate()})
        log.info("%s", history[-1])
    result = {
        "args": vars(a),
        "changed_subpixels": int(pattern.abs().sum()),
        "flat_sites": flat_sites(train.images[:2000]),
        "history": history,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(Path(a.out), result)


if __name__ == "__main__":
    main()
