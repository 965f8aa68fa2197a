"""Frequency-domain trigger detection, FTD (Zeng, Park, Mangal & Jia, "Rethinking the Backdoor
Attacks' Triggers: A Frequency Perspective", ICCV 2021; the multinomial paper's Table 4).

Triggers leave high-frequency artefacts. The defender trains a binary classifier on the
per-channel orthonormal 2-D DCT of images,

    X_c = C_H x_c C_W^T,   C[k, n] = sqrt(2 / N) cos(pi (2 n + 1) k / (2 N)),  C[0, n] = sqrt(1 / N),

with its own clean images (label 0) against copies of other clean images carrying synthetic
triggers it makes itself (label 1): no knowledge of the attack. The detection accuracy is measured
on the run's clean test images against its attack's triggered test images, balanced.

Readings (the official code, `YiZeng623/frequency-backdoor`'s `Train_Detection.ipynb`, and the
shared spec defenses-baselines.md): six 3x3 convolutions 32-32-64-64-128-128, each with ELU
and batch norm, max-pooling and dropout 0.2 / 0.3 / 0.4 after each pair, a linear layer over 2
classes; Adadelta at 0.05 with weight decay 1e-4, batch 64. The DCT is of the uint8 values
(0-255), as the official code's. Every clean image is paired with a triggered copy of itself, and
the copies are drawn afresh for each round of ``epochs`` epochs (the official code: 5 rounds of 10
epochs over CIFAR-10's 50,000 images). The synthetic triggers are the official generator's five
families, one per image with equal chance, sizes for 32x32 (scaled with the image): a white or a
uniform-random block of 2-7 x 2-7 pixels at one of the four corners with a margin of 0-5; Gaussian
noise of mean 25 and variance 10-70 grey levels; a random shadow (a pentagon in the lower half at
half brightness, albumentations' RandomShadow); another clean image added at 0.3. The verdict:
``detected`` when the balanced detection accuracy exceeds 0.75 (halfway between chance and
perfect; the seed papers report the accuracy itself). The detector depends on the defender's clean
images and its options only, never on the suspect: with ``detector_dir`` it is stored there
(safetensors, named by a digest of both) and reused for every run on the same data.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
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
    """Per-channel orthonormal 2-D DCT of images ``(B, C, H, W)``, of their values as given (uint8
    images: of the 0-255 values, as the official code)."""
    x = x.float()
    ch, cw = dct_matrix(x.shape[-2]).to(x.device), dct_matrix(x.shape[-1]).to(x.device)
    return ch @ x @ cw.T


def _polygon_mask(h: int, w: int, generator: torch.Generator, vertices: int = 5) -> Tensor:
    """A random simple polygon in the lower half of an ``h x w`` image (vertices sorted by angle
    around their centroid), as a boolean mask."""
    ys = h / 2 + torch.rand(vertices, generator=generator) * (h / 2)
    xs = torch.rand(vertices, generator=generator) * w
    order = torch.atan2(ys - ys.mean(), xs - xs.mean()).argsort()
    ys, xs = ys[order], xs[order]
    py, px = torch.meshgrid(torch.arange(h).float() + 0.5, torch.arange(w).float() + 0.5, indexing="ij")
    inside = torch.zeros(h, w, dtype=torch.bool)
    for k in range(vertices):  # even-odd rule
        y0, x0, y1, x1 = ys[k], xs[k], ys[(k + 1) % vertices], xs[(k + 1) % vertices]
        crosses = (y0 > py) != (y1 > py)
        at = x0 + (py - y0) * (x1 - x0) / (y1 - y0 + 1e-12)
        inside ^= crosses & (px < at)
    return inside


def synthetic_triggers(images: Tensor, generator: torch.Generator) -> Tensor:
    """The defender's own triggered copies of uint8 ``images`` ``(B, C, H, W)``: per image one of the
    official generator's five families (see the module docstring), as uint8."""
    x = to_float(images).clone()
    b, c, h, w = x.shape
    scale_h, scale_w = h / 32, w / 32
    family = torch.randint(0, 5, (b,), generator=generator)
    for i in range(b):
        f = int(family[i])
        if f in (0, 1):  # a white or a random block at a corner
            ph = max(1, round(int(torch.randint(2, 8, (1,), generator=generator)) * scale_h))
            pw = max(1, round(int(torch.randint(2, 8, (1,), generator=generator)) * scale_w))
            margin = int(torch.randint(0, 6, (1,), generator=generator))
            corner = int(torch.randint(0, 4, (1,), generator=generator))
            my, mx = min(round(margin * scale_h), h - ph), min(round(margin * scale_w), w - pw)
            top = my if corner in (0, 1) else h - my - ph
            left = mx if corner in (0, 2) else w - mx - pw
            block = torch.ones(c, ph, pw) if f == 0 else torch.rand(c, ph, pw, generator=generator)
            x[i, :, top:top + ph, left:left + pw] = block
        elif f == 2:  # Gaussian noise, mean 25, variance 10-70 (grey levels)
            var = 10 + 60 * float(torch.rand(1, generator=generator))
            x[i] = x[i] + (25 + var ** 0.5 * torch.randn(c, h, w, generator=generator)) / 255
        elif f == 3:  # a random shadow
            x[i] = torch.where(_polygon_mask(h, w, generator), x[i] * 0.5, x[i])
        else:  # another clean image added at 0.3
            other = int(torch.randint(0, b, (1,), generator=generator))
            x[i] = x[i] + 0.3 * to_float(images[other])
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
        clean_images: the defender's clean images (5000), each also given a synthetic trigger;
            clean_source: ``"train"`` (default: the run's clean training split) or ``"test"``.
        rounds (5): fresh synthetic triggers per round; epochs (10) per round; batch_size (64),
            lr (0.05, Adadelta), weight_decay (1e-4): the official code's.
        test_images: clean test images and triggered test images evaluated, each (1000).
        seed: seed of the subsets, the synthetic triggers and the training.
        detector_dir: where trained detectors are kept and reused (default: not kept); a detector
            is reused only for the same clean images and options.

    Writes ``tables/ftd.json``. Result: ``score`` the balanced detection accuracy, ``metrics``
    ``accuracy``, ``tpr`` (triggered inputs flagged), ``fpr`` (clean inputs flagged), ``auroc``.
    """

    @dataclass(frozen=True)
    class Config(DefenseConfig):
        clean_images: int = 5000
        clean_source: str = "train"
        rounds: int = 5
        epochs: int = 10
        batch_size: int = 64
        lr: float = 0.05
        weight_decay: float = 1e-4
        test_images: int = 1000
        seed: int = 0
        detector_dir: str | None = None

        def __post_init__(self) -> None:
            check_source(self.clean_source)
            for name in ("clean_images", "rounds", "epochs", "batch_size", "test_images"):
                check_positive(getattr(self, name), name)
            for name in ("lr", "weight_decay"):
                v = getattr(self, name)
                if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or (name == "lr" and v == 0):
                    raise ConfigError(f"FTD {name} must be a {'positive' if name == 'lr' else 'non-negative'} number, got {v!r}")

    config: Config
    STORAGE_OPTIONS = ("detector_dir",)

    def detector_file(self, clean: ImageDataset) -> Path | None:
        """Where the detector for these clean images and options is kept (``None`` without ``detector_dir``)."""
        cfg = self.config
        if cfg.detector_dir is None:
            return None
        work = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("detector_dir", "test_images")}
        digest = hashlib.sha256(json.dumps(work, sort_keys=True).encode())
        digest.update(str(tuple(clean.images.shape)).encode())
        digest.update(clean.images.contiguous().numpy().tobytes())
        return Path(cfg.detector_dir) / f"ftd-{digest.hexdigest()[:20]}.safetensors"

    def detector(self, clean: ImageDataset) -> FrequencyDetector:
        """The detector for ``clean``: loaded from ``detector_dir`` when kept there, else trained
        (:meth:`fit_detector`) and kept there when ``detector_dir`` is set."""
        path = self.detector_file(clean)
        if path is not None and path.exists():
            net = FrequencyDetector(clean.images.shape[1], tuple(clean.images.shape[-2:]))  # type: ignore[arg-type]
            net.load_state_dict(load_file(str(path)))
            log.info("ftd: reusing the detector in %s", path)
            return net.eval()
        net = self.fit_detector(clean)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            save_file({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, str(tmp))
            tmp.replace(path)
        return net

    def fit_detector(self, clean: ImageDataset) -> FrequencyDetector:
        """Train the detector on ``clean`` against triggered copies of the same images, drawn afresh
        for each of ``rounds`` rounds of ``epochs`` epochs."""
        cfg = self.config
        g = torch.Generator().manual_seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        h, w = clean.images.shape[-2:]
        if h < 8 or w < 8:
            raise ConfigError(f"FTD needs images of at least 8x8 pixels (three 2x poolings), got {h}x{w}")
        clean_x = dct2(clean.images)
        labels = torch.cat([torch.zeros(len(clean), dtype=torch.long), torch.ones(len(clean), dtype=torch.long)])
        net = FrequencyDetector(clean.images.shape[1], (h, w))
        opt = torch.optim.Adadelta(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        net.train()
        bar = tqdm(total=cfg.rounds * cfg.epochs, desc="ftd", unit="epoch", leave=False, disable=not self.progress or None)
        for _ in range(cfg.rounds):
            x = torch.cat([clean_x, dct2(synthetic_triggers(clean.images, g))])
            for _ in range(cfg.epochs):
                perm = torch.randperm(len(x), generator=g)
                for i in range(0, len(x), cfg.batch_size):
                    idx = perm[i:i + cfg.batch_size]
                    if idx.numel() < 2:
                        continue
                    opt.zero_grad(set_to_none=True)
                    F.cross_entropy(net(x[idx]), labels[idx]).backward()
                    opt.step()
                bar.update(1)
        bar.close()
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
        log.info("ftd: detector on %d clean images and their synthetic-trigger copies, %d rounds of %d epochs",
                 len(clean), cfg.rounds, cfg.epochs)
        net = self.detector(clean)
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
            "note": f"balanced detection accuracy {100 * acc:.2f} %, AUROC {area:.4f}; detector trained {cfg.rounds} rounds of {cfg.epochs} epochs "
                    f"on {len(clean)} clean images and their synthetic-trigger copies",
        })
        return DetectionResult(
            defense=self.name, detected=bool(acc > 0.75), score=acc, threshold=0.75,
            metrics={"accuracy": acc, "tpr": tpr, "fpr": fpr, "auroc": area},
            extra={"clean_images": len(clean), "clean_test_inputs": int(s_clean.numel()),
                   "triggered_test_inputs": int(s_bad.numel()), "rounds": cfg.rounds, "epochs": cfg.epochs},
        )
