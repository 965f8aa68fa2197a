"""Real GTSRB at small scale: the trainer, an attack and the metrics together."""

from __future__ import annotations

import pytest

from veil.experiment import RunConfig, run_experiment


@pytest.mark.slow
def test_badnets_on_real_gtsrb_subset(tmp_path, gtsrb_root, weights_dir):
    config = RunConfig(
        attack="badnets",
        dataset="gtsrb",
        data_root=str(gtsrb_root),
        model="preact_resnet18",
        width=16,
        epochs=5,
        batch_size=32,
        lr=0.05,
        attack_options={"patch_size": 4},
        train_subset=10000,
        test_subset=2000,
        poison_rate=0.1,
        target=0,
        seed=0,
        out=str(tmp_path / "badnets"),
        device="cpu",
        lpips_weights=str(weights_dir),
        progress=False,
    )
    m = run_experiment(config)
    assert m["clean_accuracy"] >= 0.80
    assert m["attack_success_rate"] >= 0.90
    assert m["poison_count"] == 1000
    s = m["stealth"]
    assert s["linf"] >= 250 and 0 < s["lpips"] < 0.05
    assert 15 < s["psnr"] < 40 and 0.95 < s["ssim"] < 1
