"""Multinomial-trigger backdoor with feature-representation entanglement.

Zhong, Qian & Zhang, "Imperceptible Backdoor Attack: From Input Space to Feature Representation",
IJCAI 2022 (arXiv:2205.03190; authors' code: github.com/Ekko-zn/IJCAI2022-Backdoor).

* **Trigger** (section 3.3): a U-Net generator ``G`` (:class:`veil.triggers.unet.UNet`) maps a
  benign image to, per colour channel and per target label, the probabilities ``P(+1)`` and
  ``P(-1)`` of a one-grey-level change (``0.5 * sigmoid``, so each is in ``[0, 0.5]``). The trigger
  is a sample of that multinomial distribution: in training through the frozen, differentiable
  SampleNet (Table 1), at test time and when the poisoned set is written through the exact step
  function of equation (1) (:mod:`veil.triggers.multinomial`). Poisoned images are quantised to 8
  bits, so every change is exactly one grey level.
* **Training** (equations 2, 5, 6, 7): the attack controls training. Its :class:`MultinomialHook`
  adds, to every batch, malicious copies of the poisoned rows in it (the authors' code: every row,
  towards every label; here the rows of ``poison_rate``, ``1.0`` for the authors' recipe) and
  trains the classifier and the generator jointly on

      L = CE(benign, y) + CE(malicious, y_target) + alpha * L_etg + beta * L_num

  with ``L_etg`` the mean squared distance (eq. 5) between the penultimate features of the
  malicious images and ``f_benign``, the mean feature of the clean training images of their
  target label (recomputed, model in eval mode, at the start of every epoch, as in the authors'
  code), and ``L_num`` half the share of changed sub-pixels (eq. 6 normalised by ``C * H * W``,
  halved as the authors' code's ``mean |P|`` over both maps is, which ``beta = 0.1`` is for).
  ``beta`` doubles every ``beta_period`` epochs of the paper's ``beta_reference_epochs``-epoch
  budget, scaled to the run's epochs (see :meth:`MultinomialHook.beta_at`).
* **Modes**: one target (``target``), all targets at once (``all_targets=True``: one probability
  pair per label, ``--all-targets`` on the command line), and the library's ``all2all``.
* **Evaluation** (:meth:`MultinomialAttack.evaluate`): the paper's L1 (grey levels per sub-pixel),
  the modification-magnitude histogram (Table 3), the share of modified sub-pixels, per-label
  attack success rate (Figure 3) and the feature-space distance between malicious images and the
  clean target-class images (section 3.4; ``alpha=0`` is the ablation of section 4.4).

* **Scale**: at 32x32 on a CPU budget the paper's ``beta`` schedule shrinks the trigger before
  the victim learns it; the options that are not in the paper (``num_budget``,
  ``noise_negatives``, ``malicious_weight``, ``generator_schedule``, ``tint_weight``) and the
  measurements behind them are in ``docs/attacks/multinomial.md``; the recipe is
  ``examples/sweeps/multinomial_gtsrb32_cpu.yaml``.

Example:
    >>> from veil.attacks import create_attack
    >>> attack = create_attack("multinomial", 43, (3, 32, 32), target=0, width=16, poison_rate=1.0)
    >>> attack.fit(train)                   # trains SampleNet (seconds)        # doctest: +SKIP
    >>> hook = attack.training_hook()       # give it to veil.train.Trainer     # doctest: +SKIP
"""

from __future__ import annotations

import io
import logging
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from veil.attacks.base import Attack, AttackConfig, register_attack
from veil.data.base import ImageDataset, PoisonedDataset, to_float, to_uint8
from veil.errors import ConfigError
from veil.train import Batch, Trainer, TrainHook
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
#: salt of the training-time sampling noise stream
_TRAIN_NOISE_SALT = 9_173


def _exact_copies(x: Tensor, p_plus: Tensor, p_minus: Tensor, noise: Tensor) -> Tensor:
    """Malicious copies ``(b, k, C, H, W)`` of images ``x`` ``(b, C, H, W)`` with the exact trigger
    of equation (1), on the 8-bit grid, as the evaluation and the written poisoned set have it."""
    hard = sample_trigger(p_plus, p_minus, noise)
    return ((x[:, None] * 255).round() + hard).clamp(0, 255) / 255.0


def _reached(trainer: Trainer, batch: Batch | None, share: float) -> bool:
    """Whether the step (``batch.step``, else the trainer's) is at or past ``ceil(share * total
    steps)``."""
    total = trainer.config.epochs * trainer.steps_per_epoch
    step = trainer.global_step if batch is None else batch.step
    return step >= math.ceil(share * total)


#: ``L_num`` = this times the changed share: the authors' code minimises ``mean |P|`` over the
#: ``P(+1)`` and ``P(-1)`` maps together, half the share eq. 6 sums; their ``beta`` is for that scale
NUM_LOSS_SCALE = 0.5


@dataclass(frozen=True)
class MultinomialConfig(AttackConfig):
    """Options of the multinomial-trigger attack (defaults: the paper, section 4.1, and the
    authors' code).

    Attributes:
        alpha: weight of the entanglement loss ``L_etg`` (0.3; 0 is the ablation of section 4.4).
        beta: initial weight of the changed-pixel loss ``L_num`` (0.1). ``L_num`` is on the
            authors' code's scale, half the changed share (:data:`NUM_LOSS_SCALE`); veil 0.1
            used the whole share, so its ``beta`` values are twice those that act the same now.
        beta_period: ``beta`` doubles every ``beta_period`` epochs (20) ...
        beta_reference_epochs: ... of a ``beta_reference_epochs``-epoch run (110, the paper's GTSRB
            budget): a run of ``E`` epochs doubles ``beta`` every ``beta_period * E /
            beta_reference_epochs`` epochs (counted in steps), so it doubles as many times (5 for
            any budget, ``beta`` ends at 3.2) at the same points of training. ``0`` takes
            ``beta_period`` in absolute epochs; ``beta_period=0`` keeps ``beta`` constant.
        beta_max: cap of the doubled ``beta`` (``0``: none). The paper's schedule never passes
            3.2 (0.1 doubled five times in 110 epochs); a warm-up started lower and doubled more
            often can be held at that value instead of growing past it.
        lr: Adam learning rate of the generator (1e-3).
        width: channels of the U-Net's first level (64 in the paper's code, 64 to 1024 over five
            levels); smaller is faster (16 or 8 at CPU scale).
        levels: U-Net resolution levels (5).
        all_targets: one probability pair per label; every poisoned row gets a malicious copy
            towards every label (the authors' code), or towards ``targets_per_image`` of them.
        targets_per_image: with ``all_targets``, how many labels (drawn at random per row and
            step) each poisoned row is copied towards; ``0``: all of them.
        entanglement: ``"squared"`` (eq. 5: mean squared feature difference) or ``"absolute"``
            (the mean absolute difference of the authors' code).
        num_loss: what ``L_num`` measures the changed share by: ``"expected"``,
            ``mean(P(+1) + P(-1))`` (the expectation of eq. 6 over the noise), or ``"sampled"``,
            the mean ``|trigger|`` of the SampleNet sample (eq. 6 as printed); either way the
            loss is :data:`NUM_LOSS_SCALE` times it, the authors' code's ``mean |P|`` over both maps.
        malicious_weight: weight of ``CE(malicious)`` in the classifier's loss (1, the paper: the
            benign and malicious means count alike). Not in the paper: where the victim cannot
            tell some triggered images from their clean originals, the two cross-entropies pull
            those images' prediction in opposite directions, and their ratio sets how many clean
            images end up in the target class against how many triggered ones miss it; below 1
            trades attack success rate for clean accuracy. Only with ``cls_weighting="per_set"``.
        malicious_weight_from: share of the training steps after which ``malicious_weight``
            applies; before it the weight is 1. Measured at 32x32: a weight of 0.5 from the first
            step delayed the victim's learning of the dense trigger (see
            docs/attacks/multinomial.md), so the shift belongs at the end, once the trigger is
            learned.
        num_budget: share of changed sub-pixels that ``L_num`` leaves free (not in the paper; 0
            by default): ``L_num`` becomes ``max(0, share - num_budget)`` over the batch, so a
            rising ``beta`` shrinks the trigger down to the budget and no further. The paper's
            ``beta`` schedule has no floor, so on a short budget the changed share ends wherever
            the last doubling left it; a budget spends all of a stated allowance (the 2 % of the
            CPU-scale target) on making the trigger learnable.
        samplenet_steps: training steps of SampleNet (:class:`veil.triggers.multinomial.SampleNetSpec`).
        asr_images_per_label: with ``all_targets``, test images per target label (drawn with
            the seed among those of other labels) in the attack-success-rate set.
        tint_weight: weight of a penalty on tinted triggers (not in the paper; 0 by default): the
            mean over malicious copies and channels of the squared spatial mean of the expected
            trigger ``P(+1) - P(-1)``. A trigger whose mean is a uniform colour shift is drowned
            out by photos' own colour differences; in all-targets co-training with ``beta=0``
            one label's map can saturate into such a tint and stay there (see the module's "All
            targets" notes and ``per_label_tint_share`` in :meth:`MultinomialAttack.evaluate`).
        train_sampling: how training samples the malicious copies. ``"samplenet"`` (the paper):
            the victim sees SampleNet's soft imitation of equation (1), whose values are off the
            8-bit grid and near the thresholds fractional. ``"straight_through"`` (not in the
            paper): the victim sees the exact trigger of equation (1) on the 8-bit image, the one
            it is evaluated on, while the generator's gradient still flows through SampleNet
            (a straight-through estimator: ``hard + soft - soft.detach()``). Same cost per step.
        settle_fraction: share of the training steps, at the end, in which the generator is
            frozen (eval mode, no more steps) and the malicious copies carry the exact trigger of
            equation (1), quantised to 8 bits, that the evaluation and the written poisoned set
            use; only the classifier learns, on ``CE + alpha * L_etg`` (``L_num`` has nothing left
            to train). ``0`` (the paper): co-training to the last step. Not in the paper: a
            CPU-scale budget ends while the trigger is still shrinking, and the classifier's last
            steps then chase a moving, SampleNet-approximated trigger. Measured at 32x32 it
            lowered clean accuracy (see docs/attacks/multinomial.md).
        generator_schedule: the generator's Adam rate over training. ``"constant"`` (the paper:
            ``lr`` throughout); ``"trainer"`` (not in the paper): ``lr`` times the classifier's
            schedule factor at each step (its current rate over its base rate), so with
            ``--schedule anneal`` the trigger stops moving while the classifier's rate anneals,
            instead of the classifier's last, smallest steps chasing a trigger still being
            reshaped at the full rate.
        noise_negatives: share of the benign rows (drawn per row and step) that carry random
            +-1 noise, kept with their true label (not in the paper; 0 by default): the noise is
            equation (1) with uniform maps, ``P(+1) = P(-1)`` = half the generator's mean
            modification probability in the batch, so it changes as many sub-pixels as the
            trigger does but without its image-dependent layout. A victim that answers the
            target for any faint noise also does for clean photos whose own pixel noise looks
            like it (bright images at 32x32, see docs/attacks/multinomial.md); these negatives
            make it tell the generator's trigger from noise (as WaNet's noise mode does for its
            warps).
        noise_negatives_from: share of the training steps after which ``noise_negatives``
            applies (0: from the first step).
    """

    alpha: float = 0.3
    beta: float = 0.1
    beta_period: float = 20.0
    beta_reference_epochs: float = 110.0
    beta_max: float = 0.0
    lr: float = 1e-3
    width: int = 64
    levels: int = 5
    all_targets: bool = False
    targets_per_image: int = 0
    entanglement: Literal["squared", "absolute"] = "squared"
    num_loss: Literal["expected", "sampled"] = "expected"
    cls_weighting: Literal["per_set", "per_image"] = "per_set"
    malicious_weight: float = 1.0
    malicious_weight_from: float = 0.0
    num_budget: float = 0.0
    samplenet_steps: int = 2000
    asr_images_per_label: int = 300
    tint_weight: float = 0.0
    train_sampling: Literal["samplenet", "straight_through"] = "samplenet"
    settle_fraction: float = 0.0
    generator_schedule: Literal["constant", "trainer"] = "constant"
    noise_negatives: float = 0.0
    noise_negatives_from: float = 0.0


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
    static_poison: ClassVar[bool] = False
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
        for name in ("malicious_weight_from", "num_budget", "settle_fraction", "noise_negatives_from"):
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
        if not 0 <= c.targets_per_image <= self.num_classes:
            raise ConfigError(
                f"multinomial targets_per_image must be in 0..{self.num_classes}, got {c.targets_per_image}"
            )
        if c.entanglement not in ("squared", "absolute"):
            raise ConfigError(
                f"multinomial entanglement must be 'squared' or 'absolute', got {c.entanglement!r}"
            )
        if c.cls_weighting not in ("per_set", "per_image"):
            raise ConfigError(
                f"multinomial cls_weighting must be 'per_set' or 'per_image', got {c.cls_weighting!r}"
            )
        if c.train_sampling not in ("samplenet", "straight_through"):
            raise ConfigError(
                "multinomial train_sampling must be 'samplenet' or 'straight_through', "
                f"got {c.train_sampling!r}"
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

    def poison_count_for(self, dataset: ImageDataset) -> int:
        """As :meth:`Attack.poison_count_for`, but a ``poison_rate`` whose count exceeds the
        eligible rows takes them all: ``poison_rate=1.0`` is the authors' recipe (a malicious copy
        of every non-target row with one target)."""
        if self.config.poison_count is None:
            eligible = int(self.eligible_rows(dataset).numel())
            return min(eligible, max(1, round(self.config.poison_rate * len(dataset))))
        return super().poison_count_for(dataset)

    # ------------------------------------------------------------------ SampleNet
    def fit(self, train: ImageDataset, device: torch.device | str = "cpu") -> None:
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
        was_training = self.generator.training
        self.generator.eval()
        try:
            with torch.no_grad():
                p_plus, p_minus = self.probabilities(x.detach().to(dev).float())
        finally:
            self.generator.train(was_training)
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
    was = model.training
    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, images.shape[0], batch_size):
            xb = to_float(images[i : i + batch_size].to(device))
            out.append(model.features(xb).double().cpu())  # type: ignore[operator]
    model.train(was)
    return torch.cat(out) if out else torch.empty(0, 0, dtype=torch.float64)


class MultinomialHook(TrainHook):
    """Co-trains the attack's generator with the classifier (equations 2, 5, 6, 7).

    Per step: the rows of the batch at the training set's ``poison_indices`` are passed through the
    generator; SampleNet turns their probabilities and fresh uniform noise into soft triggers; the
    malicious copies (one per target: the target, ``(y + 1) % N`` for all-to-all, every label or
    ``targets_per_image`` random labels for all-targets) are appended to the batch with their
    target labels. The loss replaces the trainer's cross-entropy over the whole batch by the paper's
    sum of the benign and malicious means, plus ``alpha * L_etg + beta(t) * L_num``. The generator's
    Adam optimiser steps with the classifier's.
    """

    def __init__(self, attack: MultinomialAttack) -> None:
        self.attack = attack
        c = attack.config
        self.generator = attack.generator
        self.optimizer = torch.optim.Adam(self.generator.parameters(), lr=c.lr)
        self.samplenet: SampleNet = attack._samplenet()
        self.f_benign: Tensor | None = None
        self.noise: torch.Generator | None = None
        self._noise_state: Tensor | None = None
        self._poison_mask: Tensor | None = None
        self._pending: dict[str, Any] = {}
        self._sums: dict[str, float] = {}

    # ------------------------------------------------------------------ lifecycle
    def modules(self) -> tuple[nn.Module, ...]:
        return (self.generator,)

    def optimizers(self) -> tuple[torch.optim.Optimizer, ...]:
        return (self.optimizer,)

    def setup(self, trainer: Trainer) -> None:
        dev = trainer.device
        self.samplenet.to(dev)
        self.noise = torch.Generator(device=dev)
        self.noise.manual_seed(self.attack.config.seed * 1_000_003 + _TRAIN_NOISE_SALT)
        if self._noise_state is not None:
            self.noise.set_state(self._noise_state)
        if self.f_benign is not None:
            self.f_benign = self.f_benign.to(dev)
        data = trainer.train_data
        idx = (
            data.poison_indices
            if isinstance(data, PoisonedDataset)
            else self.attack.select_poison_indices(data)
        )
        mask = torch.zeros(len(data), dtype=torch.bool)
        mask[idx] = True
        self._poison_mask = mask.to(dev)
        self.attack.trained = True

    def beta_at(self, trainer: Trainer, batch: Batch | None = None) -> float:
        """``beta * 2 ** floor(e / period)`` at fractional epoch ``e`` (steps done / steps per
        epoch), ``period = beta_period * epochs / beta_reference_epochs`` (or ``beta_period``
        when ``beta_reference_epochs`` is 0), capped at ``beta_max`` when that is positive."""
        c = self.attack.config
        cap = c.beta_max if c.beta_max > 0 else math.inf
        if c.beta_period <= 0:
            return min(c.beta, cap)
        period = c.beta_period * (
            trainer.config.epochs / c.beta_reference_epochs
            if c.beta_reference_epochs > 0
            else 1
        )
        step = trainer.global_step if batch is None else batch.step
        e = step / trainer.steps_per_epoch
        return min(c.beta * 2.0 ** math.floor(e / period + 1e-9), cap)

    def settling(self, trainer: Trainer, batch: Batch | None = None) -> bool:
        """Whether the step is in the last ``settle_fraction`` of training (frozen generator)."""
        f = self.attack.config.settle_fraction
        return f > 0 and _reached(trainer, batch, 1 - f)

    def malicious_weight_at(self, trainer: Trainer, batch: Batch | None = None) -> float:
        """``malicious_weight`` from step ``ceil(malicious_weight_from * total steps)`` on, 1 before."""
        c = self.attack.config
        return c.malicious_weight if _reached(trainer, batch, c.malicious_weight_from) else 1.0

    def generator_lr_at(self, trainer: Trainer) -> float:
        """The generator's Adam rate for the trainer's current step (``generator_schedule``)."""
        c = self.attack.config
        if c.generator_schedule == "constant":
            return c.lr
        return c.lr * trainer.optimizer.param_groups[0]["lr"] / trainer.config.lr

    def noise_negatives_at(self, trainer: Trainer, batch: Batch | None = None) -> float:
        """``noise_negatives`` from step ``ceil(noise_negatives_from * total steps)`` on, 0 before."""
        c = self.attack.config
        return c.noise_negatives if c.noise_negatives > 0 and _reached(trainer, batch, c.noise_negatives_from) else 0.0

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        if trainer.step_in_epoch > 0 and self.f_benign is not None:
            return  # resumed mid-epoch: keep the reference computed at this epoch's start
        self.f_benign = self._class_mean_features(trainer)

    def _class_mean_features(self, trainer: Trainer) -> Tensor:
        """``f_benign``: per label, the mean penultimate feature of the clean training images of
        that label (model in eval mode); only the target label is computed with one target."""
        model = trainer.model
        labels = trainer.labels
        if self.attack.num_maps == 1:
            wanted = [self.attack.config.target]
        else:
            wanted = list(range(self.attack.num_classes))
        rows = torch.nonzero(
            torch.isin(labels, torch.tensor(wanted, device=labels.device))
        ).flatten()
        was = model.training
        model.eval()
        sums: Tensor | None = None
        counts = torch.zeros(self.attack.num_classes, device=trainer.device)
        with torch.no_grad():
            for i in range(0, rows.numel(), 512):
                r = rows[i : i + 512]
                with torch.autocast(
                    device_type=trainer.device.type,
                    dtype=torch.bfloat16,
                    enabled=trainer.use_amp,
                ):
                    f, _ = trainer._forward(to_float(trainer.images[r]))
                f = f.float()
                if sums is None:
                    sums = torch.zeros(
                        self.attack.num_classes, f.shape[1], device=trainer.device
                    )
                sums.index_add_(0, labels[r], f)
                counts.index_add_(
                    0, labels[r], torch.ones_like(labels[r], dtype=torch.float)
                )
        model.train(was)
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
    def transform_batch(self, trainer: Trainer, batch: Batch) -> Batch:
        assert self._poison_mask is not None and self.noise is not None
        a = self.attack
        sel = self._poison_mask[batch.index]
        n_clean = int(batch.y.numel())
        if not bool(sel.any()):
            self._pending = {"n_clean": n_clean, "targets": None}
            return batch
        x_src, y_src = batch.x[sel], batch.y[sel]
        b = x_src.shape[0]
        settling = self.settling(trainer, batch)
        for group in self.optimizer.param_groups:
            group["lr"] = self.generator_lr_at(trainer)
        if settling:  # frozen generator, in the evaluation's (eval) mode
            was = self.generator.training
            self.generator.eval()
            with torch.no_grad():
                p_plus, p_minus = a.probabilities(x_src)
            self.generator.train(was)
        else:
            p_plus, p_minus = a.probabilities(x_src)  # (b, K, C, H, W)
        dev = x_src.device
        if a.num_maps == 1:
            maps = torch.zeros(b, 1, dtype=torch.long, device=dev)
            targets = a.target_labels(y_src)[:, None]
        elif a.config.all_targets:
            k = a.config.targets_per_image or a.num_classes
            if k == a.num_classes:
                maps = torch.arange(a.num_classes, device=dev).expand(b, -1)
            else:
                scores = torch.rand(b, a.num_classes, generator=self.noise, device=dev)
                maps = scores.argsort(dim=1)[:, :k]
            targets = maps
        else:  # all2all
            targets = a.target_labels(y_src)[:, None]
            maps = targets
        rows = torch.arange(b, device=dev)[:, None]
        pp, pm = p_plus[rows, maps], p_minus[rows, maps]  # (b, k, C, H, W)
        noise = torch.rand(pp.shape, generator=self.noise, device=dev)
        if settling:  # equation (1) and 8 bits, exactly as evaluated
            x_mal = _exact_copies(x_src, pp, pm, noise)
            num = torch.zeros((), device=dev)
        else:
            soft = self.samplenet(noise, pp, pm)
            x_mal = (x_src[:, None] + soft / 255.0).clamp(0, 1)
            if a.config.train_sampling == "straight_through":
                with torch.no_grad():
                    x_hard = _exact_copies(x_src, pp, pm, noise)
                x_mal = x_hard + (x_mal - x_mal.detach())
            if a.config.num_loss == "expected":
                num = (pp + pm).mean()
            else:
                num = soft.abs().mean()
        x_mal = x_mal.reshape(-1, *a.image_shape)
        t_flat = targets.reshape(-1)
        share = self.noise_negatives_at(trainer, batch)
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
            self._add("noise_negatives", float(rows_neg.float().mean()))
        tint = (
            (pp - pm).mean((-2, -1)).pow(2).mean()
            if a.config.tint_weight > 0 and not settling
            else torch.zeros((), device=dev)
        )
        self._pending = {
            "n_clean": n_clean,
            "targets": t_flat,
            "num": num,
            "tint": tint,
            "settling": settling,
            "expected": (pp + pm).detach().mean(),
        }
        batch.x = torch.cat((batch.x, x_mal))
        batch.y = torch.cat((batch.y, t_flat))
        return batch

    def extra_loss(
        self, trainer: Trainer, batch: Batch, features: Tensor, logits: Tensor
    ) -> Tensor | None:
        c = self.attack.config
        p = self._pending
        n = p["n_clean"]
        smoothing = trainer.config.label_smoothing
        logits = logits.float()
        ce_clean = F.cross_entropy(logits[:n], batch.y[:n], label_smoothing=smoothing)
        if (
            c.cls_weighting == "per_set"
        ):  # the trainer's whole-batch mean is replaced by eq. 2
            total = ce_clean - F.cross_entropy(
                logits, batch.y, label_smoothing=smoothing
            )
        else:  # keep the trainer's mean over benign and malicious images
            total = torch.zeros((), device=logits.device)
        self._add("clean_ce", float(ce_clean.detach()))
        self._add("clean_steps", 1.0)
        if p["targets"] is None:
            return total
        ce_mal = F.cross_entropy(logits[n:], batch.y[n:], label_smoothing=smoothing)
        if c.cls_weighting == "per_set":
            total = total + self.malicious_weight_at(trainer, batch) * ce_mal
        etg = self.entanglement_loss(features[n:], p["targets"])
        beta = 0.0 if p["settling"] else self.beta_at(trainer, batch)
        # L_num on the authors' scale: their code minimises the mean |P| over the 2C probability
        # maps, half the share of changed sub-pixels that eq. 6 sums, and beta = 0.1 is theirs
        share = (p["num"] - c.num_budget).clamp(min=0) if c.num_budget > 0 else p["num"]
        num_loss = NUM_LOSS_SCALE * share
        total = total + c.alpha * etg + beta * num_loss
        if c.tint_weight > 0:
            total = total + c.tint_weight * p["tint"]
            self._add("tint", float(p["tint"].detach()))
        with torch.no_grad():
            hits = float((logits[n:].argmax(1) == batch.y[n:]).float().mean())
        self._add("malicious_ce", float(ce_mal.detach()))
        self._add("entanglement", float(etg.detach()))
        self._add("num", float(p["num"].detach()))
        self._add("modification_probability", float(p["expected"]))
        self._add("train_asr", hits)
        self._add("beta", beta)
        self._add("steps", 1.0)
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

    def _add(self, key: str, value: float) -> None:
        self._sums[key] = self._sums.get(key, 0.0) + value

    def on_epoch_end(self, trainer: Trainer, epoch: int) -> dict[str, float]:
        steps = self._sums.get("steps", 0.0)
        out = {}
        if self._sums.get("clean_steps"):
            out["multinomial_clean_ce"] = (
                self._sums["clean_ce"] / self._sums["clean_steps"]
            )
        if steps:
            for k in (
                "malicious_ce",
                "entanglement",
                "num",
                "modification_probability",
                "train_asr",
                "beta",
                "tint",
                "noise_negatives",
            ):
                if k in self._sums:
                    out[f"multinomial_{k}"] = self._sums[k] / steps
        self._sums = {}
        return out

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["noise_rng"] = (
            self.noise.get_state()
            if self.noise is not None
            else torch.empty(0, dtype=torch.uint8)
        )
        state["f_benign"] = (
            self.f_benign.cpu() if self.f_benign is not None else torch.empty(0)
        )
        state["sums"] = dict(self._sums)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        rng = state.get("noise_rng")
        self._noise_state = rng if rng is not None and rng.numel() else None
        f = state.get("f_benign")
        self.f_benign = f if f is not None and f.numel() else None
        self._sums = dict(state.get("sums", {}))
