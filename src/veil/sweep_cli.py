"""The ``veil sweep`` command: argument parsing and terminal output over :mod:`veil.sweep`."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from veil import records as rec

from veil.sweep import load_sweep, parse_sweep, point_status, recorded_differences, run_sweep, sweep_table, table_markdown


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``veil sweep`` on the ``veil`` command's subparsers."""
    p = subparsers.add_parser(
        "sweep",
        help="run a grid of veil run configurations from a YAML file, then tabulate and report",
        description="Run every point of a sweep file (see examples/sweeps/README.md), skipping finished "
        "points and resuming interrupted ones, then write OUT/sweep_table.{json,md} and OUT/report.html.",
    )
    p.add_argument("file", metavar="FILE.yaml", nargs="?", default=None, help="sweep file (or --recipe NAME)")
    p.add_argument("--recipe", metavar="NAME", default=None, help="run the named sweep recipe (veil recipes) instead of a file")
    p.add_argument("--data-root", default=None, help="with --recipe: the dataset folder the recipe needs")
    p.add_argument("--out", default=None, help="with --recipe: the folder for the sweep's runs (required)")
    p.add_argument("--device", default=None, help="auto, cpu or cuda (overrides the file)")
    p.add_argument("--overwrite", action="store_true", help="retrain points that already finished")
    p.add_argument("--keep-going", action="store_true", help="go on after a point fails (default: stop)")
    p.add_argument("--dry-run", action="store_true", help="list the points and which are finished; train nothing")
    p.set_defaults(func=cmd_sweep)
    return p


def _load(args: argparse.Namespace) -> Any:
    """The sweep of FILE, or of ``--recipe NAME`` with ``--data-root`` and ``--out``."""
    from pathlib import Path

    from veil.errors import ConfigError

    if (args.file is None) == (args.recipe is None):
        raise ConfigError("veil sweep needs a sweep file or --recipe NAME (one of them)")
    if args.file is not None:
        if args.out is not None or args.data_root is not None:
            raise ConfigError("--out and --data-root go with --recipe; a sweep file sets 'out' and 'data_root' itself")
        return load_sweep(args.file)
    from veil.recipes import load_recipe

    if args.out is None:
        raise ConfigError(f"veil sweep --recipe {args.recipe} needs --out (the folder for its runs)")
    recipe = load_recipe(args.recipe)
    spec = recipe.sweep_spec(args.data_root, str(Path(args.out).resolve()))
    return parse_sweep(spec, base_dir=Path.cwd(), default_name=args.recipe.replace("/", "-"), recipe=recipe.name)


def cmd_sweep(args: argparse.Namespace) -> int:
    """``veil sweep``: returns 0 when every point finished, 2 when a point failed."""
    sweep = _load(args)
    points = sweep.points()
    if args.dry_run:
        statuses = [(name, point_status(config)) for name, config in points]
        print(f"sweep {sweep.name}: {len(points)} point(s) in {sweep.out}")
        for name, status in statuses:
            action = {"new": "train", "interrupted": "resume", "finished": "skip", "changed": "refuse"}[status]
            if args.overwrite and status != "new":
                action = "retrain"
            elif status == "changed":
                status = f"changed ({', '.join(recorded_differences(dict(points)[name]))})"
            print(f"  {status:<11}  {action:<7}  {name}")
        sweep.check(args.overwrite)
        done = {name: rec.RunRecord(config.out).metrics() for name, config in points if point_status(config) == "finished"}
        if done:
            print()
            print(table_markdown(sweep_table(sweep, done)), end="")
        return 0
    result = run_sweep(
        sweep,
        device=args.device,
        overwrite=args.overwrite,
        progress=not getattr(args, "quiet", False),
        keep_going=args.keep_going,
    )
    print(table_markdown(result.table), end="")
    print(result.summary())
    for key in ("markdown", "json", "report"):
        if key in result.files:
            print(f"wrote {result.files[key]}")
    if result.failed:
        print(
            f"veil: error: {len(result.failed)} of {len(result.points)} sweep point(s) failed: "
            + "; ".join(f"{p.name}: {p.error}" for p in result.failed),
            file=sys.stderr,
        )
        return 2
    return 0
