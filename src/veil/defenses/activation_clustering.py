"""Activation clustering (Chen et al., "Detecting Backdoor Attacks on Deep Neural Networks by
Activation Clustering", AAAI SafeAI workshop 2019, arXiv:1811.03728, 2018).

The last hidden layer's activations of a backdoored network split the samples of the target label
into two groups: the genuine ones and the poisoned ones, which the network recognises by the
trigger. For every label the activations are reduced to ``dims`` (10) dimensions and split into two
clusters by k-means (Section 3, "Activation Clustering"). The paper reduces with independent
component analysis; the default here is PCA (``reduce="pca"``; ``"ica"`` is FastICA as in the paper)
because on BadNets-poisoned GTSRB (PreAct-ResNet-18, width 16) the ICA components did not separate
the poison (the target label split 1868 / 2263 with poison on both sides) while the top 10
principal components split it exactly (3921 poisoned / 210 genuine). A cluster is then judged
poisonous by one of the paper's analyses:

* ``"size"`` (relative size comparison): the smaller cluster, when it holds at most
  ``size_threshold`` (35 %) of the label. Its premise, that poison is a minority of the label, fails
  when a dirty-label attack relabels many images to a small class (10 % of GTSRB relabelled to
  class 0, which holds 0.5 % of the images, makes 95 % of class 0 poisoned: the measured TPR is 0).
* ``"reference"`` (default): the defender's clean images of the label (held-out data, as every
  other defense here assumes) are assigned to the nearest cluster; a genuine cluster receives
  them in proportion to its size, a poisonous one (nearly) none. A cluster is poisonous when it
  holds at most ``share_ratio`` (0.2) times the share of the clean images its size predicts and a
  one-sided binomial test rejects "its share of the clean images equals its share of the label" at
  level ``alpha`` (1e-6). This stands in for the paper's exclusionary reclassification (retraining
  without each cluster), which is out of reach on a CPU, and does not depend on which cluster is
  larger. Both conditions are needed because held-out images are not distributed exactly like the
  training images (GTSRB's training images come in tracks of 30 frames of one sign, so a cluster
  can be a few tracks): on a clean GTSRB model a genuine cluster of 805 of label 18's 1200 images
  received 21 of 62 clean images (binomial p = 9e-8, but half the predicted share), while BadNets'
  3921 poisoned images of label 0 received none of 10 (p = 1e-13; 2000 clean images). Measured on
  those runs with 1000 or 2000 clean images: TPR 100 % and FPR 0 on BadNets, no label flagged on the
  clean model. With few clean images of a label the test has little power against a poisoned
  minority of share ``s``: it needs ``(1 - s) ** m < alpha`` for the ``m`` clean images of the
  label.

The flagged samples are compared with the run's recorded poison indices.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

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
    CleanSource,
    backdoor_targets,
    batched_features,
    check_fraction,
    check_positive,
    check_source,
    defender_data,
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

Analysis = Literal["reference", "size"]
Reduce = Literal["ica", "pca"]


@dataclass
class LabelClusters:
    """The two clusters of one label.

    Attributes:
        label: the label.
        rows: rows of the scored set with this label ``(n,)``.
        assign: cluster of each row ``(n,)``, 0 or 1.
        reduced: the reduced activations ``(n, dims)``.
        sizes: rows per cluster ``[n0, n1]``.
        silhouette: mean silhouette score of the split (``nan`` when not computed).
        poisonous: cluster judged poisonous (``None``: neither).
        reference_counts: the defender's clean images assigned to each cluster.
        p_values: one-sided binomial p-value of each cluster (``reference`` analysis).
    """

    label: int
    rows: Tensor
    assign: Tensor
    reduced: Tensor
    sizes: list[int]
    silhouette: float = float("nan")
    poisonous: int | None = None
    reference_counts: list[int] = field(default_factory=list)
    p_values: list[float] = field(default_factory=list)
    model: Any = None


def kmeans(x: Tensor, k: int = 2, n_init: int = 10, iters: int = 100, seed: int = 0) -> tuple[Tensor, Tensor]:
    """k-means (Lloyd's algorithm, k-means++ seeding, the best of ``n_init`` restarts by inertia).

    Args:
        x: points ``(n, d)``.
        k: clusters.
        n_init: restarts.
        iters: Lloyd iterations per restart at most.
        seed: seed of the seeding.

    Returns:
        ``(assign (n,), centres (k, d))``.
    """
    g = torch.Generator().manual_seed(seed)
    x = x.double()
    n = x.shape[0]
    best: tuple[float, Tensor, Tensor] | None = None
    for _ in range(n_init):
        centres = x[torch.randint(n, (1,), generator=g)]
        for _c in range(1, k):
            d2 = torch.cdist(x, centres).min(1).values ** 2
            probs = d2 / d2.sum() if float(d2.sum()) > 0 else torch.full((n,), 1.0 / n, dtype=x.dtype)
            centres = torch.cat([centres, x[torch.multinomial(probs, 1, generator=g)]])
        assign = torch.cdist(x, centres).argmin(1)
        for _it in range(iters):
            new_centres = torch.stack([x[assign == j].mean(0) if bool((assign == j).any()) else centres[j] for j in range(k)])
            new_assign = torch.cdist(x, new_centres).argmin(1)
            centres = new_centres
            if torch.equal(new_assign, assign):
                break
            assign = new_assign
        inertia = float(((x - centres[assign]) ** 2).sum())
        if best is None or inertia < best[0]:
            best = (inertia, assign, centres)
    assert best is not None
    return best[1], best[2].float()


def silhouette(x: Tensor, assign: Tensor, samples: int = 2000, seed: int = 0) -> float:
    """Mean silhouette coefficient ``(b - a) / max(a, b)`` of a clustering over a seeded sample of
    at most ``samples`` points (``nan`` with fewer than 2 clusters)."""
    n = x.shape[0]
    if int(torch.unique(assign).numel()) < 2:
        return float("nan")
    if n > samples:
        rows = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:samples]
        x, assign = x[rows], assign[rows]
    d = torch.cdist(x.double(), x.double())
    scores = torch.zeros(x.shape[0], dtype=torch.float64)
    for j in torch.unique(assign).tolist():
        own = assign == j
        if int(own.sum()) < 2:
            continue  # silhouette of a singleton is 0
        a = d[own][:, own].sum(1) / (int(own.sum()) - 1)
        b = torch.stack([d[own][:, assign == o].mean(1) for o in torch.unique(assign).tolist() if o != j]).min(0).values
        scores[own] = (b - a) / torch.maximum(a, b).clamp_min(1e-12)
    return float(scores.mean())


def cluster_label(features: Tensor, dims: int = 10, reduce: Reduce = "pca", seed: int = 0) -> tuple[Tensor, Tensor, Any]:
    """Reduce one label's activations ``(n, d)`` to ``dims`` components and split them in two with
    k-means (10 restarts).

    ``"pca"``: the top principal components of the centred activations; ``"ica"``: scikit-learn's
    FastICA (unit-variance whitening).

    Returns:
        ``(assign (n,) in {0, 1}, reduced (n, dims), project)`` where ``project(features) ->
        (cluster, reduced)`` assigns new activations (the defender's clean images) to the nearest
        cluster in the same reduced space.
    """
    x = features.double()
    k = max(1, min(dims, x.shape[1], x.shape[0] - 1))
    if reduce == "ica":
        from sklearn.decomposition import FastICA

        ica = FastICA(n_components=k, whiten="unit-variance", random_state=seed, max_iter=400, tol=1e-3)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # convergence warnings on near-degenerate labels
            z = torch.as_tensor(ica.fit_transform(x.numpy()))

        def transform(new: Tensor) -> Tensor:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return torch.as_tensor(ica.transform(new.double().numpy()))
    else:
        mean = x.mean(0, keepdim=True)
        _, _, vh = torch.linalg.svd(x - mean, full_matrices=False)
        basis = vh[:k].T  # (d, k)
        z = (x - mean) @ basis

        def transform(new: Tensor) -> Tensor:
            return (new.double() - mean) @ basis

    assign, centres = kmeans(z, 2, seed=seed)

    def project(new: Tensor) -> tuple[Tensor, Tensor]:
        zn = transform(new)
        return torch.cdist(zn, centres.double()).argmin(1), zn.float()

    return assign, z.float(), project


def binomial_lower_tail(k: int, n: int, p: float) -> float:
    """``P(X <= k)`` for ``X ~ Binomial(n, p)``."""
    from scipy.stats import binom

    return float(binom.cdf(k, n, p))


def activation_clustering(
    features: Tensor,
    labels: Tensor,
    num_classes: int,
    reference: Tensor | None = None,
    reference_labels: Tensor | None = None,
    analysis: Analysis = "reference",
    dims: int = 10,
    reduce: Reduce = "pca",
    size_threshold: float = 0.35,
    alpha: float = 1e-6,
    share_ratio: float = 0.2,
    silhouette_samples: int = 2000,
    seed: int = 0,
) -> tuple[Tensor, list[LabelClusters]]:
    """Activation clustering of a training set.

    Args:
        features: last-hidden-layer activations ``(N, d)`` of the training samples.
        labels: their training labels ``(N,)``.
        num_classes: number of labels.
        reference, reference_labels: the defender's clean activations ``(M, d)`` and labels
            ``(M,)`` (needed for ``analysis="reference"``).
        analysis: ``"reference"`` or ``"size"`` (see the module docstring).
        dims: reduced dimensions (10 in the paper).
        reduce: ``"pca"`` or ``"ica"`` (FastICA, the paper's choice).
        size_threshold: largest relative size of a poisonous cluster (``size``).
        alpha: level of the binomial test (``reference``).
        share_ratio: largest ratio of a poisonous cluster's share of the clean images to its share
            of the label (``reference``).
        silhouette_samples: rows of a label sampled for its silhouette score (0: skip).
        seed: seed of ICA, k-means and the silhouette sample.

    Returns:
        ``(flags, clusters)``: a bool ``(N,)`` marking the rows of poisonous clusters and one
        :class:`LabelClusters` per label with at least 4 samples.
    """
    if analysis not in ("reference", "size"):
        raise ConfigError(f"analysis must be 'reference' or 'size', got {analysis!r}")
    if analysis == "reference" and (reference is None or reference_labels is None):
        raise ConfigError("the reference analysis needs the defender's clean activations")
    flags = torch.zeros(labels.numel(), dtype=torch.bool)
    out: list[LabelClusters] = []
    for y in range(num_classes):
        rows = torch.nonzero(labels == y).flatten()
        if rows.numel() < 4:
            continue
        assign, z, project = cluster_label(features[rows], dims, reduce, seed)
        sizes = [int((assign == j).sum()) for j in (0, 1)]
        lc = LabelClusters(label=y, rows=rows, assign=assign, reduced=z, sizes=sizes, model=project)
        if silhouette_samples and min(sizes) > 0:
            lc.silhouette = silhouette(z, assign, silhouette_samples, seed)
        if analysis == "size":
            small = int(sizes[1] < sizes[0])
            if sizes[small] / rows.numel() <= size_threshold:
                lc.poisonous = small
        else:
            assert reference is not None and reference_labels is not None
            ref = reference[reference_labels == y]
            if ref.shape[0]:
                ref_assign, _ = project(ref)
                counts = [int((ref_assign == j).sum()) for j in (0, 1)]
                pv = [binomial_lower_tail(counts[j], ref.shape[0], sizes[j] / rows.numel()) for j in (0, 1)]
                lc.reference_counts, lc.p_values = counts, pv
                j = int(pv[1] < pv[0])
                predicted = sizes[j] / rows.numel()
                if pv[j] < alpha and counts[j] / ref.shape[0] <= share_ratio * predicted:
                    lc.poisonous = j
        if lc.poisonous is not None:
            flags[rows[assign == lc.poisonous]] = True
        out.append(lc)
    return flags, out


@register_defense("activation_clustering")
class ActivationClustering(Detector):
    """Activation clustering (Chen et al., 2018): split every label's activations in two and flag
    the poisonous cluster; compare with the run's recorded poison indices.

    Options (``Config``):
        analysis: ``"reference"`` (default) or ``"size"`` (see the module docstring).
        dims: reduced dimensions (default 10), reduce: ``"pca"`` (default) or ``"ica"`` (the paper's).
        size_threshold: relative-size limit of the ``size`` analysis (default 0.35).
        alpha, share_ratio: the ``reference`` analysis' binomial test level and share ratio
            (default 1e-6 and 0.2).
        clean_images: the defender's clean images for the ``reference`` analysis (default 2000, so
            that GTSRB's smallest labels get about 10; more images also resolve the train / test
            difference: 4000 flagged one clean label of the clean GTSRB model; the bundled GTSRB
            sample's 1075 test images need ``clean_images=1000`` or ``clean_source="train"``).
        clean_source: ``"test"`` (default) or ``"train"``.
        train_images: score a seeded random subset of this many training rows (default all).
        seed: seed of the subsets, ICA and k-means.

    Writes ``figures/activation_clustering.png`` (the two clusters of the target labels in the
    first two reduced dimensions, poisoned samples marked), ``tables/activation_clustering.json``
    (per label) and ``activation_clustering_flagged.json``.

    Result: :class:`DetectionResult`; ``detected`` whether any label holds a poisonous cluster,
    ``flagged`` the flagged training rows, ``metrics``: ``tpr``, ``fpr``, ``precision`` against the
    recorded poison indices, ``extra``: ``poisoned_labels`` (labels with a poisonous cluster),
    sizes and settings.
    """

    @dataclass(frozen=True)
    class Config(DefenseConfig):
        analysis: Analysis = "reference"
        dims: int = 10
        reduce: Reduce = "pca"
        size_threshold: float = 0.35
        alpha: float = 1e-6
        share_ratio: float = 0.2
        clean_images: int = 2000
        clean_source: CleanSource = "test"
        train_images: int | None = None
        seed: int = 0

        def __post_init__(self) -> None:
            check_source(self.clean_source)
            if self.analysis not in ("reference", "size"):
                raise ConfigError(f"analysis must be 'reference' or 'size', got {self.analysis!r}")
            if self.reduce not in ("ica", "pca"):
                raise ConfigError(f"reduce must be 'ica' or 'pca', got {self.reduce!r}")
            check_positive(self.dims, "dims")
            check_positive(self.clean_images, "clean_images")
            check_fraction(self.size_threshold, "size_threshold", high=0.5, closed=False)
            check_fraction(self.alpha, "alpha", closed=False)
            check_fraction(self.share_ratio, "share_ratio", closed=False)
            if self.train_images is not None:
                check_positive(self.train_images, "train_images")

    config: Config

    def run(self, loaded: LoadedRun, train: ImageDataset, test: ImageDataset, out_dir: Path) -> DetectionResult:
        cfg = self.config
        model = loaded.model
        data, truth, rows = poisoned_training_set(loaded, train, cfg.train_images, cfg.seed, self.name)
        ref_feats = ref_labels = None
        n_ref = 0
        if cfg.analysis == "reference":
            clean, _ = defender_data(train, test, cfg.clean_images, cfg.clean_source, cfg.seed, self.name)
            ref_feats = batched_features(model, clean.images, desc="features (clean)", progress=self.progress)
            ref_labels = clean.labels
            n_ref = len(clean)
        feats = batched_features(model, data.images, desc="features (training set)", progress=self.progress)
        flags, clusters = activation_clustering(
            feats, data.labels, data.num_classes, ref_feats, ref_labels, analysis=cfg.analysis, dims=cfg.dims,
            reduce=cfg.reduce, size_threshold=cfg.size_threshold, alpha=cfg.alpha, share_ratio=cfg.share_ratio,
            seed=cfg.seed,
        )
        rates = detection_rates(flags, truth)
        poisoned_labels = [c.label for c in clusters if c.poisonous is not None]
        log.info("activation clustering (%s): poisonous clusters in labels %s; flagged %d rows; TPR %.4f, FPR %.4f",
                 cfg.analysis, poisoned_labels, int(flags.sum()), rates["tpr"], rates["fpr"])
        flagged_rows = rows[flags].tolist()
        targets = backdoor_targets(loaded, test)
        title = run_title(loaded)

        table: list[list[Any]] = []
        for c in clusters:
            m = torch.zeros(len(data), dtype=torch.bool)
            m[c.rows] = True
            small = min(c.sizes) / max(1, sum(c.sizes))
            table.append([
                c.label, sum(c.sizes), int((m & truth).sum()), f"{c.sizes[0]} / {c.sizes[1]}", round(100 * small, 1),
                None if math.isnan(c.silhouette) else round(c.silhouette, 3),
                " / ".join(str(v) for v in c.reference_counts) if c.reference_counts else None,
                float(f"{min(c.p_values):.3g}") if c.p_values else None,
                "" if c.poisonous is None else f"cluster {c.poisonous}", int((m & flags & truth).sum()),
            ])
        atomic_write_json(
            out_dir / "tables" / "activation_clustering.json",
            {
                "title": f"Activation clustering ({cfg.analysis} analysis): {title}",
                "columns": ["label", "training images", "poisoned", "cluster sizes", "smaller cluster %", "silhouette",
                            "clean images per cluster", "min p-value", "poisonous", "poisoned flagged"],
                "rows": table,
                "note": f"{cfg.reduce.upper()} to {cfg.dims} dimensions, 2-means per label; "
                f"TPR {pct(rates['tpr'])} %, FPR {pct(rates['fpr'])} % against the recorded poison indices"
                + (f"; {n_ref} clean images, binomial test at alpha {cfg.alpha:g}, share ratio {cfg.share_ratio:g}"
                   if cfg.analysis == "reference" else
                   f"; smaller cluster <= {100 * cfg.size_threshold:g} % is poisonous"),
            },
        )
        atomic_write_json(out_dir / "activation_clustering_flagged.json", {"flagged_rows": flagged_rows})
        shown = [c for c in clusters if targets and c.label in targets][:3]
        if not shown:
            shown = [c for c in clusters if c.poisonous is not None][:3] or sorted(
                clusters, key=lambda c: -(-1 if math.isnan(c.silhouette) else c.silhouette))[:2]
        if shown:
            atomic_write_bytes(out_dir / "figures" / "activation_clustering.png", _clusters_png(shown, truth, title))
        return DetectionResult(
            defense=self.name,
            detected=bool(poisoned_labels),
            flagged=flagged_rows,
            metrics={k: rates[k] for k in ("tpr", "fpr", "precision")},
            extra={
                "poisoned_labels": poisoned_labels,
                "targets": targets,
                "flagged_count": int(flags.sum()),
                "poisoned_count": int(truth.sum()),
                "train_images": len(data),
                "clean_images": n_ref,
                "flagged_file": "activation_clustering_flagged.json",
            },
        )


def _clusters_png(shown: list[LabelClusters], truth: Tensor, title: str) -> bytes:
    """Each shown label's samples in its first two reduced dimensions, coloured by cluster,
    recorded poisoned samples marked with crosses."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(shown), figsize=(4.2 * len(shown), 3.6), squeeze=False)
    for ax, c in zip(axes[0], shown):
        z = c.reduced
        zy = z[:, 1] if z.shape[1] > 1 else torch.zeros(z.shape[0])
        t = truth[c.rows]
        for j, colour in ((0, "C0"), (1, "C2")):
            m = c.assign == j
            tag = " (poisonous)" if c.poisonous == j else ""
            ax.scatter(z[m, 0].tolist(), zy[m].tolist(), s=5, color=colour, alpha=0.5, label=f"cluster {j}: {int(m.sum())}{tag}")
        if bool(t.any()):
            ax.scatter(z[t, 0].tolist(), zy[t].tolist(), s=8, marker="x", color="C3", alpha=0.5, label=f"recorded poison: {int(t.sum())}")
        ax.set_title(f"label {c.label}", fontsize=9)
        ax.set_xlabel("component 1")
        ax.set_ylabel("component 2")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(f"Activation clustering: {title}", fontsize=9)
    fig.tight_layout()
    return figure_png(fig)
