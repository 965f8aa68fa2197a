"""The HTML report and image grids."""

from __future__ import annotations

import io
import json

import pytest
import torch
from PIL import Image

from veil.errors import RecordError
from veil.records import RunRecord, atomic_write_bytes
from veil.report.html import write_report
from veil.report.images import amplified_residual, sample_grid_png


def fake_run(root, name, attack, cda, asr, psnr):
    r = RunRecord(root / name)
    g = torch.Generator().manual_seed(len(name))
    clean = torch.randint(0, 256, (4, 3, 32, 32), generator=g, dtype=torch.uint8)
    poisoned = clean.clone()
    poisoned[:, :, -3:, -3:] = 255
    r.write_json("config.json", {"attack": attack, "dataset": "gtsrb", "model": "preact_resnet18", "width": 16,
                                 "image_size": 32, "epochs": 2, "poison_rate": 0.1, "poison_count": None, "target": 0, "seed": 0})
    r.write_json("history.json", [{"epoch": 1, "loss": 1.0, "clean_accuracy": 0.5, "attack_success_rate": 0.4, "seconds": 3.0},
                                  {"epoch": 2, "loss": 0.5, "clean_accuracy": cda, "attack_success_rate": asr, "seconds": 3.0}])
    r.save_tensors("samples.safetensors", {"clean": clean, "poisoned": poisoned})
    (r.root / "figures").mkdir()
    buf = io.BytesIO()
    Image.new("RGB", (20, 10), (200, 0, 0)).save(buf, "PNG")
    atomic_write_bytes(r.root / "figures" / "heatmap.png", buf.getvalue())
    (r.root / "tables").mkdir()
    (r.root / "tables" / "sweep.json").write_text(json.dumps({"title": "Sweep <table>", "columns": ["count", "ASR"], "rows": [[50, 0.5], [100, None]]}))
    r.write_json("metrics.json", {"clean_accuracy": cda, "attack_success_rate": asr, "poison_count": 10,
                                  "stealth": {"psnr": psnr, "ssim": 0.99, "mse": 1.5, "lpips": None, "l1": 0.004, "linf": 255,
                                              "histogram": {"0": 99.0, "1": 0.0, "2": 0.0, "3": 0.0, "4": 0.0, ">=5": 1.0}},
                                  "timings": {"train_seconds": 6.0}})
    return r.root


def test_report_is_self_contained_and_complete(tmp_path):
    a = fake_run(tmp_path, "clean-run", "none", 0.9637, 0.0001, None)
    b = fake_run(tmp_path, "badnets-run", "badnets", 0.9475, 1.0, 24.89)
    out = write_report([a, b], tmp_path / "report.html", title="T")
    page = out.read_text()
    assert "clean-run" in page and "badnets-run" in page
    assert "96.37" in page and "94.75" in page and "100.00" in page and "24.89" in page
    assert page.count('<img class="px"') == 2  # one sample grid per run
    assert page.count("data:image/png;base64,") >= 2 + 2 + 2  # grids, curves, figures
    assert "http://" not in page and "https://" not in page  # nothing fetched when viewed
    assert "heatmap.png" in page and "Sweep &lt;table&gt;" in page  # figures and tables embedded, escaped
    assert "models and data you own" in page


def test_unfinished_run_is_refused(tmp_path):
    (tmp_path / "half").mkdir()
    with pytest.raises(RecordError, match="not a finished run"):
        write_report([tmp_path / "half"], tmp_path / "r.html")
    assert not (tmp_path / "r.html").exists()


def test_residual_and_grid():
    x = torch.rand(3, 3, 8, 8)
    assert torch.equal(amplified_residual(x, x), torch.zeros_like(x))
    y = x.clone()
    y[:, :, 0, 0] = (x[:, :, 0, 0] + 0.1).clamp(max=1)
    r = amplified_residual(x, y)
    assert r.shape == x.shape and float(r.max()) == pytest.approx(1.0)
    png = sample_grid_png(x, y, scale=2, labels=False)
    img = Image.open(io.BytesIO(png))
    assert img.format == "PNG"
    pad = (img.width - 3 * 16) // 4
    assert img.height == pad + 3 * (16 + pad)
