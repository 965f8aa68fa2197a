"""scripts/class_subset.py: the first N class folders of every split, linked; bad input refused."""

from __future__ import annotations

import pytest
from PIL import Image

from conftest import load_script
from veil.data.datasets import load_dataset

cs = load_script("scripts/class_subset.py")


def _folder(root, classes, per_class=2):
    for split in ("train", "test"):
        for c in range(classes):
            d = root / split / f"{c:05d}"
            d.mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (8, 8), (c * 20, i * 50, 0)).save(d / f"{i}.png")
    if classes > 3:  # a split may lack a class
        for f in (root / "test" / "00003").iterdir():
            f.unlink()
        (root / "test" / "00003").rmdir()


def test_first_classes_of_every_split_are_linked_and_read_by_veil(tmp_path):
    _folder(tmp_path / "src", 6)
    chosen = cs.class_subset(tmp_path / "src", tmp_path / "dst", classes=4)
    assert chosen == ["00000", "00001", "00002", "00003"]
    assert sorted(p.name for p in (tmp_path / "dst" / "train").iterdir()) == chosen
    assert sorted(p.name for p in (tmp_path / "dst" / "test").iterdir()) == chosen[:3]
    assert (tmp_path / "dst" / "train" / "00001").is_symlink()
    train = load_dataset("imagefolder", tmp_path / "dst", "train", image_size=8, cache_dir=tmp_path / "cache")
    test = load_dataset("imagefolder", tmp_path / "dst", "test", image_size=8, cache_dir=tmp_path / "cache")
    assert train.num_classes == 4 and len(train) == 8 and len(test) == 6 and int(test.labels.max()) == 2


def test_copies_and_named_classes(tmp_path):
    _folder(tmp_path / "src", 5)
    assert cs.class_subset(tmp_path / "src", tmp_path / "dst", names=["00004", "00001"], copy=True) == ["00004", "00001"]
    assert not (tmp_path / "dst" / "train" / "00004").is_symlink()
    assert len(list((tmp_path / "dst" / "train" / "00004").iterdir())) == 2


@pytest.mark.parametrize("args, message", [
    (["--classes", "9"], "but .* has 5 class folders"),
    (["--names", "00001,07"], "class folder\\(s\\) 07 not in"),
    ([], "give --classes N"),
])
def test_bad_input_is_one_line_and_status_2(tmp_path, capsys, args, message):
    _folder(tmp_path / "src", 5)
    assert cs.main([str(tmp_path / "src"), str(tmp_path / "dst"), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and __import__("re").search(message, err)


def test_a_destination_in_use_is_refused(tmp_path, capsys):
    _folder(tmp_path / "src", 3)
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "keep.txt").write_text("mine")
    assert cs.main([str(tmp_path / "src"), str(tmp_path / "dst"), "--classes", "2"]) == 2
    assert "exists and is not an empty folder" in capsys.readouterr().err
    assert (tmp_path / "dst" / "keep.txt").read_text() == "mine"
