"""The adaptive attack's training hook: the generator and the classifier trained together on eq. 6,
the classifier started from the benign model and clipped to it after every step (section 3.5)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from veil.attacks.base import Attack
from veil.attacks.cotrain import GeneratorHook
from veil.metrics.image import ssim
from veil.train import Batch, StepContext

#: salt of the training-time sampling noise stream (MPM)
_TRAIN_NOISE_SALT = 4_243


def clip_bounds(benign: Tensor, r: float) -> tuple[Tensor, Tensor]:
    """``(low, high)`` of a parameter within ratio ``r`` of its benign value ``benign``: the two
    bounds ``(1 - r) * benign`` and ``(1 + r) * benign``, ordered (they swap for negative
    values; a zero stays pinned at zero)."""
    a, b = (1 - r) * benign, (1 + r) * benign
    return torch.minimum(a, b), torch.maximum(a, b)


class ParameterClip:
    """Keeps every floating-point tensor of a classifier's state (parameters, and the BatchNorm
    running statistics alike) within ratio ``r`` of the benign classifier's (section 3.5);
    integer buffers (``num_batches_tracked``) are left alone. ``r = inf`` clips nothing."""

    def __init__(self, benign: dict[str, Tensor], r: float) -> None:
        self.r = float(r)
        self.bounds: dict[str, tuple[Tensor, Tensor]] = {}
        if math.isfinite(self.r):
            self.bounds = {k: clip_bounds(v.float(), self.r) for k, v in benign.items() if v.is_floating_point()}

    def to(self, device: torch.device) -> ParameterClip:
        self.bounds = {k: (lo.to(device), hi.to(device)) for k, (lo, hi) in self.bounds.items()}
        return self

    @torch.no_grad()
    def apply(self, model: nn.Module) -> None:
        if not self.bounds:
            return
        for name, t in model.state_dict(keep_vars=True).items():
            bound = self.bounds.get(name)
            if bound is not None:
                t.data.copy_(torch.maximum(torch.minimum(t.data, bound[1].view_as(t.data)), bound[0].view_as(t.data)))


class AdaptiveHook(GeneratorHook):
    """Eq. 6 for one batch: every row at the training set's ``poison_indices`` gets a poisoned copy
    ``x_p = clip(x + M(x) * g(x) / 255)`` labelled with its target, appended to the batch; the hook
    owns the loss ``CE(poisoned) + a * CE(clean) + b * (1 - SSIM(x, x_p))`` (plus the no-mask
    ablation's L2 term), the generator's Adam steps with the classifier's, and after every step the
    classifier is clipped to the benign model (:class:`ParameterClip`)."""

    def __init__(self, attack: Attack) -> None:  # an AdaptiveAttack (typed by its base: no import circle)
        super().__init__(attack, attack.config.lr, _TRAIN_NOISE_SALT)
        c = attack.config
        self.clip = ParameterClip(attack.benign_state, c.r) if attack.benign_state else None
        self._pending: dict[str, Any] = {}

    def setup(self, ctx: StepContext) -> None:
        a = self.attack
        if a.config.generator == "mpm":
            a._samplenet().to(ctx.device)
        super().setup(ctx)
        if ctx.step == 0 and a.benign_state and a.start_from_benign:  # fine-tune from the benign model (not on a resume)
            ctx.model.load_state_dict(a.benign_state)
        if self.clip is not None:
            self.clip.to(ctx.device)

    def transform_batch(self, ctx: StepContext, batch: Batch) -> Batch:
        a = self.attack
        sel = self.poisoned_rows(batch)
        n_clean = int(batch.y.numel())
        if not bool(sel.any()):
            self._pending = {"n_clean": n_clean, "x_src": None}
            return batch
        x_src = batch.x[sel]
        mask = a.texture_mask(x_src)
        trigger = a.soft_trigger(x_src, self.noise)  # grey levels, differentiable
        x_p = (x_src + mask * trigger / 255.0).clamp(0, 1)
        self._pending = {"n_clean": n_clean, "x_src": x_src, "x_p": x_p, "trigger": mask * trigger}
        batch.x = torch.cat((batch.x, x_p))
        batch.y = torch.cat((batch.y, a.target_labels(batch.y[sel])))
        return batch

    def batch_loss(self, ctx: StepContext, batch: Batch, features: Tensor, logits: Tensor) -> Tensor:
        c = self.attack.config
        p = self._pending
        n = p["n_clean"]
        logits = logits.float()
        clean = F.cross_entropy(logits[:n], batch.y[:n], label_smoothing=ctx.label_smoothing)
        self.add("clean_ce", float(clean.detach()))
        self.add("clean_steps", 1.0)
        if p["x_src"] is None:
            return c.clean_weight * clean
        poisoned = F.cross_entropy(logits[n:], batch.y[n:], label_smoothing=ctx.label_smoothing)
        total = poisoned + c.clean_weight * clean
        if c.b > 0:
            dissimilarity = 1 - ssim(p["x_src"].float(), p["x_p"].float()).mean()
            total = total + c.b * dissimilarity.to(total.dtype)
            self.add("ssim_loss", float(dissimilarity.detach()))
        if c.l2_weight > 0:
            l2 = (p["trigger"] / 255.0).pow(2).mean()
            total = total + c.l2_weight * l2
            self.add("l2", float(l2.detach()))
        with torch.no_grad():
            self.add("train_asr", float((logits[n:].argmax(1) == batch.y[n:]).float().mean()))
            self.add("linf", float(p["trigger"].abs().amax()))
        self.add("poisoned_ce", float(poisoned.detach()))
        self.add("steps", 1.0)
        return total

    def after_step(self, ctx: StepContext, batch: Batch) -> None:
        if self.clip is not None:
            self.clip.apply(ctx.model)

    def on_epoch_end(self, ctx: StepContext) -> dict[str, float]:
        out = self.epoch_means("adaptive", ("clean_ce",), per="clean_steps")
        out.update(self.epoch_means("adaptive", ("poisoned_ce", "ssim_loss", "l2", "train_asr", "linf")))
        self.reset_sums()
        return out
