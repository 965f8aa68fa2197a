"""MNTD, meta neural trojan detection (Xu, Wang, Li, Borisov, Gunter & Li, "Detecting AI Trojans
Using Meta Neural Analysis", S&P 2021; ATTEQ section 7.1.4), scaled to a CPU.

Jumbo learning: the defender trains shadow models of the suspect's architecture on its own clean
data, half of them clean and half with a random synthetic backdoor each (a random patch, 2 to 5
pixels square at a random place with a random pattern and transparency 0.8 to 1, or a random
noise pattern blended at 0.05 to 0.2, towards a random target label, poisoning 5 % to 20 % of
the shadow's training images). A meta-classifier reads a model's softmax outputs on ``k`` query
inputs, concatenated, through a small MLP (one hidden layer of 20); the queries are learned with
it (query tuning), by binary cross-entropy over the shadow models. Held-out shadow models (a
quarter of each kind) give its AUROC; the suspect model is flagged when its meta score exceeds
0.5.

Scale: the paper trains 2,048 shadow models of each kind; here ``shadow_models`` of each kind
(default 24) on ``shadow_images`` clean training images (default 2,000) for ``shadow_epochs``
(default 4), at the suspect's architecture and width. The scale is in the result's ``extra``.
Shadow models and the meta-classifier do not depend on the suspect: they are stored (safetensors)
in a subfolder of ``shadow_dir`` (default ``OUT/shadows``) named by the architecture and a digest of
the settings, reused by later runs with the same settings and resumed shadow by shadow after an
interruption. The result states the suspect's clean accuracy beside the shadows': a suspect far
better trained than its shadows is judged by extrapolation (a warning says so).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from veil.data.base import ImageDataset, to_float, to_uint8
from veil.defenses.base import DefenseConfig, DetectionResult, Detector, register_defense
from veil.defenses.common import auroc, check_fraction, check_positive, defender_data, run_title, seeded_rows
from veil.errors import ConfigError
from veil.inference import eval_mode, module_device
from veil.records import atomic_write_bytes, atomic_write_json

if TYPE_CHECKING:
    from veil.runs import LoadedRun

log = logging.getLogger(__name__)

HIDDEN = 20  # the meta-classifier's hidden width (MNTD's)


def random_backdoor(image_shape: tuple[int, int, int], num_classes: int, rng: random.Random) -> dict[str, Any]:
    """One jumbo-learning attack setting: a patch or a blend, its pattern, mask, target and rate."""
    c, h, w = image_shape
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    mask = torch.zeros(1, h, w)
    if rng.random() < 0.5:
        s = rng.randint(2, min(5, h, w))
        top, left = rng.randint(0, h - s), rng.randint(0, w - s)
        mask[:, top : top + s, left : left + s] = rng.uniform(0.8, 1.0)
        pattern = (torch.rand(c, h, w, generator=g) > 0.5).float()
        kind = "patch"
    else:
        mask[:] = rng.uniform(0.05, 0.2)
        pattern = torch.rand(c, h, w, generator=g)
        kind = "blend"
    return {"kind": kind, "mask": mask, "pattern": pattern, "target": rng.randrange(num_classes),
            "rate": rng.uniform(0.05, 0.2)}


def poison_shadow_data(data: ImageDataset, backdoor: dict[str, Any], seed: int) -> ImageDataset:
    """``data`` with ``backdoor['rate']`` of its rows triggered and relabelled to the target."""
    g = torch.Generator().manual_seed(seed)
    n = max(1, int(round(backdoor["rate"] * len(data))))
    rows = torch.randperm(len(data), generator=g)[:n]
    x = to_float(data.images[rows])
    m = backdoor["mask"]
    images, labels = data.images.clone(), data.labels.clone()
    images[rows] = to_uint8((1 - m) * x + m * backdoor["pattern"])
    labels[rows] = backdoor["target"]
    return ImageDataset(images, labels, data.classes, data.name + "-shadow", data.hflip)


class MetaClassifier(nn.Module):
    """MNTD's meta-classifier with tuned queries: ``k`` query images, the model's softmax on them
    concatenated, an MLP to one logit (backdoored)."""

    def __init__(self, queries: int, image_shape: tuple[int, int, int], num_classes: int, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.queries = nn.Parameter(torch.rand(queries, *image_shape, generator=g))
        self.fc = nn.Linear(queries * num_classes, HIDDEN)
        self.out = nn.Linear(HIDDEN, 1)

    def forward(self, model: nn.Module) -> Tensor:
        probs = F.softmax(model(self.queries.clamp(0, 1)), dim=1).flatten()
        return self.out(F.relu(self.fc(probs)))[0]


#: Test images on which each shadow's clean accuracy and ASR are measured (diagnostics in the result).
SHADOW_EVAL_IMAGES = 2000


def train_shadows(
    make_model: Callable[[int], nn.Module], clean: ImageDataset, evaluation: ImageDataset, per_kind: int, epochs: int,
    folder: Path, settings: dict[str, Any], seed: int = 0, device: str | torch.device = "cpu", progress: bool = False,
    train_config: Any = None,
) -> list[dict[str, Any]]:
    """Train (or load) ``per_kind`` clean and ``per_kind`` backdoored shadow models, alternating,
    each saved to ``folder`` as it finishes (a rerun resumes); one entry per shadow
    (``index``, ``label`` 0 clean / 1 backdoored, ``file``, ``accuracy`` and ``asr`` on
    ``evaluation``, ``kind``). ``train_config`` (a :class:`veil.train.TrainConfig`, default veil's
    training defaults) sets how each shadow trains; its epochs and seed are replaced.

    Raises:
        ConfigError: ``folder`` holds shadows of other ``settings``.
    """
    from veil.train import TrainConfig, Trainer, predict

    info_file = folder / "shadows.json"
    settings = json.loads(json.dumps(settings))
    info: dict[str, Any] = {"settings": settings, "shadows": []}
    if info_file.exists():
        info = json.loads(info_file.read_text())
        if info.get("settings") != settings:
            raise ConfigError(f"{folder} holds MNTD shadows of other settings; pass another shadow_dir or remove it")
    rng = random.Random(seed)
    shape = tuple(clean.images.shape[1:])
    plan = [(i, i % 2) for i in range(2 * per_kind)]
    backdoors = [random_backdoor(shape, clean.num_classes, rng) if label else None for _, label in plan]  # type: ignore[arg-type]
    done = {s["index"]: s for s in info["shadows"]}
    for (i, label), backdoor in zip(tqdm(plan, desc="MNTD shadows", unit="model", leave=False, disable=not progress or None),
                                    backdoors):
        if i in done:
            continue
        data = clean if backdoor is None else poison_shadow_data(clean, backdoor, seed + 1000 + i)
        model = make_model(seed + i)
        base = train_config if train_config is not None else TrainConfig()
        tc = dataclasses.replace(base, epochs=epochs, seed=seed + i, checkpoint_every=0,
                                 batch_size=min(base.batch_size, len(data)))
        Trainer(model, data, tc, device=device, progress=False).fit()
        model.eval()
        acc = float((predict(model, evaluation.images) == evaluation.labels).float().mean())
        asr = None
        if backdoor is not None:
            x = to_float(evaluation.images[evaluation.labels != backdoor["target"]])
            triggered = (1 - backdoor["mask"]) * x + backdoor["mask"] * backdoor["pattern"]
            asr = float((predict(model, triggered) == backdoor["target"]).float().mean())
        folder.mkdir(parents=True, exist_ok=True)
        name = f"shadow{i:04d}.safetensors"
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(folder / name))
        done[i] = {"index": i, "label": label, "file": name, "accuracy": acc, "asr": asr,
                   "kind": backdoor["kind"] if backdoor else "clean"}
        info["shadows"] = [done[k] for k in sorted(done)]
        atomic_write_json(info_file, info)
    return [done[i] for i, _ in plan]


def load_shadow(make_model: Callable[[int], nn.Module], folder: Path, entry: dict[str, Any],
                device: str | torch.device = "cpu") -> nn.Module:
    """A stored shadow model, frozen, in eval mode on ``device``."""
    model = make_model(0)
    model.load_state_dict(load_file(str(folder / entry["file"])))
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(device).eval()


def fit_meta(models: list[nn.Module], labels: list[int], queries: int, epochs: int, lr: float,
             image_shape: tuple[int, int, int], num_classes: int, seed: int = 0, progress: bool = False) -> MetaClassifier:
    """Train the meta-classifier and its queries (binary cross-entropy) over ``models``."""
    dev = module_device(models[0])
    meta = MetaClassifier(queries, image_shape, num_classes, seed=seed).to(dev)
    opt = torch.optim.Adam(meta.parameters(), lr=lr)
    rng = random.Random(seed + 7)
    target = torch.tensor(labels, dtype=torch.float32, device=dev)
    for _ in tqdm(range(epochs), desc="MNTD meta-classifier", unit="epoch", leave=False, disable=not progress or None):
        for i in rng.sample(range(len(models)), len(models)):
            loss = F.binary_cross_entropy_with_logits(meta(models[i]), target[i])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return meta.eval()


@torch.no_grad()
def meta_score(meta: MetaClassifier, model: nn.Module) -> float:
    """The meta-classifier's probability that ``model`` is backdoored."""
    with eval_mode(model):
        return float(torch.sigmoid(meta(model)).cpu())


@register_defense("mntd")
class MNTD(Detector):
    """MNTD (Xu et al., S&P 2021), scaled: shadow models with random synthetic backdoors, a
    meta-classifier with tuned queries, its AUROC on held-out shadows and its verdict on the run.

    Options (``Config``):
        shadow_models: shadow models of each kind, clean and backdoored (default 24; the paper 2,048).
        shadow_images: the defender's clean training images the shadows train on (default 2,000).
        shadow_epochs: each shadow's training epochs (default 4; veil's training defaults).
        queries: tuned query inputs, ``k`` (default 10, MNTD's).
        meta_epochs: passes over the training shadows (default 100).
        meta_lr: Adam's rate for the queries and the MLP (default 1e-3).
        holdout: share of each kind held out for the AUROC (default 0.25).
        shadow_dir: where shadows and the meta-classifier are kept (default ``OUT/shadows``).
        seed: seed of the shadows' backdoors, data and training.

    Writes ``tables/mntd.json``. Result: :class:`DetectionResult`; ``score`` the suspect's meta
    score (sigmoid), ``threshold`` 0.5; ``metrics``: ``auroc`` and ``accuracy`` on the held-out
    shadows; ``extra``: the scale, the held-out scores, the shadows' clean accuracy and ASR.
    """

    @dataclass(frozen=True)
    class Config(DefenseConfig):
        shadow_models: int = 24
        shadow_images: int = 2000
        shadow_epochs: int = 4
        queries: int = 10
        meta_epochs: int = 100
        meta_lr: float = 1e-3
        holdout: float = 0.25
        shadow_dir: str | None = None
        seed: int = 0

        def __post_init__(self) -> None:
            for name in ("shadow_models", "shadow_images", "shadow_epochs", "queries", "meta_epochs"):
                check_positive(getattr(self, name), name)
            if self.shadow_models < 2:
                raise ConfigError(f"shadow_models must be at least 2 of each kind (one to train on, one held out), "
                                  f"got {self.shadow_models}")
            check_fraction(self.holdout, "holdout", closed=False, high=0.5)
            if isinstance(self.meta_lr, bool) or not isinstance(self.meta_lr, (int, float)) or not self.meta_lr > 0:
                raise ConfigError(f"meta_lr must be a positive number, got {self.meta_lr!r}")

    config: Config
    STORAGE_OPTIONS = ("shadow_dir",)

    # ------------------------------------------------------------------ run
    def run(self, loaded: LoadedRun, train: ImageDataset, test: ImageDataset, out_dir: Path) -> DetectionResult:
        from veil.models import create_model
        from veil.train import predict

        cfg = self.config
        clean, _ = defender_data(train, test, cfg.shadow_images, "train", cfg.seed, self.name)
        dev = module_device(loaded.model)
        arch = dict(loaded.model.config)

        def make_model(seed: int) -> nn.Module:
            return create_model(**{**arch, "seed": seed})

        settings = {"model": arch, "dataset": loaded.config.dataset, "image_size": loaded.config.image_size,
                    "shadow_models": cfg.shadow_models, "shadow_images": cfg.shadow_images,
                    "shadow_epochs": cfg.shadow_epochs, "seed": cfg.seed}
        # one subfolder per settings: runs of other architectures or scales share a shadow_dir
        key = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]
        folder = (Path(cfg.shadow_dir) if cfg.shadow_dir else out_dir / "shadows") / f"{arch.get('name', 'model')}-{key}"
        # the shadows' accuracy and ASR are diagnostics: a seeded share of the test set keeps their cost
        # (two passes over 12,630 GTSRB images took 25 s of a shadow's 40 s) below the training's
        diagnostics = test.subset(seeded_rows(len(test), SHADOW_EVAL_IMAGES, cfg.seed + 7))
        shadows = train_shadows(make_model, clean, diagnostics, cfg.shadow_models, cfg.shadow_epochs, folder, settings, cfg.seed,
                                dev, self.progress)
        models = [load_shadow(make_model, folder, s, dev) for s in shadows]
        per_kind = cfg.shadow_models
        held = max(1, int(round(cfg.holdout * per_kind)))
        kinds = {k: [i for i, s in enumerate(shadows) if s["label"] == k] for k in (0, 1)}
        test_idx = kinds[0][-held:] + kinds[1][-held:]  # the last `held` of each kind are held out
        train_idx = kinds[0][:-held] + kinds[1][:-held]
        shape = tuple(clean.images.shape[1:])
        meta_file = folder / f"meta-q{cfg.queries}-e{cfg.meta_epochs}-lr{cfg.meta_lr:g}-h{held}.safetensors"
        if meta_file.exists():
            meta = MetaClassifier(cfg.queries, shape, clean.num_classes).to(dev)  # type: ignore[arg-type]
            meta.load_state_dict(load_file(str(meta_file), device=str(dev)))
            meta.eval()
        else:
            meta = fit_meta([models[i] for i in train_idx], [shadows[i]["label"] for i in train_idx], cfg.queries,
                            cfg.meta_epochs, cfg.meta_lr, shape, clean.num_classes, cfg.seed, self.progress)  # type: ignore[arg-type]
            save_file({k: v.detach().cpu().contiguous() for k, v in meta.state_dict().items()}, str(meta_file))
        scores = torch.tensor([meta_score(meta, models[i]) for i in test_idx])
        suspect = meta_score(meta, loaded.model)
        with eval_mode(loaded.model):
            suspect_acc = float((predict(loaded.model, diagnostics.images) == diagnostics.labels).float().mean())
        shadow_acc = sum(s["accuracy"] for s in shadows) / len(shadows)
        if suspect_acc - shadow_acc > 0.2:
            log.warning("MNTD: the suspect's clean accuracy (%.3f) is far above its shadows' (mean %.3f): the meta-classifier "
                        "judges a model unlike those it learned from; train the shadows longer (shadow_epochs, shadow_images)",
                        suspect_acc, shadow_acc)
        labels = torch.tensor([float(shadows[i]["label"]) for i in range(len(shadows))])
        truth = labels[test_idx]
        area = auroc(scores[truth == 1], scores[truth == 0])
        acc = float(((scores > 0.5).float() == truth).float().mean())
        detected = suspect > 0.5
        log.info("MNTD: held-out AUROC %.4f (accuracy %.4f) on %d shadows; suspect score %.4f", area, acc, len(test_idx), suspect)
        backdoored = [s for s in shadows if s["label"] == 1]
        atomic_write_json(out_dir / "tables" / "mntd.json", {
            "title": f"MNTD (scaled: {per_kind} clean + {per_kind} backdoored shadows): {run_title(loaded)}",
            "columns": ["", "value"],
            "rows": [
                ["suspect model's meta score", round(suspect, 4)],
                ["verdict", "backdoored" if detected else "clean"],
                ["held-out shadows' AUROC", None if math.isnan(area) else round(area, 4)],
                ["held-out shadows' accuracy", round(acc, 4)],
                ["suspect model's clean accuracy", round(suspect_acc, 4)],
                ["shadows' mean clean accuracy", round(shadow_acc, 4)],
                ["backdoored shadows' mean ASR", round(sum(s["asr"] for s in backdoored) / len(backdoored), 4)],
            ],
            "note": f"{cfg.shadow_images} clean training images, {cfg.shadow_epochs} epochs each, {cfg.queries} tuned queries, "
                    f"{cfg.meta_epochs} meta epochs; {len(test_idx)} shadows held out (the paper: 2,048 of each kind)",
        })
        atomic_write_bytes(folder / "README.txt", b"MNTD shadow models (safetensors) and meta-classifiers; see veil.defenses.mntd\n")
        return DetectionResult(
            defense=self.name, detected=detected, score=suspect, threshold=0.5,
            metrics={"auroc": area, "accuracy": acc},
            extra={
                "scale": {"shadow_models_per_kind": per_kind, "shadow_images": cfg.shadow_images,
                          "shadow_epochs": cfg.shadow_epochs, "paper_shadow_models_per_kind": 2048},
                "heldout_scores": scores.tolist(), "heldout_labels": truth.tolist(),
                "suspect_accuracy": suspect_acc, "shadow_accuracy": [s["accuracy"] for s in shadows],
                "shadow_asr": [s["asr"] for s in backdoored],
                "shadow_dir": str(folder),
            },
        )
