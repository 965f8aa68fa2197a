"""Frequency-domain trigger detection, FTD (Zeng, Park, Mangal & Jia, "Rethinking the Backdoor
Attacks' Triggers: A Frequency Perspective", ICCV 2021; the multinomial paper's Table 4).

Triggers leave high-frequency artefacts. The defender trains a binary classifier on the
per-channel orthonormal 2-D DCT of images,

    X_c = C_H x_c C_W^T,   C[k, n] = sqrt(2 / N) cos(pi (2 n + 1) k / (2 N)),  C[0, n] = sqrt(1 / N),

with its own clean images (label 0) against copies of other clean images carrying synthetic
triggers it makes itself (label 1): no knowledge of the attack. The detection accuracy is measured
on the run's clean test images against its attack's triggered test images, balanced.

Readings (the official code, `YiZeng623/frequency-backdoor`, and `../shared/specs/defenses-
baselines.md`): six 3x3 convolutions 32-32-64-64-128-128, each with ELU and batch norm, max-pooling
and dropout 0.2 / 0.3 / 0.4 after each pair, a linear layer over 2 classes; Adadelta at 0.05 with
weight decay 1e-4, batch 64. The synthetic triggers are three families drawn per image with equal
chance, as the official generator's patch, blend and signal triggers: a random square patch (side
2 to H/8 + 2, anywhere, random binary colours), a uniform-noise image blended at alpha in
[0.05, 0.2], and a horizontal sinusoid of amplitude 10-30 grey levels (SIG-like). The DCT is of
images on [0, 1]. The verdict: ``detected`` when the balanced detection accuracy exceeds 0.75
(halfway between chance and perfect; the seed papers report the accuracy itself).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from veil.data.base import ImageDataset, to_float
from veil.defenses.base import DefenseConfig, DetectionResult, Detector, register_defense
from veil.defenses.common import auroc, check_positive, check_source, input_detection_sets, run_title
from veil.errors import ConfigError
from veil.inference import eval_mode
from veil.records import atomic_write_json

if TYPE_CHECKING:
    from veil.runs import LoadedRun

log = logging.getLogger(__name__)


def dct_matrix(n: int) -> Tensor:
    """The orthonormal DCT-II matrix ``(n, n)``: ``dct_matrix(n) @ dct_matrix(n).T == I``."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None, :]
    c = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    c[0] = math.sqrt(1.0 / n)
    return c.float()


def dct2(x: Tensor) -> Tensor:
    """Per-channel orthonormal 2-D DCT of images ``(B, C, H, W)`` (float; uint8 read as [0, 1])."""
    x = to_float(x) if x.dtype == torch.uint8 else x.float()
    ch, cw = dct_matrix(x.shape[-2]).to(x.device), dct_matrix(x.shape[-1]).to(x.device)
    return ch @ x @ cw.T


def synthetic_triggers(images: Tensor, generator: torch.Generator) -> Tensor:
    """The defender's own triggered copies of uint8 ``images`` ``(B, C, H, W)``: per image a random
    patch, a blended noise image or a sinusoid (see the module docstring), as uint8."""
    x = to_float(images).clone()
    b, c, h, w = x.shape
    family = torch.randint(0, 3, (b,), generator=generator)
    for i in range(b):
        if family[i] == 0:
            side = int(torch.randint(2, max(3, h // 8 + 3), (1,), generator=generator))
            side = min(side, h, w)
            top = int(torch.randint(0, h - side + 1, (1,), generator=generator))
            left = int(torch.randint(0, w - side + 1, (1,), generator=generator))
            x[i, :, top:top + side, left:left + side] = torch.randint(0, 2, (c, side, side), generator=generator).float()
        elif family[i] == 1:
            alpha = 0.05 + 0.15 * float(torch.rand(1, generator=generator))
            x[i] = (1 - alpha) * x[i] + alpha * torch.rand(c, h, w, generator=generator)
        else:
            amp = (10 + 20 * float(torch.rand(1, generator=generator))) / 255
            freq = 2 + 4 * float(torch.rand(1, generator=generator))
            wave = amp * torch.sin(2 * math.pi * torch.arange(w).float() * freq / w)
            x[i] = x[i] + wave.view(1, 1, w)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


class FrequencyDetector(nn.Module):
    """The official 6-convolution detector over DCT inputs ``(B, C, H, W)``: 2 logits."""

    def __init__(self, channels: int = 3, size: tuple[int, int] = (32, 32)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = channels
        for cout, drop in ((32, 0.2), (64, 0.3), (128, 0.4)):
            for _ in range(2):
                layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.ELU(), nn.BatchNorm2d(cout)]
                cin = cout
            layers += [nn.MaxPool2d(2), nn.Dropout(drop)]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(128 * (size[0] // 8) * (size[1] // 8), 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x).flatten(1))


@register_defense("ftd")
class FTD(Detector):
    """Frequency-domain trigger detection (Zeng et al., ICCV 2021): a DCT-input classifier trained
    on the defender's clean images against its own synthetic triggers.

    Options (``Config``):
        clean_images: the defender's clean images (5000), half kept clean, half given synthetic
            triggers; clean_source: ``"train"`` (default: the run's clean training split) or ``"test"``.
        epochs (10), batch_size (64), lr (0.05, Adadelta), weight_decay (1e-4).
        test_images: clean test images and triggered test images evaluated, each (1000).
        seed: seed of the subsets, the synthetic triggers and the training.

    Writes ``tables/ftd.json``. Result: ``score`` the balanced detection accuracy, ``metrics``
    ``accuracy``, ``tpr`` (triggered inputs flagged), ``fpr`` (clean inputs flagged), ``auroc``.
    """

    @dataclass(frozen=True)
    class Config(DefenseConfig):
        clean_images: int = 5000
        clean_source: str = "train"
        epochs: int = 10
        batch_size: int = 64
        lr: float = 0.05
        weight_decay: float = 1e-4
        test_images: int = 1000
        seed: int = 0

        def __post_init__(self) -> None:
            check_source(self.clean_source)
            for name in ("clean_images", "epochs", "batch_size", "test_images"):
                check_positive(getattr(self, name), name)
            if self.clean_images < 2:
                raise ConfigError("FTD clean_images must be at least 2 (half clean, half with synthetic triggers)")
            for name in ("lr", "weight_decay"):
                v = getattr(self, name)
                if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or (name == "lr" and v == 0):
                    raise ConfigError(f"FTD {name} must be a {'positive' if name == 'lr' else 'non-negative'} number, got {v!r}")

    config: Config

    def fit_detector(self, clean: ImageDataset) -> FrequencyDetector:
        """Train the detector on ``clean`` (half of it given synthetic triggers)."""
        cfg = self.config
        g = torch.Generator().manual_seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        order = torch.randperm(len(clean), generator=g)
        half = len(clean) // 2
        bad = synthetic_triggers(clean.images[order[half:]], g)
        images = torch.cat([clean.images[order[:half]], bad])
        labels = torch.cat([torch.zeros(half, dtype=torch.long), torch.ones(len(bad), dtype=torch.long)])
        x = dct2(images)
        _, c, h, w = x.shape
        if h < 8 or w < 8:
            raise ConfigError(f"FTD needs images of at least 8x8 pixels (three 2x poolings), got {h}x{w}")
        net = FrequencyDetector(c, (h, w))
        opt = torch.optim.Adadelta(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        net.train()
        for _ in tqdm(range(cfg.epochs), desc="ftd", unit="epoch", leave=False, disable=not self.progress or None):
            perm = torch.randperm(len(x), generator=g)
            for i in range(0, len(x), cfg.batch_size):
                idx = perm[i:i + cfg.batch_size]
                if idx.numel() < 2:
                    continue
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(net(x[idx]), labels[idx]).backward()
                opt.step()
        return net.eval()

    @staticmethod
    @torch.no_grad()
    def scores(net: nn.Module, images: Tensor, batch_size: int = 256) -> Tensor:
        """The detector's probability that each uint8 image carries a trigger."""
        with eval_mode(net):
            out = [F.softmax(net(dct2(images[i:i + batch_size])), 1)[:, 1] for i in range(0, len(images), batch_size)]
        return torch.cat(out) if out else torch.zeros(0)

    def run(self, loaded: LoadedRun, train: ImageDataset, test: ImageDataset, out_dir: Path) -> DetectionResult:
        cfg = self.config
        clean, clean_test, poisoned = input_detection_sets(loaded, train, test, cfg.clean_images, cfg.clean_source,
                                                           cfg.test_images, cfg.seed, self.name)
        log.info("ftd: detector on %d clean images (half with synthetic triggers), %d epochs", len(clean), cfg.epochs)
        net = self.fit_detector(clean)
        s_clean, s_bad = self.scores(net, clean_test.images), self.scores(net, poisoned.images)
        tpr = float((s_bad > 0.5).float().mean()) if s_bad.numel() else float("nan")
        fpr = float((s_clean > 0.5).float().mean()) if s_clean.numel() else float("nan")
        acc = (tpr + 1 - fpr) / 2
        area = auroc(s_bad, s_clean)
        log.info("ftd: detection accuracy %.4f (TPR %.4f, FPR %.4f), AUROC %.4f", acc, tpr, fpr, area)
        atomic_write_json(out_dir / "tables" / "ftd.json", {
            "title": f"FTD: {run_title(loaded)}",
            "columns": ["inputs", "count", "flagged %"],
            "rows": [["clean (test)", int(s_clean.numel()), round(100 * fpr, 2)],
                     ["triggered (test)", int(s_bad.numel()), round(100 * tpr, 2)]],
            "note": f"balanced detection accuracy {100 * acc:.2f} %, AUROC {area:.4f}; detector trained {cfg.epochs} epochs "
                    f"on {len(clean)} clean images, half with synthetic triggers",
        })
        return DetectionResult(
            defense=self.name, detected=bool(acc > 0.75), score=acc, threshold=0.75,
            metrics={"accuracy": acc, "tpr": tpr, "fpr": fpr, "auroc": area},
            extra={"clean_images": len(clean), "clean_test_inputs": int(s_clean.numel()),
                   "triggered_test_inputs": int(s_bad.numel()), "epochs": cfg.epochs},
        )
