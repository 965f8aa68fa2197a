"""Input pre-processing defenses of Section 5.4 of the frequency-domain backdoor paper.

"To defend against frequency-based backdoor attacks, the defender should manipulate the images being
passed through the network such that some frequency spectrum of the corresponding images is altered
to break the trigger, yet maintain a good clean data accuracy. This is possible through two
techniques: (1) Passing the image through an autoencoder, (2) Compressing the image." The paper
reports that both almost completely deactivate an undefended frequency backdoor ("the ASR of the
backdoored drops down to almost 0% after 20% of JPEG compression"), and that the attacker's
augmentation (:mod:`veil.augment`) keeps ASR > 80 % "even beyond 25% compression" (Figure 5).

* ``jpeg``: compress every test input at ``quality`` before classification; also sweeps
  ``qualities`` and plots clean accuracy and ASR against the quality (the paper's Figure 5).
* ``autoencoder``: pass every test input through a convolutional autoencoder the defender trains
  on clean training data (:mod:`veil.autoencoder`).

Both are mitigators (:class:`veil.defenses.base.Mitigator`): they leave the model alone and report
the clean accuracy and attack success rate of the defended pipeline next to the undefended values.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from veil.data.base import ImageDataset, to_float
from veil.defenses.base import (
    DefenseConfig,
    MitigationResult,
    Mitigator,
    evaluate_pipeline,
    register_defense,
    robust_test,
    transformed_accuracy,
)
from veil.errors import ConfigError
from veil.records import atomic_write_bytes, atomic_write_json
from veil.inference import module_device

if TYPE_CHECKING:
    from veil.runs import LoadedRun

log = logging.getLogger(__name__)


def _check_quality(q: Any, what: str) -> int:
    if isinstance(q, bool) or not isinstance(q, int) or not 1 <= q <= 100:
        raise ConfigError(f"{what} must be an integer in 1..100, got {q!r}")
    return q


def _example_rows(loaded: LoadedRun, test: ImageDataset, k: int, seed: int) -> tuple[Tensor, Tensor]:
    """``k`` random non-target test images (uint8) and their triggered versions (float)."""
    targets = loaded.attack.target_labels(test.labels)
    eligible = torch.nonzero(test.labels != targets).flatten()
    pick = eligible[torch.randperm(eligible.numel(), generator=torch.Generator().manual_seed(seed))[:k]]
    clean = to_float(test.images[pick])
    poisoned = loaded.attack.apply_quantized(clean, test.labels[pick], test=True).cpu()
    return clean, poisoned


def _pct(v: float) -> float:
    return v if math.isnan(v) else round(100.0 * v, 2)


@register_defense("jpeg")
class JpegDefense(Mitigator):
    """JPEG-compress every input before classification (Section 5.4, Figure 5).

    Options (``Config``):
        quality: the defender's operating quality (default 90: 10 % "compression" in the paper's
            wording, already past the point where the paper's undefended ASR collapses, at a small
            cost in clean accuracy).
        qualities: the sweep for the curve and figure (default 95, 90, 80, 70, 60, 50, i.e. 5 to 50 %
            compression, covering Figure 5's range).
        reference: optional folder of a clean reference run (attack ``none``) on the same data;
            its clean accuracy on compressed images is added to the curve and the figure (the
            paper's "Baseline").
        examples: images shown in the example figure.

    Writes ``figures/jpeg_curve.png``, ``figures/jpeg_examples.png`` and ``tables/jpeg_curve.json``.
    """

    @dataclass(frozen=True)
    class Config(DefenseConfig):
        quality: int = 90
        qualities: tuple[int, ...] = (95, 90, 80, 70, 60, 50)
        reference: str | None = None
        examples: int = 8

        def __post_init__(self) -> None:
            _check_quality(self.quality, "JPEG quality")
            qs = self.qualities
            if isinstance(qs, (int, str)) or not hasattr(qs, "__iter__"):
                raise ConfigError(f"JPEG qualities must be a list of integers, got {qs!r}")
            qs = tuple(_check_quality(q, "every JPEG quality") for q in qs)
            if not qs:
                raise ConfigError("the JPEG quality sweep needs at least one quality")
            # highest quality (weakest compression) first, duplicates dropped
            object.__setattr__(self, "qualities", tuple(sorted(set(qs), reverse=True)))
            if self.examples < 0:
                raise ConfigError(f"examples must be non-negative, got {self.examples}")

    config: Config

    def run(self, loaded: LoadedRun, train: ImageDataset, test: ImageDataset, out_dir: Path) -> MitigationResult:
        from veil.transforms import jpeg

        cfg = self.config
        model = loaded.model
        poisoned_test = loaded.attack.poison_test(test)
        robust = robust_test(loaded.attack, test, poisoned_test)
        ref_model = self._reference_model(loaded) if cfg.reference else None

        orig_cda, orig_asr = evaluate_pipeline(model, test, poisoned_test)
        orig_ra = transformed_accuracy(model, robust)
        qualities = list(cfg.qualities) + ([cfg.quality] if cfg.quality not in cfg.qualities else [])
        points: dict[int, dict[str, Any]] = {}
        for q in tqdm(qualities, desc="jpeg sweep", unit="quality", leave=False, disable=not self.progress or None):
            cda, asr = evaluate_pipeline(model, test, poisoned_test, lambda x, q=q: jpeg(x, q))
            ra = transformed_accuracy(model, robust, lambda x, q=q: jpeg(x, q))
            point: dict[str, Any] = {"quality": q, "clean_accuracy": cda, "attack_success_rate": asr, "robust_accuracy": ra}
            if ref_model is not None:
                point["reference_clean_accuracy"] = transformed_accuracy(ref_model, test, lambda x, q=q: jpeg(x, q))
            points[q] = point
            log.info("jpeg quality %d: clean accuracy %.4f, attack success rate %.4f", q, cda, asr)
        curve = [points[q] for q in cfg.qualities]
        chosen = points[cfg.quality]
        ref_orig = transformed_accuracy(ref_model, test) if ref_model is not None else None

        title = f"{loaded.config.attack} on {loaded.config.dataset} ({loaded.config.model})"
        atomic_write_bytes(out_dir / "figures" / "jpeg_curve.png", _curve_png(curve, orig_cda, orig_asr, ref_orig, title))
        rows: list[list[Any]] = [["none", _pct(orig_cda), _pct(orig_asr)] + ([_pct(ref_orig)] if ref_orig is not None else [])]
        for p in curve:
            row = [p["quality"], _pct(p["clean_accuracy"]), _pct(p["attack_success_rate"])]
            if ref_model is not None:
                row.append(_pct(p["reference_clean_accuracy"]))
            rows.append(row)
        columns = ["JPEG quality", "clean accuracy %", "attack success rate %"] + (
            ["reference clean accuracy %"] if ref_model is not None else []
        )
        atomic_write_json(
            out_dir / "tables" / "jpeg_curve.json",
            {"title": f"JPEG defense: {title}, {len(test)} test images", "columns": columns, "rows": rows},
        )
        if cfg.examples:
            atomic_write_bytes(out_dir / "figures" / "jpeg_examples.png", self._examples_png(loaded, test))
        return MitigationResult(
            defense=self.name,
            clean_accuracy=chosen["clean_accuracy"],
            attack_success_rate=chosen["attack_success_rate"],
            original_clean_accuracy=orig_cda,
            original_attack_success_rate=orig_asr,
            robust_accuracy=chosen["robust_accuracy"],
            original_robust_accuracy=orig_ra,
            curve=curve,
            extra={
                "quality": cfg.quality,
                "test_size": len(test),
                "asr_test_size": len(poisoned_test),
                **({"reference_clean_accuracy": ref_orig, "reference_run": cfg.reference} if ref_model is not None else {}),
            },
        )

    def _reference_model(self, loaded: LoadedRun) -> torch.nn.Module:
        from veil.runs import load_run

        assert self.config.reference is not None
        ref = load_run(self.config.reference, device=module_device(loaded.model))
        a, b = ref.config, loaded.config
        # the reference is evaluated on this run's test images, so only the data source must match
        if (a.dataset, a.image_size) != (b.dataset, b.image_size):
            raise ConfigError(
                f"reference run {self.config.reference} was trained on {a.dataset} at {a.image_size}px, "
                f"the defended run on {b.dataset} at {b.image_size}px"
            )
        return ref.model

    def _examples_png(self, loaded: LoadedRun, test: ImageDataset) -> bytes:
        from veil.report.images import image_grid, png_bytes
        from veil.transforms import jpeg

        clean, poisoned = _example_rows(loaded, test, self.config.examples, loaded.config.seed)
        qs = self.config.qualities
        rows = [clean, poisoned] + [jpeg(poisoned, q) for q in qs]
        labels = ["clean", "poisoned"] + [f"poisoned, JPEG q{q}" for q in qs]
        return png_bytes(image_grid(rows, labels=labels, scale=2))


def _curve_png(
    curve: list[dict[str, Any]], orig_cda: float, orig_asr: float, ref_orig: float | None, title: str
) -> bytes:
    """Clean accuracy and ASR against JPEG quality (compression increases to the right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    qs = [p["quality"] for p in curve]
    fig, ax = plt.subplots(figsize=(5.2, 3.4), dpi=110)
    ax.plot(qs, [100 * p["clean_accuracy"] for p in curve], marker="o", color="C0", label="clean accuracy (CDA)")
    ax.plot(qs, [100 * p["attack_success_rate"] for p in curve], marker="s", color="C3", label="attack success rate (ASR)")
    if "reference_clean_accuracy" in curve[0]:
        ax.plot(qs, [100 * p["reference_clean_accuracy"] for p in curve], marker="^", color="C2", label="clean reference CDA (baseline)")
    ax.axhline(100 * orig_cda, color="C0", ls="--", lw=0.9, alpha=0.6, label="CDA without JPEG")
    if not math.isnan(orig_asr):
        ax.axhline(100 * orig_asr, color="C3", ls="--", lw=0.9, alpha=0.6, label="ASR without JPEG")
    ax.set_xlabel("JPEG quality (lower = stronger compression)")
    ax.set_ylabel("%")
    ax.set_ylim(-2, 102)
    if len(qs) > 1:
        ax.set_xlim(max(qs) + 2, min(qs) - 2)
    ax.set_xticks(sorted(set(qs)))
    ax.set_title(f"JPEG defense: {title}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


@register_defense("autoencoder")
class AutoencoderDefense(Mitigator):
    """Pass every input through an autoencoder trained on clean data (Section 5.4; Liu et al.,
    *Neural Trojans*, 2017).

    The defender trains :class:`veil.autoencoder.ConvAutoencoder` on the run's clean training set
    (the paper's defender has clean data); it is cached in ``autoencoder.safetensors`` beside the
    result, or with ``autoencoder_dir`` in that folder under a digest of its settings and training
    images (the autoencoder never depends on the suspect model, so every run on the same data shares
    it), and reused when the same options and training images come again.

    Options (``Config``):
        epochs: autoencoder training epochs (default 5, see :func:`veil.autoencoder.train_autoencoder`).
        batch_size, lr: Adam settings (default 32, 1e-3).
        seed: seed of initialisation and shuffling.
        examples: images shown in the example figure.
        autoencoder_dir: where autoencoders are kept for every run (default: beside the result).

    Writes ``figures/autoencoder_examples.png`` and ``tables/autoencoder.json``.
    """

    @dataclass(frozen=True)
    class Config(DefenseConfig):
        epochs: int = 5
        batch_size: int = 32
        lr: float = 1e-3
        seed: int = 0
        examples: int = 8
        autoencoder_dir: str | None = None

        def __post_init__(self) -> None:
            if self.epochs < 1:
                raise ConfigError(f"autoencoder epochs must be at least 1, got {self.epochs}")
            if self.batch_size < 1:
                raise ConfigError(f"batch size must be at least 1, got {self.batch_size}")
            if not self.lr > 0:
                raise ConfigError(f"learning rate must be positive, got {self.lr}")
            if self.examples < 0:
                raise ConfigError(f"examples must be non-negative, got {self.examples}")

    config: Config
    WEIGHTS = "autoencoder.safetensors"
    STORAGE_OPTIONS = ("autoencoder_dir",)

    def weights_file(self, train: ImageDataset, out_dir: Path) -> Path:
        """Where the autoencoder for ``train`` and these options is kept."""
        from veil.autoencoder import dataset_fingerprint

        cfg = self.config
        if cfg.autoencoder_dir is None:
            return out_dir / self.WEIGHTS
        work = {"epochs": cfg.epochs, "batch_size": cfg.batch_size, "lr": cfg.lr, "seed": cfg.seed,
                "train": dataset_fingerprint(train), "size": len(train)}
        digest = hashlib.sha256(json.dumps(work, sort_keys=True).encode()).hexdigest()[:20]
        return Path(cfg.autoencoder_dir) / f"autoencoder-{digest}.safetensors"

    def run(self, loaded: LoadedRun, train: ImageDataset, test: ImageDataset, out_dir: Path) -> MitigationResult:
        from veil.autoencoder import autoencode, cached_autoencoder, reconstruction_mse

        cfg = self.config
        model = loaded.model
        dev = module_device(model)
        ae = cached_autoencoder(
            self.weights_file(train, out_dir), train, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
            device=dev, seed=cfg.seed, progress=self.progress,
        )
        poisoned_test = loaded.attack.poison_test(test)
        robust = robust_test(loaded.attack, test, poisoned_test)
        orig_cda, orig_asr = evaluate_pipeline(model, test, poisoned_test)
        cda, asr = evaluate_pipeline(model, test, poisoned_test, lambda x: autoencode(ae, x))
        orig_ra, ra = transformed_accuracy(model, robust), transformed_accuracy(model, robust, lambda x: autoencode(ae, x))
        mse = reconstruction_mse(ae, test.images)
        psnr_db = float(10 * torch.log10(torch.tensor(1.0 / max(mse, 1e-12))))
        log.info("autoencoder: clean accuracy %.4f, attack success rate %.4f (reconstruction PSNR %.2f dB)", cda, asr, psnr_db)

        title = f"{loaded.config.attack} on {loaded.config.dataset} ({loaded.config.model})"
        atomic_write_json(
            out_dir / "tables" / "autoencoder.json",
            {
                "title": f"Autoencoder defense: {title}, {len(test)} test images",
                "columns": ["pre-processing", "clean accuracy %", "attack success rate %", "reconstruction PSNR dB"],
                "rows": [["none", _pct(orig_cda), _pct(orig_asr), None], ["autoencoder", _pct(cda), _pct(asr), round(psnr_db, 2)]],
            },
        )
        if cfg.examples:
            from veil.report.images import image_grid, png_bytes

            clean, poisoned = _example_rows(loaded, test, cfg.examples, loaded.config.seed)
            rows = [clean, autoencode(ae, clean), poisoned, autoencode(ae, poisoned)]
            labels = ["clean", "clean, autoencoded", "poisoned", "poisoned, autoencoded"]
            atomic_write_bytes(out_dir / "figures" / "autoencoder_examples.png", png_bytes(image_grid(rows, labels=labels)))
        return MitigationResult(
            defense=self.name,
            clean_accuracy=cda,
            attack_success_rate=asr,
            original_clean_accuracy=orig_cda,
            original_attack_success_rate=orig_asr,
            robust_accuracy=ra,
            original_robust_accuracy=orig_ra,
            extra={
                "reconstruction_mse": mse,
                "reconstruction_psnr_db": psnr_db,
                "autoencoder_file": self.WEIGHTS,
                "test_size": len(test),
                "asr_test_size": len(poisoned_test),
            },
        )
