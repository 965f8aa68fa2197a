"""Grad-CAM heatmaps (Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via
Gradient-based Localization", ICCV 2017) and a Februus-style trigger-removal check (Doan et al.,
"Februus: Input Purification Defense Against Trojan Attacks on Deep Neural Network Systems",
ACSAC 2020).

For class ``c`` with score ``y^c`` and the ``K`` feature maps ``A^k`` of a convolutional layer,
Grad-CAM weights each map by its average gradient (Eq. 1) and keeps the positive part of the
weighted sum (Eq. 2):

    alpha_k^c = (1 / Z) sum_{i,j} d y^c / d A^k_{ij},      L^c = ReLU(sum_k alpha_k^c A^k),

upsampled bilinearly to the input size and scaled to ``[0, 1]`` per image. A patch trigger draws
the attention of a backdoored model (the heatmaps the semantic and frequency-domain papers show
to argue that their triggers do not). Februus removes the high-attention region of every input and
restores it with an inpainter; here the region where the heatmap of the predicted class reaches
``threshold`` (the official release's ``MASK_COND``: 0.8 on GTSRB, 0.7 on CIFAR-10) is removed and
restored by OpenCV's inpainting (Telea, "An image inpainting technique based on the fast marching
method", 2004; radius 3) in place of Februus's GAN, or, the masked-only
variant, filled with the mean colour of the defender's clean images. Both variants are measured on
every run: the share of triggered inputs whose backdoor each removes, and the clean accuracy and
robust accuracy after it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from veil.data.base import ImageDataset, to_float, to_uint8
from veil.defenses.base import (
    DefenseConfig,
    MitigationResult,
    Mitigator,
    register_defense,
)
from veil.defenses.common import (
    CleanSource,
    check_fraction,
    check_positive,
    check_source,
    defender_data,
    figure_png,
    pct,
    pyplot,
    reference_model,
    run_title,
    seeded_rows,
    to_hwc,
)
from veil.errors import ConfigError
from veil.records import atomic_write_bytes, atomic_write_json
from veil.inference import eval_mode, module_device

if TYPE_CHECKING:
    from veil.runs import LoadedRun

log = logging.getLogger(__name__)


def default_layer(model: nn.Module, image_shape: tuple[int, ...] | None = None) -> str:
    """The deepest of ``model.feature_layers()`` (e.g. ``"layer4"``), else ``model.last_conv``.

    With ``image_shape`` ``(C, H, W)``, a deepest feature layer whose map has a single cell (VGG at
    32 pixels: five poolings leave 1 x 1, and a one-cell heatmap is constant) gives way to the
    model's last convolution, whose map is the last with a spatial extent (Grad-CAM's and Februus's
    "last convolutional layer"). Decided from shapes alone, never from the inputs under test.
    """
    layers = model.feature_layers() if hasattr(model, "feature_layers") else []  # type: ignore[operator]
    last = getattr(model, "last_conv", None)
    if layers:
        deepest = str(layers[-1])
        if image_shape is not None and last and _map_cells(model, deepest, image_shape) == 1:
            return str(last)
        return deepest
    if not last:
        raise ConfigError(f"model {type(model).__name__} names no feature layer; pass layer=")
    return str(last)


def _map_cells(model: nn.Module, layer: str, image_shape: tuple[int, ...]) -> int:
    """Spatial cells ``h * w`` of ``layer``'s output for one input of ``image_shape`` (0 if not a map)."""
    with eval_mode(model), torch.no_grad():
        out = model.feature_map(torch.zeros(1, *image_shape, device=module_device(model)), layer)  # type: ignore[operator]
    return int(out.shape[-1] * out.shape[-2]) if out.dim() == 4 else 0


def grad_cam(model: nn.Module, x: Tensor, layer: str, classes: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Grad-CAM heatmaps (Eq. 1-2) of a batch.

    Args:
        model: the classifier (eval mode is set for the call; parameters are not updated).
        x: images ``(B, C, H, W)`` in ``[0, 1]`` (uint8 accepted).
        layer: module path whose output ``(B, K, h, w)`` is explained.
        classes: class explained per image ``(B,)`` (default: the predicted class).

    Returns:
        ``(heatmaps, logits)``: heatmaps ``(B, H, W)`` scaled to ``[0, 1]`` per image (all zeros
        where Grad-CAM is zero everywhere) and the logits ``(B, num_classes)``, both on CPU.

    Raises:
        ConfigError: ``layer`` names no module or its output is not a 4-D map.
    """
    modules = dict(model.named_modules())
    if layer not in modules:
        raise ConfigError(f"model {type(model).__name__} has no layer {layer!r}")
    dev = module_device(model)
    x = (to_float(x) if x.dtype == torch.uint8 else x.float()).to(dev)
    captured: list[Tensor] = []

    def hook(_m: nn.Module, _inp: Any, out: Tensor) -> None:
        captured.append(out)

    handle = modules[layer].register_forward_hook(hook)
    try:
        with eval_mode(model), torch.enable_grad():
            logits = model(x).float()
            if not captured or captured[0].dim() != 4:
                raise ConfigError(f"Grad-CAM needs a convolutional layer with (B, K, h, w) output; {layer!r} gives "
                                  f"{tuple(captured[0].shape) if captured else 'nothing'}")
            feats = captured[0]
            cls = logits.argmax(1) if classes is None else classes.to(dev)
            score = logits.gather(1, cls.view(-1, 1)).sum()
            (grads,) = torch.autograd.grad(score, feats)
    finally:
        handle.remove()
    with torch.no_grad():
        alpha = grads.float().mean((2, 3), keepdim=True)  # Eq. 1: (B, K, 1, 1)
        cam = F.relu((alpha * feats.float()).sum(1, keepdim=True))  # Eq. 2: (B, 1, h, w)
        cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        flat = cam.flatten(1)
        lo, hi = flat.min(1).values, flat.max(1).values
        span = (hi - lo).clamp_min(1e-12)
        cam = torch.where((hi > lo)[:, None, None], (cam - lo[:, None, None]) / span[:, None, None], torch.zeros_like(cam))
    return cam.cpu(), logits.detach().cpu()


def batched_grad_cam(
    model: nn.Module, images: Tensor, layer: str, batch_size: int = 128, progress: bool = False, desc: str = "grad-cam"
) -> tuple[Tensor, Tensor]:
    """:func:`grad_cam` over ``images`` ``(N, C, H, W)`` in batches; ``(heatmaps (N, H, W), predictions (N,))``."""
    cams, preds = [], []
    with tqdm(total=images.shape[0], desc=desc, unit="img", leave=False, disable=not progress or None) as bar:
        for i in range(0, images.shape[0], batch_size):
            cam, logits = grad_cam(model, images[i : i + batch_size], layer)
            cams.append(cam)
            preds.append(logits.argmax(1))
            bar.update(cam.shape[0])
    if not cams:
        h, w = images.shape[-2:]
        return torch.empty(0, h, w), torch.empty(0, dtype=torch.long)
    return torch.cat(cams), torch.cat(preds)


#: OpenCV's inpainting radius (pixels around the region the fast-marching method reads); its
#: documentation's and Telea's example value.
INPAINT_RADIUS = 3
RESTORATIONS = ("inpaint", "mean")


def inpaint(images: Tensor, region: Tensor) -> Tensor:
    """Februus's restoration step: fill ``region`` of each image from the pixels around it with
    OpenCV's Telea inpainting (per image, on 8-bit pixels).

    Args:
        images: ``(N, C, H, W)`` (``C`` 1 or 3), uint8 or float in ``[0, 1]``.
        region: ``(N, H, W)`` bool, the pixels to restore.

    Returns:
        The restored images ``(N, C, H, W)`` float in ``[0, 1]``; pixels outside ``region`` unchanged.
    """
    import cv2
    import numpy as np

    x = to_uint8(images.float()) if images.dtype != torch.uint8 else images
    if x.shape[1] not in (1, 3):
        raise ConfigError(f"inpainting needs 1 or 3 channels, got {x.shape[1]}")
    out = x.clone()
    hwc = x.permute(0, 2, 3, 1).contiguous().numpy()
    masks = region.to(torch.uint8).numpy()
    for i in range(x.shape[0]):
        if not masks[i].any():
            continue
        filled = cv2.inpaint(np.ascontiguousarray(hwc[i]), masks[i], INPAINT_RADIUS, cv2.INPAINT_TELEA)
        out[i] = torch.from_numpy(filled.reshape(hwc[i].shape)).permute(2, 0, 1)
    original = to_float(images) if images.dtype == torch.uint8 else images.float()
    return torch.where(region[:, None], to_float(out), original)


def trigger_heat(heatmaps: Tensor, footprint: Tensor) -> tuple[float, float]:
    """Whether the heatmaps localise a trigger, at no threshold: the mean heatmap ``(N, H, W)`` on
    the trigger's pixels ``footprint`` ``(N, H, W)`` bool and on the other pixels (nan where there
    are none). A heatmap that finds the trigger is clearly higher on it than elsewhere."""
    inside, outside = heatmaps[footprint], heatmaps[~footprint]
    return (float(inside.mean()) if inside.numel() else float("nan"),
            float(outside.mean()) if outside.numel() else float("nan"))


def mask_attention(images: Tensor, heatmaps: Tensor, threshold: float, fill: Tensor) -> tuple[Tensor, Tensor]:
    """Februus's removal step: replace the pixels whose heatmap is ``>= threshold`` by ``fill``.

    Args:
        images: ``(N, C, H, W)``, uint8 or float in ``[0, 1]``.
        heatmaps: ``(N, H, W)`` in ``[0, 1]``.
        threshold: heatmap level of the removed region.
        fill: colour ``(C,)`` in ``[0, 1]``.

    Returns:
        ``(masked images (N, C, H, W) float, region (N, H, W) bool)``.
    """
    x = to_float(images) if images.dtype == torch.uint8 else images.float()
    region = heatmaps >= threshold
    out = torch.where(region[:, None], fill.view(1, -1, 1, 1).to(x), x)
    return out, region


@register_defense("gradcam")
class GradCam(Mitigator):
    """Grad-CAM heatmaps of clean and triggered images and a Februus-style removal check.

    Options (``Config``):
        layer: the explained layer (default: the deepest of the model's feature layers, e.g.
            ``"layer4"``, or the last convolution where that layer's map is 1 x 1, as VGG's
            ``stage5`` at 32 pixels; ``"last_conv"`` or any module path with a 4-D output).
        threshold: heatmap level (in ``[0, 1]`` after per-image scaling) of the removed region
            (default: the official Februus release's value for the dataset, ``MASK_COND`` 0.8 on
            GTSRB and 0.7 elsewhere, its CIFAR-10 value).
        test_images: triggered test inputs, and clean test inputs, analysed (default 500 each).
        examples: image pairs in the figure (default 8).
        clean_images: the defender's clean images (default 200); their mean colour fills the
            removed region.
        restore: how the removed region is restored: ``"inpaint"`` (default, Februus's step,
            with OpenCV's inpainting in place of its GAN) or ``"mean"`` (the masked-only variant:
            the clean images' mean colour). The result's figures are the chosen one's; both are
            in ``extra["variants"]`` and the table.
        reference: optional folder of a clean reference run on the same data; the figure then
            shows the clean images' heatmaps under the clean model, as the frequency-domain paper's
            Figure 4 does (default: the defended model explains both).
        clean_source: ``"test"`` (default) or ``"train"``.
        seed: seed of the subsets.

    Writes ``figures/gradcam_examples.png`` (clean and triggered images with their heatmaps side by
    side and the triggered image with its top-attention region removed and restored) and
    ``tables/gradcam.json``.

    Result: :class:`MitigationResult` of the removal pipeline (remove the top-attention region of
    every input, restore it, then classify): clean accuracy, ASR and robust accuracy after it, the
    same without it (``original_*``), and ``extra``: ``removal_rate`` (share of triggered inputs
    sent to the target before removal that are not after it: the Februus check),
    ``removed_fraction`` (mean share of pixels removed), ``trigger_coverage`` (mean share of the
    pixels the trigger changed that fall in the removed region), ``trigger_heat`` and
    ``other_heat`` (the triggered inputs' mean heatmap on the trigger's pixels and elsewhere: whether
    the layer localises the trigger at all, at any threshold), ``variants`` (the same figures for
    each restoration), ``layer`` and sizes.
    """

    @dataclass(frozen=True)
    class Config(DefenseConfig):
        layer: str | None = None
        threshold: float | None = None
        test_images: int = 500
        examples: int = 8
        clean_images: int = 200
        clean_source: CleanSource = "test"
        restore: str = "inpaint"
        reference: str | None = None
        seed: int = 0

        def __post_init__(self) -> None:
            check_source(self.clean_source)
            if self.restore not in RESTORATIONS:
                raise ConfigError(f"restore must be one of {', '.join(RESTORATIONS)}, got {self.restore!r}")
            check_positive(self.test_images, "test_images")
            check_positive(self.clean_images, "clean_images")
            check_positive(self.examples, "examples", allow_zero=True)
            if self.threshold is not None:
                check_fraction(self.threshold, "threshold", closed=False)
            if self.layer is not None and (not isinstance(self.layer, str) or not self.layer):
                raise ConfigError(f"layer must be a module path, got {self.layer!r}")

    config: Config

    @classmethod
    def not_applicable(cls, model: nn.Module) -> str | None:
        # a ViT's stages are token sequences, not the (B, C, h, w) maps Grad-CAM reads
        return "needs convolutional feature maps" if callable(getattr(model, "processed_forward", None)) else None

    def run(self, loaded: LoadedRun, train: ImageDataset, test: ImageDataset, out_dir: Path) -> MitigationResult:
        cfg = self.config
        model = loaded.model
        layer = default_layer(model, tuple(test.images.shape[1:])) if cfg.layer is None else (
            str(getattr(model, "last_conv", "")) if cfg.layer == "last_conv" else cfg.layer)
        clean, evaluation = defender_data(train, test, cfg.clean_images, cfg.clean_source, cfg.seed, self.name)
        fill = to_float(clean.images).mean((0, 2, 3))
        attack = loaded.attack
        targets = attack.target_labels(evaluation.labels)
        eligible = torch.nonzero(evaluation.labels != targets).flatten()
        pick = eligible[seeded_rows(eligible.numel(), cfg.test_images, cfg.seed + 1)]
        source = evaluation.subset(pick)  # the clean originals of the triggered inputs
        # the triggered versions row by row (as Attack.poison_test builds its ASR set), labelled
        # with their targets
        triggered = to_uint8(attack.apply_quantized(to_float(source.images), source.labels, test=True).cpu())
        poisoned = ImageDataset(triggered, attack.target_labels(source.labels), source.classes, source.name + "-poisoned",
                                source.hflip)
        clean_eval = evaluation.subset(seeded_rows(len(evaluation), cfg.test_images, cfg.seed + 2))

        cam_bad, pred_bad = batched_grad_cam(model, poisoned.images, layer, progress=self.progress, desc="grad-cam (triggered)")
        cam_clean, pred_clean = batched_grad_cam(model, clean_eval.images, layer, progress=self.progress, desc="grad-cam (clean)")
        from veil.train import predict

        def rate(pred: Tensor, labels: Tensor) -> float:
            return float((pred == labels).float().mean()) if labels.numel() else float("nan")

        threshold = februus_threshold(loaded.config.dataset) if cfg.threshold is None else cfg.threshold
        masked_bad, region_bad = mask_attention(poisoned.images, cam_bad, threshold, fill)
        masked_clean, region_clean = mask_attention(clean_eval.images, cam_clean, threshold, fill)
        restored = {"mean": (masked_bad, masked_clean),
                    "inpaint": (inpaint(poisoned.images, region_bad), inpaint(clean_eval.images, region_clean))}
        hit = pred_bad == poisoned.labels
        variants: dict[str, dict[str, float]] = {}
        after: dict[str, Tensor] = {}
        for name, (bad, good) in restored.items():
            after[name] = predict(model, bad)
            variants[name] = {
                "clean_accuracy": rate(predict(model, good), clean_eval.labels),
                "attack_success_rate": rate(after[name], poisoned.labels),
                "robust_accuracy": rate(after[name], source.labels),
                "removal_rate": rate(after[name][hit], poisoned.labels[hit]) if bool(hit.any()) else float("nan"),
            }
            variants[name]["removal_rate"] = 1.0 - variants[name]["removal_rate"]  # share no longer sent to the target
        chosen = variants[cfg.restore]
        masked_bad, after_bad = restored[cfg.restore][0], after[cfg.restore]
        removal_rate, asr, cda = chosen["removal_rate"], chosen["attack_success_rate"], chosen["clean_accuracy"]
        orig_asr = rate(pred_bad, poisoned.labels)
        orig_ra = rate(pred_bad, source.labels)
        orig_cda = rate(pred_clean, clean_eval.labels)
        footprint = (to_float(poisoned.images) - to_float(source.images)).abs().amax(1) > 0.5 / 255  # (N, H, W)
        covered = (footprint & region_bad).flatten(1).sum(1).float()
        size = footprint.flatten(1).sum(1).float()
        has = size > 0
        coverage = float((covered[has] / size[has]).mean()) if bool(has.any()) else float("nan")
        removed_fraction = float(region_bad.float().mean()) if len(poisoned) else float("nan")
        heat_on, heat_off = trigger_heat(cam_bad, footprint)
        for name, v in variants.items():
            log.info("grad-cam (%s, %s): removal rate %.4f; ASR %.4f -> %.4f, clean accuracy %.4f -> %.4f",
                     layer, name, v["removal_rate"], orig_asr, v["attack_success_rate"], orig_cda, v["clean_accuracy"])

        title = run_title(loaded)
        if cfg.examples:
            k = min(cfg.examples, len(poisoned))
            explainer, explainer_layer = model, layer
            if cfg.reference:
                explainer = reference_model(loaded, cfg.reference)
                explainer_layer = layer if cfg.layer is not None else default_layer(explainer, tuple(test.images.shape[1:]))
            ex = torch.linspace(0, len(poisoned) - 1, k).round().long().unique()  # spread over the labels
            cam_src, pred_src = batched_grad_cam(explainer, source.images[ex], explainer_layer)
            atomic_write_bytes(
                out_dir / "figures" / "gradcam_examples.png",
                _examples_png(source.images[ex], cam_src, pred_src, source.labels[ex], poisoned.images[ex], cam_bad[ex],
                              pred_bad[ex], masked_bad[ex], after_bad[ex], poisoned.labels[ex], layer, title,
                              reference=bool(cfg.reference)),
            )
        atomic_write_json(
            out_dir / "tables" / "gradcam.json",
            {
                "title": f"Grad-CAM ({layer}) and Februus-style removal: {title}",
                "columns": ["restoration", "clean accuracy %", "ASR %", "robust accuracy %", "backdoor removed %",
                            "pixels removed %", "trigger pixels removed %"],
                "rows": [["none (undefended)", pct(orig_cda), pct(orig_asr), pct(orig_ra), None, None, None]] + [
                    [_RESTORATION_NAMES[name], pct(v["clean_accuracy"]), pct(v["attack_success_rate"]),
                     pct(v["robust_accuracy"]), pct(v["removal_rate"]), pct(removed_fraction), pct(coverage)]
                    for name, v in variants.items()
                ],
                "note": f"removed region: heatmap >= {threshold:g}; {len(clean_eval)} clean and {len(poisoned)} "
                        f"triggered test inputs; mean colour of {len(clean)} clean images; the result is {cfg.restore}'s; "
                        f"mean heatmap on the trigger's pixels {heat_on:.3f}, elsewhere {heat_off:.3f}",
            },
        )
        return MitigationResult(
            defense=self.name,
            clean_accuracy=cda,
            attack_success_rate=asr,
            original_clean_accuracy=orig_cda,
            original_attack_success_rate=orig_asr,
            robust_accuracy=chosen["robust_accuracy"],
            original_robust_accuracy=orig_ra,
            extra={
                "layer": layer,
                "threshold": threshold,
                "restore": cfg.restore,
                "variants": variants,
                "removal_rate": removal_rate,
                "removed_fraction": removed_fraction,
                "trigger_coverage": coverage,
                "trigger_heat": heat_on,
                "other_heat": heat_off,
                "triggered_inputs": len(poisoned),
                "triggered_hits": int(hit.sum()),
                "clean_inputs": len(clean_eval),
                "clean_images": len(clean),
                "reference_run": cfg.reference,
            },
        )


#: The official Februus release's ``MASK_COND`` per dataset (``traffic_sign/Februus.py``: 0.8,
#: ``scene/Februus.py`` on CIFAR-10: 0.7, the value veil takes for every other dataset).
FEBRUUS_THRESHOLDS = {"gtsrb": 0.8}
FEBRUUS_DEFAULT_THRESHOLD = 0.7


def februus_threshold(dataset: str) -> float:
    """The official release's heatmap threshold for ``dataset`` (GTSRB's for ``gtsrb_sample``
    and every other GTSRB variant)."""
    family = dataset.split("_")[0]
    return FEBRUUS_THRESHOLDS.get(family, FEBRUUS_DEFAULT_THRESHOLD)


_RESTORATION_NAMES = {"inpaint": f"inpainted (OpenCV Telea, radius {INPAINT_RADIUS})", "mean": "mean colour (masked only)"}


def _examples_png(
    clean: Tensor, cam_clean: Tensor, pred_clean: Tensor, labels: Tensor, bad: Tensor, cam_bad: Tensor,
    pred_bad: Tensor, masked: Tensor, pred_masked: Tensor, targets: Tensor, layer: str, title: str,
    reference: bool = False,
) -> bytes:
    """Columns of examples; rows: clean image, its heatmap, triggered image, its heatmap, the
    triggered image with the top-attention region removed (predicted labels in the titles)."""
    plt = pyplot()
    k = clean.shape[0]
    names = ["clean", "Grad-CAM (clean model)" if reference else "Grad-CAM (clean)", "triggered", "Grad-CAM (triggered)",
             "region removed, restored"]
    fig, axes = plt.subplots(5, k, figsize=(1.25 * k + 0.9, 6.6), squeeze=False)
    for j in range(k):
        cells = [
            (to_hwc(clean[j]), None, f"y={int(labels[j])}"),
            (to_hwc(clean[j]), cam_clean[j], f"pred {int(pred_clean[j])}"),
            (to_hwc(bad[j]), None, f"target {int(targets[j])}"),
            (to_hwc(bad[j]), cam_bad[j], f"pred {int(pred_bad[j])}"),
            (to_hwc(masked[j]), None, f"pred {int(pred_masked[j])}"),
        ]
        for r, (img, cam, text) in enumerate(cells):
            ax = axes[r, j]
            ax.imshow(img, cmap="gray" if img.ndim == 2 else None, interpolation="nearest")
            if cam is not None:
                ax.imshow(cam.numpy(), cmap="jet", alpha=0.45, vmin=0, vmax=1, interpolation="bilinear")
            ax.set_title(text, fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(names[r], fontsize=7)
    fig.suptitle(f"Grad-CAM ({layer}): {title}", fontsize=9)
    fig.tight_layout()
    return figure_png(fig)
