"""Helpers shared by the model-inspection defenses (Neural Cleanse, fine-pruning, STRIP, Grad-CAM,
spectral signatures, activation clustering).

* :func:`defender_data`: the clean images a defender holds, a seeded stratified subset of the run's
  test split (default; the evaluation then uses the remaining test images) or of its clean training
  split, with a clear :class:`~veil.errors.ConfigError` when the budget exceeds the data;
* :func:`batched_logits`, :func:`batched_features`: inference in batches with a progress bar;
* :func:`auroc`: the area under the ROC curve (Mann-Whitney U statistic);
* :func:`backdoor_targets`: the labels a run's backdoor leads to (ground truth for detectors);
* :func:`pyplot` and :func:`figure_png`: matplotlib on the Agg backend, figures as PNG bytes.
"""

from __future__ import annotations

import io
import logging
import math
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from veil.data.base import ImageDataset, stratified_subset, to_float
from veil.errors import ConfigError
from veil.inference import batched, module_device

if TYPE_CHECKING:
    from veil.runs import LoadedRun

log = logging.getLogger(__name__)

CleanSource = Literal["test", "train"]
CLEAN_SOURCES = ("test", "train")


# ---------------------------------------------------------------------- option checks
def check_positive(value: Any, name: str, allow_zero: bool = False) -> None:
    """:class:`ConfigError` unless ``value`` is an ``int`` > 0 (or >= 0 with ``allow_zero``)."""
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")


def check_fraction(value: Any, name: str, low: float = 0.0, high: float = 1.0, closed: bool = True) -> None:
    """:class:`ConfigError` unless ``low < value <= high`` (``low <= value`` when ``closed``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    ok = (low <= value <= high) if closed else (low < value <= high)
    if not ok:
        span = f"[{low}, {high}]" if closed else f"({low}, {high}]"
        raise ConfigError(f"{name} must be in {span}, got {value!r}")


def check_source(value: Any) -> None:
    if value not in CLEAN_SOURCES:
        raise ConfigError(f"clean_source must be one of {', '.join(CLEAN_SOURCES)}, got {value!r}")


# ---------------------------------------------------------------------- the defender's data
def _stratified_rows(labels: Tensor, num_classes: int, n: int, seed: int) -> Tensor:
    """The rows :func:`veil.data.stratified_subset` picks (same draw, ascending order).

    The rows are read back by running it on a proxy dataset whose 1x1 "images" spell each row's
    index in base 256, so the choice is exactly the library's.
    """
    idx = torch.arange(labels.numel(), dtype=torch.long)
    digits = torch.stack([(idx >> (8 * k)) & 255 for k in range(4)], dim=1).to(torch.uint8)
    proxy = ImageDataset(digits.view(-1, 4, 1, 1), labels.clone(), [str(c) for c in range(num_classes)], "rows", False)
    sub = stratified_subset(proxy, n, seed=seed)
    d = sub.images.view(-1, 4).long()
    return d[:, 0] | (d[:, 1] << 8) | (d[:, 2] << 16) | (d[:, 3] << 24)


def defender_data(
    train: ImageDataset,
    test: ImageDataset,
    n: int,
    source: CleanSource = "test",
    seed: int = 0,
    defense: str = "defense",
) -> tuple[ImageDataset, ImageDataset]:
    """The defender's clean images and the test images left for evaluation.

    Args:
        train: the run's clean (un-poisoned) training split.
        test: the run's clean test split (after ``--test-subset``).
        n: the defender's budget of clean images.
        source: ``"test"`` (held-out data, the usual assumption of Neural Cleanse, STRIP and
            fine-pruning): a stratified subset of ``test``; the evaluation set is the rest of
            ``test``. ``"train"``: a stratified subset of the clean training split; the evaluation
            set is all of ``test``.
        seed: seed of the subset.
        defense: the defense's name, for error messages.

    Returns:
        ``(clean, evaluation)``, both :class:`~veil.data.ImageDataset`.

    Raises:
        ConfigError: ``n`` is not positive, exceeds the images available (``source="test"`` must
            leave at least one test image per class for evaluation), or cannot hold every class.
    """
    check_source(source)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"defense {defense!r}: clean_images must be a positive integer, got {n!r}")
    if source == "train":
        if n > len(train):
            raise ConfigError(
                f"defense {defense!r}: clean-data budget clean_images={n} is larger than the run's "
                f"{len(train)} clean training images"
            )
        rows = _stratified_rows(train.labels, train.num_classes, n, seed) if n < len(train) else torch.arange(len(train))
        return train.subset(rows), test
    present = int((torch.bincount(test.labels, minlength=test.num_classes) > 0).sum())
    if n > len(test) - present:
        raise ConfigError(
            f"defense {defense!r}: clean-data budget clean_images={n} is larger than the {len(test)} test images "
            f"available minus {present} kept for evaluation; lower clean_images or use --opt clean_source=train"
        )
    rows = _stratified_rows(test.labels, test.num_classes, n, seed)
    keep = torch.ones(len(test), dtype=torch.bool)
    keep[rows] = False
    return test.subset(rows), test.subset(torch.nonzero(keep).flatten())


def seeded_rows(n_total: int, k: int, seed: int) -> Tensor:
    """``min(k, n_total)`` distinct rows of ``range(n_total)`` drawn with ``seed``, ascending."""
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n_total, generator=g)[: min(k, n_total)].sort().values


def input_detection_sets(
    loaded: LoadedRun, train: ImageDataset, test: ImageDataset, clean_images: int, clean_source: CleanSource,
    test_images: int, seed: int, defense: str,
) -> tuple[ImageDataset, ImageDataset, ImageDataset]:
    """What an input-level detector (STRIP, FTD, patch processing) reads: the defender's clean
    images (:func:`defender_data`), up to ``test_images`` clean evaluation inputs and up to
    ``test_images`` of the attack's triggered evaluation inputs (seeds ``seed + 1`` and ``seed + 2``)."""
    clean, evaluation = defender_data(train, test, clean_images, clean_source, seed, defense)
    clean_test = evaluation.subset(seeded_rows(len(evaluation), test_images, seed + 1))
    # triggered inputs: non-target evaluation images with the attack's test-time trigger
    poisoned_all = loaded.attack.poison_test(evaluation)
    return clean, clean_test, poisoned_all.subset(seeded_rows(len(poisoned_all), test_images, seed + 2))


# ---------------------------------------------------------------------- batched inference
def batched_logits(model: nn.Module, images: Tensor, batch_size: int = 256, desc: str = "logits", progress: bool = False) -> Tensor:
    """Logits ``(N, num_classes)`` (float32, CPU) of uint8 or float ``[0, 1]`` images ``(N, C, H, W)``,
    in eval mode (:func:`veil.inference.batched`)."""
    return batched(model, images, batch_size=batch_size, progress=progress, desc=desc)


def batched_features(model: nn.Module, images: Tensor, batch_size: int = 256, desc: str = "features", progress: bool = False) -> Tensor:
    """Penultimate features ``(N, feature_dim)`` (float32, CPU) from ``model.features``, in eval mode."""
    if not hasattr(model, "features"):
        raise ConfigError(f"model {type(model).__name__} has no features() method")
    return batched(model, images, lambda m, x: m.features(x).float(), batch_size=batch_size, progress=progress, desc=desc)


# ---------------------------------------------------------------------- metrics
def auroc(positive: Tensor, negative: Tensor) -> float:
    """Area under the ROC curve of scores where higher means "positive".

    Computed as the Mann-Whitney U statistic with ties counted half:
    ``AUROC = P(s_pos > s_neg) + 0.5 P(s_pos = s_neg)``. ``nan`` when either set is empty.

    Args:
        positive: scores ``(P,)`` of the positive class (e.g. triggered inputs).
        negative: scores ``(M,)`` of the negative class (e.g. clean inputs).

    Example:
        >>> auroc(torch.tensor([3.0, 4.0]), torch.tensor([1.0, 2.0]))
        1.0
    """
    pos, neg = positive.double().flatten(), negative.double().flatten()
    if pos.numel() == 0 or neg.numel() == 0:
        return float("nan")
    scores = torch.cat([pos, neg])
    # average ranks (1-based) with ties sharing their mean rank
    order = torch.argsort(scores, stable=True)
    sorted_scores = scores[order]
    ranks = torch.empty_like(scores)
    _, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    mean_rank = ends - (counts.double() - 1) / 2
    ranks[order] = mean_rank[inverse]
    u = ranks[: pos.numel()].sum() - pos.numel() * (pos.numel() + 1) / 2
    return float(u / (pos.numel() * neg.numel()))


def detection_rates(flagged: Tensor, truth: Tensor) -> dict[str, float]:
    """True- and false-positive rates of boolean ``flagged`` against boolean ``truth`` (same shape).

    Returns ``{"tpr", "fpr", "precision", "flagged", "positives"}``; a rate with an empty
    denominator is ``nan``.
    """
    flagged, truth = flagged.bool(), truth.bool()
    tp = int((flagged & truth).sum())
    fp = int((flagged & ~truth).sum())
    pos, neg = int(truth.sum()), int((~truth).sum())
    nan = float("nan")
    return {
        "tpr": tp / pos if pos else nan,
        "fpr": fp / neg if neg else nan,
        "precision": tp / (tp + fp) if tp + fp else nan,
        "flagged": float(tp + fp),
        "positives": float(pos),
    }


def backdoor_targets(loaded: LoadedRun, test: ImageDataset) -> list[int] | None:
    """The labels the run's backdoor leads to (sorted), or ``None`` for a clean reference run
    (attack ``none``): ground truth for model-level detectors."""
    if loaded.config.attack == "none":
        return None
    targets = loaded.attack.target_labels(test.labels)
    return sorted({int(t) for t in targets[test.labels != targets].tolist()})


def run_title(loaded: LoadedRun) -> str:
    c = loaded.config
    return f"{c.attack} on {c.dataset} ({c.model})"


def pct(v: float | None) -> float | None:
    """A fraction as a percentage rounded to 2 decimals (``None`` and ``nan`` kept)."""
    if v is None or math.isnan(v):
        return v
    return round(100.0 * v, 2)


# ---------------------------------------------------------------------- figures
def pyplot() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_png(fig: Any, dpi: int = 110) -> bytes:
    """Encode a matplotlib figure as PNG bytes and close it."""
    plt = pyplot()
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    return buf.getvalue()


def to_hwc(image: Tensor) -> Any:
    """One ``(C, H, W)`` image in ``[0, 1]`` (or uint8) as an ``(H, W, C)`` numpy array for imshow
    (grayscale as ``(H, W)``)."""
    x = to_float(image) if image.dtype == torch.uint8 else image.float()
    x = x.detach().cpu().clamp(0, 1)
    return x[0].numpy() if x.shape[0] == 1 else x.permute(1, 2, 0).numpy()


# ---------------------------------------------------------------------- the training set a run saw
def poisoned_training_set(
    loaded: LoadedRun, train: ImageDataset, n: int | None = None, seed: int = 0, defense: str = "defense"
) -> tuple[ImageDataset, Tensor, Tensor]:
    """The run's training set as the attack poisoned it (recorded poison indices), for data-level
    detectors (spectral signatures, activation clustering).

    Args:
        loaded: the run.
        train: its clean training split.
        n: score only a seeded random subset of this many rows (``None``: all).
        seed: seed of that subset.
        defense: the defense's name, for error messages.

    Returns:
        ``(data, is_poison, rows)``: the (subset of the) poisoned training set with its training
        labels, a bool ``(N,)`` marking the recorded poisoned rows, and the rows' indices in the
        full training set ``(N,)``.

    Raises:
        ConfigError: ``n`` exceeds the training set.
    """
    poisoned = loaded.poisoned_train(train)
    truth = torch.zeros(len(poisoned), dtype=torch.bool)
    truth[poisoned.poison_indices] = True
    rows = torch.arange(len(poisoned))
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"defense {defense!r}: train_images must be a positive integer, got {n!r}")
        if n > len(poisoned):
            raise ConfigError(f"defense {defense!r}: train_images={n} is larger than the run's {len(poisoned)} training images")
        rows = seeded_rows(len(poisoned), n, seed)
    data = ImageDataset(poisoned.images[rows], poisoned.labels[rows], poisoned.classes, poisoned.name, poisoned.hflip)
    return data, truth[rows], rows


def reference_model(loaded: LoadedRun, path: str) -> nn.Module:
    """The classifier of a clean reference run (attack ``none``) trained on the same data as
    ``loaded``, on the same device.

    Raises:
        ConfigError: the reference was trained on another dataset or image size.
        RecordError, CheckpointError: the folder holds no finished run or no weights.
    """
    from veil.runs import load_run

    ref = load_run(path, device=module_device(loaded.model))
    a, b = ref.config, loaded.config
    if (a.dataset, a.image_size) != (b.dataset, b.image_size):
        raise ConfigError(
            f"reference run {path} was trained on {a.dataset} at {a.image_size}px, the defended run on "
            f"{b.dataset} at {b.image_size}px"
        )
    if a.attack != "none":
        log.warning("reference run %s was trained with attack %r, not as a clean reference", path, a.attack)
    return ref.model


def train_constant(model: nn.Module, data: ImageDataset, epochs: int, lr: float, batch_size: int, momentum: float,
                   weight_decay: float, seed: int, hooks: Any = (), progress: bool = False) -> list[dict[str, Any]]:
    """``epochs`` of SGD (Nesterov) at the constant rate ``lr`` on ``data`` through veil's trainer,
    with training ``hooks``; the trainer's history. For defenses that fine-tune or distil."""
    from veil.train import TrainConfig, Trainer

    tc = TrainConfig(epochs=epochs, batch_size=min(batch_size, len(data)), lr=lr, momentum=momentum,
                     weight_decay=weight_decay, schedule="constant", seed=seed, checkpoint_every=0)
    return Trainer(model, data, tc, hooks=list(hooks), device=module_device(model), progress=progress).fit()
