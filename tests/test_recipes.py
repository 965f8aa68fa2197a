"""Named recipes: every bundled one is valid and runnable, flags override a recipe's settings,
bad recipes and bad recipe names get one clear error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_cli

from veil.errors import ConfigError
from veil.recipes import RECIPES_DIR, list_recipes, load_recipe, parse_recipe
from veil.runs import RunConfig




def test_bundled_recipes_are_valid_and_named_after_their_path():
    names = list_recipes()
    assert {"badnets/gtsrb-cpu", "badnets/cifar10subset-cpu", "sig/gtsrb-cpu", "sig/cifar10subset-cpu",
            "multinomial/gtsrb32-cpu", "multinomial/gtsrb32-cpu-clean", "multinomial/gtsrb32-cpu-sweep"} <= set(names)
    assert len(names) == len(list(RECIPES_DIR.glob("*/*.yaml")))
    for name in names:
        recipe = load_recipe(name)
        assert recipe.name == name and recipe.scale in ("cpu", "gpu")
        assert recipe.attack == name.split("/")[0]
        for m in recipe.measured:
            assert m.date.startswith("2026-") and m.veil_version and m.machine
        if recipe.kind == "run":
            config = recipe.run_config({"data_root": "data"}, out="out")
            assert isinstance(config, RunConfig) and config.attack in (recipe.attack, "none") and config.recipe == name
        else:
            spec = recipe.sweep_spec("data", "out")
            assert spec["base"]["data_root"] == "data" and spec["out"] == "out"


def test_flags_override_a_recipe_and_attack_options_merge():
    recipe = load_recipe("sig/gtsrb-cpu")
    config = recipe.run_config({"epochs": 1, "attack_options": {"freq": 4}, "data_root": "d"}, out="o")
    assert config.epochs == 1 and config.target == 2 and config.poison_rate == 1.0
    assert config.attack_options == {"test_delta": 40, "freq": 4}
    config = recipe.run_config({"attack_options": {"test_delta": 30}}, out="o")
    assert config.attack_options == {"test_delta": 30} and config.epochs == 4
    with pytest.raises(ConfigError, match="epochs = 'four' is not a valid integer"):
        recipe.run_config({"epochs": "four"}, out="o")
    with pytest.raises(ConfigError, match="has no option"):
        recipe.run_config({"attack_options": {"nosuch": 1}}, out="o")


GOOD = {
    "name": "badnets/x-cpu",
    "scale": "cpu",
    "stands_for": "a test",
    "description": "a test recipe",
    "run": {"attack": "badnets", "dataset": "gtsrb_sample", "model": "preact_resnet18"},
    "measured": [{"metric": "attack_success_rate", "value": 1.0, "date": "2026-12-02", "veil_version": "0.1.0",
                  "machine": "2 cores"}],
}


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"nosuch": 1}, "unknown key 'nosuch'"),
        ({"name": "badnets/y-cpu"}, "it must be the file's path"),
        ({"scale": "tpu"}, "'scale' must be one of cpu, gpu"),
        ({"run": {"attack": "sig", "dataset": "gtsrb_sample", "model": "preact_resnet18"}}, "the recipe's name says 'badnets'"),
        ({"run": {"attack": "badnets", "dataset": "gtsrb_sample", "model": "m", "data_root": "x"}}, "must not set 'data_root'"),
        ({"run": {"attack": "badnets", "epochs": "four"}}, "not a valid integer"),
        ({"sweep": {"base": {}}}, "exactly one of 'run'"),
        ({"measured": [{"metric": "asr", "value": 1.0}]}, "date, veil_version, machine missing"),
        ({"measured": [{"metric": "asr", "value": "high", "date": "d", "veil_version": "v", "machine": "m"}]}, "is not a number"),
        ({"stands_for": ""}, "'stands_for' must be a non-empty string"),
    ],
)
def test_bad_recipes_name_the_problem(change, expected):
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        parse_recipe({**GOOD, **change}, "badnets/x-cpu", Path("x.yaml"))


def test_recipes_command_lists_every_recipe_with_its_figures(capsys):
    code, out, _ = run_cli(["recipes"], capsys)
    assert code == 0
    for name in list_recipes():
        assert f"{name}  [" in out
    assert "measured: attack_success_rate = 0.9260  [2026-12-02, veil 0.1.0" in out
    code, out, _ = run_cli(["recipes", "--attack", "sig", "-l"], capsys)
    assert code == 0 and "badnets/" not in out and "--data-root: the folder holding gtsrb/" in out


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["run", "--recipe", "nosuch/x", "--out", "o"], "unknown recipe 'nosuch/x'; known recipes: adaptive/"),
        (["run", "--recipe", "sig/gtsrb-cpu"], "veil run needs --out"),
        (["run", "--dataset", "gtsrb_sample", "--out", "o"], "veil run needs --attack, --model"),
        (["run", "--recipe", "multinomial/gtsrb32-cpu-sweep", "--out", "o"], "is a sweep; run it with veil sweep --recipe"),
        (["sweep", "--recipe", "sig/gtsrb-cpu", "--out", "o"], "is a single run; run it with veil run --recipe"),
        (["sweep", "--recipe", "multinomial/gtsrb32-cpu-sweep"], "needs --out"),
        (["sweep"], "needs a sweep file or --recipe NAME"),
    ],
)
def test_bad_recipe_commands_get_one_clear_line(tmp_path, capsys, monkeypatch, args, expected):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(args, capsys)
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.startswith("veil: error:")]
    assert len(lines) == 1 and expected in lines[0], err


def test_run_from_a_recipe_records_it_and_the_overrides(tmp_path, capsys, gtsrb_root):
    out = tmp_path / "run"
    code, _, err = run_cli(["run", "--recipe", "badnets/gtsrb-cpu", "--data-root", str(gtsrb_root), "--width", "8",
                            "--epochs", "1", "--train-subset", "860", "--test-subset", "215", "--stealth-samples", "16",
                            "--out", str(out)], capsys)
    assert code == 0, err
    config = json.loads((out / "config.json").read_text())
    assert config["recipe"] == "badnets/gtsrb-cpu" and config["attack"] == "badnets"
    assert config["width"] == 8 and config["epochs"] == 1 and config["poison_rate"] == 0.1 and config["target"] == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["attack_success_rate"] <= 1.0
    # a finished run is not overwritten, with or without the recipe
    code, _, err = run_cli(["run", "--attack", "badnets", "--dataset", "gtsrb", "--model", "preact_resnet18",
                            "--data-root", str(gtsrb_root), "--width", "8", "--epochs", "1", "--train-subset", "860",
                            "--test-subset", "215", "--stealth-samples", "16", "--out", str(out)], capsys)
    assert code == 2 and "already holds a finished run" in err


def test_every_recipe_a_log_note_or_docstring_names_exists():
    import re

    import veil.attacks as attacks_pkg
    from veil.attacks import ATTACKS

    known = set(list_recipes())
    pattern = re.compile(r"\b([a-z]+/[a-z0-9]+-(?:cpu|gpu)(?:-[a-z0-9]+)?)\b")
    texts = [Path(attacks_pkg.__file__).parent.joinpath(f).read_text() for f in ("sig.py", "fiba.py", "wanet.py")]
    named = {m for text in texts for m in pattern.findall(text)}
    assert named, "the attacks' notes name their recipes"
    assert named <= known, sorted(named - known)
    assert set(ATTACKS.names()) >= {r.split("/")[0] for r in known}


def _config(*argv):
    from veil.cli import _run_config, build_parser

    return _run_config(build_parser().parse_args(["run", *argv]))


def test_an_attack_runs_its_papers_training_unless_told_otherwise_and_says_where_each_setting_came_from():
    from veil.attacks import ATTACKS

    paper = ATTACKS.get("multinomial").paper_training
    assert paper["optimizer"] == "adam" and paper["batch_size"] == 16 and paper["epochs"] == 110
    c = _config("--attack", "multinomial", "--dataset", "gtsrb", "--model", "preact_resnet18", "--out", "o", "--lr", "0.01")
    assert (c.optimizer, c.batch_size, c.epochs, c.image_size, c.base_augment, c.poison_rate) == ("adam", 16, 110, 128, False, 1.0)
    assert c.lr == 0.01 and c.sources["lr"] == "user" and c.sources["optimizer"] == "paper"
    assert c.sources["seed"] == "veil default" and "out" not in c.sources
    # a paper that gives no training settings: veil's defaults
    c = _config("--attack", "badnets", "--dataset", "gtsrb", "--model", "preact_resnet18", "--out", "o")
    assert (c.optimizer, c.lr, c.epochs) == ("sgd", 0.05, 4) and set(c.sources.values()) == {"user", "veil default"}
    # a recipe's settings sit between the user's and the paper's
    c = _config("--recipe", "sig/gtsrb-cpu", "--out", "o", "--seed", "3")
    assert c.sources["target"] == "recipe" and c.sources["seed"] == "user" and c.seed == 3 and c.recipe == "sig/gtsrb-cpu"
    assert c.sources["attack_options"] == "recipe"


def test_a_sweep_point_takes_the_papers_settings_it_leaves_unset():
    from veil.sweep import parse_sweep

    sweep = parse_sweep({"out": "o", "base": {"attack": "multinomial", "dataset": "gtsrb_sample", "model": "preact_resnet18",
                                               "epochs": 2}, "grid": {"seed": [0, 1]}})
    (_, a), (_, b) = sweep.points()
    assert a.epochs == 2 and a.sources["epochs"] == "user" and a.optimizer == "adam" and a.sources["optimizer"] == "paper"
    assert b.seed == 1 and b.sources["seed"] == "user"
