"""``veil sweep``: run a grid of ``veil run`` configurations from one small YAML file.

A sweep file names a base configuration (any :class:`veil.runs.RunConfig` field, spelled as
the ``veil run`` option with ``_`` for ``-``), the values to vary (``grid``: a cartesian product;
``runs``: explicit override sets), optional ``seeds`` (every point once per seed; cells show mean
± std (n)) and ``defenses`` (run on each finished point; figures as columns), and how to lay the
results out (``table``: rows, column groups, metrics), e.g. Table 3 of Hammoud & Ghanem (2021).
The format with a full example is in ``examples/sweeps/README.md``.

Rules:

- Top-level keys: ``name``, ``description``, ``out``, ``base``, ``grid``, ``runs``, ``seeds``,
  ``defenses``, ``table``;
  anything else is a :class:`~veil.errors.ConfigError` naming the key and listing the valid ones.
  Likewise an unknown RunConfig field anywhere, an empty or non-list grid entry, and a value of the
  wrong type (``epochs: four``). ``out``, ``overwrite`` and ``progress`` belong to the sweep and the
  command line, not to the file.
- Attack options can be set as a mapping (``attack_options: {patch_size: 4}``) or one at a time
  with a dotted key (``attack_options.patch_size: [3, 4]`` in ``grid``); the mappings of ``base``,
  a ``runs`` entry and the grid are merged key by key. A key set by both a ``runs`` entry and the
  grid is an error.
- Relative paths resolve against the folder of the YAML file: ``out``, ``data_root``,
  ``cache_dir``, ``lpips_weights`` and every attack option whose name ends in ``_run``, ``_path``,
  ``_dir``, ``_file``, ``_root`` or ``_weights`` (e.g. the frequency attack's ``reference_run``).
  ``~`` and ``$VARIABLES`` are expanded first.
- Each point's folder is named after the values it overrides (its ``runs`` entry and grid keys,
  sorted by key), e.g. ``poison_count=50`` or ``model=vgg16,poison_count=50,width=32``; an attack
  option appears by its own name (``patch_size=4``). Names only depend on the point's own values, so
  adding values to the grid later keeps the finished folders.
- Every point's RunConfig is built and validated (names, ranges, attack option names) when the file
  is loaded, and the data folders and reference runs are checked to exist before the first point
  trains, so a typo fails in a second, not after an hour.

Running (:func:`veil.sweep_exec.run_sweep`, ``veil sweep FILE``) trains the points in order with the same seeding as
``veil run``, skips points whose folder already holds a finished run, resumes interrupted ones from
their checkpoint, stops at the first failing point (``--keep-going`` carries on and lists the
failures), and writes ``OUT/sweep_table.json``, ``OUT/sweep_table.md`` and ``OUT/report.html`` (the
HTML report over the finished points with the sweep table at the top). ``OUT/sweep.json`` records
the resolved sweep. Where the points run (this process, worker processes, Ray, SLURM) and how
workers share them is :mod:`veil.sweep_exec` and :mod:`veil.claims` (``docs/sweeps.md``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import math
import os
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from veil import records as rec
from veil.errors import ConfigError, VeilError
from veil.options import type_name, value_matches
from veil.runs import RunConfig, resolve_config

log = logging.getLogger(__name__)

__all__ = [
    "PointResult",
    "Sweep",
    "SweepResult",
    "TableSpec",
    "load_sweep",
    "parse_sweep",
    "sweep_table",
    "table_markdown",
]

TOP_LEVEL_KEYS = ("name", "description", "out", "base", "grid", "runs", "seeds", "defenses", "table")
TABLE_KEYS = ("rows", "columns", "metrics", "title")
#: RunConfig fields the sweep itself sets (from its ``out`` folder and the command line)
RESERVED_FIELDS = {
    "out": "the sweep puts each point in OUT/<point name>; set the top-level 'out' instead",
    "overwrite": "pass --overwrite to veil sweep (or overwrite=True to run_sweep) instead",
    "progress": "it is set by veil sweep",
    "recipe": "a recipe is run with veil sweep --recipe NAME or veil run --recipe NAME",
    "sources": "veil records where each setting came from",
}
#: RunConfig fields holding paths (resolved against the YAML file's folder)
PATH_FIELDS = ("data_root", "cache_dir", "lpips_weights")
#: attack options whose names end like this hold paths (resolved against the YAML file's folder)
PATH_OPTION_SUFFIXES = ("_run", "_path", "_dir", "_file", "_root", "_weights")
ATTACK_OPTIONS = "attack_options"
#: the table key meaning "the point's folder name"
NAME_KEY = "name"

TABLE_JSON = "sweep_table.json"
TABLE_MD = "sweep_table.md"
REPORT_HTML = "report.html"
SWEEP_JSON = "sweep.json"

#: metrics a table can show: name in metrics.json (dotted for nested) -> (column label, kind)
METRICS: dict[str, tuple[str, str]] = {
    "clean_accuracy": ("CDA %", "percent"),
    "attack_success_rate": ("ASR %", "percent"),
    "poison_count": ("poisoned", "int"),
    "extra_count": ("extra", "int"),
    "train_size": ("train size", "int"),
    "test_size": ("test size", "int"),
    "asr_test_size": ("ASR test size", "int"),
    "stealth_samples": ("stealth samples", "int"),
    "stealth.psnr": ("PSNR", ".2f"),
    "stealth.ssim": ("SSIM", ".4f"),
    "stealth.ssim_3x3": ("SSIM (3x3 window, ATTEQ's)", ".4f"),
    "stealth.mse": ("MSE", ".3f"),
    "stealth.lpips": ("LPIPS", ".4f"),
    "stealth.l1": ("L1 [0, 1]", ".5f"),
    "stealth.l1_grey_levels": ("L1 (grey levels)", ".4f"),
    "stealth.linf": ("L-inf", "int"),
    "stealth.modified_fraction": ("modified %", "percent"),
    "timings.data_seconds": ("data s", ".0f"),
    "timings.attack_fit_seconds": ("fit s", ".0f"),
    "timings.train_seconds": ("train s", ".0f"),
    "timings.train_images_per_second": ("img/s", ".0f"),
    "timings.final_eval_seconds": ("eval s", ".0f"),
    "timings.total_seconds": ("total s", ".0f"),
}
DEFAULT_METRICS = ("clean_accuracy", "attack_success_rate")
#: prefix of the attack-specific figures (``metrics.json``'s ``attack_metrics``), e.g.
#: ``attack_metrics.feature_distance``; any name under it is accepted in a table
ATTACK_METRICS_PREFIX = "attack_metrics."


#: prefix of a sweep defense's figures (``defenses.NAME.FIGURE``, see :func:`defense_metrics`)
DEFENSE_PREFIX = "defenses."
_DEFENSE_FIGURES = {
    "attack_success_rate": ("ASR %", "percent"),
    "clean_accuracy": ("CDA %", "percent"),
    "robust_accuracy": ("RA %", "percent"),
    "defense_effectiveness_rate": ("DER", ".3f"),
    "detected": ("detected", "yesno"),
    "score": ("score", ".3f"),
    "auroc": ("AUROC", ".3f"),
}


def metric_spec(name: str) -> tuple[str, str]:
    """(column label, format) of a table metric: :data:`METRICS`; for ``attack_metrics.NAME`` the
    label ``NAME`` and 4 significant digits; for ``defenses.DEFENSE.FIGURE`` ``DEFENSE FIGURE``."""
    if name in METRICS:
        return METRICS[name]
    if name.startswith(DEFENSE_PREFIX):
        defense, _, figure = name[len(DEFENSE_PREFIX):].rpartition(".")
        label, kind = _DEFENSE_FIGURES.get(figure, (figure, ".4g"))
        return (f"{defense} {label}", kind)
    return (name[len(ATTACK_METRICS_PREFIX) :], ".4g")


def defense_metrics(sweep: Sweep, metrics_by_point: Mapping[str, Mapping[str, Any] | None] | None = None) -> list[str]:
    """The table metrics of the sweep's defenses: a mitigator's ASR and clean accuracy after it, a
    detector's verdict and score, and its AUROC where a finished point's result has one."""
    from veil.defenses import DEFENSES
    from veil.defenses.base import Mitigator

    names = []
    for d, _ in defense_items(sweep):
        if issubclass(DEFENSES.get(d), Mitigator):
            figures = ["attack_success_rate", "clean_accuracy"]
        else:
            figures = ["detected", "score"]
            if any(_metric(m, f"{DEFENSE_PREFIX}{d}.auroc") is not None for m in (metrics_by_point or {}).values()):
                figures.append("auroc")
        names += [f"{DEFENSE_PREFIX}{d}.{f}" for f in figures]
    return names


#: legend lines under a table for metrics whose label is an abbreviation
_LEGEND = {
    "clean_accuracy": "CDA: clean data accuracy on the test set",
    "attack_success_rate": "ASR: attack success rate on poisoned test images whose label differs from the target",
}
DASH = "\u2013"

_RUN_FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}
_REQUIRED_FIELDS = [
    f.name for f in dataclasses.fields(RunConfig)
    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
]
_SAFE = re.compile(r"[^A-Za-z0-9._+\-]")
_MAX_NAME = 160


# --------------------------------------------------------------------------- the sweep


@dataclass(frozen=True)
class TableSpec:
    """How the sweep's results are laid out (``table:`` in the file).

    Attributes:
        rows: the key whose values give the rows (a RunConfig field, ``attack_options.NAME``, or
            ``name`` for one row per point).
        columns: keys whose value combinations give the column groups (may be empty).
        metrics: metrics shown in every column group (names in :data:`METRICS`).
        title: table title (default: the sweep's name).
    """

    rows: str = NAME_KEY
    columns: tuple[str, ...] = ()
    metrics: tuple[str, ...] = DEFAULT_METRICS
    title: str | None = None


@dataclass(frozen=True)
class Sweep:
    """A parsed, validated sweep file (see the module docstring for the format).

    Attributes:
        name: the sweep's name.
        out: folder holding one run folder per point (absolute).
        base: flat base settings (``attack_options.NAME`` keys for attack options), paths resolved.
        grid: key -> list of values, in file order (paths resolved).
        runs: explicit override sets, flat, paths resolved (empty: the grid alone).
        table: the results layout.
        source: the YAML file (``None`` when parsed from a mapping without one).
        description: free text from the file.
        recipe: the named recipe the sweep comes from (``veil sweep --recipe``), recorded by every point.
        seeds: ``seeds:`` in the file: every point runs once per seed (folder ``NAME,seed=S``,
            sorted in with the other keys), and the table shows mean, standard deviation and n.
        defenses: ``defenses:`` in the file: defense name -> options, run on every finished point
            by the worker that ran it (:mod:`veil.sweep_exec`); their figures are table columns.
    """

    name: str
    out: Path
    base: dict[str, Any]
    grid: dict[str, list[Any]]
    runs: list[dict[str, Any]]
    table: TableSpec
    source: Path | None = None
    description: str | None = None
    recipe: str | None = None
    seeds: tuple[int, ...] = ()
    defenses: dict[str, dict[str, Any]] = field(default_factory=dict)
    # raw (unresolved) override values, used for readable folder names
    _raw_grid: dict[str, list[Any]] = field(default_factory=dict, repr=False, compare=False)
    _raw_runs: list[dict[str, Any]] = field(default_factory=list, repr=False, compare=False)

    def _point_settings(self) -> list[tuple[dict[str, Any], dict[str, Any], dict[str, Any]]]:
        """Per point: (merged flat settings, resolved overrides, raw overrides)."""
        keys = list(self.grid)
        combos = list(itertools.product(*(range(len(self.grid[k])) for k in keys))) if keys else [()]
        raw_grid = self._raw_grid if set(self._raw_grid) == set(self.grid) else self.grid
        raw_runs = self._raw_runs if len(self._raw_runs) == len(self.runs) else self.runs
        runs = list(zip(self.runs, raw_runs)) if self.runs else [({}, {})]
        out = []
        for run, raw_run in runs:
            for combo in combos:
                over = dict(run)
                raw = dict(raw_run)
                for k, i in zip(keys, combo):
                    over[k] = self.grid[k][i]
                    raw[k] = raw_grid[k][i]
                merged = {**self.base, **over}
                out.append((merged, over, raw))
        return out

    def points(self) -> list[tuple[str, RunConfig]]:
        """Every point as ``(folder name, RunConfig)``, in order (``runs`` entries slowest, then
        the grid keys in file order, then the seeds). Each RunConfig is validated."""
        return [(name, config) for name, config, _, _ in self._points()]

    def groups(self) -> dict[str, str]:
        """Point name -> the name of its group: the point without its seed (itself without ``seeds``)."""
        return {name: group for name, _, _, group in self._points()}

    def _points(self) -> list[tuple[str, RunConfig, dict[str, Any], str]]:
        result: list[tuple[str, RunConfig, dict[str, Any], str]] = []
        seen: dict[str, int] = {}
        for i, (merged_all, _over, raw_all) in enumerate(self._point_settings()):
            group = point_name(raw_all)
            for seed in self.seeds or (None,):
                merged, raw = merged_all, raw_all
                if seed is not None:
                    merged, raw = {**merged_all, "seed": seed}, {**raw_all, "seed": seed}
                name = point_name(raw)
                if name in seen:
                    raise ConfigError(
                        f"sweep {self.name!r}: points {seen[name] + 1} and {i + 1} have the same settings ({name}); "
                        "remove the duplicate from 'runs' or 'grid'"
                    )
                seen[name] = i
                where = f"point {name}"
                if self.recipe is None:
                    config = _build_config(merged, str(self.out / name), where)
                else:  # a sweep recipe's settings, with the command line's data folder and device
                    user = {k: merged[k] for k in ("data_root", "device") if k in merged}
                    rest = {k: v for k, v in merged.items() if k not in user}
                    config = _build_config(user, str(self.out / name), where, recipe_flat=rest, recipe_name=self.recipe)
                result.append((name, config, merged, group))
        return result

    def point_values(self) -> dict[str, dict[str, Any]]:
        """Per point name, the value of every key a table can use (flat settings with RunConfig
        defaults filled in, plus ``name``: the point's group, see :meth:`groups`)."""
        values = {}
        for name, config, merged, group in self._points():
            v = {k: getattr(config, k) for k in _RUN_FIELDS if k != ATTACK_OPTIONS and k not in RESERVED_FIELDS}
            v.update({k: val for k, val in merged.items() if k.startswith(ATTACK_OPTIONS + ".")})
            v[NAME_KEY] = group
            values[name] = v
        return values

    def check_out(self) -> None:
        """Check that ``out`` can hold this sweep: not a file, writable, and either missing, empty
        or a veil sweep folder (one holding ``sweep.json``), so that a sweep never writes its table
        and report into a folder of something else; and no point's folder is a file."""
        out = self.out
        if out.exists() and not out.is_dir():
            raise ConfigError(f"sweep out {out} exists and is not a folder")
        existing = next((p for p in (out, *out.parents) if p.exists()), None)
        if existing is not None and not existing.is_dir():
            raise ConfigError(f"sweep out {out} is under {existing}, which is a file")
        if existing is not None and not os.access(existing, os.W_OK):
            raise ConfigError(f"sweep out {existing} is not writable")
        if out.is_dir() and not (out / SWEEP_JSON).is_file() and any(not p.name.startswith(".") for p in out.iterdir()):
            raise ConfigError(f"sweep out {out} is not empty and is not a veil sweep folder (no {SWEEP_JSON}); "
                              "choose another 'out'")
        for name, config in self.points():
            if Path(config.out).exists() and not Path(config.out).is_dir():
                raise ConfigError(f"point {name}: its folder {config.out} exists and is not a folder")

    def check(self, overwrite: bool = False) -> None:
        """Every check the sweep makes before it trains (the dry run makes the same): the points'
        settings, their attack options' names and types, ``out``, the inputs on disk, and (without
        ``overwrite``) that no point folder holds a run recorded with other settings."""
        points = self.points()
        self.check_out()
        self.check_inputs()
        if not overwrite:
            _check_recorded(points)

    def check_inputs(self) -> None:
        """Check what the file system must provide before training starts: the data folder of
        every dataset that needs one, and every path-valued attack option (a ``*_run`` option must
        be a finished run). Raises :class:`ConfigError` naming the point and the path."""
        from veil.data.datasets import DATASETS

        checked: set[tuple[str, str]] = set()
        for name, config, merged, _ in self._points():
            info = DATASETS.get(config.dataset)
            if info.needs_root and not config.download:
                if not config.data_root:
                    raise ConfigError(f"point {name}: dataset {config.dataset!r} needs a data folder (data_root)")
                if ("root", config.data_root) not in checked:
                    if not Path(config.data_root).is_dir():
                        raise ConfigError(f"point {name}: data folder {config.data_root} does not exist")
                    checked.add(("root", config.data_root))
            for key, value in config.attack_options.items():
                if not isinstance(value, str) or not key.endswith(PATH_OPTION_SUFFIXES) or ("opt", value) in checked:
                    continue
                path = Path(value)
                if key.endswith("_run"):
                    if not rec.RunRecord(path).finished:
                        raise ConfigError(
                            f"point {name}: attack option {key} = {value} is not a finished run (no {rec.METRICS}); "
                            "train it first (veil run ... --out that folder)"
                        )
                elif not path.exists():
                    raise ConfigError(f"point {name}: attack option {key} = {value} does not exist")
                checked.add(("opt", value))
        card = self.defenses.get(CARD)
        if card is not None and not rec.RunRecord(card["reference"]).finished:
            raise ConfigError(f"defenses: card: the reference {card['reference']} is not a finished run (no {rec.METRICS}); "
                              "train the clean run first")

    def to_dict(self) -> dict[str, Any]:
        """The resolved sweep (written to ``OUT/sweep.json``)."""
        return {
            "name": self.name,
            "description": self.description,
            "source": str(self.source) if self.source else None,
            "out": str(self.out),
            "base": self.base,
            "grid": self.grid,
            "runs": self.runs,
            "seeds": list(self.seeds),
            "defenses": self.defenses,
            "table": dataclasses.asdict(self.table),
            "points": [name for name, _ in self.points()],
        }


def point_name(overrides: Mapping[str, Any]) -> str:
    """A readable, filesystem-safe, deterministic folder name for one point's override values.

    Keys are sorted; attack options appear by their own name unless that is also a RunConfig field;
    paths by their last component.

    >>> point_name({"poison_count": 50, "model": "resnet18"})
    'model=resnet18,poison_count=50'
    >>> point_name({"attack_options.patch_size": 4, "lr": 0.001})
    'lr=0.001,patch_size=4'
    >>> point_name({"model": "vgg16", "attack_options.reference_run": "../../runs/clean-vgg16"})
    'model=vgg16,reference_run=clean-vgg16'
    >>> point_name({})
    'base'
    """
    if not overrides:
        return "base"
    labelled = []
    for key in overrides:
        short = key
        if key.startswith(ATTACK_OPTIONS + "."):
            opt = key[len(ATTACK_OPTIONS) + 1 :]
            short = opt if opt not in _RUN_FIELDS and opt != NAME_KEY else key
        labelled.append((short, key))
    parts = []
    for short, key in sorted(labelled):
        value = overrides[key]
        if _is_path_key(key) and isinstance(value, str) and value.strip("/\\"):
            value = Path(value.rstrip("/\\")).name or value  # a path by its last component
        parts.append(f"{_SAFE.sub('_', short)}={_slug(value)}")
    name = ",".join(parts)
    if name.startswith("."):
        name = "_" + name[1:]
    if len(name) > _MAX_NAME:
        digest = hashlib.sha1(name.encode()).hexdigest()[:10]
        name = f"{name[: _MAX_NAME - 11]}-{digest}"
    return name


def _slug(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (int, str)):
        text = str(value)
    else:
        text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    text = text.replace("/", "_").replace("\\", "_").replace(",", "_").replace("=", "-")
    return _SAFE.sub("_", text) or "empty"


# --------------------------------------------------------------------------- parsing


def load_sweep(path: str | Path) -> Sweep:
    """Read and validate a sweep YAML file (see the module docstring).

    Raises:
        ConfigError: the file is missing, not YAML, or describes an invalid sweep; the message
            names the offending key or value. No training happens here.
    """
    from veil.safeyaml import load_yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"sweep file {path} does not exist") from None
    except UnicodeDecodeError:
        raise ConfigError(f"sweep file {path} is not UTF-8 text") from None
    except OSError as exc:
        raise ConfigError(f"cannot read sweep file {path} ({exc.strerror or exc})") from None
    spec = load_yaml(text, f"sweep file {path}")
    return parse_sweep(spec, base_dir=path.resolve().parent, source=path.resolve(), default_name=path.stem)


def parse_sweep(
    spec: Any,
    base_dir: str | Path | None = None,
    source: Path | None = None,
    default_name: str = "sweep",
    recipe: str | None = None,
) -> Sweep:
    """Validate a sweep given as a mapping (the parsed YAML); relative paths resolve against
    ``base_dir`` (default: the current folder)."""
    where = f"sweep file {source}" if source else "sweep"
    base_dir = Path(base_dir) if base_dir is not None else Path.cwd()
    if not isinstance(spec, dict):
        raise ConfigError(f"{where} must be a mapping with keys {', '.join(TOP_LEVEL_KEYS)}; got {type(spec).__name__}")
    unknown = [k for k in spec if k not in TOP_LEVEL_KEYS]
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; valid keys: {', '.join(TOP_LEVEL_KEYS)}")

    name = spec.get("name", default_name)
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"{where}: 'name' must be a non-empty string")
    description = spec.get("description")
    if description is not None and not isinstance(description, str):
        raise ConfigError(f"{where}: 'description' must be a string")
    if "out" not in spec or not isinstance(spec["out"], str) or not spec["out"].strip():
        raise ConfigError(f"{where}: 'out' (the folder that holds one run folder per point) must be a path")
    out = _resolve_path(spec["out"], base_dir)

    raw_base = spec.get("base") or {}
    if not isinstance(raw_base, dict):
        raise ConfigError(f"{where}: 'base' must be a mapping of RunConfig fields")
    base_raw = _flatten(raw_base, "base")
    base = _resolve_paths(base_raw, base_dir)

    raw_grid = spec.get("grid") or {}
    if not isinstance(raw_grid, dict):
        raise ConfigError(f"{where}: 'grid' must be a mapping from a RunConfig field to a list of values")
    grid_raw: dict[str, list[Any]] = {}
    for key, values in raw_grid.items():
        flat_key = _check_key(str(key), "grid")
        if flat_key == ATTACK_OPTIONS:
            raise ConfigError("grid: vary attack options one at a time with dotted keys, e.g. 'attack_options.patch_size: [3, 4]'")
        if not isinstance(values, list):
            raise ConfigError(f"grid: {key!r} must be a list of values, got {values!r}")
        if not values:
            raise ConfigError(f"grid: {key!r} has an empty list of values")
        for v in values:
            _check_value(flat_key, v, f"grid {key}")
        dup = _first_duplicate(values)
        if dup is not None:
            raise ConfigError(f"grid: {key!r} lists the value {dup!r} twice")
        grid_raw[flat_key] = list(values)
    grid = {k: [_resolve_paths({k: v}, base_dir)[k] for v in vs] for k, vs in grid_raw.items()}

    raw_runs = spec.get("runs")
    runs_raw: list[dict[str, Any]] = []
    if raw_runs is not None:
        if not isinstance(raw_runs, list) or not raw_runs:
            raise ConfigError(f"{where}: 'runs' must be a non-empty list of mappings of RunConfig fields")
        for i, run in enumerate(raw_runs):
            if not isinstance(run, dict):
                raise ConfigError(f"runs[{i}] must be a mapping of RunConfig fields, got {run!r}")
            flat = _flatten(run, f"runs[{i}]")
            both = sorted(set(flat) & set(grid_raw))
            if both:
                raise ConfigError(f"runs[{i}] sets {both[0]!r}, which the grid also varies; set it in one place")
            runs_raw.append(flat)
    runs = [_resolve_paths(r, base_dir) for r in runs_raw]

    seeds = _parse_seeds(spec.get("seeds"), grid_raw, runs_raw, base_raw)
    defenses = _parse_defenses(spec.get("defenses"), base_dir)
    table = _parse_table(spec.get("table"))
    if seeds and "seed" in (table.rows, *table.columns):
        raise ConfigError("table: 'seed' cannot be a row or column key when 'seeds' repeats every point "
                          "(the table shows the mean over the seeds)")

    sweep = Sweep(
        name=name.strip(),
        out=out,
        base=base,
        grid=grid,
        runs=runs,
        table=table,
        source=source,
        description=description,
        recipe=recipe,
        seeds=seeds,
        defenses=defenses,
        _raw_grid=grid_raw,
        _raw_runs=runs_raw,
    )
    points = sweep._points()  # builds and validates every RunConfig; names must be unique
    _check_table_cells(sweep, points)
    return sweep


def _parse_seeds(raw: Any, grid: dict[str, Any], runs: list[dict[str, Any]], base: dict[str, Any]) -> tuple[int, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list) or not raw or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in raw):
        raise ConfigError(f"'seeds' must be a non-empty list of non-negative integers, got {raw!r}")
    dup = _first_duplicate(raw)
    if dup is not None:
        raise ConfigError(f"'seeds' lists the seed {dup} twice")
    if "seed" in grid or any("seed" in r for r in runs) or "seed" in base:
        raise ConfigError("'seeds' repeats every point with each seed; do not also set 'seed' in base, runs or grid")
    return tuple(raw)


def _parse_defenses(raw: Any, base_dir: Path) -> dict[str, dict[str, Any]]:
    """``defenses:`` as a list of names or a mapping name -> options; each name and option is
    checked by building the defense."""
    from veil.defenses import create_defense

    if raw is None:
        return {}
    if isinstance(raw, list):
        if not all(isinstance(d, str) for d in raw):
            raise ConfigError(f"'defenses' must list defense names (or map names to options), got {raw!r}")
        dup = _first_duplicate(raw)
        if dup is not None:
            raise ConfigError(f"'defenses' lists {dup!r} twice")
        raw = {d: {} for d in raw}
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"'defenses' must be a non-empty list of defense names or a mapping name -> options, got {raw!r}")
    out: dict[str, dict[str, Any]] = {}
    for name, options in raw.items():
        options = options or {}
        if not isinstance(name, str) or not isinstance(options, dict):
            raise ConfigError(f"defenses: {name!r} must map to a mapping of its options, got {options!r}")
        if name == CARD:
            out[CARD] = _parse_card(options, base_dir)
            continue
        options = {str(k): _resolve_path(v, base_dir) if isinstance(v, str) and str(k).endswith(PATH_OPTION_SUFFIXES) else v
                   for k, v in options.items()}
        options = {k: str(v) if isinstance(v, Path) else v for k, v in options.items()}
        try:
            create_defense(name, progress=False, **options)
        except ConfigError as exc:
            raise ConfigError(f"defenses: {exc}") from None
        out[name] = options
    return out


CARD = "card"
_CARD_KEYS = ("reference", "defenses", "options")


def _parse_card(raw: dict[str, Any], base_dir: Path) -> dict[str, Any]:
    """``defenses: {card: {reference: CLEAN_RUN, defenses: [...], options: {NAME: {...}}}}``."""
    from veil.defenses import create_defense, list_defenses

    unknown = [k for k in raw if k not in _CARD_KEYS]
    if unknown:
        raise ConfigError(f"defenses: card: unknown key {unknown[0]!r}; valid keys: {', '.join(_CARD_KEYS)}")
    if not isinstance(raw.get("reference"), str):
        raise ConfigError("defenses: card needs 'reference': the clean run the card compares with (a path)")
    names = raw.get("defenses")
    if names is not None and (not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names)):
        raise ConfigError(f"defenses: card: 'defenses' must be a non-empty list of defense names, got {names!r}")
    options = raw.get("options") or {}
    if not isinstance(options, dict) or not all(isinstance(v, dict) for v in options.values()):
        raise ConfigError("defenses: card: 'options' must map defense names to mappings of their options")
    for name in list(names or []) + list(options):
        try:
            create_defense(name, progress=False, **options.get(name, {}))
        except ConfigError as exc:
            raise ConfigError(f"defenses: card: {exc}") from None
    return {"reference": str(_resolve_path(raw["reference"], base_dir)),
            "defenses": list(names) if names else list_defenses(), "options": options, "all": names is None}


def defense_items(sweep: Sweep) -> list[tuple[str, dict[str, Any]]]:
    """The sweep's defenses as ``(name, options)``, the card's defenses in its place."""
    items: list[tuple[str, dict[str, Any]]] = []
    for name, options in sweep.defenses.items():
        if name == CARD:
            items += [(d, options["options"].get(d, {})) for d in options["defenses"] if d not in sweep.defenses]
        else:
            items.append((name, options))
    return items


def _parse_table(raw: Any) -> TableSpec:
    if raw is None:
        return TableSpec()
    if not isinstance(raw, dict):
        raise ConfigError(f"'table' must be a mapping with keys {', '.join(TABLE_KEYS)}")
    unknown = [k for k in raw if k not in TABLE_KEYS]
    if unknown:
        raise ConfigError(f"table: unknown key {unknown[0]!r}; valid keys: {', '.join(TABLE_KEYS)}")
    rows = raw.get("rows", NAME_KEY)
    if not isinstance(rows, str):
        raise ConfigError(f"table: 'rows' must be one key, got {rows!r}")
    columns = raw.get("columns", [])
    if isinstance(columns, str):
        columns = [columns]
    if not isinstance(columns, list) or not all(isinstance(c, str) for c in columns):
        raise ConfigError(f"table: 'columns' must be a list of keys, got {columns!r}")
    for key in [rows, *columns]:
        if key != NAME_KEY:
            _check_key(key, "table")
    if rows in columns:
        raise ConfigError(f"table: {rows!r} cannot be both the rows and a column key")
    if len(set(columns)) != len(columns):
        raise ConfigError(f"table: 'columns' lists a key twice: {columns}")
    metrics = raw.get("metrics", list(DEFAULT_METRICS))
    if isinstance(metrics, str):
        metrics = [metrics]
    if not isinstance(metrics, list) or not metrics or not all(isinstance(m, str) for m in metrics):
        raise ConfigError(f"table: 'metrics' must be a non-empty list of metric names; known: {', '.join(METRICS)}")
    for m in metrics:
        if m not in METRICS and not (m.startswith(ATTACK_METRICS_PREFIX) and len(m) > len(ATTACK_METRICS_PREFIX)):
            raise ConfigError(
                f"table: unknown metric {m!r}; known: {', '.join(METRICS)}, attack_metrics.NAME"
            )
    title = raw.get("title")
    if title is not None and not isinstance(title, str):
        raise ConfigError("table: 'title' must be a string")
    return TableSpec(rows=rows, columns=tuple(columns), metrics=tuple(metrics), title=title)


def _check_table_cells(sweep: Sweep, points: list[tuple[str, RunConfig, dict[str, Any], str]]) -> None:
    """Every point (every group of seeds) must land in its own table cell."""
    values = sweep.point_values()
    spec = sweep.table
    cells: dict[Any, str] = {}
    for name, _, _, group in points:
        v = values[name]
        key = (_hashable(v[spec.rows]), tuple(_hashable(v[c]) for c in spec.columns))
        if key in cells and values[cells[key]][NAME_KEY] != group:
            other = cells[key]
            differ = sorted(k for k in values[name] if k != NAME_KEY and values[name][k] != values[other][k])
            raise ConfigError(
                f"table: points {other} and {name} fall into the same cell (rows {spec.rows!r}, columns "
                f"{list(spec.columns)}); add {', '.join(repr(d) for d in differ) or 'a key that tells them apart'} "
                "to table.columns"
            )
        cells[key] = name


def _hashable(value: Any) -> Any:
    return json.dumps(value, sort_keys=True, default=str)


def _first_duplicate(values: list[Any]) -> Any:
    seen = set()
    for v in values:
        h = _hashable(v)
        if h in seen:
            return v
        seen.add(h)
    return None


def _check_key(key: str, where: str) -> str:
    """A flat key: a RunConfig field or ``attack_options.NAME``."""
    if key.startswith(ATTACK_OPTIONS + "."):
        opt = key[len(ATTACK_OPTIONS) + 1 :]
        if not opt.isidentifier():
            raise ConfigError(f"{where}: {key!r} is not a valid attack option key")
        return key
    if key in RESERVED_FIELDS:
        raise ConfigError(f"{where}: {key!r} cannot be set in a sweep file; {RESERVED_FIELDS[key]}")
    if key not in _RUN_FIELDS:
        valid = [k for k in _RUN_FIELDS if k not in RESERVED_FIELDS] + [f"{ATTACK_OPTIONS}.NAME"]
        hint = ""
        if "-" in key and key.replace("-", "_") in _RUN_FIELDS:
            hint = f" (did you mean {key.replace('-', '_')!r}?)"
        raise ConfigError(f"{where}: unknown RunConfig field {key!r}{hint}; valid fields: {', '.join(valid)}")
    return key


def _flatten(mapping: dict[Any, Any], where: str) -> dict[str, Any]:
    """Check keys and value types; ``attack_options: {k: v}`` becomes ``attack_options.k: v``."""
    flat: dict[str, Any] = {}
    for raw_key, value in mapping.items():
        key = _check_key(str(raw_key), where)
        if key == ATTACK_OPTIONS:
            if value is None:
                continue
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: 'attack_options' must be a mapping of option names to values, got {value!r}")
            for opt, v in value.items():
                flat_key = _check_key(f"{ATTACK_OPTIONS}.{opt}", where)
                if flat_key in flat:
                    raise ConfigError(f"{where}: attack option {opt!r} is set twice")
                flat[flat_key] = v
            continue
        if key in flat:
            raise ConfigError(f"{where}: {key!r} is set twice")
        flat[key] = _check_value(key, value, where)
    return flat


def _check_value(key: str, value: Any, where: str) -> Any:
    """Check ``value`` against the RunConfig field's type (attack options are checked later by the
    attack's own Config)."""
    if key.startswith(ATTACK_OPTIONS + "."):
        return value
    hint = typing.get_type_hints(RunConfig)[key]
    if not value_matches(value, hint):
        raise ConfigError(f"{where}: {key} = {value!r} is not a valid {type_name(hint, _YAML_TYPES)}")
    return value


#: how sweep and recipe errors name the basic types (as YAML writes them)
_YAML_TYPES = {int: "integer", float: "number", str: "string", bool: "boolean (true/false)", type(None): "null"}


def _resolve_path(value: str, base_dir: Path) -> Path:
    p = Path(os.path.expanduser(os.path.expandvars(value)))
    return Path(os.path.normpath(p if p.is_absolute() else base_dir / p))


def _is_path_key(key: str) -> bool:
    if key in PATH_FIELDS:
        return True
    return key.startswith(ATTACK_OPTIONS + ".") and key.endswith(PATH_OPTION_SUFFIXES)


def _resolve_paths(flat: dict[str, Any], base_dir: Path) -> dict[str, Any]:
    return {
        k: (str(_resolve_path(v, base_dir)) if _is_path_key(k) and isinstance(v, str) and v else v)
        for k, v in flat.items()
    }


def _split(flat: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Flat settings -> (RunConfig fields, attack options)."""
    fields: dict[str, Any] = {}
    options: dict[str, Any] = {}
    for k, v in flat.items():
        if k.startswith(ATTACK_OPTIONS + "."):
            options[k[len(ATTACK_OPTIONS) + 1 :]] = v
        else:
            fields[k] = v
    return fields, options


def _build_config(
    flat: dict[str, Any],
    out: str,
    where: str,
    recipe_flat: dict[str, Any] | None = None,
    recipe_name: str | None = None,
) -> RunConfig:
    """A validated RunConfig from flat settings (the user's, over a recipe's ``recipe_flat`` and
    the attack's paper settings, see :func:`veil.runs.resolve_config`); attack option names are
    checked against the attack's Config without building the attack, which may need data."""
    fields, options = _split(flat)
    r_fields, r_options = _split(recipe_flat or {})
    missing = [f for f in _REQUIRED_FIELDS if f not in fields and f not in r_fields and f != "out"]
    if missing:
        raise ConfigError(f"{where}: {', '.join(repr(m) for m in missing)} not set (put it in 'base', 'runs' or 'grid')")
    given = {**fields, "out": out, **({ATTACK_OPTIONS: options} if options else {})}
    recipe = {**r_fields, ATTACK_OPTIONS: r_options} if recipe_flat is not None else None
    try:
        config = resolve_config(given, recipe, recipe_name)
        config.validate()
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return config


# --------------------------------------------------------------------------- the results table


def _metric(metrics: Mapping[str, Any] | None, name: str) -> Any:
    value: Any = metrics
    for part in name.split("."):
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value


def format_metric(name: str, value: Any) -> str:
    """One table cell: accuracies and rates as percentages with 2 decimals (``0.9709`` ->
    ``"97.09"``), missing or NaN as "–"."""
    if isinstance(value, bool) and metric_spec(name)[1] == "yesno":
        return "yes" if value else "no"
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return DASH if value is None else str(value)
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return DASH
    kind = metric_spec(name)[1]
    if kind == "percent":
        return f"{100.0 * value:.2f}"
    if kind == "int":
        return str(int(value)) if float(value).is_integer() else f"{value:g}"
    return format(value, kind)


def _label(value: Any) -> str:
    if value is None:
        return DASH
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return str(value)


def _json_number(value: Any) -> Any:
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    return value


def _numbers(values: list[Any]) -> list[float]:
    return [float(v) for v in values
            if isinstance(v, (int, float)) and not (isinstance(v, float) and (math.isnan(v) or math.isinf(v)))]


def aggregate(values: list[Any]) -> dict[str, Any]:
    """``{"mean", "std", "n"}`` of the finite numbers among ``values`` (booleans count as 0 / 1; the
    sample standard deviation, ``None`` below two values)."""
    xs = _numbers(values)
    n = len(xs)
    if not n:
        return {"mean": None, "std": None, "n": 0}
    mean = sum(xs) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else None
    return {"mean": mean, "std": std, "n": n}


def format_aggregate(name: str, agg: Mapping[str, Any]) -> str:
    """A seeds cell: ``mean ± std (n=N)`` in the metric's format (``97.09 ± 0.12 (n=3)``); a yes/no
    figure as the share of seeds where it was yes (``2/3 yes``)."""
    n = agg["n"]
    if not n:
        return DASH
    kind = metric_spec(name)[1]
    if kind == "yesno":
        return f"{round(agg['mean'] * n)}/{n} yes"
    text = format_metric(name, agg["mean"])
    if agg["std"] is not None:
        std = agg["std"]
        if kind == "percent":
            spread = f"{100.0 * std:.2f}"
        elif kind == "int":
            spread = f"{std:.2g}"
        else:
            spread = format(std, kind)
        text += f" \u00b1 {spread}"
    return text + f" (n={n})"


def sweep_table(sweep: Sweep, metrics_by_point: Mapping[str, Mapping[str, Any] | None]) -> dict[str, Any]:
    """The sweep's results laid out like the papers' tables (e.g. Table 3 of the frequency-attack
    paper: rows = poison counts, a column group per architecture with CDA and ASR).

    Args:
        sweep: the sweep.
        metrics_by_point: point name -> its ``metrics.json`` (with its defenses' figures under
            ``defenses``, see :func:`veil.sweep_exec.point_metrics`); missing or ``None``: not
            finished, its cells show "\u2013".

    Returns:
        ``{"title", "columns", "rows", "header", "left", "note", "points"}``: ``columns`` are flat,
        unique labels (``"<group> CDA %"``); ``rows`` hold formatted strings (percentages with 2
        decimals for accuracy and ASR; with ``seeds``, ``mean ± std (n=N)`` over the seeds that
        finished); ``header`` holds two header rows of ``[label, span]`` for the grouped layout;
        ``points`` lists every point with its table keys, seed and raw metric values (NaN as
        ``null``), and with ``seeds`` ``groups`` lists each group's mean, std and n.
        :func:`veil.report.html.write_report` draws it with ``tables=[...]``.
    """
    spec = sweep.table
    metrics = list(spec.metrics) + [m for m in defense_metrics(sweep, metrics_by_point) if m not in spec.metrics]
    values = sweep.point_values()
    names = list(values)
    row_values: list[Any] = []
    group_values: list[tuple[Any, ...]] = []
    for name in names:
        v = values[name]
        if all(_hashable(v[spec.rows]) != _hashable(r) for r in row_values):
            row_values.append(v[spec.rows])
        g = tuple(v[c] for c in spec.columns)
        if all(_hashable(g) != _hashable(x) for x in group_values):
            group_values.append(g)
    cell: dict[tuple[str, str], list[str]] = {}
    for name in names:
        v = values[name]
        cell.setdefault((_hashable(v[spec.rows]), _hashable(tuple(v[c] for c in spec.columns))), []).append(name)

    def group_label(g: tuple[Any, ...]) -> str:
        if len(spec.columns) == 1:
            return _label(g[0])
        return ", ".join(f"{k}={_label(x)}" for k, x in zip(spec.columns, g))

    metric_labels = [metric_spec(m)[0] for m in metrics]
    row_label = spec.rows
    columns = [row_label]
    header: list[list[list[Any]]] = []
    if spec.columns:
        header.append([["", 1]] + [[group_label(g), len(metrics)] for g in group_values])
        header.append([[row_label, 1]] + [[m, 1] for _ in group_values for m in metric_labels])
        columns += [f"{group_label(g)} {m}" for g in group_values for m in metric_labels]
    else:
        columns += metric_labels
    rows = []
    groups = []
    for r in row_values:
        row = [_label(r)]
        for g in group_values:
            members = cell.get((_hashable(r), _hashable(g)), [])
            found = [metrics_by_point.get(n) for n in members]
            if not sweep.seeds:
                m = found[0] if found else None
                row += [format_metric(k, _metric(m, k)) for k in metrics]
                continue
            aggs = {k: aggregate([_metric(m, k) for m in found if m]) for k in metrics}
            row += [format_aggregate(k, aggs[k]) for k in metrics]
            if members:
                groups.append({"name": values[members[0]][NAME_KEY], "points": members,
                               "finished": sum(1 for m in found if m), **{
                                   stat: {k: _json_number(aggs[k][stat]) for k in metrics} for stat in ("mean", "std", "n")}})
        rows.append(row)
    finished = sum(1 for n in names if metrics_by_point.get(n))
    points = []
    for name in names:
        m = metrics_by_point.get(name)
        entry = {
            "name": name,
            "finished": bool(m),
            "keys": {k: values[name][k] for k in [spec.rows, *spec.columns] if k != NAME_KEY},
            "metrics": {k: _json_number(_metric(m, k)) for k in metrics} if m else None,
        }
        if sweep.seeds:
            entry["group"] = values[name][NAME_KEY]
            entry["seed"] = values[name]["seed"]
        points.append(entry)
    notes = [f"{finished} of {len(names)} points finished"]
    if sweep.seeds:
        notes.append(f"each cell: mean \u00b1 sample standard deviation over the seeds {list(sweep.seeds)} that "
                     "finished (n)")
    table = {
        "title": spec.title or sweep.name,
        "columns": columns,
        "rows": rows,
        "header": header,
        "left": 1,
        "note": "; ".join(
            notes
            + [_LEGEND[m] for m in metrics if m in _LEGEND]
            + (["columns marked % in percent"] if any(metric_spec(m)[1] == "percent" for m in metrics) else [])
            + [f"run folders under {sweep.out}"]
        ),
        "points": points,
    }
    if sweep.seeds:
        table["groups"] = groups
    return table


def table_markdown(table: Mapping[str, Any]) -> str:
    """A :func:`sweep_table` as a Markdown table (column groups folded into the column labels)."""

    def esc(text: Any) -> str:
        return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")

    cols = list(table["columns"])
    lines = [f"**{esc(table.get('title', ''))}**", ""] if table.get("title") else []
    lines.append("| " + " | ".join(esc(c) for c in cols) + " |")
    lines.append("|" + "|".join([":---"] + ["---:"] * (len(cols) - 1)) + "|")
    for row in table["rows"]:
        lines.append("| " + " | ".join(esc(c) for c in row) + " |")
    if table.get("note"):
        lines += ["", esc(table["note"])]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- running


@dataclass
class PointResult:
    """What happened to one point.

    Attributes:
        name: the point's folder name.
        config: its RunConfig.
        status: ``"skipped"`` (already finished), ``"trained"``, ``"failed"``, ``"claimed"``
            (another worker holds a live claim on it), or ``"not run"`` (the sweep stopped before it).
        metrics: its metrics (``None`` unless skipped or trained).
        error: the failure message.
        seconds: wall time spent on it.
    """

    name: str
    config: RunConfig
    status: str
    metrics: dict[str, Any] | None = None
    error: str | None = None
    seconds: float = 0.0


@dataclass
class SweepResult:
    """The outcome of :func:`run_sweep`.

    Attributes:
        sweep: the sweep.
        points: one :class:`PointResult` per point, in order.
        table: the :func:`sweep_table` over the finished points.
        files: ``{"json": ..., "markdown": ..., "report": ...}`` paths written (``report`` missing
            when no point finished).
    """

    sweep: Sweep
    points: list[PointResult]
    table: dict[str, Any]
    files: dict[str, Path]

    @property
    def failed(self) -> list[PointResult]:
        return [p for p in self.points if p.status == "failed"]

    @property
    def ok(self) -> bool:
        return all(p.status in ("skipped", "trained") for p in self.points)

    def summary(self) -> str:
        counts = {s: sum(1 for p in self.points if p.status == s)
                  for s in ("trained", "skipped", "failed", "claimed", "not run")}
        text = f"sweep {self.sweep.name}: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n)
        for p in self.failed:
            text += f"\n  failed: {p.name}: {p.error}"
        return text


def recorded_differences(config: RunConfig) -> list[str]:
    """The settings in which the run recorded in ``config.out`` (finished or interrupted) differs
    from ``config`` (ignoring what may change between machines: paths, device, ...); ``[]`` if
    there is no recorded run or it matches. A setting missing from an older record counts as equal
    when ``config`` has the field's default."""
    from veil.experiment import _RESUME_IGNORED, json_roundtrip

    record = rec.RunRecord(config.out)
    if not record.path(rec.CONFIG).is_file():
        return []
    try:
        old = record.config()
    except VeilError:
        return ["config.json (unreadable)"]
    if not isinstance(old, dict):
        return ["config.json (not an object)"]
    new = json_roundtrip(config.to_dict())
    defaults = json_roundtrip(_defaults())
    diff = []
    for key, value in new.items():
        if key in _RESUME_IGNORED:
            continue
        if key in old:
            if old[key] != value:
                diff.append(key)
        elif key not in defaults or defaults[key] != value:
            diff.append(key)
    return diff


def _defaults() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(RunConfig):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            out[f.name] = f.default_factory()  # type: ignore[misc]
    return out


def point_status(config: RunConfig) -> str:
    """``"finished"``, ``"interrupted"`` (a checkpoint to resume from), ``"new"``, or ``"changed"``
    (the folder holds a run recorded with other settings: the sweep file was edited since)."""
    record = rec.RunRecord(config.out)
    if (record.finished or record.path(rec.CHECKPOINT).is_file()) and recorded_differences(config):
        return "changed"
    if record.finished:
        return "finished"
    if record.path(rec.CHECKPOINT).is_file():
        return "interrupted"
    return "new"


def _check_recorded(points: list[tuple[str, RunConfig]]) -> None:
    changed = [(name, recorded_differences(config)) for name, config in points if point_status(config) == "changed"]
    if changed:
        detail = "; ".join(f"{name} ({', '.join(diff)})" for name, diff in changed)
        raise ConfigError(
            f"{len(changed)} point folder(s) hold runs recorded with other settings than the sweep file now gives: "
            f"{detail}; pass --overwrite to retrain them, or change 'out'"
        )


def write_results(sweep: Sweep, metrics_by_point: Mapping[str, Mapping[str, Any] | None]) -> tuple[dict[str, Any], dict[str, Path]]:
    """Write ``OUT/sweep_table.json``, ``OUT/sweep_table.md`` and (when a point finished)
    ``OUT/report.html``; returns the table and the paths written."""
    from veil.report.html import write_report

    table = sweep_table(sweep, metrics_by_point)
    files = {"json": sweep.out / TABLE_JSON, "markdown": sweep.out / TABLE_MD}
    rec.atomic_write_json(files["json"], table)
    rec.atomic_write_bytes(files["markdown"], table_markdown(table).encode("utf-8"))
    finished = [str(sweep.out / name) for name, _ in sweep.points() if metrics_by_point.get(name)]
    if finished:
        files["report"] = write_report(finished, sweep.out / REPORT_HTML, title=f"veil sweep: {sweep.name}", tables=[table])
    return table, files
