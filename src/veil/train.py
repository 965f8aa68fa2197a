"""The one trainer every attack and defense uses.

* CPU or GPU; automatic mixed precision (bfloat16 autocast) on CUDA.
* SGD with momentum and Nesterov (or Adam), weight decay, and a per-step schedule (linear warm-up
  then cosine decay by default; ``step`` and ``constant`` also available).
* Data are uint8 tensors kept on the training device; each batch is converted to float and
  augmented as tensor operations (:class:`veil.data.augment.BatchAugment`).
* A progress bar per epoch; an evaluation callback (clean accuracy, attack success rate) after every
  epoch, logged into the history.
* Checkpoints (model, optimiser, schedule, every RNG state, hook state, history) written atomically
  every epoch and every ``checkpoint_every`` steps, so a killed run resumes where it stopped and ends
  with exactly the weights an uninterrupted run would have.
* :class:`TrainHook` lets an attack add loss terms or own a batch's loss, co-train a generator, clip
  parameters after each step, or alternate what each iteration trains on. Hooks see training
  through a :class:`StepContext` (progress, learning-rate factor, device, autocast, a forward that
  returns features and logits), never through the trainer itself.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from veil.data.augment import CROP_PADDING, BatchAugment
from veil.data.base import ImageDataset, to_float
from veil.errors import CheckpointError, ConfigError, TrainingDiverged
from veil.inference import batched
from veil.records import atomic_torch_save, load_checkpoint

log = logging.getLogger(__name__)


SCHEDULES = ("anneal", "constant", "cosine", "step")


@dataclass(frozen=True)
class TrainConfig:
    """Training hyperparameters (defaults: the standard CIFAR/GTSRB ResNet recipe).

    Attributes:
        epochs: passes over the training set.
        batch_size: images per step.
        lr: peak learning rate.
        momentum: SGD momentum (Nesterov).
        optimizer: ``"sgd"`` (with ``momentum``) or ``"adam"`` (e.g. the multinomial backdoor
            paper's Adam at 1e-3; ``weight_decay`` is Adam's L2 term).
        weight_decay: L2 weight decay.
        schedule: ``"cosine"`` (linear warm-up over ``warmup_epochs`` then cosine to 0),
            ``"step"`` (x0.1 at 50 % and 75 % of training), ``"constant"``, or ``"anneal"``
            (constant, then cosine to 0 over the last ``anneal_fraction`` of the steps: a
            constant-rate recipe, such as the multinomial paper's Adam at 1e-3, whose last epochs
            settle instead of ending wherever the constant rate left the weights).
        warmup_epochs: warm-up length for ``cosine`` (fractions allowed).
        anneal_fraction: share of the steps, at the end, over which ``anneal`` decays, in (0, 1].
        label_smoothing: cross-entropy label smoothing.
        augment: random crop (4-pixel padding) and, where the dataset allows it, horizontal flip.
        amp: bfloat16 autocast on CUDA (ignored on CPU).
        seed: seed of the shuffling and augmentation streams.
        checkpoint_every: steps between mid-epoch checkpoints (0: only at epoch ends).
        channels_last: NHWC memory layout for the model and the batches it trains on (on 2 CPU
            cores a PreAct-ResNet-18 training step runs 1.25 times as fast, measured by
            ``bench/bench_layout.py``; hooks' modules, such as a trigger generator, keep theirs
            and see the batch before the change). On the CPU (torch 2.15) the backward pass of
            a strided 1x1 convolution in channels-last layout corrupts memory for some shapes
            (``Conv2d(8, 16, 1, stride=2)`` on a batch of 5 aborts with ``free(): invalid next
            size``), so the trainer runs each such convolution as a subsampling of its input
            followed by the same convolution at stride 1, which gives the same result
            (:func:`safe_pointwise_convs`).
    """

    epochs: int = 4
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    optimizer: str = "sgd"
    warmup_epochs: float = 0.5
    anneal_fraction: float = 0.25
    label_smoothing: float = 0.0
    augment: bool = True
    amp: bool = True
    seed: int = 0
    checkpoint_every: int = 200
    channels_last: bool = True

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"batch size must be at least 1, got {self.batch_size}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"learning rate must be a positive number, got {self.lr}")
        for name in ("momentum", "weight_decay", "warmup_epochs", "label_smoothing"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ConfigError(f"{name.replace('_', ' ')} must be a non-negative number, got {v}")
        if self.label_smoothing >= 1:
            raise ConfigError(f"label smoothing must be below 1, got {self.label_smoothing}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"unknown schedule {self.schedule!r}; known: {', '.join(sorted(SCHEDULES))}")
        if not 0.0 < self.anneal_fraction <= 1.0:
            raise ConfigError(f"anneal fraction {self.anneal_fraction} is outside (0, 1]")
        if self.optimizer not in ("sgd", "adam"):
            raise ConfigError(f"unknown optimizer {self.optimizer!r}; known: adam, sgd")


@dataclass
class Batch:
    """One training batch as the hooks see it.

    Attributes:
        x: float images in [0, 1] (before augmentation when given to ``transform_batch``).
        y: labels the classifier is trained towards.
        index: rows of the training set the batch came from.
        step: global step number (0-based).
        epoch: epoch number (0-based).
    """

    x: Tensor
    y: Tensor
    index: Tensor
    step: int
    epoch: int


Forward = Callable[[Tensor], tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class StepContext:
    """What a :class:`TrainHook` sees of training at one call: public and read-only.

    Attributes:
        step: global step (0-based): the steps done before this one.
        epoch: epoch (0-based).
        step_in_epoch: step inside the epoch (0-based; above 0 at the start of an epoch only when
            a run resumed in its middle).
        steps_per_epoch: steps of one epoch.
        epochs: epochs of the run.
        lr_factor: the classifier's current learning rate over its base rate (the schedule).
        device: where training runs.
        autocast: whether the classifier's forward runs under bfloat16 autocast.
        label_smoothing: the run's cross-entropy label smoothing.
        model: the classifier (for hooks that read or clip its parameters).
        train_data: the (possibly poisoned) training set.
        images: its uint8 images on ``device``.
        labels: its labels on ``device``.
        forward: the classifier as ``x -> (penultimate features, logits)``.
    """

    step: int
    epoch: int
    step_in_epoch: int
    steps_per_epoch: int
    epochs: int
    lr_factor: float
    device: torch.device
    autocast: bool
    label_smoothing: float
    model: nn.Module
    train_data: ImageDataset
    images: Tensor
    labels: Tensor
    forward: Forward

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    @property
    def progress(self) -> float:
        """Share of training done before this step, in [0, 1]."""
        return self.step / max(1, self.total_steps)

    def reached(self, share: float) -> bool:
        """Whether this step is at or past ``ceil(share * total_steps)``."""
        return self.step >= math.ceil(share * self.total_steps)

    def autocast_context(self) -> torch.autocast:
        """The autocast the classifier's training forward runs under."""
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.autocast)


class TrainHook:
    """Extension points of :class:`Trainer`; every method is a no-op by default, and each gets the
    :class:`StepContext` of the moment it is called.

    The uses the seed attacks need:

    * add loss terms: :meth:`extra_loss`; or own a batch's loss outright: :meth:`batch_loss`;
    * co-train a generator: put it in :meth:`modules`, its optimiser in :meth:`optimizers`, and
      apply it in :meth:`transform_batch` (gradients flow from the classifier's loss into it);
    * clip parameters after each step: :meth:`after_step`;
    * alternate what each iteration trains on: :meth:`train_classifier` / :meth:`transform_batch`.
    """

    def setup(self, ctx: StepContext) -> None:
        """Called once before training (after a resume, too)."""

    def modules(self) -> Sequence[nn.Module]:
        """Extra trainable modules (moved to the device, put in train mode each epoch)."""
        return ()

    def optimizers(self) -> Sequence[torch.optim.Optimizer]:
        """Extra optimisers, zeroed and stepped with the classifier's."""
        return ()

    def on_epoch_start(self, ctx: StepContext) -> None:
        """Called at the start of each epoch (e.g. recompute a class-mean feature)."""

    def transform_batch(self, ctx: StepContext, batch: Batch) -> Batch:
        """Change a batch before augmentation (poison on the fly, add malicious copies)."""
        return batch

    def batch_loss(self, ctx: StepContext, batch: Batch, features: Tensor, logits: Tensor) -> Tensor | None:
        """The whole loss of the batch, replacing the trainer's cross-entropy (``None``: keep it).
        At most one hook of a run may own a batch's loss; :meth:`extra_loss` terms of every hook are
        added to it."""
        return None

    def extra_loss(self, ctx: StepContext, batch: Batch, features: Tensor, logits: Tensor) -> Tensor | None:
        """A loss term added to the batch's loss (features are the classifier's penultimate)."""
        return None

    def train_classifier(self, ctx: StepContext, batch: Batch) -> bool:
        """Whether this step updates the classifier (False: only the hook's optimisers step)."""
        return True

    def after_step(self, ctx: StepContext, batch: Batch) -> None:
        """Called after the optimisers stepped (e.g. clip parameters)."""

    def on_epoch_end(self, ctx: StepContext) -> dict[str, float]:
        """Called at the end of each epoch; returned numbers go into the history."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """State to checkpoint (tensors, numbers, nested dicts/lists of them)."""
        state: dict[str, Any] = {}
        for i, m in enumerate(self.modules()):
            state[f"module{i}"] = m.state_dict()
        for i, o in enumerate(self.optimizers()):
            state[f"optim{i}"] = o.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for i, m in enumerate(self.modules()):
            m.load_state_dict(state[f"module{i}"])
        for i, o in enumerate(self.optimizers()):
            o.load_state_dict(state[f"optim{i}"])


Evaluator = Callable[[nn.Module], dict[str, float]]


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` picks CUDA when available, else the CPU."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was asked for but no CUDA device is available")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise ConfigError(f"unknown device {device!r}; use auto, cpu or cuda")
    return torch.device(device)


def _lr_lambda(config: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    total = config.epochs * steps_per_epoch
    warm = int(round(config.warmup_epochs * steps_per_epoch))

    def f(step: int) -> float:
        if config.schedule == "constant":
            return 1.0
        if config.schedule == "step":
            return 0.01 if step >= 0.75 * total else 0.1 if step >= 0.5 * total else 1.0
        if config.schedule == "anneal":
            start = total - config.anneal_fraction * total
            if step < start:
                return 1.0
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - start) / max(1.0, total - start))))
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, total - warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


class Trainer:
    """Train a classifier on an in-memory dataset.

    Args:
        model: the classifier (a :class:`veil.models.Classifier` or any module whose
            ``features``/``classify`` split exists; plain modules are used through ``forward``).
        train: the (possibly poisoned) training set.
        config: hyperparameters.
        hooks: training hooks (attacks that change training).
        evaluate: called with the model in eval mode after every ``eval_every``-th epoch and after
            the last one; returns metrics, which go into that epoch's history record.
        eval_every: epochs between evaluations (1: every epoch; 0: after the last epoch only).
        checkpoint: path of the resumable checkpoint (``None``: no checkpoints).
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or a :class:`torch.device`.
        progress: show a progress bar.

    Example:
        >>> trainer = Trainer(model, poisoned_train, TrainConfig(epochs=4), evaluate=evaluator)
        >>> history = trainer.fit()  # doctest: +SKIP
    """

    def __init__(
        self,
        model: nn.Module,
        train: ImageDataset,
        config: TrainConfig,
        hooks: Sequence[TrainHook] = (),
        evaluate: Evaluator | None = None,
        checkpoint: str | Path | None = None,
        device: str | torch.device = "auto",
        progress: bool = True,
        eval_every: int = 1,
    ) -> None:
        if eval_every < 0:
            raise ConfigError(f"eval_every must be 0 or more epochs, got {eval_every}")
        self.eval_every = eval_every
        self.config = config
        self.device = resolve_device(device)
        self.model = model.to(self.device)
        self.channels_last = config.channels_last
        if self.channels_last:
            self.model = self._to_channels_last(self.model)
        self.train_data = train
        self.images = train.images.to(self.device)
        self.labels = train.labels.to(self.device)
        self.hooks = list(hooks)
        self.evaluate = evaluate
        self.checkpoint_path = Path(checkpoint) if checkpoint is not None else None
        self.progress = progress
        self.augment = BatchAugment(padding=CROP_PADDING, hflip=train.hflip) if config.augment else None
        self.steps_per_epoch = math.ceil(len(train) / config.batch_size)
        for h in self.hooks:
            for m in h.modules():
                m.to(self.device)
        self.optimizer: torch.optim.Optimizer
        if config.optimizer == "adam":
            self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        else:
            self.optimizer = torch.optim.SGD(
                self.model.parameters(),
                lr=config.lr,
                momentum=config.momentum,
                weight_decay=config.weight_decay,
                nesterov=config.momentum > 0,
            )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_lambda(config, self.steps_per_epoch))
        self.use_amp = config.amp and self.device.type == "cuda"
        self.history: list[dict[str, Any]] = []
        self.epoch = 0  # next epoch to run
        self.step_in_epoch = 0  # next step inside that epoch
        self.global_step = 0
        self._aug_gen = torch.Generator()
        self._epoch_loss = 0.0
        self._epoch_correct = 0
        self._epoch_seen = 0
        self._epoch_time = 0.0
        self.stop_after_steps: int | None = None  # for tests: simulate a killed run

    def _to_channels_last(self, module: nn.Module) -> nn.Module:
        if self.device.type == "cpu":
            safe_pointwise_convs(module)
        return module.to(memory_format=torch.channels_last)

    # ------------------------------------------------------------------ what hooks see
    def context(self, epoch: int | None = None) -> StepContext:
        """The :class:`StepContext` of the current step."""
        return StepContext(
            step=self.global_step,
            epoch=self.epoch if epoch is None else epoch,
            step_in_epoch=self.step_in_epoch,
            steps_per_epoch=self.steps_per_epoch,
            epochs=self.config.epochs,
            lr_factor=self.optimizer.param_groups[0]["lr"] / self.config.lr,
            device=self.device,
            autocast=self.use_amp,
            label_smoothing=self.config.label_smoothing,
            model=self.model,
            train_data=self.train_data,
            images=self.images,
            labels=self.labels,
            forward=self._forward,
        )

    # ------------------------------------------------------------------ model split
    def _forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        m = self.model
        if hasattr(m, "features") and hasattr(m, "classify"):
            f = m.features(x)  # type: ignore[operator]
            return f, m.classify(f)  # type: ignore[operator]
        logits = m(x)
        return logits, logits

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "format": "veil-checkpoint-1",
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "aug_rng": self._aug_gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "history": self.history,
            "epoch_acc": [self._epoch_loss, float(self._epoch_correct), float(self._epoch_seen), self._epoch_time],
            "hooks": [h.state_dict() for h in self.hooks],
            "config": asdict(self.config),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        try:
            if state.get("format") != "veil-checkpoint-1":
                raise KeyError("format")
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.epoch = int(state["epoch"])
            self.step_in_epoch = int(state["step_in_epoch"])
            self.global_step = int(state["global_step"])
            self._aug_gen.set_state(state["aug_rng"])
            torch.set_rng_state(state["torch_rng"])
            if state["cuda_rng"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(state["cuda_rng"])
            self.history = list(state["history"])
            loss, correct, seen, t = state["epoch_acc"]
            self._epoch_loss, self._epoch_correct, self._epoch_seen, self._epoch_time = loss, int(correct), int(seen), t
            for h, hs in zip(self.hooks, state["hooks"], strict=True):
                h.load_state_dict(hs)
        except (KeyError, ValueError, RuntimeError, TypeError) as exc:
            raise CheckpointError(f"checkpoint does not match this run ({type(exc).__name__}: {exc})") from exc

    def save_checkpoint(self) -> None:
        if self.checkpoint_path is not None:
            atomic_torch_save(self.checkpoint_path, self.state_dict())

    def maybe_resume(self) -> bool:
        """Load the checkpoint if one exists; returns whether training resumes."""
        if self.checkpoint_path is None or not self.checkpoint_path.is_file():
            return False
        state = load_checkpoint(self.checkpoint_path)
        self.load_state_dict(state)
        log.info("resuming from %s at epoch %d step %d", self.checkpoint_path, self.epoch + 1, self.step_in_epoch)
        return True

    # ------------------------------------------------------------------ training
    def _epoch_order(self, epoch: int) -> Tensor:
        g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.train_data), generator=g)

    def fit(self) -> list[dict[str, Any]]:
        """Train for the configured epochs (resuming from the checkpoint if there is one)."""
        self.maybe_resume()
        ctx = self.context()
        for h in self.hooks:
            h.setup(ctx)
        cfg = self.config
        while self.epoch < cfg.epochs:
            epoch = self.epoch
            if self.step_in_epoch == 0:
                self._aug_gen.manual_seed(cfg.seed * 7_919 + epoch + 1)
                self._epoch_loss, self._epoch_correct, self._epoch_seen, self._epoch_time = 0.0, 0, 0, 0.0
            ctx = self.context(epoch)
            for h in self.hooks:
                h.on_epoch_start(ctx)
            self.model.train()
            for h in self.hooks:
                for m in h.modules():
                    m.train()
            order = self._epoch_order(epoch).to(self.device)
            bar = tqdm(
                total=self.steps_per_epoch,
                initial=self.step_in_epoch,
                desc=f"epoch {epoch + 1}/{cfg.epochs}",
                unit="step",
                leave=False,
                disable=not self.progress or None,
            )
            t0 = time.perf_counter()
            while self.step_in_epoch < self.steps_per_epoch:
                s = self.step_in_epoch
                idx = order[s * cfg.batch_size : (s + 1) * cfg.batch_size]
                loss, correct, n = self._step(idx, epoch)
                self._epoch_loss += loss * n
                self._epoch_correct += correct
                self._epoch_seen += n
                self.step_in_epoch += 1
                self.global_step += 1
                bar.update(1)
                if self._epoch_seen:
                    bar.set_postfix(loss=f"{self._epoch_loss / self._epoch_seen:.3f}", acc=f"{self._epoch_correct / self._epoch_seen:.3f}")
                if self.stop_after_steps is not None and self.global_step >= self.stop_after_steps:
                    self._epoch_time += time.perf_counter() - t0
                    self.save_checkpoint()
                    bar.close()
                    raise KeyboardInterrupt("stop_after_steps reached")
                if cfg.checkpoint_every and self.step_in_epoch % cfg.checkpoint_every == 0 and self.step_in_epoch < self.steps_per_epoch:
                    self._epoch_time += time.perf_counter() - t0
                    t0 = time.perf_counter()
                    self.save_checkpoint()
            bar.close()
            self._epoch_time += time.perf_counter() - t0
            record: dict[str, Any] = {
                "epoch": epoch + 1,
                "loss": self._epoch_loss / max(1, self._epoch_seen),
                "train_accuracy": self._epoch_correct / max(1, self._epoch_seen),
                "lr": self.optimizer.param_groups[0]["lr"],
                "seconds": self._epoch_time,
            }
            ctx = self.context(epoch)
            for h in self.hooks:
                record.update(h.on_epoch_end(ctx))
            last = epoch + 1 == cfg.epochs
            if self.evaluate is not None and (last or (self.eval_every and (epoch + 1) % self.eval_every == 0)):
                self.model.eval()
                t_eval = time.perf_counter()
                with torch.no_grad():
                    record.update(self.evaluate(self.model))
                record["eval_seconds"] = time.perf_counter() - t_eval
            self.history.append(record)
            log.info(
                "epoch %d/%d: %s",
                epoch + 1,
                cfg.epochs,
                ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items() if k != "epoch"),
            )
            self.epoch += 1
            self.step_in_epoch = 0
            self.save_checkpoint()
        self.model.eval()
        return self.history

    def _step(self, idx: Tensor, epoch: int) -> tuple[float, int, int]:
        cfg = self.config
        ctx = self.context(epoch)
        x = to_float(self.images[idx])
        batch = Batch(x=x, y=self.labels[idx], index=idx, step=self.global_step, epoch=epoch)
        for h in self.hooks:
            batch = h.transform_batch(ctx, batch)
        if self.augment is not None:
            batch.x = self.augment(batch.x, self._aug_gen)
        if self.channels_last:
            batch.x = batch.x.contiguous(memory_format=torch.channels_last)
        train_clf = all(h.train_classifier(ctx, batch) for h in self.hooks)
        self.optimizer.zero_grad(set_to_none=True)
        for h in self.hooks:
            for o in h.optimizers():
                o.zero_grad(set_to_none=True)
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.use_amp):
            features, logits = self._forward(batch.x)
            owned = [(h, v) for h in self.hooks if (v := h.batch_loss(ctx, batch, features, logits)) is not None]
            if len(owned) > 1:
                names = ", ".join(type(h).__name__ for h, _ in owned)
                raise ConfigError(f"more than one training hook owns the batch's loss ({names}); at most one may")
            if owned:
                loss = owned[0][1]
            else:
                loss = F.cross_entropy(logits.float(), batch.y, label_smoothing=cfg.label_smoothing)
            for h in self.hooks:
                extra = h.extra_loss(ctx, batch, features, logits)
                if extra is not None:
                    loss = loss + extra
        if not torch.isfinite(loss):
            raise TrainingDiverged(f"training loss became {loss.item()} at step {self.global_step}; lower the learning rate")
        loss.backward()
        if train_clf:
            self.optimizer.step()
        for h in self.hooks:
            for o in h.optimizers():
                o.step()
        self.scheduler.step()
        for h in self.hooks:
            h.after_step(ctx, batch)
        with torch.no_grad():
            correct = int((logits.argmax(1) == batch.y).sum())
        return float(loss.detach()), correct, int(batch.y.numel())


def _subsample_input(conv: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    sh, sw = conv._veil_subsample  # type: ignore[attr-defined]
    return (args[0][:, :, ::sh, ::sw], *args[1:])


def safe_pointwise_convs(module: nn.Module) -> nn.Module:
    """Run every strided, unpadded 1x1 ``Conv2d`` in ``module`` as a subsampling of its input
    followed by the same convolution at stride 1 (in place; returns ``module``).

    The result is the same, the parameters and ``state_dict`` are untouched, and a second call
    changes nothing. It works around torch's CPU channels-last backward of strided 1x1
    convolutions, which corrupts memory for some shapes (see :class:`TrainConfig`).
    """
    for m in module.modules():
        if (
            isinstance(m, nn.Conv2d)
            and m.kernel_size == (1, 1)
            and m.stride != (1, 1)
            and m.padding in ((0, 0), "valid")
            and not hasattr(m, "_veil_subsample")
        ):
            m._veil_subsample = tuple(m.stride)  # type: ignore[assignment]
            m.stride = (1, 1)
            m.register_forward_pre_hook(_subsample_input)
    return module


def predict(
    model: nn.Module,
    images: Tensor,
    batch_size: int = 512,
    device: str | torch.device | None = None,
    amp: bool = True,
) -> Tensor:
    """Predicted labels for uint8 (or float [0, 1]) images, in batches, in eval mode (bfloat16
    autocast on CUDA unless ``amp`` is False; the channels-last layout the trainer uses)."""
    if images.shape[0] == 0:
        return torch.empty(0, dtype=torch.long)
    return batched(model, images, lambda m, x: m(x).argmax(1), batch_size=batch_size, device=device, amp=amp, channels_last=True)
