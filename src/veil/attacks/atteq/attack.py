"""The ATTEQ attack and its baselines RobNet and TrojanNN (:class:`AtteqAttack`, :class:`RobNetAttack`,
:class:`TrojanNNAttack`); what they implement is in the package's docstring."""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from veil.attacks.atteq.config import BY_DATASET, OTHER, TRANSPARENCY_BY_SIZE, AtteqConfig, RobNetConfig, TrojanNNConfig
from veil.attacks.base import Attack, AttackKind, register_attack
from veil.attacks.reference import benign_reference, decode_architecture, encode_architecture, train_reference
from veil.data.base import ImageDataset, to_float
from veil.errors import ConfigError
from veil.inference import batched, eval_mode
from veil.triggers.neuron import (
    attention_mask,
    blend,
    corner_mask,
    optimise_trigger,
    select_neuron,
    select_neuron_by_weights,
)

log = logging.getLogger(__name__)

#: salts of the seeded streams: the trigger's initialisation, the trigger images, the Adam batches
_INIT_SALT, _POOL_SALT, _STEP_SALT = 101, 211, 307


@register_attack("atteq")
class AtteqAttack(Attack):
    """ATTEQ: a trigger on an attention-chosen mask, optimised to excite one neuron of the model
    (gradient-boosted) under a QoE term, co-optimised with the model over rounds of retraining
    that alternate poisoned and clean epochs.

    ``fit`` builds the benign model ``F_V`` (``reference_run`` or trained), the mask, the neuron
    and the first trigger (against ``F_V``); the training hook (:class:`AtteqHook`) starts the
    classifier from ``F_V``, appends poisoned copies of the rows at ``poison_indices`` on the
    poisoned epochs and re-optimises the trigger at the start of every round. ``apply`` blends the
    current trigger. State: ``delta``, ``mask``, ``heat`` (``H_opt``), ``neuron``, ``round``,
    ``transparency``, the benign model (``benign.*``, ``benign_arch``).
    """

    Config = AtteqConfig
    kind: ClassVar[AttackKind] = "train"
    #: the victim's retraining as the authors' release runs it (the paper states none): Adam at
    #: 1e-3 without weight decay, batch 64, 3 rounds of 30 epochs
    paper_training: ClassVar[dict[str, Any]] = {"optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0, "batch_size": 64,
                                                "epochs": 90}
    #: section 5.1: target and poisoning ratio by dataset
    paper_training_by_dataset: ClassVar[dict[str, dict[str, Any]]] = {
        "gtsrb": {"target": 10, "poison_rate": 0.05}, "cifar10": {"target": 2, "poison_rate": 0.05},
        "cifar100": {"target": 0, "poison_rate": 0.005}, "imagenette": {"target": 3, "poison_rate": 0.15},
    }

    def __init__(self, config: AtteqConfig, num_classes: int, image_shape: tuple[int, int, int]) -> None:
        super().__init__(config, num_classes, image_shape)
        self.delta: Tensor | None = None
        self.mask: Tensor | None = None
        self.heat: Tensor | None = None
        self.neuron: int | None = None
        self.round = 0
        self.size, self.theta = self.config.trigger_size, self.config.theta
        _, h, _ = self.image_shape
        self.transparency = self.config.transparency if self.config.transparency is not None else next(
            a for limit, a in TRANSPARENCY_BY_SIZE if h <= limit)
        self.benign_state: dict[str, Tensor] = {}
        self.benign_architecture: tuple[str, int | None] | None = None
        self.pool_indices: Tensor | None = None
        self.history: list[dict[str, float]] = []
        self.start_from_benign = True

    def _validate(self) -> None:
        super()._validate()
        c = self.config
        _, h, w = self.image_shape
        if c.trigger_size is not None and not 1 <= c.trigger_size <= min(h, w):
            raise ConfigError(f"atteq trigger size {c.trigger_size} does not fit {h}x{w} images (1 to {min(h, w)})")
        if c.transparency is not None and not 0.0 <= c.transparency <= 1.0:
            raise ConfigError(f"atteq transparency must be in [0, 1], got {c.transparency}")
        if c.theta is not None and not c.theta > 0:
            raise ConfigError(f"atteq theta must be positive, got {c.theta}")
        for name in ("qoe_weight", "linf_weight"):
            if not getattr(c, name) >= 0:
                raise ConfigError(f"atteq {name} must be non-negative, got {getattr(c, name)}")
        for name in ("rounds", "trigger_steps", "trigger_images", "mask_images", "attention_width",
                     "attention_epochs", "reference_epochs"):
            if getattr(c, name) < 1:
                raise ConfigError(f"atteq {name} must be a positive integer, got {getattr(c, name)}")
        if not c.trigger_lr > 0:
            raise ConfigError(f"atteq trigger_lr must be positive, got {c.trigger_lr}")

    # ------------------------------------------------------------------ fitting
    def fit(self, train: ImageDataset, device: torch.device | str = "cpu", victim: dict[str, Any] | None = None) -> None:
        """``F_V``, the mask (eq. 5-6, or the corner), the neuron (section 4.3) and the first
        trigger (eq. 7, 9) against ``F_V``."""
        from veil.train import resolve_device

        c = self.config
        dev = resolve_device(device)
        if train.image_shape != self.image_shape:
            raise ConfigError(f"attack built for images {self.image_shape}, training set has {train.image_shape}")
        values = BY_DATASET.get(train.name, OTHER)
        self.size = c.trigger_size if c.trigger_size is not None else values["trigger_size"]
        self.theta = c.theta if c.theta is not None else values["theta"]
        _, h, w = self.image_shape
        if self.size > min(h, w):
            raise ConfigError(f"atteq trigger size {self.size} does not fit {h}x{w} images")
        benign, arch = benign_reference(c, train, self.num_classes, dev, victim, "atteq",
                                        "training starts from the benign model")
        self.benign_state = {k: v.detach().cpu().clone() for k, v in benign.state_dict().items()}
        self.benign_architecture = arch
        g = torch.Generator().manual_seed(c.seed * 1_000_003 + _POOL_SALT)
        target_rows = torch.nonzero(train.labels == c.target).flatten()
        if target_rows.numel() == 0:
            raise ConfigError(f"atteq: the training set has no image of the target class {c.target}")
        target_rows = target_rows[torch.randperm(target_rows.numel(), generator=g)[: c.mask_images]]
        self._fit_mask(train, target_rows, dev)
        self.neuron = self._select_neuron(benign, to_float(train.images[target_rows]), dev)
        self.pool_indices = torch.randperm(len(train), generator=g)[: c.trigger_images].sort().values
        init = torch.Generator().manual_seed(c.seed * 1_000_003 + _INIT_SALT)
        self.delta = torch.rand(self.image_shape, generator=init)
        self.reoptimise(benign.to(dev), train.images[self.pool_indices].to(dev))

    def _fit_mask(self, train: ImageDataset, target_rows: Tensor, dev: torch.device) -> None:
        c = self.config
        _, h, w = self.image_shape
        if c.mask == "corner":
            self.mask, self.heat = corner_mask(self.size, (h, w)), None
            return
        if c.attention_run is not None:
            from veil.models.loading import load_classifier

            ran, cfg = load_classifier(c.attention_run, device=dev)
            if not hasattr(ran, "attention_map"):
                raise ConfigError(f"atteq attention_run {c.attention_run} is a {cfg.get('model')} run, not a residual "
                                  "attention network (train one with --model ran)")
        else:
            ran = train_reference(train, self.num_classes, "ran", c.attention_width, c.attention_epochs, c.seed, dev,
                                  "atteq (residual attention network)")
        maps = batched(ran, train.images[target_rows], lambda m, x: m.attention_map(x), device=dev)
        self.mask, self.heat = attention_mask(maps.float().cpu(), self.size, (h, w))

    def _select_neuron(self, model: nn.Module, images: Tensor, dev: torch.device) -> int:
        if self.config.neuron_rule == "weights":  # the last convolution's output channels feed the pooled features
            return select_neuron_by_weights(model.get_submodule(str(model.last_conv)).weight)  # type: ignore[arg-type]
        feats = batched(model, images, lambda m, x: m.features(x), device=dev)
        return select_neuron(feats.float().cpu())

    def reoptimise(self, model: nn.Module, pool: Tensor) -> None:
        """One trigger optimisation (eq. 7, 9) against ``model`` on the uint8 ``pool``, warm-started
        from the current trigger; the round's figures go to :attr:`history`."""
        c = self.config
        assert self.delta is not None and self.mask is not None and self.neuron is not None
        dev = next(model.parameters()).device
        g = torch.Generator().manual_seed(c.seed * 1_000_003 + _STEP_SALT + self.round)
        with eval_mode(model):
            self.delta, parts = optimise_trigger(
                model, to_float(pool.to(dev)), self.delta, self.mask.to(dev), self.neuron,
                transparency=self.transparency, theta=float(self.theta or 1.0), qoe_weight=c.qoe_weight,
                linf_weight=c.linf_weight, steps=c.trigger_steps, lr=c.trigger_lr, generator=g)
        self.delta = self.delta.cpu()
        self.history.append({"round": float(self.round), **parts})
        log.info("atteq: trigger of round %d optimised (neuron %d, %s)", self.round + 1, self.neuron,
                 ", ".join(f"{k} {v:.4f}" for k, v in parts.items()))

    def training_hook(self) -> Any:
        from veil.attacks.atteq.hook import AtteqHook

        return AtteqHook(self)

    # ------------------------------------------------------------------ the trigger
    def apply(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        self._check_batch(x)
        if self.delta is None or self.mask is None:
            raise RuntimeError("the atteq attack needs fit() (or load_state_dict) before apply")
        return blend(x.detach().float(), self.delta, self.mask, self.transparency).clamp(0, 1)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, test: ImageDataset) -> dict[str, Any]:
        """The mask (pixels, the attention inside against outside it), the neuron, the L-inf of the
        trigger on 1,000 test images, the per-round trigger optimisation figures."""
        out: dict[str, Any] = {"mask_pixels": int(self.mask.sum()) if self.mask is not None else 0,
                               "neuron": self.neuron, "rounds_done": self.round + 1, "transparency": self.transparency,
                               "theta": self.theta, "trigger_size": self.size, "trigger_history": self.history}
        if self.heat is not None and self.mask is not None:
            inside = self.heat[self.mask > 0].mean()
            outside = self.heat[self.mask == 0].mean() if bool((self.mask == 0).any()) else torch.tensor(0.0)
            out.update({"attention_inside": float(inside), "attention_outside": float(outside)})
        x = to_float(test.images[:1000])
        out["linf"] = float(((self.apply_quantized(x) - x) * 255).abs().amax()) if x.numel() else 0.0
        return out

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Tensor]:
        if self.delta is None or self.mask is None:
            return {}
        state = {"delta": self.delta.clone(), "mask": self.mask.clone(),
                 "neuron": torch.tensor(-1 if self.neuron is None else self.neuron),
                 "round": torch.tensor(self.round), "transparency": torch.tensor(float(self.transparency)),
                 "theta": torch.tensor(float(self.theta or 1.0)), "size": torch.tensor(int(self.size or 0))}
        if self.heat is not None:
            state["heat"] = self.heat.clone()
        state.update({f"benign.{k}": v.clone() for k, v in self.benign_state.items()})
        if self.benign_architecture is not None:
            state["benign_arch"] = encode_architecture(*self.benign_architecture)
        if self.pool_indices is not None:
            state["pool_indices"] = self.pool_indices.clone()
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        for key in ("delta", "mask"):
            if key not in state:
                raise ConfigError(f"atteq attack state lacks {key!r} (has: {', '.join(sorted(state)) or 'nothing'})")
        self.delta, self.mask = state["delta"].float().clone(), state["mask"].float().clone()
        self.heat = state["heat"].float().clone() if "heat" in state else None
        self.neuron = int(state["neuron"]) if "neuron" in state and int(state["neuron"]) >= 0 else None
        self.round = int(state.get("round", torch.tensor(0)))
        self.transparency = float(state.get("transparency", torch.tensor(self.transparency)))
        self.theta = float(state.get("theta", torch.tensor(1.0)))
        self.size = int(state.get("size", torch.tensor(0))) or self.size
        self.benign_state = {k[len("benign."):]: v.clone() for k, v in state.items() if k.startswith("benign.")}
        self.benign_architecture = decode_architecture(state["benign_arch"]) if "benign_arch" in state else None
        self.pool_indices = state["pool_indices"].long().clone() if "pool_indices" in state else None
        self.start_from_benign = False


@register_attack("robnet")
class RobNetAttack(AtteqAttack):
    """RobNet (Gong et al.; ATTEQ's "Base"): :class:`AtteqAttack` with :class:`RobNetConfig`."""

    Config = RobNetConfig


@register_attack("trojannn")
class TrojanNNAttack(AtteqAttack):
    """TrojanNN (Liu et al., NDSS 2018): :class:`AtteqAttack` with :class:`TrojanNNConfig`."""

    Config = TrojanNNConfig
