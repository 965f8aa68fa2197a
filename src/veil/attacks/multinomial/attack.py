"""The multinomial-trigger attack (:class:`MultinomialAttack`): generator, poisoning, evaluation."""

from __future__ import annotations

import logging
import io
import math
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from veil.attacks.base import Attack, AttackKind, register_attack
from veil.attacks.multinomial.config import MultinomialConfig
from veil.attacks.multinomial.hook import MultinomialHook
from veil.data.base import ImageDataset, PoisonedDataset, to_float, to_uint8
from veil.errors import ConfigError
from veil.inference import batched, eval_mode
from veil.triggers.multinomial import (
    SampleNet,
    SampleNetSpec,
    cached_samplenet,
    modification_probabilities,
    sample_trigger,
)
from veil.triggers.unet import UNet

log = logging.getLogger(__name__)

#: salt of the test-time sampling noise seed
_NOISE_SALT = 7_777


@register_attack("multinomial")
class MultinomialAttack(Attack):
    """Multinomial-trigger backdoor with feature entanglement (Zhong et al., IJCAI 2022).

    Args:
        config: :class:`MultinomialConfig`.
        num_classes: number of classes ``N``.
        image_shape: ``(C, H, W)``; ``H`` and ``W`` multiples of ``2 ** (levels - 1)``.

    The generator outputs ``2 * C * K`` maps (``K = N`` with ``all_targets`` or ``all2all``,
    else 1): ``P(+1)`` for every (label, channel), then ``P(-1)``. ``apply`` maps ``(B, C, H, W)``
    in ``[0, 1]`` to ``x + t / 255`` (clamped) with ``t`` in ``{-1, 0, 1}`` sampled by equation (1)
    from a noise stream seeded by the state's ``noise_seed``: deterministic, and not
    differentiable (the trigger is a sample). State (``state_dict``): the generator's and
    SampleNet's weights (``generator.*``, ``samplenet.*``) and ``noise_seed``.
    """

    Config = MultinomialConfig
    kind: ClassVar[AttackKind] = "train"
    # a one-grey-level change is about one bfloat16 step of a normalised input: no autocast
    full_precision: ClassVar[bool] = True
    #: section 4.1 ("Training Details") and the authors' code (config.py, utils.py): GTSRB
    #: resized to 128x128, batch 16, Adam at 1e-3 for the classifier with no weight decay and no
    #: schedule, 110 epochs, no augmentation (resize and centre crop only), and a malicious copy of
    #: every training image (``poison_rate=1.0``)
    paper_training: ClassVar[dict[str, Any]] = {
        "image_size": 128, "epochs": 110, "batch_size": 16, "optimizer": "adam", "lr": 1e-3,
        "weight_decay": 0.0, "schedule": "constant", "base_augment": False, "poison_rate": 1.0,
    }

    def __init__(
        self,
        config: MultinomialConfig,
        num_classes: int,
        image_shape: tuple[int, int, int],
    ) -> None:
        super().__init__(config, num_classes, image_shape)
        c = self.config
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(c.seed)
            self.generator = UNet(
                self.image_shape[0],
                2 * self.image_shape[0] * self.num_maps,
                c.width,
                c.levels,
            )
        self.generator.eval()
        self.samplenet: SampleNet | None = None
        self.noise_seed = int(c.seed) * 1_000_003 + _NOISE_SALT
        #: set by :meth:`training_hook` users; False until the generator was trained or loaded
        self.trained = False
        self.results: dict[str, Any] = {}

    # ------------------------------------------------------------------ configuration
    @classmethod
    def memory_bytes(cls, config: MultinomialConfig, num_classes: int, image_shape: tuple[int, int, int],  # type: ignore[override]
                     batch_size: int) -> int:
        """The U-Net generator's training memory, measured on the meta device (no allocation)."""
        from veil.resources import module_bytes

        c = image_shape[0]
        maps = num_classes if config.all_targets or config.mode == "all2all" else 1
        return module_bytes(lambda: UNet(c, 2 * c * maps, config.width, config.levels), tuple(image_shape), batch_size)

    @property
    def num_maps(self) -> int:
        """Probability pairs per channel: one per label in all-targets and all-to-all modes."""
        return (
            self.num_classes
            if self.config.all_targets or self.config.mode == "all2all"
            else 1
        )

    def _validate(self) -> None:
        c = self.config
        if c.all_targets and c.mode != "all2one":
            raise ConfigError(
                "multinomial all_targets replaces the mode; leave mode at 'all2one'"
            )
        super()._validate()
        _, h, w = self.image_shape
        for name in ("alpha", "beta", "beta_period", "beta_reference_epochs", "beta_max", "tint_weight"):
            v = getattr(c, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ConfigError(
                    f"multinomial {name} must be a non-negative number, got {v!r}"
                )
        if not c.lr > 0:
            raise ConfigError(f"multinomial lr must be positive, got {c.lr}")
        mw = c.malicious_weight
        if not (isinstance(mw, (int, float)) and math.isfinite(mw) and mw > 0):
            raise ConfigError(f"multinomial malicious_weight must be a positive number, got {mw!r}")
        if mw != 1.0 and c.cls_weighting != "per_set":
            raise ConfigError("multinomial malicious_weight needs cls_weighting='per_set'")
        nn_share = c.noise_negatives
        if not (isinstance(nn_share, (int, float)) and 0 <= nn_share <= 1):
            raise ConfigError(f"multinomial noise_negatives must be in [0, 1], got {nn_share!r}")
        if c.generator_schedule not in ("constant", "trainer"):
            raise ConfigError(
                "multinomial generator_schedule must be 'constant' or 'trainer', "
                f"got {c.generator_schedule!r}"
            )
        for name in ("malicious_weight_from", "num_budget", "noise_negatives_from"):
            v = getattr(c, name)
            if not (isinstance(v, (int, float)) and 0 <= v < 1):
                raise ConfigError(f"multinomial {name} must be in [0, 1), got {v!r}")
        for name in ("width", "levels", "samplenet_steps", "asr_images_per_label"):
            v = getattr(c, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(
                    f"multinomial {name} must be a positive integer, got {v!r}"
                )
        m = 2 ** (c.levels - 1)
        if h % m or w % m:
            raise ConfigError(
                f"a {c.levels}-level U-Net needs image sides that are multiples of {m}, got {h}x{w}"
            )
        if c.entanglement not in ("squared", "absolute"):
            raise ConfigError(
                f"multinomial entanglement must be 'squared' or 'absolute', got {c.entanglement!r}"
            )
        if c.cls_weighting not in ("per_set", "per_image"):
            raise ConfigError(
                f"multinomial cls_weighting must be 'per_set' or 'per_image', got {c.cls_weighting!r}"
            )
        if c.num_loss not in ("expected", "sampled"):
            raise ConfigError(
                f"multinomial num_loss must be 'expected' or 'sampled', got {c.num_loss!r}"
            )

    def target_labels(self, y: Tensor) -> Tensor:
        """All-targets mode pairs row ``y`` with ``(y + 1) % N`` wherever one target per row is
        needed (the written poisoned set, the stealth sample); its ASR set covers every label."""
        if self.config.all_targets:
            return (y + 1) % self.num_classes
        return super().target_labels(y)

    def eligible_rows(self, dataset: ImageDataset) -> Tensor:
        if self.config.all_targets:
            return torch.arange(len(dataset))
        return super().eligible_rows(dataset)

    # ------------------------------------------------------------------ SampleNet
    def fit(
        self, train: ImageDataset, device: torch.device | str = "cpu", victim: dict[str, Any] | None = None
    ) -> None:
        """Train SampleNet (seconds; cached per process) before training the generator."""
        if train.image_shape != self.image_shape:
            raise ConfigError(
                f"attack built for images {self.image_shape}, training set has {train.image_shape}"
            )
        self._samplenet()

    def _samplenet(self) -> SampleNet:
        if self.samplenet is None:
            spec = SampleNetSpec(
                steps=self.config.samplenet_steps, seed=self.config.seed
            )
            self.samplenet = cached_samplenet(spec)
        return self.samplenet

    # ------------------------------------------------------------------ the trigger
    def probabilities(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(p_plus, p_minus)``, each ``(B, K, C, H, W)`` in ``[0, 0.5]``, from the generator
        (gradients flow to its parameters; the generator's train/eval mode is the caller's)."""
        p_plus, p_minus = modification_probabilities(self.generator(x))
        shape = (x.shape[0], self.num_maps, *self.image_shape)
        return p_plus.reshape(shape), p_minus.reshape(shape)

    def _map_index(self, targets: Tensor) -> Tensor:
        return targets if self.num_maps > 1 else torch.zeros_like(targets)

    def apply_to(
        self,
        x: Tensor,
        targets: Tensor | int | None = None,
        noise_seed: int | None = None,
    ) -> Tensor:
        """The exact (equation 1) multinomial trigger towards ``targets``, added to ``x``.

        Args:
            x: images ``(B, C, H, W)`` in ``[0, 1]``.
            targets: target label per row ``(B,)`` or one ``int``; ignored (may be ``None``) with
                one target.
            noise_seed: seed of the uniform noise (default: the state's ``noise_seed``). The
                noise matrix depends only on the seed and the batch shape ("attackers use a
                random matrix to sample", section 3.5), so the same image in the same batch
                position always gets the same trigger.

        Returns:
            ``clamp(x + t / 255, 0, 1)`` with ``t`` in ``{-1, 0, 1}``, on ``x``'s device.
        """
        self._check_batch(x)
        if self.num_maps > 1:
            if targets is None:
                raise ValueError(
                    "the multinomial attack needs target labels in all-targets and all-to-all modes"
                )
            targets = (
                torch.as_tensor(targets, dtype=torch.long).expand(x.shape[0]).cpu()
            )
        else:
            targets = torch.zeros(x.shape[0], dtype=torch.long)
        if not self.trained:
            log.debug("multinomial apply with an untrained generator")
        dev = next(self.generator.parameters()).device
        with eval_mode(self.generator), torch.no_grad():
            p_plus, p_minus = self.probabilities(x.detach().to(dev).float())
        rows = torch.arange(x.shape[0], device=dev)
        idx = self._map_index(targets).to(dev)
        p_plus, p_minus = p_plus[rows, idx].cpu(), p_minus[rows, idx].cpu()
        g = torch.Generator().manual_seed(
            self.noise_seed if noise_seed is None else int(noise_seed)
        )
        noise = torch.rand(p_plus.shape, generator=g)
        t = sample_trigger(p_plus, p_minus, noise)
        return (x.detach().float() + t.to(x.device) / 255.0).clamp(0, 1)

    def apply(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        if self.num_maps > 1 and y is None:
            raise ValueError(
                "the multinomial attack needs the true labels y in all-targets and all-to-all modes"
            )
        targets = (
            None if self.num_maps == 1 or y is None else self.target_labels(y.cpu())
        )
        return self.apply_to(x, targets)

    # ------------------------------------------------------------------ poisoning and training
    def training_set(self, dataset: ImageDataset) -> PoisonedDataset:
        """The training set as the trainer gets it: clean images and labels; the rows at
        ``poison_indices`` get malicious copies from the generator on the fly (see
        :class:`MultinomialHook`). :meth:`poison` writes the poisoned set after training."""
        idx = self.select_poison_indices(dataset)
        log.info(
            "multinomial: %d of %d training rows get malicious copies during training",
            idx.numel(),
            len(dataset),
        )
        return PoisonedDataset(
            images=dataset.images,
            labels=dataset.labels,
            classes=dataset.classes,
            name=dataset.name,
            hflip=dataset.hflip,
            poison_indices=idx,
            original_labels=dataset.labels.clone(),
        )

    def training_hook(self) -> MultinomialHook:
        """The co-training hook; from here on the generator counts as trained."""
        self.trained = True
        return MultinomialHook(self)

    def _asr_rows(self, dataset: ImageDataset) -> tuple[Tensor, Tensor]:
        """Rows and target labels of the attack-success-rate set: every row whose label differs
        from its target, or with ``all_targets``, for every label ``t``, up to
        ``asr_images_per_label`` rows (seeded) of other labels."""
        if not self.config.all_targets:
            targets = self.target_labels(dataset.labels)
            keep = torch.nonzero(dataset.labels != targets).flatten()
            return keep, targets[keep]
        g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + 31)
        rows, tgts = [], []
        for t in range(self.num_classes):
            other = torch.nonzero(dataset.labels != t).flatten()
            pick = (
                other[
                    torch.randperm(other.numel(), generator=g)[
                        : self.config.asr_images_per_label
                    ]
                ]
                .sort()
                .values
            )
            rows.append(pick)
            tgts.append(torch.full_like(pick, t))
        return torch.cat(rows), torch.cat(tgts)

    def poison_test(self, dataset: ImageDataset) -> ImageDataset:
        """The attack-success-rate set (see :meth:`_asr_rows`), triggered by equation (1) and
        labelled with the targets."""
        rows, targets = self._asr_rows(dataset)
        out = []
        for i in range(0, rows.numel(), 512):
            r, t = rows[i : i + 512], targets[i : i + 512]
            out.append(to_uint8(self.apply_to(to_float(dataset.images[r]), t)))
        images = torch.cat(out) if out else dataset.images[:0]
        return ImageDataset(
            images, targets, dataset.classes, dataset.name + "-poisoned", dataset.hflip
        )

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, model: nn.Module, test: ImageDataset) -> dict[str, Any]:
        """The paper's evaluation on the test set, with the exact (eq. 1) trigger.

        Returns (and keeps for :meth:`tables`):
            ``l1_grey_levels``: the paper's L1, ``sum |x - x'| / (C H W)`` in grey levels
            (Table 2; the authors' code), averaged over the ASR set; veil's ``stealth.l1`` is the
            same on the ``[0, 1]`` scale (this / 255).
            ``modified_fraction``, ``linf``, ``histogram``: share of changed sub-pixels, largest
            change (grey levels) and Table 3's histogram (percent), over the ASR set.
            ``per_label_asr`` (list, ``None`` for labels without images), ``mean_per_label_asr``:
            Figure 3 (all-targets and all-to-all).
            ``feature_distance``: mean L2 distance between the penultimate features of the
            malicious images and the mean feature of the clean test images of their target label;
            ``feature_spread_target``: the same for the clean target-class images themselves;
            ``feature_distance_clean_sources``: the same for the malicious images' clean sources.
            ``clean_target_rate``: share of the ASR set's clean images (no trigger) already
            classified as their target; an attack success rate far above it is the trigger's.
            ``per_label_tint_share`` (all targets): per label, the share of its mean trigger's
            energy in the per-channel constant: near 1 when a label's trigger is a uniform tint,
            which photos' colour differences drown out (a failure of the co-training; see the
            module's "All targets" notes).
        """
        from veil.metrics import (
            l1,
            linf,
            modification_histogram,
            modified_fraction,
            per_label_success_rate,
        )
        from veil.train import predict

        rows, targets = self._asr_rows(test)
        poisoned = self.poison_test(test)
        dev = next(model.parameters()).device
        clean = to_float(test.images[rows])
        mal = to_float(poisoned.images)
        out: dict[str, Any] = {
            "asr_images": int(rows.numel()),
            "l1_grey_levels": float(l1(clean, mal).double().mean()) * 255.0,
            "modified_fraction": modified_fraction(clean, mal),
            "linf": int(linf(clean, mal).max()) if rows.numel() else 0,
            "histogram": modification_histogram(clean, mal),
        }
        preds = predict(model, poisoned.images, device=dev, amp=False)
        per_label = per_label_success_rate(
            preds, targets, test.labels[rows], self.num_classes
        )
        # the same rows without the trigger: a model that answers the target for clean images
        # too has a high attack success rate that the trigger did not earn
        clean_preds = predict(model, test.images[rows], device=dev, amp=False)
        out["clean_target_rate"] = (
            float((clean_preds == targets).float().mean()) if rows.numel() else 0.0
        )
        if self.num_maps > 1:
            out["per_label_asr"] = [
                None if math.isnan(v) else v for v in per_label.tolist()
            ]
            finite = per_label[~per_label.isnan()]
            out["mean_per_label_asr"] = float(finite.mean()) if finite.numel() else None
            out["per_label_tint_share"] = _tint_shares(
                (mal - clean) * 255.0, targets, self.num_classes
            )
        feats = getattr(model, "features", None)
        if callable(feats):
            f_mal = _features(model, poisoned.images, dev)
            f_src = _features(model, test.images[rows], dev)
            centres = torch.zeros(self.num_classes, f_mal.shape[1], dtype=torch.float64)
            spreads = []
            for t in targets.unique().tolist():
                own = torch.nonzero(test.labels == t).flatten()
                if own.numel():
                    f_own = _features(model, test.images[own], dev)
                    centres[t] = f_own.mean(0)
                    spreads.append((f_own - centres[t]).norm(dim=1))
            has = torch.tensor(
                [bool((test.labels == t).any()) for t in targets.tolist()],
                dtype=torch.bool,
            )
            if has.any():
                ref = centres[targets[has]]
                out["feature_distance"] = float((f_mal[has] - ref).norm(dim=1).mean())
                out["feature_distance_clean_sources"] = float(
                    (f_src[has] - ref).norm(dim=1).mean()
                )
                out["feature_spread_target"] = float(torch.cat(spreads).mean())
        self.results = out
        return out

    def tables(self) -> dict[str, dict[str, Any]]:
        r = self.results
        if not r:
            return {}
        hist = r["histogram"]
        tables: dict[str, dict[str, Any]] = {
            "multinomial_modification": {
                "title": "Multinomial attack: modification magnitude histogram (% of sub-pixels, Table 3), "
                "exact trigger on the ASR set",
                "columns": list(hist),
                "rows": [[hist[k] for k in hist]],
            },
            "multinomial_stealth_features": {
                "title": "Multinomial attack: paper's L1 (grey levels), modified share, and feature distances",
                "columns": ["measure", "value"],
                "rows": [
                    [k, r[k]]
                    for k in (
                        "l1_grey_levels",
                        "modified_fraction",
                        "linf",
                        "clean_target_rate",
                        "feature_distance",
                        "feature_spread_target",
                        "feature_distance_clean_sources",
                    )
                    if k in r
                ],
            },
        }
        if "per_label_asr" in r:
            tables["multinomial_per_label_asr"] = {
                "title": "Multinomial attack: attack success rate per target label (Figure 3)",
                "columns": ["label", "attack success rate", "tint share of the trigger"],
                "rows": [
                    [i, v, t]
                    for i, (v, t) in enumerate(
                        zip(
                            r["per_label_asr"],
                            r.get("per_label_tint_share", [None] * len(r["per_label_asr"])),
                        )
                    )
                ],
            }
        return tables

    def figures(self) -> dict[str, bytes]:
        r = self.results
        if "per_label_asr" not in r:
            return {}
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        values = [float("nan") if v is None else v for v in r["per_label_asr"]]
        fig, ax = plt.subplots(
            figsize=(max(4.0, 0.18 * len(values) + 1.5), 2.6), dpi=100
        )
        ax.bar(range(len(values)), values, color="#4c72b0")
        ax.set_xlabel("target label")
        ax.set_ylabel("attack success rate")
        ax.set_ylim(0, 1.02)
        ax.set_title(
            f"per-label ASR (mean {r.get('mean_per_label_asr') or float('nan'):.3f})"
        )
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        plt.close(fig)
        return {"multinomial_per_label_asr.png": buf.getvalue()}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Tensor]:
        state = {
            f"generator.{k}": v.detach().cpu().clone()
            for k, v in self.generator.state_dict().items()
        }
        if self.samplenet is not None:
            state.update(
                {
                    f"samplenet.{k}": v.detach().cpu().clone()
                    for k, v in self.samplenet.state_dict().items()
                }
            )
        state["noise_seed"] = torch.tensor(self.noise_seed, dtype=torch.int64)
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        gen = {
            k: self._state_tensor(state, f"generator.{k}", v)
            for k, v in self.generator.state_dict().items()
        }
        self.noise_seed = int(
            self._state_tensor(state, "noise_seed", torch.tensor(0, dtype=torch.int64))
        )
        if any(k.startswith("samplenet.") for k in state):
            net = SampleNet()
            net.load_state_dict(
                {
                    k: self._state_tensor(state, f"samplenet.{k}", v)
                    for k, v in net.state_dict().items()
                }
            )
            self.samplenet = net.eval().requires_grad_(False)
        dev = next(self.generator.parameters()).device
        self.generator.load_state_dict(gen)
        self.generator.to(dev).eval()
        self.trained = True


def _tint_shares(
    delta: Tensor, targets: Tensor, num_classes: int
) -> list[float | None]:
    """Per label, ``sum_c H W mean(E_c)^2 / sum(E^2)`` of the label's mean trigger ``E`` (the
    mean of ``delta``, ``(B, C, H, W)`` in grey levels, over its rows); ``None`` without rows
    or without any change."""
    shares: list[float | None] = []
    for t in range(num_classes):
        d = delta[targets == t].double()
        if not d.shape[0]:
            shares.append(None)
            continue
        e = d.mean(0)
        total = float(e.pow(2).sum())
        dc = e.mean((1, 2))
        shares.append(
            float(dc.pow(2).sum() * e.shape[1] * e.shape[2]) / total if total > 0 else None
        )
    return shares


def _features(
    model: nn.Module, images: Tensor, device: torch.device, batch_size: int = 512
) -> Tensor:
    """Penultimate features (float64, CPU) of uint8 images, in eval mode."""
    if images.shape[0] == 0:
        return torch.empty(0, 0, dtype=torch.float64)
    return batched(model, images, lambda m, x: m.features(x).double(), batch_size=batch_size, device=device)
