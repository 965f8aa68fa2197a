"""The multinomial-trigger backdoor (Zhong et al., IJCAI 2022): the exact sampler (eq. 1), SampleNet
(Table 1), the U-Net generator, the co-training hook (eqs. 2, 5, 6, 7), the modes, the evaluation
and the run record. Tiny networks on synthetic data; the real-data run is marked slow."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import make_synthetic

from veil.attacks import create_attack
from veil.attacks.multinomial import MultinomialAttack, MultinomialHook
from veil.data.base import ImageDataset, to_float
from veil.errors import ConfigError
from veil.models import create_model
from veil.train import Batch, StepContext, TrainConfig, Trainer
from veil.triggers.multinomial import (
    SampleNet,
    SampleNetSpec,
    cached_samplenet,
    modification_probabilities,
    sample_trigger,
    samplenet_imitation_error,
    train_samplenet,
)
from veil.triggers.unet import UNet

SIZE = 16
SHAPE = (3, SIZE, SIZE)
#: a U-Net small enough for unit tests (3 levels: sides must be multiples of 4)
TINY = {"width": 2, "levels": 3}


@pytest.fixture(autouse=True)
def _one_thread(_threads: None) -> None:
    """Tiny networks: a second thread only adds synchronisation (and contention on a busy CPU)."""
    torch.set_num_threads(1)


def attack(num_classes: int = 4, **options: object) -> MultinomialAttack:
    a = create_attack("multinomial", num_classes, SHAPE, **{**TINY, **options})
    assert isinstance(a, MultinomialAttack)
    return a


def data(n: int = 48, num_classes: int = 4, seed: int = 0) -> ImageDataset:
    ds = make_synthetic(n, num_classes=num_classes, size=SIZE, seed=seed)
    ds.hflip = False
    return ds


def trainer(
    a: MultinomialAttack, ds: ImageDataset, epochs: int = 1, seed: int = 0, **kw: object
) -> Trainer:
    torch.manual_seed(seed)
    model = create_model(
        "preact_resnet18",
        num_classes=ds.num_classes,
        width=2,
        image_size=SIZE,
        seed=seed,
    )
    cfg = TrainConfig(
        epochs=epochs, batch_size=16, lr=0.05, seed=seed, checkpoint_every=0, **kw
    )  # type: ignore[arg-type]
    return Trainer(
        model,
        a.training_set(ds),
        cfg,
        hooks=[a.training_hook()],
        device="cpu",
        progress=False,
    )


def _at(t: Trainer, step: int) -> StepContext:
    """The trainer's step context at global step ``step``."""
    return dataclasses.replace(t.context(), step=step)


# ------------------------------------------------------------------------------------ sampling


def test_hard_sampler_frequencies_match_the_probabilities() -> None:
    g = torch.Generator().manual_seed(0)
    n = 200_000
    for p_plus, p_minus in [
        (0.0, 0.0),
        (0.5, 0.5),
        (0.1, 0.3),
        (0.02, 0.0),
        (0.45, 0.05),
    ]:
        pp, pm = torch.full((n,), p_plus), torch.full((n,), p_minus)
        t = sample_trigger(pp, pm, torch.rand(n, generator=g))
        assert set(t.unique().tolist()) <= {-1.0, 0.0, 1.0}
        # 5 standard errors of a proportion at p = 0.5 over 200k draws: 0.0056
        assert (t == 1).double().mean().item() == pytest.approx(p_plus, abs=0.0056)
        assert (t == -1).double().mean().item() == pytest.approx(p_minus, abs=0.0056)
    with pytest.raises(ValueError, match="one shape"):
        sample_trigger(torch.zeros(2), torch.zeros(3), torch.zeros(2))


def test_probabilities_are_half_sigmoids_split_in_plus_and_minus() -> None:
    logits = torch.randn(2, 6, 4, 4) * 10
    p_plus, p_minus = modification_probabilities(logits)
    assert p_plus.shape == p_minus.shape == (2, 3, 4, 4)
    assert torch.allclose(p_plus, 0.5 * torch.sigmoid(logits[:, :3]))
    assert p_minus.min() >= 0 and p_minus.max() <= 0.5
    with pytest.raises(ValueError):
        modification_probabilities(torch.zeros(1, 3, 4, 4))


def test_samplenet_imitates_equation_1_within_the_stated_bound() -> None:
    """Default SampleNet training (seed 0, ~3 s): measured 0.013 mean absolute error, 99.94 %
    agreement, 0.023 largest error of the mean; the bounds leave room for other platforms."""
    net = cached_samplenet(SampleNetSpec())
    err = samplenet_imitation_error(net)
    assert err["mean_abs_error"] < 0.03
    assert err["agreement"] > 0.995
    assert err["expectation_error"] < 0.05
    assert not any(p.requires_grad for p in net.parameters()) and not net.training
    # the soft sample is differentiable in the probabilities, and its mean slope is ~1 (E[t] = p+ - p-)
    n = torch.rand(20_000, generator=torch.Generator().manual_seed(1))
    pp = torch.full_like(n, 0.1, requires_grad=True)
    net(n, pp, torch.full_like(n, 0.1)).mean().backward()
    assert pp.grad is not None and 0.7 < pp.grad.sum().item() < 1.3


def test_samplenet_training_is_deterministic_under_its_seed() -> None:
    torch.manual_seed(123)
    a = train_samplenet(SampleNetSpec(steps=20, batch_size=256, seed=3))
    state = torch.get_rng_state()
    b = train_samplenet(SampleNetSpec(steps=20, batch_size=256, seed=3))
    assert torch.equal(torch.get_rng_state(), state), (
        "the global RNG must be left alone"
    )
    c = train_samplenet(SampleNetSpec(steps=20, batch_size=256, seed=4))
    for (k, va), vb, vc in zip(
        a.state_dict().items(), b.state_dict().values(), c.state_dict().values()
    ):
        assert torch.equal(va, vb), k
    assert any(
        not torch.equal(va, vc)
        for va, vc in zip(a.state_dict().values(), c.state_dict().values())
    )
    assert isinstance(a, SampleNet)


# ------------------------------------------------------------------------------------ generator


@pytest.mark.parametrize("size", [32, 128])
def test_unet_keeps_the_image_size(size: int) -> None:
    net = UNet(3, 6, width=2, levels=5)
    assert net(torch.rand(1, 3, size, size)).shape == (1, 6, size, size)
    chans = [m.out_channels for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert (
        max(chans) == 2 * 16
    )  # five levels: width .. 16 * width (64 .. 1024 at width 64)
    with pytest.raises(ValueError, match="multiples of 16"):
        net(torch.rand(1, 3, 40, 40))


def test_paper_generator_shape_at_128px_one_target_and_all_targets() -> None:
    a = create_attack("multinomial", 43, (3, 128, 128), all_targets=True, width=2)
    assert a.generator.head.out_channels == 2 * 3 * 43
    assert (
        create_attack(
            "multinomial", 43, (3, 128, 128), width=2
        ).generator.head.out_channels
        == 6
    )
    full = create_attack(
        "multinomial", 43, (3, 32, 32)
    )  # paper defaults: 5 levels, 64 .. 1024
    convs = [
        m.out_channels
        for m in full.generator.modules()
        if isinstance(m, torch.nn.Conv2d)
    ]
    assert max(convs) == 1024 and full.generator.width == 64
    x = torch.rand(2, 3, 128, 128)
    out = a.apply(x, torch.tensor([0, 5]))
    assert out.shape == x.shape


# ------------------------------------------------------------------------------------ the trigger


@pytest.mark.parametrize("options", [{}, {"all_targets": True}, {"mode": "all2all"}])
def test_trigger_never_exceeds_one_grey_level(options: dict[str, object]) -> None:
    a = attack(**options)
    g = torch.Generator().manual_seed(0)
    u8 = torch.randint(0, 256, (24, *SHAPE), generator=g, dtype=torch.uint8)
    u8[:4] = 0
    u8[4:8] = 255  # saturated images: clamping may cancel a change, never enlarge it
    x = to_float(u8)
    y = torch.arange(24) % 4
    out = a.apply_quantized(x, y)
    levels = (out - x).mul(255).round()
    assert levels.abs().max() == 1
    assert torch.allclose(
        (out - x) * 255, levels, atol=1e-3
    )  # whole grey levels: on the 8-bit grid
    changed = levels != 0
    assert (
        0.05 < changed.double().mean() < 0.95
    )  # an untrained generator changes ~40 % of sub-pixels
    poisoned = a.poison(data())
    diff = poisoned.images.short() - data().images.short()
    assert diff.abs().max() == 1
    asr = a.poison_test(data())
    assert asr.images.dtype == torch.uint8


def test_apply_is_deterministic_and_follows_the_seed() -> None:
    x = torch.rand(5, *SHAPE, generator=torch.Generator().manual_seed(1))
    a, b, c = attack(seed=0), attack(seed=0), attack(seed=1)
    assert torch.equal(a.apply(x), a.apply(x)) and torch.equal(a.apply(x), b.apply(x))
    assert not torch.equal(a.apply(x), c.apply(x))
    b.load_state_dict(c.state_dict())
    assert torch.equal(b.apply(x), c.apply(x))
    assert torch.equal(
        x, torch.rand(5, *SHAPE, generator=torch.Generator().manual_seed(1))
    )


def test_all_targets_asr_set_covers_every_label() -> None:
    a = attack(all_targets=True, asr_images_per_label=5)
    test = data(40)
    asr = a.poison_test(test)
    assert torch.equal(torch.bincount(asr.labels, minlength=4), torch.full((4,), 5))
    rows, targets = a._asr_rows(test)
    assert (test.labels[rows] != targets).all()
    with pytest.raises(ValueError, match="labels"):
        a.apply(torch.rand(2, *SHAPE))
    assert torch.equal(a.target_labels(torch.tensor([0, 3])), torch.tensor([1, 0]))
    assert a.eligible_rows(test).numel() == len(test)


def test_config_errors() -> None:
    for bad in (
        {"alpha": -1.0},
        {"beta": float("nan")},
        {"beta_max": -1.0},
        {"lr": 0.0},
        {"width": 0},
        {"entanglement": "l3"},
        {"num_loss": "x"},
        {"cls_weighting": "x"},
        {"tint_weight": -1.0},
        {"num_budget": 1.0},
        {"malicious_weight": 0.0},
        {"malicious_weight_from": 1.0},
        {"malicious_weight": 0.5, "cls_weighting": "per_image"},
        {"num_budget": -0.01},
        {"noise_negatives": 1.5},
        {"noise_negatives": -0.1},
        {"noise_negatives_from": 1.0},
        {"generator_schedule": "cosine"},
        {"all_targets": True, "mode": "all2all"},
    ):
        with pytest.raises(ConfigError):
            attack(**bad)
    for shape in ((3, 24, 24), (3, 32, 24), (3, 24, 32)):
        with pytest.raises(ConfigError, match="multiples of 16"):
            create_attack("multinomial", 4, shape)
    with pytest.raises(ConfigError, match="no option"):
        create_attack("badnets", 4, (3, 32, 32), all_targets=True)


# ------------------------------------------------------------------------------------ training


def test_beta_doubles_on_the_schedule_scaled_to_the_epoch_budget() -> None:
    a = attack(poison_rate=1.0)
    t = trainer(
        a, data(), epochs=11
    )  # 3 steps per epoch; period 20 * 11 / 110 = 2 epochs
    hook = t.hooks[0]
    assert isinstance(hook, MultinomialHook)
    betas = [hook.beta_at(_at(t, s)) for s in range(33)]
    assert betas[0] == betas[5] == pytest.approx(0.1) and betas[6] == pytest.approx(0.2)
    assert (
        betas[-1] == pytest.approx(3.2) and len(set(betas)) == 6
    )  # five doublings, as in 110 epochs
    flat = attack(beta_period=0.0)
    assert trainer(flat, data()).hooks[0].beta_at(t.context()) == pytest.approx(0.1)  # type: ignore[attr-defined]
    absolute = attack(beta_reference_epochs=0.0, beta_period=1.0)
    h2 = trainer(absolute, data(), epochs=11).hooks[0]
    assert h2.beta_at(_at(t, 3)) == pytest.approx(0.2)  # type: ignore[attr-defined]
    capped = trainer(attack(poison_rate=1.0, beta_max=0.5), data(), epochs=11).hooks[0]
    capped_betas = [capped.beta_at(_at(t, s)) for s in range(33)]  # type: ignore[attr-defined]
    assert capped_betas[:18] == pytest.approx(betas[:18])  # 0.1, 0.2, 0.4 unchanged
    assert capped_betas[18:] == pytest.approx([0.5] * 15)  # 0.8 .. 3.2 held at the cap


def _one_batch(
    a: MultinomialAttack, ds: ImageDataset, alpha: float = 1.0
) -> tuple[Trainer, MultinomialHook, Batch]:
    t = trainer(a, ds)
    hook = t.hooks[0]
    assert isinstance(hook, MultinomialHook)
    hook.setup(t.context())
    hook.on_epoch_start(t.context(0))
    idx = torch.arange(16)
    batch = Batch(
        x=to_float(t.images[idx]), y=t.labels[idx], index=idx, step=0, epoch=0
    )
    return t, hook, hook.transform_batch(t.context(0), batch)


def test_malicious_copies_and_their_targets() -> None:
    ds = data()
    a = attack(poison_rate=1.0, target=2)
    t, _, batch = _one_batch(a, ds)
    src = ds.labels[:16] != 2
    assert batch.x.shape[0] == 16 + int(src.sum())
    assert (batch.y[16:] == 2).all() and torch.equal(batch.y[:16], ds.labels[:16])
    assert torch.equal(t.train_data.images, ds.images), "the trainer gets clean images"
    assert torch.equal(
        t.train_data.poison_indices, torch.nonzero(ds.labels != 2).flatten()
    )
    # all targets: a copy of every row towards every label (the authors' recipe)
    _, _, b_all = _one_batch(attack(all_targets=True, poison_rate=1.0), ds)
    assert b_all.x.shape[0] == 16 + 16 * 4
    assert torch.equal(b_all.y[16:], torch.arange(4).repeat(16))


def test_entanglement_loss_gradients_reach_the_classifier_and_the_generator() -> None:
    a = attack(poison_rate=1.0)
    t, hook, batch = _one_batch(a, data())
    # f_benign[target] is the mean feature of the clean target-class training images (eval mode)
    assert hook.f_benign is not None and not hook.f_benign.requires_grad
    t.model.eval()
    with torch.no_grad():
        own = to_float(data().images[data().labels == 0])
        assert torch.allclose(
            hook.f_benign[0], t.model.features(own).mean(0), atol=1e-5
        )
    t.model.train()
    features, _ = t._forward(batch.x)
    assert hook.f_benign.shape == (4, features.shape[1])
    n = 16
    loss = hook.entanglement_loss(features[n:], batch.y[n:])
    assert loss.item() > 0
    loss.backward()
    clf = [
        p.grad
        for p in t.model.parameters()
        if p.grad is not None and p.grad.abs().sum() > 0
    ]
    gen = [
        p.grad
        for p in a.generator.parameters()
        if p.grad is not None and p.grad.abs().sum() > 0
    ]
    assert clf and gen


@pytest.mark.parametrize(("tint_weight", "malicious_weight"), [(0.0, 1.0), (2.0, 1.0), (0.0, 0.5)])
def test_the_loss_is_equation_7(tint_weight: float, malicious_weight: float) -> None:
    """The hook owns the batch's loss: CE(benign) + CE(malicious) + alpha L_etg
    + beta L_num (per-set means, as in the authors' code; L_num on their scale, half the expected
    changed share), + the optional tint penalty; the optional ``malicious_weight`` scales
    CE(malicious)."""
    import torch.nn.functional as F

    a = attack(
        poison_rate=1.0, alpha=0.3, beta=0.1, tint_weight=tint_weight, malicious_weight=malicious_weight
    )
    t, hook, batch = _one_batch(a, data())
    features, logits = t._forward(batch.x)
    total = hook.batch_loss(t.context(0), batch, features, logits)
    n = 16
    expected = (
        F.cross_entropy(logits[:n], batch.y[:n])
        + malicious_weight * F.cross_entropy(logits[n:], batch.y[n:])
        + 0.3 * hook.entanglement_loss(features[n:], batch.y[n:])
        + 0.1 * 0.5 * hook._pending["num"]
    )
    tint = hook._pending["tint"]
    if tint_weight:
        # the squared spatial mean of the expected trigger, per malicious copy and channel
        pp, pm = a.probabilities(to_float(t.images[:16])[t.labels[:16] != 0])
        assert tint.item() == pytest.approx(
            (pp - pm).mean((-2, -1)).pow(2).mean().item(), rel=1e-4
        )
        assert tint.item() > 0
        tint.backward(retain_graph=True)
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in a.generator.parameters())
        expected = expected + tint_weight * tint
    else:
        assert tint.item() == 0
    assert total.item() == pytest.approx(expected.item(), rel=1e-5)


def test_malicious_weight_applies_from_its_share_of_the_steps() -> None:
    a = attack(poison_rate=1.0, malicious_weight=0.5, malicious_weight_from=0.5)
    t = trainer(a, data(), epochs=2)  # 3 steps per epoch
    hook = t.hooks[0]
    assert isinstance(hook, MultinomialHook)
    weights = [hook.malicious_weight_at(_at(t, s)) for s in range(6)]
    assert weights == [1.0, 1.0, 1.0, 0.5, 0.5, 0.5]
    assert attack(malicious_weight=0.5).training_hook().malicious_weight_at(t.context()) == 0.5  # type: ignore[union-attr]


def test_num_budget_leaves_the_changed_share_below_it_free() -> None:
    """``num_budget`` turns ``beta * L_num`` into ``beta * 0.5 * max(0, share - budget)`` (the
    authors' scale): below the budget the term and its gradient vanish (the generator's gradient
    is the ``beta=0`` one), above it the term is half the excess."""

    def loss_and_grads(**options: object) -> tuple[float, float, list[torch.Tensor]]:
        a = attack(poison_rate=1.0, alpha=0.0, **options)
        t, hook, batch = _one_batch(a, data())
        features, logits = t._forward(batch.x)
        total = hook.batch_loss(t.context(0), batch, features, logits)
        total.backward()
        grads = [p.grad.clone() for p in a.generator.parameters() if p.grad is not None]
        return total.item(), float(hook._pending["num"].detach()), grads

    free, share, g_free = loss_and_grads(beta=0.0)
    assert 0.3 < share < 0.6  # an untrained generator changes about half the sub-pixels
    above, share_above, g_above = loss_and_grads(beta=10.0, num_budget=share + 0.05)
    assert share_above == pytest.approx(share)
    assert above == pytest.approx(free, rel=1e-6)
    assert len(g_above) == len(g_free) > 0
    for ga, gf in zip(g_above, g_free):
        assert torch.allclose(ga, gf, atol=1e-7)
    below, _, g_below = loss_and_grads(beta=10.0, num_budget=share - 0.1)
    assert below == pytest.approx(free + 10.0 * 0.5 * 0.1, rel=1e-4)
    assert any(not torch.allclose(gb, gf, atol=1e-7) for gb, gf in zip(g_below, g_free))


def _cotrain(
    seed: int, stop: int | None = None, checkpoint: object = None, **options: object
) -> tuple[MultinomialAttack, Trainer]:
    """Co-train for 2 epochs of 3 steps (killed after ``stop`` steps when given)."""
    a = attack(seed=seed, **options)
    a.fit(data())
    t = trainer(a, data(), epochs=2, seed=seed)
    t.checkpoint_path = checkpoint  # type: ignore[assignment]
    t.stop_after_steps = stop
    try:
        t.fit()
    except KeyboardInterrupt:
        pass
    return a, t


def test_cotraining_is_deterministic_and_resumable(tmp_path) -> None:  # type: ignore[no-untyped-def]
    def run(
        stop: int | None = None, ckpt: bool = False
    ) -> tuple[MultinomialAttack, Trainer]:
        return _cotrain(5, stop, tmp_path / "ckpt.pt" if ckpt else None, poison_rate=0.5)

    a1, t1 = run()
    a2, t2 = run()
    for (k, v1), v2 in zip(a1.state_dict().items(), a2.state_dict().values()):
        assert torch.equal(v1, v2), k
    for (k, v1), v2 in zip(
        t1.model.state_dict().items(), t2.model.state_dict().values()
    ):
        assert torch.equal(v1, v2), k
    assert any(
        not torch.equal(v, w)
        for v, w in zip(
            a1.state_dict().values(),
            attack(poison_rate=0.5, seed=5).state_dict().values(),
        )
    )
    hist = t1.history[-1]
    for key in (
        "multinomial_malicious_ce",
        "multinomial_entanglement",
        "multinomial_beta",
        "multinomial_clean_ce",
    ):
        assert key in hist
    # killed mid-epoch 2 (3 steps per epoch), resumed: the same generator and classifier
    run(stop=4, ckpt=True)
    a3, t3 = run(ckpt=True)
    for (k, v1), v3 in zip(a1.state_dict().items(), a3.state_dict().values()):
        assert torch.equal(v1, v3), k
    for (k, v1), v3 in zip(
        t1.model.state_dict().items(), t3.model.state_dict().values()
    ):
        assert torch.equal(v1, v3), k


def test_noise_negatives_put_random_one_level_noise_on_benign_rows_with_their_labels() -> None:
    """``noise_negatives``: from its share of the steps on, that share of the benign rows carry
    random +-1 noise (8-bit, at most one grey level, about the trigger's density) and keep their
    true labels; the malicious copies are unchanged."""
    ds = data()
    a = attack(poison_rate=1.0, noise_negatives=1.0)
    t, hook, b = _one_batch(a, ds)
    delta = b.x[:16] * 255 - t.images[:16].float()
    assert torch.allclose(delta, delta.round(), atol=1e-3)
    assert set(delta.round().unique().tolist()) == {-1.0, 0.0, 1.0}
    assert torch.equal(b.y[:16], ds.labels[:16])
    share = float((delta.round() != 0).float().mean())
    expected = float(hook._pending["expected"])
    assert abs(share - expected) < 0.05, (share, expected)  # the trigger's density (untrained: ~0.4)
    assert hook._sums["noise_negatives"] == 1.0
    # none before noise_negatives_from, and a share of 0.5 touches about half the rows
    a_late = attack(poison_rate=1.0, noise_negatives=1.0, noise_negatives_from=0.5)
    t_late, _, b_late = _one_batch(a_late, ds)
    assert torch.equal(b_late.x[:16], to_float(t_late.images[:16]))
    t2 = trainer(a_late, ds, epochs=2)
    h2 = t2.hooks[0]
    assert isinstance(h2, MultinomialHook)
    shares = [h2.noise_negatives_at(_at(t2, s)) for s in range(6)]
    assert shares == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]
    big = data(n=400)
    _, _, b_half = _one_batch(attack(poison_rate=1.0, noise_negatives=0.5), big)
    rows = (b_half.x[:16] * 255 - to_float(big.images[:16]) * 255).abs().flatten(1).amax(1) > 0.5
    assert 2 <= int(rows.sum()) <= 14
    # the malicious copies are those of the run without negatives (the noise is drawn after them)
    _, _, b_plain = _one_batch(attack(poison_rate=1.0), ds)
    assert torch.equal(b.x[16:], b_plain.x[16:])
    # deterministic co-training
    a1, _ = _cotrain(5, poison_rate=1.0, noise_negatives=0.5)
    a2, _ = _cotrain(5, poison_rate=1.0, noise_negatives=0.5)
    for (k, v1), v2 in zip(a1.state_dict().items(), a2.state_dict().values()):
        assert torch.equal(v1, v2), k


def test_generator_schedule_follows_the_trainers_rate() -> None:
    """``generator_schedule="trainer"`` scales the generator's Adam rate by the classifier's
    schedule factor at every step; ``"constant"`` (the paper) keeps ``lr``."""
    a = attack(poison_rate=1.0, lr=0.01, generator_schedule="trainer")
    a.fit(data())
    t = trainer(a, data(), epochs=2, schedule="cosine")
    hook = t.hooks[0]
    assert isinstance(hook, MultinomialHook)
    seen: list[tuple[float, float]] = []
    original = hook.transform_batch

    def spy(ctx: StepContext, batch: Batch) -> Batch:
        out = original(ctx, batch)
        seen.append((hook.optimizer.param_groups[0]["lr"], t.optimizer.param_groups[0]["lr"]))
        return out

    hook.transform_batch = spy  # type: ignore[method-assign]
    t.fit()
    assert len(seen) == 6
    for gen_lr, clf_lr in seen:
        assert gen_lr == pytest.approx(0.01 * clf_lr / 0.05)
    assert seen[-1][0] < seen[0][0]
    c = attack(poison_rate=1.0, lr=0.01)
    c.fit(data())
    tc = trainer(c, data(), epochs=2, schedule="cosine")
    tc.fit()
    assert tc.hooks[0].optimizer.param_groups[0]["lr"] == 0.01  # type: ignore[attr-defined]


def test_evaluation_feature_distance_and_per_label_asr() -> None:
    ds = data(64)
    model = create_model(
        "preact_resnet18", num_classes=4, width=2, image_size=SIZE, seed=0
    ).eval()
    one = attack(target=1)
    r = one.evaluate(model, ds)
    assert r["linf"] == 1 and r["l1_grey_levels"] == pytest.approx(
        r["modified_fraction"], rel=1e-4
    )
    assert sum(r["histogram"].values()) == pytest.approx(100.0)
    assert r["feature_distance"] > 0 and r["feature_spread_target"] > 0
    assert "per_label_asr" not in r and set(one.tables()) == {
        "multinomial_modification",
        "multinomial_stealth_features",
    }
    multi = attack(all_targets=True, asr_images_per_label=8)
    r = multi.evaluate(model, ds)
    assert len(r["per_label_asr"]) == 4 and 0 <= r["mean_per_label_asr"] <= 1
    assert "multinomial_per_label_asr" in multi.tables()
    assert multi.figures()["multinomial_per_label_asr.png"][:4] == b"\x89PNG"
    # an untrained generator's triggers are zero-mean noise: no tint; a generator whose label-2
    # map is P(+1) = 0.5 everywhere tints every image of label 2's ASR rows (by 0.5 on average;
    # 8 images per label leave sampling noise in the mean)
    assert all(0 <= v < 0.3 for v in r["per_label_tint_share"])
    with torch.no_grad():
        head = multi.generator.head
        head.weight.zero_()
        head.bias.fill_(-20.0)
        plus_of_label_2 = [2 * 3 + c for c in range(3)]  # P(+1) maps come first, label-major
        head.bias[plus_of_label_2] = 20.0
    tinted = multi.evaluate(model, ds)["per_label_tint_share"]
    assert tinted[2] > 0.8 and all(v is None for i, v in enumerate(tinted) if i != 2)


class _AlwaysTarget(torch.nn.Module):
    """A 'victim' that answers label 1 for every image, trigger or not."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(x.shape[0], 4, device=x.device) + self.w
        logits[:, 1] = 1.0
        return logits


def test_clean_target_rate_exposes_an_unearned_attack_success_rate() -> None:
    """A model that answers the target for every image has ASR 1 without learning any trigger;
    ``clean_target_rate`` (the same rows without the trigger) is then 1 too."""
    ds = data(64)
    one = attack(target=1)
    r = one.evaluate(_AlwaysTarget(), ds)
    assert r["clean_target_rate"] == 1.0 and r["asr_images"] == int((ds.labels != 1).sum())
    assert "feature_distance" not in r  # no penultimate features to compare
    model = create_model("preact_resnet18", num_classes=4, width=2, image_size=SIZE, seed=0).eval()
    r = one.evaluate(model, ds)
    assert 0.0 <= r["clean_target_rate"] <= 1.0


# ------------------------------------------------------------------------------------ the run


def test_run_passes_the_optimizer_and_trains_without_autocast(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """``--optimizer adam`` reaches the trainer (the paper's Adam), and the one-grey-level attack
    turns bfloat16 autocast off (a grey level is about one bfloat16 step of a normalised input)."""
    import veil.experiment as ex
    from veil.experiment import RunConfig, run_experiment

    seen = []
    real = ex.Trainer

    def spy(model, data, config, *a, **k):  # type: ignore[no-untyped-def]
        seen.append(config)
        return real(model, data, config, *a, **k)

    monkeypatch.setattr(ex, "Trainer", spy)
    common: dict[str, object] = {
        "dataset": "gtsrb_sample", "model": "preact_resnet18", "width": 4, "epochs": 1,
        "image_size": 16, "train_subset": 86, "test_subset": 43, "stealth_samples": 8,
        "batch_size": 32, "device": "cpu", "progress": False, "optimizer": "adam", "lr": 1e-3,
    }
    run_experiment(RunConfig(attack="multinomial", attack_options={"width": 2, "levels": 3},
                             poison_rate=0.2, out=str(tmp_path / "m"), **common))
    run_experiment(RunConfig(attack="badnets", poison_rate=0.1, out=str(tmp_path / "b"), **common))
    assert [c.optimizer for c in seen] == ["adam", "adam"]
    assert [c.amp for c in seen] == [False, True]


def test_run_records_the_generator_and_the_paper_metrics(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    from veil.cli import main
    from veil.experiment import load_run
    from veil.records import RunRecord

    out = tmp_path / "run"
    args = [
        "-q",
        "run",
        "--attack",
        "multinomial",
        "--dataset",
        "gtsrb_sample",
        "--model",
        "preact_resnet18",
        "--width",
        "4",
        "--epochs",
        "1",
        "--image-size",
        "16",
        "--train-subset",
        "86",
        "--test-subset",
        "86",
        "--stealth-samples",
        "16",
        "--poison-rate",
        "0.2",
        "--batch-size",
        "32",
        "--out",
        str(out),
        "--attack-opt",
        "width=2",
        "--attack-opt",
        "levels=3",
        "--attack-opt",
        "alpha=0",
    ]
    assert main(args) == 0, capsys.readouterr().err
    rec = RunRecord(out).require()
    m = rec.metrics()
    assert m["stealth"]["linf"] == 1 and m["attack_metrics"]["linf"] == 1
    assert m["attack"]["alpha"] == 0 and m["poison_count"] == round(0.2 * 86)
    for key in ("feature_distance", "l1_grey_levels", "modified_fraction", "histogram"):
        assert key in m["attack_metrics"]
    assert json.loads((out / "tables" / "multinomial_modification.json").read_text())[
        "rows"
    ]
    assert any(k.startswith("generator.") for k in rec.attack_state())
    run = load_run(out)
    train, test = run.data()
    again = run.attack.evaluate(run.model, test)
    assert again["feature_distance"] == pytest.approx(
        m["attack_metrics"]["feature_distance"], rel=1e-6
    )
    assert again["modified_fraction"] == m["attack_metrics"]["modified_fraction"]
    written = run.poisoned_train(train)
    assert (written.images.short() - train.images.short()).abs().max() == 1
    # --all-targets reaches the attack (and is refused by attacks without the option)
    args2 = [a if a != str(out) else str(tmp_path / "all") for a in args]
    args2 += [
        "--all-targets",
        "--attack-opt",
        "asr_images_per_label=4",
    ]
    assert main(args2) == 0
    m2 = RunRecord(tmp_path / "all").metrics()
    assert (
        len(m2["attack_metrics"]["per_label_asr"]) == 43
        and m2["attack"]["all_targets"] is True
    )
    assert load_run(tmp_path / "all").attack.config.all_targets


# ------------------------------------------------------------------------------------ real data


@pytest.mark.slow
def test_multinomial_on_a_real_gtsrb_subset(tmp_path, gtsrb_root) -> None:  # type: ignore[no-untyped-def]
    """A short co-training run on real GTSRB: the pipeline holds together and the exact trigger
    stays at one grey level (not an effectiveness test: that needs the full CPU budget)."""
    from veil.experiment import RunConfig, run_experiment

    config = RunConfig(
        attack="multinomial",
        dataset="gtsrb",
        data_root=str(gtsrb_root),
        model="preact_resnet18",
        width=8,
        epochs=1,
        batch_size=64,
        poison_rate=0.2,
        train_subset=2000,
        test_subset=500,
        stealth_samples=200,
        attack_options={"width": 4},
        out=str(tmp_path / "m"),
        device="cpu",
        progress=False,
    )
    m = run_experiment(config)
    assert m["stealth"]["linf"] == 1 and m["attack_metrics"]["linf"] == 1
    assert 0 < m["attack_metrics"]["modified_fraction"] < 0.6
    assert m["attack_metrics"]["feature_distance"] > 0
