"""The attacker's answer to pre-processing defenses: train on JPEG-compressed and/or autoencoded
images (Section 5.4 and Tables 6-8 of the frequency-domain backdoor paper).

The paper: "The attacker can apply augmentation with compression and/or autoencoded versions of
the poisoned images. Augmenting the training process with compressed or autoencoded poisoned images
translates to embedding multiple versions of the backdoor into the model", and its Figure 5 uses
"augmentation on JPEG compressed images for both clean and poisoned images". veil therefore
augments *every* training image by default (clean ones too, so the model also keeps its clean
accuracy on compressed inputs); :class:`CompressionAugment` can be limited to the poisoned rows with
``only_poisoned=True``.

``RunConfig.augment`` (``veil run --augment``) takes ``jpeg``, ``autoencoder`` or
``jpeg+autoencoder``; :func:`build_augment_hook` turns it into a :class:`veil.train.TrainHook` whose
:meth:`~CompressionAugment.transform_batch` replaces a random share of each batch (before the crop
augmentation) with compressed or autoencoded versions.

Defaults and why:

* ``p = 0.5``: half of the images of each batch are replaced, so the model still sees every
  image unchanged about half of the time (clean accuracy on uncompressed inputs is kept).
* JPEG quality uniform in ``[50, 95]``: covers the whole default sweep of the ``jpeg`` defense
  (95, 90, 80, 70, 60, 50; Figure 5 goes to 25 %+ compression) without spending training on
  qualities no defender would use because they cost too much clean accuracy.
* The autoencoder (:mod:`veil.autoencoder`) is trained for 5 epochs on the clean training set
  (the attacker has it) once per run and cached in ``RUN/augment_autoencoder.safetensors``; a
  resumed run reuses it. Its seed is offset from the run's seed (``seed + AUTOENCODER_SEED_OFFSET``)
  so that it is never, by coincidence of seeds, the very model the ``autoencoder`` defense trains
  (same recipe, same clean data, defense seed 0): the attacker anticipates the kind of defense,
  not the defender's weights.
* For ``jpeg+autoencoder`` each replaced image gets one of the two, chosen with equal probability.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from veil.data.base import ImageDataset
from veil.errors import ConfigError
from veil.train import Batch, StepContext, TrainHook

log = logging.getLogger(__name__)

#: the augmentations, in canonical order
KINDS = ("jpeg", "autoencoder")
#: values ``RunConfig.augment`` accepts
VALID_SPECS = ("jpeg", "autoencoder", "jpeg+autoencoder")
#: file the augmentation's autoencoder is cached in, inside the run folder
AUTOENCODER_FILE = "augment_autoencoder.safetensors"

DEFAULT_P = 0.5
DEFAULT_QUALITY = (50, 95)
DEFAULT_AUTOENCODER_EPOCHS = 5
AUTOENCODER_SEED_OFFSET = 1_000


def parse_augment(spec: str) -> tuple[str, ...]:
    """Split an augmentation spec into its parts, in canonical order.

    Example:
        >>> parse_augment("jpeg+autoencoder")
        ('jpeg', 'autoencoder')

    Raises:
        ConfigError: anything but ``jpeg``, ``autoencoder`` or ``jpeg+autoencoder`` (the last also
            accepted as ``autoencoder+jpeg``).
    """
    valid = ", ".join(VALID_SPECS)
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"augmentation must be one of {valid}; got {spec!r}")
    parts = [p.strip().lower() for p in spec.split("+")]
    if any(p not in KINDS for p in parts) or len(set(parts)) != len(parts):
        raise ConfigError(f"unknown augmentation {spec!r}; valid: {valid}")
    return tuple(k for k in KINDS if k in parts)


class CompressionAugment(TrainHook):
    """Replace a random share of each training batch with JPEG-compressed and/or autoencoded
    versions of the same images (the paper's augmentation against pre-processing defenses).

    Args:
        kinds: ``("jpeg",)``, ``("autoencoder",)`` or ``("jpeg", "autoencoder")``.
        p: probability that an image of a batch is replaced.
        quality: inclusive range ``(qmin, qmax)`` the JPEG quality is drawn from, uniformly per image.
        autoencoder: the trained autoencoder (needed when ``kinds`` holds ``"autoencoder"``); it is
            frozen (not trained further, not in :meth:`modules`).
        seed: seed of the hook's own generator (which images, which quality, which of the two).
        only_poisoned: replace only rows listed in the training set's ``poison_indices``.

    The generator's state is checkpointed (:meth:`state_dict`), so a resumed run draws exactly the
    choices an uninterrupted run would have. ``on_epoch_end`` logs ``augment_fraction``, the share
    of training images replaced in the epoch.
    """

    def __init__(
        self,
        kinds: tuple[str, ...],
        p: float = DEFAULT_P,
        quality: tuple[int, int] = DEFAULT_QUALITY,
        autoencoder: nn.Module | None = None,
        seed: int = 0,
        only_poisoned: bool = False,
    ) -> None:
        if not kinds or any(k not in KINDS for k in kinds):
            raise ConfigError(f"augmentation kinds must be a non-empty subset of {KINDS}, got {kinds!r}")
        if not 0.0 <= p <= 1.0:
            raise ConfigError(f"augmentation probability must be in [0, 1], got {p}")
        qmin, qmax = (int(q) for q in quality)
        if not 1 <= qmin <= qmax <= 100:
            raise ConfigError(f"JPEG quality range must satisfy 1 <= qmin <= qmax <= 100, got {quality}")
        if "autoencoder" in kinds and autoencoder is None:
            raise ConfigError("the autoencoder augmentation needs a trained autoencoder")
        self.kinds = tuple(kinds)
        self.p = float(p)
        self.quality = (qmin, qmax)
        self.autoencoder = autoencoder.eval() if autoencoder is not None else None
        if self.autoencoder is not None:
            for param in self.autoencoder.parameters():
                param.requires_grad_(False)
        self.only_poisoned = only_poisoned
        self.generator = torch.Generator().manual_seed(seed * 7_919 + 104_729)
        self._replaced = 0
        self._seen = 0

    # ------------------------------------------------------------------ hook
    def setup(self, ctx: StepContext) -> None:
        if self.autoencoder is not None:
            self.autoencoder.to(ctx.device)

    def draw(self, batch_size: int) -> tuple[Tensor, Tensor, Tensor]:
        """One batch of random choices: (replace? ``(B,)`` bool, JPEG quality ``(B,)``, kind index
        ``(B,)``). All three are always drawn so the stream does not depend on the kinds."""
        g = self.generator
        chosen = torch.rand(batch_size, generator=g) < self.p
        quality = torch.randint(self.quality[0], self.quality[1] + 1, (batch_size,), generator=g)
        kind = torch.randint(0, len(self.kinds), (batch_size,), generator=g)
        return chosen, quality, kind

    def apply(self, x: Tensor, chosen: Tensor, quality: Tensor, kind: Tensor) -> Tensor:
        """``x`` with the chosen rows replaced (no gradient flows through replaced rows)."""
        from veil.autoencoder import autoencode
        from veil.transforms import jpeg

        out = x.clone()
        for j, name in enumerate(self.kinds):
            rows = torch.nonzero(chosen & (kind == j)).flatten()
            if rows.numel() == 0:
                continue
            rows_dev = rows.to(x.device)
            src = x.detach()[rows_dev]
            if name == "jpeg":
                new = jpeg(src, quality[rows])
            else:
                assert self.autoencoder is not None
                new = autoencode(self.autoencoder, src)
            out[rows_dev] = new.to(out.dtype)
        return out

    def transform_batch(self, ctx: StepContext, batch: Batch) -> Batch:
        chosen, quality, kind = self.draw(batch.x.shape[0])
        if self.only_poisoned:
            poison = getattr(ctx.train_data, "poison_indices", None)
            if poison is None or poison.numel() == 0:
                chosen = torch.zeros_like(chosen)
            else:
                chosen &= torch.isin(batch.index.cpu(), poison.cpu())
        self._replaced += int(chosen.sum())
        self._seen += int(chosen.numel())
        if bool(chosen.any()):
            batch.x = self.apply(batch.x, chosen, quality, kind)
        return batch

    def on_epoch_end(self, ctx: StepContext) -> dict[str, float]:
        frac = self._replaced / max(1, self._seen)
        self._replaced = self._seen = 0
        return {"augment_fraction": frac}

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.generator.get_state(), "counts": torch.tensor([self._replaced, self._seen], dtype=torch.long)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["rng"])
        self._replaced, self._seen = (int(v) for v in state["counts"])


def build_augment_hook(
    spec: str,
    train: ImageDataset,
    device: str | torch.device = "cpu",
    record_dir: str | Path | None = None,
    seed: int = 0,
    p: float = DEFAULT_P,
    quality: tuple[int, int] = DEFAULT_QUALITY,
    autoencoder_epochs: int = DEFAULT_AUTOENCODER_EPOCHS,
    only_poisoned: bool = False,
    progress: bool = True,
) -> CompressionAugment:
    """The training hook for ``RunConfig.augment``.

    Args:
        spec: ``jpeg``, ``autoencoder`` or ``jpeg+autoencoder``.
        train: the *clean* training set (the autoencoder is trained on it).
        device: where the autoencoder is trained and run.
        record_dir: the run folder; the autoencoder is cached there as
            ``augment_autoencoder.safetensors`` and reused when the run resumes (``None``: not
            cached).
        seed: seed of the augmentation choices and (plus ``AUTOENCODER_SEED_OFFSET``) of the
            autoencoder's training.
        p, quality, only_poisoned: see :class:`CompressionAugment`.
        autoencoder_epochs: training epochs of the autoencoder.
        progress: progress bar while the autoencoder trains.
    """
    kinds = parse_augment(spec)
    ae = None
    if "autoencoder" in kinds:
        from veil.autoencoder import cached_autoencoder, train_autoencoder

        ae_seed = seed + AUTOENCODER_SEED_OFFSET

        if record_dir is not None:
            ae = cached_autoencoder(
                Path(record_dir) / AUTOENCODER_FILE, train, epochs=autoencoder_epochs, device=device, seed=ae_seed, progress=progress
            )
        else:
            ae = train_autoencoder(train, epochs=autoencoder_epochs, device=device, seed=ae_seed, progress=progress)
    log.info("training augmentation %s: p=%.2f, JPEG quality %d-%d", "+".join(kinds), p, *quality)
    return CompressionAugment(kinds, p=p, quality=quality, autoencoder=ae, seed=seed, only_poisoned=only_poisoned)
