"""Named recipes: a complete run or sweep as data, with the scale it is for and what it measured.

A recipe is a YAML file in this folder, ``ATTACK/DATASET-SCALE[-VARIANT].yaml``, named after its
path (``sig/gtsrb-cpu``). It holds the settings that make an attack work at a given scale, which
are not the attack's defaults (those are its paper's), with the figures it measured::

    name: sig/gtsrb-cpu                   # must match the file's path
    scale: cpu                            # cpu or gpu
    stands_for: what it reproduces        # a paper table or figure, or the budget it was made for
    description: free text
    data: what --data-root must point to  # e.g. "the folder holding gtsrb/"
    run: {attack: sig, dataset: gtsrb, ...}   # RunConfig fields (not out, data_root); or
    sweep: {base: ..., grid: ..., table: ...} # a sweep file's keys (not out; base without data_root)
    measured:                             # what this recipe gave, on which build and machine
      - {metric: attack_success_rate, value: 0.926, date: 2026-12-02, veil_version: 0.1.0,
         commit: 1cf3af3, machine: "2 CPU cores, 2 torch threads"}
    notes: free text                      # optional

``veil recipes`` lists them; ``veil run --recipe NAME --data-root DIR --out RUN [any veil run flag
to override]`` and ``veil sweep --recipe NAME --data-root DIR --out DIR`` run them. Recipes are
read with ``yaml.safe_load`` and validated like sweep files (unknown keys, wrong types and unknown
attack options are errors naming the key).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from veil.errors import ConfigError
from veil.runs import RunConfig

__all__ = ["Measured", "Recipe", "RECIPES_DIR", "list_recipes", "load_recipe"]

RECIPES_DIR = Path(__file__).resolve().parent
TOP_LEVEL_KEYS = ("name", "scale", "stands_for", "description", "data", "run", "sweep", "measured", "notes")
MEASURED_KEYS = ("metric", "value", "date", "veil_version", "commit", "machine", "run", "note")
_MEASURED_REQUIRED = ("metric", "value", "date", "veil_version", "machine")
SCALES = ("cpu", "gpu")


@dataclass(frozen=True)
class Measured:
    """One figure a recipe gave: ``metric`` (a ``metrics.json`` key, dotted for nested ones), which of
    a sweep recipe's runs gave it (``run``), its value, and the build and machine it was measured on."""

    metric: str
    value: float
    date: str
    veil_version: str
    machine: str
    commit: str | None = None
    run: str | None = None
    note: str | None = None

    def line(self) -> str:
        where = f" ({self.run})" if self.run else ""
        build = f"veil {self.veil_version}" + (f" at {self.commit}" if self.commit else "")
        note = f"; {self.note}" if self.note else ""
        return f"{self.metric}{where} = {self.value:.4f}  [{self.date}, {build}, {self.machine}{note}]"


@dataclass(frozen=True)
class Recipe:
    """A parsed, validated recipe (see the module docstring)."""

    name: str
    scale: str
    stands_for: str
    description: str
    data: str | None
    run: dict[str, Any] | None
    sweep: dict[str, Any] | None
    measured: tuple[Measured, ...]
    notes: str | None
    path: Path

    @property
    def kind(self) -> str:
        return "run" if self.run is not None else "sweep"

    @property
    def attack(self) -> str:
        return self.name.split("/", 1)[0]

    def run_config(self, overrides: dict[str, Any], out: str) -> RunConfig:
        """The recipe's run with ``overrides`` (RunConfig fields as ``veil run`` gives them;
        ``attack_options`` merged option by option) on top, in the run folder ``out``."""
        from veil.sweep import ATTACK_OPTIONS, _build_config, _check_value, _flatten

        if self.run is None:
            raise ConfigError(f"recipe {self.name} is a sweep; run it with veil sweep --recipe {self.name}")
        where = f"recipe {self.name}"
        user: dict[str, Any] = {}
        for key, value in overrides.items():
            if key == ATTACK_OPTIONS:
                user.update({f"{ATTACK_OPTIONS}.{k}": v for k, v in dict(value).items()})
            elif key not in ("out", "recipe", "sources"):
                user[key] = _check_value(key, value, where)
        return _build_config(user, out, where, recipe_flat=_flatten(self.run, where), recipe_name=self.name)

    def sweep_spec(self, data_root: str | None, out: str) -> dict[str, Any]:
        """The recipe's sweep as a sweep-file mapping, with ``out`` and the data folder set."""
        if self.sweep is None:
            raise ConfigError(f"recipe {self.name} is a single run; run it with veil run --recipe {self.name}")
        spec = dict(self.sweep)
        spec["name"] = spec.get("name", self.name.replace("/", "-"))
        spec["out"] = out
        base = dict(spec.get("base") or {})
        if data_root is not None:
            base["data_root"] = data_root
        spec["base"] = base
        return spec


def list_recipes(attack: str | None = None) -> list[str]:
    """Names of the bundled recipes, sorted; ``attack`` keeps that attack's."""
    names = sorted(str(p.relative_to(RECIPES_DIR).with_suffix("")).replace("\\", "/") for p in RECIPES_DIR.glob("*/*.yaml"))
    return [n for n in names if attack is None or n.split("/", 1)[0] == attack]


def load_recipe(name: str) -> Recipe:
    """Read and validate the recipe ``name`` (``ATTACK/DATASET-SCALE[-VARIANT]``).

    Raises:
        ConfigError: no such recipe (the message lists the known ones), or it is invalid.
    """
    from veil.safeyaml import load_yaml

    path = RECIPES_DIR / f"{name}.yaml"
    if "/" not in name or ".." in name or not path.is_file():
        raise ConfigError(f"unknown recipe {name!r}; known recipes: {', '.join(list_recipes()) or 'none'}")
    spec = load_yaml(path.read_text(encoding="utf-8"), f"recipe {name} ({path})")
    return parse_recipe(spec, name, path)


def _text(spec: dict[str, Any], key: str, where: str, required: bool = True) -> str | None:
    value = spec.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}: {key!r} must be a non-empty string")
    return value.strip()


def _check_keys(spec: Any, keys: tuple[str, ...], where: str) -> None:
    if not isinstance(spec, dict):
        raise ConfigError(f"{where} must be a mapping with keys {', '.join(keys)}")
    unknown = [k for k in spec if k not in keys]
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; valid keys: {', '.join(keys)}")


def parse_recipe(spec: Any, name: str, path: Path) -> Recipe:
    """Validate a parsed recipe mapping (see the module docstring)."""
    from veil.sweep import _flatten, parse_sweep

    where = f"recipe {name}"
    _check_keys(spec, TOP_LEVEL_KEYS, where)
    if spec.get("name") != name:
        raise ConfigError(f"{where}: 'name' is {spec.get('name')!r}; it must be the file's path, {name!r}")
    scale = spec.get("scale")
    if scale not in SCALES:
        raise ConfigError(f"{where}: 'scale' must be one of {', '.join(SCALES)}, got {scale!r}")
    run, sweep = spec.get("run"), spec.get("sweep")
    if (run is None) == (sweep is None):
        raise ConfigError(f"{where}: give exactly one of 'run' (a single run) and 'sweep'")
    if run is not None:
        if not isinstance(run, dict):
            raise ConfigError(f"{where}: 'run' must be a mapping of RunConfig fields")
        for key in ("data_root", "recipe"):
            if key in run:
                raise ConfigError(f"{where}: 'run' must not set {key!r} (it comes from the command line)")
        flat = _flatten(run, where)
        if flat.get("attack") not in (name.split("/", 1)[0], "none"):  # "none": the attack's clean reference
            raise ConfigError(f"{where}: its run's attack is {flat.get('attack')!r}; the recipe's name says {name.split('/', 1)[0]!r}")
    else:
        if not isinstance(sweep, dict):
            raise ConfigError(f"{where}: 'sweep' must be a mapping with a sweep file's keys")
        if "out" in sweep or "data_root" in (sweep.get("base") or {}):
            raise ConfigError(f"{where}: 'sweep' must not set 'out' or base 'data_root' (they come from the command line)")
        parse_sweep({**sweep, "out": "recipe-check"}, source=None, default_name=name.replace("/", "-"))
    measured = spec.get("measured") or []
    if not isinstance(measured, list):
        raise ConfigError(f"{where}: 'measured' must be a list of figures")
    figures = []
    for i, m in enumerate(measured):
        w = f"{where}, measured[{i}]"
        _check_keys(m, MEASURED_KEYS, w)
        missing = [k for k in _MEASURED_REQUIRED if k not in m]
        if missing:
            raise ConfigError(f"{w}: {', '.join(missing)} missing")
        if not isinstance(m["value"], (int, float)) or isinstance(m["value"], bool):
            raise ConfigError(f"{w}: value {m['value']!r} is not a number")
        date = m["date"]
        if isinstance(date, datetime.date):
            date = date.isoformat()
        figures.append(
            Measured(
                metric=str(m["metric"]), value=float(m["value"]), date=str(date), veil_version=str(m["veil_version"]),
                machine=str(m["machine"]), commit=None if m.get("commit") is None else str(m["commit"]),
                run=m.get("run"), note=m.get("note"),
            )
        )
    return Recipe(
        name=name,
        scale=scale,
        stands_for=_text(spec, "stands_for", where),
        description=_text(spec, "description", where),
        data=_text(spec, "data", where, required=False),
        run=run,
        sweep=sweep,
        measured=tuple(figures),
        notes=_text(spec, "notes", where, required=False),
        path=path,
    )
