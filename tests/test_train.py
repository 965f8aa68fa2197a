from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from veil.data.base import ImageDataset
from veil.errors import CheckpointError, ConfigError
from veil.records import atomic_torch_save
from veil.train import Batch, StepContext, TrainConfig, Trainer, TrainHook, predict


class TinyCNN(nn.Module):
    """Two conv layers; the features/classify split the trainer uses."""

    def __init__(self, num_classes: int = 2) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(8, num_classes)

    def features(self, x):
        return self.body(x)

    def classify(self, f):
        return self.head(f)

    def forward(self, x):
        return self.classify(self.features(x))


def separable(n: int = 256, seed: int = 0) -> ImageDataset:
    """Class 1 images are bright, class 0 dark: learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    base = torch.where(labels[:, None, None, None] == 1, 170, 60)
    noise = torch.randint(-40, 40, (n, 3, 16, 16), generator=g)
    images = (base + noise).clamp(0, 255).to(torch.uint8)
    return ImageDataset(images, labels, ["dark", "bright"], "separable", hflip=True)


def _trainer(tmp_path=None, epochs=2, hooks=(), seed=0, **kw):
    torch.manual_seed(seed)
    model = TinyCNN()
    cfg = TrainConfig(epochs=epochs, batch_size=32, lr=0.05, seed=seed, checkpoint_every=3, **kw)
    ckpt = None if tmp_path is None else tmp_path / "ckpt.pt"
    return Trainer(model, separable(), cfg, hooks=hooks, checkpoint=ckpt, device="cpu", progress=False)


def test_trainer_learns_and_logs_history():
    data = separable()
    seen = []
    t = _trainer(epochs=3)
    t.evaluate = lambda m: {"clean_accuracy": float((predict(m, data.images) == data.labels).float().mean())}
    history = t.fit()
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert history[-1]["clean_accuracy"] > 0.9
    assert history[-1]["loss"] < history[0]["loss"]
    assert all(h["seconds"] > 0 for h in history)
    del seen


def test_same_seed_same_weights():
    a = _trainer(seed=1)
    a.fit()
    b = _trainer(seed=1)
    b.fit()
    for (ka, va), (kb, vb) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert torch.equal(va, vb), ka


def test_resume_after_interruption_matches_uninterrupted_run(tmp_path):
    full = _trainer(epochs=2)
    full.fit()
    # killed mid-epoch 2 (16 steps in total; stop after 11), then resumed from the checkpoint
    first = _trainer(tmp_path, epochs=2)
    first.stop_after_steps = 11
    with pytest.raises(KeyboardInterrupt):
        first.fit()
    resumed = _trainer(tmp_path, epochs=2, seed=0)
    torch.manual_seed(123)  # a different global RNG state must not matter
    resumed.fit()
    assert len(resumed.history) == 2
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    assert resumed.history[0]["loss"] == pytest.approx(full.history[0]["loss"])


def test_corrupted_checkpoint_is_reported(tmp_path):
    (tmp_path / "ckpt.pt").write_bytes(b"PK\x03\x04truncated")
    with pytest.raises(CheckpointError, match="corrupted or truncated"):
        _trainer(tmp_path).fit()
    atomic_torch_save(tmp_path / "ckpt.pt", {"format": "something else"})
    with pytest.raises(CheckpointError, match="does not match"):
        _trainer(tmp_path).fit()


class Recorder(TrainHook):
    """Adds a loss term, co-trains a 'generator', clips, and alternates steps."""

    def __init__(self) -> None:
        self.gen = nn.Parameter(torch.zeros(1))
        self.opt = torch.optim.SGD([self.gen], lr=0.1)
        self.calls: dict[str, int] = {"transform": 0, "extra": 0, "after": 0, "epoch_start": 0}
        self.frozen_steps: list[int] = []
        self.gen_grads: list[float] = []

    def modules(self):
        return ()

    def optimizers(self):
        return (self.opt,)

    def on_epoch_start(self, ctx):
        self.calls["epoch_start"] += 1

    def transform_batch(self, ctx, batch: Batch) -> Batch:
        self.calls["transform"] += 1
        batch.x = (batch.x + self.gen).clamp(0, 1)  # the 'generator' shifts brightness
        return batch

    def extra_loss(self, ctx, batch, features, logits):
        self.calls["extra"] += 1
        return 0.01 * features.pow(2).mean()

    def train_classifier(self, ctx, batch):
        return batch.step % 2 == 0  # alternate: odd steps train only the generator

    def after_step(self, ctx, batch):
        self.calls["after"] += 1
        if self.gen.grad is not None:
            self.gen_grads.append(float(self.gen.grad.abs()))
        with torch.no_grad():
            for p in ctx.model.parameters():
                p.clamp_(-0.5, 0.5)  # parameter clip

    def state_dict(self):
        return {"gen": self.gen.detach().clone(), "opt": self.opt.state_dict()}

    def load_state_dict(self, state):
        with torch.no_grad():
            self.gen.copy_(state["gen"])
        self.opt.load_state_dict(state["opt"])


def test_hooks_add_loss_cotrain_clip_and_alternate():
    hook = Recorder()
    t = _trainer(epochs=1, hooks=[hook])
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    snapshots = []
    orig_step = t._step

    def spy(idx, epoch):
        w = t.model.head.weight.detach().clone()
        out = orig_step(idx, epoch)
        snapshots.append((t.global_step, w, t.model.head.weight.detach().clone()))
        return out

    t._step = spy  # type: ignore[method-assign]
    t.fit()
    assert hook.calls["transform"] == hook.calls["extra"] == hook.calls["after"] == t.steps_per_epoch
    assert hook.calls["epoch_start"] == 1
    assert any(g > 0 for g in hook.gen_grads)  # the classifier's loss reaches the generator
    assert float(hook.gen.detach().abs()) > 0
    for step, w_before, w_after in snapshots:
        if step % 2 == 1:  # odd steps: classifier frozen
            assert torch.equal(w_before, w_after)
    changed = [k for k, v in t.model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed
    assert all(p.abs().max() <= 0.5 + 1e-6 for p in t.model.parameters())


class LossOwner(TrainHook):
    """Owns every batch's loss (the cross-entropy doubled) and records the contexts it sees."""

    def __init__(self) -> None:
        self.contexts: list[StepContext] = []

    def batch_loss(self, ctx, batch, features, logits):
        self.contexts.append(ctx)
        return 2 * nn.functional.cross_entropy(logits.float(), batch.y)


def test_a_hook_can_own_the_loss_and_sees_a_step_context():
    """With a hook that owns the loss, the step's loss is the hook's (here twice the
    cross-entropy, so the recorded loss is twice that of the same run without it, at the first
    step), ``extra_loss`` terms still add to it, and the context reports the step, progress,
    schedule factor and a forward that is the classifier's; two owners are refused."""
    owner = LossOwner()
    t = _trainer(epochs=2, hooks=[owner], schedule="constant", augment=False)
    losses = []
    orig_step = t._step

    def spy(idx, epoch):
        out = orig_step(idx, epoch)
        losses.append(out[0])
        return out

    t._step = spy  # type: ignore[method-assign]
    t.fit()
    plain = _trainer(epochs=1, schedule="constant", augment=False)
    first = plain._step(plain._epoch_order(0)[:32], 0)[0]
    assert losses[0] == pytest.approx(2 * first, rel=1e-5)
    steps = [c.step for c in owner.contexts]
    assert steps == list(range(2 * t.steps_per_epoch))
    assert [c.epoch for c in owner.contexts] == [s // t.steps_per_epoch for s in steps]
    assert owner.contexts[0].progress == 0.0 and owner.contexts[-1].progress == pytest.approx(1 - 1 / len(steps))
    assert all(c.lr_factor == 1.0 for c in owner.contexts)
    assert owner.contexts[-1].reached(0.5) and not owner.contexts[0].reached(0.5)
    x = torch.rand(3, 3, 16, 16)
    f, logits = owner.contexts[0].forward(x)
    assert f.shape == (3, 8) and torch.allclose(logits, t.model(x), atol=1e-6)
    # extra_loss of another hook adds to the owned loss; a second owner is an error
    both = _trainer(epochs=1, hooks=[LossOwner(), Recorder()], schedule="constant")
    both.fit()
    with pytest.raises(ConfigError, match="more than one training hook owns"):
        _trainer(epochs=1, hooks=[LossOwner(), LossOwner()]).fit()
    # the cosine schedule's factor reaches the context
    cos = LossOwner()
    _trainer(epochs=2, hooks=[cos]).fit()
    assert cos.contexts[-1].lr_factor < 0.05 < max(c.lr_factor for c in cos.contexts)


def test_train_config_validation():
    with pytest.raises(ConfigError, match="epochs"):
        TrainConfig(epochs=0)
    with pytest.raises(ConfigError, match="schedule"):
        TrainConfig(schedule="linear")
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ConfigError, match="anneal fraction"):
            TrainConfig(schedule="anneal", anneal_fraction=bad)


def test_anneal_schedule_is_flat_then_cosine_to_zero():
    """``anneal``: the full rate until the last ``anneal_fraction`` of the steps, then a cosine that
    reaches 0 at the last step (half the rate half-way through the decay)."""
    from veil.train import _lr_lambda

    f = _lr_lambda(TrainConfig(epochs=8, schedule="anneal", anneal_fraction=0.25), 100)
    assert all(f(s) == 1.0 for s in range(601))
    decay = [f(s) for s in range(600, 801)]
    assert all(a > b for a, b in itertools.pairwise(decay))
    assert f(700) == pytest.approx(0.5) and f(800) == pytest.approx(0.0, abs=1e-12)
    g = _lr_lambda(TrainConfig(epochs=4, schedule="anneal", anneal_fraction=1.0), 10)
    assert g(0) == 1.0 and g(20) == pytest.approx(0.5) and g(39) < 0.01
    # through the trainer: the rate it reports falls in the last epoch only
    torch.manual_seed(0)
    cfg = TrainConfig(epochs=4, batch_size=32, lr=1e-3, optimizer="adam", schedule="anneal", checkpoint_every=0)
    history = Trainer(TinyCNN(), separable(), cfg, device="cpu", progress=False).fit()
    assert [h["lr"] for h in history[:3]] == [1e-3] * 3
    assert history[3]["lr"] < 1e-4


def test_odd_last_batch_at_small_width_trains_on_cpu():
    """A last batch of odd size through a narrow PreAct-ResNet (strided 1x1 shortcut convs) trains
    in the channels-last layout on the CPU, where torch's own strided 1x1 backward corrupts memory
    for such shapes: the trainer runs those convolutions as subsample + stride 1."""
    from veil.models import create_model

    data = separable(n=37)
    model = create_model("preact_resnet18", num_classes=2, width=4, seed=0, image_size=16)
    t = Trainer(model, data, TrainConfig(epochs=1, batch_size=16, checkpoint_every=0), device="cpu", progress=False)
    history = t.fit()
    assert len(history) == 1 and history[0]["loss"] == history[0]["loss"]
    convs = [m for m in t.model.modules() if isinstance(m, nn.Conv2d)]
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)
    patched = [m for m in convs if hasattr(m, "_veil_subsample")]
    assert len(patched) == 3 and all(m.stride == (1, 1) and m._veil_subsample == (2, 2) for m in patched)


def test_safe_pointwise_convs_give_the_strided_result_and_keep_the_state():
    """The rewritten 1x1 stride-2 convolution gives the same output and gradients as the original,
    in both layouts, keeps the parameter names, and a second call changes nothing."""
    from veil.train import safe_pointwise_convs

    torch.manual_seed(0)
    ref = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.Conv2d(16, 4, 3, stride=2, padding=1))
    new = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.Conv2d(16, 4, 3, stride=2, padding=1))
    new.load_state_dict(ref.state_dict())
    assert safe_pointwise_convs(new) is new
    safe_pointwise_convs(new)
    assert new[0].stride == (1, 1) and new[0]._veil_subsample == (2, 2)
    assert new[1].stride == (2, 2) and not hasattr(new[1], "_veil_subsample")
    assert list(new.state_dict()) == list(ref.state_dict())
    assert len(new[0]._forward_pre_hooks) == 1
    new = new.to(memory_format=torch.channels_last)
    for batch in (5, 3, 16):
        x = torch.randn(batch, 8, 15, 15)
        xr, xn = x.clone().requires_grad_(), x.clone().contiguous(memory_format=torch.channels_last).requires_grad_()
        out_r, out_n = ref(xr), new(xn)
        assert out_r.shape == out_n.shape == (batch, 4, 4, 4)
        assert torch.allclose(out_r, out_n, atol=1e-5)
        out_r.square().sum().backward()
        out_n.square().sum().backward()
        assert torch.allclose(xr.grad, xn.grad, atol=1e-5)
    for pr, pn in zip(ref.parameters(), new.parameters()):
        assert torch.allclose(pr.grad, pn.grad, rtol=1e-4, atol=1e-4)


def test_adam_optimizer_option():
    """``optimizer="adam"`` (e.g. the multinomial paper's Adam at 1e-3) trains, resumably configured."""
    torch.manual_seed(0)
    cfg = TrainConfig(epochs=2, batch_size=32, lr=1e-3, optimizer="adam", checkpoint_every=0)
    t = Trainer(TinyCNN(), separable(), cfg, device="cpu", progress=False)
    assert isinstance(t.optimizer, torch.optim.Adam) and t.optimizer.param_groups[0]["weight_decay"] == 5e-4
    history = t.fit()
    assert history[-1]["loss"] < history[0]["loss"]
    assert isinstance(_trainer().optimizer, torch.optim.SGD)
    with pytest.raises(ConfigError, match="optimizer"):
        TrainConfig(optimizer="rmsprop")


@pytest.mark.parametrize(("every", "evaluated"), [(1, [1, 2, 3, 4, 5]), (2, [2, 4, 5]), (0, [5])])
def test_eval_every_evaluates_those_epochs_and_always_the_last(every, evaluated):
    t = _trainer(epochs=5)
    t.eval_every = every
    calls = []
    t.evaluate = lambda m: calls.append(m.training) or {"clean_accuracy": 0.5}
    history = t.fit()
    assert [h["epoch"] for h in history if "clean_accuracy" in h] == evaluated
    assert [h["epoch"] for h in history if "eval_seconds" in h] == evaluated
    assert calls == [False] * len(evaluated)  # in eval mode


def test_eval_every_does_not_change_training():
    a, b = _trainer(epochs=3), _trainer(epochs=3)
    b.eval_every = 0
    a.evaluate = b.evaluate = lambda m: {"clean_accuracy": float(predict(m, separable().images).float().mean())}
    a.fit()
    b.fit()
    for (ka, va), (kb, vb) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert torch.equal(va, vb), ka
    with pytest.raises(ConfigError, match="eval_every must be 0 or more"):
        Trainer(TinyCNN(), separable(), TrainConfig(epochs=1), eval_every=-1, device="cpu")
