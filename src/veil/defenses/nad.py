"""Neural Attention Distillation (Li, Lyu, Koren, Lyu, Li & Ma, "Neural Attention Distillation:
Erasing Backdoor Triggers from Deep Neural Networks", ICLR 2021; ATTEQ's Table 8).

The defender holds a small clean set (5 % of the training data). A *teacher* is the backdoored
model fine-tuned on it; the *student*, the backdoored model again, is then trained on the same
clean data with cross-entropy plus the attention distillation loss (eq. 2-3 of the paper)

    L = CE(F_S(x), y) + beta * || A(F_S^l(x)) - A(F_T^l(x)) ||_2^2 ,
    A(f) = sum_c |f_c|^p / || sum_c |f_c|^p ||_2   (the attention map of a stage's output)

(the mean-squared form of the official code, `bboylyg/NAD`, which is what its beta is scaled for).

Readings (the official defaults, as the shared spec defenses-baselines.md reads them): p = 2;
beta 5000 on the last stage only (beta1 = beta2 = 0, the official config.py before its last
revision, which moved to 500 / 1000 / 1000 on three groups); veil's stage is the deepest of
``model.feature_layers()``, e.g. ``layer4`` (for a ViT block the map is over tokens); 20 epochs,
batch 64, SGD with Nesterov momentum 0.9, weight decay 1e-4; the teacher is fine-tuned with the
same optimiser for 10 epochs (the official ``te_epochs``); random-crop augmentation as the
official loaders. The learning rate is 0.01 throughout: the official schedule (0.1 for the first
2 epochs, then 0.01; ``lr=0.1``, run as two constant-rate phases) starts at the rate its victims
were trained at, and on veil's victims (0.05, cosine) it collapses the student (clean accuracy
0.06 on the BadNets foundation run; docs/defenses.md). The clean set is drawn from the run's clean
training split, stratified; the result is measured on the whole test set.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from veil.data.base import ImageDataset
from veil.defenses.base import DefenseConfig, MitigationResult, Mitigator, register_defense, robust_test
from veil.defenses.common import check_fraction, check_positive, defender_data, pct, run_title, train_constant
from veil.errors import ConfigError
from veil.inference import eval_mode
from veil.records import atomic_write_json
from veil.train import Batch, StepContext, TrainHook, predict

if TYPE_CHECKING:
    from veil.runs import LoadedRun

log = logging.getLogger(__name__)


def attention_map(f: Tensor, p: float = 2.0, eps: float = 1e-6) -> Tensor:
    """NAD's attention map of a stage output: ``(B, C, H, W)`` -> ``(B, H*W)`` (the channel sum of
    ``|f|^p``, L2-normalised per image); a ViT block's ``(B, N, D)`` -> ``(B, N)`` over tokens."""
    if f.dim() == 4:
        am = f.float().abs().pow(p).sum(1).flatten(1)
    elif f.dim() == 3:
        am = f.float().abs().pow(p).sum(2)
    else:
        raise ConfigError(f"NAD needs a stage output of shape (B, C, H, W) or (B, N, D), got {tuple(f.shape)}")
    return am / (am.norm(dim=1, keepdim=True) + eps)


def attention_loss(student: Tensor, teacher: Tensor, p: float = 2.0) -> Tensor:
    """Mean squared difference of the two attention maps (the official code's ``F.mse_loss``)."""
    return (attention_map(student, p) - attention_map(teacher, p)).pow(2).mean()


class DistillationHook(TrainHook):
    """Adds ``beta * attention_loss`` between the student's and the frozen teacher's ``layer``."""

    def __init__(self, teacher: nn.Module, layer: str, beta: float, p: float) -> None:
        self.teacher, self.layer, self.beta, self.p = teacher.eval(), layer, beta, p
        self._out: list[Tensor] = []
        self._handle: Any = None
        self.sums = {"at_loss": 0.0, "steps": 0.0}

    def setup(self, ctx: StepContext) -> None:
        module = dict(ctx.model.named_modules()).get(self.layer)
        if module is None:
            raise ConfigError(f"NAD: the model has no layer {self.layer!r}")
        self._handle = module.register_forward_hook(lambda _m, _i, out: self._out.append(out))

    def extra_loss(self, ctx: StepContext, batch: Batch, features: Tensor, logits: Tensor) -> Tensor | None:
        student = self._out[-1]
        self._out.clear()
        with torch.no_grad():
            teacher = self.teacher.feature_map(batch.x, self.layer)  # type: ignore[operator]
        loss = attention_loss(student, teacher.detach(), self.p)
        self.sums["at_loss"] += float(loss.detach())
        self.sums["steps"] += 1
        return self.beta * loss

    def on_epoch_end(self, ctx: StepContext) -> dict[str, float]:
        mean = self.sums["at_loss"] / max(self.sums["steps"], 1.0)
        self.sums = {"at_loss": 0.0, "steps": 0.0}
        return {"nad_attention_loss": mean}

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


@register_defense("nad")
class NAD(Mitigator):
    """Neural Attention Distillation (Li et al., ICLR 2021): fine-tune a teacher on clean data,
    then distil its attention into the backdoored model.

    Options (``Config``; defaults: the official code's, but for ``lr``):
        clean_fraction: share of the run's clean training images the defender holds (0.05).
        epochs: epochs of distillation (20); teacher_epochs: epochs of the teacher's fine-tuning (10).
        lr, lr_after, lr_drop_epoch: SGD rate ``lr`` (0.01) before epoch 2, ``lr_after`` (0.01) from
            it; the official schedule is ``lr=0.1`` (see the module docstring).
        batch_size (64), momentum (0.9, Nesterov), weight_decay (1e-4).
        beta: weight of the attention loss on ``layer`` (5000); p: attention power (2).
        layer: the stage distilled (default: the deepest of the model's feature layers).
        seed: seed of the clean subset and of training.

    Writes ``tables/nad.json``. Result: :class:`MitigationResult` of the student, with the teacher's
    figures (plain fine-tuning on the same data) and the per-epoch attention loss in ``extra``.
    """

    @dataclass(frozen=True)
    class Config(DefenseConfig):
        clean_fraction: float = 0.05
        epochs: int = 20
        teacher_epochs: int = 10
        lr: float = 0.01
        lr_after: float = 0.01
        lr_drop_epoch: int = 2
        batch_size: int = 64
        momentum: float = 0.9
        weight_decay: float = 1e-4
        beta: float = 5000.0
        p: float = 2.0
        layer: str | None = None
        seed: int = 0

        def __post_init__(self) -> None:
            check_fraction(self.clean_fraction, "clean_fraction", closed=False)
            check_positive(self.epochs, "epochs")
            check_positive(self.teacher_epochs, "teacher_epochs")
            check_positive(self.batch_size, "batch_size")
            check_positive(self.lr_drop_epoch, "lr_drop_epoch", allow_zero=True)
            for name in ("lr", "lr_after", "p"):
                v = getattr(self, name)
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                    raise ConfigError(f"NAD {name} must be a positive number, got {v!r}")
            for name in ("beta", "weight_decay", "momentum"):
                v = getattr(self, name)
                if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                    raise ConfigError(f"NAD {name} must be a non-negative number, got {v!r}")

    config: Config

    @classmethod
    def not_applicable(cls, model: nn.Module) -> str | None:
        # a ViT's stages are token sequences, not the (B, C, h, w) maps attention distillation reads
        return "needs convolutional feature maps" if callable(getattr(model, "processed_forward", None)) else None

    def _train(self, model: nn.Module, clean: ImageDataset, epochs: int, hooks: list[TrainHook]) -> list[dict[str, Any]]:
        """``epochs`` of SGD on ``clean``: the official step schedule as two constant-rate phases."""
        cfg = self.config
        history: list[dict[str, Any]] = []
        first = min(cfg.lr_drop_epoch, epochs)
        for n, lr in ((first, cfg.lr), (epochs - first, cfg.lr_after)):
            if n == 0:
                continue
            history += train_constant(model, clean, n, lr, cfg.batch_size, cfg.momentum, cfg.weight_decay,
                                      cfg.seed + len(history), hooks, self.progress)
        return history

    def run(self, loaded: LoadedRun, train: ImageDataset, test: ImageDataset, out_dir: Path) -> MitigationResult:
        cfg = self.config
        model = loaded.model
        layers = model.feature_layers() if hasattr(model, "feature_layers") else []
        layer = cfg.layer or (str(layers[-1]) if layers else None)
        if layer is None:
            raise ConfigError(f"NAD: model {type(model).__name__} names no feature layer; pass --opt layer=MODULE")
        if layer not in dict(model.named_modules()):
            raise ConfigError(f"NAD: model {type(model).__name__} has no layer {layer!r}; its stages: {', '.join(layers)}")
        n = max(int(round(cfg.clean_fraction * len(train))), train.num_classes)
        clean, evaluation = defender_data(train, test, n, "train", cfg.seed, self.name)
        poisoned = loaded.attack.poison_test(evaluation)
        robust = robust_test(loaded.attack, evaluation, poisoned)

        def measure(m: nn.Module) -> dict[str, float]:
            with eval_mode(m):
                cda = float((predict(m, evaluation.images) == evaluation.labels).float().mean())
                triggered = predict(m, poisoned.images) if len(poisoned) else poisoned.labels
            asr = float((triggered == poisoned.labels).float().mean()) if len(poisoned) else float("nan")
            ra = float((triggered == robust.labels).float().mean()) if len(poisoned) else float("nan")
            return {"clean_accuracy": cda, "attack_success_rate": asr, "robust_accuracy": ra}

        before = measure(model)
        log.info("NAD: %d clean training images, layer %s; teacher: %d epochs", len(clean), layer, cfg.teacher_epochs)
        teacher = copy.deepcopy(model)
        teacher_history = self._train(teacher, clean, cfg.teacher_epochs, [])
        teacher.eval()
        for q in teacher.parameters():
            q.requires_grad_(False)
        after_teacher = measure(teacher)
        student = copy.deepcopy(model)
        hook = DistillationHook(teacher, layer, cfg.beta, cfg.p)
        try:
            history = self._train(student, clean, cfg.epochs, [hook])
        finally:
            hook.remove()
        after = measure(student)
        log.info("NAD: clean accuracy %.4f -> %.4f, attack success rate %.4f -> %.4f (teacher: %.4f, %.4f)",
                 before["clean_accuracy"], after["clean_accuracy"], before["attack_success_rate"],
                 after["attack_success_rate"], after_teacher["clean_accuracy"], after_teacher["attack_success_rate"])
        title = run_title(loaded)
        atomic_write_json(out_dir / "tables" / "nad.json", {
            "title": f"NAD ({layer}, beta {cfg.beta:g}): {title}",
            "columns": ["model", "clean accuracy %", "attack success rate %", "robust accuracy %"],
            "rows": [[name, pct(m["clean_accuracy"]), pct(m["attack_success_rate"]), pct(m["robust_accuracy"])]
                     for name, m in (("backdoored", before), (f"teacher ({cfg.teacher_epochs} epochs of fine-tuning)", after_teacher),
                                     (f"NAD student ({cfg.epochs} epochs)", after))],
            "note": f"{len(clean)} clean training images ({100 * cfg.clean_fraction:g} %); {len(evaluation)} test images, "
                    f"{len(poisoned)} triggered",
        })
        return MitigationResult(
            defense=self.name,
            clean_accuracy=after["clean_accuracy"],
            attack_success_rate=after["attack_success_rate"],
            original_clean_accuracy=before["clean_accuracy"],
            original_attack_success_rate=before["attack_success_rate"],
            robust_accuracy=after["robust_accuracy"],
            original_robust_accuracy=before["robust_accuracy"],
            curve=[{"epoch": i + 1, "loss": h["loss"], "attention_loss": h.get("nad_attention_loss")} for i, h in enumerate(history)],
            extra={"layer": layer, "clean_images": len(clean), "teacher": after_teacher,
                   "teacher_final_loss": teacher_history[-1]["loss"], "test_size": len(evaluation),
                   "asr_test_size": len(poisoned)},
        )
