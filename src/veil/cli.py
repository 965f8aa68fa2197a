"""The ``veil`` command line: thin commands over the library.

    veil run --attack badnets --dataset gtsrb --data-root DATA --model preact_resnet18 --width 16 \\
             --epochs 4 --poison-rate 0.1 --target 0 --seed 0 --out runs/badnets
    veil report runs/* -o report.html
    veil demo
    veil list

Bad input prints one line ``veil: error: ...`` and exits with status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any


from veil.errors import VeilError
from veil.experiment import seed_everything
from veil.metrics.lpips import LPIPS_NETS
from veil.options import Flag, add_dataclass_arguments, parse_option
from veil.train import SCHEDULES

log = logging.getLogger("veil")


def _attack_option(text: str) -> tuple[str, Any]:
    return parse_option(text, "attack option")


def _eval_images(text: str) -> int | str:
    if text in ("auto", "all"):
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--eval-images must be auto, all or a number, got {text!r}") from None


#: how the run flags differ from what RunConfig's field types and docstring give
_RUN_FLAGS = {
    "recipe": Flag(metavar="NAME", help="start from the named recipe (veil recipes); any other flag given overrides its setting"),
    "schedule": Flag(choices=SCHEDULES),
    "optimizer": Flag(choices=("sgd", "adam")),
    "mode": Flag(choices=("all2one", "all2all")),
    "lpips_net": Flag(choices=LPIPS_NETS),
    "attack_options": Flag(name="attack-opt", action="append", type=_attack_option, metavar="NAME=VALUE",
                           help="attack-specific option, repeatable (e.g. --attack-opt patch_size=6; veil list shows each attack's)"),
    "eval_every": Flag(metavar="N"),
    "eval_images": Flag(type=_eval_images, metavar="auto|all|N"),
    "init_from": Flag(metavar="RUN"),
    "out": Flag(help="run folder (required)"),
}
#: RunConfig fields that get no flag: set by veil itself (sources), or by the global -q (progress)
_RUN_NO_FLAG = ("sources", "progress")


def _add_run_options(p: argparse.ArgumentParser) -> None:
    """``veil run``'s flags, one per RunConfig field, with RunConfig's (and TrainConfig's) defaults
    and documentation. The parser keeps only the flags given (``argument_default=SUPPRESS``), so
    that a recipe's settings, then the attack's paper settings, apply unless a flag overrides them."""
    from veil.runs import RunConfig

    add_dataclass_arguments(p, RunConfig, RunConfig.field_docs(), _RUN_FLAGS, skip=_RUN_NO_FLAG)


_NOT_RUN_FIELDS = {"func", "command", "verbose", "quiet", "recipe"}


def _run_config(args: argparse.Namespace) -> Any:
    """The RunConfig of ``veil run``: RunConfig's defaults, then the recipe's settings (``--recipe``),
    then the flags given."""
    from veil.errors import ConfigError
    from veil.runs import resolve_config

    given = {k: v for k, v in vars(args).items() if k not in _NOT_RUN_FIELDS}
    if "attack_options" in given:
        given["attack_options"] = dict(given["attack_options"])
    if "out" not in given:
        raise ConfigError("veil run needs --out (the run folder)")
    recipe_name = getattr(args, "recipe", None)
    if recipe_name is not None:
        from veil.recipes import load_recipe

        return load_recipe(recipe_name).run_config(given, out=given["out"])
    missing = [f"--{k}" for k in ("attack", "dataset", "model") if k not in given]
    if missing:
        raise ConfigError(f"veil run needs {', '.join(missing)} (or --recipe NAME; veil recipes lists them)")
    return resolve_config(given)


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _summary(metrics: dict[str, Any]) -> str:
    s = metrics.get("stealth", {})
    return (
        f"clean accuracy {_fmt(metrics.get('clean_accuracy'), '.4f')}  "
        f"attack success rate {_fmt(metrics.get('attack_success_rate'), '.4f')}  "
        f"PSNR {_fmt(s.get('psnr'), '.2f')}  SSIM {_fmt(s.get('ssim'), '.4f')}  "
        f"LPIPS {_fmt(s.get('lpips'), '.4f')}  L-inf {_fmt(s.get('linf'), 'd')}  "
        f"train {_fmt(metrics.get('timings', {}).get('train_seconds'), '.0f')}s"
    )


def cmd_run(args: argparse.Namespace) -> int:
    from veil.experiment import run_experiment

    config = _run_config(args)
    seed_everything(config.seed)
    metrics = run_experiment(config)
    print(f"{config.out}: {_summary(metrics)}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from veil.report.html import write_report

    out = write_report(args.runs, args.output, title=args.title)
    print(f"wrote {out}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from veil.attacks import list_attacks
    from veil.data import list_datasets
    from veil.models import list_models

    print("datasets: " + ", ".join(list_datasets()))
    print("models:   " + ", ".join(list_models()))
    print("attacks:  " + ", ".join(list_attacks()))
    from veil.defenses import list_defenses

    print("defenses: " + ", ".join(list_defenses()))
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    """``veil recipes``: every bundled recipe, what it stands for and what it measured."""
    from veil.recipes import list_recipes, load_recipe

    names = list_recipes(args.attack)
    if not names:
        print("no recipes" + (f" for attack {args.attack!r}" if args.attack else ""))
        return 0
    for name in names:
        r = load_recipe(name)
        command = "veil run" if r.kind == "run" else "veil sweep"
        print(f"{name}  [{r.kind}, {r.scale}]  {r.stands_for}")
        if args.long:
            print(f"    {r.description}")
            if r.data:
                print(f"    --data-root: {r.data}")
        print(f"    {command} --recipe {name} --data-root DIR --out DIR")
        for m in r.measured:
            print(f"    measured: {m.line()}")
        if not r.measured:
            print("    measured: nothing yet")
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    """``veil reproduce PAPER``: the recipes behind a paper's table, and the table beside the paper's."""
    from veil.records import RunRecord
    from veil.reproduce import list_papers, load_paper, plan, reproduce, table_markdown

    if args.paper is None:
        for name in list_papers():
            spec = load_paper(name)
            tables = ", ".join(f"{k} ({'/'.join(t['scales'])})" for k, t in spec["tables"].items())
            print(f"{name}: {spec['title']}\n    tables: {tables}")
        return 0
    out = args.out or f"runs/reproduce/{args.paper}-{args.scale}"  # a paper's tables share their runs
    key, _, steps = plan(args.paper, args.table, args.scale, args.data_root, out, args.device)
    if args.dry_run:
        print(f"{args.paper}, table {key}, {args.scale} scale, in {Path(out).resolve()}:")
        for step in steps:
            print(f"  step {step.name} ({step.kind} recipe {step.recipe}):")
            for name, config in step.points:
                status = "finished" if RunRecord(config.out).finished else "to train"
                print(f"    {status:<9} {name}")
    table = reproduce(args.paper, args.table, args.scale, args.data_root, out, args.device,
                      progress=not args.quiet, dry_run=args.dry_run)
    print(table_markdown(table), end="")
    if not args.dry_run:
        print(f"wrote {Path(out).resolve() / f'table-{key}.md'}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """A clean reference and a BadNets run on the bundled GTSRB sample, then the report.

    The sample holds 3,440 training images, so the demo trains with batch size 32 (more steps per
    epoch); BadNets keeps its default options (the 3x3 checkerboard 4 px from the corner).
    """
    from veil.experiment import RunConfig, run_experiment
    from veil.records import RunRecord
    from veil.report.html import write_report

    out = Path(args.out)
    t0 = time.perf_counter()
    runs = []
    for attack in ("none", "badnets"):
        config = RunConfig(
            attack=attack,
            dataset="gtsrb_sample",
            model="preact_resnet18",
            width=16,
            epochs=args.epochs,
            batch_size=32,
            lr=0.05,
            poison_rate=0.1,
            target=0,
            seed=0,
            out=str(out / attack),
            device=args.device,
            lpips_weights=args.lpips_weights,
            overwrite=args.overwrite,
        )
        seed_everything(config.seed)
        if RunRecord(config.out).finished and not args.overwrite:
            print(f"{config.out}: already finished, kept (pass --overwrite to redo)")
        else:
            metrics = run_experiment(config)
            print(f"{config.out}: {_summary(metrics)}")
        runs.append(config.out)
    report = write_report(runs, out / "report.html", title="veil demo: clean reference vs BadNets on the GTSRB sample")
    print(f"wrote {report} in {time.perf_counter() - t0:.0f}s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    import veil

    parser = _Parser(prog="veil", description="Invisible backdoor attacks, defenses and stealth metrics.")
    parser.add_argument("--version", action="version", version=f"veil {veil.__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings only")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("run", help="train and evaluate one attack (or a clean reference)",
                       argument_default=argparse.SUPPRESS,
                       epilog="The defaults shown are veil's. Settings a flag does not give come from --recipe, then from "
                              "the attack's paper (its paper_training: e.g. multinomial trains at 128x128 with Adam), "
                              "then these defaults; config.json records where each came from.")
    _add_run_options(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("report", help="write one self-contained HTML report over run folders")
    p.add_argument("runs", nargs="+", help="run folders")
    p.add_argument("-o", "--output", required=True, help="HTML file to write")
    p.add_argument("--title", default="veil report")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("demo", help="clean reference + BadNets on the bundled GTSRB sample, and the report")
    p.add_argument("--out", default="veil-demo", help="folder for the two runs and report.html")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--device", default="auto")
    p.add_argument("--lpips-weights", default=None)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("recipes", help="named recipes (a run or sweep with the figures it measured)")
    p.add_argument("--attack", default=None, help="only this attack's recipes")
    p.add_argument("-l", "--long", action="store_true", help="also the description and the data each needs")
    p.set_defaults(func=cmd_recipes)

    p = sub.add_parser("reproduce", help="run the recipes behind a seed paper's table; the paper's figures beside veil's")
    p.add_argument("paper", nargs="?", default=None, help="paper name (without it: the papers and their tables)")
    p.add_argument("--table", default=None, help="table number (default: the paper's first in veil)")
    p.add_argument("--scale", default="cpu", choices=["cpu", "paper"],
                   help="cpu: the recipes measured on 2 cores (default); paper: the paper's budget, for a GPU")
    p.add_argument("--data-root", default=None, help="dataset folder the recipes need (e.g. the folder holding gtsrb/)")
    p.add_argument("--out", default=None, help="folder for the runs and the tables (default runs/reproduce/PAPER-SCALE: a paper's tables share their runs)")
    p.add_argument("--device", default=None, help="auto, cpu or cuda (overrides the recipes)")
    p.add_argument("--dry-run", action="store_true", help="list the runs and which are finished and print the table of those; train and write nothing")
    p.set_defaults(func=cmd_reproduce)

    p = sub.add_parser("list", help="registered datasets, models and attacks")
    p.set_defaults(func=cmd_list)

    from veil import sweep_cli
    from veil.defenses.cli import add_card_parser
    from veil.defenses.cli import add_parser as add_defend_parser

    sweep_cli.add_parser(sub)
    add_defend_parser(sub)
    add_card_parser(sub)
    return parser


class _Parser(argparse.ArgumentParser):
    """argparse with veil's one-line errors: ``veil: error: ...`` and exit status 2 (the usage is
    one ``--help`` away)."""

    def error(self, message: str) -> Any:  # type: ignore[override]
        print(f"veil: error: {self.prog}: {_one_line(message)} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return int(args.func(args) or 0)
    except VeilError as exc:
        print(f"veil: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:  # the file system refused (permissions, a full disk): not a veil bug
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"veil: error: {_one_line(exc.strerror or exc)}{where}", file=sys.stderr)
        return 2
    except MemoryError:
        print("veil: error: out of memory; lower the image size, width or batch size", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("veil: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
