"""The defense API and the JPEG / autoencoder pre-processing defenses on a tiny real run."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil

import pytest
import torch

from veil.defenses import (
    DEFENSES,
    DetectionResult,
    JpegDefense,
    MitigationResult,
    create_defense,
    list_defenses,
    load_result,
    run_defense,
)
from veil.defenses.cli import add_parser, cmd_defend
from veil.errors import CheckpointError, ConfigError, RecordError
from veil.experiment import RunConfig, run_experiment

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _one_thread():
    """Small batches: one thread is fastest (two threads spin against each other when the
    machine's cores are shared)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A finished BadNets run on the bundled GTSRB sample (a few seconds)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("defense") / "badnets"
    try:
        run_experiment(RunConfig(
            attack="badnets", dataset="gtsrb_sample", model="preact_resnet18", width=4, epochs=1,
            train_subset=430, test_subset=215, out=str(out), device="cpu", progress=False, stealth_samples=16,
        ))
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="module")
def jpeg_result(tiny_run):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_defense("jpeg", tiny_run, qualities=[50, 90, 70], quality=90, examples=4, progress=False)
    finally:
        torch.set_num_threads(threads)


def test_registry_lists_the_preprocessing_defenses():
    assert {"jpeg", "autoencoder"} <= set(list_defenses())
    assert set(list_defenses("mitigator")) >= {"jpeg", "autoencoder"}
    assert list_defenses("detector") == [n for n in list_defenses() if DEFENSES.get(n).kind == "detector"]
    d = create_defense("jpeg", quality=80, qualities=(95, 80))
    assert isinstance(d, JpegDefense) and d.config.quality == 80 and d.describe()["qualities"] == [95, 80]


@pytest.mark.parametrize(
    "name, options, match",
    [
        ("nope", {}, "unknown defense 'nope'; known: .*jpeg"),
        ("jpeg", {"epochs": 3}, "no option.*epochs"),
        ("jpeg", {"quality": 0}, "1..100"),
        ("jpeg", {"qualities": [90, 101]}, "1..100"),
        ("jpeg", {"qualities": []}, "at least one"),
        ("autoencoder", {"epochs": 0}, "at least 1"),
    ],
)
def test_bad_names_and_options_are_config_errors(name, options, match):
    with pytest.raises(ConfigError, match=match):
        create_defense(name, **options)


def test_results_are_frozen_and_json_serialisable():
    r = MitigationResult(defense="x", clean_accuracy=0.9, attack_success_rate=0.1, curve=[{"q": torch.tensor(1)}])
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.clean_accuracy = 1.0  # type: ignore[misc]
    d = r.to_dict()
    assert d["kind"] == "mitigation" and d["curve"] == [{"q": 1}]
    json.dumps(d)
    det = DetectionResult(defense="y", detected=True, score=3.2, threshold=2.0, flagged=(0,))
    assert det.to_dict()["flagged"] == [0] and "score 3.2000" in det.summary()
    assert d["defense_effectiveness_rate"] is None  # no undefended figures


@pytest.mark.parametrize("before, after, expected", [
    ((0.95, 1.0), (0.93, 0.05), (0.95 - 0.02 + 1) / 2),  # BackdoorBench: (max(0, dASR) - max(0, dACC) + 1) / 2
    ((0.95, 1.0), (0.97, 1.0), 0.5),  # nothing removed; a higher accuracy is not rewarded
    ((0.95, 0.2), (0.05, 0.9), 0.05),  # a worse backdoor and a lost model
    ((0.9, 1.0), (0.9, 0.0), 1.0),
])
def test_defense_effectiveness_rate(before, after, expected):
    r = MitigationResult(defense="x", clean_accuracy=after[0], attack_success_rate=after[1],
                         original_clean_accuracy=before[0], original_attack_success_rate=before[1],
                         robust_accuracy=0.8, original_robust_accuracy=0.0)
    assert r.defense_effectiveness_rate == pytest.approx(expected)
    assert r.to_dict()["defense_effectiveness_rate"] == pytest.approx(expected)
    assert MitigationResult.from_dict(r.to_dict()) == r
    assert "robust accuracy 0.8000 (was 0.0000)" in r.summary() and f"DER {expected:.4f}" in r.summary()


def test_jpeg_defense_result_curve_and_files(tiny_run, jpeg_result):
    r = jpeg_result
    assert r.defense == "jpeg" and r.run == str(tiny_run) and r.seconds > 0
    for v in (r.clean_accuracy, r.attack_success_rate, r.original_clean_accuracy, r.original_attack_success_rate):
        assert 0.0 <= v <= 1.0
    assert [p["quality"] for p in r.curve] == [90, 70, 50]  # one point per quality, weakest first
    assert all(set(p) == {"quality", "clean_accuracy", "attack_success_rate", "robust_accuracy"} for p in r.curve)
    assert r.clean_accuracy == r.curve[0]["clean_accuracy"] and r.extra["quality"] == 90
    assert r.extra["test_size"] == 215 and r.extra["asr_test_size"] > 0
    assert r.config["qualities"] == [90, 70, 50]

    out = tiny_run / "defenses" / "jpeg"
    assert load_result(out / "result.json") == r
    for fig in ("jpeg_curve.png", "jpeg_examples.png"):
        assert (out / "figures" / fig).read_bytes().startswith(PNG)
    table = json.loads((out / "tables" / "jpeg_curve.json").read_text())
    assert set(table) == {"title", "columns", "rows"} and len(table["rows"]) == 1 + len(r.curve)
    assert all(len(row) == len(table["columns"]) for row in table["rows"])

    from veil.report.html import write_report

    html = write_report([tiny_run], tiny_run.parent / "report.html").read_text()
    assert "defenses/jpeg/figures" in html and "JPEG defense" in html


def test_quality_outside_the_sweep_is_evaluated_separately(tiny_run, tmp_path):
    r = run_defense(
        "jpeg", tiny_run, quality=85, qualities=[60], examples=0, test_subset=60, out_dir=tmp_path, progress=False,
        reference=str(tiny_run),  # a run as its own "clean baseline": same numbers
    )
    assert [p["quality"] for p in r.curve] == [60] and r.extra["quality"] == 85
    assert r.curve[0]["reference_clean_accuracy"] == r.curve[0]["clean_accuracy"]
    assert r.extra["reference_clean_accuracy"] == r.original_clean_accuracy
    assert r.extra["test_size"] == 60 and (tmp_path / "result.json").is_file()
    assert not (tmp_path / "figures" / "jpeg_examples.png").exists()


def test_autoencoder_defense_trains_once_and_reports(tiny_run, tmp_path):
    r = run_defense("autoencoder", tiny_run, epochs=1, examples=2, test_subset=60, out_dir=tmp_path, progress=False)
    assert 0 <= r.clean_accuracy <= 1 and 0 <= r.attack_success_rate <= 1 and r.curve == []
    assert r.extra["reconstruction_mse"] > 0
    weights = tmp_path / "autoencoder.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert (tmp_path / "figures" / "autoencoder_examples.png").read_bytes().startswith(PNG)
    assert json.loads((tmp_path / "tables" / "autoencoder.json").read_text())["rows"][1][0] == "autoencoder"
    again = run_defense("autoencoder", tiny_run, epochs=1, examples=0, test_subset=60, out_dir=tmp_path, progress=False)
    assert weights.stat().st_mtime_ns == stamp  # cached autoencoder reused
    assert again.clean_accuracy == r.clean_accuracy and again.attack_success_rate == r.attack_success_rate



def test_autoencoder_dir_shares_one_autoencoder_between_result_folders(tiny_run, tmp_path):
    shared = tmp_path / "autoencoders"
    a = run_defense("autoencoder", tiny_run, epochs=1, examples=0, test_subset=60, autoencoder_dir=str(shared),
                    out_dir=tmp_path / "a", progress=False)
    files = list(shared.glob("autoencoder-*.safetensors"))
    assert len(files) == 1 and not (tmp_path / "a" / "autoencoder.safetensors").exists()
    stamp = files[0].stat().st_mtime_ns
    b = run_defense("autoencoder", tiny_run, epochs=1, examples=0, test_subset=60, autoencoder_dir=str(shared),
                    out_dir=tmp_path / "b", progress=False)
    assert files[0].stat().st_mtime_ns == stamp and b.clean_accuracy == a.clean_accuracy
    run_defense("autoencoder", tiny_run, epochs=2, examples=0, test_subset=60, autoencoder_dir=str(shared),
                out_dir=tmp_path / "c", progress=False)
    assert len(list(shared.glob("autoencoder-*.safetensors"))) == 2  # other options: another autoencoder

def test_bad_run_folders(tiny_run, tmp_path):
    with pytest.raises(RecordError, match="does not exist"):
        run_defense("jpeg", tmp_path / "missing", progress=False)
    broken = tmp_path / "broken"
    shutil.copytree(tiny_run, broken, ignore=shutil.ignore_patterns("defenses"))
    (broken / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors"):
        run_defense("jpeg", broken, progress=False)
    with pytest.raises(ConfigError, match="unknown defense"):  # checked before the run is read
        run_defense("nope", tmp_path / "missing")
    with pytest.raises(ConfigError, match="smaller than the number of classes"):
        run_defense("jpeg", tiny_run, test_subset=10, progress=False)


def _parse(argv):
    parser = argparse.ArgumentParser(prog="veil")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_cli_defend_prints_a_summary(tiny_run, tmp_path, capsys):
    args = _parse(["defend", "jpeg", "--run", str(tiny_run), "--qualities", "90,70", "--test-subset", "50",
                   "--device", "cpu", "--out", str(tmp_path), "--opt", "examples=0"])
    assert args.func is cmd_defend and args.qualities == (90, 70)
    assert cmd_defend(args) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{tiny_run}: jpeg: clean accuracy") and "attack success rate" in line
    assert load_result(tmp_path / "result.json").extra["test_size"] == 50

    with pytest.raises(ConfigError, match="unknown defense"):
        cmd_defend(_parse(["defend", "nope", "--run", str(tiny_run)]))
    with pytest.raises(ConfigError, match="no option.*quality"):
        cmd_defend(_parse(["defend", "autoencoder", "--run", str(tiny_run), "--quality", "80"]))
    with pytest.raises(SystemExit):
        _parse(["defend", "jpeg", "--run", str(tiny_run), "--qualities", "9x"])
