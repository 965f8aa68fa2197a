"""Sweeps beyond one process: claims, ``--jobs``, Ray, submitit, seeds, defenses in a sweep."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

import veil.experiment
from veil import claims
from veil import sweep as sw
from veil import sweep_exec as sx
from veil.cli import main
from veil.errors import ConfigError
from veil.records import RunRecord

TINY = {
    "dataset": "gtsrb_sample", "model": "preact_resnet18", "width": 4, "image_size": 16, "epochs": 1,
    "batch_size": 64, "train_subset": 64, "test_subset": 43, "stealth_samples": 8, "target": 0, "seed": 0,
    "device": "cpu",
}
METRICS = ["clean_accuracy", "attack_success_rate", "poison_count", "stealth.psnr"]


def spec(out: str = "out", **changes) -> dict:
    s = {"name": "tiny", "out": out, "base": dict(TINY),
         "grid": {"attack": ["none", "badnets"], "poison_rate": [0.1, 0.2]},
         "table": {"rows": "poison_rate", "columns": ["attack"], "metrics": METRICS}}
    s.update(changes)
    return s


def write(folder: Path, s: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump(s, sort_keys=False))
    return path


def losses(out: Path) -> dict:
    """Per point, the recorded training losses: the same numbers mean the same training."""
    return {p.name: [e["loss"] for e in json.loads((p / "history.json").read_text())]
            for p in sorted(out.iterdir()) if (p / "history.json").is_file()}


# --------------------------------------------------------------------------- claims


def test_a_claim_excludes_others_until_released(tmp_path):
    held, holder = claims.claim_point(tmp_path, "p")
    assert held is not None and holder is None
    other, holder = claims.claim_point(tmp_path, "p")
    assert other is None and holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    held.release()
    again, _ = claims.claim_point(tmp_path, "p")
    assert again is not None
    again.release()
    lines = (tmp_path / claims.CLAIMS_DIR / "p.log").read_text().splitlines()
    assert len(lines) == 2 and all("took_over" not in json.loads(line) for line in lines)


def test_a_dead_claimant_or_a_silent_one_is_taken_over(tmp_path):
    folder = tmp_path / claims.CLAIMS_DIR
    folder.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    now = time.time()
    (folder / "a.json").write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "heartbeat": now, "token": "x"}))
    (folder / "b.json").write_text(json.dumps({"host": "elsewhere", "pid": 1, "heartbeat": now - 1000, "token": "y"}))
    (folder / "c.json").write_text(json.dumps({"host": "elsewhere", "pid": 1, "heartbeat": now, "token": "z"}))
    a, _ = claims.claim_point(tmp_path, "a")
    b, _ = claims.claim_point(tmp_path, "b", stale_after=300)
    c, holder = claims.claim_point(tmp_path, "c", stale_after=300)
    assert a is not None and b is not None and c is None and holder["host"] == "elsewhere"
    took = json.loads((folder / "a.log").read_text())["took_over"]
    assert took["pid"] == dead.pid
    a.release()
    b.release()


def test_the_heartbeat_keeps_a_claim_live(tmp_path):
    held, _ = claims.claim_point(tmp_path, "p", heartbeat=0.05)
    first = held.data["heartbeat"]
    time.sleep(0.3)
    on_disk = json.loads((tmp_path / claims.CLAIMS_DIR / "p.json").read_text())
    assert on_disk["heartbeat"] > first and claims.claim_status(on_disk, stale_after=0.2) == "live"
    held.release()
    assert not (tmp_path / claims.CLAIMS_DIR / "p.json").exists()


def test_racing_claimants_get_one_claim(tmp_path):
    won = []
    barrier = threading.Barrier(8)

    def race():
        barrier.wait()
        c, _ = claims.claim_point(tmp_path, "p")
        if c is not None:
            won.append(c)

    threads = [threading.Thread(target=race) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1
    won[0].release()


def test_a_requeued_slurm_task_takes_its_own_claim_back(tmp_path, monkeypatch):
    folder = tmp_path / claims.CLAIMS_DIR
    folder.mkdir()
    (folder / "p.json").write_text(json.dumps({"host": "node7", "pid": 1, "job": "123_4", "heartbeat": time.time(), "token": "t"}))
    monkeypatch.setenv("SLURM_JOB_ID", "130")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "123")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "4")
    monkeypatch.delenv("VEIL_TASK_ID", raising=False)
    c, _ = claims.claim_point(tmp_path, "p")
    assert c is not None and c.data["job"] == "123_4"
    c.release()


# --------------------------------------------------------------------------- executors: one table


@pytest.fixture(scope="module")
def sequential(tmp_path_factory):
    """The 4-point sweep run one point after another in this process, with one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        path = write(tmp_path_factory.mktemp("seq"), spec())
        result = sx.run_sweep(sw.load_sweep(path), progress=False)
    finally:
        torch.set_num_threads(threads)
    assert [p.status for p in result.points] == ["trained"] * 4
    return result


def check_same(result, sequential) -> None:
    assert result.ok, result.summary()
    assert result.table["rows"] == sequential.table["rows"]
    assert [p["metrics"] for p in result.table["points"]] == [p["metrics"] for p in sequential.table["points"]]
    assert losses(result.sweep.out) == losses(sequential.sweep.out)
    assert len(losses(result.sweep.out)) == 4


def test_jobs_gives_the_sequential_table(tmp_path, sequential):
    result = sx.run_sweep(sw.load_sweep(write(tmp_path, spec())), progress=False, executor=sx.Jobs(n=2, threads=1))
    check_same(result, sequential)
    pids = set()
    for p in result.points:
        execution = json.loads((Path(p.config.out) / "environment.json").read_text())["execution"]
        assert execution["executor"] == "jobs" and execution["job"].startswith("jobs-") and execution["host"]
        assert "cuda_visible_devices" in execution
        pids.add(execution["pid"])
        log = (result.sweep.out / claims.CLAIMS_DIR / f"{p.name}.log").read_text().splitlines()
        assert len(log) == 1  # each point claimed once
    assert len(pids) == 2 and os.getpid() not in pids  # two worker processes shared the points


def test_ray_gives_the_sequential_table(tmp_path, sequential):
    pytest.importorskip("ray")
    result = sx.run_sweep(sw.load_sweep(write(tmp_path, spec())), progress=False,
                          executor=sx.Ray(cpus_per_point=1, num_cpus=2))
    check_same(result, sequential)
    execution = json.loads((Path(result.points[0].config.out) / "environment.json").read_text())["execution"]
    assert execution["executor"] == "ray" and execution["job"]


def test_submitit_gives_the_sequential_table(tmp_path, sequential):
    pytest.importorskip("submitit")
    result = sx.run_sweep(sw.load_sweep(write(tmp_path, spec())), progress=False,
                          executor=sx.Slurm(cluster="local", cpus_per_point=1, time_min=10))
    check_same(result, sequential)
    execution = json.loads((Path(result.points[0].config.out) / "environment.json").read_text())["execution"]
    assert execution["executor"] == "slurm" and execution["job"]
    assert (result.sweep.out / ".submitit").is_dir()


def test_a_missing_extra_names_its_install_command(tmp_path, monkeypatch):
    import importlib

    real = importlib.import_module

    def no_ray(name, *a, **k):
        if name in ("ray", "submitit"):
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(importlib, "import_module", no_ray)
    sweep = sw.load_sweep(write(tmp_path, spec()))
    with pytest.raises(ConfigError, match=r"pip install 'veil\[ray\]'"):
        sx.run_sweep(sweep, executor=sx.Ray())
    with pytest.raises(ConfigError, match=r"pip install 'veil\[slurm\]'"):
        sx.run_sweep(sweep, executor=sx.Slurm(cluster="local"))


def test_slurm_without_sbatch_is_a_clear_error(tmp_path, monkeypatch):
    pytest.importorskip("submitit")
    import shutil

    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(ConfigError, match="no SLURM on this machine"):
        sx.run_sweep(sw.load_sweep(write(tmp_path, spec())), executor=sx.Slurm())


# --------------------------------------------------------------------------- killed workers


def test_a_killed_sweep_finishes_without_rerunning_or_doubling(tmp_path):
    """Kill ``veil sweep --jobs 2`` (and its workers) while a point is half trained; the second
    sweep finishes every point, leaves the finished ones alone, resumes the interrupted one and
    takes over only dead workers' claims."""
    s = spec(grid={"attack": ["none", "badnets"], "epochs": [1, 6]},
             table={"rows": "epochs", "columns": ["attack"], "metrics": ["clean_accuracy", "attack_success_rate"]})
    s["base"] = {**TINY, "train_subset": 512, "poison_rate": 0.1}
    s["base"].pop("epochs")
    path = write(tmp_path, s)
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VEIL_CLAIM_HEARTBEAT": "0.2"}
    cmd = [sys.executable, "-m", "veil", "--quiet", "sweep", str(path), "--jobs", "2"]
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline:
            finished = [p for p in out.glob("*") if (p / "metrics.json").is_file()]
            # a 6-epoch point between epochs; a 1-epoch point also holds checkpoint.pt during its
            # final evaluation, and killing it there would resume no epoch
            half = [p for p in out.glob("*epochs=6*")
                    if (p / "checkpoint.pt").is_file() and not (p / "metrics.json").is_file()]
            if finished and half:
                break
            assert proc.poll() is None, "the sweep ended before it could be killed mid-point"
            time.sleep(0.05)
        else:
            pytest.fail("no point was half trained within 240 s")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the sweep and its workers
        except ProcessLookupError:
            pass
        proc.wait()
    stamps = {p.name: (p / "metrics.json").stat().st_mtime_ns for p in finished}
    killed = {p.name for p in half}
    code = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert code.returncode == 0, code.stderr[-2000:]
    names = [p.name for p in out.iterdir() if not p.name.startswith(".") and p.is_dir()]
    assert len(names) == 4 and all((out / n / "metrics.json").is_file() for n in names)
    for name, stamp in stamps.items():  # finished before the kill: not trained again
        assert (out / name / "metrics.json").stat().st_mtime_ns == stamp
        assert len((out / claims.CLAIMS_DIR / f"{name}.log").read_text().splitlines()) == 1
    for name in killed:  # resumed by the second sweep, after the dead worker's claim
        lines = [json.loads(x) for x in (out / claims.CLAIMS_DIR / f"{name}.log").read_text().splitlines()]
        assert len(lines) == 2 and lines[1]["took_over"]["pid"] == lines[0]["pid"]
        history = json.loads((out / name / "history.json").read_text())
        assert [e["epoch"] for e in history] == list(range(1, 7))
    # no claim is left behind, and never two claims at once: every later claim took over a dead one
    assert not list((out / claims.CLAIMS_DIR).glob("*.json"))


# --------------------------------------------------------------------------- seeds


def fake_run(config):
    """A finished run's files without training; the figures depend on the seed."""
    record = RunRecord(config.out)
    record.root.mkdir(parents=True, exist_ok=True)
    acc = 0.5 + 0.1 * config.seed + (0.05 if config.attack == "badnets" else 0.0)
    metrics = {"clean_accuracy": acc, "attack_success_rate": 0.9 if config.attack == "badnets" else 0.0,
               "poison_count": 1, "stealth": {"psnr": 30.0 + config.seed}, "timings": {"train_seconds": 1.0}}
    record.write_json("config.json", config.to_dict())
    record.write_json("history.json", [])
    record.write_json("metrics.json", metrics)
    return metrics


def test_seeds_repeat_every_point_and_the_table_shows_mean_std_n(tmp_path, monkeypatch):
    monkeypatch.setattr(veil.experiment, "run_experiment", fake_run)
    s = spec(seeds=[0, 1, 2])
    s["base"].pop("seed")
    sweep = sw.load_sweep(write(tmp_path, s))
    names = [n for n, _ in sweep.points()]
    assert len(names) == 12 and "attack=badnets,poison_rate=0.1,seed=2" in names
    assert sweep.groups()["attack=none,poison_rate=0.2,seed=1"] == "attack=none,poison_rate=0.2"
    result = sx.run_sweep(sweep, progress=False)
    assert result.ok
    row = result.table["rows"][0]
    # clean accuracy 0.5, 0.6, 0.7: mean 60.00 %, sample std 10.00 points, n 3
    assert row[1] == "60.00 \u00b1 10.00 (n=3)" and row[5] == "65.00 \u00b1 10.00 (n=3)"
    assert row[4] == "31.00 \u00b1 1.00 (n=3)"  # PSNR
    md = (sweep.out / "sweep_table.md").read_text()
    assert "60.00 \u00b1 10.00 (n=3)" in md and "mean \u00b1 sample standard deviation" in md
    html = (sweep.out / "report.html").read_text()
    assert "60.00 \u00b1 10.00 (n=3)" in html
    group = next(g for g in result.table["groups"] if g["name"] == "attack=none,poison_rate=0.1")
    assert group["n"]["clean_accuracy"] == 3 and abs(group["mean"]["clean_accuracy"] - 0.6) < 1e-12
    assert abs(group["std"]["clean_accuracy"] - 0.1) < 1e-12
    # a seed that did not finish: n counts what finished
    import shutil

    shutil.rmtree(sweep.out / "attack=none,poison_rate=0.1,seed=2")
    table = sw.sweep_table(sweep, {n: sx.point_metrics(sweep, c) for n, c in sweep.points()})
    assert table["rows"][0][1] == "55.00 \u00b1 7.07 (n=2)"


@pytest.mark.parametrize("change, expected", [
    ({"seeds": []}, "non-empty list of non-negative integers"),
    ({"seeds": [0, 0]}, "lists the seed 0 twice"),
    ({"seeds": [0, 1], "grid": {"seed": [0, 1]}}, "do not also set 'seed'"),
    ({"seeds": [0, "one"]}, "non-negative integers"),
    ({"defenses": ["nosuch"]}, "nosuch"),
    ({"defenses": {"strip": {"superimpose": 0}}}, "superimpose"),
    ({"defenses": {"strip": {"no_such_option": 1}}}, "no_such_option"),
])
def test_bad_seeds_and_defenses_fail_at_load(tmp_path, change, expected):
    s = spec(**change)
    if "seeds" in change:
        s["base"].pop("seed")
    with pytest.raises(ConfigError, match=expected):
        sw.load_sweep(write(tmp_path, s))


# --------------------------------------------------------------------------- defenses


DEFENSES = {"neural_cleanse": {"clean_images": 50, "clean_source": "train", "steps": 3, "batch_size": 2, "epoch_steps": 1, "labels": [0, 1, 2]},
            "strip": {"clean_images": 50, "clean_source": "train", "superimpose": 4, "test_images": 20}}


def test_defenses_run_on_each_point_and_fill_table_columns(tmp_path, one_thread):
    s = spec(defenses=DEFENSES, grid={"attack": ["none", "badnets"]},
             table={"rows": "attack", "metrics": ["clean_accuracy", "attack_success_rate"]})
    sweep = sw.load_sweep(write(tmp_path, s))
    result = sx.run_sweep(sweep, progress=False)
    assert result.ok
    cols = result.table["columns"]
    assert cols[:3] == ["attack", "CDA %", "ASR %"]
    assert {"neural_cleanse detected", "neural_cleanse score", "strip detected", "strip score", "strip AUROC"} <= set(cols)
    for row in result.table["rows"]:
        cells = dict(zip(cols, row))
        assert cells["neural_cleanse detected"] in ("yes", "no") and cells["strip detected"] in ("yes", "no")
        assert cells["neural_cleanse score"] != "\u2013" and cells["strip score"] != "\u2013"
    for p in result.points:
        assert (Path(p.config.out) / "defenses" / "strip" / "result.json").is_file()
        assert set(p.metrics["defenses"]) == {"neural_cleanse", "strip"}
    # a second sweep reuses the points and the defenses' results
    stamp = (Path(result.points[0].config.out) / "defenses" / "strip" / "result.json").stat().st_mtime_ns
    again = sx.run_sweep(sw.load_sweep(write(tmp_path, s)), progress=False)
    assert [p.status for p in again.points] == ["skipped", "skipped"]
    assert (Path(again.points[0].config.out) / "defenses" / "strip" / "result.json").stat().st_mtime_ns == stamp
    assert again.table["rows"] == result.table["rows"]


# --------------------------------------------------------------------------- the command line


def test_list_point_and_collect(tmp_path, capsys, one_thread):
    path = write(tmp_path, spec())
    assert main(["sweep", str(path), "--list"]) == 0
    names = capsys.readouterr().out.split()
    assert names == [n for n, _ in sw.load_sweep(path).points()] and len(names) == 4
    for name in names[:2]:
        assert main(["--quiet", "sweep", str(path), "--point", name]) == 0
        assert capsys.readouterr().out.strip() == f"{name}: trained"
    assert main(["--quiet", "sweep", str(path), "--point", names[0]]) == 0
    assert capsys.readouterr().out.strip() == f"{names[0]}: skipped"
    assert not (tmp_path / "out" / "sweep_table.md").exists()
    assert main(["--quiet", "sweep", str(path), "--collect"]) == 0
    out = capsys.readouterr().out
    assert "2 of 4 points finished" in out and (tmp_path / "out" / "sweep_table.md").is_file()
    assert not (tmp_path / "out" / names[2]).exists()  # --collect ran nothing
    assert main(["sweep", str(path), "--point", "nosuch"]) == 2
    assert "has no point 'nosuch'" in capsys.readouterr().err
    assert main(["sweep", str(path), "--point", names[0], "--jobs", "2"]) == 2
    assert main(["sweep", str(path), "--list", "--collect"]) == 2
    assert main(["sweep", str(path), "--jobs", "0"]) == 2
    assert "--jobs must be at least 1" in capsys.readouterr().err


def test_the_card_in_a_sweep(tmp_path, one_thread):
    """``defenses: {card: ...}`` makes each attack point's card against the clean reference; its
    defenses' figures are table columns; a clean point has no card."""
    reference = tmp_path / "reference"
    veil.experiment.run_experiment(veil.experiment.RunConfig(**{**TINY, "attack": "none", "out": str(reference),
                                                                "progress": False}))
    card = {"reference": str(reference), "defenses": ["strip"], "options": {"strip": DEFENSES["strip"]}}
    s = spec(defenses={"card": card}, grid={"attack": ["none", "badnets"]},
             table={"rows": "attack", "metrics": ["clean_accuracy", "attack_success_rate"]})
    result = sx.run_sweep(sw.load_sweep(write(tmp_path, s)), progress=False)
    assert result.ok, result.summary()
    bad = tmp_path / "out" / "attack=badnets"
    made = json.loads((bad / "card" / "card.json").read_text())
    assert [r["defense"] for r in made["rows"]] == ["strip", "patch_processing"] and "skipped" in made["rows"][1] and made["reference"] == str(reference)
    assert not (tmp_path / "out" / "attack=none" / "card").exists()
    assert (reference / "defenses" / "strip" / "result.json").is_file()  # the clean half of the card
    cells = dict(zip(result.table["columns"], result.table["rows"][1]))
    assert cells["strip detected"] in ("yes", "no") and cells["strip AUROC"] != "\u2013"
    again = sx.run_sweep(sw.load_sweep(write(tmp_path, s)), progress=False)
    assert [p.status for p in again.points] == ["skipped", "skipped"]
    with pytest.raises(ConfigError, match="card needs 'reference'"):
        sw.load_sweep(write(tmp_path, spec(defenses={"card": {"defenses": ["strip"]}})))
    with pytest.raises(ConfigError, match="not a finished run"):
        sx.run_sweep(sw.load_sweep(write(tmp_path / "x", spec(defenses={"card": {"reference": str(tmp_path / "nope")}}))))
