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
from veil.options import parse_option
from veil.train import SCHEDULES

log = logging.getLogger("veil")


def _attack_option(text: str) -> tuple[str, Any]:
    return parse_option(text, "attack option")


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--attack", required=True, help="attack name (veil list); 'none' trains a clean reference")
    p.add_argument("--dataset", required=True, help="dataset name (veil list)")
    p.add_argument("--data-root", default=None, help="dataset folder (not needed for gtsrb_sample)")
    p.add_argument("--model", required=True, help="model name (veil list)")
    p.add_argument("--width", type=int, default=None, help="model base width (channels); smaller is faster")
    p.add_argument("--image-size", type=int, default=32, help="square image side (default 32)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.05, help="peak learning rate")
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--schedule", default="cosine", choices=SCHEDULES,
                   help="learning-rate schedule; anneal: constant, then cosine to 0 over the last --anneal-fraction")
    p.add_argument("--anneal-fraction", type=float, default=0.25,
                   help="share of the steps, at the end, over which --schedule anneal decays (default 0.25)")
    p.add_argument("--optimizer", default="sgd", choices=["sgd", "adam"], help="classifier optimiser (default sgd)")
    p.add_argument("--poison-rate", type=float, default=0.1, help="share of the training set poisoned, in (0, 1]")
    p.add_argument("--poison-count", type=int, default=None, help="absolute number of poisoned images (overrides --poison-rate)")
    p.add_argument("--target", type=int, default=0, help="target label")
    p.add_argument("--mode", default="all2one", choices=["all2one", "all2all"])
    p.add_argument("--all-targets", action="store_true",
                   help="poison towards every label at once (attacks with an all_targets option, e.g. multinomial)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--attack-opt", action="append", type=_attack_option, default=[], metavar="NAME=VALUE",
                   help="attack-specific option, repeatable (e.g. --attack-opt patch_size=6)")
    p.add_argument("--augment", default=None, help="extra training augmentation: jpeg, autoencoder or jpeg+autoencoder")
    p.add_argument("--no-base-augment", dest="base_augment", action="store_false",
                   help="train without the standard random crop (4-pixel padding) and flip")
    p.add_argument("--train-subset", type=int, default=None, help="stratified training subset size")
    p.add_argument("--test-subset", type=int, default=None, help="stratified test subset size")
    p.add_argument("--stealth-samples", type=int, default=1000, help="test images for PSNR/SSIM/LPIPS")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--download", action="store_true", help="download the dataset and the LPIPS backbone if missing (needs a network)")
    p.add_argument("--cache-dir", default=None, help="decoded-dataset cache (default $VEIL_CACHE or ~/.cache/veil)")
    p.add_argument("--lpips-weights", default=None, help="folder holding alexnet_imagenet_features.pth (or set $VEIL_WEIGHTS)")
    p.add_argument("--init-from", default=None, metavar="RUN",
                   help="start from the classifier and attack weights of the finished run RUN "
                        "(same attack, dataset, model, width and image size) to train it further")
    p.add_argument("--overwrite", action="store_true", help="replace a finished run in --out")


def _run_config(args: argparse.Namespace) -> Any:
    from veil.runs import RunConfig

    return RunConfig(
        attack=args.attack,
        dataset=args.dataset,
        data_root=args.data_root,
        model=args.model,
        out=args.out,
        width=args.width,
        image_size=args.image_size,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        schedule=args.schedule,
        anneal_fraction=args.anneal_fraction,
        optimizer=args.optimizer,
        poison_rate=args.poison_rate,
        poison_count=args.poison_count,
        target=args.target,
        mode=args.mode,
        all_targets=args.all_targets,
        seed=args.seed,
        attack_options=dict(args.attack_opt),
        augment=args.augment,
        base_augment=args.base_augment,
        train_subset=args.train_subset,
        test_subset=args.test_subset,
        stealth_samples=args.stealth_samples,
        device=args.device,
        download=args.download,
        cache_dir=args.cache_dir,
        lpips_weights=args.lpips_weights,
        init_from=args.init_from,
        overwrite=args.overwrite,
    )


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

    parser = argparse.ArgumentParser(prog="veil", description="Invisible backdoor attacks, defenses and stealth metrics.")
    parser.add_argument("--version", action="version", version=f"veil {veil.__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings only")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="train and evaluate one attack (or a clean reference)")
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

    p = sub.add_parser("list", help="registered datasets, models and attacks")
    p.set_defaults(func=cmd_list)

    from veil import sweep_cli
    from veil.defenses.cli import add_parser as add_defend_parser

    sweep_cli.add_parser(sub)
    add_defend_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return int(args.func(args) or 0)
    except VeilError as exc:
        print(f"veil: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("veil: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
