"""The semantic-feature attack: feature taps, channel attention, the decoder and eq. 6-8."""

from __future__ import annotations

import pytest
import torch

from veil.attacks import create_attack
from veil.attacks.semantic import ChannelAttention, SemanticAttack
from veil.data.base import ImageDataset, to_float
from veil.errors import ConfigError
from veil.models import create_model
from veil.triggers.decoder import SEMANTIC_TAPS, FeatureDecoder, tap_maps, taps_for


def data(n: int = 32, classes: int = 4, seed: int = 0) -> ImageDataset:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    base = (labels.view(-1, 1, 1, 1) * 50 + 30).expand(n, 3, 32, 32)
    images = (base + torch.randint(-30, 30, (n, 3, 32, 32), generator=g)).clamp(0, 255).to(torch.uint8)
    return ImageDataset(images, labels, [str(i) for i in range(classes)], "synthetic", hflip=False)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("vgg16", [(4, 16), (8, 8), (16, 4), (32, 2)]),
        ("preact_resnet18", [(4, 32), (8, 16), (16, 8), (32, 4)]),
        ("resnet18", [(4, 32), (8, 16), (16, 8), (32, 4)]),
    ],
)
def test_taps_return_the_documented_shapes(name, expected):
    """(channels, side) of the three skips and the high-level map at width 4 on 32x32 images."""
    model = create_model(name, num_classes=4, width=4, image_size=32, seed=0).eval()
    skips, high = taps_for(name)
    maps = tap_maps(model, torch.rand(2, 3, 32, 32), [*skips, high])
    assert [(m.shape[1], m.shape[-1]) for m in maps] == expected
    assert all(m.shape[0] == 2 for m in maps)
    decoder = FeatureDecoder(expected[-1], expected[:-1], 3, 32)
    out = decoder(maps[-1], maps[:-1])
    assert out.shape == (2, 3, 32, 32) and out.min() >= 0 and out.max() <= 1


def test_a_surrogate_without_such_taps_is_a_clear_error():
    with pytest.raises(ConfigError, match="no feature taps for a 'vit_small' surrogate; it supports"):
        taps_for("vit_small")
    a = create_attack("semantic", 4, (3, 32, 32), reference_epochs=1, generator_epochs=1)
    with pytest.raises(ConfigError, match="no feature taps for a 'densenet121'"):
        a.fit(data(), victim={"model": "densenet121", "width": 4})
    assert set(SEMANTIC_TAPS) == {"vgg16", "vgg19", "preact_resnet18", "resnet18"}


def test_attention_scores_follow_the_chosen_reading():
    m = torch.rand(3, 32, 2, 2)
    soft = ChannelAttention(32, 16, "softmax", 1.0)
    s = soft.scores(m)
    assert torch.allclose(s.sum(1), torch.ones(3)) and (s > 0).all()  # the paper: they sum to 1
    assert torch.allclose(soft(m), m * s[:, :, None, None])
    scaled = ChannelAttention(32, 16, "softmax", 32.0)
    assert torch.allclose(scaled.scores(m).mean(1), torch.ones(3))  # mean weight 1
    sig = ChannelAttention(32, 16, "sigmoid", 1.0).scores(m)
    assert ((sig > 0) & (sig < 1)).all()
    with pytest.raises(ConfigError, match="can reach the identity"):
        create_attack("semantic", 4, (3, 32, 32), attention_scale="channels")
    create_attack("semantic", 4, (3, 32, 32), attention_scale="channels", train_attention=False)


def _fitted(seed: int = 0, **options: object) -> SemanticAttack:
    kw = {"reference_epochs": 1, "generator_epochs": 1, "generator_batch_size": 16, "seed": seed, **options}
    a = create_attack("semantic", 4, (3, 32, 32), **kw)
    assert isinstance(a, SemanticAttack)
    a.fit(data(), victim={"model": "preact_resnet18", "width": 4})
    return a


def test_the_loss_is_equation_8_and_the_feature_loss_falls_on_a_tiny_problem():
    a = _fitted(generator_lr=1e-5, lambda1=0.0, lambda2=1.0)
    x = to_float(data().images[:16])
    loss, image, feature = a.losses(x)
    assert loss.item() == pytest.approx(feature.item(), rel=1e-6)
    x_hat, t, t_hat = a.generate(x)
    assert feature.item() == pytest.approx((t - t_hat).pow(2).flatten(1).sum(1).mean().item(), rel=1e-5)
    assert image.item() == pytest.approx((x - x_hat).pow(2).flatten(1).sum(1).mean().item(), rel=1e-5)
    params = list(a.decoder.parameters()) + list(a.attention.parameters())
    opt = torch.optim.Adam(params, lr=1e-2)
    first = None
    for _ in range(30):
        _, _, feature = a.losses(x)
        first = feature.item() if first is None else first
        opt.zero_grad()
        feature.backward()
        opt.step()
    assert a.losses(x)[2].item() < 0.75 * first
    # the surrogate stays frozen: no gradient reaches it
    assert all(p.grad is None for p in a.surrogate.parameters())


def test_fitting_is_deterministic_and_the_state_round_trips():
    a1, a2 = _fitted(), _fitted()
    x = to_float(data().images[:4])
    assert torch.equal(a1.apply(x), a2.apply(x))
    assert a1.lambda1 == 5.0  # the synthetic set is no dataset the paper names: lambda1 5
    b = create_attack("semantic", 4, (3, 32, 32))
    b.load_state_dict(a1.state_dict())
    assert torch.equal(b.apply(x), a1.apply(x))
    assert a1.config.target == 1 and a1.config.poison_rate == 0.1 and a1.config.lambda2 == 0.1
    with pytest.raises(RuntimeError, match="needs fit"):
        create_attack("semantic", 4, (3, 32, 32)).apply(x)


def test_a_generator_fitted_on_a_reference_run_is_cached_and_reused(tmp_path, monkeypatch):
    """Poison-rate sweeps over one reference run fit the generator once: the second fit reads the
    cache (the same weights, no training); other generator options, or a broken cache, refit."""
    from veil.experiment import RunConfig
    from veil.records import RunRecord

    run = RunRecord(tmp_path / "clean")
    run.root.mkdir()
    run.write_json("config.json", RunConfig(attack="none", dataset="synthetic", model="preact_resnet18",
                                            out=str(run.root), width=4).to_dict())
    run.save_tensors("model.safetensors", dict(create_model("preact_resnet18", num_classes=4, width=4, seed=0).state_dict()))
    run.write_json("metrics.json", {})
    kw = {"reference_run": str(run.root), "generator_epochs": 1, "generator_batch_size": 16}
    first = create_attack("semantic", 4, (3, 32, 32), **kw)
    first.fit(data())
    cache = first.generator_cache_path(data())
    assert cache is not None and cache.is_file() and cache.parent == run.root / "analysis"
    calls = []
    real = SemanticAttack._train_generator

    def counting(self, *args):
        calls.append(1)
        return real(self, *args)

    monkeypatch.setattr(SemanticAttack, "_train_generator", counting)
    again = create_attack("semantic", 4, (3, 32, 32), **kw, poison_rate=0.03)
    again.fit(data())
    x = to_float(data().images[:4])
    assert calls == [] and torch.equal(again.apply(x), first.apply(x)) and again.history == first.history
    other = create_attack("semantic", 4, (3, 32, 32), **{**kw, "lambda2": 0.0})
    other.fit(data())
    assert calls == [1] and other.generator_cache_path(data()) != cache
    cache.write_bytes(b"not safetensors")
    broken = create_attack("semantic", 4, (3, 32, 32), **kw)
    broken.fit(data())
    assert calls == [1, 1] and torch.equal(broken.apply(x), first.apply(x))  # refitted from the seed


def test_the_residual_head_starts_at_the_identity_and_moves_only_for_the_feature_term():
    """output="residual": x^ = clamp(x + conv5) with conv5 at zero, so the untrained decoder is the
    identity; with lambda2 = 0 (the control) eq. 8 has no gradient there and it stays the
    identity; with the feature term it leaves it, inside [0, 1]."""
    maps = [torch.rand(2, c, s, s) for c, s in [(4, 16), (8, 8), (16, 4), (32, 2)]]
    x = torch.rand(2, 3, 32, 32)
    decoder = FeatureDecoder((32, 2), [(4, 16), (8, 8), (16, 4)], 3, 32, residual=True)
    assert torch.equal(decoder(maps[-1], maps[:-1], x), x)
    with pytest.raises(ValueError, match="needs the clean image"):
        decoder(maps[-1], maps[:-1])
    xs = to_float(data().images[:8])
    control = _fitted(output="residual", lambda2=0.0)
    assert torch.equal(control.generate(xs)[0], xs)
    attack = _fitted(output="residual", generator_lr=1e-4)
    x_hat = attack.generate(xs)[0]
    assert not torch.equal(x_hat, xs) and x_hat.min() >= 0 and x_hat.max() <= 1
    b = create_attack("semantic", 4, (3, 32, 32), output="residual")
    b.load_state_dict(attack.state_dict())
    assert b.decoder.residual and torch.allclose(b.apply(xs), attack.apply(xs), atol=1e-6)  # float rounding only


def test_evaluate_reports_the_feature_error_and_the_surrogates_success_rate():
    """With the identity decoder (residual head, lambda2 = 0) the surrogate's success rate on the
    poisoned images is its rate on the clean ones, and t^ = M(x) is off from t = s * M by 1 - s."""
    test = data(48, seed=1)
    control = _fitted(output="residual", lambda2=0.0)
    out = control.evaluate(None, test)
    rows = torch.nonzero(test.labels != 1).flatten()
    x = to_float(test.images[rows])
    with torch.no_grad():
        clean_rate = (control.surrogate(x).argmax(1) == 1).float().mean().item()
        s = control.attention.scores(tap_maps(control.surrogate, x, [taps_for("preact_resnet18")[1]])[0])
    assert out["benign_asr"] == pytest.approx(clean_rate)
    assert 0.0 < out["feature_relative_error"] and out["feature_relative_error"] > (1 / s.max().item() - 1) ** 2 * 0.99
