"""Spectral signatures (Tran, Li & Madry, "Spectral Signatures in Backdoor Attacks", NeurIPS 2018).

Poisoned training samples leave a detectable trace in the spectrum of the covariance of a
network's learned representations. For every label ``y``, with the penultimate representations
``R_i`` of the ``n_y`` training samples labelled ``y`` and their mean ``R̂`` (Algorithm 1):

    M = [R_i - R̂]  (n_y x d),   v = top right singular vector of M,
    tau_i = ((R_i - R̂) . v)^2,

and the samples with the ``1.5 * epsilon * n_y`` largest scores ``tau_i`` are removed, ``epsilon``
being an upper bound on the share of poisoned samples in a label. The paper's guarantee needs the
poisoned samples to be a minority of their label: when a dirty-label attack relabels many images to
a small class (10 % of GTSRB relabelled to class 0, which holds 0.5 % of the images, makes 95 % of
class 0 poisoned) the clean samples become the outliers and are the ones removed; activation
clustering with its ``reference`` analysis (:mod:`veil.defenses.activation_clustering`) handles
that case.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from veil.data.base import ImageDataset
from veil.defenses.base import (
    DefenseConfig,
    DetectionResult,
    Detector,
    register_defense,
)
from veil.defenses.common import (
    auroc,
    backdoor_targets,
    batched_features,
    check_fraction,
    detection_rates,
    figure_png,
    pct,
    poisoned_training_set,
    pyplot,
    run_title,
)
from veil.errors import ConfigError
from veil.records import atomic_write_bytes, atomic_write_json

if TYPE_CHECKING:
    from veil.runs import LoadedRun

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SpectralScores:
    """Output of :func:`spectral_scores`.

    Attributes:
        scores: ``tau_i`` ``(N,)``, the squared projection on the label's top singular vector.
        projections: the signed projection ``(R_i - R̂) . v`` ``(N,)``.
        singular_values: top singular value of each label's centred representations
            ``(num_classes,)`` (0 for labels with fewer than 2 samples).
    """

    scores: Tensor
    projections: Tensor
    singular_values: Tensor


def spectral_scores(features: Tensor, labels: Tensor, num_classes: int | None = None) -> SpectralScores:
    """Outlier scores of Algorithm 1 (Tran et al.), label by label.

    Args:
        features: representations ``(N, d)`` (e.g. penultimate features).
        labels: training labels ``(N,)``.
        num_classes: number of labels (default ``labels.max() + 1``).

    Returns:
        :class:`SpectralScores`; labels with fewer than 2 samples score 0.
    """
    if features.dim() != 2 or features.shape[0] != labels.numel():
        raise ConfigError(f"features must be (N, d) with N = {labels.numel()}, got {tuple(features.shape)}")
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    f = features.double()
    scores = torch.zeros(labels.numel(), dtype=torch.float64)
    proj = torch.zeros(labels.numel(), dtype=torch.float64)
    sv = torch.zeros(num_classes, dtype=torch.float64)
    for y in range(num_classes):
        rows = torch.nonzero(labels == y).flatten()
        if rows.numel() < 2:
            continue
        centred = f[rows] - f[rows].mean(0, keepdim=True)
        _, s, vh = torch.linalg.svd(centred, full_matrices=False)
        v = vh[0]
        # fix the sign so that the larger tail of projections is positive (for plots only)
        p = centred @ v
        if float((p**3).sum()) < 0:
            p = -p
        proj[rows] = p
        scores[rows] = p**2
        sv[y] = s[0]
    return SpectralScores(scores=scores.float(), projections=proj.float(), singular_values=sv.float())


def spectral_flags(scores: Tensor, labels: Tensor, epsilon: float, multiplier: float = 1.5) -> Tensor:
    """Flag the ``ceil(multiplier * epsilon * n_y)`` highest-scoring samples of every label ``y``
    (ties broken by lower row first). Returns a bool ``(N,)``."""
    flags = torch.zeros(labels.numel(), dtype=torch.bool)
    for y in torch.unique(labels).tolist():
        rows = torch.nonzero(labels == y).flatten()
        k = min(rows.numel(), math.ceil(multiplier * epsilon * rows.numel()))
        if k:
            order = torch.argsort(-scores[rows].double(), stable=True)
            flags[rows[order[:k]]] = True
    return flags


def class_percentiles(scores: Tensor, labels: Tensor) -> Tensor:
    """Each score's rank within its label, scaled to ``(0, 1]`` (comparable across labels)."""
    out = torch.zeros(labels.numel(), dtype=torch.float64)
    for y in torch.unique(labels).tolist():
        rows = torch.nonzero(labels == y).flatten()
        order = torch.argsort(scores[rows].double(), stable=True)
        ranks = torch.empty(rows.numel(), dtype=torch.float64)
        ranks[order] = torch.arange(1, rows.numel() + 1, dtype=torch.float64)
        out[rows] = ranks / rows.numel()
    return out


@register_defense("spectral_signatures")
class SpectralSignatures(Detector):
    """Spectral signatures (Tran et al., NeurIPS 2018): score every training sample of a run by its
    correlation with the top singular vector of its label's representations, remove the top
    ``1.5 * epsilon`` of each label, and compare with the recorded poison indices.

    Options (``Config``):
        epsilon: upper bound on the poisoned share of a label (default 0.1, a 10 % poisoned label).
        multiplier: removal factor (default 1.5 as in the paper).
        train_images: score a seeded random subset of this many training rows (default all).
        seed: seed of that subset.

    Writes ``figures/spectral_signatures.png`` (projections on the top singular vector, clean and
    poisoned, for the backdoor's target labels, or the labels with the largest top singular value
    in a clean run), ``tables/spectral_signatures.json`` (per label) and
    ``spectral_signatures_flagged.json`` (the flagged training rows).

    Result: :class:`DetectionResult`; ``flagged`` the removed training rows, ``detected`` whether
    any was removed, ``metrics``: ``tpr`` (share of the recorded poisoned rows removed), ``fpr``
    (share of clean rows removed), ``precision`` and ``auroc`` of the within-label score
    percentiles (``nan`` without poisoned rows), ``extra``: sizes and settings.
    """

    @dataclass(frozen=True)
    class Config(DefenseConfig):
        epsilon: float = 0.1
        multiplier: float = 1.5
        train_images: int | None = None
        seed: int = 0

        def __post_init__(self) -> None:
            check_fraction(self.epsilon, "epsilon", closed=False)
            if isinstance(self.multiplier, bool) or not isinstance(self.multiplier, (int, float)) or not self.multiplier > 0:
                raise ConfigError(f"multiplier must be a positive number, got {self.multiplier!r}")
            if self.train_images is not None and (isinstance(self.train_images, bool) or not isinstance(self.train_images, int)
                                                  or self.train_images < 1):
                raise ConfigError(f"train_images must be a positive integer, got {self.train_images!r}")

    config: Config

    def run(self, loaded: LoadedRun, train: ImageDataset, test: ImageDataset, out_dir: Path) -> DetectionResult:
        cfg = self.config
        data, truth, rows = poisoned_training_set(loaded, train, cfg.train_images, cfg.seed, self.name)
        feats = batched_features(loaded.model, data.images, desc="features (training set)", progress=self.progress)
        spec = spectral_scores(feats, data.labels, data.num_classes)
        flags = spectral_flags(spec.scores, data.labels, cfg.epsilon, cfg.multiplier)
        rates = detection_rates(flags, truth)
        area = auroc(*_split(class_percentiles(spec.scores, data.labels), truth))
        log.info("spectral signatures: flagged %d of %d training rows; TPR %.4f, FPR %.4f",
                 int(flags.sum()), len(data), rates["tpr"], rates["fpr"])
        flagged_rows = rows[flags].tolist()
        targets = backdoor_targets(loaded, test)
        title = run_title(loaded)

        table_rows: list[list[Any]] = []
        for y in range(data.num_classes):
            m = data.labels == y
            if not bool(m.any()):
                continue
            table_rows.append([y, int(m.sum()), int((m & truth).sum()), int((m & flags).sum()), int((m & flags & truth).sum()),
                               round(float(spec.singular_values[y]), 3)])
        atomic_write_json(
            out_dir / "tables" / "spectral_signatures.json",
            {
                "title": f"Spectral signatures: {title}",
                "columns": ["label", "training images", "poisoned", "flagged", "poisoned flagged", "top singular value"],
                "rows": table_rows,
                "note": f"top {cfg.multiplier:g} x epsilon = {cfg.multiplier * cfg.epsilon:.3g} of every label removed; "
                f"TPR {pct(rates['tpr'])} %, FPR {pct(rates['fpr'])} % against the recorded poison indices",
            },
        )
        atomic_write_json(out_dir / "spectral_signatures_flagged.json", {"flagged_rows": flagged_rows})
        shown = [t for t in targets if bool((data.labels == t).any())][:4] if targets else []
        if not shown:
            shown = torch.argsort(spec.singular_values, descending=True)[:2].tolist()
        atomic_write_bytes(out_dir / "figures" / "spectral_signatures.png",
                           _projections_png(spec, data.labels, truth, flags, shown, title))
        metrics = {k: rates[k] for k in ("tpr", "fpr", "precision")}
        metrics["auroc"] = area
        return DetectionResult(
            defense=self.name,
            detected=bool(flags.any()),
            flagged=flagged_rows,
            metrics=metrics,
            extra={
                "flagged_count": int(flags.sum()),
                "poisoned_count": int(truth.sum()),
                "train_images": len(data),
                "targets": targets,
                "epsilon": cfg.epsilon,
                "removed_share": cfg.multiplier * cfg.epsilon,
                "flagged_file": "spectral_signatures_flagged.json",
            },
        )


def _split(values: Tensor, truth: Tensor) -> tuple[Tensor, Tensor]:
    return values[truth], values[~truth]


def _projections_png(spec: SpectralScores, labels: Tensor, truth: Tensor, flags: Tensor, shown: list[int], title: str) -> bytes:
    """Histograms of the projections on each shown label's top singular vector (clean and
    poisoned separately) with the removal cut-off (the paper's Figure 1)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(shown), figsize=(4.2 * len(shown), 3.2), squeeze=False)
    for ax, y in zip(axes[0], shown):
        m = labels == y
        p = spec.projections[m]
        t = truth[m]
        edges = torch.linspace(float(p.min()), float(p.max()) + 1e-6, 41).tolist()
        if bool((~t).any()):
            ax.hist(p[~t].tolist(), bins=edges, color="C0", alpha=0.65, label=f"clean ({int((~t).sum())})")
        if bool(t.any()):
            ax.hist(p[t].tolist(), bins=edges, color="C3", alpha=0.65, label=f"poisoned ({int(t.sum())})")
        f = flags[m]
        if bool(f.any()):
            cut = float(spec.scores[m][f].min()) ** 0.5
            for s in (cut, -cut):
                ax.axvline(s, color="k", ls="--", lw=0.8)
        ax.set_title(f"label {y}: {int(f.sum())} removed", fontsize=9)
        ax.set_xlabel("projection on top singular vector")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(f"Spectral signatures: {title}", fontsize=9)
    fig.tight_layout()
    return figure_png(fig)
