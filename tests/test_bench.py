"""bench/bench_layout.py: it times both layouts of each case and writes its JSON record (the
speed figures themselves are the benchmark's business, not the tests')."""

from __future__ import annotations

import json

import pytest
from conftest import load_script


@pytest.fixture(scope="module")
def bench():  # type: ignore[no-untyped-def]
    return load_script("bench/bench_layout.py")


def test_writes_both_layouts_of_every_case(bench, tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "speed.json"
    argv = ["--width", "2", "--image-size", "16", "--batch-size", "5", "--generator-width", "2",
            "--steps", "2", "--warmup", "1", "--threads", "1", "--out", str(out)]
    assert bench.main(argv) == 0
    record = json.loads(out.read_text())
    assert record["benchmark"] == "train_layout"
    assert set(record["results"]) == {"classifier", "multinomial"}
    for case in record["results"].values():
        for layout in ("contiguous", "channels_last"):
            r = case[layout]
            assert r["timed_steps"] == 2
            assert 0 < r["min_step_seconds"] <= r["median_step_seconds"]
        assert case["channels_last_speedup"] == pytest.approx(
            case["contiguous"]["median_step_seconds"] / case["channels_last"]["median_step_seconds"]
        )
    multi = record["results"]["multinomial"]["contiguous"]
    assert multi["classifier_images_per_second"] == pytest.approx(2 * multi["rows_per_second"])
    assert record["peak_rss_mib"] > 0 and record["environment"]["threads"] == 1


def test_refuses_unknown_cases_and_no_warmup(bench, tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SystemExit):
        bench.main(["--cases", "classifier,nope", "--out", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit):
        bench.main(["--warmup", "0", "--out", str(tmp_path / "x.json")])
    assert not (tmp_path / "x.json").exists()


def _tiny_imagefolder(root, classes: int = 3, train: int = 12, test: int = 4) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("test", test)):
        for c in range(classes):
            folder = root / split / f"{c:05d}"
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def test_baselines_bench_runs_every_point_and_reads_finished_ones_back(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    bench = load_script("bench/bench_baselines.py")
    monkeypatch.setenv("VEIL_CACHE", str(tmp_path / "cache"))
    datasets = tmp_path / "datasets"
    _tiny_imagefolder(datasets / "gtsrb")
    _tiny_imagefolder(datasets / "cifar10-subset")
    out = tmp_path / "baselines.json"
    argv = ["--datasets", str(datasets), "--attacks", "blend,none", "--runs", str(tmp_path / "runs"),
            "--set", "width=2", "--set", "epochs=1", "--set", "stealth_samples=4", "--device", "cpu",
            "--threads", "1", "--no-progress", "--out", str(out)]
    assert bench.main(argv) == 0
    record = json.loads(out.read_text())
    assert record["benchmark"] == "baselines" and record["overrides"]["epochs"] == 1
    rows = record["results"]
    assert sorted((r["attack"], r["dataset"]) for r in rows) == [
        ("blend", "gtsrb"), ("blend", "imagefolder"), ("none", "gtsrb"), ("none", "imagefolder")]
    for r in rows:
        assert r["status"] == "trained" and 0 <= r["attack_success_rate"] <= 1
        assert r["train_size"] == 36 and r["optimizer_steps"] == 1 and r["images_seen"] == 36
        ref = next(x for x in rows if x["attack"] == "none" and x["dataset"] == r["dataset"])
        assert r["clean_reference_accuracy"] == ref["clean_accuracy"]
        if r["attack"] == "blend":
            assert r["clean_accuracy_drop"] == pytest.approx(ref["clean_accuracy"] - r["clean_accuracy"])
        assert r["veil_version"] and r["threads"] == 1
    # a second call reads the finished points back instead of training them again
    assert bench.main(argv) == 0
    assert {r["status"] for r in json.loads(out.read_text())["results"]} == {"skipped"}


def test_baselines_bench_refuses_an_attack_the_sweep_lacks(tmp_path) -> None:  # type: ignore[no-untyped-def]
    bench = load_script("bench/bench_baselines.py")
    with pytest.raises(SystemExit):
        bench.main(["--attacks", "nope", "--out", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit):
        bench.main(["--set", "epochs", "--out", str(tmp_path / "x.json")])
    assert not (tmp_path / "x.json").exists()


def test_eval_bench_runs_both_evaluations_and_their_final_figures_agree(tmp_path) -> None:  # type: ignore[no-untyped-def]
    bench = load_script("bench/bench_eval.py")
    out = tmp_path / "eval.json"
    argv = ["--set", "dataset=gtsrb_sample", "--set", "width=4", "--set", "epochs=2", "--set", "train_subset=430",
            "--set", "test_subset=215", "--set", "stealth_samples=8", "--runs", str(tmp_path / "runs"), "--out", str(out)]
    assert bench.main(argv) == 0
    record = json.loads(out.read_text())
    old, new = record["runs"]
    assert (old["eval_images"], new["eval_images"]) == ("all", "auto")
    assert old["eval_images_during_training"] == 215 and new["eval_images_during_training"] == 43
    assert record["same_final_figures"] is True
    assert [c["epoch"] for c in old["curve"]] == [1, 2]
    for r in (old, new):
        assert r["train_seconds"] > 0 and 0 < r["eval_share_of_training"] < 10
    assert bench.main(argv) == 0  # finished runs are read back, not retrained
    assert json.loads(out.read_text())["runs"][0]["train_seconds"] == old["train_seconds"]
    with pytest.raises(SystemExit):
        bench.main(["--set", "eval_images=all", "--out", str(tmp_path / "x.json")])
