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
report shows them). Wired into :mod:`veil.cli` by :func:`add_parser`.
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
