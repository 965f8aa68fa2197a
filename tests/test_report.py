"""Tests of veil.report: image grids and the self-contained HTML report."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from veil.errors import RecordError
from veil.records import CONFIG, ENVIRONMENT, HISTORY, METRICS, SAMPLES, RunRecord, atomic_write_bytes
from veil.report import amplified_residual, image_grid, sample_grid_png, write_report
from veil.report.html import PURPOSE

GRID_IMG = '<img class="pixel" src="data:image/png;base64,'


def _png(color: tuple[int, int, int], size: tuple[int, int] = (20, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def make_run(root: Path, name: str, attack: str, seed: int, cda: float, asr: float, finished: bool = True) -> Path:
    """A fake but complete run folder, with metrics on the scales veil writes them."""
    run = RunRecord(root / name)
    config = {
        "attack": attack,
        "dataset": "gtsrb",
        "model": "preact_resnet18",
        "width": 16,
        "image_size": 32,
        "epochs": 3,
        "poison_rate": 0.1,
        "poison_count": None,
        "target": 0,
        "seed": seed,
    }
    run.write_json(CONFIG, config)
    run.write_json(ENVIRONMENT, {"veil_version": "0.1.0", "torch_version": "2.x", "device": "cpu", "git_sha": None})
    history = [
        {
            "epoch": e,
            "loss": 2.0 / e,
            "train_accuracy": 0.3 * e,
            "clean_accuracy": cda * e / 3,
            "attack_success_rate": asr * e / 3,
            "seconds": 1.5,
        }
        for e in (1, 2, 3)
    ]
    run.write_json(HISTORY, history)
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, 256, (6, 3, 32, 32), generator=g, dtype=torch.uint8)
    poisoned = clean.clone()
    poisoned[:, :, -4:, -4:] = 255
    run.save_tensors(SAMPLES, {"clean": clean, "poisoned": poisoned})
    if finished:
        histogram = {"0": 98.4375, "1": 0.0, "2": 0.0, "3": 0.0, "4": 0.0, ">=5": 1.5625}
        stealth = {
            "psnr": 31.4159,
            "ssim": 0.98765,
            "mse": 47.25,
            "lpips": None,  # missing values must show as a dash
            "l1": 0.01234,
            "linf": 250,
            "modified_fraction": 0.015625,
            "histogram": histogram,
        }
        metrics = {
            "clean_accuracy": cda,
            "attack_success_rate": asr,
            "poison_count": 120,
            "stealth": stealth,
            "timings": {"train_seconds": 83.0, "total_seconds": 90.0},
            "notes": ["lpips not computed: no weights"],
        }
        run.write_json(METRICS, metrics)
    return run.root


@pytest.fixture
def two_runs(tmp_path: Path) -> list[Path]:
    a = make_run(tmp_path / "runs", "badnets_seed0", "badnets", 0, cda=0.95123, asr=0.99876)
    b = make_run(tmp_path / "runs", "wanet_<seed1>", "wanet", 1, cda=0.9, asr=0.5)
    atomic_write_bytes(b / "figures" / "activation_clusters.png", _png((200, 30, 30)))
    table = {
        "title": "trigger <spectrum>",
        "columns": ["band", "energy"],
        "rows": [["low", 0.875], ["high", None]],
    }
    RunRecord(b).write_json("tables/spectrum.json", table)
    # a defense's own figures and tables, beside its result
    atomic_write_bytes(b / "defenses" / "jpeg" / "figures" / "jpeg_curve.png", _png((30, 30, 200)))
    jpeg = {"title": "JPEG defense", "columns": ["quality", "ASR"], "rows": [[90, 0.03125]]}
    RunRecord(b).write_json("defenses/jpeg/tables/jpeg_curve.json", jpeg)
    return [a, b]


def test_write_report(two_runs: list[Path], tmp_path: Path) -> None:
    sweep = {
        "title": "poison-count sweep",
        "columns": ["count", "resnet CDA %", "resnet ASR %"],
        "rows": [["50", "97.09", "88.10"]],
        "header": [[["", 1], ["resnet", 2]], [["count", 1], ["CDA %", 1], ["ASR %", 1]]],
        "left": 1,
        "note": "1 of 1 points finished",
    }
    out = write_report(two_runs, tmp_path / "out" / "report.html", title="test & report", tables=[sweep])
    assert out == tmp_path / "out" / "report.html" and out.is_file()
    page = out.read_text(encoding="utf-8")

    assert "test &amp; report" in page  # title escaped
    assert "badnets_seed0" in page
    assert "wanet_&lt;seed1&gt;" in page and "wanet_<seed1>" not in page  # run names escaped
    assert PURPOSE in page and "models and data you own" in page
    # metrics formatted: accuracies as percentages with 2 decimals, stealth on veil's scales
    for text in ("95.12%", "99.88%", "90.00%", "50.00%", "10.00%", "31.42", "0.9877", "47.250", "0.01234"):
        assert text in page, text
    assert "<td>250</td>" in page and "<td>120</td>" in page and "1 min 23 s" in page
    assert "<td>\u2013</td>" in page  # lpips None -> dash
    assert "lpips not computed" in page  # notes shown
    # histogram (percent) and history tables
    assert "98.438%" in page and "&gt;=5" in page and "1.56%" in page
    assert page.count("<td>0.6667</td>") == 2  # epoch-3 loss of both runs
    # one sample grid per run, history charts embedded
    assert page.count(GRID_IMG) == 2
    assert page.count('src="data:image/png;base64,') == 2 + 2 + 2  # grids, charts, figures
    # extension points: figures and tables of the run and of a defense, report-level tables
    assert "figures/activation_clusters.png" in page
    assert "trigger &lt;spectrum&gt;" in page and "0.875" in page
    assert "defense: jpeg" in page and "defenses/jpeg/figures/jpeg_curve.png" in page
    assert "JPEG defense" in page and "0.03125" in page
    assert "poison-count sweep" in page and 'colspan="2"' in page and "1 of 1 points finished" in page
    # fully offline: no URL anywhere, no external resources
    assert not re.search(r"https?://", page)
    assert "<script" not in page and "<link" not in page and "url(" not in page
    assert "http" not in PURPOSE


def test_report_tolerates_missing_keys(tmp_path: Path) -> None:
    run = RunRecord(tmp_path / "bare")
    run.write_json(CONFIG, {"attack": "none", "poison_rate": 0.1})
    run.write_json(METRICS, {"clean_accuracy": None, "stealth": None})
    page = write_report([run.root], tmp_path / "r.html").read_text()
    assert "bare" in page and "no samples.safetensors" in page and "no per-epoch history" in page
    assert "10.00%" not in page  # a clean reference has no poison rate


def test_same_folder_names_are_qualified(tmp_path: Path) -> None:
    a = make_run(tmp_path / "a", "seed0", "badnets", 0, 0.9, 0.9)
    b = make_run(tmp_path / "b", "seed0", "badnets", 1, 0.9, 0.9)
    page = write_report([a, b], tmp_path / "r.html").read_text()
    assert "a/seed0" in page and "b/seed0" in page and 'id="run-0"' in page and 'id="run-1"' in page


def test_unfinished_or_missing_run_raises(tmp_path: Path, two_runs: list[Path]) -> None:
    unfinished = make_run(tmp_path / "runs", "half", "badnets", 2, 0.5, 0.5, finished=False)
    out = tmp_path / "never.html"
    with pytest.raises(RecordError, match="not a finished run"):
        write_report([two_runs[0], unfinished], out)
    with pytest.raises(RecordError, match="does not exist"):
        write_report([tmp_path / "nope"], out)
    with pytest.raises(RecordError):
        write_report([], out)
    assert not out.exists()


def test_amplified_residual() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (4, 3, 8, 8), generator=g, dtype=torch.uint8)
    zero = amplified_residual(x, x.clone())
    assert zero.shape == x.shape and zero.dtype == torch.float32 and torch.all(zero == 0)

    y = x.clone()
    y[0, 0, 0, 0] = x[0, 0, 0, 0] ^ 0x04  # change of exactly 4 levels
    y[1, 1, 1, 1] = x[1, 1, 1, 1] ^ 0x02  # change of 2 levels
    r = amplified_residual(x, y)
    assert r.max() == 1.0 and torch.isclose(r[1, 1, 1, 1], torch.tensor(0.5))
    assert torch.isclose(amplified_residual(x, y, gain=10.0)[0, 0, 0, 0], torch.tensor(40.0 / 255))
    # float input in [0, 1] works too, a single image keeps its shape
    assert amplified_residual(x[0].float() / 255, y[0]).shape == (3, 8, 8)


def test_sample_grid_png_size() -> None:
    clean = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    poisoned = (clean.float() / 255).clamp(0, 0.9)
    img = Image.open(io.BytesIO(sample_grid_png(clean, poisoned, scale=2, labels=False)))
    assert img.format == "PNG" and img.mode == "RGB"
    # pad 2: width = 2 + 5 * (64 + 2), height = 2 + 3 * (64 + 2)
    assert img.size == (2 + 5 * 66, 2 + 3 * 66)
    labelled = Image.open(io.BytesIO(sample_grid_png(clean, poisoned)))
    assert labelled.size[1] == img.size[1] and labelled.size[0] > img.size[0]


def test_image_grid_rows_and_grayscale() -> None:
    rows = [torch.zeros(3, 1, 4, 4), torch.full((1, 3, 4, 4), 128, dtype=torch.uint8)]
    grid = image_grid(rows, scale=3, pad=1)
    assert grid.size == (1 + 3 * (12 + 1), 1 + 2 * (12 + 1))
    assert grid.getpixel((1, 1)) == (0, 0, 0) and grid.getpixel((1, 14)) == (128, 128, 128)
    with pytest.raises(ValueError):
        image_grid(rows, labels=["one"])
