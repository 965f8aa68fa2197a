from __future__ import annotations

import pytest
import torch

from veil.errors import CheckpointError, RecordError
from veil.records import RunRecord, atomic_save_tensors, atomic_torch_save, atomic_write_json, load_checkpoint, load_tensors, read_json


def test_atomic_json_roundtrip_leaves_no_temp_files(tmp_path):
    atomic_write_json(tmp_path / "a.json", {"x": 1, "t": torch.tensor([1, 2])})
    assert read_json(tmp_path / "a.json") == {"x": 1, "t": [1, 2]}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_failed_write_keeps_previous_file(tmp_path):
    atomic_write_json(tmp_path / "a.json", {"x": 1})
    with pytest.raises(TypeError):
        atomic_write_json(tmp_path / "a.json", {"x": object()})
    assert read_json(tmp_path / "a.json") == {"x": 1}
    assert len(list(tmp_path.iterdir())) == 1


def test_truncated_safetensors_and_checkpoint_are_reported(tmp_path):
    atomic_save_tensors(tmp_path / "w.safetensors", {"a": torch.ones(100)})
    assert torch.equal(load_tensors(tmp_path / "w.safetensors")["a"], torch.ones(100))
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "w.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupted or truncated"):
        load_tensors(tmp_path / "w.safetensors")
    atomic_torch_save(tmp_path / "c.pt", {"a": torch.ones(3)})
    assert torch.equal(load_checkpoint(tmp_path / "c.pt")["a"], torch.ones(3))
    (tmp_path / "c.pt").write_bytes(b"garbage" * 10)
    with pytest.raises(CheckpointError, match="corrupted or truncated"):
        load_checkpoint(tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


class Evil:
    """Stands for an arbitrary pickled object inside a checkpoint."""


def test_checkpoint_refuses_pickled_objects(tmp_path):
    torch.save({"obj": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "evil.pt")


def test_run_record_require(tmp_path):
    with pytest.raises(RecordError, match="does not exist"):
        RunRecord(tmp_path / "x").require()
    (tmp_path / "x").mkdir()
    with pytest.raises(RecordError, match="not a finished run"):
        RunRecord(tmp_path / "x").require()
