"""bench/bench_layout.py: it times both layouts of each case and writes its JSON record (the
speed figures themselves are the benchmark's business, not the tests')."""

from __future__ import annotations

import json

import pytest
from conftest import load_script


@pytest.fixture(scope="module")
def bench():  # type: ignore[no-untyped-def]
    return load_script("bench/bench_layout.py")


def test_writes_both_layouts_of_every_case(bench, tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "speed.json"
    argv = ["--width", "2", "--image-size", "16", "--batch-size", "5", "--generator-width", "2",
            "--steps", "2", "--warmup", "1", "--threads", "1", "--out", str(out)]
    assert bench.main(argv) == 0
    record = json.loads(out.read_text())
    assert record["benchmark"] == "train_layout"
    assert set(record["results"]) == {"classifier", "multinomial"}
    for case in record["results"].values():
        for layout in ("contiguous", "channels_last"):
            r = case[layout]
            assert r["timed_steps"] == 2
            assert 0 < r["min_step_seconds"] <= r["median_step_seconds"]
        assert case["channels_last_speedup"] == pytest.approx(
            case["contiguous"]["median_step_seconds"] / case["channels_last"]["median_step_seconds"]
        )
    multi = record["results"]["multinomial"]["contiguous"]
    assert multi["classifier_images_per_second"] == pytest.approx(2 * multi["rows_per_second"])
    assert record["peak_rss_mib"] > 0 and record["environment"]["threads"] == 1


def test_refuses_unknown_cases_and_no_warmup(bench, tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SystemExit):
        bench.main(["--cases", "classifier,nope", "--out", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit):
        bench.main(["--warmup", "0", "--out", str(tmp_path / "x.json")])
    assert not (tmp_path / "x.json").exists()
