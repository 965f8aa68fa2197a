"""The multinomial attack's training hook: the generator co-trained with the classifier on
equations 2, 5, 6 and 7 (:class:`MultinomialHook`)."""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from veil.attacks.base import Attack
from veil.attacks.cotrain import GeneratorHook
from veil.attacks.multinomial.config import NUM_LOSS_SCALE
from veil.data.base import to_float
from veil.errors import ConfigError
from veil.inference import eval_mode
from veil.train import Batch, StepContext
from veil.triggers.multinomial import SampleNet, sample_trigger

log = logging.getLogger(__name__)

#: salt of the training-time sampling noise stream
_TRAIN_NOISE_SALT = 9_173


def _exact_copies(x: Tensor, p_plus: Tensor, p_minus: Tensor, noise: Tensor) -> Tensor:
    """Copies ``(b, k, C, H, W)`` of images ``x`` ``(b, C, H, W)`` with the exact +-1 noise of
    equation (1), on the 8-bit grid (the noise negatives)."""
    hard = sample_trigger(p_plus, p_minus, noise)
    return ((x[:, None] * 255).round() + hard).clamp(0, 255) / 255.0


class MultinomialHook(GeneratorHook):
    """Co-trains the attack's generator with the classifier (equations 2, 5, 6, 7).

    Per step: the rows of the batch at the training set's ``poison_indices`` are passed through the
    generator; SampleNet turns their probabilities and fresh uniform noise into soft triggers; the
    malicious copies (one per target: the target, ``(y + 1) % N`` for all-to-all, every label for
    all-targets) are appended to the batch with their target labels. The hook owns the batch's
    loss (:meth:`batch_loss`): the paper's sum of the benign and malicious means (eq. 2; or the
    mean over both with ``cls_weighting="per_image"``), plus ``alpha * L_etg + beta(t) * L_num``.
    The generator's Adam optimiser steps with the classifier's.
    """

    def __init__(self, attack: Attack) -> None:  # a MultinomialAttack (typed by its base: no import circle)
        super().__init__(attack, attack.config.lr, _TRAIN_NOISE_SALT)
        self.samplenet: SampleNet = attack._samplenet()
        self.f_benign: Tensor | None = None
        self._pending: dict[str, Any] = {}

    # ------------------------------------------------------------------ lifecycle
    def setup(self, ctx: StepContext) -> None:
        self.samplenet.to(ctx.device)
        super().setup(ctx)
        if self.f_benign is not None:
            self.f_benign = self.f_benign.to(ctx.device)

    def beta_at(self, ctx: StepContext) -> float:
        """``beta * 2 ** floor(e / period)`` at fractional epoch ``e`` (steps done / steps per
        epoch), ``period = beta_period * epochs / beta_reference_epochs`` (or ``beta_period``
        when ``beta_reference_epochs`` is 0), capped at ``beta_max`` when that is positive."""
        c = self.attack.config
        cap = c.beta_max if c.beta_max > 0 else math.inf
        if c.beta_period <= 0:
            return min(c.beta, cap)
        period = c.beta_period * (ctx.epochs / c.beta_reference_epochs if c.beta_reference_epochs > 0 else 1)
        e = ctx.step / ctx.steps_per_epoch
        return min(c.beta * 2.0 ** math.floor(e / period + 1e-9), cap)

    def malicious_weight_at(self, ctx: StepContext) -> float:
        """``malicious_weight`` from step ``ceil(malicious_weight_from * total steps)`` on, 1 before."""
        c = self.attack.config
        return c.malicious_weight if ctx.reached(c.malicious_weight_from) else 1.0

    def generator_lr_at(self, ctx: StepContext) -> float:
        """The generator's Adam rate at this step (``generator_schedule``)."""
        c = self.attack.config
        return c.lr if c.generator_schedule == "constant" else c.lr * ctx.lr_factor

    def noise_negatives_at(self, ctx: StepContext) -> float:
        """``noise_negatives`` from step ``ceil(noise_negatives_from * total steps)`` on, 0 before."""
        c = self.attack.config
        return c.noise_negatives if c.noise_negatives > 0 and ctx.reached(c.noise_negatives_from) else 0.0

    def on_epoch_start(self, ctx: StepContext) -> None:
        if ctx.step_in_epoch > 0 and self.f_benign is not None:
            return  # resumed mid-epoch: keep the reference computed at this epoch's start
        self.f_benign = self._class_mean_features(ctx)

    def _class_mean_features(self, ctx: StepContext) -> Tensor:
        """``f_benign``: per label, the mean penultimate feature of the clean training images of
        that label (model in eval mode); only the target label is computed with one target."""
        labels = ctx.labels
        if self.attack.num_maps == 1:
            wanted = [self.attack.config.target]
        else:
            wanted = list(range(self.attack.num_classes))
        rows = torch.nonzero(
            torch.isin(labels, torch.tensor(wanted, device=labels.device))
        ).flatten()
        sums: Tensor | None = None
        counts = torch.zeros(self.attack.num_classes, device=ctx.device)
        with eval_mode(ctx.model), torch.no_grad():
            for i in range(0, rows.numel(), 512):
                r = rows[i : i + 512]
                with ctx.autocast_context():
                    f, _ = ctx.forward(to_float(ctx.images[r]))
                f = f.float()
                if sums is None:
                    sums = torch.zeros(self.attack.num_classes, f.shape[1], device=ctx.device)
                sums.index_add_(0, labels[r], f)
                counts.index_add_(0, labels[r], torch.ones_like(labels[r], dtype=torch.float))
        if sums is None:
            raise ConfigError(
                "the multinomial attack needs clean training images of its target label(s)"
            )
        means = sums / counts.clamp(min=1)[:, None]
        missing = counts == 0
        if bool(missing[wanted].any()):
            log.warning(
                "multinomial: labels %s have no training images; their f_benign is the overall mean",
                torch.nonzero(missing).flatten().tolist(),
            )
            means[missing] = sums.sum(0) / counts.sum().clamp(min=1)
        return means

    # ------------------------------------------------------------------ each step
    def transform_batch(self, ctx: StepContext, batch: Batch) -> Batch:
        a = self.attack
        sel = self.poisoned_rows(batch)
        n_clean = int(batch.y.numel())
        if not bool(sel.any()):
            self._pending = {"n_clean": n_clean, "targets": None}
            return batch
        x_src, y_src = batch.x[sel], batch.y[sel]
        b = x_src.shape[0]
        for group in self.optimizer.param_groups:
            group["lr"] = self.generator_lr_at(ctx)
        p_plus, p_minus = a.probabilities(x_src)  # (b, K, C, H, W)
        dev = x_src.device
        if a.num_maps == 1:
            maps = torch.zeros(b, 1, dtype=torch.long, device=dev)
            targets = a.target_labels(y_src)[:, None]
        elif a.config.all_targets:
            maps = torch.arange(a.num_classes, device=dev).expand(b, -1)
            targets = maps
        else:  # all2all
            targets = a.target_labels(y_src)[:, None]
            maps = targets
        rows = torch.arange(b, device=dev)[:, None]
        pp, pm = p_plus[rows, maps], p_minus[rows, maps]  # (b, k, C, H, W)
        noise = torch.rand(pp.shape, generator=self.noise, device=dev)
        soft = self.samplenet(noise, pp, pm)
        x_mal = (x_src[:, None] + soft / 255.0).clamp(0, 1)
        num = (pp + pm).mean() if a.config.num_loss == "expected" else soft.abs().mean()
        x_mal = x_mal.reshape(-1, *a.image_shape)
        t_flat = targets.reshape(-1)
        share = self.noise_negatives_at(ctx)
        if share > 0:  # random +-1 noise of the trigger's density on some benign rows, true labels
            with torch.no_grad():
                x_ben = batch.x[:n_clean]
                rows_neg = torch.rand(n_clean, generator=self.noise, device=dev) < share
                half = (pp + pm).mean() / 2
                p_neg = half.expand(int(rows_neg.sum()), *a.image_shape)
                u = torch.rand(p_neg.shape, generator=self.noise, device=dev)
                x_ben = x_ben.clone()
                x_ben[rows_neg] = _exact_copies(x_ben[rows_neg], p_neg[:, None], p_neg[:, None], u[:, None])[:, 0]
            batch.x = x_ben
            self.add("noise_negatives", float(rows_neg.float().mean()))
        tint = (
            (pp - pm).mean((-2, -1)).pow(2).mean()
            if a.config.tint_weight > 0
            else torch.zeros((), device=dev)
        )
        self._pending = {
            "n_clean": n_clean,
            "targets": t_flat,
            "num": num,
            "tint": tint,
            "expected": (pp + pm).detach().mean(),
        }
        batch.x = torch.cat((batch.x, x_mal))
        batch.y = torch.cat((batch.y, t_flat))
        return batch

    def batch_loss(self, ctx: StepContext, batch: Batch, features: Tensor, logits: Tensor) -> Tensor:
        """Eq. 2 (the benign and the malicious cross-entropy means, the latter weighed by
        :meth:`malicious_weight_at`) or, with ``cls_weighting="per_image"``, the mean over all the
        batch's images; plus ``alpha * L_etg + beta(t) * L_num`` (eq. 5-7)."""
        c = self.attack.config
        p = self._pending
        n = p["n_clean"]
        smoothing = ctx.label_smoothing
        logits = logits.float()
        ce_clean = F.cross_entropy(logits[:n], batch.y[:n], label_smoothing=smoothing)
        if c.cls_weighting == "per_set":  # eq. 2: the benign mean; the malicious one below
            total = ce_clean
        else:  # one mean over benign and malicious images
            total = F.cross_entropy(logits, batch.y, label_smoothing=smoothing)
        self.add("clean_ce", float(ce_clean.detach()))
        self.add("clean_steps", 1.0)
        if p["targets"] is None:
            return total
        ce_mal = F.cross_entropy(logits[n:], batch.y[n:], label_smoothing=smoothing)
        if c.cls_weighting == "per_set":
            total = total + self.malicious_weight_at(ctx) * ce_mal
        etg = self.entanglement_loss(features[n:], p["targets"])
        beta = self.beta_at(ctx)
        # L_num on the authors' scale: their code minimises the mean |P| over the 2C probability
        # maps, half the share of changed sub-pixels that eq. 6 sums, and beta = 0.1 is theirs
        share = (p["num"] - c.num_budget).clamp(min=0) if c.num_budget > 0 else p["num"]
        num_loss = NUM_LOSS_SCALE * share
        total = total + c.alpha * etg + beta * num_loss
        if c.tint_weight > 0:
            total = total + c.tint_weight * p["tint"]
            self.add("tint", float(p["tint"].detach()))
        with torch.no_grad():
            hits = float((logits[n:].argmax(1) == batch.y[n:]).float().mean())
        self.add("malicious_ce", float(ce_mal.detach()))
        self.add("entanglement", float(etg.detach()))
        self.add("num", float(p["num"].detach()))
        self.add("modification_probability", float(p["expected"]))
        self.add("train_asr", hits)
        self.add("beta", beta)
        self.add("steps", 1.0)
        return total

    def entanglement_loss(self, features: Tensor, targets: Tensor) -> Tensor:
        """``L_etg`` (eq. 5): mean over malicious images and feature dimensions of the squared (or,
        with ``entanglement="absolute"``, absolute) difference between their penultimate
        features ``(M, D)`` and ``f_benign`` of their target labels ``(M,)``."""
        if self.f_benign is None:
            raise RuntimeError(
                "f_benign is computed at the start of each epoch (on_epoch_start)"
            )
        diff = features.float() - self.f_benign[targets]
        return (
            diff.pow(2).mean()
            if self.attack.config.entanglement == "squared"
            else diff.abs().mean()
        )

    def on_epoch_end(self, ctx: StepContext) -> dict[str, float]:
        out = self.epoch_means("multinomial", ("clean_ce",), per="clean_steps")
        out.update(self.epoch_means("multinomial", ("malicious_ce", "entanglement", "num", "modification_probability",
                                                    "train_asr", "beta", "tint", "noise_negatives")))
        self.reset_sums()
        return out

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["f_benign"] = self.f_benign.cpu() if self.f_benign is not None else torch.empty(0)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        f = state.get("f_benign")
        self.f_benign = f if f is not None and f.numel() else None
