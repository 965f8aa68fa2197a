"""The stealth report card: every applicable defense on an attack run and on its clean reference.

``veil card RUN --reference CLEAN_RUN`` answers "what catches this attack, and what does it cost
to find out?" in one table: for each registered defense that applies to the run's model, its
verdict or figure on the attack run, the same on the clean reference (a detector's false positive,
a mitigator's clean-accuracy cost on a model with no backdoor), and the time of each. Every
defense's parameters come from its defaults (thresholds calibrated on the defender's clean data,
never on test ASR) or from the user's ``options``; the card never tunes on the attack. It also
states the clean model's success rate on the attack's triggered test images (how much of the ASR
is not a backdoor: a label the clean model already gives them) and flags a run trained without
the standard augmentation, on which fine-tuning defenses look stronger than on a normally trained
victim.

A defense result already in ``RUN/defenses/NAME/result.json`` with the same options is reused,
so an interrupted card resumes where it stopped; ``rerun=True`` runs everything again. The card
goes to ``RUN/card/card.json`` and ``RUN/card/card.md``, and its table to
``RUN/card/tables/card.json`` (the HTML report shows it); a later card against the same reference
adds its defenses to those already on the card. :func:`card_matrix` lays several cards out as the
attacks x defenses matrix.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from veil.defenses.base import (
    RESULT_FILE,
    DEFENSES,
    DetectionResult,
    MitigationResult,
    create_defense,
    defense_dir,
    list_defenses,
    load_result,
    run_defense,
    transformed_accuracy,
)
from veil.errors import ConfigError, RecordError
from veil.records import atomic_write_bytes, atomic_write_json

log = logging.getLogger(__name__)

CARD_DIR = "card"
NO_AUGMENT_NOTE = ("trained without the standard augmentation (--no-base-augment): fine-tuning defenses "
                   "(fine_pruning's fine-tuning, nad) remove backdoors more easily than on a normally trained victim")


def _f(v: Any, digits: int = 2) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def cell_text(result: MitigationResult | DetectionResult) -> str:
    """A card cell: a mitigator's ASR and clean accuracy before -> after (and DER); a detector's
    verdict with the figures it is judged by."""
    if isinstance(result, MitigationResult):
        text = (f"ASR {_f(result.original_attack_success_rate)}->{_f(result.attack_success_rate)}, "
                f"CDA {_f(result.original_clean_accuracy)}->{_f(result.clean_accuracy)}")
        der = result.defense_effectiveness_rate
        return text + (f", DER {_f(der)}" if der is not None else "")
    m = result.metrics
    verdict = "detected" if result.detected else "not detected"
    shown = [f"{k.upper()} {_f(m[k])}" for k in ("tpr", "fpr", "auroc", "accuracy") if k in m]
    if result.score is not None and not shown:
        shown.append(f"score {_f(result.score)}")
    return verdict + (" (" + ", ".join(shown[:3]) + ")" if shown else "")


def cell_short(result: MitigationResult | DetectionResult) -> str:
    """A matrix cell: a mitigator's ASR and clean accuracy after it; a detector's verdict and its
    first figure: the score of a model-level detector (Neural Cleanse's anomaly index, MNTD's
    meta-classifier output; it has no input-level rates), else TPR or AUROC on the inputs."""
    if isinstance(result, MitigationResult):
        return f"ASR {_f(result.attack_success_rate)} / CDA {_f(result.clean_accuracy)}"
    m = result.metrics
    if result.score is not None and not {"tpr", "frr"} & set(m):
        first: str | None = f"score {_f(result.score)}"
    else:
        first = next((f"{k.upper()} {_f(m[k])}" for k in ("tpr", "auroc", "accuracy") if k in m), None)
    return ("detected" if result.detected else "not detected") + (f", {first}" if first else "")


def cached_result(name: str, run_dir: str | Path, options: dict[str, Any]) -> MitigationResult | DetectionResult | None:
    """The result in ``RUN/defenses/NAME/result.json`` if it was made with these options (those that
    only say where reusable work is kept aside), else ``None``."""
    path = defense_dir(run_dir, name) / RESULT_FILE
    if not path.exists():
        return None
    defense = create_defense(name, progress=False, **options)
    try:
        old = load_result(path)
    except (ConfigError, OSError, ValueError):
        return None
    kept = {k: v for k, v in old.config.items() if k not in defense.STORAGE_OPTIONS}
    return old if kept == defense.describe_work() else None


def apply_defense(name: str, run_dir: str | Path, options: dict[str, Any], rerun: bool = False,
                  **kw: Any) -> tuple[MitigationResult | DetectionResult, bool]:
    """``(result, reused)``: the defense's result on a run, reused from ``RUN/defenses/NAME`` when
    its options match (unless ``rerun``), else :func:`~veil.defenses.run_defense` with ``kw``."""
    old = None if rerun else cached_result(name, run_dir, options)
    if old is not None:
        log.info("%s on %s: reusing %s", name, run_dir, defense_dir(run_dir, name) / RESULT_FILE)
        return old, True
    return run_defense(name, run_dir, **kw, **options), False


def make_card(
    run_dir: str | Path,
    reference: str | Path,
    defenses: Sequence[str] | None = None,
    options: dict[str, dict[str, Any]] | None = None,
    device: str | torch.device = "cpu",
    data_root: str | None = None,
    test_subset: int | None = None,
    rerun: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Run every applicable defense on ``run_dir`` and on ``reference``; write and return the card.

    Args:
        run_dir: the attack run.
        reference: a clean run (attack ``none``) on the same dataset and image size.
        defenses: defense names (default: every registered one that applies to the model).
        options: per-defense options, ``{"strip": {"superimpose": 50}, ...}``.
        device, data_root, test_subset, progress: as :func:`~veil.defenses.run_defense`.
        rerun: run every defense again even where a result with the same options exists.

    Returns:
        The card: ``{"run", "reference", "attack", "model", "notes", "natural_asr", "rows": [...]}``,
        one row per defense (``defense``, ``kind``, ``attack`` and ``clean`` cells with ``text``,
        ``seconds``, ``reused`` and the result's figures, or ``skipped`` with the reason).

    Raises:
        ConfigError: no reference, a reference that is not a clean run or is on other data, an
            unknown defense or option, or a named defense that cannot run on the model.
    """
    from veil.runs import load_run

    options = dict(options or {})
    run_path = Path(run_dir)
    if reference is None:
        raise ConfigError("the card needs a clean reference run (--reference CLEAN_RUN): its false positives and the "
                          "clean model's success rate on the triggered images are half of the card")
    ref_path = Path(reference)
    attacked, clean = load_run(run_path, device=device), load_run(ref_path, device=device)
    if clean.config.attack != "none":
        raise ConfigError(f"the reference {ref_path} is a {clean.config.attack!r} run; it must be a clean run (attack none)")
    if attacked.config.attack == "none":
        raise ConfigError(f"{run_path} is a clean run; the card is for an attack run (its reference is the clean one)")
    if (attacked.config.dataset, attacked.config.image_size) != (clean.config.dataset, clean.config.image_size):
        raise ConfigError(f"the reference {ref_path} was trained on {clean.config.dataset} at {clean.config.image_size}px, "
                          f"the run on {attacked.config.dataset} at {attacked.config.image_size}px")
    unknown = set(options) - set(list_defenses())
    if unknown:
        raise ConfigError(f"options for unknown defense(s): {', '.join(sorted(unknown))} (known: {', '.join(list_defenses())})")
    names = list(defenses) if defenses else list_defenses()
    for name in names:
        DEFENSES.get(name)  # ConfigError naming the known ones
    inapplicable = {n: reason for n in list_defenses() if (reason := DEFENSES.get(n).not_applicable(attacked.model))}
    for name in names:
        if defenses and name in inapplicable:
            raise ConfigError(f"defense {name!r} cannot run on {attacked.config.model}: {inapplicable[name]}")
    kw = {"device": device, "data_root": data_root, "test_subset": test_subset, "progress": progress}

    _, test = attacked.data(data_root=data_root)
    natural = transformed_accuracy(clean.model, attacked.attack.poison_test(test))
    notes = [] if attacked.config.base_augment else [NO_AUGMENT_NOTE]
    rows: list[dict[str, Any]] = []
    for name in names:
        cls = DEFENSES.get(name)
        row: dict[str, Any] = {"defense": name, "kind": cls.kind}
        if name in inapplicable:
            row["skipped"] = inapplicable[name]
            rows.append(row)
            continue
        opts = options.get(name, {})
        for side, path in (("attack", run_path), ("clean", ref_path)):
            result, reused = apply_defense(name, path, opts, rerun, **kw)
            row[side] = {"text": cell_text(result), "short": cell_short(result), "seconds": result.seconds,
                         "reused": reused, **result_figures(result)}
            log.info("card: %s on the %s run: %s", name, side, row[side]["text"])
        rows.append(row)
    # a defense that cannot apply to the model is on the card as such even when not named
    rows += [{"defense": n, "kind": DEFENSES.get(n).kind, "skipped": reason} for n, reason in inapplicable.items()
             if n not in names]
    rows = _with_earlier_rows(run_path, str(ref_path), rows)
    card = {
        "run": str(run_path), "reference": str(ref_path), "attack": attacked.config.attack,
        "dataset": attacked.config.dataset, "model": attacked.config.model, "notes": notes,
        "natural_asr": natural, "rows": rows,
    }
    out = run_path / CARD_DIR
    atomic_write_json(out / "card.json", card)
    atomic_write_json(out / "tables" / "card.json", card_table(card))
    atomic_write_bytes(out / "card.md", card_markdown(card).encode("utf-8"))
    return card


def _with_earlier_rows(run_dir: Path, reference: str, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """This call's rows with those of the run's earlier card (:func:`load_card`) for the defenses this call did
    not run, when that card has the same reference: a card made in several calls (a defense added
    later) keeps every defense. A card against another reference is replaced whole."""
    if not (run_dir / CARD_DIR / "card.json").exists():
        return rows
    try:
        earlier = load_card(run_dir)
    except (ConfigError, RecordError) as exc:  # an unreadable old card is replaced, never fatal
        log.warning("card: %s; writing a new card", exc)
        return rows
    if str(earlier["reference"]) != reference:
        return rows
    new = {r["defense"]: r for r in rows}
    merged = [new.pop(r["defense"], r) for r in earlier.get("rows", []) if isinstance(r, dict) and "defense" in r]
    return merged + [r for r in rows if r["defense"] in new]


def _label(path: str | Path) -> str:
    """A run's folder as a row label: its last two path parts (``adaptive/reference``)."""
    return "/".join(Path(path).parts[-2:])


def result_figures(result: MitigationResult | DetectionResult) -> dict[str, Any]:
    """A result's headline figures: a mitigator's accuracy, ASR, robust accuracy and DER; a detector's verdict, score and metrics."""
    if isinstance(result, MitigationResult):
        return {"clean_accuracy": result.clean_accuracy, "attack_success_rate": result.attack_success_rate,
                "robust_accuracy": result.robust_accuracy, "defense_effectiveness_rate": result.defense_effectiveness_rate}
    return {"detected": result.detected, "score": result.score, **{k: v for k, v in result.metrics.items()}}


def card_table(card: dict[str, Any]) -> dict[str, Any]:
    """The card as a report table: defense | kind | on the attack | on the clean model | time."""
    rows = []
    for r in card["rows"]:
        if "skipped" in r:
            rows.append([r["defense"], r["kind"], f"not applicable: {r['skipped']}", "", None])
            continue
        seconds = sum(r[s]["seconds"] or 0.0 for s in ("attack", "clean"))
        rows.append([r["defense"], r["kind"], r["attack"]["text"], r["clean"]["text"], round(seconds, 1)])
    notes = [f"the clean model sends {_f(100 * card['natural_asr'], 1)} % of the triggered test images to the target"]
    return {
        "title": f"stealth card: {card['attack']} on {card['dataset']} ({card['model']}), reference {card['reference']}",
        "columns": ["defense", "kind", "on the attack run", "on the clean model", "time s (both)"],
        "rows": rows,
        "note": "; ".join(notes + card["notes"]),
    }


def card_markdown(card: dict[str, Any]) -> str:
    table = card_table(card)
    lines = [f"# {table['title']}", "", "| " + " | ".join(table["columns"]) + " |",
             "|" + "---|" * len(table["columns"])]
    lines += ["| " + " | ".join("" if v is None else str(v) for v in row) + " |" for row in table["rows"]]
    return "\n".join(lines + ["", table["note"] + ".", ""])


def load_card(run_dir: str | Path) -> dict[str, Any]:
    """The card :func:`make_card` wrote for ``run_dir`` (``RUN/card/card.json``).

    Raises:
        ConfigError: the run has no card yet, or its card cannot be read.
    """
    from veil.records import read_json

    path = Path(run_dir) / CARD_DIR / "card.json"
    if not path.exists():
        raise ConfigError(f"{run_dir} has no card yet ({path} is missing): run veil card on it with its --reference first")
    card = read_json(path)
    if not isinstance(card, dict) or not {"attack", "model", "rows", "reference"} <= set(card):
        raise ConfigError(f"{path} is not a stealth card")
    return card


def card_matrix(cards: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Attacks x defenses: one row per card, one column per defense, each cell the defense's
    figure on the attack run with its time; the clean model's success rate per attack; then one
    row per distinct clean reference with the same defenses' figures on it (the false positives).
    A defense a card did not run reads "not run"; one that cannot apply to the model, "n/a"."""
    names: list[str] = []
    for c in cards:
        names += [r["defense"] for r in c["rows"] if r["defense"] not in names]

    def cells(card: dict[str, Any], side: str) -> list[str]:
        by = {r["defense"]: r for r in card["rows"]}
        out = []
        for n in names:
            r = by.get(n)
            if r is None:
                out.append("not run")
            elif "skipped" in r:
                out.append("n/a")
            else:
                out.append(f"{r[side]['short']} [{_f(r[side]['seconds'], 0)} s]")
        return out

    rows = [[f"{c['attack']} ({c['model']}) {_label(c['run'])}", f"{_f(100 * c['natural_asr'], 1)} %",
             *cells(c, "attack")] for c in cards]
    references: dict[str, list[dict[str, Any]]] = {}
    for c in cards:
        references.setdefault(str(c["reference"]), []).append(c)
    for ref, group in references.items():
        # each card of this reference holds the defenses it ran on it; merge them
        merged = {"rows": [r for r in (next((x for g in group for x in g["rows"] if x["defense"] == n), None) for n in names) if r]}
        rows.append([f"clean reference ({group[0]['model']}) {_label(ref)}", "-", *cells(merged, "clean")])
    return {"title": "stealth cards: attacks x defenses (figure on the attack run [time])",
            "columns": ["attack (model)", "clean model's ASR", *names], "rows": rows,
            "note": "the last rows are the clean references: a detector's verdict there is a false positive, a "
                    "mitigator's figures its cost on a model with no backdoor"}
