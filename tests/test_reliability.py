"""Hostile-user cases (issue 16): nothing of a finished run is lost by a failing command, one
writer per run folder, and bad input gives one line and exit status 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from veil import records as rec
from conftest import run_cli

from veil.cli import main
from veil.errors import RecordError

SMALL = ["--dataset", "gtsrb_sample", "--model", "preact_resnet18", "--width", "4", "--epochs", "1",
         "--train-subset", "86", "--test-subset", "86", "--stealth-samples", "8", "--seed", "0"]




def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """One finished tiny run, copied by each test that needs one."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(["-q", "run", "--attack", "badnets", *SMALL, "--out", str(out)]) == 0
    return out


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--target", "43"], "target label 43 is outside"),
        (["--attack-opt", "patch_size=abc"], "patch_size"),
        (["--attack", "frequency", "--attack-opt", "delta_p=0.001", "--attack-opt", "reference_epochs=1",
          "--attack-opt", "heatmap_images=8"], "delta_p"),
    ],
)
def test_overwrite_that_fails_keeps_the_finished_run(finished, tmp_path, capsys, extra, message):
    """A failing ``--overwrite`` (bad target, bad option, an attack that cannot be mounted after
    its fit) leaves the finished run byte for byte as it was."""
    run = _copy(finished, tmp_path / "run")
    before = _snapshot(run)
    args = ["run", "--attack", "badnets", *SMALL, "--out", str(run), "--overwrite", *extra]
    code, _, err = run_cli(args, capsys)
    errors = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("veil: error")]
    assert code == 2 and len(errors) == 1 and message in errors[0], err
    assert _snapshot(run) == before


def test_interrupted_overwrite_keeps_the_finished_run_and_resumes(finished, tmp_path, monkeypatch, capsys):
    """An overwrite interrupted during training keeps the old run intact (the new one is staged in
    RUN/.overwrite/); the same command again resumes and then replaces it."""
    from veil.train import Trainer

    run = _copy(finished, tmp_path / "run")
    before = _snapshot(run)
    args = ["-q", "run", "--attack", "blend", *SMALL, "--epochs", "2", "--out", str(run), "--overwrite"]
    real_fit = Trainer.fit

    def killed(self):
        self.stop_after_steps = 2
        return real_fit(self)

    monkeypatch.setattr(Trainer, "fit", killed)
    assert main(args) == 130  # "interrupted; run the same command again to resume"
    staged = {k: v for k, v in _snapshot(run).items() if not k.startswith(".overwrite/")}
    assert staged == before and (run / ".overwrite" / "checkpoint.pt").is_file()
    monkeypatch.setattr(Trainer, "fit", real_fit)
    assert main(args) == 0
    assert not (run / ".overwrite").exists() and _lock_is_free(run)
    assert json.loads((run / "config.json").read_text())["attack"] == "blend"
    assert json.loads((run / "metrics.json").read_text())["attack"]["name"] == "blend"
    assert len(json.loads((run / "history.json").read_text())) == 2


def test_a_run_that_fails_before_training_leaves_nothing(tmp_path, capsys):
    out = tmp_path / "new"
    code, _, err = run_cli(["run", "--attack", "badnets", *SMALL, "--target", "99", "--out", str(out)], capsys)
    assert code == 2 and "target label 99" in err
    assert not out.exists()


def _lock_is_free(folder: Path) -> bool:
    try:
        with rec.FolderLock(folder, "test", create=False):
            return True
    except RecordError:
        return False


def test_a_run_folder_has_one_writer(tmp_path, capsys):
    """While a live process holds a run folder's lock, a second run (or defend) into it is refused
    with the holder named; once that process is killed its lock is free again."""
    out = tmp_path / "run"
    out.mkdir()
    script = ("import fcntl, json, os, sys, time\n"
              f"fd = os.open({str(out / rec.LOCK)!r}, os.O_CREAT | os.O_RDWR)\n"
              "fcntl.flock(fd, fcntl.LOCK_EX)\n"
              "os.write(fd, json.dumps({'host': 'h', 'pid': os.getpid(), 'command': 'veil run (x)', 'since': 's'}).encode())\n"
              "print('held', flush=True)\n"
              "time.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        code, _, err = run_cli(["run", "--attack", "badnets", *SMALL, "--out", str(out)], capsys)
        assert code == 2 and "in use by another veil command (veil run (x), process" in err, err
        assert not (out / "config.json").exists()
        code, _, err = run_cli(["defend", "strip", "--run", str(out)], capsys)
        assert code == 2 and "in use by another veil command" in err, err
    finally:
        holder.kill()
        holder.wait()
    # the holder was killed: the system released its lock
    code, _, err = run_cli(["run", "--attack", "badnets", *SMALL, "--out", str(out)], capsys)
    assert code == 0, err
    assert _lock_is_free(out)


def test_folder_lock_is_exclusive_and_released(tmp_path):
    lock = rec.FolderLock(tmp_path / "f", "test")
    with lock:
        assert json.loads((tmp_path / "f" / rec.LOCK).read_text())["pid"] == os.getpid()
        other = rec.FolderLock(tmp_path / "f", "other")
        with pytest.raises(RecordError, match="in use by another veil command"):
            other.acquire()
    assert _lock_is_free(tmp_path / "f")
    (tmp_path / "file").write_text("x")
    with pytest.raises(RecordError, match="is not a folder"):
        rec.FolderLock(tmp_path / "file").acquire()
    with pytest.raises(RecordError, match="does not exist"):
        rec.FolderLock(tmp_path / "missing", create=False).acquire()


# ---------------------------------------------------------------------- one-line errors (case 5)
@pytest.mark.parametrize("value", ["abc", "[1,2]", "3.5", "True"])
def test_attack_options_of_the_wrong_type_are_one_line_errors(tmp_path, capsys, value):
    code, _, err = run_cli(["run", "--attack", "badnets", *SMALL, "--attack-opt", f"patch_size={value}",
                            "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and err.startswith("veil: error: attack 'badnets' option patch_size must be int, got"), err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "r").exists()


def test_option_types_follow_the_config_annotations():
    from veil.errors import ConfigError
    from veil.options import check_types
    from veil.runs import RunConfig

    check_types(RunConfig, {"epochs": 3, "lr": 1, "eval_images": "auto", "width": None, "attack_options": {}}, "run setting")
    for key, value, expected in (("epochs", 2.5, "int"), ("epochs", True, "int"), ("lr", "fast", "float"),
                                 ("eval_images", 1.5, "int or str"), ("attack_options", [1], "dict")):
        with pytest.raises(ConfigError, match=f"run setting {key} must be {expected}, got"):
            check_types(RunConfig, {key: value}, "run setting")
    from veil.attacks.frequency import FrequencyConfig

    check_types(FrequencyConfig, {"channel_ratios": [1.0, 0.8, 0.6]}, "option")
    with pytest.raises(ConfigError, match="channel_ratios must be tuple"):
        check_types(FrequencyConfig, {"channel_ratios": [1.0, "x"]}, "option")
    from veil.attacks.multinomial import MultinomialConfig

    with pytest.raises(ConfigError, match="'squared' or 'absolute'"):
        check_types(MultinomialConfig, {"entanglement": "l3"}, "option")


def test_settings_that_would_fail_after_training_are_refused_before_it(tmp_path, capsys):
    for flags, message in ((["--stealth-samples", "0"], "stealth samples must be positive"),
                           (["--width", "0"], "width must be positive")):
        code, _, err = run_cli(["run", "--attack", "badnets", *SMALL, *flags, "--out", str(tmp_path / "r")], capsys)
        assert code == 2 and message in err, err
        assert not (tmp_path / "r").exists()


def test_out_under_a_file_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    code, _, err = run_cli(["run", "--attack", "badnets", *SMALL, "--out", str(tmp_path / "file" / "run")], capsys)
    assert code == 2 and "is under" in err and "which is a file" in err, err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_output_folder_is_a_one_line_error(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        code, _, err = run_cli(["run", "--attack", "badnets", *SMALL, "--out", str(ro / "run")], capsys)
        assert code == 2 and "not writable" in err, err
    finally:
        ro.chmod(0o700)


@pytest.mark.parametrize("content", [b"\xff\xfe\x00garbage", b"[1, 2]", b"{}"])
@pytest.mark.parametrize("name", ["config.json", "metrics.json"])
def test_damaged_records_are_one_line_errors_and_nothing_is_lost(finished, tmp_path, capsys, name, content):
    """A config.json or metrics.json of non-UTF-8 bytes, a list or {}: report, defend and a resumed
    run say so in one line (exit 2) and change nothing."""
    run = _copy(finished, tmp_path / "run")
    (run / name).write_bytes(content)
    before = _snapshot(run)
    commands = [["report", str(run), "-o", str(tmp_path / "r.html")], ["defend", "strip", "--run", str(run)]]
    if name == "config.json":
        (run / "metrics.json").unlink()  # an unfinished run whose config is damaged: resume reads it
        (run / "checkpoint.pt").write_bytes(b"")
        before = _snapshot(run)
        commands.append(["run", "--attack", "badnets", *SMALL, "--out", str(run)])
    for args in commands:
        code, _, err = run_cli(args, capsys)
        if args[0] == "report" and content == b"{}" and name == "metrics.json":
            assert code == 0, err  # a report shows a run's missing figures as missing
        else:
            assert code == 2, (args, err)
            assert err.startswith("veil: error:") and len(err.strip().splitlines()) == 1, (args, err)
        assert _snapshot(run) == before, args


# ---------------------------------------------------------------------- ImageFolder classes (case 3)
def _folder(root: Path, split: str, classes: dict[str, int], value_of: dict[str, int]) -> None:
    import numpy as np
    from PIL import Image

    for name, count in classes.items():
        d = root / split / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            Image.fromarray(np.full((8, 8, 3), value_of[name], dtype=np.uint8)).save(d / f"{i}.png")


def test_imagefolder_classes_are_matched_by_name(tmp_path):
    """test/ lacking a class keeps the others' labels; every image's label is its folder's name's
    position in train/."""
    from veil.data import load_dataset

    value = {"ant": 10, "bee": 100, "cat": 200}
    _folder(tmp_path, "train", {"ant": 2, "bee": 2, "cat": 2}, value)
    _folder(tmp_path, "test", {"ant": 1, "cat": 3}, value)  # no bee
    train = load_dataset("imagefolder", tmp_path, "train", image_size=8, cache_dir=tmp_path / "c")
    test = load_dataset("imagefolder", tmp_path, "test", image_size=8, cache_dir=tmp_path / "c")
    assert train.classes == test.classes == ["ant", "bee", "cat"]
    assert test.labels.tolist() == [0, 2, 2, 2]
    for img, label in zip(test.images, test.labels):
        assert int(img[0, 0, 0]) == value[train.classes[int(label)]]


@pytest.mark.parametrize(
    ("train", "test", "message"),
    [
        ({"ant": 1, "bee": 1}, {"ant": 1, "dog": 1}, "class folder(s) the training split lacks: dog"),
        ({"ant": 1, "bee": 0}, {"ant": 1}, "holds no images"),
        ({"ant": 1}, {"ant": 0}, "holds no images"),
    ],
)
def test_imagefolder_mismatched_or_empty_classes_are_errors(tmp_path, capsys, train, test, message):
    value = {"ant": 10, "bee": 100, "dog": 50}
    _folder(tmp_path / "d", "train", train, value)
    _folder(tmp_path / "d", "test", test, value)
    code, _, err = run_cli(["run", "--attack", "badnets", "--dataset", "imagefolder", "--data-root", str(tmp_path / "d"),
                            "--model", "preact_resnet18", "--width", "4", "--epochs", "1", "--image-size", "8",
                            "--cache-dir", str(tmp_path / "c"), "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and message in err, err
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------------- image modes (case 4)
@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGB", "RGBA", "I;16", "I", "F", "CMYK"])
def test_every_pil_mode_decodes_to_its_grey_levels(tmp_path, mode):
    """A horizontal ramp from 0 to 240 grey levels, written in each mode (16-bit modes scaled to
    their range, float as [0, 1]), decodes to the same 8-bit ramp within rounding."""
    import numpy as np
    from PIL import Image

    from veil.data.datasets import _decode

    ramp8 = np.tile(np.linspace(0, 240, 16).round().astype(np.uint8), (16, 1))
    if mode in ("I;16", "I"):
        im = Image.fromarray((ramp8.astype(np.uint32) * 257).astype(np.uint16 if mode == "I;16" else np.int32))
        if mode == "I":
            im = im.convert("I")
    elif mode == "F":
        im = Image.fromarray(ramp8.astype(np.float32) / 255.0, mode="F")
    else:
        im = Image.fromarray(ramp8, mode="L").convert(mode)
    assert im.mode == mode
    path = tmp_path / ("x.tiff" if mode in ("I", "F", "CMYK", "I;16") else "x.png")
    im.save(path)
    rgb = _decode(path, 16)
    assert rgb.shape == (16, 16, 3) and rgb.dtype == np.uint8
    got = rgb.astype(int).mean(2)
    assert np.abs(got - ramp8).max() <= 2, (mode, got[0], ramp8[0])
    assert np.abs(rgb.astype(int) - ramp8[..., None]).max() <= 2  # grey stays grey


# ---------------------------------------------------------------------- minor cases (case 10)
def test_a_cache_that_loads_but_does_not_match_is_rebuilt(tmp_path):
    from veil.data import load_dataset
    from veil.records import atomic_save_tensors

    value = {"ant": 10, "bee": 100}
    _folder(tmp_path, "train", {"ant": 2, "bee": 2}, value)
    first = load_dataset("imagefolder", tmp_path, "train", image_size=8, cache_dir=tmp_path / "c")
    (cache,) = (tmp_path / "c").glob("*.safetensors")
    import torch

    atomic_save_tensors(cache, {"images": torch.zeros(3, 3, 8, 8, dtype=torch.uint8), "labels": torch.zeros(3, dtype=torch.long)})
    again = load_dataset("imagefolder", tmp_path, "train", image_size=8, cache_dir=tmp_path / "c")
    assert torch.equal(again.images, first.images) and torch.equal(again.labels, first.labels)


def test_a_data_root_that_is_a_file_and_a_subset_larger_than_the_data(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    code, _, err = run_cli(["run", "--attack", "badnets", "--dataset", "imagefolder", "--data-root", str(tmp_path / "file"),
                            "--model", "preact_resnet18", "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and "is a file, not a folder" in err, err
    code, _, err = run_cli(["run", "--attack", "badnets", *SMALL, "--train-subset", "100000", "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and "train subset 100000 is larger than the train set (3440 images)" in err, err
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------------- sizes (case 6)
@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--image-size", "100000"], "at image size 100000 need"),
        (["--attack", "multinomial", "--attack-opt", "width=100000"], "with attack 'multinomial'"),
        (["--width", "100000"], "training preact_resnet18 (width 100000"),
        (["--attack", "wanet", "--attack-opt", "k=100000"], "wanet k (the control grid's side) must be from 2 to the image side 32"),
    ],
)
def test_sizes_that_cannot_fit_are_refused_before_allocating(tmp_path, capsys, flags, message):
    code, _, err = run_cli(["run", "--attack", "badnets", *SMALL, *flags, "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and message in err, err
    assert "more than the" in err or "wanet" in err
    assert not (tmp_path / "r").exists()


def test_memory_estimates_are_in_the_right_range():
    """The estimates are rough but not wild: a width-16 PreActResNet-18 at 32x32, batch 128, is tens
    of MB to a few GB, and the U-Net estimate grows with the square of its width."""
    from veil.resources import classifier_bytes, module_bytes
    from veil.triggers.unet import UNet

    small = classifier_bytes("preact_resnet18", 43, 32, 16, 128)
    assert 20e6 < small < 4e9
    assert classifier_bytes("preact_resnet18", 43, 64, 16, 128) > 3 * small  # activations grow with the side
    u8 = module_bytes(lambda: UNet(3, 6, 8, 5), (3, 32, 32), 1)
    u64 = module_bytes(lambda: UNet(3, 6, 64, 5), (3, 32, 32), 1)
    assert 10 < u64 / u8 < 70


# ---------------------------------------------------------------------- sweep files (cases 7-9)
TINY_SWEEP = {"dataset": "gtsrb_sample", "model": "preact_resnet18", "width": 4, "image_size": 16, "epochs": 1,
              "train_subset": 86, "test_subset": 86, "stealth_samples": 8, "attack": "badnets"}


def _sweep(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "s.yaml"
    path.write_text(text)
    return path


def test_a_yaml_alias_bomb_is_refused(tmp_path, capsys):
    levels = ['a0: &a0 ["x","x","x","x","x","x","x","x","x","x"]']
    levels += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    path = _sweep(tmp_path, "\n".join(levels) + "\nname: bomb\nout: out\n")
    for args in (["sweep", str(path), "--dry-run"], ["sweep", str(path)]):
        code, _, err = run_cli(args, capsys)
        assert code == 2 and ("YAML aliases" in err or "expands to more than" in err), err
        assert len(err.strip().splitlines()) == 1
    from veil.errors import ConfigError
    from veil.safeyaml import load_yaml

    with pytest.raises(ConfigError, match="expands to more than"):
        load_yaml("a: &a [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]\n" + "".join(
            f"b{i}: &b{i} [{', '.join(['*a' if i == 0 else f'*b{i - 1}'] * 10)}]\n" for i in range(5)), "x")
    assert load_yaml("a: &a {k: 1}\nb: *a\n", "x") == {"a": {"k": 1}, "b": {"k": 1}}


def test_a_sweep_does_not_write_into_a_folder_that_is_not_a_sweep(tmp_path, capsys):
    """``out: ../..`` (anything non-empty without sweep.json) is refused by the dry run and the run
    alike, and nothing there is touched; a file as ``out`` is refused too."""
    import yaml

    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "report.html").write_text("mine")
    (victim / "notes.txt").write_text("mine")
    path = _sweep(tmp_path, yaml.safe_dump({"name": "s", "out": "victim", "base": TINY_SWEEP}))
    for args in (["sweep", str(path), "--dry-run"], ["sweep", str(path)]):
        code, _, err = run_cli(args, capsys)
        assert code == 2 and "is not empty and is not a veil sweep folder" in err, err
    assert sorted(p.name for p in victim.iterdir()) == ["notes.txt", "report.html"]
    assert (victim / "report.html").read_text() == "mine"
    (tmp_path / "afile").write_text("x")
    path = _sweep(tmp_path, yaml.safe_dump({"name": "s", "out": "afile", "base": TINY_SWEEP}))
    for args in (["sweep", str(path), "--dry-run"], ["sweep", str(path)]):
        code, _, err = run_cli(args, capsys)
        assert code == 2 and "exists and is not a folder" in err, err


def test_the_dry_run_makes_every_check_the_run_makes(tmp_path, capsys):
    """An attack option of the wrong type and a point folder that is a file: the dry run refuses
    them as the run does, before training."""
    import yaml

    bad_type = {"name": "s", "out": "o1", "base": {**TINY_SWEEP, "attack_options": {"patch_size": "abc"}}}
    path = _sweep(tmp_path, yaml.safe_dump(bad_type))
    for args in (["sweep", str(path), "--dry-run"], ["sweep", str(path)]):
        code, _, err = run_cli(args, capsys)
        assert code == 2 and "patch_size must be int" in err, (args, err)
    assert not (tmp_path / "o1").exists()
    point_file = {"name": "s", "out": "o2", "base": TINY_SWEEP}
    path = _sweep(tmp_path, yaml.safe_dump(point_file))
    code, out, _ = run_cli(["sweep", str(path), "--dry-run"], capsys)
    assert code == 0
    point = out.split()[-1]
    (tmp_path / "o2").mkdir()
    (tmp_path / "o2" / "sweep.json").write_text("{}")
    (tmp_path / "o2" / point).write_text("not a folder")
    for args in (["sweep", str(path), "--dry-run"], ["sweep", str(path)]):
        code, _, err = run_cli(args, capsys)
        assert code == 2 and "exists and is not a folder" in err, (args, err)


# ---------------------------------------------------------------------- nothing lost (report, sweep)
def test_failing_report_and_sweep_lose_nothing_of_finished_runs(finished, tmp_path, capsys, monkeypatch):
    import yaml

    run = _copy(finished, tmp_path / "run")
    before = _snapshot(run)
    # a report into a folder, or over the run's own files, fails without touching the run
    for target in (run, run / "metrics.json" / "x.html"):
        code, _, err = run_cli(["report", str(run), "-o", str(target)], capsys)
        assert code == 2 and err.startswith("veil: error:"), err
    assert _snapshot(run) == before
    # a sweep that finished, then an --overwrite whose training fails: the finished point stays
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"name": "s", "out": "sw", "base": TINY_SWEEP}))
    assert main(["-q", "sweep", str(path)]) == 0
    (point,) = [p for p in (tmp_path / "sw").iterdir() if p.is_dir() and not p.name.startswith(".")]
    kept = _snapshot(point)
    from veil.train import Trainer

    def broken(self):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(Trainer, "fit", broken)
    code, _, err = run_cli(["sweep", str(path), "--overwrite", "--keep-going"], capsys)
    assert code == 2 and "disk on fire" in err, err
    assert _snapshot(point) == kept


def test_error_messages_are_one_line_and_never_suggest_unpickling(tmp_path, capsys):
    import torch

    from veil.records import load_checkpoint

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(Exception) as info:
        load_checkpoint(tmp_path / "evil.pt")
    message = str(info.value)
    assert "weights_only" not in message and "never unpickles" in message and "\n" not in message
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--attack", "badnets", "--epochs", "x"])
    code, err = exit_info.value.code, capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("veil: error: veil run: argument --epochs"), err


def test_a_failed_defense_leaves_no_folder_and_the_run_intact(finished, tmp_path, capsys, monkeypatch):
    from veil.defenses import DEFENSES
    from veil.errors import ConfigError

    run = _copy(finished, tmp_path / "run")
    before = _snapshot(run)

    def broken(self, loaded, train, test, out):
        (out / "partial.json").write_text("{")
        raise ConfigError("the defense gave up")

    monkeypatch.setattr(DEFENSES.get("strip"), "run", broken)
    code, _, err = run_cli(["defend", "strip", "--run", str(run)], capsys)
    assert code == 2 and "the defense gave up" in err
    assert _snapshot(run) == before and not (run / "defenses").exists()


def test_a_replacement_killed_half_way_is_completed_not_lost(finished, tmp_path, capsys):
    """A kill while a finished overwrite replaces the old run (marker written, old run cleared,
    some staged files moved) leaves the folder to be completed by the next command: the new run
    ends up whole, with nothing of either lost half way."""
    from veil.experiment import PROMOTING, STAGING

    new = _copy(finished, tmp_path / "new")  # stands for a finished staged run
    run = tmp_path / "run"
    run.mkdir()
    (run / STAGING).mkdir()
    for p in new.iterdir():
        if p.is_file():
            (run / STAGING / p.name).write_bytes(p.read_bytes())
        else:
            import shutil

            shutil.copytree(p, run / STAGING / p.name)
    (run / PROMOTING).write_bytes(b"")
    (run / STAGING / "config.json").rename(run / "config.json")  # moved before the kill
    staged = {k: v for k, v in _snapshot(new).items() if not k.startswith(".")}
    code, _, err = run_cli(["run", "--attack", "badnets", *SMALL, "--out", str(run)], capsys)
    assert code == 2 and "already holds a finished run" in err, err
    assert not (run / STAGING).exists() and not (run / PROMOTING).exists()
    assert {k: v for k, v in _snapshot(run).items() if not k.startswith(".")} == staged


def test_paper_training_sets_the_semantic_target_and_loaded_adaptive_attacks_keep_their_classifier():
    from veil.attacks import create_attack
    from veil.runs import resolve_config

    config = resolve_config({"attack": "semantic", "dataset": "gtsrb_sample", "model": "vgg16", "out": "x"})
    assert config.target == 1 and config.sources["target"] == "paper"
    a = create_attack("adaptive", 4, (3, 16, 16), width=4, levels=3)
    assert a.start_from_benign
    b = create_attack("adaptive", 4, (3, 16, 16), width=4, levels=3)
    b.load_state_dict(a.state_dict())
    assert not b.start_from_benign  # --init-from: the classifier comes from the loaded run
