"""Patch processing (Doan et al., AAAI 2023) on a tiny vision transformer with a planted one-patch
backdoor, the ViT's processed forward, and the defense on a ``vit_small`` run record."""

from __future__ import annotations

import pytest
import torch

from test_defenses_algorithms import CLASSES, SIZE, TARGET, colours, plant, stamp
from veil.data.base import to_float, to_uint8
from veil.defenses import run_defense
from veil.defenses.patch_processing import calibrate, flag, patch_scores
from veil.errors import ConfigError
from veil.experiment import RunConfig, run_experiment
from veil.models.vit import VisionTransformer
from veil.train import TrainConfig, Trainer, predict


pytestmark = pytest.mark.usefixtures("one_thread")


class PlantedViT:
    """A two-block ViT (16 patches of 4x4) trained in seconds on the colour classes, 40 of whose
    training images carry the checkerboard in the bottom-right patch and label 0."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        train, self.test = colours(600, seed=1), colours(300, seed=2)
        data = plant(train, 40)
        self.model = VisionTransformer(CLASSES, width=32, image_size=SIZE, patch_size=4, depth=2, num_heads=2)
        cfg = TrainConfig(epochs=6, batch_size=32, lr=0.003, optimizer="adam", weight_decay=0.0, augment=False, seed=0,
                          checkpoint_every=0, warmup_epochs=0.0)
        Trainer(self.model, data, cfg, device="cpu", progress=False).fit()
        self.model.eval()
        self.triggered = to_uint8(stamp(to_float(self.test.images[self.test.labels != TARGET])))


@pytest.fixture(scope="module")
def planted() -> PlantedViT:
    torch.set_num_threads(1)
    return PlantedViT()


def test_processed_forward_is_the_forward_without_processing_and_checks_indices():
    torch.manual_seed(0)
    m = VisionTransformer(CLASSES, width=32, image_size=SIZE, patch_size=4, depth=2, num_heads=2).eval()
    x = torch.rand(3, 3, SIZE, SIZE)
    ref = m(x)
    assert torch.allclose(m.processed_forward(x), ref, atol=1e-5)
    assert torch.allclose(m.processed_forward(x, order=torch.arange(16).expand(3, -1)), ref, atol=1e-5)
    assert torch.allclose(m.processed_forward(x, keep=torch.arange(16).expand(3, -1)), ref, atol=1e-5)
    # shuffling moves content over the fixed positions: the output changes
    perm = torch.stack([torch.randperm(16) for _ in range(3)])
    assert not torch.allclose(m.processed_forward(x, order=perm), ref, atol=1e-4)
    assert m.processed_forward(x, keep=torch.arange(4).expand(3, -1)).shape == (3, CLASSES)
    with pytest.raises(ConfigError, match="patch indices"):
        m.processed_forward(x, keep=torch.full((3, 2), 16))
    with pytest.raises(ConfigError, match="permute all 16"):
        m.processed_forward(x, order=torch.arange(8).expand(3, -1))


def test_patch_drop_exposes_the_planted_patch_trigger(planted):
    m = planted.model
    assert float((predict(m, planted.test.images) == planted.test.labels).float().mean()) > 0.95
    assert float((predict(m, planted.triggered) == TARGET).float().mean()) > 0.95
    _, cal_drop, cal_shuffle = patch_scores(m, planted.test.images[:150], trials=20, drop_ratio=0.25, seed=1)
    y, drop_clean, shuffle_clean = patch_scores(m, planted.test.images[150:], trials=20, drop_ratio=0.25, seed=2)
    _, drop_bad, shuffle_bad = patch_scores(m, planted.triggered, trials=20, drop_ratio=0.25, seed=3)
    # the trigger's patch is one of 16 and 4 are dropped: about a quarter of the trials lose it
    assert 0.15 <= float(drop_bad.mean()) <= 0.35 and float(drop_clean.mean()) < 0.02
    assert bool(((drop_clean >= 0) & (drop_clean <= 1) & (shuffle_clean >= 0) & (shuffle_clean <= 1)).all())
    t_drop, t_shuffle = calibrate(cal_drop, cal_shuffle, 0.05)
    assert float(flag(drop_bad, shuffle_bad, t_drop, t_shuffle).float().mean()) > 0.9
    assert float(flag(drop_clean, shuffle_clean, t_drop, t_shuffle).float().mean()) < 0.1
    # deterministic under the seed, whatever the batch size
    again = patch_scores(m, planted.triggered, trials=20, drop_ratio=0.25, seed=3, batch_size=7)
    assert torch.equal(again[1], drop_bad) and torch.equal(again[2], shuffle_bad)
    assert not torch.equal(patch_scores(m, planted.triggered, trials=20, drop_ratio=0.25, seed=4)[1], drop_bad)


def _vit_run(root, attack: str):
    out = root / attack
    run_experiment(RunConfig(attack=attack, dataset="gtsrb_sample", model="vit_small", epochs=1, train_subset=430,
                             test_subset=215, out=str(out), device="cpu", progress=False, stealth_samples=16))
    return out


def test_patch_processing_on_a_vit_run_and_its_errors(tmp_path):
    run = _vit_run(tmp_path, "badnets")
    r = run_defense("patch_processing", run, progress=False, clean_images=86, test_images=20, trials=3)
    assert r.defense == "patch_processing" and 0 <= r.metrics["tpr"] <= 1 and 0 <= r.metrics["fpr"] <= 1
    assert r.extra["triggered_test_inputs"] == 20 and r.extra["clean_images"] == 86
    assert 0 <= r.extra["attack_success_rate_after"] <= r.extra["attack_success_rate"] <= 1
    assert 0 <= r.extra["clean_accuracy_after"] <= r.extra["clean_accuracy"] <= 1
    assert (run / "defenses" / "patch_processing" / "tables" / "patch_processing.json").exists()
    cnn = tmp_path / "cnn"
    run_experiment(RunConfig(attack="badnets", dataset="gtsrb_sample", model="preact_resnet18", width=4, epochs=1,
                             train_subset=430, test_subset=215, out=str(cnn), device="cpu", progress=False, stealth_samples=16))
    with pytest.raises(ConfigError, match="needs a vision transformer"):
        run_defense("patch_processing", cnn, progress=False, clean_images=86)
    assert not (cnn / "defenses" / "patch_processing").exists()
    for bad, match in (({"drop_ratio": 1.0}, "drop_ratio"), ({"trials": 0}, "trials"), ({"frr": 0.7}, "frr")):
        with pytest.raises(ConfigError, match=match):
            run_defense("patch_processing", run, progress=False, **bad)
