"""Re-measure finished runs' stealth metrics with today's :mod:`veil.metrics` (e.g. a metric added
after they trained, such as ``ssim_3x3``) on the same test images the run used, without touching
their records; prints one JSON object, run folder -> metrics, and writes it to ``--out`` if given.

Usage: ``python scripts/measure_stealth.py RUN [RUN ...] [--data-root DIR] [--out FILE]``
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from veil.errors import VeilError
from veil.experiment import measure_stealth
from veil.records import atomic_write_bytes
from veil.runs import load_run, load_run_data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="finished run folders")
    parser.add_argument("--data-root", help="dataset folder, if not the one the runs recorded")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    out = {}
    try:
        for run in args.runs:
            loaded = load_run(run)
            config = loaded.config if args.data_root is None else dataclasses.replace(loaded.config, data_root=args.data_root)
            _, test = load_run_data(config)
            stealth, note, rows, _, _ = measure_stealth(config, loaded.attack, test)
            out[run] = {**stealth, "stealth_samples": int(rows.numel()), **({"lpips_note": note} if note else {})}
    except (VeilError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        atomic_write_bytes(args.out, (text + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
