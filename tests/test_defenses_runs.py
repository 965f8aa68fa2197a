"""Every model-inspection defense through ``run_defense`` and ``veil defend`` on tiny run records
(a BadNets run and a clean reference run on the bundled GTSRB sample), with the report and the
errors a user can cause."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from veil.cli import main
from veil.defenses import (
    DetectionResult,
    MitigationResult,
    create_defense,
    list_defenses,
    load_result,
    run_defense,
)
from veil.errors import ConfigError
from veil.experiment import RunConfig, run_experiment

PNG = b"\x89PNG\r\n\x1a\n"

#: small budgets: every defense runs in a second or two on a width-4 PreAct-ResNet-18
TINY: dict[str, dict] = {
    "neural_cleanse": {"clean_images": 50, "steps": 3, "batch_size": 2, "epoch_steps": 1},
    "fine_pruning": {"clean_images": 86, "finetune_epochs": 1, "finetune_batch_size": 32},
    "strip": {"clean_images": 86, "superimpose": 4, "test_images": 20},
    "gradcam": {"clean_images": 43, "test_images": 20, "examples": 3},
    "spectral_signatures": {},
    "activation_clustering": {"clean_images": 86},
    "ftd": {"clean_images": 86, "rounds": 1, "epochs": 1, "test_images": 20},
    "nad": {"clean_fraction": 0.2, "epochs": 2, "teacher_epochs": 1, "lr_drop_epoch": 1, "batch_size": 32},
    "mntd": {"shadow_models": 2, "shadow_images": 86, "shadow_epochs": 1, "queries": 2, "meta_epochs": 2},
}
FIGURES = {
    "neural_cleanse": ["neural_cleanse_norms.png", "neural_cleanse_triggers.png"],
    "fine_pruning": ["fine_pruning_curve.png"],
    "strip": ["strip_entropy.png"],
    "gradcam": ["gradcam_examples.png"],
    "spectral_signatures": ["spectral_signatures.png"],
    "activation_clustering": ["activation_clustering.png"],
    "nad": [],
    "ftd": [],
    "mntd": [],
}


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _run(root, attack: str):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = root / attack
    try:
        run_experiment(RunConfig(
            attack=attack, dataset="gtsrb_sample", model="preact_resnet18", width=4, epochs=1, train_subset=430,
            test_subset=215, out=str(out), device="cpu", progress=False, stealth_samples=16,
        ))
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inspection")
    return {"badnets": _run(root, "badnets"), "none": _run(root, "none")}


def test_all_six_are_registered_with_their_kind():
    assert set(TINY) <= set(list_defenses())
    assert {"neural_cleanse", "strip", "spectral_signatures", "activation_clustering", "ftd"} <= set(list_defenses("detector"))
    assert {"fine_pruning", "gradcam", "nad"} <= set(list_defenses("mitigator"))
    for name in TINY:
        d = create_defense(name)
        assert d.describe()["name"] == name


@pytest.mark.parametrize("name", sorted(TINY))
@pytest.mark.parametrize("attack", ["badnets", "none"])
def test_each_defense_runs_on_a_run_record(runs, name, attack):
    run = runs[attack]
    result = run_defense(name, run, progress=False, **TINY[name])
    assert result.defense == name and result.run == str(run) and result.seconds > 0
    out = run / "defenses" / name
    # (compared as JSON: nan != nan)
    assert json.dumps(load_result(out / "result.json").to_dict()) == json.dumps(result.to_dict())
    for fig in FIGURES[name]:
        assert (out / "figures" / fig).read_bytes().startswith(PNG), fig
    tables = list((out / "tables").glob("*.json"))
    assert tables
    for t in tables:
        table = json.loads(t.read_text())
        assert {"title", "columns", "rows"} <= set(table)
        assert all(len(row) == len(table["columns"]) for row in table["rows"])
    if isinstance(result, MitigationResult):
        assert 0 <= result.clean_accuracy <= 1 and result.original_clean_accuracy is not None
        # robust accuracy and the defense effectiveness rate, wherever the defense measures ASR
        assert 0 <= result.robust_accuracy <= 1 and 0 <= result.original_robust_accuracy <= 1
        assert result.robust_accuracy + result.attack_success_rate <= 1 + 1e-9
        der = result.to_dict()["defense_effectiveness_rate"]
        assert 0 <= der <= 1 and der == result.defense_effectiveness_rate
    else:
        assert isinstance(result, DetectionResult)


def test_results_carry_the_numbers_each_paper_reports(runs):
    bad = runs["badnets"]
    nc = load_result(bad / "defenses" / "neural_cleanse" / "result.json")
    assert len(nc.extra["l1_norms"]) == 43 and nc.extra["targets"] == [0] and nc.threshold == 2.0
    assert {"suspected_is_target", "target_flagged"} <= set(nc.metrics) and nc.extra["optimisation_seconds"] > 0
    fp = load_result(bad / "defenses" / "fine_pruning" / "result.json")
    assert fp.curve[0]["pruned"] == 0 and fp.curve[-1]["pruned"] == fp.extra["channels"] == 32
    assert fp.extra["finetuned"]["epochs"] == 1 and fp.extra["layer"] == "features"
    st = load_result(bad / "defenses" / "strip" / "result.json")
    assert {"frr", "far", "auroc"} <= set(st.metrics) and 0 <= st.metrics["auroc"] <= 1
    gc = load_result(bad / "defenses" / "gradcam" / "result.json")
    rate = gc.extra["removal_rate"]  # nan when no triggered input reached the target (a 1-epoch model)
    assert gc.extra["layer"] == "layer4" and (math.isnan(rate) or 0 <= rate <= 1)
    assert gc.extra["restore"] == "inpaint" and set(gc.extra["variants"]) == {"inpaint", "mean"}
    assert gc.clean_accuracy == gc.extra["variants"]["inpaint"]["clean_accuracy"]
    assert 0 <= gc.extra["trigger_heat"] <= 1 and 0 <= gc.extra["other_heat"] <= 1
    assert gc.extra["threshold"] == 0.8  # the official Februus release's GTSRB value, the default on GTSRB
    for name in ("spectral_signatures", "activation_clustering"):
        r = load_result(bad / "defenses" / name / "result.json")
        assert {"tpr", "fpr"} <= set(r.metrics) and r.extra["poisoned_count"] == 43
    nad = load_result(bad / "defenses" / "nad" / "result.json")
    assert nad.extra["layer"] == "layer4" and nad.extra["clean_images"] == 86 and len(nad.curve) == 2
    assert all(p["attention_loss"] >= 0 for p in nad.curve) and {"clean_accuracy", "attack_success_rate"} <= set(nad.extra["teacher"])
    ftd = load_result(bad / "defenses" / "ftd" / "result.json")
    assert {"accuracy", "tpr", "fpr", "auroc"} <= set(ftd.metrics) and ftd.extra["triggered_test_inputs"] == 20
    assert ftd.score == ftd.metrics["accuracy"] and 0 <= ftd.score <= 1
    mntd = load_result(bad / "defenses" / "mntd" / "result.json")
    assert mntd.threshold == 0.5 and 0 <= mntd.score <= 1 and mntd.detected == (mntd.score > 0.5)
    assert mntd.extra["scale"]["shadow_models_per_kind"] == 2 and len(mntd.extra["heldout_scores"]) == 2
    assert len(mntd.extra["shadow_accuracy"]) == 4 and len(mntd.extra["shadow_asr"]) == 2
    assert 0 <= mntd.extra["suspect_accuracy"] <= 1
    # the shadows sit in a subfolder named by the architecture and a digest of their settings
    shadows = list((bad / "defenses" / "mntd" / "shadows").glob("preact_resnet18-*/shadow*.safetensors"))
    assert len(shadows) == 4, shadows
    clean = load_result(runs["none"] / "defenses" / "spectral_signatures" / "result.json")
    assert clean.extra["poisoned_count"] == 0 and math.isnan(clean.metrics["tpr"])  # no poison
    assert load_result(runs["none"] / "defenses" / "neural_cleanse" / "result.json").metrics == {}


def test_report_embeds_the_defense_figures(runs, tmp_path):
    from veil.report.html import write_report

    for run in runs.values():  # results are there whatever order the tests ran in
        for name in ("neural_cleanse", "strip"):
            if not (run / "defenses" / name / "result.json").is_file():
                run_defense(name, run, progress=False, **TINY[name])
    html = write_report(list(runs.values()), tmp_path / "report.html").read_text()
    for fig in ("neural_cleanse_norms.png", "neural_cleanse_triggers.png", "strip_entropy.png"):
        assert f"defenses/neural_cleanse/figures/{fig}" in html or f"defenses/strip/figures/{fig}" in html
    assert "Neural Cleanse" in html and "STRIP" in html


def test_neural_cleanse_is_deterministic_under_its_seed(runs, tmp_path):
    opts = {**TINY["neural_cleanse"], "labels": [0, 1, 2, 3]}
    a = run_defense("neural_cleanse", runs["badnets"], out_dir=tmp_path / "a", progress=False, **opts)
    b = run_defense("neural_cleanse", runs["badnets"], out_dir=tmp_path / "b", progress=False, **opts)
    assert a.extra["l1_norms"] == b.extra["l1_norms"] and a.extra["labels"] == [0, 1, 2, 3]
    # 3 steps stop no label early: every one is reported as still moving when the budget ended
    assert a.extra["steps"] == [3, 3, 3, 3] and a.extra["unconverged_labels"] == [0, 1, 2, 3]
    c = run_defense("neural_cleanse", runs["badnets"], out_dir=tmp_path / "c", progress=False, seed=1, **opts)
    assert c.extra["l1_norms"] != a.extra["l1_norms"]


def test_gradcam_explains_clean_images_with_a_reference_model(runs, tmp_path):
    r = run_defense("gradcam", runs["badnets"], out_dir=tmp_path, progress=False, **{**TINY["gradcam"], "examples": 2},
                    reference=str(runs["none"]))
    assert r.extra["reference_run"] == str(runs["none"])
    assert (tmp_path / "figures" / "gradcam_examples.png").read_bytes().startswith(PNG)


def _cli(args, capsys):
    code = main(["-q", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_defend_runs_and_prints_a_summary(runs, tmp_path, capsys):
    code, out, err = _cli(["defend", "strip", "--run", str(runs["badnets"]), "--device", "cpu", "--out", str(tmp_path),
                           "--opt", "clean_images=86", "--opt", "superimpose=4", "--opt", "test_images=10"], capsys)
    assert code == 0, err
    assert out.startswith(f"{runs['badnets']}: strip:") and "result.json" in out
    assert load_result(tmp_path / "result.json").extra["superimpose"] == 4


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["defend", "nosuch"], "unknown defense 'nosuch'"),
        (["defend", "strip", "--opt", "clean_images=100000"], "clean_images=100000 is larger than the 215 test images"),
        (["defend", "strip", "--opt", "clean_source=train", "--opt", "clean_images=1000"],
         "larger than the run's 430 clean training images"),
        (["defend", "neural_cleanse", "--opt", "steps=0"], "steps must be an integer >= 1"),
        (["defend", "neural_cleanse", "--opt", "labels=[0,1,99]"], "labels [99] are outside"),
        (["defend", "neural_cleanse", "--opt", "labels=[0,1]"], "at least 3 distinct labels"),
        (["defend", "fine_pruning", "--opt", "layer=nosuch", "--opt", "clean_images=50"], "has no layer 'nosuch'"),
        (["defend", "gradcam", "--opt", "threshold=1.5"], "threshold must be in (0.0, 1.0]"),
        (["defend", "strip", "--opt", "blend=multiply"], "blend must be 'add' or 'average'"),
        (["defend", "activation_clustering", "--opt", "analysis=exclusion"], "analysis must be 'reference' or 'size'"),
        (["defend", "spectral_signatures", "--opt", "train_images=5000"], "train_images=5000 is larger than"),
        (["defend", "spectral_signatures", "--opt", "nosuch=1"], "has no option(s) nosuch"),
        (["defend", "nad", "--opt", "clean_fraction=1.5"], "clean_fraction must be in (0.0, 1.0]"),
        (["defend", "nad", "--opt", "layer=nosuch"], "has no layer 'nosuch'; its stages: layer1"),
        (["defend", "nad", "--opt", "lr=-1"], "NAD lr must be a positive number"),
        (["defend", "ftd", "--opt", "clean_images=100000"], "larger than the run's 430 clean training images"),
        (["defend", "ftd", "--opt", "lr=0"], "FTD lr must be a positive number"),
    ],
)
def test_bad_input_gets_one_clear_line(runs, tmp_path, capsys, args, expected):
    args = [*args[:2], "--run", str(runs["badnets"]), "--out", str(tmp_path / "out"), *args[2:]]
    code, _, err = _cli(args, capsys)
    assert code == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("veil: error:")]
    assert len(lines) == 1 and expected in lines[0], err


def test_a_run_without_weights_is_refused(runs, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(runs["badnets"], broken, ignore=shutil.ignore_patterns("defenses"))
    (broken / "model.safetensors").unlink()
    code, _, err = _cli(["defend", "neural_cleanse", "--run", str(broken)], capsys)
    assert code == 2 and "veil: error:" in err and "model.safetensors" in err
    code, _, err = _cli(["defend", "strip", "--run", str(tmp_path / "missing")], capsys)
    assert code == 2 and "does not exist" in err
    with pytest.raises(ConfigError, match="clean_source must be 'test' or 'train', got 'val'"):
        create_defense("strip", clean_source="val")
