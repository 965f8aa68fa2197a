"""The model-inspection defenses on a tiny planted backdoor.

A synthetic 6-class dataset (one colour per class plus noise, 16x16) and a two-convolution
classifier trained in about a second with a 3x3 checkerboard in the bottom-right corner sending
poisoned images to label 0. Neural Cleanse must recover label 0 and a mask on the patch, STRIP
must separate the entropies, spectral signatures must rank the planted samples first, activation
clustering must find them, and every result must be deterministic under a seed.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from veil.data.base import ImageDataset, PoisonedDataset, to_float, to_uint8
from veil.defenses.activation_clustering import activation_clustering
from veil.defenses.common import auroc, batched_features, defender_data, detection_rates
from veil.defenses.fine_pruning import (
    channel_activations,
    operating_point,
    pruning_curve,
    pruning_order,
)
from veil.defenses.gradcam import default_layer, februus_threshold, grad_cam, inpaint, mask_attention, trigger_heat
from veil.defenses.neural_cleanse import anomaly_index, reverse_engineer_triggers, unconverged_labels
from veil.defenses.spectral_signatures import spectral_flags, spectral_scores
from veil.defenses.strip import strip_entropy
from veil.errors import ConfigError
from veil.models.base import Classifier
from veil.train import TrainConfig, Trainer, predict

SIZE = 16
CLASSES = 6
TARGET = 0
PATCH = 3


class TinyNet(Classifier):
    """Two convolutions, average pooling to a 4x4 grid (so that the trigger's position matters) and a
    linear head, on the :class:`Classifier` interface."""

    def __init__(self, num_classes: int = CLASSES, width: int = 12) -> None:
        super().__init__(num_classes, 3, SIZE)
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1, stride=2)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.feature_dim = 2 * width * 16
        self.head = nn.Linear(self.feature_dim, num_classes)
        self._feature_layers = ["conv1", "conv2"]
        self.last_conv = "conv2"

    def _features(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return F.adaptive_avg_pool2d(x, 4).flatten(1)


def patch_mask() -> Tensor:
    m = torch.zeros(1, SIZE, SIZE)
    m[:, -PATCH:, -PATCH:] = 1
    return m


def stamp(x: Tensor) -> Tensor:
    """The planted trigger: a black-and-white checkerboard in the bottom-right corner."""
    i = torch.arange(PATCH)
    board = ((i[:, None] + i[None, :]) % 2 == 0).float().expand(3, PATCH, PATCH)
    out = x.clone()
    out[:, :, -PATCH:, -PATCH:] = board
    return out


def colours(n: int, seed: int) -> ImageDataset:
    g = torch.Generator().manual_seed(seed)
    lo, hi = 0.05, 0.45  # dark colours: superimposing two images (STRIP) does not saturate
    palette = torch.tensor([[hi, lo, lo], [lo, hi, lo], [lo, lo, hi], [hi, hi, lo], [lo, hi, hi], [hi, lo, hi]])
    labels = torch.arange(n) % CLASSES
    x = palette[labels][:, :, None, None] + 0.1 * torch.randn(n, 3, SIZE, SIZE, generator=g)
    return ImageDataset(to_uint8(x.clamp(0, 1)), labels, [str(c) for c in range(CLASSES)], "colours", hflip=False)


def plant(train: ImageDataset, count: int) -> PoisonedDataset:
    """``train`` with the checkerboard on ``count`` seeded rows of the other labels, relabelled to
    the target."""
    g = torch.Generator().manual_seed(3)
    eligible = torch.nonzero(train.labels != TARGET).flatten()
    idx = eligible[torch.randperm(eligible.numel(), generator=g)[:count]].sort().values
    images, labels = train.images.clone(), train.labels.clone()
    images[idx] = to_uint8(stamp(to_float(train.images[idx])))
    labels[idx] = TARGET
    return PoisonedDataset(images, labels, train.classes, "planted", False, poison_indices=idx, original_labels=train.labels)


class Planted:
    """The trained tiny backdoored model and its data."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        train = colours(600, seed=1)
        self.test = colours(300, seed=2)
        # 20 poisoned images (a minority of label 0's 120 rows) from the other labels
        self.train = plant(train, 20)
        self.is_poison = torch.zeros(len(train), dtype=torch.bool)
        self.is_poison[self.train.poison_indices] = True
        self.model = TinyNet()
        cfg = TrainConfig(epochs=4, batch_size=32, lr=0.05, augment=False, seed=0, checkpoint_every=0, warmup_epochs=0.5)
        Trainer(self.model, self.train, cfg, device="cpu", progress=False).fit()
        self.model.eval()
        keep = self.test.labels != TARGET
        self.triggered = to_uint8(stamp(to_float(self.test.images[keep])))

    def accuracy(self) -> float:
        return float((predict(self.model, self.test.images) == self.test.labels).float().mean())

    def asr(self) -> float:
        return float((predict(self.model, self.triggered) == TARGET).float().mean())


@pytest.fixture(scope="module")
def planted() -> Planted:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        p = Planted()
    finally:
        torch.set_num_threads(n)
    assert p.accuracy() > 0.95 and p.asr() > 0.95, (p.accuracy(), p.asr())
    return p


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------- Neural Cleanse
NC = {"steps": 100, "batch_size": 8, "epoch_steps": 4, "patience": 2, "seed": 0}


def test_neural_cleanse_recovers_target_and_mask(planted):
    rev = reverse_engineer_triggers(planted.model, planted.test.images, **NC)
    assert rev.labels == list(range(CLASSES))
    assert rev.masks.shape == (CLASSES, 1, SIZE, SIZE) and rev.patterns.shape == (CLASSES, 3, SIZE, SIZE)
    assert 0 <= float(rev.masks.min()) and float(rev.masks.max()) <= 1
    norms = rev.l1_norms
    assert int(norms.argmin()) == TARGET
    index, median, _ = anomaly_index(norms)
    assert float(index[TARGET]) > 2 and float(norms[TARGET]) < median
    # the target's mask sits on the planted patch: most of its mass within one pixel of it
    near = F.max_pool2d(patch_mask()[None], 3, stride=1, padding=1)[0]
    mask = rev.masks[TARGET]
    assert float((mask * near).sum() / mask.sum()) > 0.6
    assert bool(rev.found[TARGET]) and float(rev.success[TARGET]) >= 0.9  # (last epoch; the best reached 0.99)


def test_neural_cleanse_is_deterministic_and_batched_over_label_subsets(planted):
    a = reverse_engineer_triggers(planted.model, planted.test.images, [0, 2, 4], **{**NC, "steps": 10})
    b = reverse_engineer_triggers(planted.model, planted.test.images, [0, 2, 4], **{**NC, "steps": 10})
    assert torch.equal(a.masks, b.masks) and torch.equal(a.patterns, b.patterns)
    assert a.labels == [0, 2, 4] and a.steps.tolist() == [10, 10, 10]
    c = reverse_engineer_triggers(planted.model, planted.test.images, [0, 2, 4], **{**NC, "steps": 10, "seed": 1})
    assert not torch.equal(a.masks, c.masks)
    assert all(p.requires_grad for p in planted.model.parameters())  # restored after the optimisation


def test_neural_cleanse_names_the_labels_still_optimising_when_the_budget_ends(planted):
    # one-step schedule epochs stop most labels early within about 16-23 steps; a budget of 21 cuts some off
    rev = reverse_engineer_triggers(planted.model, planted.test.images,
                                    **{**NC, "steps": 21, "epoch_steps": 1, "patience": 1, "early_stop_patience": 1})
    still = unconverged_labels(rev, 21)
    assert still == [k for k, n in zip(rev.labels, rev.steps.tolist()) if n == 21]
    assert 0 < len(still) < CLASSES and all(n <= 21 for n in rev.steps.tolist())
    assert unconverged_labels(rev, 200) == []


def test_anomaly_index_is_the_mad_statistic():
    index, median, mad = anomaly_index(torch.tensor([1.0, 10.0, 11.0, 12.0, 13.0]))
    assert median == 11.0 and mad == pytest.approx(1.4826 * 1.0)
    assert float(index[0]) == pytest.approx(10 / 1.4826, rel=1e-5)
    index, _, _ = anomaly_index(torch.tensor([5.0, 5.0, 5.0]))
    assert index.tolist() == [0.0, 0.0, 0.0]


# ---------------------------------------------------------------------- STRIP
def test_strip_separates_triggered_from_clean_inputs(planted):
    pool = planted.test.images[:100]
    clean = planted.test.images[100:160]
    bad = planted.triggered[100:160]
    h_clean = strip_entropy(planted.model, clean, pool, n=20, seed=0)
    h_bad = strip_entropy(planted.model, bad, pool, n=20, seed=0)
    assert h_clean.shape == (60,) and float(h_clean.min()) >= 0
    assert float(h_clean.max()) <= torch.log2(torch.tensor(float(CLASSES))) + 1e-5
    assert float(h_bad.mean()) < float(h_clean.mean())
    assert auroc(-h_bad, -h_clean) >= 0.9
    again = strip_entropy(planted.model, clean, pool, n=20, seed=0)
    assert torch.equal(h_clean, again)
    assert not torch.equal(h_clean, strip_entropy(planted.model, clean, pool, n=20, seed=1))


def test_auroc_and_detection_rates():
    assert auroc(torch.tensor([2.0, 3.0]), torch.tensor([0.0, 1.0])) == 1.0
    assert auroc(torch.tensor([0.0]), torch.tensor([1.0])) == 0.0
    assert auroc(torch.tensor([1.0, 1.0]), torch.tensor([1.0])) == 0.5
    assert math.isnan(auroc(torch.tensor([]), torch.tensor([1.0])))
    r = detection_rates(torch.tensor([True, True, False, False]), torch.tensor([True, False, True, False]))
    assert r["tpr"] == 0.5 and r["fpr"] == 0.5 and r["precision"] == 0.5 and r["flagged"] == 2


# ---------------------------------------------------------------------- training-set detectors
def test_spectral_signatures_rank_the_planted_samples_first(planted):
    feats = batched_features(planted.model, planted.train.images)
    spec = spectral_scores(feats, planted.train.labels, CLASSES)
    rows = torch.nonzero(planted.train.labels == TARGET).flatten()
    top = rows[torch.argsort(spec.scores[rows], descending=True)[: planted.train.poison_count]]
    assert bool(planted.is_poison[top].all())
    flags = spectral_flags(spec.scores, planted.train.labels, epsilon=20 / 120)
    rates = detection_rates(flags, planted.is_poison)
    assert rates["tpr"] == 1.0 and rates["fpr"] < 0.3  # 1.5 x epsilon = 25 % of every label is removed
    assert int(flags[rows].sum()) == 30 and spec.singular_values.shape == (CLASSES,)  # ceil(1.5 * 20 / 120 * 120)


@pytest.mark.parametrize("analysis", ["reference", "size"])
def test_activation_clustering_finds_the_planted_samples(planted, analysis):
    feats = batched_features(planted.model, planted.train.images)
    ref = batched_features(planted.model, planted.test.images)
    flags, clusters = activation_clustering(
        feats, planted.train.labels, CLASSES, ref, planted.test.labels, analysis=analysis, dims=4, alpha=1e-3
    )
    rates = detection_rates(flags, planted.is_poison)
    assert rates["tpr"] >= 0.8 and rates["fpr"] < 0.1, rates
    assert TARGET in [c.label for c in clusters if c.poisonous is not None]
    again, _ = activation_clustering(
        feats, planted.train.labels, CLASSES, ref, planted.test.labels, analysis=analysis, dims=4, alpha=1e-3
    )
    assert torch.equal(flags, again)


def test_activation_clustering_reference_analysis_handles_a_poisoned_majority(planted):
    """When poison outnumbers a label's genuine samples, the smaller cluster is the genuine one;
    the reference analysis still flags the poison."""
    feats = batched_features(planted.model, planted.train.images)
    ref = batched_features(planted.model, planted.test.images)
    # keep only 10 genuine label-0 rows next to the 20 poisoned ones
    genuine0 = torch.nonzero((planted.train.labels == TARGET) & ~planted.is_poison).flatten()
    drop = genuine0[10:]
    keep = torch.ones(len(planted.train), dtype=torch.bool)
    keep[drop] = False
    f, y, truth = feats[keep], planted.train.labels[keep], planted.is_poison[keep]
    flags, _ = activation_clustering(f, y, CLASSES, ref, planted.test.labels, analysis="reference", dims=4, alpha=1e-3)
    assert detection_rates(flags, truth)["tpr"] >= 0.8
    with pytest.raises(ConfigError, match="needs the defender's clean activations"):
        activation_clustering(f, y, CLASSES, analysis="reference")


# ---------------------------------------------------------------------- fine-pruning
def test_pruning_curve_features_and_module_paths_agree_at_the_ends(planted):
    model = planted.model
    acts = channel_activations(model, planted.test.images[:100])
    assert acts.shape == (model.feature_dim,) and bool((acts >= 0).all())
    order = pruning_order(acts)
    assert acts[order].tolist() == sorted(acts.tolist())
    triggered = ImageDataset(planted.triggered, torch.full((planted.triggered.shape[0],), TARGET), planted.test.classes)
    sets = {"clean_accuracy": planted.test, "attack_success_rate": triggered}
    curve = pruning_curve(model, order, sets)
    assert [p["pruned"] for p in curve] == list(range(model.feature_dim + 1))
    assert curve[0]["clean_accuracy"] == pytest.approx(planted.accuracy())
    assert curve[0]["attack_success_rate"] == pytest.approx(planted.asr())
    # everything pruned: a constant prediction
    assert curve[-1]["clean_accuracy"] == pytest.approx(1 / CLASSES, abs=0.02)
    hooked = pruning_curve(model, pruning_order(channel_activations(model, planted.test.images[:100], "conv2")), sets,
                           layer="conv2", counts=[0, 24])
    assert [p["pruned"] for p in hooked] == [0, 24]
    assert hooked[0]["clean_accuracy"] == pytest.approx(planted.accuracy())
    truth = planted.test.labels[planted.test.labels != TARGET]
    robust = pruning_curve(model, order, sets, counts=[0], relabel={"robust_accuracy": ("attack_success_rate", truth)})
    assert robust[0]["robust_accuracy"] == pytest.approx(float((predict(model, planted.triggered) == truth).float().mean()))
    with pytest.raises(ConfigError, match="one label per image"):
        pruning_curve(model, order, sets, counts=[0], relabel={"r": ("attack_success_rate", truth[:3])})
    stop, below = operating_point(curve, "clean_accuracy", 0.8)
    assert stop["clean_accuracy"] >= 0.8 and (below is None or below["clean_accuracy"] < 0.8)
    assert below is None or below["pruned"] == stop["pruned"] + 1
    assert all(p.requires_grad for p in model.parameters()) and not any(m._forward_hooks for m in model.modules())


# ---------------------------------------------------------------------- Grad-CAM
def test_grad_cam_attends_to_the_patch(planted):
    cam, logits = grad_cam(planted.model, planted.triggered[:40], "conv2")
    assert cam.shape == (40, SIZE, SIZE) and float(cam.min()) >= 0 and float(cam.max()) <= 1
    assert bool((logits.argmax(1) == TARGET).float().mean() > 0.9)
    inside = patch_mask()[0].bool()
    assert float(cam[:, inside].mean()) > 2 * float(cam[:, ~inside].mean())
    on, off = trigger_heat(cam, inside.expand_as(cam))
    assert on == pytest.approx(float(cam[:, inside].mean())) and on > 2 * off
    assert math.isnan(trigger_heat(cam, torch.zeros_like(cam, dtype=torch.bool))[0])
    masked, region = mask_attention(planted.triggered[:40], cam, 0.6, torch.full((3,), 0.5))
    assert masked.shape == (40, 3, SIZE, SIZE) and region.dtype == torch.bool
    assert bool((masked[region[:, None].expand_as(masked)] == 0.5).all())
    with pytest.raises(ConfigError, match="no layer"):
        grad_cam(planted.model, planted.triggered[:2], "nope")


def test_grad_cam_explains_the_deepest_map_with_more_than_one_cell():
    """VGG at 32 pixels pools its last stage to 1 x 1 (a constant heatmap): the default moves to its
    last convolution (2 x 2, the map Februus's release explains); ResNets keep layer4 (4 x 4)."""
    from veil.models import create_model

    vgg = create_model("vgg16", 10, 32, width=4, seed=0)
    assert default_layer(vgg) == "stage5" and default_layer(vgg, (3, 64, 64)) == "stage5"
    assert default_layer(vgg, (3, 32, 32)) == vgg.last_conv == "stage5.2.conv"
    cam, _ = grad_cam(vgg, torch.rand(2, 3, 32, 32), "stage5")
    assert float(cam.abs().max()) == 0.0  # one cell: nothing to localise
    resnet = create_model("preact_resnet18", 10, 32, width=4, seed=0)
    assert default_layer(resnet, (3, 32, 32)) == "layer4"


def test_inpainting_restores_only_the_region_from_its_surroundings():
    x = torch.full((2, 3, SIZE, SIZE), 0.25)
    x[:, 0] = 0.75
    region = torch.zeros(2, SIZE, SIZE, dtype=torch.bool)
    region[:, 5:9, 6:10] = True
    x[:, :, 5:9, 6:10] = torch.tensor([0.0, 1.0, 0.0]).view(1, 3, 1, 1)  # a foreign patch
    out = inpaint(x, region)
    assert out.shape == x.shape and out.dtype == torch.float32
    assert torch.equal(out[:, :, ~region[0]], x[:, :, ~region[0]])  # outside: untouched, exactly
    inside = out[:, :, region[0]]
    assert float((inside[:, 0] - 0.75).abs().max()) <= 2 / 255 and float((inside[:, 1:] - 0.25).abs().max()) <= 2 / 255
    assert torch.equal(inpaint(x, region), out)  # deterministic
    assert torch.equal(inpaint(x, torch.zeros_like(region)), x)
    with pytest.raises(ConfigError, match="1 or 3 channels"):
        inpaint(torch.zeros(1, 2, 4, 4), torch.ones(1, 4, 4, dtype=torch.bool))


def test_februus_restoration_removes_the_planted_backdoor_and_keeps_clean_images(planted):
    """Removing the top-attention region and inpainting it (Februus) sends the triggered inputs back
    to their labels; on clean inputs inpainting keeps the class where the mean-colour fill loses it."""
    model, layer = planted.model, "conv2"
    fill = to_float(planted.test.images).mean((0, 2, 3))
    cam, _ = grad_cam(model, planted.triggered, layer)
    _, region = mask_attention(planted.triggered, cam, 0.6, fill)
    restored = predict(model, inpaint(planted.triggered, region))
    truth = planted.test.labels[planted.test.labels != TARGET]
    assert planted.asr() > 0.9
    assert float((restored == TARGET).float().mean()) < 0.1 and float((restored == truth).float().mean()) > 0.9
    clean_cam, _ = grad_cam(model, planted.test.images, layer)
    masked, clean_region = mask_attention(planted.test.images, clean_cam, 0.6, fill)
    inpainted = float((predict(model, inpaint(planted.test.images, clean_region)) == planted.test.labels).float().mean())
    mean_filled = float((predict(model, masked) == planted.test.labels).float().mean())
    assert inpainted >= planted.accuracy() - 0.05 and inpainted >= mean_filled


# ---------------------------------------------------------------------- MNTD
def test_mntd_meta_classifier_flags_the_planted_backdoor_and_resumes(planted, tmp_path):
    from veil.defenses.mntd import fit_meta, load_shadow, meta_score, train_shadows

    def make(seed: int) -> TinyNet:
        torch.manual_seed(seed)
        return TinyNet()

    clean, evaluation = colours(600, seed=11), colours(120, seed=12)
    tc = TrainConfig(batch_size=32, lr=0.05, augment=False, warmup_epochs=0.5)
    shadows = train_shadows(make, clean, evaluation, 12, 4, tmp_path, {"test": 1}, seed=0, train_config=tc)
    assert [s["label"] for s in shadows] == [0, 1] * 12 and len(list(tmp_path.glob("shadow*.safetensors"))) == 24
    backdoored = [s["asr"] for s in shadows if s["label"]]
    assert sum(a > 0.8 for a in backdoored) >= 8  # most random synthetic backdoors are learned
    models = [load_shadow(make, tmp_path, s) for s in shadows]
    held = [i for i in range(24) if i >= 18]  # the last three of each kind
    train_idx = [i for i in range(24) if i < 18]
    meta = fit_meta([models[i] for i in train_idx], [shadows[i]["label"] for i in train_idx], 10, 50, 1e-3,
                    (3, SIZE, SIZE), CLASSES, seed=0)
    scores = torch.tensor([meta_score(meta, models[i]) for i in held])
    labels = torch.tensor([shadows[i]["label"] for i in held])
    assert auroc(scores[labels == 1], scores[labels == 0]) >= 0.8
    clean_model = make(99)
    Trainer(clean_model, colours(600, seed=1), TrainConfig(epochs=4, batch_size=32, lr=0.05, augment=False, seed=0,
                                                           checkpoint_every=0, warmup_epochs=0.5),
            device="cpu", progress=False).fit()
    assert meta_score(meta, planted.model) > 0.5 > meta_score(meta, clean_model.eval())
    # resumes shadow by shadow: a lost shadow is retrained, the others are read back
    (tmp_path / "shadow0003.safetensors").unlink()
    import json

    info = json.loads((tmp_path / "shadows.json").read_text())
    info["shadows"] = [s for s in info["shadows"] if s["index"] != 3]
    (tmp_path / "shadows.json").write_text(json.dumps(info))
    again = train_shadows(make, clean, evaluation, 12, 4, tmp_path, {"test": 1}, seed=0, train_config=tc)
    assert again == shadows and (tmp_path / "shadow0003.safetensors").exists()
    with pytest.raises(ConfigError, match="other settings"):
        train_shadows(make, clean, evaluation, 12, 4, tmp_path, {"test": 2}, seed=0, train_config=tc)


# ---------------------------------------------------------------------- the defender's data
def test_defender_data_is_stratified_seeded_and_checked(planted):
    train, test = planted.train, planted.test
    clean, rest = defender_data(train, test, 60, "test", seed=0)
    assert len(clean) == 60 and len(rest) == len(test) - 60
    assert torch.bincount(clean.labels).tolist() == [10] * CLASSES
    again, _ = defender_data(train, test, 60, "test", seed=0)
    assert torch.equal(clean.images, again.images)
    other, _ = defender_data(train, test, 60, "test", seed=1)
    assert not torch.equal(clean.images, other.images)
    # held-out rows are disjoint from the evaluation rows
    both = torch.cat([clean.images, rest.images]).flatten(1)
    assert torch.unique(both, dim=0).shape[0] == len(test)
    clean, rest = defender_data(train, test, 100, "train", seed=0)
    assert len(clean) == 100 and rest is test
    with pytest.raises(ConfigError, match="clean_images=1000 is larger than the 300 test images"):
        defender_data(train, test, 1000, "test")
    with pytest.raises(ConfigError, match="larger than the run's 600 clean training images"):
        defender_data(train, test, 601, "train")
    with pytest.raises(ConfigError, match="clean_source"):
        defender_data(train, test, 10, "val")  # type: ignore[arg-type]


# ---------------------------------------------------------------------- NAD
def test_nad_attention_map_is_normalised_and_the_loss_reaches_only_the_student():
    from veil.defenses.nad import attention_loss, attention_map

    f = torch.randn(4, 8, 5, 5)
    am = attention_map(f)
    assert am.shape == (4, 25) and torch.allclose(am.norm(dim=1), torch.ones(4), atol=1e-4)
    assert torch.allclose(am, attention_map(3 * f), atol=1e-5)  # scale-free, as the official map
    assert attention_map(torch.randn(2, 7, 16)).shape == (2, 7)  # a ViT block's tokens
    with pytest.raises(ConfigError, match="NAD needs a stage output"):
        attention_map(torch.randn(2, 3))
    s = f.clone().requires_grad_(True)
    t = torch.randn(4, 8, 5, 5).requires_grad_(True)
    assert float(attention_loss(f, f)) == 0.0
    attention_loss(s, t.detach()).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0 and t.grad is None


def _nad(planted, epochs: int, beta: float, seed: int = 0, lr: float = 0.01):
    """Teacher: the backdoored model fine-tuned on 60 clean images; student distilled from it."""
    import copy

    from veil.defenses.nad import DistillationHook

    clean = colours(60, seed=4)  # the defender's own clean images
    torch.manual_seed(seed)
    teacher = copy.deepcopy(planted.model)
    cfg = TrainConfig(epochs=epochs, batch_size=16, lr=lr, schedule="constant", augment=False, seed=seed, checkpoint_every=0)
    Trainer(teacher, clean, cfg, device="cpu", progress=False).fit()
    teacher.eval()
    student = copy.deepcopy(planted.model)
    hook = DistillationHook(teacher, "conv2", beta, 2.0)
    history = Trainer(student, clean, cfg, hooks=[hook], device="cpu", progress=False).fit()
    hook.remove()
    student.eval()
    asr = float((predict(student, planted.triggered) == TARGET).float().mean())
    acc = float((predict(student, planted.test.images) == planted.test.labels).float().mean())
    return student, asr, acc, history


def test_nad_erases_the_planted_backdoor_where_fine_tuning_alone_does_not(planted):
    student, asr, acc, history = _nad(planted, epochs=8, beta=5000.0, lr=0.05)
    assert planted.asr() > 0.95
    assert asr < 0.2 and acc > 0.9, (asr, acc)
    assert all(h["nad_attention_loss"] >= 0 for h in history)
    _, asr_ft, _, _ = _nad(planted, epochs=8, beta=0.0, lr=0.05)  # the same training without distillation
    assert asr_ft > 0.5, asr_ft
    again, asr2, acc2, _ = _nad(planted, epochs=8, beta=5000.0, lr=0.05)
    assert (asr2, acc2) == (asr, acc)
    assert all(torch.equal(a, b) for a, b in zip(student.state_dict().values(), again.state_dict().values()))


# ---------------------------------------------------------------------- FTD
def test_ftd_dct_is_orthonormal_and_invertible():
    from veil.defenses.ftd import dct2, dct_matrix

    c = dct_matrix(16)
    assert torch.allclose(c @ c.T, torch.eye(16), atol=1e-5)
    x = torch.rand(2, 3, 16, 16)
    X = dct2(x)
    assert torch.allclose(c.T @ X @ c, x, atol=1e-5)
    assert torch.allclose(X[:, :, 0, 0], x.mean((2, 3)) * 16, atol=1e-4)  # the DC term


def _ftd(seed: int = 0):
    from veil.defenses.ftd import FTD

    # the official optimiser (Adadelta at 0.05), 2 rounds of 4 epochs instead of 5 of 10
    d = FTD(FTD.Config(clean_images=1000, rounds=2, epochs=4, batch_size=32, seed=seed), progress=False)
    return d, d.fit_detector(colours(1000, seed=5))


def test_ftd_flags_a_patch_trigger_and_not_clean_images_deterministically(planted):
    d, net = _ftd()
    keep = planted.test.labels != TARGET
    s_bad = d.scores(net, planted.triggered)
    s_clean = d.scores(net, planted.test.images[keep])
    # the detector never saw this trigger (a checkerboard; its own patches are plain or random blocks)
    from sklearn.metrics import roc_auc_score

    auroc = roc_auc_score([1] * len(s_bad) + [0] * len(s_clean), torch.cat([s_bad, s_clean]).numpy())
    assert auroc >= 0.95, auroc
    acc = (float((s_bad > 0.5).float().mean()) + float((s_clean <= 0.5).float().mean())) / 2
    assert acc >= 0.9, acc
    _, net2 = _ftd()
    assert torch.equal(d.scores(net2, planted.triggered), s_bad)
    # a +-1 grey-level change of 2 % of the sub-pixels (the multinomial trigger's size) is not seen
    g = torch.Generator().manual_seed(0)
    x = planted.test.images[keep].long()
    flip = (torch.rand(x.shape, generator=g) < 0.02).long() * (2 * torch.randint(0, 2, x.shape, generator=g) - 1)
    s_faint = d.scores(net, (x + flip).clamp(0, 255).to(torch.uint8))
    faint = (float((s_faint > 0.5).float().mean()) + float((s_clean <= 0.5).float().mean())) / 2
    assert 0.35 <= faint <= 0.65, faint


def test_ftd_keeps_its_detector_for_the_same_clean_images_and_options(tmp_path):
    """The detector does not depend on the suspect: with detector_dir it is trained once per clean
    set and options, and reused."""
    from veil.defenses.ftd import FTD

    def make(**kw):
        opts = {"clean_images": 200, "rounds": 1, "epochs": 1, "batch_size": 32, "detector_dir": str(tmp_path), **kw}
        return FTD(FTD.Config(**opts), progress=False)

    clean, other = colours(200, seed=5), colours(200, seed=6)
    d = make()
    first = d.detector(clean)
    files = list(tmp_path.glob("ftd-*.safetensors"))
    assert len(files) == 1 and d.detector_file(clean) == files[0]
    again = make(test_images=10).detector(clean)  # the evaluation budget does not change the detector
    probe = colours(20, seed=7).images
    assert torch.equal(d.scores(first, probe), d.scores(again, probe))
    assert len(list(tmp_path.glob("ftd-*.safetensors"))) == 1
    # other clean images or another training budget: another detector
    assert d.detector_file(other) != files[0] and make(epochs=2).detector_file(clean) != files[0]
    assert FTD(FTD.Config()).detector_file(clean) is None  # not kept without detector_dir


def test_februus_threshold_is_the_official_release_value_per_dataset():
    """MASK_COND of the official Februus code: 0.8 for traffic signs (every GTSRB variant), 0.7 (its
    CIFAR-10 value) elsewhere."""
    assert februus_threshold("gtsrb") == februus_threshold("gtsrb_sample") == 0.8
    assert februus_threshold("cifar10") == februus_threshold("cifar10_subset") == 0.7
