"""Frequency-domain backdoor: replace the victim architecture's most sensitive Fourier components.

Hammoud & Ghanem (2021), "Check Your Other Door! Creating Backdoor Attacks in the Frequency Domain"
(arXiv:2109.05507), section 4:

Stage 1 (:meth:`FrequencyAttack.fit`, the poisoning filter):

1. train a clean network ``f_0`` with the user's architecture (or reuse a finished clean run:
   ``reference_run``; or reuse a saved heatmap: ``heatmap_path``);
2. compute its Fourier heatmap (:func:`veil.analysis.fourier_heatmap`, section 3) and take the
   top-``k`` most sensitive frequencies as the mask ``M`` (eq. 2; closed under conjugate symmetry,
   DC excluded, ``k`` counting conjugate pairs);
3. choose one real value per channel, ``A_R, A_G, A_B`` (eq. 3; "values within an additive mask are
   the same but different from the other masks"): ``A_c = s * channel_ratios[c]``, the scale ``s``
   found by bisection so that the mean L2 norm of the 8-bit quantised perturbation over the
   training images the attack poisons is just under ``delta_p`` (section 5.2: "the norm of the attack (on
   average) does not exceed a particular threshold delta_P ... we chose delta_P < 1").

Stage 2 (:meth:`FrequencyAttack.apply`, eq. 4-6): per channel the spectrum at ``M`` is **replaced**
by ``A_c`` (:func:`veil.triggers.frequency.frequency_trigger`; the module explains why replacement
and not the product as printed), then the label becomes the target (dirty label).

The victim's random crop shifts the trigger, and a shifted fixed-phase cosine is another pixel
pattern: ``veil run`` says so in its log when the crop is on, and the measured recipes train the
victim and the reference without it (``--no-base-augment``). The paper does not state its training
augmentation. What was measured (success rate over reference seeds, the crop, the trigger's cost
and its JPEG survival) is in ``docs/attacks/frequency.md``.

Example:
    >>> from veil.attacks import create_attack
    >>> attack = create_attack("frequency", 43, (3, 32, 32), reference_run="runs/clean")
    >>> attack.fit(train)                     # doctest: +SKIP
    >>> poisoned_train = attack.poison(train) # doctest: +SKIP
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from veil.analysis.fourier import (
    DEFAULT_ALPHA,
    conjugate_index,
    conjugate_mirror,
    fourier_heatmap,
    frequency_pairs,
    heatmap_figure,
    load_heatmap,
    top_k_mask,
)
from veil.attacks.base import Attack, AttackConfig, AttackKind, register_attack
from veil.attacks.reference import (
    analysis_cache,
    load_reference,
    reference_architecture,
    train_reference,
    write_analysis_cache,
)
from veil.data.base import ImageDataset, quantize, to_float
from veil.errors import ConfigError
from veil.triggers.frequency import frequency_trigger

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FrequencyConfig(AttackConfig):
    """Options of the frequency attack (Hammoud & Ghanem 2021).

    Attributes:
        k: number of selected frequencies, counted as conjugate pairs (2: 4 DFT entries). The
            paper does not print its ``k``. Replacing a component first deletes the image's own
            content there, and on GTSRB the sensitive (mid) frequencies carry content, so at a
            fixed ``delta_p`` a larger ``k`` leaves less of the budget for the values ``A_c``
            themselves (the cost per ``k`` is measured in ``docs/attacks/frequency.md``).
        delta_p: bound on the mean L2 norm of the quantised perturbation over the poisoned training
            images, on the ``[0, 1]`` scale (section 5.2: ``delta_P < 1``). 0.6 is a root-mean-square
            change of 2.75 grey levels on 32x32x3 images.
        channel_ratios: ``A_c = s * channel_ratios[c]``: one value per channel, same scale,
            different sign and size per channel (eq. 3 and "values within an additive mask are the
            same but different from the other masks"); at least one per image channel, distinct.
            The colour of the trigger decides how it survives JPEG, which subsamples and coarsely
            quantises the chroma channels: the default chromatic trigger (R and G of opposite
            sign) keeps less of itself through JPEG than a luminance-aligned one,
            ``(1.0, 0.8, 0.6)``, which is the one to combine with ``--augment jpeg`` (section
            5.4). The survival per quality is measured in ``docs/attacks/frequency.md``.
        reference_run: folder of a finished clean run whose model is ``f_0``. Its heatmap is
            cached in ``REFERENCE_RUN/analysis/`` (:meth:`FrequencyAttack.heatmap_cache_path`),
            so the points of a sweep, or a resumed run, compute it once.
        heatmap_path: a safetensors file with a ``"heatmap"`` tensor ``(H, W)`` (e.g. the
            ``attack.safetensors`` of an earlier frequency run) to reuse instead of computing one.
        reference_model, reference_width, reference_epochs: when neither ``heatmap_path`` nor
            ``reference_run`` is given, :meth:`FrequencyAttack.fit` trains ``f_0`` on the clean
            training set with veil's :class:`veil.train.Trainer` for ``reference_epochs`` (4).
            ``reference_model=None`` (the default) takes the victim's architecture and width, as
            the paper's f_0 is a clean model of the victim's kind
            (:meth:`FrequencyAttack.reference_architecture`); ``reference_width`` overrides the
            width (``None``: the victim's, or the named model's default).
        heatmap_images: seeded sample of training images the heatmap is computed on (512).
        alpha: L2 norm of the heatmap's basis perturbation (4, Yin et al. 2019).
        calibration_images: most training images the norm bound is calibrated on: the rows the
            attack poisons (all of them up to this number, else a seeded sample).
    """

    k: int = 2
    delta_p: float = 0.6
    channel_ratios: tuple[float, ...] = (1.0, -0.6, 0.3)
    reference_run: str | None = None
    heatmap_path: str | None = None
    reference_model: str | None = None
    reference_width: int | None = None
    reference_epochs: int = 4
    heatmap_images: int = 512
    alpha: float = DEFAULT_ALPHA
    calibration_images: int = 5000

    def __post_init__(self) -> None:
        # from JSON (config.json) or the command line a tuple may arrive as a list
        if not isinstance(self.channel_ratios, tuple):
            object.__setattr__(self, "channel_ratios", tuple(float(r) for r in self.channel_ratios))


@register_attack("frequency")
class FrequencyAttack(Attack):
    """Frequency-domain backdoor (Hammoud & Ghanem 2021): replace the top-k heatmap frequencies.

    Args:
        config: :class:`FrequencyConfig`.
        num_classes: number of classes.
        image_shape: ``(C, H, W)``.

    Trigger tensors (``state_dict``, after :meth:`fit` or :meth:`load_state_dict`): ``heatmap``
    ``(H, W)`` float error rates, ``mask`` ``(H, W)`` bool (both fftshift-ed: DC at
    ``(H // 2, W // 2)``) and ``values`` ``(C,)``, the per-channel values ``A_c`` in
    orthonormal-DFT units. ``apply`` maps ``(B, C, H, W)`` to ``(B, C, H, W)``, differentiably
    in ``x``; it needs the attack fitted (or loaded) first.
    """

    Config = FrequencyConfig
    kind: ClassVar[AttackKind] = "fit"

    def __init__(self, config: FrequencyConfig, num_classes: int, image_shape: tuple[int, int, int]) -> None:
        super().__init__(config, num_classes, image_shape)
        self.heatmap: Tensor | None = None
        self.mask: Tensor | None = None
        self.values: Tensor | None = None
        #: scale, achieved mean L2 norm and sample size of the last calibration (not in the state)
        self.calibration: dict[str, float] = {}

    def _validate(self) -> None:
        super()._validate()
        c = self.config
        ch, h, w = self.image_shape
        n_pairs = len(frequency_pairs(h, w, include_dc=False))
        if not isinstance(c.k, int) or not 1 <= c.k <= n_pairs:
            raise ConfigError(f"frequency k must be an integer in 1..{n_pairs} for {h}x{w} images, got {c.k!r}")
        if not 0.0 < c.delta_p < math.sqrt(ch * h * w):
            raise ConfigError(f"frequency delta_p must be in (0, {math.sqrt(ch * h * w):.1f}), got {c.delta_p}")
        if not c.alpha > 0:
            raise ConfigError(f"frequency alpha must be positive, got {c.alpha}")
        if len(c.channel_ratios) < ch:
            raise ConfigError(f"frequency channel_ratios needs one ratio per channel ({ch}), got {c.channel_ratios}")
        ratios = c.channel_ratios[:ch]
        if not all(math.isfinite(r) for r in ratios) or max(abs(r) for r in ratios) == 0:
            raise ConfigError(f"frequency channel_ratios must be finite and not all zero, got {c.channel_ratios}")
        if len(set(ratios)) != len(ratios):
            raise ConfigError(f"frequency channel_ratios must differ across channels (eq. 3), got {ratios}")
        for name in ("heatmap_images", "calibration_images", "reference_epochs"):
            if getattr(c, name) < 1:
                raise ConfigError(f"frequency {name} must be at least 1, got {getattr(c, name)}")

    # ------------------------------------------------------------------ stage 1
    @property
    def fitted(self) -> bool:
        return self.values is not None

    def fit(
        self,
        train: ImageDataset,
        device: torch.device | str = "cpu",
        victim: dict[str, Any] | None = None,
        *,
        heatmap: Tensor | None = None,
    ) -> None:
        """Stage 1: heatmap, top-k mask and the per-channel values calibrated to ``delta_p``.

        Args:
            train: the clean training set (its images calibrate the norm bound; it trains ``f_0``
                when no reference is given).
            device: where ``f_0`` is trained and the heatmap computed.
            victim: the run's classifier (``{"model", "width"}``); a trained ``f_0`` is of its
                architecture unless ``reference_model`` says otherwise.
            heatmap: an ``(H, W)`` heatmap to use instead of ``heatmap_path`` / ``reference_run`` /
                training ``f_0``.
        """
        c = self.config
        if train.image_shape != self.image_shape:
            raise ConfigError(f"attack built for images {self.image_shape}, training set has {train.image_shape}")
        t0 = time.perf_counter()
        if heatmap is not None:
            heat, source = heatmap.detach().float().cpu(), "given heatmap"
        elif c.heatmap_path is not None:
            heat, source = load_heatmap(c.heatmap_path), f"heatmap file {c.heatmap_path}"
        elif c.reference_run is not None and (cache := self.heatmap_cache_path(train)) is not None and cache.is_file():
            heat, source = load_heatmap(cache), f"heatmap of reference run {c.reference_run} cached in {cache}"
        elif c.reference_run is not None:
            model, _ = load_reference(c.reference_run, train, self.num_classes, device, "frequency")
            heat, source = self._heatmap_of(model, train, device), f"reference run {c.reference_run}"
            self._cache_heatmap(self.heatmap_cache_path(train), heat)
        else:
            heat, source = self._heatmap_of(self._train_reference(train, device, victim), train, device), "trained f_0"
        if heat.shape != self.image_shape[1:]:
            raise ConfigError(f"heatmap has shape {tuple(heat.shape)}, images are {self.image_shape[1:]}")
        heat = torch.maximum(heat, conjugate_mirror(heat))  # one value per basis
        mask = top_k_mask(heat, c.k)
        values = self._calibrate(train, mask)
        self.heatmap, self.mask, self.values = heat, mask, values
        log.info(
            "frequency attack fitted in %.1fs from %s: %d pairs %s, values %s, mean L2 %.4f (delta_p %.3g)",
            time.perf_counter() - t0,
            source,
            c.k,
            self._pair_list(),
            [round(float(v), 4) for v in values],
            self.calibration["mean_l2"],
            c.delta_p,
        )

    def heatmap_cache_path(self, train: ImageDataset) -> Path | None:
        """Where the heatmap of ``reference_run`` is cached (:func:`veil.attacks.reference.analysis_cache`:
        ``REFERENCE_RUN/analysis/``, one file per training set, image size, ``alpha``,
        ``heatmap_images`` and seed), so that the points of a sweep over one reference run compute
        it once. ``None`` without a reference run."""
        c = self.config
        return analysis_cache(c.reference_run, "fourier_heatmap", train, alpha=float(c.alpha), images=c.heatmap_images,
                              seed=c.seed)

    @staticmethod
    def _cache_heatmap(path: Path | None, heat: Tensor) -> None:
        write_analysis_cache(path, {"heatmap": heat.float()}, "frequency: heatmap")

    def _sample(self, train: ImageDataset, n: int, salt: int) -> Tensor:
        g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + salt)
        return torch.randperm(len(train), generator=g)[: min(n, len(train))].sort().values

    def reference_architecture(self, victim: dict[str, Any] | None = None) -> tuple[str, int | None]:
        """``(model, width)`` of a trained ``f_0``: ``reference_model`` and ``reference_width`` when
        set; else the victim's (the paper's f_0 is a clean model of the victim's kind); else veil's
        CPU-scale ``preact_resnet18`` at width 16 (no victim known, e.g. ``fit`` called directly)."""
        return reference_architecture(self.config.reference_model, self.config.reference_width, victim)

    def _train_reference(self, train: ImageDataset, device: torch.device | str,
                         victim: dict[str, Any] | None = None) -> nn.Module:
        """Train ``f_0`` (stage 1, step 1) on the clean training set."""
        name, width = self.reference_architecture(victim)
        return train_reference(train, self.num_classes, name, width, self.config.reference_epochs, self.config.seed,
                               device, "frequency")

    def _heatmap_of(self, model: nn.Module, train: ImageDataset, device: torch.device | str) -> Tensor:
        c = self.config
        rows = self._sample(train, c.heatmap_images, salt=1)
        log.info("frequency: Fourier heatmap of f_0 on %d training images (alpha %.3g)", rows.numel(), c.alpha)
        from veil.train import resolve_device

        dev = resolve_device(device)
        model.to(dev)
        g = torch.Generator().manual_seed(c.seed)
        return fourier_heatmap(model, train.images[rows], train.labels[rows], alpha=c.alpha, generator=g, device=dev)

    def _mean_l2(self, x: Tensor, mask: Tensor, values: Tensor) -> float:
        """Mean L2 norm over images of the quantised perturbation ``q(T(x)) - x``."""
        out = quantize(frequency_trigger(x, mask, values))
        return float((out - x).flatten(1).norm(dim=1).mean())

    def _calibration_rows(self, train: ImageDataset) -> Tensor:
        """The rows the attack will poison (``select_poison_indices``), so that the bound holds on
        average over the poisoned training images as the paper states it; a seeded sample of
        ``calibration_images`` of them when there are more, or of the eligible rows when the poison
        set cannot be chosen (then :meth:`poison` raises the reason)."""
        try:
            rows = self.select_poison_indices(train)
        except ConfigError:
            rows = self.eligible_rows(train)
        if rows.numel() == 0:
            rows = torch.arange(len(train))
        if rows.numel() > self.config.calibration_images:
            g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + 2)
            rows = rows[torch.randperm(rows.numel(), generator=g)[: self.config.calibration_images]].sort().values
        return rows

    def _calibrate(self, train: ImageDataset, mask: Tensor) -> Tensor:
        """Bisection on the scale ``s`` of ``A_c = s * ratio_c`` so that the mean L2 norm of the
        quantised perturbation over the poisoned training images (:meth:`_calibration_rows`) is just under ``delta_p``.

        The trigger is affine in ``s``: ``T(x) = x - x_M + s * ratio_c * P`` with ``x_M`` the
        image's own content at ``M`` and ``P = IFFT(M)`` (orthonormal), so both are computed once
        and each bisection step costs one clamp and one rounding. The final scale is checked with
        :func:`frequency_trigger` itself (and lowered if round-off put it on the bound).
        """
        c = self.config
        x = to_float(train.images[self._calibration_rows(train)])
        ratios = torch.tensor(c.channel_ratios[: self.image_shape[0]], dtype=torch.float32)
        bound = c.delta_p
        m = torch.fft.ifftshift(mask, dim=(-2, -1))
        own = torch.fft.fft2(x, norm="ortho") * m
        base = x - torch.fft.ifft2(own, norm="ortho").real  # the images without their content at M
        pattern = torch.fft.ifft2(m.to(torch.complex64), norm="ortho").real  # (H, W): A = 1 on M
        step = ratios.view(1, -1, 1, 1) * pattern  # (1, C, H, W)

        def mean_l2(scale: float) -> float:
            return float((quantize((base + scale * step).clamp(0, 1)) - x).flatten(1).norm(dim=1).mean())

        floor = mean_l2(0.0)
        if floor >= bound:
            raise ConfigError(
                f"removing the images' own content at the {c.k} selected frequency pairs already costs a mean L2 norm "
                f"of {floor:.3f} >= delta_p {bound}; raise delta_p or lower k"
            )
        lo, hi = 0.0, max(bound, 1e-3)
        for _ in range(60):
            if mean_l2(hi) >= bound:
                break
            lo, hi = hi, hi * 2
        else:  # pragma: no cover - clamping caps the norm below the validated bound only for odd data
            raise ConfigError(f"no trigger scale reaches the norm bound delta_p {bound} on these images")
        for _ in range(40):
            mid = 0.5 * (lo + hi)
            if mean_l2(mid) < bound:
                lo = mid
            else:
                hi = mid
        achieved = self._mean_l2(x, mask, lo * ratios)
        while achieved >= bound and lo > 0:  # round-off between the two computations
            lo *= 0.999
            achieved = self._mean_l2(x, mask, lo * ratios)
        self.calibration = {"scale": lo, "mean_l2": achieved, "removal_l2": floor, "images": float(x.shape[0])}
        return (lo * ratios).float()

    # ------------------------------------------------------------------ stage 2
    def _require_fitted(self) -> tuple[Tensor, Tensor]:
        if not self.fitted or self.mask is None or self.values is None:
            raise RuntimeError(
                "the frequency attack has no trigger yet: call attack.fit(train) (or load_state_dict) before apply"
            )
        return self.mask, self.values

    def training_notes(self, train: ImageDataset, crop_padding: int, hflip: bool) -> list[str]:
        if crop_padding <= 0:
            return []
        return [
            f"frequency: the trigger is a fixed-phase pattern and the victim's random crop ({crop_padding}-pixel "
            "padding) shifts it, which changes its phase; the measured recipes train without the crop "
            "(--no-base-augment), and the crop's effect is measured in docs/attacks/frequency.md"
        ]

    def apply(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        mask, values = self._require_fitted()
        self._check_batch(x)
        return frequency_trigger(x, mask, values)

    # ------------------------------------------------------------------ outputs
    def _pair_list(self) -> list[tuple[int, int]]:
        if self.mask is None:
            return []
        h, w = self.mask.shape
        return [(i, j) for i, j in frequency_pairs(h, w) if bool(self.mask[i, j])]

    def figures(self) -> dict[str, bytes]:
        if self.heatmap is None or self.mask is None:
            return {}
        return {"fourier_heatmap.png": heatmap_figure(self.heatmap, self.mask)}

    def tables(self) -> dict[str, dict[str, Any]]:
        if self.heatmap is None or self.values is None:
            return {}
        _, h, w = self.image_shape
        rows = []
        for i, j in self._pair_list():
            ci, cj = conjugate_index(i, j, h, w)
            rows.append([i, j, ci, cj, i - h // 2, j - w // 2, float(self.heatmap[i, j])])
        names = ["R", "G", "B"] if self.image_shape[0] == 3 else [str(n) for n in range(self.image_shape[0])]
        values = [[n, float(v)] for n, v in zip(names, self.values)]
        if self.calibration:
            values.append(["mean L2 norm (bound delta_p)", self.calibration["mean_l2"]])
        return {
            "frequency_mask": {
                "title": "Frequency attack: selected frequencies (fftshift-ed index, conjugate, cycles per image)",
                "columns": ["i", "j", "conj i", "conj j", "u", "v", "heatmap error rate"],
                "rows": rows,
            },
            "frequency_values": {
                "title": f"Frequency attack: per-channel values A_c (orthonormal DFT), delta_p {self.config.delta_p}",
                "columns": ["channel", "value"],
                "rows": values,
            },
        }

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Tensor]:
        if self.heatmap is None or self.mask is None or self.values is None:
            return {}
        return {"heatmap": self.heatmap.clone(), "mask": self.mask.clone(), "values": self.values.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        ch, h, w = self.image_shape
        heatmap = self._state_tensor(state, "heatmap", torch.zeros(h, w))
        mask = self._state_tensor(state, "mask", torch.zeros(h, w, dtype=torch.bool))
        values = self._state_tensor(state, "values", torch.zeros(ch))
        if not torch.equal(mask, conjugate_mirror(mask)) or not mask.any():
            raise ConfigError(f"attack {self.name!r} state 'mask' is empty or not closed under conjugate symmetry")
        self.heatmap, self.mask, self.values = heatmap, mask, values
