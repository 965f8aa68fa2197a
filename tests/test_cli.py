"""The command line: bad input gets one clear line and exit status 2; runs are recorded,
deterministic, resumable and protected from being overwritten."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import run_cli

from veil.cli import main
from veil.records import RunRecord

SMALL = ["--dataset", "gtsrb_sample", "--model", "preact_resnet18", "--width", "8", "--epochs", "1",
         "--train-subset", "430", "--test-subset", "215", "--stealth-samples", "32", "--seed", "0"]




def error_line(args, capsys) -> str:
    code, _, err = run_cli(args, capsys)
    assert code == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("veil: error:")]
    assert len(lines) == 1, err
    return lines[0]


def base_run(tmp_path, attack="badnets", *extra):
    return ["run", "--attack", attack, *SMALL, "--out", str(tmp_path / "run"), *extra]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (["--attack", "nosuch"], "unknown attack 'nosuch'"),
        (["--model", "nosuch"], "unknown model 'nosuch'"),
        (["--dataset", "nosuch"], "unknown dataset 'nosuch'"),
        (["--poison-rate", "0"], "poison rate 0.0 is outside (0, 1]"),
        (["--poison-rate", "1.5"], "poison rate 1.5 is outside (0, 1]"),
        (["--target", "43"], "target label 43 is outside the dataset's classes 0..42"),
        (["--model", "vit_small", "--image-size", "30"], "cannot take image size 30"),
        (["--model", "vgg16", "--image-size", "16"], "cannot take image size 16"),
    ],
)
def test_bad_input_gets_one_clear_line(tmp_path, capsys, change, expected):
    args = base_run(tmp_path)
    for i in range(0, len(change), 2):
        flag, value = change[i], change[i + 1]
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    line = error_line(args, capsys)
    assert expected in line
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_missing_and_empty_data_folders(tmp_path, capsys):
    args = ["run", "--attack", "badnets", "--dataset", "gtsrb", "--model", "preact_resnet18", "--out", str(tmp_path / "r")]
    assert "data folder" in error_line([*args, "--data-root", str(tmp_path / "missing")], capsys)
    (tmp_path / "empty").mkdir()
    assert "no GTSRB data" in error_line([*args, "--data-root", str(tmp_path / "empty")], capsys)
    (tmp_path / "empty2" / "train").mkdir(parents=True)
    args[4] = "imagefolder"
    assert "no class folders" in error_line([*args, "--data-root", str(tmp_path / "empty2")], capsys)


def test_run_records_everything_and_is_deterministic(tmp_path, capsys):
    code, _, err = run_cli(base_run(tmp_path), capsys)
    assert code == 0, err
    rec = RunRecord(tmp_path / "run").require()
    m = rec.metrics()
    for key in ("clean_accuracy", "attack_success_rate", "stealth", "timings"):
        assert key in m
    for key in ("psnr", "ssim", "mse", "lpips", "l1", "linf"):
        assert key in m["stealth"]
    assert m["poison_count"] == 43 and len(rec.poison_indices()["poison"]) == 43
    assert rec.config()["attack"] == "badnets"
    env = rec.environment()
    assert env["torch_version"] == torch.__version__ and env["device"] == "cpu"
    # a checkout records its commit and whether veil's source differs from it; elsewhere neither
    assert (env["git_dirty"] is None) if env["git_sha"] is None else isinstance(env["git_dirty"], bool)
    assert set(rec.model_state()) and rec.samples()["clean"].dtype == torch.uint8
    assert (tmp_path / "run" / "samples.png").read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    # the same command again (elsewhere) gives the same metrics
    args = base_run(tmp_path)
    args[args.index("--out") + 1] = str(tmp_path / "again")
    assert run_cli(args, capsys)[0] == 0
    m2 = RunRecord(tmp_path / "again").metrics()
    for key in ("clean_accuracy", "attack_success_rate"):
        assert m2[key] == m[key]
    assert m2["stealth"]["psnr"] == m["stealth"]["psnr"]
    assert RunRecord(tmp_path / "again").poison_indices() == rec.poison_indices()
    # a finished run is refused without --overwrite, and kept intact
    before = (tmp_path / "run" / "metrics.json").read_bytes()
    line = error_line(base_run(tmp_path), capsys)
    assert "already holds a finished run" in line and "--overwrite" in line
    assert (tmp_path / "run" / "metrics.json").read_bytes() == before
    # the report over both runs
    code, _, _ = run_cli(["report", str(tmp_path / "run"), str(tmp_path / "again"), "-o", str(tmp_path / "r.html")], capsys)
    assert code == 0 and (tmp_path / "r.html").stat().st_size > 1000


def test_interrupted_run_resumes_and_corrupted_checkpoint_is_reported(tmp_path, capsys, monkeypatch):
    import veil.train as train_mod

    original = train_mod.Trainer.fit

    def killed_fit(self):
        self.stop_after_steps = 2
        return original(self)

    monkeypatch.setattr(train_mod.Trainer, "fit", killed_fit)
    code, _, err = run_cli(base_run(tmp_path, "blend"), capsys)
    assert code == 130 and "resume" in err
    ckpt = tmp_path / "run" / "checkpoint.pt"
    assert ckpt.is_file() and not (tmp_path / "run" / "metrics.json").exists()
    monkeypatch.setattr(train_mod.Trainer, "fit", original)
    # a different configuration does not silently reuse the checkpoint
    other = base_run(tmp_path, "blend", "--lr", "0.01")
    assert "different configuration" in error_line(other, capsys)
    # a corrupted checkpoint is named
    saved = ckpt.read_bytes()
    ckpt.write_bytes(saved[: len(saved) // 3])
    assert "corrupted or truncated" in error_line(base_run(tmp_path, "blend"), capsys)
    # the intact checkpoint resumes to the same result as an uninterrupted run, also when the
    # run was recorded before a configuration field existed (it compares as its default)
    ckpt.write_bytes(saved)
    config_path = tmp_path / "run" / "config.json"
    recorded = json.loads(config_path.read_text())
    assert recorded.pop("anneal_fraction") == 0.25
    config_path.write_text(json.dumps(recorded))
    assert run_cli(base_run(tmp_path, "blend"), capsys)[0] == 0
    resumed = RunRecord(tmp_path / "run").metrics()
    args = base_run(tmp_path, "blend")
    args[args.index("--out") + 1] = str(tmp_path / "straight")
    assert run_cli(args, capsys)[0] == 0
    straight = RunRecord(tmp_path / "straight").metrics()
    assert resumed["clean_accuracy"] == straight["clean_accuracy"]
    assert resumed["attack_success_rate"] == straight["attack_success_rate"]
    hist = json.loads((tmp_path / "run" / "history.json").read_text())
    assert len(hist) == 1


def test_init_from_starts_where_a_finished_run_ended(tmp_path, capsys, monkeypatch):
    import veil.train as train_mod

    assert run_cli(base_run(tmp_path, "blend"), capsys)[0] == 0
    source = RunRecord(tmp_path / "run")
    started: list[dict[str, torch.Tensor]] = []
    original = train_mod.Trainer.fit

    def spy_fit(self):
        started.append({k: v.detach().clone() for k, v in self.model.state_dict().items()})
        return original(self)

    monkeypatch.setattr(train_mod.Trainer, "fit", spy_fit)
    args = base_run(tmp_path, "blend", "--init-from", str(tmp_path / "run"))
    args[args.index("--out") + 1] = str(tmp_path / "more")
    assert run_cli(args, capsys)[0] == 0
    trained = source.model_state()
    assert all(torch.equal(started[0][k], trained[k]) for k in trained)
    more = RunRecord(tmp_path / "more")
    assert more.config()["init_from"] == str(tmp_path / "run")
    assert any(not torch.equal(more.model_state()[k], trained[k]) for k in trained)
    # another model, an unfinished folder, or the run's own folder: one clear line each, and
    # the finished run in --out is kept even with --overwrite
    before = (tmp_path / "more" / "metrics.json").read_bytes()
    other = [*args, "--overwrite"]
    other[other.index("--width") + 1] = "4"
    assert "width: 8 there, 4 here" in error_line(other, capsys)
    missing = [*args, "--overwrite"]
    missing[missing.index("--init-from") + 1] = str(tmp_path / "nothing")
    assert "nothing" in error_line(missing, capsys)
    own = [*args, "--overwrite"]
    own[own.index("--init-from") + 1] = str(tmp_path / "more")
    assert "own output folder" in error_line(own, capsys)
    assert (tmp_path / "more" / "metrics.json").read_bytes() == before


def test_corrupted_weights_file_is_named(tmp_path, capsys):
    from veil.errors import CheckpointError
    from veil.records import load_tensors

    assert run_cli(base_run(tmp_path, "none"), capsys)[0] == 0
    w = tmp_path / "run" / "model.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="model.safetensors is corrupted or truncated"):
        load_tensors(w)


def test_list(capsys):
    code, out, _ = run_cli(["list"], capsys)
    assert code == 0
    for name in ("gtsrb", "cifar10", "cifar100", "imagefolder", "preact_resnet18", "vit_small", "badnets", "wanet", "fiba", "none"):
        assert name in out


def test_no_base_augment_turns_the_random_crop_off(tmp_path, capsys, monkeypatch):
    """``--no-base-augment`` reaches the trainer (no random crop or flip) and the run's config."""
    from veil import experiment

    class Stop(Exception):
        pass

    seen = {}

    def fake_trainer(model, train, config, **kwargs):
        seen["augment"] = config.augment
        seen["config"] = json.loads((Path(kwargs["checkpoint"]).parent / "config.json").read_text())
        raise Stop

    monkeypatch.setattr(experiment, "Trainer", fake_trainer)
    for flags, expected in (([], True), (["--no-base-augment"], False)):
        out = tmp_path / f"augment-{expected}"
        with pytest.raises(Stop):
            main(["-q", "run", "--attack", "none", *SMALL, "--out", str(out), *flags])
        assert seen.pop("augment") is expected
        assert seen.pop("config")["base_augment"] is expected
        assert not out.exists(), "a run that failed before training leaves nothing behind"


def test_evaluation_during_training_reads_a_subset_and_the_final_one_the_whole_test_set(tmp_path, capsys):
    from veil.runs import EVAL_SHARE, RunConfig, eval_subset

    runs = {}
    for name, extra in (("all", ["--eval-images", "all"]), ("auto", []), ("n50", ["--eval-images", "50", "--eval-every", "0"])):
        out = tmp_path / name
        code, _, err = run_cli(["run", "--attack", "badnets", *SMALL, "--out", str(out), *extra], capsys)
        assert code == 0, err
        runs[name] = (json.loads((out / "metrics.json").read_text()), json.loads((out / "history.json").read_text()))
    (m_all, h_all), (m_auto, h_auto), (m_50, h_50) = runs["all"], runs["auto"], runs["n50"]
    # veil 0.1's behaviour: the last epoch's evaluation is the final one, on all 215 test images
    assert h_all[-1]["eval_images"] == 215 == m_all["test_size"] == m_all["eval_images_during_training"]
    assert (m_all["clean_accuracy"], m_all["attack_success_rate"]) == (h_all[-1]["clean_accuracy"], h_all[-1]["attack_success_rate"])
    # auto: 3 % of the 430 training images (13), at least one per class (43); the final figures
    # are the whole test set's
    assert h_auto[-1]["eval_images"] == m_auto["eval_images_during_training"] == max(round(EVAL_SHARE * 430 + 0.5), 43)
    assert (m_auto["clean_accuracy"], m_auto["attack_success_rate"]) == (m_all["clean_accuracy"], m_all["attack_success_rate"])
    assert m_50["clean_accuracy"] == m_all["clean_accuracy"] and h_50[-1]["eval_images"] == 50
    assert [h["epoch"] for h in h_50 if "eval_images" in h] == [1]
    assert m_auto["timings"]["test_eval_seconds"] > 0 and m_all["timings"]["eval_seconds_during_training"] > 0
    # the subset is stratified and seeded
    from veil.data import load_dataset

    test = load_dataset("gtsrb_sample", None, "test")
    train = load_dataset("gtsrb_sample", None, "train")
    config = RunConfig(attack="none", dataset="gtsrb_sample", model="preact_resnet18", out="x", eval_images=430)
    a, b = eval_subset(config, train, test), eval_subset(config, train, test)
    assert len(a) == 430 and torch.equal(a.images, b.images) and len(set(a.labels.tolist())) == test.num_classes
    assert eval_subset(RunConfig(attack="none", dataset="d", model="m", out="x", eval_images=10**6), train, test) is test


@pytest.mark.parametrize(("flags", "expected"), [(["--eval-every", "-1"], "eval_every must be 0 or more"),
                                                 (["--eval-images", "0"], "eval_images must be 'auto', 'all' or a positive")])
def test_bad_evaluation_settings_get_one_clear_line(tmp_path, capsys, flags, expected):
    assert expected in error_line([*base_run(tmp_path), *flags], capsys)


def test_demo_runs_offline_and_writes_both_runs_and_the_report(tmp_path, capsys):
    """The README's first command, at one epoch: the bundled sample, no network, no ../shared."""
    out = tmp_path / "demo"
    code, stdout, err = run_cli(["demo", "--out", str(out), "--epochs", "1"], capsys)
    assert code == 0, err
    for run in ("none", "badnets"):
        assert (out / run / "metrics.json").is_file()
    assert (out / "report.html").stat().st_size > 1000
    assert json.loads((out / "badnets" / "config.json").read_text())["attack"] == "badnets"


def test_run_flags_are_made_from_the_run_config_fields_and_docstrings(capsys):
    """One flag per RunConfig field (less the two veil sets itself), with the field's docstring
    entry (TrainConfig's for the training settings) and its default in the help."""
    import dataclasses

    from veil.runs import RunConfig

    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for f in dataclasses.fields(RunConfig):
        if f.name in ("sources", "progress"):
            continue
        flag = {"attack_options": "--attack-opt", "base_augment": "--no-base-augment"}.get(f.name, "--" + f.name.replace("_", "-"))
        assert flag in text, flag
    assert "--epochs EPOCHS passes over the training set (default 4)" in text
    assert "--batch-size BATCH_SIZE images per step (default 128)" in text
    assert "--seed SEED seed of everything random in the run (default 0)" in text
    assert "``" not in text and ":class:" not in text


def test_flags_from_a_dataclass_need_documentation_and_a_known_type():
    import argparse
    import dataclasses

    from veil.options import Flag, add_dataclass_arguments, attribute_docs

    @dataclasses.dataclass(frozen=True)
    class Toy:
        """A toy config.

        Attributes:
            size, depth: how big (``int``). Not used here.
            ratio: a share, in [0, 1]; the rest is prose.
            fast: go fast.
            careful: be careful.
            blob: anything.
        """

        size: int = 3
        depth: int | None = None
        ratio: float = 0.5
        fast: bool = False
        careful: bool = True
        blob: dict = dataclasses.field(default_factory=dict)

    docs = attribute_docs(Toy)
    assert docs["size"] == docs["depth"] == "how big (int). Not used here."
    p = argparse.ArgumentParser(argument_default=argparse.SUPPRESS)
    with pytest.raises(ValueError, match="Toy.blob .* needs a Flag with a type"):
        add_dataclass_arguments(p, Toy, docs)
    p = argparse.ArgumentParser(argument_default=argparse.SUPPRESS)
    done = add_dataclass_arguments(p, Toy, docs, {"blob": Flag(type=str)})
    assert done == ["size", "depth", "ratio", "fast", "careful", "blob"]
    args = vars(p.parse_args(["--size", "5", "--ratio", "0.25", "--fast", "--no-careful"]))
    assert args == {"size": 5, "ratio": 0.25, "fast": True, "careful": False}
    assert "a share, in [0, 1] (default 0.5)" in " ".join(p.format_help().split())
    with pytest.raises(ValueError, match="Toy.blob has no documentation"):
        add_dataclass_arguments(argparse.ArgumentParser(), Toy, {k: v for k, v in docs.items() if k != "blob"},
                                {"blob": Flag(type=str)})


@pytest.mark.parametrize("text, expected", [
    ("all_targets=true", ("all_targets", True)), ("all-targets=False", ("all_targets", False)),
    ("flag=TRUE", ("flag", True)), ("width=8", ("width", 8)), ("lr=3e-3", ("lr", 3e-3)),
    ("mode=noise", ("mode", "noise")), ("mode=True", ("mode", True)),
    ("clip_ratio=inf", ("clip_ratio", float("inf"))), ("clip_ratio=.inf", ("clip_ratio", float("inf"))),
    ("x=-Infinity", ("x", float("-inf"))), ("name=info", ("name", "info")),
    ("x=-.inf", ("x", float("-inf"))), ("x=+-inf", ("x", "+-inf")), ("x=--inf", ("x", "--inf")),
])
def test_option_values_are_literals_and_true_false_any_case_are_booleans(text, expected):
    from veil.options import parse_option

    assert parse_option(text) == expected
