"""The ``veil sweep`` command: argument parsing and terminal output over :mod:`veil.sweep`."""

from __future__ import annotations

import argparse
import sys
from typing import Any


from veil.sweep import load_sweep, parse_sweep, point_status, recorded_differences, sweep_table, table_markdown
from veil.sweep_exec import run_sweep


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
    p.add_argument("--list", action="store_true", help="print the points' names, one per line (for job arrays); run nothing")
    p.add_argument("--point", metavar="NAME", default=None, help="run this one point (see --list) in this process")
    p.add_argument("--collect", action="store_true", help="write the table and report over the finished points; run nothing")
    ex = p.add_argument_group("executors (default: the points one after another in this process)")
    engine = ex.add_mutually_exclusive_group()
    engine.add_argument("--jobs", type=int, metavar="N", default=None,
                        help="N worker processes on this machine, the CPU threads split between them, one GPU each where GPUs exist")
    engine.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                        help="each point a Ray task, on the cluster at ADDRESS ('auto', HOST:PORT, ray://HOST:10001) "
                        "or on a local one started for the sweep (no ADDRESS); pip install 'veil[ray]'")
    engine.add_argument("--slurm", action="store_true",
                        help="each point a SLURM job-array task, through submitit; pip install 'veil[slurm]'")
    ex.add_argument("--cpus-per-point", type=float, default=None, help="--ray / --slurm: CPUs each point declares (default 1 / 2)")
    ex.add_argument("--gpus-per-point", type=float, default=None, help="--ray / --slurm: GPUs each point declares (default 0)")
    ex.add_argument("--partition", default=None, help="--slurm: the partition")
    ex.add_argument("--time", type=int, default=24 * 60, metavar="MINUTES", help="--slurm: each task's time limit (default 1440)")
    ex.add_argument("--mem-gb", type=int, default=None, help="--slurm: memory per task")
    ex.add_argument("--array-parallelism", type=int, default=32, help="--slurm: tasks of the array running at once (default 32)")
    ex.add_argument("--slurm-cluster", choices=("slurm", "local", "debug"), default=None,
                    help="--slurm: submitit's executor (default: SLURM; 'local' runs the tasks on this machine, for testing)")
    ex.add_argument("--no-wait", action="store_true", help="--slurm: submit and return (then veil sweep ... --collect)")
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


def _executor(args: argparse.Namespace) -> Any:
    from veil.errors import ConfigError
    from veil.sweep_exec import Jobs, Local, Ray, Slurm

    if args.jobs is not None:
        if args.jobs < 1:
            raise ConfigError(f"--jobs must be at least 1, got {args.jobs}")
        return Jobs(n=args.jobs)
    if args.ray is not None:
        return Ray(address=args.ray or None, cpus_per_point=args.cpus_per_point or 1.0,
                   gpus_per_point=args.gpus_per_point or 0.0)
    if args.slurm:
        return Slurm(partition=args.partition, time_min=args.time, gpus_per_point=int(args.gpus_per_point or 0),
                     cpus_per_point=int(args.cpus_per_point or 2), mem_gb=args.mem_gb,
                     array_parallelism=args.array_parallelism, cluster=args.slurm_cluster, wait=not args.no_wait)
    return Local()


def cmd_sweep(args: argparse.Namespace) -> int:
    """``veil sweep``: returns 0 when every point finished, 2 when a point failed."""
    from veil.errors import ConfigError
    from veil.sweep_exec import point_metrics

    sweep = _load(args)
    points = sweep.points()
    modes = [m for m in ("list", "collect", "dry_run") if getattr(args, m)] + (["point"] if args.point else [])
    if len(modes) > 1:
        raise ConfigError("--" + " and --".join(m.replace("_", "-") for m in modes) + " cannot be combined")
    if args.point and (args.jobs is not None or args.ray is not None or args.slurm):
        raise ConfigError("--point runs one point in this process; it takes no executor")
    if args.list:
        for name, _ in points:
            print(name)
        return 0
    if args.collect:
        from veil.sweep import write_results

        sweep.check_out()
        table, files = write_results(sweep, {name: point_metrics(sweep, config) for name, config in points})
        print(table_markdown(table), end="")
        for key in ("markdown", "json", "report"):
            if key in files:
                print(f"wrote {files[key]}")
        return 0
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
        done = {name: point_metrics(sweep, config) for name, config in points if point_status(config) == "finished"}
        if done:
            print()
            print(table_markdown(sweep_table(sweep, done)), end="")
        return 0
    if args.point:
        from veil.sweep_exec import execute

        result = execute(sweep, None, device=args.device, overwrite=args.overwrite,
                         progress=not getattr(args, "quiet", False), only=[args.point], write=False)
        p = result.points[0]
        print(f"{p.name}: {p.status}" + (f" ({p.error})" if p.error else ""))
        return 2 if p.status == "failed" else 0
    result = run_sweep(
        sweep,
        device=args.device,
        overwrite=args.overwrite,
        progress=not getattr(args, "quiet", False),
        keep_going=args.keep_going,
        executor=_executor(args),
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
