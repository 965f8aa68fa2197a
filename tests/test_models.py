"""Contract tests over every registered model, at reduced width and small images."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from veil.errors import ConfigError
from veil.models import MODELS, Classifier, create_model, list_models, model_class

EXPECTED = {
    "preact_resnet18",
    "resnet18",
    "resnet34",
    "resnet50",
    "vgg16",
    "vgg19",
    "densenet121",
    "wrn34_10",
    "vit_small",
    "vit_b16",
    "ran",
}
NUM_CLASSES = 5


def small_width(name: str) -> int:
    return 32 if name.startswith("vit") else 8


def small(name: str, seed: int = 0, **kw: object) -> Classifier:
    kw.setdefault("width", small_width(name))
    return create_model(name, NUM_CLASSES, seed=seed, **kw)  # type: ignore[arg-type]


def images(n: int = 4, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=sorted(EXPECTED))
def model(request: pytest.FixtureRequest) -> Classifier:
    return small(request.param).eval()


def test_registry_lists_every_family() -> None:
    assert EXPECTED <= set(list_models())
    assert list_models("resnet*") == ["resnet18", "resnet18_imagenet", "resnet34", "resnet50"]
    for name in EXPECTED:
        assert model_class(name).name == name
        assert issubclass(MODELS.get(name), Classifier)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_forward_backward(name: str) -> None:
    m = small(name).train()
    x = images().requires_grad_(True)
    logits = m(x)
    assert logits.shape == (4, NUM_CLASSES)
    assert torch.isfinite(logits).all()
    loss = nn.functional.cross_entropy(logits, torch.arange(4) % NUM_CLASSES)
    loss.backward()
    for pname, p in m.named_parameters():
        assert p.grad is not None, f"{name}: no gradient for {pname}"
        assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient for {pname}"
        assert p.grad.abs().sum() > 0, f"{name}: zero gradient for {pname}"
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_features_and_classify(model: Classifier) -> None:
    x = images()
    with torch.no_grad():
        f = model.features(x)
        assert f.shape == (4, model.feature_dim)
        assert isinstance(model.head, nn.Linear)
        assert model.head.in_features == model.feature_dim
        torch.testing.assert_close(model.classify(f), model(x))


def test_feature_maps_and_last_conv(model: Classifier) -> None:
    x = images(2)
    layers = model.feature_layers()
    assert layers
    ndim = 3 if model.name.startswith("vit") else 4
    with torch.no_grad():
        for layer in layers:
            fmap = model.feature_map(x, layer)
            assert isinstance(fmap, torch.Tensor) and fmap.ndim == ndim and fmap.shape[0] == 2, layer
        conv = model.get_module(model.last_conv)
        assert isinstance(conv, nn.Linear if model.name.startswith("vit") else nn.Conv2d)
        out = model.feature_map(x, model.last_conv)
        assert out.shape[0] == 2
    assert all(not m._forward_hooks for m in model.modules()), "feature_map left a hook behind"
    with pytest.raises(ConfigError, match="no_such_layer") as err:
        model.feature_map(x, "no_such_layer")
    assert layers[0] in str(err.value)


def test_feature_map_keeps_gradient() -> None:
    m = small("preact_resnet18").eval()
    x = images(2).requires_grad_(True)
    m.feature_map(x, "layer2").sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_minimum_image_size(name: str) -> None:
    cls = model_class(name)
    with pytest.raises(ConfigError, match=rf"model '{name}' cannot take image size {cls.min_size - 1}"):
        cls.check_image_size(cls.min_size - 1)
    with pytest.raises(ConfigError, match="cannot take image size"):
        small(name, image_size=cls.min_size - 1)
    if cls.min_size <= 8:  # the smallest size really runs (train mode, so BatchNorm sees it)
        m = small(name, image_size=cls.min_size).train()
        assert m(images(2, cls.min_size)).shape == (2, NUM_CLASSES)


def test_vit_image_sizes() -> None:
    cls = model_class("vit_small")
    with pytest.raises(ConfigError, match=r"cannot take image size 30: sides must be multiples of 4"):
        cls.check_image_size(30)
    with pytest.raises(ConfigError, match="multiples of 8"):
        small("vit_small", image_size=36, patch_size=8)
    m = small("vit_small").eval()
    with pytest.raises(ConfigError, match="multiples of 4"):
        m(images(1, 30))
    with torch.no_grad():  # another multiple of the patch size: position embeddings are resized
        assert m(images(2, 48)).shape == (2, NUM_CLASSES)
    assert small("vit_small", width=200).num_heads == 2
    with pytest.raises(ConfigError, match="num_heads"):
        small("vit_small", num_heads=5)


def test_preact_resnet18_at_128() -> None:
    m = small("preact_resnet18").eval()
    with torch.no_grad():
        out = m(images(2, 128))
    assert out.shape == (2, NUM_CLASSES) and torch.isfinite(out).all()


def test_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="'nope'"):
        create_model("nope", 10)
    with pytest.raises(ConfigError, match="num_classes"):
        create_model("resnet18", 1)
    with pytest.raises(ConfigError, match="width"):
        create_model("resnet18", 10, width=0)
    with pytest.raises(ConfigError, match="in_channels"):
        create_model("resnet18", 10, in_channels=0)
    with pytest.raises(ConfigError, match="no option.*dropout"):
        create_model("resnet18", 10, width=4, dropout=0.1)
    with pytest.raises(ConfigError, match="depth"):
        create_model("wrn34_10", 10, width=4, depth=33)
    with pytest.raises(ConfigError, match="image size"):
        create_model("resnet18", 10, image_size="big")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="3 channels"):
        create_model("resnet18", 10, width=4, mean=(0.5, 0.5))


def test_same_seed_same_model_and_global_rng_untouched() -> None:
    state = torch.random.get_rng_state()
    a, b = small("preact_resnet18", seed=3), small("preact_resnet18", seed=3)
    c = small("preact_resnet18", seed=4)
    assert torch.equal(torch.random.get_rng_state(), state)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["conv1.weight"], c.state_dict()["conv1.weight"])
    x = images(2)
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(x), b.eval()(x), rtol=0, atol=0)


def test_normalisation_and_config_roundtrip() -> None:
    m = small("resnet18", mean=(0.4, 0.5, 0.6), std=0.2, in_channels=3)
    assert m.mean.flatten().tolist() == pytest.approx([0.4, 0.5, 0.6])
    assert m.std.flatten().tolist() == pytest.approx([0.2] * 3)
    x = images(2)
    torch.testing.assert_close(m.normalize(x), (x - m.mean) / m.std)
    rebuilt = create_model(**m.config)
    rebuilt.load_state_dict(m.state_dict())  # same architecture, normalisation saved with weights
    assert torch.equal(rebuilt.mean, m.mean)
    default = small("resnet18")
    assert default.mean.flatten().tolist() == [0.5] * 3 and default.std.flatten().tolist() == [0.25] * 3
    gray = small("preact_resnet18", in_channels=1)
    with torch.no_grad():
        assert gray.eval()(torch.rand(2, 1, 32, 32)).shape == (2, NUM_CLASSES)


def _imagenet_input(x: torch.Tensor) -> torch.Tensor:
    """``x`` normalised with ImageNet's statistics, as torchvision's models expect it."""
    from veil.models.pretrained import IMAGENET_MEAN, IMAGENET_STD

    return (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def test_resnet18_imagenet_takes_torchvision_weights(tmp_path):
    """The ImageNet-stem ResNet-18 is torchvision's resnet18 layer for layer: its weights load (all
    but the classifier) and the penultimate features then agree on the same input."""
    import torchvision

    from veil.errors import CheckpointError
    from veil.models.pretrained import IMAGENET_MEAN, IMAGENET_STD, load_torchvision_resnet18

    torch.manual_seed(0)
    tv = torchvision.models.resnet18(weights=None).eval()
    torch.save(tv.state_dict(), tmp_path / "resnet18.pth")
    model = create_model("resnet18_imagenet", num_classes=10, image_size=128, mean=IMAGENET_MEAN, std=IMAGENET_STD, seed=1)
    load_torchvision_resnet18(model, tmp_path / "resnet18.pth").eval()
    x = torch.rand(2, 3, 128, 128)
    tv.fc = torch.nn.Identity()
    with torch.no_grad():
        assert torch.allclose(model.features(x), tv(_imagenet_input(x)), atol=1e-4)
        assert model(x).shape == (2, 10)
    with pytest.raises(CheckpointError, match="no ImageNet weights"):
        load_torchvision_resnet18(model)
    with pytest.raises(CheckpointError, match="do not fit"):
        load_torchvision_resnet18(create_model("resnet34", num_classes=10), tmp_path / "resnet18.pth")


def test_vit_b16_takes_torchvision_and_timm_weights(tmp_path):
    """vit_b16 is torchvision's VisionTransformer layer for layer (tested at a reduced depth and
    width): its weights load (all but the classifier) and the class-token features then agree;
    timm's layout (DeiT's {"model": ...} checkpoints) loads too; position embeddings are resized
    to another image size."""
    from torchvision.models.vision_transformer import VisionTransformer

    from veil.errors import CheckpointError
    from veil.models.pretrained import IMAGENET_MEAN, IMAGENET_STD, load_vit_b16

    full = model_class("vit_b16")
    assert (full.default_width, full.default_patch_size, full.default_depth) == (768, 16, 12)
    torch.manual_seed(0)
    tv = VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=128).eval()
    torch.save(tv.state_dict(), tmp_path / "vit.pth")
    kw = dict(width=32, depth=2, num_heads=2, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    model = create_model("vit_b16", num_classes=10, image_size=32, seed=1, **kw)
    load_vit_b16(model, tmp_path / "vit.pth").eval()
    x = torch.rand(2, 3, 32, 32)
    tv.heads = torch.nn.Identity()
    with torch.no_grad():
        assert torch.allclose(model.features(x), tv(_imagenet_input(x)), atol=1e-5)
        reference = model.features(x)
    # timm's names are veil's but for the patch embedding's "proj"
    timm = {("patch_embed.proj." + k[len("patch_embed."):] if k.startswith("patch_embed.") else k): v
            for k, v in model.state_dict().items() if k not in ("mean", "std")}
    torch.save({"model": timm}, tmp_path / "deit.pth")
    other = load_vit_b16(create_model("vit_b16", num_classes=10, image_size=32, seed=2, **kw), tmp_path / "deit.pth").eval()
    with torch.no_grad():
        torch.testing.assert_close(other.features(x), reference)
    larger = load_vit_b16(create_model("vit_b16", num_classes=10, image_size=64, seed=3, **kw), tmp_path / "vit.pth").eval()
    assert larger.pos_embed.shape == (1, 17, 32)
    torch.testing.assert_close(larger.pos_embed[:, 0], tv.encoder.pos_embedding[:, 0])
    assert larger(torch.rand(1, 3, 64, 64)).shape == (1, 10)
    with pytest.raises(CheckpointError, match="no ImageNet weights"):
        load_vit_b16(model)
    with pytest.raises(CheckpointError, match="do not fit"):
        load_vit_b16(create_model("vit_b16", num_classes=10, image_size=32, width=64, depth=2), tmp_path / "vit.pth")
