"""Property tests (hypothesis): random values across every ``veil run`` option's type range, and
random sweep files. Whatever they are, the command either succeeds (a tiny run) or says
``veil: error: ...`` in one line with exit status 2: never a traceback."""

from __future__ import annotations

import dataclasses
import math
import typing

import pytest
import yaml

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from veil.cli import main  # noqa: E402
from veil.runs import RunConfig  # noqa: E402

#: a tiny run every example starts from (a few seconds when it trains)
BASE = {"attack": "badnets", "dataset": "gtsrb_sample", "model": "preact_resnet18", "width": 4, "image_size": 16,
        "epochs": 1, "batch_size": 64, "train_subset": 86, "test_subset": 43, "stealth_samples": 4, "seed": 0}
#: fields not fuzzed: where the run goes and what it reads from outside
NOT_FUZZED = {"out", "data_root", "cache_dir", "lpips_weights", "download", "init_from", "overwrite", "recipe",
              "sources", "progress", "attack_options"}
#: int fields whose large values mean a long run rather than an error: kept small
BUDGET = {"epochs", "eval_every"}

INTS = st.sampled_from([-(10**12), -1, 0, 1, 2, 3, 7, 10**12])
SMALL_INTS = st.integers(-2, 2)
FLOATS = st.sampled_from([math.nan, math.inf, -math.inf, -1.0, 0.0, 1e-9, 0.05, 0.5, 1.0, 2.0, 1e12])
TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)
CHOICES = {
    "attack": ["badnets", "blend", "sig", "wanet", "fiba", "none", "multinomial", "frequency", "nosuch"],
    "dataset": ["gtsrb_sample", "imagefolder", "cifar10", "nosuch"],
    "model": ["preact_resnet18", "vit_small", "resnet18", "nosuch"],
    "schedule": ["cosine", "anneal", "constant", "step", "linear"],
    "optimizer": ["sgd", "adam", "lbfgs"],
    "mode": ["all2one", "all2all", "both"],
    "device": ["auto", "cpu", "cuda", "tpu"],
    "augment": ["jpeg", "nosuch", "jpeg+jpeg"],
    "eval_images": ["auto", "all", "0", "-3", "5", "x"],
}


def _flag(name: str) -> str:
    return {"base_augment": "--no-base-augment"}.get(name, "--" + name.replace("_", "-"))


def _value_strategy(name: str, hint: typing.Any) -> st.SearchStrategy[str | None]:
    """Command-line text for a field (``None``: a boolean flag)."""
    if name in CHOICES:
        return st.one_of(st.sampled_from(CHOICES[name]), TEXT)
    args = set(typing.get_args(hint)) - {type(None)} or {hint}
    if args == {bool}:
        return st.none()
    if args == {int}:
        return (SMALL_INTS if name in BUDGET else INTS).map(str) | TEXT
    if args == {float}:
        return FLOATS.map(repr) | TEXT
    return TEXT


HINTS = typing.get_type_hints(RunConfig)
FIELDS = [f.name for f in dataclasses.fields(RunConfig) if f.name not in NOT_FUZZED]


@st.composite
def run_args(draw: st.DrawFn) -> list[str]:
    chosen = draw(st.lists(st.sampled_from(FIELDS), min_size=1, max_size=3, unique=True))
    args = {k: str(v) for k, v in BASE.items()}
    flags: list[str] = []
    for name in chosen:
        value = draw(_value_strategy(name, HINTS[name]))
        if value is None:
            flags.append(_flag(name))
            args.pop(name, None)
        else:
            args[name] = value
    out: list[str] = []
    for k, v in args.items():
        out += [_flag(k), v]
    if draw(st.booleans()):
        opt = draw(st.sampled_from(["patch_size", "alpha", "k", "width", "nosuch", "beta", "delta_p"]))
        out += ["--attack-opt", f"{opt}={draw(st.one_of(INTS.map(str), FLOATS.map(repr), TEXT))}"]
    return out + flags


def _check(code: int, err: str) -> None:
    assert "Traceback" not in err, err
    if code != 0:
        lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("veil: error")]
        assert code == 2 and len(lines) == 1, (code, err)


@pytest.mark.slow
@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(args=run_args())
def test_random_run_options_give_a_run_or_one_line_error(args, tmp_path_factory, capsys):
    out = tmp_path_factory.mktemp("fuzz") / "run"
    try:
        code = main(["-q", "run", *args, "--out", str(out)])
    except SystemExit as exc:  # argparse's errors
        code = int(exc.code or 0)
    _, err = capsys.readouterr()
    _check(code, err)


SWEEP_KEYS = ["name", "description", "out", "base", "grid", "runs", "table", "nosuch"]
YAML_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.floats(allow_nan=True) | TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT | st.sampled_from(FIELDS), inner, max_size=3),
    max_leaves=10,
)


@st.composite
def sweep_specs(draw: st.DrawFn) -> object:
    if draw(st.integers(0, 9)) == 0:
        return draw(YAML_VALUES)  # not even a mapping
    spec: dict[str, object] = {"name": "fuzz", "out": "out", "base": dict(BASE)}
    for key in draw(st.lists(st.sampled_from(SWEEP_KEYS), max_size=3, unique=True)):
        if key == "base":
            base = dict(BASE)
            for name in draw(st.lists(st.sampled_from(FIELDS), max_size=2, unique=True)):
                base[name] = draw(YAML_VALUES)
            spec["base"] = base
        elif key == "grid":
            spec["grid"] = {draw(st.sampled_from(FIELDS)): draw(st.lists(YAML_VALUES, max_size=3))}
        else:
            spec[key] = draw(YAML_VALUES)
    return spec


@pytest.mark.slow
@settings(max_examples=80, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(spec=sweep_specs())
def test_random_sweep_files_give_a_plan_or_one_line_error(spec, tmp_path_factory, capsys):
    folder = tmp_path_factory.mktemp("sweep")
    path = folder / "s.yaml"
    path.write_text(yaml.safe_dump(spec, allow_unicode=True))
    try:
        code = main(["-q", "sweep", str(path), "--dry-run"])
    except SystemExit as exc:
        code = int(exc.code or 0)
    _, err = capsys.readouterr()
    _check(code, err)
