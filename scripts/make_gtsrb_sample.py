"""Build the GTSRB sample shipped in ``src/veil/data/sample/gtsrb_sample.npz``.

A stratified subset (seed 0) of the official GTSRB training and test sets at 32x32, stored as one
lossless PNG mosaic per split (PNG's filters compress these photos far better than zlib on raw
arrays) plus the labels, in an ``.npz`` that loads without pickle::

    python scripts/make_gtsrb_sample.py --data-root ../shared/datasets --train 3440 --test 1075
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
from PIL import Image

from veil.data import load_dataset, stratified_subset

COLS = 64


def mosaic_png(images: np.ndarray) -> np.ndarray:
    n, h, w, c = images.shape
    rows = (n + COLS - 1) // COLS
    canvas = np.zeros((rows * h, COLS * w, c), dtype=np.uint8)
    for i in range(n):
        r, k = divmod(i, COLS)
        canvas[r * h : (r + 1) * h, k * w : (k + 1) * w] = images[i]
    buf = io.BytesIO()
    Image.fromarray(canvas).save(buf, "PNG", optimize=True)
    return np.frombuffer(buf.getvalue(), dtype=np.uint8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--train", type=int, default=3440)
    ap.add_argument("--test", type=int, default=1075)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "src/veil/data/sample/gtsrb_sample.npz"))
    args = ap.parse_args()
    arrays: dict[str, np.ndarray] = {}
    classes: list[str] = []
    for split, n in (("train", args.train), ("test", args.test)):
        ds = stratified_subset(load_dataset("gtsrb", args.data_root, split), n, seed=0)
        classes = ds.classes
        arrays[f"{split}_png"] = mosaic_png(ds.images.permute(0, 2, 3, 1).numpy())
        arrays[f"{split}_labels"] = ds.labels.numpy().astype(np.int16)
    arrays["classes"] = np.array(classes)
    arrays["tile"] = np.array([32, 32, COLS], dtype=np.int64)
    np.savez(args.out, **arrays)
    print(f"wrote {args.out} ({Path(args.out).stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
