"""Fine-pruning (Liu, Dolan-Gavitt & Garg, "Fine-Pruning: Defending Against Backdooring Attacks on
Deep Neural Networks", RAID 2018).

Backdoor triggers activate neurons that clean inputs leave dormant. The defender ranks the
channels of the last convolutional layer by their mean activation on clean data,

    a_c = mean_{x in D_clean, h, w} A_c(x)[h, w],

and prunes them in ascending order of ``a_c`` (Section 4.1), recording clean accuracy and attack
success rate after each removal (the pruning figures of the seed papers: Figure 11 of the adaptive
attack, Figure 2 of ATTEQ, Figure 6 of the multinomial attack, Figure 4b of the frequency attack).
The defender stops when the accuracy on its validation data falls below a threshold (ATTEQ, Section
7.1.1: "sequentially prunes neurons until the accuracy of the validation dataset drops below a
predetermined threshold", 80 %) and may then fine-tune the pruned network on its clean data
(Section 4.3, "fine-pruning").

Pruning is a channel mask, so the network's shape never changes:

* ``layer="features"`` (default) masks channels of the last convolutional feature map after its
  activation, the map global pooling reads (``features(x)``, the penultimate layer the multinomial
  paper names); because pooling is linear, zeroing channel ``c`` of that map equals zeroing
  feature ``c``, so the whole curve costs one feature pass over the data plus one linear layer per
  point;
* any module path (``"last_conv"`` for :attr:`veil.models.Classifier.last_conv`, the
  BackdoorBench choice for PreAct-ResNet) masks that module's output channels through a forward
  hook; each curve point is then a forward pass, so the curve has ``points`` points.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from veil.data.base import ImageDataset, to_float
from veil.defenses.base import (
    DefenseConfig,
    MitigationResult,
    Mitigator,
    register_defense,
    robust_test,
)
from veil.defenses.common import (
    CleanSource,
    batched_features,
    check_fraction,
    check_positive,
    check_source,
    defender_data,
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

FEATURES = "features"


class PrunedClassifier(nn.Module):
    """A classifier with some channels of one layer zeroed.

    Args:
        model: a :class:`veil.models.Classifier` (``features``/``classify`` split).
        layer: ``"features"`` (mask the penultimate features, i.e. the channels of the last
            convolutional map after its activation) or a module path of ``model`` whose output
            ``(B, C, H, W)`` (or ``(B, N, C)``) is masked through a forward hook.
        channels: number of channels of that layer.

    ``prune(order[:n])`` sets the mask; :meth:`remove` detaches the hook.
    """

    def __init__(self, model: nn.Module, layer: str, channels: int) -> None:
        super().__init__()
        self.model = model
        self.layer = layer
        self.register_buffer("keep", torch.ones(channels, device=module_device(model)))
        self._handle = None
        if layer != FEATURES:
            module = _module(model, layer)
            self._handle = module.register_forward_hook(self._hook)

    def _hook(self, _m: nn.Module, _inp: Any, out: Tensor) -> Tensor:
        if out.dim() == 4:
            return out * self.keep.view(1, -1, 1, 1).to(out.dtype)
        return out * self.keep.to(out.dtype)

    def prune(self, channels: Tensor) -> None:
        """Zero exactly ``channels`` (all others restored)."""
        self.keep.fill_(1.0)
        if channels.numel():
            self.keep[channels.to(self.keep.device)] = 0.0

    def features(self, x: Tensor) -> Tensor:
        f = self.model.features(x)  # type: ignore[operator]
        return f * self.keep if self.layer == FEATURES else f

    def classify(self, f: Tensor) -> Tensor:
        return self.model.classify(f)  # type: ignore[operator]

    def forward(self, x: Tensor) -> Tensor:
        return self.classify(self.features(x))

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


def _module(model: nn.Module, layer: str) -> nn.Module:
    modules = dict(model.named_modules())
    if layer not in modules:
        raise ConfigError(
            f"model {type(model).__name__} has no layer {layer!r}; use 'features', 'last_conv' or a path from named_modules()"
        )
    return modules[layer]


@torch.no_grad()
def channel_activations(model: nn.Module, images: Tensor, layer: str = FEATURES, batch_size: int = 256) -> Tensor:
    """Mean activation ``a_c`` ``(C,)`` of every channel of ``layer`` over clean ``images``
    ``(N, C, H, W)`` (uint8 or float in ``[0, 1]``), averaged over images and positions."""
    if layer == FEATURES:
        return batched_features(model, images, batch_size).mean(0)
    module = _module(model, layer)
    sums: list[Tensor] = []
    count = 0

    def hook(_m: nn.Module, _inp: Any, out: Tensor) -> None:
        dims = [0, 2, 3] if out.dim() == 4 else list(range(out.dim() - 1))
        sums.append(out.float().mean(dims).cpu() * out.shape[0])

    handle = module.register_forward_hook(hook)
    dev = module_device(model)
    try:
        with eval_mode(model):
            for i in range(0, images.shape[0], batch_size):
                xb = images[i : i + batch_size].to(dev)
                model(to_float(xb) if xb.dtype == torch.uint8 else xb.float())
                count += xb.shape[0]
    finally:
        handle.remove()
    if not sums:
        raise ConfigError(f"layer {layer!r} did not run in the forward pass")
    return torch.stack(sums).sum(0) / count


def pruning_order(activations: Tensor) -> Tensor:
    """Channel indices in ascending order of mean activation (ties by index)."""
    return torch.argsort(activations.double(), stable=True)


def pruning_curve(
    model: nn.Module,
    order: Tensor,
    sets: dict[str, ImageDataset],
    layer: str = FEATURES,
    counts: list[int] | None = None,
    batch_size: int = 256,
    progress: bool = False,
    relabel: dict[str, tuple[str, Tensor]] | None = None,
) -> list[dict[str, Any]]:
    """Accuracy on each of ``sets`` after pruning the first ``n`` channels of ``order``.

    Args:
        model: the classifier (unchanged; a :class:`PrunedClassifier` wraps it).
        order: pruning order ``(C,)``, e.g. :func:`pruning_order`.
        sets: named datasets, e.g. ``{"clean_accuracy": test, "attack_success_rate":
            poisoned_test}`` (the ASR set is the attack's poisoned test set, labelled with the
            target, so its accuracy is the ASR).
        layer: see :class:`PrunedClassifier`.
        counts: numbers of pruned channels to evaluate (default every count ``0..C``).
        batch_size, progress: inference settings.
        relabel: further figures read from the same predictions, ``{NAME: (SET, labels)}``: the
            accuracy of the predictions on ``sets[SET]`` against ``labels`` (e.g. the robust
            accuracy: the triggered set's predictions against the images' true labels).

    Returns:
        One dict per count: ``{"pruned": n, "fraction": n / C, NAME: accuracy, ...}``.
    """
    relabel = relabel or {}
    for name, (key, labels) in relabel.items():
        if key not in sets or labels.numel() != len(sets[key]):
            raise ConfigError(f"relabel {name!r} needs one label per image of a set in sets, got {key!r}")

    def figures(point: dict[str, Any], preds: dict[str, Tensor]) -> dict[str, Any]:
        for k, d in sets.items():
            point[k] = float((preds[k] == d.labels).float().mean()) if len(d) else float("nan")
        for name, (key, labels) in relabel.items():
            point[name] = float((preds[key] == labels).float().mean()) if labels.numel() else float("nan")
        return point

    channels = int(order.numel())
    counts = list(range(channels + 1)) if counts is None else sorted({int(n) for n in counts})
    pruned = PrunedClassifier(model, layer, channels)
    points: list[dict[str, Any]] = []
    try:
        if layer == FEATURES:
            feats = {k: batched_features(model, d.images, batch_size, desc=f"features ({k})", progress=progress) for k, d in sets.items()}
            dev = module_device(model)
            with torch.no_grad():
                for n in counts:
                    keep = torch.ones(channels)
                    keep[order[:n]] = 0.0
                    preds = {k: model.classify((feats[k] * keep).to(dev)).float().cpu().argmax(1)  # type: ignore[operator]
                             for k in sets}
                    points.append(figures({"pruned": n, "fraction": n / channels}, preds))
        else:
            from veil.train import predict

            for n in tqdm(counts, desc="pruning", unit="point", leave=False, disable=not progress or None):
                pruned.prune(order[:n])
                preds = {k: predict(pruned, d.images, batch_size=batch_size) if len(d) else d.labels for k, d in sets.items()}
                points.append(figures({"pruned": n, "fraction": n / channels}, preds))
    finally:
        pruned.remove()
    return points


def operating_point(curve: list[dict[str, Any]], key: str, threshold: float) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Sequential pruning's stopping rule: the last point before ``curve[i][key]`` first falls below
    ``threshold`` (the first point if it starts below), and that first point below (``None`` if
    it never falls)."""
    for i, p in enumerate(curve):
        if p[key] < threshold:
            return curve[max(i - 1, 0)], p
    return curve[-1], None


@register_defense("fine_pruning")
class FinePruning(Mitigator):
    """Fine-pruning (Liu et al., RAID 2018): prune the channels clean data leave dormant, then
    optionally fine-tune on clean data.

    Options (``Config``):
        clean_images: the defender's clean images (default 1000): their mean activations rank
            the channels, their accuracy is the validation accuracy of the stopping rule, and
            fine-tuning trains on them.
        clean_source: ``"test"`` (default: held-out data, the curve is measured on the remaining
            test images) or ``"train"`` (the run's clean training images).
        layer: ``"features"`` (default), ``"last_conv"`` or a module path; see the module docstring.
        points: curve points for a module ``layer`` (default 32; ``"features"`` evaluates every count).
        accuracy_threshold: stop pruning when the validation accuracy falls below it (default 0.8,
            ATTEQ's rule).
        finetune_epochs: epochs of fine-tuning the pruned model at the stopping point on the clean
            images (default 0: pruning only).
        finetune_lr, finetune_batch_size: SGD settings of fine-tuning (default 0.01, 64).
        seed: seed of the clean subset and of fine-tuning.

    Writes ``figures/fine_pruning_curve.png`` and ``tables/fine_pruning.json``.

    Result: :class:`MitigationResult` at the stopping point (after fine-tuning when enabled), with
    the whole ``curve`` (``pruned``, ``fraction``, ``clean_accuracy``, ``attack_success_rate``,
    ``validation_accuracy``) and ``extra`` (``layer``, ``channels``, ``pruned``,
    ``pruned_fraction``, ``pruned_only`` and ``first_below_threshold`` points, ``test_rule`` (the
    same two points when the rule reads the test accuracy instead of the defender's validation
    accuracy), ``finetuned``, ``order``, sizes).
    """

    @dataclass(frozen=True)
    class Config(DefenseConfig):
        clean_images: int = 1000
        clean_source: CleanSource = "test"
        layer: str = FEATURES
        points: int = 32
        accuracy_threshold: float = 0.8
        finetune_epochs: int = 0
        finetune_lr: float = 0.01
        finetune_batch_size: int = 64
        seed: int = 0

        def __post_init__(self) -> None:
            check_source(self.clean_source)
            check_positive(self.clean_images, "clean_images")
            check_positive(self.points, "points")
            check_positive(self.finetune_epochs, "finetune_epochs", allow_zero=True)
            check_positive(self.finetune_batch_size, "finetune_batch_size")
            check_fraction(self.accuracy_threshold, "accuracy_threshold")
            if isinstance(self.finetune_lr, bool) or not isinstance(self.finetune_lr, (int, float)) or not self.finetune_lr > 0:
                raise ConfigError(f"finetune_lr must be a positive number, got {self.finetune_lr!r}")
            if not isinstance(self.layer, str) or not self.layer:
                raise ConfigError(f"layer must be 'features', 'last_conv' or a module path, got {self.layer!r}")

    config: Config

    def run(self, loaded: LoadedRun, train: ImageDataset, test: ImageDataset, out_dir: Path) -> MitigationResult:
        cfg = self.config
        model = copy.deepcopy(loaded.model).eval()
        layer = getattr(model, "last_conv", None) if cfg.layer == "last_conv" else cfg.layer
        if layer is None:
            raise ConfigError(f"model {type(model).__name__} names no last_conv; pass a module path as layer")
        clean, evaluation = defender_data(train, test, cfg.clean_images, cfg.clean_source, cfg.seed, self.name)
        poisoned = loaded.attack.poison_test(evaluation)
        robust = robust_test(loaded.attack, evaluation, poisoned)
        activations = channel_activations(model, clean.images, layer)
        channels = int(activations.numel())
        order = pruning_order(activations)
        counts = None
        if layer != FEATURES:
            counts = sorted({round(i * channels / cfg.points) for i in range(cfg.points + 1)})
        sets = {"clean_accuracy": evaluation, "attack_success_rate": poisoned, "validation_accuracy": clean}
        log.info("fine-pruning: %d channels of %s, %d clean images, %d test images", channels, layer, len(clean), len(evaluation))
        curve = pruning_curve(model, order, sets, layer, counts, progress=self.progress,
                              relabel={"robust_accuracy": ("attack_success_rate", robust.labels)})
        stop, below = operating_point(curve, "validation_accuracy", cfg.accuracy_threshold)
        # the same rule read on the test curve, as the papers' figures report it
        test_stop, test_below = operating_point(curve, "clean_accuracy", cfg.accuracy_threshold)
        if curve[0]["validation_accuracy"] < cfg.accuracy_threshold:
            log.warning(
                "fine-pruning: the unpruned model's validation accuracy %.3f is already below the threshold %.2f; "
                "nothing is pruned", curve[0]["validation_accuracy"], cfg.accuracy_threshold,
            )
        n = int(stop["pruned"])
        log.info(
            "fine-pruning: stop at %d/%d channels: clean accuracy %.4f, attack success rate %.4f",
            n, channels, stop["clean_accuracy"], stop["attack_success_rate"],
        )
        finetuned: dict[str, Any] | None = None
        cda, asr, ra = stop["clean_accuracy"], stop["attack_success_rate"], stop["robust_accuracy"]
        if cfg.finetune_epochs:
            finetuned = self._finetune(model, layer, order[:n], channels, clean, evaluation, poisoned, robust)
            cda, asr, ra = finetuned["clean_accuracy"], finetuned["attack_success_rate"], finetuned["robust_accuracy"]

        title = run_title(loaded)
        atomic_write_bytes(
            out_dir / "figures" / "fine_pruning_curve.png",
            _curve_png(curve, stop, cfg.accuracy_threshold, finetuned, layer, title),
        )
        step = max(1, math.ceil(len(curve) / 16))
        shown = {i for i in range(0, len(curve), step)} | {len(curve) - 1, curve.index(stop)}
        if below is not None:
            shown.add(curve.index(below))
        rows: list[list[Any]] = []
        for i in sorted(shown):
            p = curve[i]
            note = "stop" if p is stop else ("first below threshold" if p is below else "")
            rows.append([p["pruned"], round(100 * p["fraction"], 1), pct(p["validation_accuracy"]), pct(p["clean_accuracy"]),
                         pct(p["attack_success_rate"]), pct(p["robust_accuracy"]), note])
        if finetuned is not None:
            rows.append([n, round(100 * n / channels, 1), None, pct(finetuned["clean_accuracy"]),
                         pct(finetuned["attack_success_rate"]), pct(finetuned["robust_accuracy"]),
                         f"fine-tuned {cfg.finetune_epochs} epoch(s)"])
        atomic_write_json(
            out_dir / "tables" / "fine_pruning.json",
            {
                "title": f"Fine-pruning ({layer}, {channels} channels): {title}",
                "columns": ["pruned", "pruned %", "validation accuracy %", "clean accuracy %", "attack success rate %",
                            "robust accuracy %", "note"],
                "rows": rows,
                "note": f"stop when validation accuracy < {100 * cfg.accuracy_threshold:g} % on {len(clean)} clean images; "
                f"{len(evaluation)} test images, {len(poisoned)} triggered",
            },
        )
        return MitigationResult(
            defense=self.name,
            clean_accuracy=cda,
            attack_success_rate=asr,
            original_clean_accuracy=curve[0]["clean_accuracy"],
            original_attack_success_rate=curve[0]["attack_success_rate"],
            robust_accuracy=ra,
            original_robust_accuracy=curve[0]["robust_accuracy"],
            curve=curve,
            extra={
                "layer": layer,
                "channels": channels,
                "pruned": n,
                "pruned_fraction": n / channels,
                "accuracy_threshold": cfg.accuracy_threshold,
                "pruned_only": stop,
                "first_below_threshold": below,
                "test_rule": {"stop": test_stop, "first_below_threshold": test_below},
                "finetuned": finetuned,
                "order": order.tolist(),
                "clean_images": len(clean),
                "test_size": len(evaluation),
                "asr_test_size": len(poisoned),
            },
        )

    def _finetune(
        self, model: nn.Module, layer: str, pruned: Tensor, channels: int, clean: ImageDataset,
        evaluation: ImageDataset, poisoned: ImageDataset, robust: ImageDataset,
    ) -> dict[str, Any]:
        """Fine-tune the pruned model on the clean images (the mask stays applied)."""
        from veil.train import TrainConfig, Trainer, predict

        cfg = self.config
        wrapped = PrunedClassifier(model, layer, channels)
        wrapped.prune(pruned)
        try:
            tc = TrainConfig(epochs=cfg.finetune_epochs, batch_size=min(cfg.finetune_batch_size, len(clean)), lr=cfg.finetune_lr,
                             schedule="cosine", warmup_epochs=0.0, seed=cfg.seed, checkpoint_every=0)
            history = Trainer(wrapped, clean, tc, device=module_device(model), progress=self.progress).fit()
            wrapped.eval()
            cda = float((predict(wrapped, evaluation.images) == evaluation.labels).float().mean())
            triggered = predict(wrapped, poisoned.images) if len(poisoned) else poisoned.labels
            asr = float((triggered == poisoned.labels).float().mean()) if len(poisoned) else float("nan")
            ra = float((triggered == robust.labels).float().mean()) if len(poisoned) else float("nan")
        finally:
            wrapped.remove()
        log.info("fine-pruning: after %d epoch(s) of fine-tuning: clean accuracy %.4f, attack success rate %.4f",
                 cfg.finetune_epochs, cda, asr)
        return {"epochs": cfg.finetune_epochs, "clean_accuracy": cda, "attack_success_rate": asr, "robust_accuracy": ra,
                "seconds": sum(h["seconds"] for h in history), "final_loss": history[-1]["loss"]}


def _curve_png(
    curve: list[dict[str, Any]], stop: dict[str, Any], threshold: float, finetuned: dict[str, Any] | None,
    layer: str, title: str,
) -> bytes:
    """Clean accuracy and attack success rate against the number of pruned channels."""
    plt = pyplot()
    x = [p["pruned"] for p in curve]
    fig, ax = plt.subplots(figsize=(7.4, 3.5))
    ax.plot(x, [100 * p["clean_accuracy"] for p in curve], color="C0", label="clean accuracy (test)")
    ax.plot(x, [100 * p["attack_success_rate"] for p in curve], color="C3", label="attack success rate")
    ax.plot(x, [100 * p["validation_accuracy"] for p in curve], color="C0", ls=":", lw=1, label="validation accuracy (defender)")
    ax.axhline(100 * threshold, color="grey", ls="--", lw=0.8, label=f"threshold {100 * threshold:g} %")
    ax.axvline(stop["pruned"], color="k", lw=0.8, alpha=0.6)
    ax.annotate(f" stop: {stop['pruned']}", (stop["pruned"], 95), fontsize=7, ha="left")
    if finetuned is not None:
        ax.scatter([stop["pruned"]], [100 * finetuned["clean_accuracy"]], marker="o", color="C0", zorder=3, label="fine-tuned CDA")
        ax.scatter([stop["pruned"]], [100 * finetuned["attack_success_rate"]], marker="s", color="C3", zorder=3, label="fine-tuned ASR")
    ax.set_xlabel(f"channels pruned ({layer}, {x[-1]} in all)")
    ax.set_ylabel("%")
    ax.set_ylim(-2, 102)
    ax.set_title(f"Fine-pruning: {title}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    return figure_png(fig)
