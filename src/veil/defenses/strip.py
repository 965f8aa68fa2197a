"""STRIP (Gao et al., "STRIP: A Defence Against Trojan Attacks on Deep Neural Networks", ACSAC 2019).

A trigger dominates the prediction whatever else is in the image, so a triggered input keeps its
(target) prediction when clean images are superimposed on it, while a clean input's prediction
wanders. STRIP superimposes ``N`` randomly drawn clean images ``x_j`` on the input ``x``
(the original code's ``cv2.addWeighted(x, 1, x_j, 1, 0)``: a saturating sum), and measures the
Shannon entropy of each prediction (Eq. 3) and their mean (Eq. 4-5):

    H_j = - sum_i y_ij log2 y_ij,        H(x) = (1 / N) sum_j H_j.

Low entropy flags a trojaned input. The detection boundary is the entropy below which a chosen
share of clean inputs falls, the false rejection rate (FRR, 1 %); the false acceptance rate (FAR) is
the share of triggered inputs above it. Here the boundary is the empirical FRR-quantile of the
defender's clean images, and FRR, FAR and the AUROC are measured on separate clean test inputs and
the attack's triggered test inputs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
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
    auroc,
    check_fraction,
    check_positive,
    check_source,
    input_detection_sets,
    figure_png,
    pct,
    pyplot,
    run_title,
)
from veil.errors import ConfigError
from veil.records import atomic_write_bytes, atomic_write_json
from veil.inference import eval_mode, module_device

if TYPE_CHECKING:
    from veil.runs import LoadedRun

log = logging.getLogger(__name__)

Blend = Literal["add", "average"]


def superimpose(x: Tensor, overlays: Tensor, blend: Blend = "add") -> Tensor:
    """Superimpose ``overlays`` ``(N, C, H, W)`` on one input ``x`` ``(C, H, W)`` (floats in ``[0, 1]``).

    ``"add"``: ``clamp(x + x_j, 0, 1)`` (the original code's saturating ``cv2.addWeighted(x, 1,
    x_j, 1, 0)``); ``"average"``: ``(x + x_j) / 2``. Returns ``(N, C, H, W)``.
    """
    if blend == "add":
        return (x.unsqueeze(0) + overlays).clamp_(0, 1)
    return (x.unsqueeze(0) + overlays) * 0.5


@torch.no_grad()
def strip_entropy(
    model: nn.Module,
    inputs: Tensor,
    pool: Tensor,
    n: int = 100,
    blend: Blend = "add",
    seed: int = 0,
    batch_size: int = 512,
    progress: bool = False,
    desc: str = "strip",
) -> Tensor:
    """Mean prediction entropy (bits) of each input under ``n`` superimposed clean images (Eq. 3-5).

    Args:
        model: the classifier (eval mode is set for the call).
        inputs: images to test ``(M, C, H, W)``, uint8 or float in ``[0, 1]``.
        pool: clean images to superimpose ``(P, C, H, W)``, uint8 or float.
        n: superimposed images per input (the paper's ``N = 100``); drawn without replacement
            when ``P >= n``.
        blend: ``"add"`` or ``"average"`` (see :func:`superimpose`).
        seed: seed of the draws.
        batch_size: images per forward pass (``batch_size // n`` inputs at a time).

    Returns:
        Entropies ``(M,)`` (float32, CPU), in ``[0, log2(num_classes)]``.
    """
    if pool.shape[0] == 0:
        raise ConfigError("STRIP needs at least one clean image to superimpose")
    dev = module_device(model)
    g = torch.Generator().manual_seed(seed)
    pool_f = (to_float(pool) if pool.dtype == torch.uint8 else pool.float()).to(dev)
    per = max(1, batch_size // n)
    out = []
    with eval_mode(model), tqdm(total=inputs.shape[0], desc=desc, unit="img", leave=False, disable=not progress or None) as bar:
        for i in range(0, inputs.shape[0], per):
            xb = inputs[i : i + per].to(dev)
            xb = to_float(xb) if xb.dtype == torch.uint8 else xb.float()
            picks = [
                torch.randperm(pool.shape[0], generator=g)[:n] if pool.shape[0] >= n
                else torch.randint(pool.shape[0], (n,), generator=g)
                for _ in range(xb.shape[0])
            ]
            blended = torch.cat([superimpose(x, pool_f[p.to(dev)], blend) for x, p in zip(xb, picks)])
            probs = torch.softmax(model(blended).float(), dim=1)
            h = -(probs * torch.log2(probs.clamp_min(1e-12))).sum(1)
            out.append(h.view(xb.shape[0], -1).mean(1).cpu())
            bar.update(xb.shape[0])
    return torch.cat(out) if out else torch.empty(0)


@register_defense("strip")
class Strip(Detector):
    """STRIP (Gao et al., ACSAC 2019): flag inputs whose predictions stay confident under
    superimposed clean images.

    Options (``Config``):
        clean_images: the defender's clean images (default 500): the images superimposed and the
            calibration inputs of the threshold.
        clean_source: ``"test"`` (default: held-out; evaluation uses the remaining test images)
            or ``"train"``.
        superimpose: superimposed images per input, ``N`` (default 100 as in the paper).
        blend: ``"add"`` (default, the original code) or ``"average"``.
        frr: false rejection rate that sets the entropy threshold on the clean calibration
            inputs (default 0.01).
        test_images: clean test inputs and triggered test inputs evaluated, each (default 500).
        bins: histogram bins of the figure (default 30).
        seed: seed of the subsets and of the superimposition draws.

    Writes ``figures/strip_entropy.png`` (entropy histograms of clean and triggered inputs, as
    ATTEQ's Figure 3), ``tables/strip.json`` and ``strip_entropies.json`` (every entropy).

    Result: :class:`DetectionResult`; ``score`` is the median entropy of the triggered inputs and
    ``threshold`` the entropy threshold (``detected``: most triggered inputs are rejected);
    ``metrics``: ``frr`` and ``far`` on the test inputs at the threshold, ``auroc`` (triggered
    inputs positive, lower entropy more suspicious), ``detection_rate`` (``1 - far``) and
    ``calibration_frr``; ``extra``: entropy summaries, sizes and settings.
    """

    @dataclass(frozen=True)
    class Config(DefenseConfig):
        clean_images: int = 500
        clean_source: CleanSource = "test"
        superimpose: int = 100
        blend: Blend = "add"
        frr: float = 0.01
        test_images: int = 500
        bins: int = 30
        seed: int = 0

        def __post_init__(self) -> None:
            check_source(self.clean_source)
            for name in ("clean_images", "superimpose", "test_images", "bins"):
                check_positive(getattr(self, name), name)
            check_fraction(self.frr, "frr", closed=False, high=0.5)
            if self.blend not in ("add", "average"):
                raise ConfigError(f"blend must be 'add' or 'average', got {self.blend!r}")

    config: Config

    def run(self, loaded: LoadedRun, train: ImageDataset, test: ImageDataset, out_dir: Path) -> DetectionResult:
        from veil.train import predict

        cfg = self.config
        model = loaded.model
        clean, clean_test, poisoned = input_detection_sets(loaded, train, test, cfg.clean_images, cfg.clean_source,
                                                           cfg.test_images, cfg.seed, self.name)
        kw: dict[str, Any] = {"n": cfg.superimpose, "blend": cfg.blend, "progress": self.progress}
        h_cal = strip_entropy(model, clean.images, clean.images, seed=cfg.seed + 3, desc="strip (calibration)", **kw)
        h_clean = strip_entropy(model, clean_test.images, clean.images, seed=cfg.seed + 4, desc="strip (clean)", **kw)
        h_bad = strip_entropy(model, poisoned.images, clean.images, seed=cfg.seed + 5, desc="strip (triggered)", **kw)
        threshold = float(torch.quantile(h_cal.double(), cfg.frr))
        frr = float((h_clean < threshold).float().mean()) if h_clean.numel() else float("nan")
        far = float((h_bad >= threshold).float().mean()) if h_bad.numel() else float("nan")
        area = auroc(-h_bad, -h_clean)
        median_bad = float(h_bad.median()) if h_bad.numel() else float("nan")
        asr = float((predict(model, poisoned.images) == poisoned.labels).float().mean()) if len(poisoned) else float("nan")
        log.info("strip: threshold %.4f bits; FRR %.4f, FAR %.4f, AUROC %.4f", threshold, frr, far, area)

        title = run_title(loaded)
        atomic_write_bytes(out_dir / "figures" / "strip_entropy.png", _histogram_png(h_clean, h_bad, threshold, cfg.frr, cfg.bins, title, area))
        atomic_write_json(
            out_dir / "tables" / "strip.json",
            {
                "title": f"STRIP: {title}",
                "columns": ["inputs", "count", "mean entropy (bits)", "std", "rejected %"],
                "rows": [
                    ["clean (calibration)", int(h_cal.numel()), round(float(h_cal.mean()), 4), round(float(h_cal.std()), 4),
                     pct(float((h_cal < threshold).float().mean()))],
                    ["clean (test)", int(h_clean.numel()), round(float(h_clean.mean()), 4), round(float(h_clean.std()), 4), pct(frr)],
                    ["triggered (test)", int(h_bad.numel()), round(float(h_bad.mean()), 4), round(float(h_bad.std()), 4),
                     pct(1 - far)],
                ],
                "note": f"N = {cfg.superimpose} superimposed clean images ({cfg.blend}); threshold {threshold:.4f} bits at "
                f"{100 * cfg.frr:g} % FRR on the calibration inputs; FRR {pct(frr)} %, FAR {pct(far)} %, AUROC {area:.4f}; "
                f"attack success rate on the triggered inputs {pct(asr)} %",
            },
        )
        atomic_write_json(
            out_dir / "strip_entropies.json",
            {"threshold": threshold, "calibration": h_cal.tolist(), "clean": h_clean.tolist(), "triggered": h_bad.tolist()},
        )
        return DetectionResult(
            defense=self.name,
            detected=bool(median_bad < threshold),
            score=median_bad,
            threshold=threshold,
            metrics={
                "frr": frr,
                "far": far,
                "auroc": area,
                "detection_rate": 1 - far,
                "calibration_frr": float((h_cal < threshold).float().mean()),
            },
            extra={
                "entropy_clean_mean": float(h_clean.mean()),
                "entropy_clean_std": float(h_clean.std()),
                "entropy_triggered_mean": float(h_bad.mean()),
                "entropy_triggered_std": float(h_bad.std()),
                "attack_success_rate": asr,
                "clean_images": len(clean),
                "clean_test_inputs": len(clean_test),
                "triggered_test_inputs": len(poisoned),
                "superimpose": cfg.superimpose,
                "blend": cfg.blend,
                "entropies_file": "strip_entropies.json",
            },
        )


def _histogram_png(h_clean: Tensor, h_bad: Tensor, threshold: float, frr: float, bins: int, title: str, area: float) -> bytes:
    """Normalised entropy histograms of clean and triggered inputs (ATTEQ's Figure 3)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.4, 3.4))
    both = torch.cat([h_clean, h_bad])
    lo, hi = (float(both.min()), float(both.max())) if both.numel() else (0.0, 1.0)
    edges = torch.linspace(lo, max(hi, lo + 1e-6), bins + 1).tolist()
    ax.hist(h_clean.tolist(), bins=edges, density=True, alpha=0.6, color="C0", label="clean inputs")
    ax.hist(h_bad.tolist(), bins=edges, density=True, alpha=0.6, color="C3", label="triggered inputs")
    ax.axvline(threshold, color="k", ls="--", lw=0.9, label=f"threshold {threshold:.3f} ({100 * frr:g} % FRR)")
    ax.set_xlabel("mean entropy of superimposed predictions (bits)")
    ax.set_ylabel("density")
    ax.set_title(f"STRIP: {title}, AUROC {area:.3f}", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return figure_png(fig)

