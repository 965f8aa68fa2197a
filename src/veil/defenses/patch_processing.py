"""Patch processing for vision transformers (Doan, Lao, Yang & Li, "Defending Backdoor Attacks on
Vision Transformer via Patch Processing", AAAI 2023; ATTEQ's Table 9).

A ViT's clean accuracy and a backdoor's success rate respond differently to transformations of
the patch tokens before the position embeddings are added. **PatchDrop** (a random share of the
patches removed, each remaining patch keeping its own position embedding) barely moves a clean
prediction, but removes a patch trigger whenever its patch is dropped; **PatchShuffle** (the
patches permuted over the positions) scrambles a clean image's layout and so its prediction,
while a blended trigger, spread over every patch, keeps the target. For an input ``x`` with
prediction ``y`` and ``T`` random trials of each, the detector reads two scores:

    s_drop(x)    = share of PatchDrop trials whose prediction differs from y,
    s_shuffle(x) = share of PatchShuffle trials whose prediction differs from y,

and flags ``x`` when ``s_drop`` is above, or ``s_shuffle`` below, what the defender's clean images
give (patch-based triggers: high ``s_drop``; blending-based: low ``s_shuffle``), without knowing the
attack's kind. Readings (the paper's rates are not in the seeds): a drop ratio of 0.25 of the
patches, 20 trials of each; the two thresholds are the clean calibration images' ``1 - frr / 2``
quantile of ``s_drop`` and ``frr / 2`` quantile of ``s_shuffle`` (strict comparisons), so that
the two rules together reject at most ``frr`` of the calibration images. Detected inputs are
rejected: the result reports the ASR and clean accuracy left after the rejection as well.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from veil.data.base import ImageDataset, to_float
from veil.defenses.base import DefenseConfig, DetectionResult, Detector, register_defense
from veil.defenses.common import (
    CleanSource,
    auroc,
    check_fraction,
    check_positive,
    check_source,
    input_detection_sets,
    pct,
    run_title,
)
from veil.errors import ConfigError
from veil.inference import eval_mode, module_device
from veil.records import atomic_write_json

if TYPE_CHECKING:
    from veil.runs import LoadedRun

log = logging.getLogger(__name__)


def patch_count(model: nn.Module, image_shape: tuple[int, ...]) -> int:
    """Patches a ViT cuts an image of ``image_shape`` ``(C, H, W)`` into."""
    p = int(model.patch_size)  # type: ignore[arg-type]
    return (image_shape[-2] // p) * (image_shape[-1] // p)


def check_vit(model: nn.Module, defense: str) -> None:
    """:class:`ConfigError` unless ``model`` processes patch tokens (``processed_forward``)."""
    if not callable(getattr(model, "processed_forward", None)):
        raise ConfigError(f"{defense} needs a vision transformer (e.g. --model vit_small); the run's model is "
                          f"{getattr(model, 'name', type(model).__name__)!r}")


@torch.no_grad()
def patch_scores(
    model: nn.Module, images: Tensor, trials: int = 20, drop_ratio: float = 0.25, seed: int = 0,
    batch_size: int = 256, progress: bool = False, desc: str = "patch processing",
) -> tuple[Tensor, Tensor, Tensor]:
    """``(prediction, s_drop, s_shuffle)`` of each image ``(N, C, H, W)`` (see the module docstring).

    The draws come from a generator seeded with ``seed``, image by image in order, so a row's
    scores do not depend on the batch size.
    """
    check_vit(model, "patch processing")
    n = images.shape[0]
    if n == 0:
        empty = torch.empty(0)
        return torch.empty(0, dtype=torch.long), empty, empty
    patches = patch_count(model, tuple(images.shape))
    kept = max(1, patches - int(round(drop_ratio * patches)))
    g = torch.Generator().manual_seed(seed)
    # every image's draws, fixed before batching: trials x (drop keep-set, shuffle order)
    keeps = torch.stack([torch.stack([torch.randperm(patches, generator=g)[:kept].sort().values for _ in range(trials)])
                         for _ in range(n)])  # (N, T, K)
    orders = torch.stack([torch.stack([torch.randperm(patches, generator=g) for _ in range(trials)])
                          for _ in range(n)])  # (N, T, P)
    dev = module_device(model)
    preds, drops, shuffles = [], [], []
    with eval_mode(model):
        for i in tqdm(range(0, n, batch_size), desc=desc, unit="batch", leave=False, disable=not progress or None):
            x = images[i : i + batch_size]
            x = (to_float(x) if x.dtype == torch.uint8 else x.float()).to(dev)
            y = model(x).argmax(1).cpu()
            changed_drop = torch.zeros(x.shape[0])
            changed_shuffle = torch.zeros(x.shape[0])
            for t in range(trials):
                changed_drop += (model.processed_forward(x, keep=keeps[i : i + batch_size, t]).argmax(1).cpu() != y).float()
                changed_shuffle += (model.processed_forward(x, order=orders[i : i + batch_size, t]).argmax(1).cpu() != y).float()
            preds.append(y)
            drops.append(changed_drop / trials)
            shuffles.append(changed_shuffle / trials)
    return torch.cat(preds), torch.cat(drops), torch.cat(shuffles)


def calibrate(drop: Tensor, shuffle: Tensor, frr: float) -> tuple[float, float]:
    """The thresholds ``(t_drop, t_shuffle)`` from clean calibration scores: the ``1 - frr / 2``
    quantile of ``s_drop`` and the ``frr / 2`` quantile of ``s_shuffle``."""
    if drop.numel() == 0:
        raise ConfigError("patch processing needs clean calibration images")
    return float(torch.quantile(drop.double(), 1 - frr / 2)), float(torch.quantile(shuffle.double(), frr / 2))


def flag(drop: Tensor, shuffle: Tensor, t_drop: float, t_shuffle: float) -> Tensor:
    """Inputs rejected: ``s_drop > t_drop`` (a patch trigger) or ``s_shuffle < t_shuffle`` (a blended one)."""
    return (drop > t_drop) | (shuffle < t_shuffle)


@register_defense("patch_processing")
class PatchProcessing(Detector):
    """Patch processing (Doan et al., AAAI 2023): flag inputs whose prediction reacts to PatchDrop
    more, or to PatchShuffle less, than clean inputs do. Vision transformers only.

    Options (``Config``):
        clean_images: the defender's clean images calibrating the thresholds (default 500; the
            paper's K is under 1,000).
        clean_source: ``"test"`` (default: held-out; evaluation uses the remaining test images)
            or ``"train"``.
        drop_ratio: share of the patches PatchDrop removes (default 0.25).
        trials: random PatchDrop and PatchShuffle trials per input, each (default 20).
        frr: false rejection rate on the calibration images the two thresholds share (default 0.05).
        test_images: clean test inputs and triggered test inputs evaluated, each (default 500).
        seed: seed of the subsets and of the draws.

    Writes ``tables/patch_processing.json`` and ``patch_scores.json`` (every score).

    Result: :class:`DetectionResult`; ``detected``: most triggered inputs are rejected; ``score`` the
    share of triggered inputs rejected; ``metrics``: ``tpr`` (triggered inputs rejected), ``fpr``
    (clean test inputs rejected), ``auroc_drop`` and ``auroc_shuffle`` (each score alone),
    ``detection_rate``; ``extra``: the thresholds, ``attack_success_rate`` and ``clean_accuracy``
    before and after rejecting the flagged inputs (a rejected input counts as not reaching the
    target and as misclassified), the scores' means and the sizes.
    """

    @dataclass(frozen=True)
    class Config(DefenseConfig):
        clean_images: int = 500
        clean_source: CleanSource = "test"
        drop_ratio: float = 0.25
        trials: int = 20
        frr: float = 0.05
        test_images: int = 500
        seed: int = 0

        def __post_init__(self) -> None:
            check_source(self.clean_source)
            for name in ("clean_images", "trials", "test_images"):
                check_positive(getattr(self, name), name)
            check_fraction(self.drop_ratio, "drop_ratio", closed=False, high=0.95)
            check_fraction(self.frr, "frr", closed=False, high=0.5)

    config: Config

    @classmethod
    def not_applicable(cls, model: nn.Module) -> str | None:
        return None if callable(getattr(model, "processed_forward", None)) else "needs a vision transformer"

    def run(self, loaded: LoadedRun, train: ImageDataset, test: ImageDataset, out_dir: Path) -> DetectionResult:
        cfg = self.config
        model = loaded.model
        check_vit(model, self.name)
        clean, clean_test, poisoned = input_detection_sets(loaded, train, test, cfg.clean_images, cfg.clean_source,
                                                           cfg.test_images, cfg.seed, self.name)
        kw = {"trials": cfg.trials, "drop_ratio": cfg.drop_ratio, "progress": self.progress}
        _, cal_drop, cal_shuffle = patch_scores(model, clean.images, seed=cfg.seed + 3, desc="patch processing (calibration)", **kw)
        y_clean, drop_clean, shuffle_clean = patch_scores(model, clean_test.images, seed=cfg.seed + 4,
                                                          desc="patch processing (clean)", **kw)
        y_bad, drop_bad, shuffle_bad = patch_scores(model, poisoned.images, seed=cfg.seed + 5,
                                                    desc="patch processing (triggered)", **kw)
        t_drop, t_shuffle = calibrate(cal_drop, cal_shuffle, cfg.frr)
        flagged_clean = flag(drop_clean, shuffle_clean, t_drop, t_shuffle)
        flagged_bad = flag(drop_bad, shuffle_bad, t_drop, t_shuffle)

        def share(v: Tensor) -> float:
            return float(v.float().mean()) if v.numel() else float("nan")

        tpr, fpr = share(flagged_bad), share(flagged_clean)
        hit, correct = y_bad == poisoned.labels, y_clean == clean_test.labels
        asr, cda = share(hit), share(correct)
        asr_after, cda_after = share(hit & ~flagged_bad), share(correct & ~flagged_clean)
        auc_drop, auc_shuffle = auroc(drop_bad, drop_clean), auroc(-shuffle_bad, -shuffle_clean)
        log.info("patch processing: thresholds drop > %.3f, shuffle < %.3f; TPR %.4f, FPR %.4f; ASR %.4f -> %.4f",
                 t_drop, t_shuffle, tpr, fpr, asr, asr_after)
        title = run_title(loaded)
        atomic_write_json(out_dir / "tables" / "patch_processing.json", {
            "title": f"Patch processing (PatchDrop {cfg.drop_ratio:g}, PatchShuffle, {cfg.trials} trials): {title}",
            "columns": ["inputs", "count", "mean s_drop", "mean s_shuffle", "rejected %", "accuracy or ASR % before",
                        "after rejection %"],
            "rows": [
                ["clean (calibration)", int(cal_drop.numel()), round(float(cal_drop.mean()), 4),
                 round(float(cal_shuffle.mean()), 4), pct(share(flag(cal_drop, cal_shuffle, t_drop, t_shuffle))), None, None],
                ["clean (test)", len(clean_test), round(float(drop_clean.mean()), 4), round(float(shuffle_clean.mean()), 4),
                 pct(fpr), pct(cda), pct(cda_after)],
                ["triggered (test)", len(poisoned), round(float(drop_bad.mean()), 4) if len(poisoned) else None,
                 round(float(shuffle_bad.mean()), 4) if len(poisoned) else None, pct(tpr), pct(asr), pct(asr_after)],
            ],
            "note": f"rejected when s_drop > {t_drop:.3f} or s_shuffle < {t_shuffle:.3f} (the clean calibration images' "
                    f"{100 * (1 - cfg.frr / 2):g} % and {100 * cfg.frr / 2:g} % quantiles); AUROC of s_drop {auc_drop:.4f}, "
                    f"of s_shuffle {auc_shuffle:.4f}",
        })
        atomic_write_json(out_dir / "patch_scores.json", {
            "thresholds": {"drop": t_drop, "shuffle": t_shuffle},
            "calibration": {"drop": cal_drop.tolist(), "shuffle": cal_shuffle.tolist()},
            "clean": {"drop": drop_clean.tolist(), "shuffle": shuffle_clean.tolist()},
            "triggered": {"drop": drop_bad.tolist(), "shuffle": shuffle_bad.tolist()},
        })
        return DetectionResult(
            defense=self.name,
            detected=bool(tpr > 0.5),
            score=tpr,
            threshold=0.5,
            metrics={"tpr": tpr, "fpr": fpr, "auroc_drop": auc_drop, "auroc_shuffle": auc_shuffle, "detection_rate": tpr},
            extra={
                "drop_threshold": t_drop,
                "shuffle_threshold": t_shuffle,
                "attack_success_rate": asr,
                "attack_success_rate_after": asr_after,
                "clean_accuracy": cda,
                "clean_accuracy_after": cda_after,
                "drop_clean_mean": float(drop_clean.mean()),
                "drop_triggered_mean": float(drop_bad.mean()) if len(poisoned) else float("nan"),
                "shuffle_clean_mean": float(shuffle_clean.mean()),
                "shuffle_triggered_mean": float(shuffle_bad.mean()) if len(poisoned) else float("nan"),
                "clean_images": len(clean),
                "clean_test_inputs": len(clean_test),
                "triggered_test_inputs": len(poisoned),
                "scores_file": "patch_scores.json",
            },
        )
