"""Measure the frequency attack's trigger of a finished run: what the figures in the attack's
documentation say about ``k``, the values ``A_c`` and JPEG.

From the run's ``attack.safetensors`` (its Fourier heatmap, mask and values) and its dataset:

* ``removal_l2``: for each ``k`` in ``--ks``, the mean L2 norm (``[0, 1]`` scale, 8-bit quantised)
  of deleting the images' own content at the top-``k`` frequency pairs of the run's heatmap, on a
  seeded sample of training images: the part of the norm bound ``delta_p`` spent before ``A_c``;
* ``values``: the run's ``A_c``, and the natural magnitude at its mask (mean ``|X_c|`` there);
* ``jpeg_survival``: for the run's channel ratios and for each of ``--ratios``, each calibrated to
  the run's ``delta_p`` on the same mask, the share of the trigger's spectrum at the mask left after
  JPEG at each quality of ``--qualities``, on test images: ``Re <D_q, D> / <D, D>`` with
  ``D = FFT(T(x)) - FFT(x)`` and ``D_q = FFT(jpeg(T(x))) - FFT(jpeg(x))`` at the mask, all channels
  together, averaged over images.

Writes JSON::

    python scripts/measure_frequency_trigger.py --run runs/freq/freq1500-e4-s0 \\
        --data-root ../shared/datasets --out docs/attacks/frequency_trigger_s0.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch

import veil
from veil.analysis.fourier import frequency_pairs, top_k_mask
from veil.attacks import create_attack
from veil.data import load_dataset, to_float
from veil.data.base import quantize
from veil.records import RunRecord, atomic_write_json
from veil.transforms import jpeg
from veil.triggers.frequency import frequency_trigger


def _sample(n_total: int, n: int, seed: int) -> torch.Tensor:
    return torch.randperm(n_total, generator=torch.Generator().manual_seed(seed))[:n].sort().values


def survival(x: torch.Tensor, mask: torch.Tensor, values: torch.Tensor, quality: int) -> float:
    """Mean share of the trigger's spectrum at ``mask`` that JPEG at ``quality`` leaves."""
    m = torch.fft.ifftshift(mask.bool(), dim=(-2, -1))
    xt = quantize(frequency_trigger(x, mask, values))
    d = (torch.fft.fft2(xt, norm="ortho") - torch.fft.fft2(x, norm="ortho"))[..., m]
    dq = (torch.fft.fft2(jpeg(xt, quality), norm="ortho") - torch.fft.fft2(jpeg(x, quality), norm="ortho"))[..., m]
    num = (dq * d.conj()).real.flatten(1).sum(1)
    den = (d.abs() ** 2).flatten(1).sum(1).clamp_min(1e-12)
    return float((num / den).mean())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a finished frequency run")
    ap.add_argument("--data-root", required=True, help="the dataset folder the run was trained on")
    ap.add_argument("--ks", default="1,2,3,6")
    ap.add_argument("--ratios", action="append", default=None, help="channel ratios to compare, e.g. 1.0,0.8,0.6 (repeatable)")
    ap.add_argument("--qualities", default="95,90,80,70")
    ap.add_argument("--images", type=int, default=2000, help="training images for the removal cost")
    ap.add_argument("--test-images", type=int, default=500, help="test images for the JPEG survival")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    record = RunRecord(args.run)
    if not record.finished:
        raise SystemExit(f"measure_frequency_trigger: {args.run} is not a finished run")
    config = record.config()
    if config["attack"] != "frequency":
        raise SystemExit(f"measure_frequency_trigger: {args.run} is a {config['attack']!r} run, not a frequency run")
    state = record.attack_state()
    heat, mask, values = state["heatmap"], state["mask"].bool(), state["values"]
    kw = {"image_size": config["image_size"]}
    train = load_dataset(config["dataset"], args.data_root, "train", **kw)
    test = load_dataset(config["dataset"], args.data_root, "test", **kw)
    x = to_float(train.images[_sample(len(train), args.images, 0)])
    xt = to_float(test.images[_sample(len(test), args.test_images, 1)])

    removal = {}
    for k in (int(v) for v in args.ks.split(",")):
        mk = top_k_mask(heat, k)
        zeros = torch.zeros(x.shape[1])
        removal[str(k)] = float((quantize(frequency_trigger(x, mk, zeros)) - x).flatten(1).norm(dim=1).mean())
    m = torch.fft.ifftshift(mask, dim=(-2, -1))
    natural = torch.fft.fft2(x, norm="ortho")[..., m].abs().mean(dim=(0, 2))

    qualities = [int(q) for q in args.qualities.split(",")]
    opts = config.get("attack_options", {})
    run_ratios = tuple(opts.get("channel_ratios", (1.0, -0.6, 0.3)))
    ratio_sets = [run_ratios] + [tuple(float(v) for v in r.split(",")) for r in (args.ratios or ["1.0,0.8,0.6"])]
    jpeg_rows = []
    for ratios in ratio_sets:
        if ratios == run_ratios:
            vals = values
        else:  # the same mask, calibrated to the run's norm bound with these ratios
            attack = create_attack("frequency", train.num_classes, train.image_shape, k=int(opts.get("k", 2)),
                                   delta_p=float(opts.get("delta_p", 0.6)), channel_ratios=ratios,
                                   poison_count=config.get("poison_count"), target=config["target"], seed=config["seed"])
            attack.fit(train, heatmap=heat)
            vals = attack.values
        jpeg_rows.append({"channel_ratios": list(ratios), "values": [float(v) for v in vals],
                          "survival": {str(q): survival(xt, mask, vals, q) for q in qualities}})
    h, w = mask.shape
    pairs = [(i - h // 2, j - w // 2) for i, j in frequency_pairs(h, w) if bool(mask[i, j])]
    result = {
        "script": "measure_frequency_trigger",
        "run": str(args.run),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "veil_version": veil.__version__,
        "run_git_sha": record.environment().get("git_sha"),
        "frequencies_uv": [list(p) for p in pairs],
        "values": [float(v) for v in values],
        "natural_magnitude_at_mask": [float(v) for v in natural],
        "removal_l2": removal,
        "removal_images": int(x.shape[0]),
        "jpeg_survival": jpeg_rows,
        "jpeg_test_images": int(xt.shape[0]),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, result)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
