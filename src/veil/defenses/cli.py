"""``veil defend``: apply a registered defense to a finished run.

    veil defend jpeg --run runs/badnets --qualities 95,90,80,70
    veil defend autoencoder --run runs/fiba --epochs 5 --device cuda
    veil defend jpeg --run runs/badnets --opt reference=runs/clean
    veil defend neural_cleanse --run runs/badnets --opt steps=300
    veil defend fine_pruning --run runs/badnets --opt finetune_epochs=2
    veil defend strip --run runs/badnets --opt superimpose=50
    veil defend gradcam --run runs/badnets
    veil defend spectral_signatures --run runs/badnets --opt epsilon=0.05
    veil defend activation_clustering --run runs/badnets --opt clean_images=1000

Defense-specific options go through ``--opt NAME=VALUE`` (values read as Python literals, so
``--opt labels=[0,1,2]`` is a list); ``veil defend --help`` lists every defense's options and
defaults.

The result goes to ``RUN/defenses/NAME/result.json`` with figures and tables beside it (the HTML
report shows them).

``veil card RUN [RUN ...] --reference CLEAN_RUN`` runs every applicable defense on each attack run
and on the clean reference (:mod:`veil.defenses.card`; one ``--reference`` per run where the runs'
models differ); with ``--out DIR`` it also writes the attacks x defenses matrix and an HTML report
over the runs there, and ``--from-cards --out DIR`` lays out the cards the runs already have. Wired into :mod:`veil.cli` by
:func:`add_parser` and :func:`add_card_parser`.
"""

from __future__ import annotations

import argparse
from typing import Any


def _qualities(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"qualities must be comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("qualities must list at least one integer")
    return values


def _option(text: str) -> tuple[str, Any]:
    from veil.options import parse_option

    return parse_option(text, "defense option")


def options_epilog() -> str:
    """One line per registered defense: its options (``--opt NAME=VALUE``) with their defaults."""
    import dataclasses

    from veil.defenses import DEFENSES, list_defenses

    lines = ["defense options (--opt NAME=VALUE; defaults shown):"]
    for name in list_defenses():
        fields = dataclasses.fields(DEFENSES.get(name).Config)
        opts = ", ".join(f"{f.name}={f.default!r}" for f in fields if f.default is not dataclasses.MISSING)
        lines.append(f"  {name}: {opts or '(none)'}")
    return "\n".join(lines)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``defend`` subcommand on ``subparsers`` (from ``parser.add_subparsers()``)."""
    from veil.defenses import list_defenses

    p = subparsers.add_parser(
        "defend",
        help="apply a defense to a finished run (" + ", ".join(list_defenses()) + ")",
        description="Apply a registered defense to a finished run; writes RUN/defenses/NAME/result.json, figures and tables.",
        epilog=options_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("defense", metavar="NAME", help="defense name: " + ", ".join(list_defenses()))
    p.add_argument("--run", required=True, metavar="DIR", help="finished run folder")
    p.add_argument("--quality", type=int, default=None, help="jpeg: JPEG quality the result is reported at (default 90)")
    p.add_argument("--qualities", type=_qualities, default=None, metavar="Q,Q,...",
                   help="jpeg: qualities of the sweep (default 95,90,80,70,60,50)")
    p.add_argument("--epochs", type=int, default=None, help="autoencoder: training epochs (default 5)")
    p.add_argument("--opt", action="append", type=_option, default=[], metavar="NAME=VALUE",
                   help="any other defense option, repeatable (e.g. --opt reference=runs/clean)")
    p.add_argument("--data-root", default=None, help="dataset folder (default: the one recorded in the run)")
    p.add_argument("--cache-dir", default=None, help="decoded-dataset cache (default: the run's)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--test-subset", type=int, default=None, metavar="N", help="evaluate on a stratified subset of N test images")
    p.add_argument("--out", default=None, metavar="DIR", help="output folder (default RUN/defenses/NAME)")
    p.set_defaults(func=cmd_defend)
    return p


def cmd_defend(args: argparse.Namespace) -> int:
    """Run the defense and print a one-line summary."""
    from veil.defenses import defense_dir, run_defense
    from veil.train import resolve_device

    options: dict[str, Any] = dict(getattr(args, "opt", []) or [])
    for key in ("quality", "qualities", "epochs"):
        value = getattr(args, key, None)
        if value is not None:
            options[key] = value
    result = run_defense(
        args.defense,
        args.run,
        device=resolve_device(args.device),
        data_root=args.data_root,
        cache_dir=getattr(args, "cache_dir", None),
        test_subset=args.test_subset,
        out_dir=getattr(args, "out", None),
        progress=not getattr(args, "quiet", False),
        **options,
    )
    out = args.out if getattr(args, "out", None) else defense_dir(args.run, args.defense)
    print(f"{args.run}: {args.defense}: {result.summary()} -> {out}/result.json")
    return 0


def add_card_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``card`` subcommand."""
    p = subparsers.add_parser(
        "card",
        help="the stealth card: every applicable defense on attack runs and on their clean reference",
        description="Run every applicable defense on each attack run and on the clean reference; writes "
                    "RUN/card/card.md and card.json, and with --out the attacks x defenses matrix and an HTML report.",
    )
    p.add_argument("runs", nargs="+", metavar="RUN", help="attack run folder(s)")
    p.add_argument("--reference", action="append", default=[], metavar="CLEAN_RUN",
                   help="clean run on the same data (required): once for every run, or once per run in their order")
    p.add_argument("--defenses", default=None, metavar="A,B,...", help="defenses to run (default: every applicable one)")
    p.add_argument("--opt", action="append", type=_option, default=[], metavar="DEFENSE.NAME=VALUE",
                   help="a defense's option, repeatable (e.g. --opt strip.superimpose=50)")
    p.add_argument("--out", default=None, metavar="DIR", help="folder for the matrix (card_matrix.md) and card.html")
    p.add_argument("--data-root", default=None, help="dataset folder (default: the one recorded in each run)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--test-subset", type=int, default=None, metavar="N", help="evaluate on a stratified subset of N test images")
    p.add_argument("--rerun", action="store_true", help="run every defense again, even where a result with the same options exists")
    p.add_argument("--from-cards", action="store_true",
                   help="run nothing: lay the cards the runs already have (RUN/card/card.json) out as the matrix (needs --out)")
    p.set_defaults(func=cmd_card)
    return p


def cmd_card(args: argparse.Namespace) -> int:
    """Write each run's card (and the matrix with --out); print the cards."""
    from pathlib import Path

    from veil.defenses.card import card_markdown, card_matrix, make_card
    from veil.errors import ConfigError
    from veil.records import atomic_write_bytes, atomic_write_json
    from veil.train import resolve_device

    options: dict[str, dict[str, Any]] = {}
    for key, value in args.opt:
        defense, dot, name = key.partition(".")
        if not dot or not defense or not name:
            raise ConfigError(f"card options read DEFENSE.NAME=VALUE (e.g. strip.superimpose=50), got {key!r}")
        options.setdefault(defense, {})[name] = value
    defenses = [d for d in args.defenses.replace(" ", "").split(",") if d] if args.defenses else None
    cards = []
    if args.from_cards:
        from veil.defenses.card import load_card

        if not args.out:
            raise ConfigError("--from-cards lays existing cards out as the matrix: give --out DIR")
        if args.reference or args.opt or defenses or args.rerun:
            raise ConfigError("--from-cards runs nothing: --reference, --defenses, --opt and --rerun do not apply")
        cards = [load_card(run) for run in args.runs]
    else:
        if len(args.reference) not in (0, 1, len(args.runs)):
            raise ConfigError(f"give one --reference for every run or one per run: {len(args.runs)} runs, "
                              f"{len(args.reference)} references")
        references = args.reference * len(args.runs) if len(args.reference) == 1 else args.reference or [None] * len(args.runs)
        for run, reference in zip(args.runs, references):
            card = make_card(run, reference, defenses=defenses, options=options, device=resolve_device(args.device),
                             data_root=args.data_root, test_subset=args.test_subset, rerun=args.rerun,
                             progress=not getattr(args, "quiet", False))
            cards.append(card)
            print(card_markdown(card))
    if args.out:
        from veil.report.html import write_report

        out = Path(args.out)
        matrix = card_matrix(cards)
        atomic_write_json(out / "card_matrix.json", matrix)
        lines = ["| " + " | ".join(matrix["columns"]) + " |", "|" + "---|" * len(matrix["columns"])]
        lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in matrix["rows"]]
        atomic_write_bytes(out / "card_matrix.md", ("\n".join([f"# {matrix['title']}", "", *lines, ""])).encode("utf-8"))
        refs = list(dict.fromkeys(str(c["reference"]) for c in cards))
        write_report([*args.runs, *refs], out / "card.html", title="veil stealth cards", tables=[matrix])
        print(f"matrix -> {out / 'card_matrix.md'}, report -> {out / 'card.html'}")
    return 0
