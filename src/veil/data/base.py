"""In-memory image datasets as uint8 tensors.

Every dataset in veil is held as one ``uint8`` tensor of shape ``(N, C, H, W)`` plus an ``int64``
label tensor. Images are converted to float in ``[0, 1]`` only per batch, on the training device
(see :mod:`veil.data.augment`), which is what makes the training loop fast on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from veil.errors import ConfigError


def to_float(images: Tensor) -> Tensor:
    """``uint8`` images in ``[0, 255]`` to ``float32`` in ``[0, 1]``."""
    return images.float().div_(255.0)


def to_uint8(images: Tensor) -> Tensor:
    """Float images in ``[0, 1]`` to ``uint8``, rounding as a saved 8-bit image would."""
    return images.detach().mul(255.0).round_().clamp_(0, 255).to(torch.uint8)


def quantize(images: Tensor) -> Tensor:
    """Round float images in ``[0, 1]`` to the 8-bit grid, keeping them float."""
    return images.mul(255.0).round().clamp(0, 255).div(255.0)


@dataclass
class ImageDataset:
    """Images and labels held in memory.

    Attributes:
        images: ``uint8`` tensor ``(N, C, H, W)``.
        labels: ``int64`` tensor ``(N,)``.
        classes: class names; ``len(classes)`` is the number of classes.
        name: dataset name, for records and logs.
        hflip: whether a horizontal flip preserves labels (False for traffic signs).
    """

    images: Tensor
    labels: Tensor
    classes: list[str]
    name: str = "dataset"
    hflip: bool = True

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"labels must have shape ({self.images.shape[0]},), got {tuple(self.labels.shape)}")
        self.labels = self.labels.long()

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c, h, w = self.images.shape[1:]
        return int(c), int(h), int(w)

    def subset(self, indices: Tensor) -> ImageDataset:
        """A new dataset with the rows at ``indices`` (kept in the given order)."""
        indices = torch.as_tensor(indices, dtype=torch.long)
        return replace(self, images=self.images[indices], labels=self.labels[indices])


@dataclass
class PoisonedDataset(ImageDataset):
    """A training set after an attack poisoned it; remembers which rows were changed.

    Attributes:
        poison_indices: sorted row indices whose image (and, for dirty-label attacks, label) the
            attack changed to plant the backdoor.
        original_labels: the labels before poisoning.
        extra_indices: rows changed for another purpose and keeping their label (for example
            WaNet's noise-mode samples); empty for most attacks.
    """

    poison_indices: Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    original_labels: Tensor | None = None
    extra_indices: Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))

    @property
    def poison_count(self) -> int:
        return int(self.poison_indices.numel())


def stratified_subset(dataset: ImageDataset, n: int, seed: int = 0) -> ImageDataset:
    """Pick ``n`` rows keeping class proportions (every class keeps at least one row if it can).

    Deterministic under ``seed``; rows are returned in ascending index order.
    """
    total = len(dataset)
    if n <= 0:
        raise ValueError(f"subset size must be positive, got {n}")
    if n >= total:
        return dataset
    g = torch.Generator().manual_seed(seed)
    labels = dataset.labels
    counts = torch.bincount(labels, minlength=dataset.num_classes).double()
    present = int((counts > 0).sum())
    if n < present:
        raise ConfigError(
            f"a stratified subset of {n} images cannot hold the {present} classes present; ask for at least {present}"
        )
    quota = counts * (n / total)
    base = quota.floor().long()
    base = torch.where((counts > 0) & (base == 0), torch.ones_like(base), base)
    # hand out the remainder by largest fractional part
    remainder = n - int(base.sum())
    if remainder > 0:
        frac = (quota - quota.floor())
        frac = torch.where(base < counts.long(), frac, torch.full_like(frac, -1.0))
        order = torch.argsort(frac, descending=True, stable=True)
        for c in order[:remainder]:
            base[c] += 1
    elif remainder < 0:
        order = torch.argsort(base, descending=True, stable=True)
        i = 0
        while remainder < 0:
            c = order[i % len(order)]
            if base[c] > 1:
                base[c] -= 1
                remainder += 1
            i += 1
    chosen = []
    for c in range(dataset.num_classes):
        rows = torch.nonzero(labels == c).flatten()
        if rows.numel() == 0:
            continue
        k = int(min(base[c], rows.numel()))
        perm = torch.randperm(rows.numel(), generator=g)[:k]
        chosen.append(rows[perm])
    idx = torch.cat(chosen).sort().values
    return dataset.subset(idx)
