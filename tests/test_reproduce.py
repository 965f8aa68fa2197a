"""veil reproduce: every paper table plans at every scale; a (tiny) reproduction trains its steps
in order, passes a reference run on, fills the cells and reads finished runs back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import veil.recipes
import veil.reproduce
from veil.cli import main
from veil.errors import ConfigError
from veil.reproduce import build_table, list_papers, load_paper, plan, reproduce


def test_every_paper_table_plans_at_every_scale_with_the_papers_figures(tmp_path):
    assert {"frequency", "multinomial"} <= set(list_papers())
    for paper in list_papers():
        spec = load_paper(paper)
        for key, tspec in spec["tables"].items():
            for scale in tspec["scales"]:
                k, t, steps = plan(paper, key, scale, "data", tmp_path / f"{paper}-{scale}")
                assert k == key and steps and all(s.points for s in steps)
                table = build_table(paper, key, t, scale, steps)
                assert len(table["rows"]) == len(t["rows"])
                width = 1 + 2 * len(t["columns"]) * len(t["metrics"])
                assert all(len(r) == width for r in table["rows"]) and len(table["columns"]) == width
                assert table["runs"] == {}  # nothing trained here
    key, tspec, steps = plan("frequency", "3", "cpu", "d", tmp_path / "f")
    row = build_table("frequency", key, tspec, "cpu", steps)["rows"][-1]
    assert row[0] == "1500" and row[1:5] == ["75.36", "–", "100.00", "–"]


def test_unknown_papers_tables_and_scales_are_named(tmp_path, capsys):
    with pytest.raises(ConfigError, match="unknown paper 'nosuch'; veil reproduce knows adaptive, atteq, frequency"):
        plan("nosuch", None, "cpu", None, tmp_path)
    with pytest.raises(ConfigError, match="has no table '9'"):
        plan("frequency", "9", "cpu", None, tmp_path)
    assert main(["-q", "reproduce", "multinomial", "--table", "7", "--out", str(tmp_path)]) == 2
    assert "has no table '7'" in capsys.readouterr().err
    assert main(["-q", "reproduce"]) == 0
    assert "tables: 3 (cpu/paper)" in capsys.readouterr().out


def _write(path: Path, spec: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec), encoding="utf-8")


SMALL = {"dataset": "gtsrb_sample", "model": "preact_resnet18", "width": 4, "epochs": 1, "train_subset": 430,
         "test_subset": 215, "stealth_samples": 8, "base_augment": False, "target": 0, "seed": 0}


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """A paper file and two recipes on the bundled GTSRB sample: a clean reference, then a
    frequency sweep over two poison counts that reads its heatmap."""
    recipes, papers = tmp_path / "recipes", tmp_path / "papers"
    common = {"scale": "cpu", "stands_for": "a test", "description": "a test", "measured": []}
    _write(recipes / "frequency" / "tiny-cpu-reference.yaml",
           {**common, "name": "frequency/tiny-cpu-reference", "run": {"attack": "none", **SMALL}})
    _write(recipes / "frequency" / "tiny-cpu-table.yaml",
           {**common, "name": "frequency/tiny-cpu-table",
            "sweep": {"base": {"attack": "frequency", **SMALL, "attack_options": {"heatmap_images": 8}},
                      "grid": {"poison_count": [20, 40]}}})
    _write(papers / "tiny.yaml", {
        "paper": "tiny", "title": "A tiny paper",
        "tables": {"1": {
            "row_label": "|I_P|", "rows": ["20", "40", "80"], "columns": ["PreAct", "Other"],
            "metrics": ["clean_accuracy", "attack_success_rate"], "labels": ["CDA", "ASR"], "percent": [True, True],
            "paper": {"20": [[70.0, 50.0], [71.0, 51.0]], "40": [[70.5, 90.0], [71.5, 91.0]]},
            "scales": {"cpu": {
                "steps": [{"name": "reference", "recipe": "frequency/tiny-cpu-reference"},
                          {"name": "table", "recipe": "frequency/tiny-cpu-table", "reference_run": "reference"}],
                "cells": [{"step": "table", "row_key": "poison_count", "column": "PreAct"},
                          {"step": "reference", "row": "80", "column": "Other"}]}},
        }},
    })
    monkeypatch.setattr(veil.recipes, "RECIPES_DIR", recipes)
    monkeypatch.setattr(veil.reproduce, "PAPERS_DIR", papers)
    return tmp_path / "out"


def test_a_reproduction_trains_its_steps_in_order_and_fills_the_table(tiny, capsys):
    table = reproduce("tiny", "1", "cpu", out=tiny, progress=False)
    ref = tiny / "reference"
    points = sorted(p for p in (tiny / "table").iterdir() if (p / "metrics.json").is_file())
    assert [p.name for p in points] == ["poison_count=20", "poison_count=40"]
    for p in points:
        config = json.loads((p / "config.json").read_text())
        assert config["attack_options"]["reference_run"] == str(ref) and config["recipe"] == "frequency/tiny-cpu-table"
        assert config["sources"]["poison_count"] == "recipe" and config["sources"]["seed"] == "recipe"
    rows = {r[0]: r[1:] for r in table["rows"]}
    assert rows["20"][0] == "70.00" and rows["20"][1] != "–" and rows["40"][3] != "–"
    assert rows["80"][:4] == ["–"] * 4 and rows["80"][5] != "–"  # the reference's CDA in the Other column
    assert 0.0 <= float(rows["20"][3]) <= 100.0
    for name in ("table-1.md", "table-1.json", "report-1.html"):
        assert (tiny / name).is_file()
    assert "A tiny paper" not in (tiny / "table-1.md").read_text() and "tiny, Table 1" in (tiny / "table-1.md").read_text()
    # a second call reads the finished runs back
    before = {p: (p / "metrics.json").stat().st_mtime_ns for p in [ref, *points]}
    assert reproduce("tiny", "1", "cpu", out=tiny, progress=False)["rows"] == table["rows"]
    assert {p: (p / "metrics.json").stat().st_mtime_ns for p in before} == before
    # the command line's dry run lists them as finished, prints the table and writes nothing
    written = {p: p.stat().st_mtime_ns for p in tiny.glob("table-1.*")}
    assert main(["-q", "reproduce", "tiny", "--dry-run", "--out", str(tiny)]) == 0
    out = capsys.readouterr().out
    assert "finished  poison_count=40" in out and "to train" not in out
    assert "tiny, Table 1" in out and "wrote" not in out
    assert {p: p.stat().st_mtime_ns for p in tiny.glob("table-1.*")} == written and len(written) == 2


def test_a_step_may_read_a_sub_folder_of_the_data_root(tmp_path, monkeypatch):
    import veil.reproduce as reproduce_mod

    _, _, steps = plan("adaptive", "3", "cpu", "data", tmp_path / "a")
    roots = {s.name: s.points[0][1].data_root for s in steps}
    assert roots["hardtanh"] == "data" and Path(roots["cifar10-hardtanh"]) == Path("data") / "cifar10-subset"
    text = (reproduce_mod.PAPERS_DIR / "adaptive.yaml").read_text(encoding="utf-8")
    monkeypatch.setattr(reproduce_mod, "PAPERS_DIR", tmp_path)
    for bad in ("../elsewhere", "/abs"):
        (tmp_path / "adaptive.yaml").write_text(text.replace("data: cifar10-subset", f"data: {bad}"), encoding="utf-8")
        with pytest.raises(ConfigError, match="must be a sub-folder of the data root"):
            load_paper("adaptive")


def test_the_tables_of_a_paper_share_their_runs_and_cells_name_known_rows(tmp_path, monkeypatch):
    import veil.reproduce as reproduce_mod

    # semantic's Tables II and III and Figure 4 read the same runs: one folder, steps planned alike
    outs = {}
    for table in ("2", "3", "fig4"):
        _, _, steps = plan("semantic", table, "cpu", "data", tmp_path / "semantic-cpu")
        outs[table] = {s.name: s.out for s in steps}
    assert outs["2"]["semantic"] == outs["3"]["semantic"] == outs["fig4"]["semantic"]
    text = (reproduce_mod.PAPERS_DIR / "semantic.yaml").read_text(encoding="utf-8")
    monkeypatch.setattr(reproduce_mod, "PAPERS_DIR", tmp_path)
    for old, new, message in [
        ("{step: clean, row: Clean, column: GTSRB}", "{step: clean, row: Clen, column: GTSRB}", "unknown row 'Clen'"),
        ("{step: baselines, point: 0, row: BadNets, column: GTSRB}", "{step: baselines, point: 0, row: BadNets, column: GTSRB10}",
         "unknown column 'GTSRB10'"),
        ("{name: rates, recipe: semantic/gtsrb32-cpu-rates, reference_run: clean}\n",
         "{name: rates, recipe: semantic/gtsrb32-cpu-rates, reference_run: clean}\n          - {name: semantic2, recipe: semantic/gtsrb32-cpu}\n",
         None),
        ("- {name: semantic, recipe: semantic/gtsrb32-cpu, reference_run: clean}\n          - {name: rates",
         "- {name: semantic, recipe: semantic/gtsrb32-cpu-control, reference_run: clean}\n          - {name: rates",
         "step 'semantic' differs from the step of that name in another table"),
    ]:
        assert old in text
        (tmp_path / "semantic.yaml").write_text(text.replace(old, new, 1), encoding="utf-8")
        if message is None:
            load_paper("semantic")
        else:
            with pytest.raises(ConfigError, match=message):
                load_paper("semantic")


def test_the_default_folder_is_one_per_paper_and_scale(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, out, _ = run_cli_dry(capsys)
    assert code == 0 and f"in {tmp_path / 'runs' / 'reproduce' / 'semantic-cpu'}" in out
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing


def run_cli_dry(capsys):
    code = main(["reproduce", "semantic", "--table", "3", "--scale", "cpu", "--data-root", "data", "--dry-run"])
    out, err = capsys.readouterr()
    return code, out, err


def test_atteq_steps_link_the_benign_model_and_the_attention_network(tmp_path):
    """ATTEQ's steps get the reference and ran steps' folders as reference_run and attention_run;
    a sweep step gets them in every point; the baselines that take neither get none."""
    _, _, steps = plan("atteq", "1", "cpu", "data", tmp_path)
    by = {s.name: s for s in steps}
    (_, atteq), = by["atteq"].points
    assert atteq.attack_options["reference_run"] == str(by["reference"].out)
    assert atteq.attack_options["attention_run"] == str(by["ran"].out)
    (_, robnet), = by["robnet"].points
    assert robnet.attack_options["reference_run"] == str(by["reference"].out) and "attention_run" not in robnet.attack_options
    (_, badnets), = by["badnets"].points
    assert badnets.attack == "badnets" and badnets.poison_count == 196 and "reference_run" not in badnets.attack_options
    _, _, steps = plan("atteq", "4", "cpu", "data", tmp_path)
    points = [c for _, c in {s.name: s for s in steps}["ablations"].points]
    assert len(points) == 6 and points[0].attack == "robnet"
    assert all(c.attack_options["attention_run"].endswith("ran") for c in points)
