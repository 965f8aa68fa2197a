"""The stealth card (``veil card``): every applicable defense on a tiny BadNets run and on its clean
reference, reuse of finished results, the matrix and report, and the errors a user can cause."""

from __future__ import annotations

import json

import pytest

from test_defenses_runs import TINY, _run
from veil.cli import main
from veil.defenses import list_defenses
from veil.defenses.card import NO_AUGMENT_NOTE, card_matrix, make_card
from veil.errors import ConfigError
from veil.experiment import RunConfig, run_experiment

pytestmark = pytest.mark.usefixtures("one_thread")

#: the card's options: the tiny budgets of the defense tests
OPTIONS = {name: dict(opts) for name, opts in TINY.items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("card")
    return {"badnets": _run(root, "badnets"), "none": _run(root, "none")}


def test_card_runs_every_applicable_defense_on_both_runs_and_resumes(runs):
    card = make_card(runs["badnets"], runs["none"], options=OPTIONS, progress=False)
    rows = {r["defense"]: r for r in card["rows"]}
    assert list(rows) == list_defenses()  # every registered defense has a row
    assert rows["patch_processing"]["skipped"] == "needs a vision transformer"  # a CNN run
    ran = [r for r in card["rows"] if "skipped" not in r]
    assert len(ran) == len(list_defenses()) - 1
    for r in ran:
        for side in ("attack", "clean"):
            cell = r[side]
            assert cell["text"] and cell["seconds"] > 0 and cell["reused"] is False
        if r["kind"] == "mitigator":
            assert "ASR" in r["attack"]["text"] and 0 <= r["clean"]["clean_accuracy"] <= 1
        else:
            assert r["attack"]["text"].split(" (")[0] in ("detected", "not detected")
    # the clean model's own success rate on the triggered test images, and no augmentation flag
    assert 0 <= card["natural_asr"] <= 1 and card["notes"] == []
    out = runs["badnets"] / "card"
    assert json.loads((out / "card.json").read_text()) == json.loads(json.dumps(card))
    table = json.loads((out / "tables" / "card.json").read_text())
    assert len(table["rows"]) == len(list_defenses()) and all(len(row) == len(table["columns"]) for row in table["rows"])
    md = (out / "card.md").read_text()
    assert md.count("\n| ") == len(list_defenses()) + 1 and "not applicable: needs a vision transformer" in md
    # each result is where veil defend puts it, on both runs; a second card reuses them all
    assert (runs["none"] / "defenses" / "strip" / "result.json").exists()
    again = make_card(runs["badnets"], runs["none"], options=OPTIONS, progress=False)
    assert all(r[s]["reused"] for r in again["rows"] if "skipped" not in r for s in ("attack", "clean"))
    assert [r.get("attack", {}).get("text") for r in again["rows"]] == [r.get("attack", {}).get("text") for r in card["rows"]]
    # other options: that defense runs again
    changed = make_card(runs["badnets"], runs["none"], defenses=["strip"],
                        options={"strip": {**OPTIONS["strip"], "superimpose": 3}}, progress=False)
    # the card keeps the defenses of the earlier call (same reference), strip replaced in its place
    assert [r["defense"] for r in changed["rows"]] == list_defenses()
    by = {r["defense"]: r for r in changed["rows"]}
    assert by["strip"]["attack"]["reused"] is False and by["nad"] == {r["defense"]: r for r in again["rows"]}["nad"]
    assert json.loads((out / "card.json").read_text())["rows"] == json.loads(json.dumps(changed["rows"]))
    strip_only = {**changed, "rows": [by["strip"]]}
    matrix = card_matrix([card, strip_only])
    # two attack rows, then the one clean reference's row (its false positives)
    assert matrix["columns"][:2] == ["attack (model)", "clean model's ASR"] and len(matrix["rows"]) == 3
    assert matrix["rows"][0][0] == f"badnets (preact_resnet18) {runs['badnets'].parent.name}/{runs['badnets'].name}"
    assert matrix["rows"][0][matrix["columns"].index("patch_processing")] == "n/a"
    assert matrix["rows"][0][matrix["columns"].index("neural_cleanse")].split(" [")[0].endswith(
        f"score {rows['neural_cleanse']['attack']['score']:.2f}")  # a model-level detector: its score
    assert matrix["rows"][1][matrix["columns"].index("nad")] == "not run"  # that card ran strip only
    ref_row = matrix["rows"][2]
    assert ref_row[0] == f"clean reference (preact_resnet18) {runs['none'].parent.name}/{runs['none'].name}"
    assert ref_row[matrix["columns"].index("strip")].endswith(" s]")
    # an option that only says where reusable work is kept does not make a result stale
    kept = make_card(runs["badnets"], runs["none"], defenses=["ftd"],
                     options={"ftd": {**OPTIONS["ftd"], "detector_dir": str(runs["badnets"].parent / "ftd_detectors")}},
                     progress=False)
    assert kept["rows"][0]["attack"]["reused"] and kept["rows"][0]["clean"]["reused"]


def test_card_errors(runs):
    bad, clean = runs["badnets"], runs["none"]
    with pytest.raises(ConfigError, match="needs a clean reference"):
        make_card(bad, None)
    with pytest.raises(ConfigError, match="must be a clean run"):
        make_card(bad, bad)
    with pytest.raises(ConfigError, match="is a clean run"):
        make_card(clean, clean)
    with pytest.raises(ConfigError, match="cannot run on preact_resnet18: needs a vision transformer"):
        make_card(bad, clean, defenses=["patch_processing"])
    with pytest.raises(ConfigError, match="unknown defense"):
        make_card(bad, clean, options={"nope": {}})
    with pytest.raises(ConfigError, match="nope"):
        make_card(bad, clean, defenses=["nope"])


def test_cli_card_writes_the_matrix_and_report_and_flags_no_augmentation(runs, tmp_path, capsys):
    plain = tmp_path / "plain"
    run_experiment(RunConfig(attack="badnets", dataset="gtsrb_sample", model="preact_resnet18", width=4, epochs=1,
                             train_subset=430, test_subset=215, out=str(plain), device="cpu", progress=False,
                             stealth_samples=16, base_augment=False))
    out = tmp_path / "matrix"
    opts = [f"--opt=strip.{k}={v}" for k, v in OPTIONS["strip"].items()]
    code = main(["--quiet", "card", str(plain), str(runs["badnets"]), "--reference", str(runs["none"]), "--defenses",
                 "strip,jpeg", *opts, "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert printed.count("# stealth card") == 2 and "matrix ->" in printed
    card = json.loads((plain / "card" / "card.json").read_text())
    assert card["notes"] == [NO_AUGMENT_NOTE]
    # the defenses named, then the one that cannot apply to a CNN: n/a in the matrix, not "not run"
    assert [r["defense"] for r in card["rows"]] == ["strip", "jpeg", "patch_processing"] and "skipped" in card["rows"][2]
    matrix = (out / "card_matrix.md").read_text()
    assert matrix.count("\n| badnets") == 2 and "strip" in matrix and "jpeg" in matrix
    html = (out / "card.html").read_text()
    assert "stealth cards: attacks x defenses" in html and "stealth card: badnets" in html
    assert main(["card", str(plain)]) == 2
    assert "needs a clean reference" in capsys.readouterr().err
    # the matrix again from the cards the runs have, nothing run
    again = tmp_path / "again"
    assert main(["--quiet", "card", str(plain), str(runs["badnets"]), "--from-cards", "--out", str(again)]) == 0
    assert (again / "card_matrix.md").read_text().count("\n| badnets") == 2
    assert main(["card", str(tmp_path / "nothing"), "--from-cards", "--out", str(again)]) == 2
    assert "has no card yet" in capsys.readouterr().err
    assert main(["card", str(plain), "--from-cards"]) == 2
    assert "give --out DIR" in capsys.readouterr().err
    assert main(["card", str(plain), str(runs["badnets"]), "--reference", str(runs["none"]), "--reference",
                 str(runs["none"]), "--reference", str(runs["none"])]) == 2
    assert "one per run: 2 runs, 3 references" in capsys.readouterr().err
    assert main(["card", str(plain), "--reference", str(runs["none"]), "--opt", "superimpose=3"]) == 2
    assert "DEFENSE.NAME=VALUE" in capsys.readouterr().err


def test_a_card_against_another_reference_replaces_the_earlier_one(tmp_path):
    from veil.defenses.card import _with_earlier_rows
    from veil.records import atomic_write_json

    path = tmp_path / "card" / "card.json"
    earlier = [{"defense": "nad", "kind": "mitigator", "attack": {"short": "a"}},
               {"defense": "strip", "kind": "detector", "attack": {"short": "old"}}]
    now = [{"defense": "strip", "kind": "detector", "attack": {"short": "new"}},
           {"defense": "jpeg", "kind": "mitigator", "attack": {"short": "j"}}]
    assert _with_earlier_rows(tmp_path, "ref", now) == now  # no earlier card
    atomic_write_json(path, {"reference": "ref", "attack": "badnets", "model": "preact_resnet18", "rows": earlier})
    assert _with_earlier_rows(tmp_path, "ref", now) == [earlier[0], now[0], now[1]]
    assert _with_earlier_rows(tmp_path, "other", now) == now
    path.write_text("{not json")
    assert _with_earlier_rows(tmp_path, "ref", now) == now
