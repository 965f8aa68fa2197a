"""ATTEQ and its baselines: the attention mask, neuron selection, gradient boosting, the blend, the
trigger optimisation, the rounds and the alternation, resume mid-round, determinism, errors."""

from __future__ import annotations

import pytest
import torch
from conftest import make_synthetic

from veil.attacks import create_attack
from veil.attacks.atteq import AtteqAttack
from veil.attacks.atteq.hook import AtteqHook, epochs_per_round, poisoned_epoch
from veil.data.base import to_float
from veil.errors import ConfigError
from veil.models import create_model
from veil.train import Batch, TrainConfig, Trainer
from veil.triggers.neuron import (
    BoostNeuron,
    attention_mask,
    blend,
    corner_mask,
    nearest_to_mean,
    optimise_trigger,
    select_neuron,
    select_neuron_by_weights,
)

SHAPE = (3, 32, 32)
TINY = {"reference_width": 4, "reference_epochs": 1, "attention_width": 4, "attention_epochs": 1,
        "trigger_steps": 5, "mask_images": 8, "trigger_images": 16, "target": 1}


def fitted(name: str = "atteq", **options: object) -> AtteqAttack:
    a = create_attack(name, 4, SHAPE, **{**TINY, **options})
    assert isinstance(a, AtteqAttack)
    a.fit(make_synthetic(32, num_classes=4, seed=7))
    return a


def test_the_mask_has_exactly_l_squared_pixels_where_the_mean_map_is_highest():
    g = torch.Generator().manual_seed(0)
    base = torch.zeros(8, 8)
    base[5:7, 1:3] = 1.0  # every map attends to the same 2x2 block
    maps = base + 0.05 * torch.rand(10, 8, 8, generator=g)
    maps[3] += 5.0  # an outlier far from the mean
    assert nearest_to_mean(maps) != 3
    for size in (1, 3, 4):
        mask, heat = attention_mask(maps, size, (32, 32))
        assert mask.shape == (32, 32) and int(mask.sum()) == size * size and set(mask.unique().tolist()) <= {0.0, 1.0}
        assert heat[mask > 0].mean() > heat[mask == 0].mean()
    rows, cols = torch.nonzero(attention_mask(maps, 4, (32, 32))[0], as_tuple=True)
    assert 16 <= rows.min() and rows.max() < 32 and cols.max() < 16  # inside the attended block's area
    corner = corner_mask(3, (32, 32))
    assert int(corner.sum()) == 9 and corner[29:, 29:].all()
    with pytest.raises(ConfigError, match="trigger size 33 does not fit 32x32"):
        attention_mask(maps, 33, (32, 32))


def test_neuron_selection_counts_activations_then_breaks_ties_by_the_mean():
    f = torch.tensor([[1.0, 0.5, -1.0, 2.0], [1.0, 0.5, 3.0, -1.0], [-1.0, 0.5, 3.0, -1.0]])
    assert select_neuron(f) == 1  # column 1 active on all three rows
    f[:, 1] = -0.1
    assert select_neuron(f) == 2  # columns 0 and 2 active twice; 2 has the higher mean
    w = torch.zeros(5, 3, 3, 3)
    w[3] = -2.0
    assert select_neuron_by_weights(w) == 3


def test_boosting_multiplies_the_gradient_through_the_chosen_neuron_by_exactly_theta():
    f = torch.randn(4, 6, requires_grad=True)
    upstream = torch.randn(4, 6)
    (BoostNeuron.apply(f, 2, 21.0) * upstream).sum().backward()
    expected = upstream.clone()
    expected[:, 2] *= 21.0
    assert torch.equal(f.grad, expected)
    model = create_model("preact_resnet18", num_classes=4, width=4, seed=0).eval()
    x = torch.rand(2, *SHAPE, generator=torch.Generator().manual_seed(1))
    grads = []
    for theta in (1.0, 21.0):
        delta = torch.rand(SHAPE, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
        feats = BoostNeuron.apply(model.features(blend(x, delta, corner_mask(3, (32, 32)), 0.4)), 1, theta)
        feats[:, 1].mean().backward()
        grads.append(delta.grad)
    torch.testing.assert_close(grads[1], 21.0 * grads[0])


def test_the_blend_with_transparency_1_leaves_the_image_unchanged_and_with_0_stamps_the_trigger():
    x = torch.rand(3, *SHAPE, generator=torch.Generator().manual_seed(0))
    delta = torch.rand(SHAPE, generator=torch.Generator().manual_seed(1))
    mask = corner_mask(4, (32, 32))
    torch.testing.assert_close(blend(x, delta, mask, 1.0), x)
    opaque = blend(x, delta, mask, 0.0)
    assert torch.equal(opaque[:, :, 28:, 28:], delta[:, 28:, 28:].expand(3, -1, -1, -1))
    assert torch.equal(opaque[:, :, :28], x[:, :, :28])
    torch.testing.assert_close(blend(x, delta, mask, 0.4)[:, :, 28:, 28:],
                               0.6 * delta[:, 28:, 28:] + 0.4 * x[:, :, 28:, 28:])


def test_the_trigger_optimisation_raises_the_neurons_activation_inside_the_mask_only():
    model = create_model("preact_resnet18", num_classes=4, width=4, seed=0)
    x = torch.rand(16, *SHAPE, generator=torch.Generator().manual_seed(0))
    mask = corner_mask(4, (32, 32))
    delta0 = torch.rand(SHAPE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model.eval().features(blend(x, delta0, mask, 0.0))[:, 2].mean()
    delta, parts = optimise_trigger(model, x, delta0, mask, 2, transparency=0.0, steps=40, lr=0.05,
                                    generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        after = model.features(blend(x, delta, mask, 0.0))[:, 2].mean()
    assert after > before and 0 <= delta.min() and delta.max() <= 1
    assert torch.equal(delta[:, :28], delta0[:, :28])  # only the masked pixels move
    assert all(p.requires_grad for p in model.parameters())  # flags restored


def test_alternation_and_rounds():
    assert epochs_per_round(9, 3) == 3 and epochs_per_round(4, 3) == 2 and epochs_per_round(1, 3) == 1
    # the release's: 1st, 3rd, ... epochs of a round clean; the paper's: odd rounds clean
    assert [poisoned_epoch(e, 3, "epoch") for e in range(6)] == [False, True, False, False, True, False]
    assert [poisoned_epoch(e, 2, "round") for e in range(6)] == [False, False, True, True, False, False]
    assert all(poisoned_epoch(e, 2, "none") for e in range(6))
    assert all(poisoned_epoch(e, 1, "epoch") for e in range(3))


def test_fitting_is_deterministic_and_builds_the_papers_parts():
    a, b = fitted(), fitted()
    assert torch.equal(a.delta, b.delta) and torch.equal(a.mask, b.mask) and a.neuron == b.neuron
    assert int(a.mask.sum()) == 9 and a.transparency == 0.4  # GTSRB's 3x3 for an unnamed dataset; 32 px
    assert a.heat is not None and a.heat[a.mask > 0].mean() > a.heat[a.mask == 0].mean()
    x = to_float(make_synthetic(4, num_classes=4, seed=1).images)
    assert torch.equal(a.apply(x), b.apply(x))
    state = a.state_dict()
    c = create_attack("atteq", 4, SHAPE, **TINY)
    c.load_state_dict(state)
    assert torch.equal(c.apply(x), a.apply(x)) and c.neuron == a.neuron
    robnet = fitted("robnet")
    assert torch.equal(robnet.mask, corner_mask(3, (32, 32))) and robnet.transparency == 0.0
    assert robnet.config.rounds == 1 and robnet.config.alternation == "none"
    trojan = fitted("trojannn")
    assert trojan.config.neuron_rule == "weights"


@pytest.mark.parametrize("options, message", [
    ({"trigger_size": 33}, "trigger size 33 does not fit 32x32"),
    ({"transparency": 1.5}, "transparency must be in"),
    ({"theta": 0.0}, "theta must be positive"),
    ({"rounds": 0}, "rounds must be a positive integer"),
    ({"mask": "square"}, "mask"),
])
def test_bad_options_are_clear_errors(options, message):
    with pytest.raises(ConfigError, match=message):
        create_attack("atteq", 4, SHAPE, **options)


def test_the_hook_starts_from_the_benign_model_drops_copies_on_clean_epochs_and_resumes_mid_round(tmp_path):
    """Four epochs in two rounds with the release's alternation (clean, poisoned, clean, poisoned);
    a run killed in the second round resumes to the same trigger, round and weights."""
    train = make_synthetic(32, num_classes=4, seed=7)
    attack = fitted(rounds=2, poison_rate=0.25)
    first = attack.delta.clone()
    data = attack.training_set(train)
    seen: list[int] = []
    original = AtteqHook.transform_batch

    def counting(self, ctx, batch):
        out = original(self, ctx, batch)
        seen.append(int(out.y.numel()) - int(batch.index.numel()))
        return out

    AtteqHook.transform_batch = counting
    try:
        model = create_model("preact_resnet18", num_classes=4, width=4, seed=1)
        cfg = TrainConfig(epochs=4, batch_size=16, seed=0, augment=False)
        hist = Trainer(model, data, cfg, hooks=[attack.training_hook()], progress=False).fit()
    finally:
        AtteqHook.transform_batch = original
    assert [h["atteq_poisoned_copies"] for h in hist] == [0.0, 8.0, 0.0, 8.0]
    assert [h["atteq_round"] for h in hist] == [1.0, 1.0, 2.0, 2.0]
    assert seen[:2] == [0, 0] and sum(seen) == 16
    assert attack.round == 1 and not torch.equal(attack.delta, first) and len(attack.history) == 2
    straight_delta, straight_model = attack.delta.clone(), {k: v.clone() for k, v in model.state_dict().items()}

    # the same run killed after 5 steps (in the 2nd round: 2 steps per epoch) and resumed
    attack2 = fitted(rounds=2, poison_rate=0.25)
    model2 = create_model("preact_resnet18", num_classes=4, width=4, seed=1)
    trainer = Trainer(model2, data, cfg, hooks=[attack2.training_hook()], checkpoint=tmp_path / "ck.pt", progress=False)
    trainer.stop_after_steps = 5
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    attack3 = fitted(rounds=2, poison_rate=0.25)
    model3 = create_model("preact_resnet18", num_classes=4, width=4, seed=1)
    Trainer(model3, data, cfg, hooks=[attack3.training_hook()], checkpoint=tmp_path / "ck.pt", progress=False).fit()
    assert attack3.round == 1 and torch.equal(attack3.delta, straight_delta)
    for k, v in model3.state_dict().items():
        assert torch.equal(v, straight_model[k]), k


def test_a_benign_model_of_another_architecture_is_refused():
    a = create_attack("atteq", 4, SHAPE, **TINY, reference_model="preact_resnet18")
    with pytest.raises(ConfigError, match="training starts from the benign model"):
        a.fit(make_synthetic(32, num_classes=4, seed=7), victim={"model": "vgg16", "width": 4})


def test_batches_are_left_alone_without_poisoned_rows():
    attack = fitted(poison_rate=0.25)
    hook = attack.training_hook()
    hook._mask = torch.zeros(32, dtype=torch.bool)

    class Ctx:
        epoch, epochs = 1, 4

    batch = Batch(x=torch.rand(4, *SHAPE), y=torch.zeros(4, dtype=torch.long), index=torch.arange(4), step=0, epoch=1)
    assert hook.transform_batch(Ctx(), batch).x.shape[0] == 4


def test_the_papers_target_and_ratio_are_run_settings_by_dataset():
    from veil.runs import resolve_config

    gtsrb = resolve_config({"attack": "atteq", "dataset": "gtsrb", "model": "preact_resnet18", "out": "x"})
    assert (gtsrb.target, gtsrb.poison_rate, gtsrb.optimizer, gtsrb.lr, gtsrb.batch_size) == (10, 0.05, "adam", 1e-3, 64)
    assert gtsrb.sources["target"] == "paper" and gtsrb.sources["epochs"] == "paper"
    cifar = resolve_config({"attack": "atteq", "dataset": "cifar10", "model": "vgg16", "out": "x", "target": 4})
    assert cifar.target == 4 and cifar.sources["target"] == "user" and cifar.poison_rate == 0.05
    other = resolve_config({"attack": "atteq", "dataset": "imagefolder", "model": "vgg16", "out": "x"})
    assert other.target == 0 and other.sources["target"] == "veil default"
