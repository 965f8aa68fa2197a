"""Classification metrics: clean accuracy and attack success rate.

All functions are pure: they read tensors on any device and return Python floats
(:func:`per_label_success_rate` returns a tensor on the input's device). ``predictions`` may be either
predicted class indices of shape ``(N,)`` or raw scores (logits, probabilities) of shape
``(N, K)``, in which case the arg-max over the last dimension is the prediction.

The attack success rate follows the usual definition in the backdoor literature (e.g. BackdoorBench,
Wu et al., NeurIPS 2022 Datasets and Benchmarks): the share of triggered inputs that the model
classifies as the attacker's target label, counted only over inputs whose true label differs from
the target, since an input that already belongs to the target class says nothing about the
backdoor.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["accuracy", "attack_success_rate", "per_label_success_rate"]


def _as_classes(predictions: Tensor) -> Tensor:
    """Class indices ``(N,)`` from indices ``(N,)`` or scores ``(N, K)``."""
    if not isinstance(predictions, Tensor):
        raise TypeError(f"predictions must be a torch.Tensor, got {type(predictions).__name__}")
    if predictions.dim() == 2:
        return predictions.argmax(dim=1)
    if predictions.dim() == 1:
        if predictions.is_floating_point() or predictions.is_complex():
            raise ValueError(
                "1-D predictions must be integer class indices; pass scores as (N, K) to take the arg-max"
            )
        return predictions.long()
    raise ValueError(f"predictions must have shape (N,) or (N, K), got {tuple(predictions.shape)}")


def _as_labels(labels: Tensor | int, n: int, name: str, device: torch.device) -> Tensor:
    """Integer labels ``(n,)``; an ``int`` (or 0-d tensor) is broadcast to every row."""
    if isinstance(labels, int) or (isinstance(labels, Tensor) and labels.dim() == 0):
        return torch.full((n,), int(labels), dtype=torch.long, device=device)
    if not isinstance(labels, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or an int, got {type(labels).__name__}")
    if labels.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},) to match predictions, got {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"{name} must hold integer class indices, got dtype {labels.dtype}")
    return labels.long()


def accuracy(predictions: Tensor, labels: Tensor) -> float:
    """Share of rows whose predicted class equals the label.

    Args:
        predictions: class indices ``(N,)`` or scores ``(N, K)``.
        labels: true class indices ``(N,)``.

    Returns:
        The accuracy in ``[0, 1]``.

    Raises:
        ValueError: on mismatched shapes or an empty batch.

    Example:
        >>> accuracy(torch.tensor([[0.1, 0.9], [0.8, 0.2]]), torch.tensor([1, 1]))
        0.5
    """
    pred = _as_classes(predictions)
    n = int(pred.shape[0])
    target = _as_labels(labels, n, "labels", pred.device)
    if n == 0:
        raise ValueError("accuracy of an empty batch is undefined")
    return float((pred == target).double().mean().item())


def _eligible(predictions: Tensor, target_labels: Tensor | int, true_labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    pred = _as_classes(predictions)
    n = int(pred.shape[0])
    target = _as_labels(target_labels, n, "target_labels", pred.device)
    true = _as_labels(true_labels, n, "true_labels", pred.device)
    return pred, target, true != target


def attack_success_rate(predictions: Tensor, target_labels: Tensor | int, true_labels: Tensor) -> float:
    """Attack success rate (ASR): share of triggered inputs classified as their target label.

    Only rows whose true label differs from their target label count (the usual definition: a
    target-class input classified as the target class is not a success of the backdoor). This works
    for all-to-one attacks (one target for every row; pass an ``int``) and for all-to-all or
    multi-target attacks (one target per row).

    Args:
        predictions: the model's output on triggered inputs: class indices ``(N,)`` or scores ``(N, K)``.
        target_labels: the attacker's target label per row ``(N,)``, or one ``int`` for all rows.
        true_labels: the inputs' true labels ``(N,)``.

    Returns:
        The ASR in ``[0, 1]``.

    Raises:
        ValueError: on mismatched shapes, or when no row has a true label different from its target.

    Example:
        >>> preds = torch.tensor([0, 0, 1, 0])
        >>> attack_success_rate(preds, 0, torch.tensor([0, 1, 1, 2]))  # row 0 is excluded
        0.6666666666666666
    """
    pred, target, eligible = _eligible(predictions, target_labels, true_labels)
    count = int(eligible.sum().item())
    if count == 0:
        raise ValueError(
            "attack success rate is undefined: every row's true label equals its target label "
            "(remove target-class rows before triggering, or pass a batch with other classes)"
        )
    hits = (pred == target) & eligible
    return float(hits.sum().item()) / count


def per_label_success_rate(
    predictions: Tensor, target_labels: Tensor | int, true_labels: Tensor, num_classes: int
) -> Tensor:
    """Attack success rate per target label, for all-to-all or all-targets evaluation.

    Entry ``t`` is the share of rows with target label ``t`` (and a true label other than ``t``)
    that the model classifies as ``t``. Labels with no such row are ``NaN``.

    Args:
        predictions: class indices ``(N,)`` or scores ``(N, K)``.
        target_labels: target label per row ``(N,)`` or one ``int``.
        true_labels: true labels ``(N,)``.
        num_classes: number of classes ``K``; target labels must lie in ``[0, K)``.

    Returns:
        ``float64`` tensor ``(num_classes,)`` on the predictions' device.

    Example:
        >>> per_label_success_rate(torch.tensor([1, 0, 1]), torch.tensor([1, 1, 0]),
        ...                        torch.tensor([0, 2, 2]), num_classes=3)
        tensor([0.0000, 0.5000,    nan], dtype=torch.float64)
    """
    if num_classes <= 0:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    pred, target, eligible = _eligible(predictions, target_labels, true_labels)
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= num_classes):
        raise ValueError(f"target labels must lie in [0, {num_classes}), got range "
                         f"[{int(target.min())}, {int(target.max())}]")
    t = target[eligible]
    hits = (pred[eligible] == t).double()
    totals = torch.bincount(t, minlength=num_classes).double()
    successes = torch.zeros(num_classes, dtype=torch.float64, device=pred.device).index_add_(0, t, hits)
    return torch.where(totals > 0, successes / totals.clamp(min=1), torch.full_like(totals, float("nan")))
