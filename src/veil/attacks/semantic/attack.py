"""The semantic-feature attack (:class:`SemanticAttack`); what it implements is in the package's
docstring."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from veil.attacks.base import Attack, AttackKind, register_attack
from veil.attacks.reference import (
    analysis_cache,
    decode_architecture,
    encode_architecture,
    load_reference,
    reference_architecture,
    train_reference,
    write_analysis_cache,
)
from veil.attacks.semantic.config import LAMBDA1_BY_DATASET, LAMBDA1_OTHER, SemanticConfig
from veil.data.base import ImageDataset, quantize, to_float
from veil.errors import ConfigError
from veil.inference import eval_mode
from veil.triggers.decoder import FeatureDecoder, tap_maps, taps_for

log = logging.getLogger(__name__)


class ChannelAttention(nn.Module):
    """Eq. 1-2 (SENet): ``z = GAP(M)``, ``s = act(W2 ReLU(W1 z))`` over channels, ``t = M * scale * s``."""

    def __init__(self, channels: int, reduction: int, activation: str, scale: float) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc1, self.fc2 = nn.Linear(channels, hidden), nn.Linear(hidden, channels)
        self.activation, self.scale = activation, float(scale)

    def scores(self, m: Tensor) -> Tensor:
        logits = self.fc2(torch.relu(self.fc1(m.mean((2, 3)))))
        s = torch.softmax(logits, 1) if self.activation == "softmax" else torch.sigmoid(logits)
        return self.scale * s

    def forward(self, m: Tensor) -> Tensor:
        return m * self.scores(m)[:, :, None, None]


@register_attack("semantic")
class SemanticAttack(Attack):
    """Semantic-feature backdoor: the poisoned image is a decoder's reconstruction of the clean
    image from its surrogate features, the high-level map re-weighted by channel attention.

    ``fit`` trains the surrogate (or loads ``reference_run``), then the attention and the decoder on
    eq. 8; ``apply`` maps ``(B, C, H, W)`` in ``[0, 1]`` to the decoder's output. State: the
    surrogate's, attention's and decoder's weights (``surrogate.*``, ``attention.*``,
    ``decoder.*``) and the surrogate's architecture (``surrogate_arch``, ``name:width`` as bytes).
    """

    Config = SemanticConfig
    kind: ClassVar[AttackKind] = "fit"
    #: section IV.A.4: the victim is trained with SGD, momentum 0.9, learning rate 0.01, 100 epochs
    paper_training: ClassVar[dict[str, Any]] = {"optimizer": "sgd", "lr": 0.01, "epochs": 100, "target": 1}

    def __init__(self, config: SemanticConfig, num_classes: int, image_shape: tuple[int, int, int]) -> None:
        super().__init__(config, num_classes, image_shape)
        self.surrogate: nn.Module | None = None
        self.surrogate_arch: tuple[str, int | None] | None = None
        self.attention: ChannelAttention | None = None
        self.decoder: FeatureDecoder | None = None
        self.lambda1: float | None = config.lambda1
        self.history: list[dict[str, float]] = []

    def _validate(self) -> None:
        super()._validate()
        c = self.config
        for name in ("lambda1", "lambda2", "generator_lr"):
            v = getattr(c, name)
            if v is not None and not (math.isfinite(v) and v >= 0):
                raise ConfigError(f"semantic {name} must be a non-negative number, got {v!r}")
        if c.generator_lr <= 0:
            raise ConfigError(f"semantic generator_lr must be positive, got {c.generator_lr}")
        for name in ("reduction", "generator_epochs", "generator_batch_size", "reference_epochs"):
            if getattr(c, name) < 1:
                raise ConfigError(f"semantic {name} must be a positive integer, got {getattr(c, name)}")
        if c.train_attention and (c.attention_scale != 1 or c.attention_activation != "softmax"):
            raise ConfigError("semantic: a trained attention other than the paper's unscaled softmax can reach the "
                              "identity (t = M) and remove the trigger; keep the softmax at scale 1, or set "
                              "train_attention=False")

    # ------------------------------------------------------------------ building
    def _build(self, surrogate: nn.Module, arch: tuple[str, int | None]) -> None:
        c = self.config
        skips, high = taps_for(arch[0])
        ch, h, w = self.image_shape
        with torch.no_grad(), eval_mode(surrogate):
            maps = tap_maps(surrogate, torch.zeros(1, ch, h, w, device=next(surrogate.parameters()).device), [*skips, high])
        shapes = [(int(m.shape[1]), int(m.shape[-1])) for m in maps]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(c.seed)
            scale = shapes[-1][0] if c.attention_scale == "channels" else 1.0
            self.attention = ChannelAttention(shapes[-1][0], c.reduction, c.attention_activation, scale)
            self.decoder = FeatureDecoder(shapes[-1], shapes[:-1], ch, w, residual=c.output == "residual")
        surrogate.eval().requires_grad_(False)
        for q in surrogate.parameters():
            q.grad = None  # frozen: no gradient left from its own training either
        self.surrogate, self.surrogate_arch = surrogate, arch

    def _maps(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        assert self.surrogate is not None and self.surrogate_arch is not None
        skips, high = taps_for(self.surrogate_arch[0])
        maps = tap_maps(self.surrogate, x, [*skips, high])
        return maps[:-1], maps[-1]

    def generate(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(x^, t, t^)``: the poisoned image, the trigger ``t = A(M(x))`` and ``t^ = M(x^)``
        (differentiable in the attention and the decoder)."""
        if self.decoder is None or self.attention is None:
            raise RuntimeError("the semantic attack needs fit() (or load_state_dict) before it can generate")
        with torch.no_grad():
            skips, m = self._maps(x)
        t = self.attention(m)
        x_hat = self.decoder(t, skips, x)
        _, t_hat = self._maps(x_hat)
        return x_hat, t, t_hat

    def losses(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(L, L_image, L_feature)`` of eq. 6-8 on a batch: per-image squared L2 sums (images on
        ``[0, 1]``), averaged over the batch (reading 7 of the spec)."""
        x_hat, t, t_hat = self.generate(x)
        image = (x - x_hat).pow(2).flatten(1).sum(1).mean()
        feature = (t - t_hat).pow(2).flatten(1).sum(1).mean()
        lam1 = self.lambda1 if self.lambda1 is not None else LAMBDA1_OTHER
        return lam1 * image + self.config.lambda2 * feature, image, feature

    # ------------------------------------------------------------------ fitting
    def fit(self, train: ImageDataset, device: torch.device | str = "cpu", victim: dict[str, Any] | None = None) -> None:
        """The surrogate (``reference_run``'s, or trained here on the clean training set), then the
        attention and the decoder trained on eq. 8 over the clean training set."""
        from veil.train import resolve_device

        c = self.config
        if train.image_shape != self.image_shape:
            raise ConfigError(f"attack built for images {self.image_shape}, training set has {train.image_shape}")
        dev = resolve_device(device)
        if c.reference_run is not None:
            model, ref = load_reference(c.reference_run, train, self.num_classes, dev, "semantic")
            arch = (str(ref["model"]), ref.get("width"))
        else:
            arch = reference_architecture(c.reference_model, c.reference_width, victim)
            taps_for(arch[0])  # before training a surrogate that could not be tapped
            model = train_reference(train, self.num_classes, arch[0], arch[1], c.reference_epochs, c.seed, dev, "semantic")
        if self.lambda1 is None:
            self.lambda1 = LAMBDA1_BY_DATASET.get(train.name, LAMBDA1_OTHER)
        self._build(model.to(dev), arch)
        cache = self.generator_cache_path(train)
        if cache is not None and cache.is_file() and self._load_generator_cache(cache, dev):
            return
        self._train_generator(train, dev)
        assert self.attention is not None and self.decoder is not None
        tensors = {f"attention.{k}": v for k, v in self.attention.state_dict().items()}
        tensors.update({f"decoder.{k}": v for k, v in self.decoder.state_dict().items()})
        write_analysis_cache(cache, tensors, "semantic: generator", {"history": json.dumps(self.history)})

    def generator_cache_path(self, train: ImageDataset) -> Path | None:
        """Where the attention and decoder fitted on ``reference_run``'s surrogate are cached
        (``REFERENCE_RUN/analysis/``, one file per training set, image size and generator option),
        so that the points of a poison-rate sweep over one reference run fit them once: the
        generator is trained on the clean set and does not depend on the rate. ``None`` without a
        reference run."""
        c = self.config
        settings = {"l1": float(self.lambda1 if self.lambda1 is not None else LAMBDA1_OTHER), "l2": float(c.lambda2),
                    "act": c.attention_activation, "scale": c.attention_scale, "trained": int(c.train_attention),
                    "red": c.reduction, "ep": c.generator_epochs, "lr": float(c.generator_lr),
                    "bs": c.generator_batch_size, "seed": c.seed}
        if c.output != "image":
            settings["out"] = c.output  # only then: caches of the paper's head keep their names
        return analysis_cache(c.reference_run, "semantic_generator", train, **settings)

    def _load_generator_cache(self, path: Path, dev: torch.device) -> bool:
        """Load a cached generator; an unreadable or mismatched cache is logged and refitted."""
        from safetensors import safe_open

        assert self.attention is not None and self.decoder is not None
        try:
            with safe_open(str(path), framework="pt") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}
                meta = f.metadata() or {}
            self.attention.load_state_dict({k[len("attention."):]: v for k, v in tensors.items() if k.startswith("attention.")})
            self.decoder.load_state_dict({k[len("decoder."):]: v for k, v in tensors.items() if k.startswith("decoder.")})
            self.history = json.loads(meta.get("history", "[]"))
        except Exception as exc:  # a broken cache is refitted, never trusted
            log.warning("semantic: ignoring the cached generator %s (%s); fitting it again", path, exc)
            assert self.surrogate is not None and self.surrogate_arch is not None
            self._build(self.surrogate, self.surrogate_arch)  # fresh, seeded weights again
            self.history = []
            return False
        self.attention.to(dev).eval()
        self.decoder.to(dev).eval()
        log.info("semantic: generator fitted on the reference run read from its cache %s", path)
        return True

    def _train_generator(self, train: ImageDataset, dev: torch.device) -> None:
        c = self.config
        assert self.attention is not None and self.decoder is not None
        self.attention.to(dev).train(c.train_attention).requires_grad_(c.train_attention)
        self.decoder.to(dev).train()
        params = list(self.decoder.parameters()) + (list(self.attention.parameters()) if c.train_attention else [])
        opt = torch.optim.SGD(params, lr=c.generator_lr, momentum=0.9)
        g = torch.Generator().manual_seed(c.seed * 1_000_003 + 17)
        steps = math.ceil(len(train) / c.generator_batch_size)
        t0 = time.perf_counter()
        for epoch in range(c.generator_epochs):
            order = torch.randperm(len(train), generator=g)
            sums = [0.0, 0.0, 0.0]
            for s in tqdm(range(steps), desc=f"semantic generator {epoch + 1}/{c.generator_epochs}", leave=False, disable=None):
                x = to_float(train.images[order[s * c.generator_batch_size : (s + 1) * c.generator_batch_size]].to(dev))
                loss, image, feature = self.losses(x)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                for i, v in enumerate((loss, image, feature)):
                    sums[i] += float(v.detach())
            record = {"epoch": epoch + 1, "loss": sums[0] / steps, "image_loss": sums[1] / steps, "feature_loss": sums[2] / steps}
            self.history.append(record)
            log.info("semantic generator epoch %d/%d: loss %.4f, image %.4f, feature %.4f", epoch + 1,
                     c.generator_epochs, record["loss"], record["image_loss"], record["feature_loss"])
        self.attention.eval()
        self.decoder.eval()
        log.info("semantic generator trained in %.0fs", time.perf_counter() - t0)

    # ------------------------------------------------------------------ the trigger
    def apply(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        self._check_batch(x)
        if self.decoder is None or self.attention is None or self.surrogate is None:
            raise RuntimeError("the semantic attack needs fit() (or load_state_dict) before apply")
        dev = next(self.decoder.parameters()).device
        with torch.no_grad(), eval_mode(self.decoder, self.attention, self.surrogate):
            x_hat, _, _ = self.generate(x.detach().to(dev).float())
        return x_hat.to(x.device)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, test: ImageDataset) -> dict[str, Any]:
        """``feature_relative_error``: the mean ``||t - t^||^2 / ||t||^2`` over 500 test images of
        other labels than the target, drawn with the seed (how close the poisoned image's
        high-level map is to the trigger: the feature objective), and ``benign_asr`` (as the
        adaptive attack's): how often the clean surrogate, which never saw a poisoned image, calls
        the same poisoned images, rounded to 8 bits, the target; an ASR near it says the trigger
        works as an adversarial perturbation rather than as a learned backdoor."""
        from veil.train import predict

        if self.decoder is None:
            return {}
        dev = next(self.decoder.parameters()).device
        rows = torch.nonzero(test.labels != self.config.target).flatten()
        rows = rows[torch.randperm(rows.numel(), generator=torch.Generator().manual_seed(self.config.seed))[:500]]
        x = to_float(test.images[rows]).to(dev)
        with eval_mode(self.decoder, self.attention, self.surrogate):  # type: ignore[arg-type]
            x_hat, t, t_hat = self.generate(x)
        fooled = (predict(self.surrogate, quantize(x_hat)) == self.config.target).float().mean()  # type: ignore[arg-type]
        rel = (t - t_hat).pow(2).flatten(1).sum(1) / t.pow(2).flatten(1).sum(1).clamp_min(1e-12)
        out = {"feature_relative_error": float(rel.mean()), "benign_asr": float(fooled), "lambda1": self.lambda1,
               "generator_history": self.history}
        return out

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Tensor]:
        if self.decoder is None or self.attention is None or self.surrogate is None or self.surrogate_arch is None:
            return {}
        state = {f"decoder.{k}": v.detach().cpu().clone() for k, v in self.decoder.state_dict().items()}
        state.update({f"attention.{k}": v.detach().cpu().clone() for k, v in self.attention.state_dict().items()})
        state.update({f"surrogate.{k}": v.detach().cpu().clone() for k, v in self.surrogate.state_dict().items()})
        state["surrogate_arch"] = encode_architecture(*self.surrogate_arch)
        state["lambda1"] = torch.tensor(float(self.lambda1 if self.lambda1 is not None else LAMBDA1_OTHER))
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        from veil.models import create_model

        if "surrogate_arch" not in state:
            raise ConfigError(f"semantic attack state lacks 'surrogate_arch' (has: {', '.join(sorted(state)) or 'nothing'})")
        name, width = decode_architecture(state["surrogate_arch"])
        ch, h, _ = self.image_shape
        surrogate = create_model(name, num_classes=self.num_classes, image_size=h, width=width, in_channels=ch)
        surrogate.load_state_dict({k[len("surrogate."):]: v for k, v in state.items() if k.startswith("surrogate.")})
        self._build(surrogate, (name, width))
        assert self.attention is not None and self.decoder is not None
        self.attention.load_state_dict({k[len("attention."):]: v for k, v in state.items() if k.startswith("attention.")})
        self.decoder.load_state_dict({k[len("decoder."):]: v for k, v in state.items() if k.startswith("decoder.")})
        self.attention.eval()
        self.decoder.eval()
        self.lambda1 = float(state["lambda1"]) if "lambda1" in state else self.lambda1
