"""``veil reproduce``: a seed paper's table, the paper's figures beside veil's.

Each paper is a YAML file in this folder (``frequency.yaml``, ``multinomial.yaml``) holding its
tables: the layout (rows, column groups, the metrics of each group), the paper's figures, and per
scale (``cpu``: the recipes measured on 2 cores; ``paper``: the paper's budget, for a GPU) the
steps that produce veil's figures and the cells they fill::

    tables:
      "3":
        caption: ...
        row_label: "|I_P|"
        rows: ["50", "100"]
        columns: [ResNet18, ResNet34]
        metrics: [clean_accuracy, attack_success_rate]   # metrics.json keys, dotted for nested
        labels: [CDA, ASR]
        percent: [true, true]            # the paper gives these in %; veil's fractions are scaled
        paper: {"50": [[75.76, 63.17], [76.76, 64.95]], ...}   # null: the paper has no figure
        scales:
          cpu:
            steps:                       # run in order; a step is a recipe (veil recipes)
              - {name: reference, recipe: frequency/gtsrb-cpu-reference}
              - {name: table3, recipe: frequency/gtsrb-cpu-table3, reference_run: reference}
            cells:                       # which finished run fills which cell
              - {step: table3, row_key: poison_count, column: ResNet18}   # one row per point
              - {step: table2, point: 1, row: Ours-one-target, column: GTSRB}  # one point
              - {step: clean, row: Standard Training, column: GTSRB}      # a run step

``data: SUBFOLDER`` makes a step read ``DATA_ROOT/SUBFOLDER`` (a table whose steps need different
dataset folders, e.g. ``cifar10-subset`` beside ``gtsrb``, takes the folder holding both as
``--data-root``). ``reference_run: STEP`` passes that step's run folder to a run step, or to every point of a sweep
step, as the attack's ``reference_run`` (and ``attention_run: STEP`` as its ``attention_run``: ATTEQ's
attention network). :func:`reproduce` runs the steps (finished runs are read back, not
retrained) and writes ``OUT/table-T.md``, ``OUT/table-T.json`` and ``OUT/report-T.html``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from veil import records as rec
from veil.errors import ConfigError

__all__ = ["PAPERS_DIR", "Step", "list_papers", "load_paper", "plan", "reproduce", "table_markdown"]

PAPERS_DIR = Path(__file__).resolve().parent
SCALES = ("cpu", "paper")
#: step keys naming an earlier run step whose folder becomes the attack option of that name
RUN_LINKS = ("reference_run", "attention_run")


def list_papers() -> list[str]:
    """Names of the papers ``veil reproduce`` knows, sorted."""
    return sorted(p.stem for p in PAPERS_DIR.glob("*.yaml"))


def load_paper(name: str) -> dict[str, Any]:
    """The parsed and checked paper file ``name``.

    Raises:
        ConfigError: no such paper (the message lists the known ones), or the file is invalid.
    """
    from veil.safeyaml import load_yaml

    path = PAPERS_DIR / f"{name}.yaml"
    if not path.is_file() or "/" in name:
        raise ConfigError(f"unknown paper {name!r}; veil reproduce knows {', '.join(list_papers())}")
    spec = load_yaml(path.read_text(encoding="utf-8"), f"paper file {path}")
    for key in ("paper", "title", "tables"):
        if key not in spec:
            raise ConfigError(f"paper file {path} has no {key!r}")
    steps_seen: dict[tuple[str, str], dict[str, Any]] = {}
    for t, table in spec["tables"].items():
        where = f"paper {name}, table {t}"
        n_cols, n_metrics = len(table["columns"]), len(table["metrics"])
        if len(table["labels"]) != n_metrics or len(table["percent"]) != n_metrics:
            raise ConfigError(f"{where}: 'labels' and 'percent' need one entry per metric")
        for row, groups in table["paper"].items():
            if str(row) not in table["rows"] or len(groups) != n_cols or any(len(g) != n_metrics for g in groups):
                raise ConfigError(f"{where}: the paper's row {row!r} does not fit the layout")
        for scale, plan_ in table["scales"].items():
            if scale not in SCALES:
                raise ConfigError(f"{where}: unknown scale {scale!r}; scales: {', '.join(SCALES)}")
            names = [s["name"] for s in plan_["steps"]]
            for s in plan_["steps"]:
                same = {k: s.get(k) for k in ("recipe", "data", *RUN_LINKS)}
                if steps_seen.setdefault((scale, s["name"]), same) != same:
                    raise ConfigError(f"{where}, scale {scale}: step {s['name']!r} differs from the step of that name in "
                                      "another table (the tables of a paper share their runs)")
            for s in plan_["steps"]:
                sub = s.get("data")
                if sub is not None and (not isinstance(sub, str) or not sub or Path(sub).is_absolute() or ".." in Path(sub).parts):
                    raise ConfigError(f"{where}, scale {scale}: step {s['name']!r} has data {sub!r}; it must be a "
                                      "sub-folder of the data root")
            for cell in plan_["cells"]:
                if cell["step"] not in names:
                    raise ConfigError(f"{where}, scale {scale}: a cell names the unknown step {cell['step']!r}")
                if "row" in cell and str(cell["row"]) not in [str(r) for r in table["rows"]]:
                    raise ConfigError(f"{where}, scale {scale}: a cell names the unknown row {cell['row']!r}")
                if "column" in cell and cell["column"] not in table["columns"]:
                    raise ConfigError(f"{where}, scale {scale}: a cell names the unknown column {cell['column']!r}")
    return spec


@dataclass(frozen=True)
class Step:
    """One step of a reproduction: a recipe run in ``out``."""

    name: str
    recipe: str
    out: Path
    kind: str  # "run" or "sweep"
    points: tuple[tuple[str, Any], ...]  # (point name, RunConfig); one for a run step
    sweep_spec: dict[str, Any] | None = None  # a sweep step's resolved sweep-file mapping


def _table(spec: dict[str, Any], table: str | None) -> tuple[str, dict[str, Any]]:
    tables = spec["tables"]
    key = str(table) if table is not None else next(iter(tables))
    if key not in tables:
        raise ConfigError(f"paper {spec['paper']} has no table {key!r} in veil; tables: {', '.join(tables)}")
    return key, tables[key]


def _links(paper: str, key: str, step: dict[str, Any], steps: list[Step]) -> dict[str, str]:
    """The attack options ``step`` links to earlier run steps (:data:`RUN_LINKS`): option -> folder."""
    done = {st.name: st for st in steps}
    links = {}
    for option in RUN_LINKS:
        if option in step:
            ref = done.get(step[option])
            if ref is None or ref.kind != "run":
                raise ConfigError(f"paper {paper}, table {key}: step {step['name']} needs the run step {step[option]!r} before it")
            links[option] = str(ref.out)
    return links


def plan(paper: str, table: str | None, scale: str, data_root: str | None, out: str | Path,
         device: str | None = None) -> tuple[str, dict[str, Any], list[Step]]:
    """The steps that reproduce ``paper``'s ``table`` at ``scale``: (table key, table spec, steps),
    every point's RunConfig built and checked; nothing is trained."""
    from veil.recipes import load_recipe
    from veil.sweep import parse_sweep

    spec = load_paper(paper)
    key, tspec = _table(spec, table)
    if scale not in tspec["scales"]:
        raise ConfigError(f"paper {paper}, table {key}: no {scale!r} scale; scales: {', '.join(tspec['scales'])}")
    out = Path(out).resolve()
    steps: list[Step] = []
    for s in tspec["scales"][scale]["steps"]:
        recipe = load_recipe(s["recipe"])
        step_out = out / s["name"]
        step_root = data_root
        if data_root is not None and s.get("data"):
            step_root = str(Path(data_root) / s["data"])
        overrides: dict[str, Any] = {"data_root": step_root} if step_root is not None else {}
        if device is not None:
            overrides["device"] = device
        if recipe.kind == "run":
            links = _links(paper, key, s, steps)
            if links:
                overrides["attack_options"] = links  # merged with the recipe's options
            config = recipe.run_config(overrides, out=str(step_out))
            steps.append(Step(s["name"], recipe.name, step_out, "run", ((s["name"], config),)))
            continue
        sweep_spec = recipe.sweep_spec(step_root, str(step_out))
        base = dict(sweep_spec["base"])
        if device is not None:
            base["device"] = device
        links = _links(paper, key, s, steps)
        if links:
            base["attack_options"] = {**dict(base.get("attack_options") or {}), **links}
        sweep_spec["base"] = base
        sweep = parse_sweep(sweep_spec, base_dir=Path.cwd(), default_name=recipe.name.replace("/", "-"), recipe=recipe.name)
        steps.append(Step(s["name"], recipe.name, step_out, "sweep", tuple(sweep.points()), sweep_spec))
    return key, tspec, steps


def _value(metrics: dict[str, Any] | None, name: str) -> float | None:
    value: Any = metrics
    for part in name.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _fmt(value: float | None, percent: bool) -> str:
    if value is None or math.isnan(value):
        return "–"
    return f"{value:.2f}" if percent else f"{value:.4f}"


def build_table(paper: str, key: str, tspec: dict[str, Any], scale: str, steps: list[Step]) -> dict[str, Any]:
    """The table in the paper's layout: per column group and metric, the paper's figure and veil's."""
    by_step = {s.name: s for s in steps}
    veil: dict[tuple[str, str], dict[str, Any]] = {}  # (row, column) -> metrics.json
    sources: dict[tuple[str, str], str] = {}
    for cell in tspec["scales"][scale]["cells"]:
        step = by_step[cell["step"]]
        points = list(step.points)
        if "point" in cell:
            points = [points[int(cell["point"])]]
        for _, config in points:
            record = rec.RunRecord(config.out)
            if not record.finished:
                continue
            row = str(cell["row"]) if "row" in cell else str(getattr(config, cell["row_key"]))
            if "column" in cell:
                column = cell["column"]
            else:
                column = cell["columns"][str(getattr(config, cell["column_key"]))]
            veil[(row, column)] = record.metrics()
            sources[(row, column)] = str(config.out)
    header = [tspec["row_label"]]
    for col in tspec["columns"]:
        for label in tspec["labels"]:
            header += [f"{col} {label} paper", f"{col} {label} veil"]
    rows = []
    for row in tspec["rows"]:
        cells = [row]
        paper_row = tspec["paper"].get(row) or tspec["paper"].get(int(row) if row.isdigit() else row)
        for ci, col in enumerate(tspec["columns"]):
            m = veil.get((row, col))
            for mi, metric in enumerate(tspec["metrics"]):
                pct = tspec["percent"][mi]
                ours = _value(m, metric)
                p = paper_row[ci][mi] if paper_row else None
                cells += [_fmt(p, pct), _fmt(ours * 100 if (ours is not None and pct) else ours, pct)]
        rows.append(cells)
    filled = len(veil)
    return {
        "title": f"{paper}, Table {key} ({scale} scale): the paper beside veil",
        "caption": tspec.get("caption"),
        "columns": header,
        "rows": rows,
        "note": (
            f"{filled} cell group(s) measured by veil; – where veil has no run (or the paper no figure); "
            + tspec["scales"][scale].get("note", "")
        ).strip(),
        "runs": {f"{r} / {c}": path for (r, c), path in sources.items()},
    }


def table_markdown(table: dict[str, Any]) -> str:
    """The reproduced table as Markdown."""
    from veil.sweep import table_markdown as md

    return md(table) + (f"\n{table['caption']}\n" if table.get("caption") else "")


def reproduce(paper: str, table: str | None = None, scale: str = "cpu", data_root: str | None = None,
              out: str | Path = "runs/reproduce", device: str | None = None, progress: bool = True,
              dry_run: bool = False) -> dict[str, Any]:
    """Run the steps behind ``paper``'s ``table`` at ``scale`` (finished runs are read back) and
    write the table beside the paper's; with ``dry_run`` train nothing, write nothing and return the
    table of what is finished."""
    from veil.errors import VeilError
    from veil.experiment import run_experiment, seed_everything
    from veil.sweep import parse_sweep
    from veil.sweep_exec import run_sweep

    key, tspec, steps = plan(paper, table, scale, data_root, out, device)
    failed: list[str] = []  # a point that cannot be mounted is a "–" in the table, with its reason
    if not dry_run:
        for step in steps:
            if step.kind == "run":
                (_, config), = step.points
                if not rec.RunRecord(config.out).finished:
                    seed_everything(config.seed)
                    try:
                        run_experiment(dataclasses.replace(config, progress=progress))
                    except VeilError as exc:
                        failed.append(f"{step.name}: {exc}")
                continue
            sweep = parse_sweep(step.sweep_spec, base_dir=Path.cwd(), recipe=step.recipe)
            result = run_sweep(sweep, progress=progress, keep_going=True)
            failed += [f"{step.name}/{p.name}: {p.error}" for p in result.failed]
    result_table = build_table(paper, key, tspec, scale, steps)
    if failed:
        result_table["failed"] = failed
        result_table["note"] = result_table.get("note", "") + " Failed: " + "; ".join(failed) + "."
    if dry_run:  # a dry run reports; it writes nothing (an earlier table stays as it was)
        return result_table
    root = Path(out).resolve()
    rec.atomic_write_json(root / f"table-{key}.json", result_table)
    rec.atomic_write_bytes(root / f"table-{key}.md", table_markdown(result_table).encode("utf-8"))
    finished = sorted({p for p in result_table["runs"].values()})
    if finished:
        from veil.report.html import write_report

        write_report(finished, root / f"report-{key}.html", title=result_table["title"], tables=[result_table])
    if failed:
        raise ConfigError(f"{len(failed)} run(s) failed (the table at {root / f'table-{key}.md'} has the rest): "
                          + "; ".join(failed))
    return result_table
