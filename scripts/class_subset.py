"""Make a class subset of an ImageFolder dataset: the first N class folders of every split.

Some experiments run on a few classes of a larger dataset: the multinomial attack's all-targets
recipe on the first 10 GTSRB classes (``multinomial/gtsrb10-cpu-all-targets``), the adaptive
attack's 128-pixel run on a 10-class ImageFolder subset. This writes ``DST/SPLIT/CLASS`` for every
split folder of ``SRC`` (``train``, ``test``, ...) and the first ``--classes`` class folders by
name (or those named by ``--names``), as symbolic links to the source folders (``--copy``: copies
of the image files instead, for file systems without links). veil reads the result as
``--dataset imagefolder`` (or ``--dataset gtsrb`` for a GTSRB subset) with ``--data-root DST``.

    python scripts/class_subset.py ../shared/datasets/gtsrb GTSRB10 --classes 10

Refuses a destination that exists and is not empty, a source without split folders, and a count
above the classes the training split has (exit status 2, one line).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path


def class_subset(src: Path, dst: Path, classes: int | None = None, names: list[str] | None = None,
                 copy: bool = False) -> list[str]:
    """Write the subset; returns the class names chosen."""
    if not src.is_dir():
        raise ValueError(f"source {src} is not a folder")
    splits = sorted(p for p in src.iterdir() if p.is_dir() and not p.name.startswith("."))
    train = src / "train"
    if not train.is_dir():
        raise ValueError(f"source {src} has no train/ folder (an ImageFolder layout: SPLIT/CLASS/IMAGE)")
    available = sorted(p.name for p in train.iterdir() if p.is_dir() and not p.name.startswith("."))
    if names:
        missing = [n for n in names if n not in available]
        if missing:
            raise ValueError(f"class folder(s) {', '.join(missing)} not in {train}")
        chosen = list(names)
    else:
        if classes is None or classes < 1:
            raise ValueError("give --classes N (N >= 1) or --names")
        if classes > len(available):
            raise ValueError(f"--classes {classes} but {train} has {len(available)} class folders")
        chosen = available[:classes]
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise ValueError(f"destination {dst} exists and is not an empty folder")
    for split in splits:
        for name in chosen:
            source = split / name
            if not source.is_dir():
                continue  # a split may lack a class; veil labels it by the training split's names
            target = dst / split.name / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if copy:
                shutil.copytree(source, target)
            else:
                target.symlink_to(source.resolve(), target_is_directory=True)
    return chosen


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", type=Path, help="ImageFolder dataset (SPLIT/CLASS/IMAGE)")
    p.add_argument("dst", type=Path, help="new folder for the subset")
    p.add_argument("--classes", type=int, default=None, help="the first N class folders by name")
    p.add_argument("--names", default=None, help="comma-separated class folder names instead")
    p.add_argument("--copy", action="store_true", help="copy the images instead of linking the folders")
    args = p.parse_args(argv)
    try:
        chosen = class_subset(args.src, args.dst, args.classes,
                              [n for n in args.names.split(",") if n] if args.names else None, args.copy)
    except (ValueError, OSError) as exc:
        print(f"class_subset: error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.dst}: {len(chosen)} classes ({', '.join(chosen[:5])}{' ...' if len(chosen) > 5 else ''})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
