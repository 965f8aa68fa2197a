"""Neural Cleanse (Wang et al., "Neural Cleanse: Identifying and Mitigating Backdoor Attacks in
Neural Networks", IEEE S&P 2019).

For every label ``k`` Neural Cleanse reverse-engineers the smallest trigger that sends clean inputs
to ``k``: a mask ``m_k`` ``(1, H, W)`` and a pattern ``p_k`` ``(C, H, W)`` applied as (Eq. 1)

    A(x, m, p) = (1 - m) * x + m * p,

found by minimising (Eq. 2)

    CE(f(A(x, m_k, p_k)), k) + lambda_k * |m_k|_1

over clean images ``x``, with ``m = tanh(m') / 2 + 0.5`` and ``p = tanh(p') / 2 + 0.5`` keeping
both in ``[0, 1]`` (the original code's parameterisation) and Adam (lr 0.1, betas 0.5 / 0.9). The
cost ``lambda_k`` follows the original schedule, per label: it starts at ``init_cost`` (1e-3);
after ``patience`` schedule epochs in a row in which the reversed trigger reaches
``success_threshold`` (0.99) it is multiplied by ``cost_multiplier`` (2), after ``patience`` epochs
below it divided by ``cost_multiplier ** 1.5``; the best trigger is the one of smallest L1 norm
among the epochs that reached the threshold; a label stops early once its cost has gone both up and
down and its best norm has not improved for ``early_stop_patience`` epochs.

The original's schedule epoch is a pass over 1000 images (31 steps of 32) and it runs up to 1000 of
them; a CPU budget allows a few hundred steps, so a schedule epoch here is ``epoch_steps`` (4)
steps and ``patience`` is 2. One adaptation keeps the compressed schedule faithful: the cost is not
lowered before a label's first successful epoch, because short epochs fail at first only while the
random initial trigger is being optimised (with the original's long epochs the first one already
succeeds). Without it the labels split at random into some whose cost fell early, whose masks then
stay large, and the rest, and the anomaly index measures that split instead of the backdoor.

A backdoor's target needs a much smaller trigger than the other labels. With the L1 norms
``n_k``, the anomaly index of the smallest is (Section IV-C, median absolute deviation)

    MAD = 1.4826 * median_k |n_k - median(n)|,   anomaly index = |min_k n_k - median(n)| / MAD,

and labels whose norm lies below the median with an index above 2 are flagged ("any data point
with anomaly index larger than 2 has > 95 % probability of being an outlier").

All labels are optimised as **one batched problem**: a ``(K, 1, H, W)`` mask tensor and a
``(K, C, H, W)`` pattern tensor, each step classifying the same ``batch_size`` clean images
stamped with every active label's trigger (``K * batch_size`` images), so 43 GTSRB labels cost one
forward/backward pass per step instead of 43.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from veil.data.base import ImageDataset, to_float
from veil.defenses.base import (
    DefenseConfig,
    DetectionResult,
    Detector,
    register_defense,
)
from veil.defenses.common import (
    CleanSource,
    backdoor_targets,
    check_fraction,
    check_positive,
    check_source,
    defender_data,
    figure_png,
    pyplot,
    run_title,
)
from veil.errors import ConfigError
from veil.records import atomic_save_tensors, atomic_write_bytes, atomic_write_json
from veil.inference import eval_mode, module_device

if TYPE_CHECKING:
    from veil.runs import LoadedRun

log = logging.getLogger(__name__)

#: consistency constant of the median absolute deviation for normally distributed data
MAD_CONSTANT = 1.4826
_EPS = 1e-7


@dataclass(frozen=True)
class ReversedTriggers:
    """Output of :func:`reverse_engineer_triggers`.

    Attributes:
        labels: the analysed labels, in order.
        masks: best masks ``(K, 1, H, W)`` in ``[0, 1]``.
        patterns: best patterns ``(K, C, H, W)`` in ``[0, 1]``.
        l1_norms: ``|m_k|_1`` ``(K,)`` of the best masks.
        success: attack success rate ``(K,)`` of each label's trigger over its last schedule epoch
            (the rate the best trigger was selected on is at least ``success_threshold``).
        found: ``(K,)`` bool, whether any epoch reached ``success_threshold`` (if not, the last
            trigger is kept).
        costs: final ``lambda_k`` ``(K,)``.
        steps: optimisation steps each label ran ``(K,)`` (fewer than the budget after an early stop).
        seconds: wall time of the optimisation.
    """

    labels: list[int]
    masks: Tensor
    patterns: Tensor
    l1_norms: Tensor
    success: Tensor
    found: Tensor
    costs: Tensor
    steps: Tensor
    seconds: float


def _to_tanh(x: Tensor) -> Tensor:
    """Inverse of ``tanh(t) / (2 - eps) + 0.5`` (the original code's squashing)."""
    return torch.atanh(((x - 0.5) * (2 - _EPS)).clamp(-1 + _EPS, 1 - _EPS))


def _from_tanh(t: Tensor) -> Tensor:
    return torch.tanh(t) / (2 - _EPS) + 0.5


class _frozen:
    """Context manager: the model's parameters stop requiring gradients (restored on exit)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.saved: list[tuple[nn.Parameter, bool]] = []

    def __enter__(self) -> nn.Module:
        self.saved = [(p, p.requires_grad) for p in self.model.parameters()]
        for p, _ in self.saved:
            p.requires_grad_(False)
        self._mode = eval_mode(self.model)
        self._mode.__enter__()
        return self.model

    def __exit__(self, *exc: object) -> None:
        for p, flag in self.saved:
            p.requires_grad_(flag)
        self._mode.__exit__(None, None, None)


def reverse_engineer_triggers(
    model: nn.Module,
    images: Tensor,
    labels: Sequence[int] | None = None,
    *,
    steps: int = 250,
    batch_size: int = 4,
    epoch_steps: int = 4,
    lr: float = 0.1,
    init_cost: float = 1e-3,
    cost_multiplier: float = 2.0,
    patience: int = 2,
    early_stop_patience: int = 10,
    early_stop_threshold: float = 0.99,
    success_threshold: float = 0.99,
    seed: int = 0,
    progress: bool = False,
) -> ReversedTriggers:
    """Reverse-engineer a minimal trigger for every label at once (Neural Cleanse, Eq. 1-2).

    Args:
        model: the classifier, taking ``(B, C, H, W)`` images in ``[0, 1]``; put in eval mode and
            left unchanged.
        images: the defender's clean images ``(N, C, H, W)``, uint8 or float in ``[0, 1]``.
        labels: labels to analyse (default: every output of the model).
        steps: optimisation steps; each step classifies ``batch_size`` clean images stamped with
            every active label's trigger.
        batch_size: clean images per label per step.
        epoch_steps: steps per schedule epoch (the original evaluates its cost schedule after each
            pass over 1000 images, about 31 steps of 32).
        lr: Adam learning rate (betas 0.5, 0.9 as in the original).
        init_cost: initial ``lambda_k``.
        cost_multiplier: ``lambda`` is multiplied by it after ``patience`` successful epochs and
            divided by ``cost_multiplier ** 1.5`` after ``patience`` unsuccessful ones.
        patience: schedule epochs before the cost changes.
        early_stop_patience: epochs without improvement (best norm not below
            ``early_stop_threshold`` times the previous best) before a label stops, once its cost
            has gone both up and down.
        early_stop_threshold: see ``early_stop_patience``.
        success_threshold: attack success rate a trigger must reach to count (0.99).
        seed: seed of the random initial masks and patterns and of the image draws.
        progress: show a progress bar.

    Returns:
        :class:`ReversedTriggers` with ``K = len(labels)`` entries.
    """
    if images.dim() != 4 or images.shape[0] == 0:
        raise ConfigError(f"Neural Cleanse needs a non-empty (N, C, H, W) batch of clean images, got {tuple(images.shape)}")
    dev = module_device(model)
    num_classes = int(getattr(model, "num_classes", 0)) or None
    if labels is None:
        if num_classes is None:
            raise ConfigError("pass labels= for a model without a num_classes attribute")
        labels = list(range(num_classes))
    labels = [int(k) for k in labels]
    if not labels:
        raise ConfigError("Neural Cleanse needs at least one label")
    k_total = len(labels)
    _, c, h, w = images.shape
    g = torch.Generator().manual_seed(seed)
    mask_t = _to_tanh(torch.rand(k_total, 1, h, w, generator=g)).to(dev).requires_grad_(True)
    pattern_t = _to_tanh(torch.rand(k_total, c, h, w, generator=g)).to(dev).requires_grad_(True)
    opt = torch.optim.Adam([mask_t, pattern_t], lr=lr, betas=(0.5, 0.9))
    target = torch.tensor(labels, device=dev)

    inf = math.inf
    cost = torch.full((k_total,), float(init_cost), dtype=torch.float64)
    up_counter = torch.zeros(k_total, dtype=torch.long)
    down_counter = torch.zeros(k_total, dtype=torch.long)
    set_counter = torch.zeros(k_total, dtype=torch.long)
    up_flag = torch.zeros(k_total, dtype=torch.bool)
    reached = torch.zeros(k_total, dtype=torch.bool)
    down_flag = torch.zeros(k_total, dtype=torch.bool)
    reg_best = torch.full((k_total,), inf, dtype=torch.float64)
    es_reg_best = torch.full((k_total,), inf, dtype=torch.float64)
    es_counter = torch.zeros(k_total, dtype=torch.long)
    active = torch.ones(k_total, dtype=torch.bool)
    steps_run = torch.zeros(k_total, dtype=torch.long)
    last_success = torch.zeros(k_total, dtype=torch.float64)
    mask_best = torch.zeros(k_total, 1, h, w)
    pattern_best = torch.zeros(k_total, c, h, w)

    acc_sum = torch.zeros(k_total, dtype=torch.float64)
    reg_sum = torch.zeros(k_total, dtype=torch.float64)
    in_epoch = 0
    n_images = images.shape[0]
    order = torch.randperm(n_images, generator=g)
    pos = 0
    t0 = time.perf_counter()
    with _frozen(model), tqdm(total=steps, desc="neural cleanse", unit="step", leave=False, disable=not progress or None) as bar:
        for _step in range(steps):
            if not bool(active.any()):
                break
            if pos + batch_size > n_images:
                order = torch.randperm(n_images, generator=g)
                pos = 0
            rows = order[pos : pos + batch_size]
            pos += batch_size
            x = images[rows].to(dev)
            x = to_float(x) if x.dtype == torch.uint8 else x.float()
            idx = torch.nonzero(active).flatten()
            ka = idx.numel()
            idx_dev = idx.to(dev)
            mask = _from_tanh(mask_t[idx_dev])  # (Ka, 1, H, W)
            pattern = _from_tanh(pattern_t[idx_dev])  # (Ka, C, H, W)
            # A(x, m, p) for every active label and image: (Ka, B, C, H, W) -> (Ka * B, C, H, W)
            adv = (1 - mask[:, None]) * x[None] + (mask * pattern)[:, None]
            logits = model(adv.reshape(-1, c, h, w)).float()
            tgt = target[idx_dev].repeat_interleave(x.shape[0])
            ce = F.cross_entropy(logits, tgt, reduction="none").view(ka, -1).mean(1)
            reg = mask.abs().flatten(1).sum(1)
            loss = (ce + cost[idx].to(dev, torch.float32) * reg).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                acc = (logits.argmax(1) == tgt).float().view(ka, -1).mean(1).double().cpu()
            acc_sum[idx] += acc
            reg_sum[idx] += reg.detach().double().cpu()
            steps_run[idx] += 1
            in_epoch += 1
            bar.update(1)
            if in_epoch < epoch_steps:
                continue
            # ---- end of a schedule epoch: the original per-label logic, vectorised over labels
            avg_acc = acc_sum / in_epoch
            avg_reg = reg_sum / in_epoch
            acc_sum.zero_()
            reg_sum.zero_()
            in_epoch = 0
            a = active.clone()
            last_success[a] = avg_acc[a]
            ok = avg_acc >= success_threshold
            better = a & ok & (avg_reg < reg_best)
            if bool(better.any()):
                sel = torch.nonzero(better).flatten()
                with torch.no_grad():
                    mask_best[sel] = _from_tanh(mask_t[sel.to(dev)]).cpu()
                    pattern_best[sel] = _from_tanh(pattern_t[sel.to(dev)]).cpu()
                reg_best[sel] = avg_reg[sel]
            # early stop
            has_best = a & torch.isfinite(reg_best)
            worse = has_best & (reg_best >= early_stop_threshold * es_reg_best)
            es_counter[worse] += 1
            es_counter[has_best & ~worse] = 0
            es_reg_best[a] = torch.minimum(reg_best[a], es_reg_best[a])
            stop = a & up_flag & down_flag & (es_counter >= early_stop_patience)
            # cost schedule
            zero = a & (cost == 0) & ok
            set_counter[zero] += 1
            set_counter[a & ~zero] = 0
            reset = zero & (set_counter >= patience)
            cost[reset] = init_cost
            up_counter[reset] = 0
            down_counter[reset] = 0
            up_flag[reset] = False
            down_flag[reset] = False
            up_counter[a & ok] += 1
            down_counter[a & ok] = 0
            up_counter[a & ~ok] = 0
            down_counter[a & ~ok] += 1
            reached |= a & ok
            go_up = a & (up_counter >= patience)
            # no decrease before a label's first successful epoch: with short schedule epochs the
            # first ones fail only because the random initial trigger has not been optimised yet
            # (the original's epochs of ~31 steps are long enough for that not to matter)
            go_down = a & ~go_up & (down_counter >= patience) & reached
            up_counter[go_up] = 0
            cost[go_up] *= cost_multiplier
            up_flag |= go_up
            down_counter[go_down] = 0
            cost[go_down] /= cost_multiplier**1.5
            down_flag |= go_down
            if bool(stop.any()):
                log.debug("neural cleanse: labels %s stopped early", [labels[i] for i in torch.nonzero(stop).flatten().tolist()])
            active &= ~stop
            bar.set_postfix(active=int(active.sum()), found=int(torch.isfinite(reg_best).sum()))
    seconds = time.perf_counter() - t0
    found = torch.isfinite(reg_best)
    with torch.no_grad():
        last_masks = _from_tanh(mask_t.detach()).cpu()
        last_patterns = _from_tanh(pattern_t.detach()).cpu()
    masks = torch.where(found[:, None, None, None], mask_best, last_masks)
    patterns = torch.where(found[:, None, None, None], pattern_best, last_patterns)
    if not bool(found.all()):
        missing = [labels[i] for i in torch.nonzero(~found).flatten().tolist()]
        log.info(
            "neural cleanse: no trigger reached %.0f%% success for label(s) %s within %d steps; their last "
            "trigger is kept (raise steps for a tighter estimate)", 100 * success_threshold, missing, steps,
        )
    return ReversedTriggers(
        labels=labels,
        masks=masks,
        patterns=patterns,
        l1_norms=masks.flatten(1).sum(1),
        success=last_success.float(),
        found=found,
        costs=cost.float(),
        steps=steps_run,
        seconds=seconds,
    )


def unconverged_labels(rev: ReversedTriggers, steps: int) -> list[int]:
    """The labels whose schedule ran all ``steps`` without stopping early: their norms, and so the
    median, the MAD and every label's anomaly index, may still move with a larger budget."""
    return [k for k, n in zip(rev.labels, rev.steps.tolist()) if n >= steps]


def anomaly_index(norms: Tensor) -> tuple[Tensor, float, float]:
    """Neural Cleanse's outlier test by median absolute deviation (Section IV-C).

    Args:
        norms: L1 norms ``(K,)`` of the reversed masks.

    Returns:
        ``(index, median, mad)`` where ``index`` ``(K,)`` is ``|n_k - median| / (1.4826 *
        median|n - median|)`` (``inf`` where the deviation is positive and MAD is 0, ``0`` where
        both are 0).
    """
    n = norms.double().flatten()
    med = n.median() if n.numel() % 2 else n.sort().values[n.numel() // 2 - 1 : n.numel() // 2 + 1].mean()
    dev = (n - med).abs()
    mad_raw = dev.median() if dev.numel() % 2 else dev.sort().values[dev.numel() // 2 - 1 : dev.numel() // 2 + 1].mean()
    mad = MAD_CONSTANT * mad_raw
    if float(mad) == 0.0:
        index = torch.where(dev > 0, torch.full_like(dev, math.inf), torch.zeros_like(dev))
    else:
        index = dev / mad
    return index.float(), float(med), float(mad)


@register_defense("neural_cleanse")
class NeuralCleanse(Detector):
    """Neural Cleanse (Wang et al., S&P 2019): reverse-engineer a trigger per label, flag the
    labels whose L1 norm is an outlier below the median (anomaly index > 2).

    Options (``Config``):
        clean_images: the defender's clean images (default 500), a stratified subset of
            ``clean_source``.
        clean_source: ``"test"`` (default, held-out data; the rest of the test split is not used
            further) or ``"train"`` (the run's clean training images).
        steps: optimisation steps for all labels together (default 250: ``250 * 4 * 43 = 43000``
            image passes for 43 GTSRB labels, a few minutes for a width-16 PreAct-ResNet-18 on 2
            CPU cores; ``extra.optimisation_seconds`` records it).
        batch_size: clean images per label per step (default 4: ``43 * 4 = 172`` images a step).
        epoch_steps: steps per schedule epoch (default 4: 16 images per label per decision).
        lr, init_cost, cost_multiplier, patience, early_stop_patience, early_stop_threshold,
            success_threshold: the optimisation and cost schedule (0.1, 1e-3, 2, 2, 10, 0.99,
            0.99; see :func:`reverse_engineer_triggers`).
        anomaly_threshold: flag labels whose anomaly index exceeds it (default 2).
        labels: analyse only these labels (default all).
        seed: seed of the clean subset, initial triggers and image draws.

    Writes ``figures/neural_cleanse_norms.png`` (per-label L1 norms, as Figure 10 of the adaptive
    attack paper), ``figures/neural_cleanse_triggers.png`` (the reversed triggers ``m * p`` and
    masks, as its Figure 9), ``tables/neural_cleanse.json`` and ``neural_cleanse.safetensors``
    (masks, patterns, norms).

    Result: :class:`DetectionResult` with ``detected`` (some label flagged), ``score`` (anomaly
    index of the smallest norm), ``threshold``, ``flagged`` (labels), ``metrics``
    (``suspected_is_target``, ``target_flagged`` and ``target_anomaly_index`` when the run has a
    backdoor) and ``extra`` (``suspected_label``, ``l1_norms``, ``anomaly_indices``, ``median``,
    ``mad``, ``targets``, ``success``, ``found``, ``steps``, ``unconverged_labels`` (those that ran
    the whole budget without stopping early: the verdict may still move; raise ``steps``),
    ``optimisation_seconds``, ``images_per_second``, ``clean_images``).
    """

    @dataclass(frozen=True)
    class Config(DefenseConfig):
        clean_images: int = 500
        clean_source: CleanSource = "test"
        steps: int = 250
        batch_size: int = 4
        epoch_steps: int = 4
        lr: float = 0.1
        init_cost: float = 1e-3
        cost_multiplier: float = 2.0
        patience: int = 2
        early_stop_patience: int = 10
        early_stop_threshold: float = 0.99
        success_threshold: float = 0.99
        anomaly_threshold: float = 2.0
        labels: tuple[int, ...] | None = None
        seed: int = 0

        def __post_init__(self) -> None:
            check_source(self.clean_source)
            for name in ("clean_images", "steps", "batch_size", "epoch_steps", "patience", "early_stop_patience"):
                check_positive(getattr(self, name), name)
            for name in ("lr", "cost_multiplier", "anomaly_threshold"):
                v = getattr(self, name)
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                    raise ConfigError(f"{name} must be a positive number, got {v!r}")
            if isinstance(self.init_cost, bool) or not isinstance(self.init_cost, (int, float)) or self.init_cost < 0:
                raise ConfigError(f"init_cost must be a non-negative number, got {self.init_cost!r}")
            check_fraction(self.success_threshold, "success_threshold", closed=False)
            check_fraction(self.early_stop_threshold, "early_stop_threshold", high=10.0, closed=False)
            if self.labels is not None:
                labels = (self.labels,) if isinstance(self.labels, int) else self.labels
                if isinstance(labels, str) or not all(isinstance(k, int) and not isinstance(k, bool) for k in labels):
                    raise ConfigError(f"labels must be a list of integers, got {self.labels!r}")
                if len(set(labels)) < 3:
                    raise ConfigError(f"the MAD outlier test needs at least 3 distinct labels, got {self.labels!r}")
                object.__setattr__(self, "labels", tuple(sorted(set(labels))))

    config: Config
    TRIGGERS = "neural_cleanse.safetensors"

    def run(self, loaded: LoadedRun, train: ImageDataset, test: ImageDataset, out_dir: Path) -> DetectionResult:
        cfg = self.config
        model = loaded.model
        num_classes = test.num_classes
        labels = list(cfg.labels) if cfg.labels is not None else list(range(num_classes))
        bad = [k for k in labels if not 0 <= k < num_classes]
        if bad:
            raise ConfigError(f"labels {bad} are outside the model's classes 0..{num_classes - 1}")
        clean, _ = defender_data(train, test, cfg.clean_images, cfg.clean_source, cfg.seed, self.name)
        log.info("neural cleanse: %d labels, %d clean images, %d steps of %d images", len(labels), len(clean),
                 cfg.steps, len(labels) * cfg.batch_size)
        rev = reverse_engineer_triggers(
            model, clean.images, labels,
            steps=cfg.steps, batch_size=cfg.batch_size, epoch_steps=cfg.epoch_steps, lr=cfg.lr,
            init_cost=cfg.init_cost, cost_multiplier=cfg.cost_multiplier, patience=cfg.patience,
            early_stop_patience=cfg.early_stop_patience, early_stop_threshold=cfg.early_stop_threshold,
            success_threshold=cfg.success_threshold, seed=cfg.seed, progress=self.progress,
        )
        index, median, mad = anomaly_index(rev.l1_norms)
        norms = rev.l1_norms
        smallest = int(torch.argmin(norms))
        suspected = labels[smallest]
        flagged = [labels[i] for i in range(len(labels)) if norms[i] < median and index[i] > cfg.anomaly_threshold]
        score = float(index[smallest]) if norms[smallest] < median else 0.0
        targets = backdoor_targets(loaded, test)
        metrics: dict[str, float] = {}
        if targets is not None:
            in_labels = [t for t in targets if t in labels]
            metrics["suspected_is_target"] = float(suspected in targets)
            metrics["target_flagged"] = float(any(t in flagged for t in targets))
            if in_labels:
                metrics["target_anomaly_index"] = max(
                    float(index[labels.index(t)]) if norms[labels.index(t)] < median else 0.0 for t in in_labels
                )
        images_per_second = float(rev.steps.sum()) * cfg.batch_size / max(rev.seconds, 1e-9)
        log.info(
            "neural cleanse: anomaly index %.3f (label %d, L1 %.1f; median %.1f) in %.1f s",
            score, suspected, float(norms[smallest]), median, rev.seconds,
        )
        unconverged = unconverged_labels(rev, cfg.steps)
        if unconverged:
            log.warning(
                "neural cleanse: %d of %d labels ran all %d steps without stopping early (%s); their norms and "
                "the anomaly index may still move: raise --opt steps", len(unconverged), len(labels), cfg.steps,
                ", ".join(map(str, unconverged)),
            )

        atomic_save_tensors(
            out_dir / self.TRIGGERS,
            {"labels": torch.tensor(labels), "masks": rev.masks, "patterns": rev.patterns, "l1_norms": norms},
        )
        title = run_title(loaded)
        atomic_write_bytes(
            out_dir / "figures" / "neural_cleanse_norms.png",
            _norms_png(labels, norms, index, median, suspected, flagged, targets, cfg.anomaly_threshold, score, title),
        )
        atomic_write_bytes(
            out_dir / "figures" / "neural_cleanse_triggers.png",
            _triggers_png(labels, rev.masks, rev.patterns, norms, flagged, targets, title),
        )
        rows = [
            [k, round(float(norms[i]), 2), round(float(index[i]), 3), round(100 * float(rev.success[i]), 1),
             bool(rev.found[i]), "flagged" if k in flagged else ("target" if targets and k in targets else "")]
            for i, k in enumerate(labels)
        ]
        atomic_write_json(
            out_dir / "tables" / "neural_cleanse.json",
            {
                "title": f"Neural Cleanse: {title}; anomaly index {score:.2f} (label {suspected}), "
                f"{'backdoor detected' if flagged else 'no backdoor detected'}",
                "columns": ["label", "mask L1 norm", "anomaly index", "trigger success %", "reached threshold", "note"],
                "rows": rows,
                "note": f"{len(clean)} clean images; {int(rev.steps.max())} steps of {cfg.batch_size} images per label; "
                f"{rev.seconds:.1f} s ({images_per_second:.0f} images/s); median L1 {median:.2f}, MAD {mad:.2f}; "
                f"{len(unconverged)} of {len(labels)} labels ran the whole budget without stopping early",
            },
        )
        return DetectionResult(
            defense=self.name,
            detected=bool(flagged),
            score=score,
            threshold=cfg.anomaly_threshold,
            flagged=flagged,
            metrics=metrics,
            extra={
                "suspected_label": suspected,
                "targets": targets,
                "labels": labels,
                "l1_norms": [float(v) for v in norms],
                "anomaly_indices": [float(v) for v in index],
                "median": median,
                "mad": mad,
                "success": [float(v) for v in rev.success],
                "found": [bool(v) for v in rev.found],
                "final_costs": [float(v) for v in rev.costs],
                "steps": [int(v) for v in rev.steps],
                "unconverged_labels": unconverged,
                "optimisation_seconds": rev.seconds,
                "images_per_second": images_per_second,
                "clean_images": len(clean),
                "triggers_file": self.TRIGGERS,
            },
        )


def _bar_colours(labels: list[int], flagged: list[int], targets: list[int] | None) -> list[str]:
    return ["C3" if k in flagged else ("C1" if targets and k in targets else "C0") for k in labels]


def _norms_png(
    labels: list[int], norms: Tensor, index: Tensor, median: float, suspected: int, flagged: list[int],
    targets: list[int] | None, threshold: float, score: float, title: str,
) -> bytes:
    """Per-label L1 norms of the reversed masks (the adaptive paper's Figure 10) next to the
    anomaly indices."""
    plt = pyplot()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.4), gridspec_kw={"width_ratios": [3, 1.2]})
    x = list(range(len(labels)))
    bars = ax.bar(x, norms.tolist(), color=_bar_colours(labels, flagged, targets))
    for bar, k in zip(bars, labels):
        if targets and k in targets:  # a flagged target stays red, outlined in the target colour
            bar.set_edgecolor("C1")
            bar.set_linewidth(1.5)
            bar.set_hatch("//")
    ax.axhline(median, color="k", lw=0.8, ls="--", label=f"median {median:.1f}")
    ax.set_xticks(x)
    ax.set_xticklabels([str(k) for k in labels], fontsize=6 if len(labels) > 20 else 8, rotation=90 if len(labels) > 20 else 0)
    ax.set_xlabel("label")
    ax.set_ylabel("L1 norm of reversed mask")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in ("C0", "C1", "C3")]
    ax.legend(handles + [ax.lines[0]], ["label", "attack target", "flagged"] + [f"median {median:.1f}"], fontsize=7)
    ax.set_title(f"Neural Cleanse: {title}", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    # the anomaly-index view: the norms as a box plot, the suspected label marked
    clean_norms = [float(v) for k, v in zip(labels, norms) if not (targets and k in targets)]
    target_norms = [float(v) for k, v in zip(labels, norms) if targets and k in targets]
    ax2.boxplot([clean_norms] if clean_norms else [[median]], widths=0.5)
    if target_norms:
        ax2.scatter([1] * len(target_norms), target_norms, color="C1", zorder=3, label="target")
    ax2.scatter([1], [float(norms[labels.index(suspected)])], marker="x", color="C3", s=60, zorder=4, label=f"label {suspected}")
    ax2.set_xticks([1])
    ax2.set_xticklabels(["all labels"])
    ax2.set_title(f"anomaly index {score:.2f} (threshold {threshold:g})", fontsize=9)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    return figure_png(fig)


def _triggers_png(
    labels: list[int], masks: Tensor, patterns: Tensor, norms: Tensor, flagged: list[int],
    targets: list[int] | None, title: str, max_labels: int = 48, cols: int = 12,
) -> bytes:
    """The reversed triggers ``m * p`` above their masks ``m``, one tile per label (the adaptive
    paper's Figure 9), smallest norms first when there are more than ``max_labels``; drawn as one
    mosaic (fast for 43 labels)."""
    plt = pyplot()
    order = torch.argsort(norms).tolist()[:max_labels] if len(labels) > max_labels else list(range(len(labels)))
    n = len(order)
    cols = min(n, cols)
    rows = math.ceil(n / cols)
    c, h, w = patterns.shape[1:]
    pad = max(2, h // 8)
    cell_h, cell_w = 2 * h + 3 * pad, w + pad
    canvas = torch.ones(rows * cell_h + pad, cols * cell_w + pad, 3)
    for j, i in enumerate(order):
        r, col = divmod(j, cols)
        y0, x0 = r * cell_h + 2 * pad, col * cell_w + pad
        trig = (masks[i] * patterns[i]).clamp(0, 1).expand(3, h, w) if c == 1 else (masks[i] * patterns[i]).clamp(0, 1)
        canvas[y0 : y0 + h, x0 : x0 + w] = trig.permute(1, 2, 0)
        canvas[y0 + h + pad : y0 + 2 * h + pad, x0 : x0 + w] = masks[i, 0].clamp(0, 1)[..., None].expand(h, w, 3)
    fig_w = min(14.0, 0.9 + 1.05 * cols)
    fig, ax = plt.subplots(figsize=(fig_w, fig_w * canvas.shape[0] / canvas.shape[1] + 0.6))
    ax.imshow(canvas.numpy(), interpolation="nearest")
    for j, i in enumerate(order):
        r, col = divmod(j, cols)
        k = labels[i]
        colour = "C3" if k in flagged else ("C1" if targets and k in targets else "k")
        ax.text(col * cell_w + pad + w / 2, r * cell_h + 1.7 * pad, f"{k}: {float(norms[i]):.0f}", ha="center", va="bottom",
                fontsize=6.5, color=colour, weight="bold" if colour != "k" else "normal")
    ax.axis("off")
    ax.set_title(f"Neural Cleanse reversed triggers m*p (top) and masks m (bottom); label: L1 norm\n{title}", fontsize=8)
    fig.tight_layout()
    return figure_png(fig)
