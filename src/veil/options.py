"""Options of attacks and defenses: ``NAME=VALUE`` strings as ``veil run --attack-opt`` and ``veil
defend --opt`` give them, and the one check of option names and values every caller uses
(:func:`build_options`); and command-line flags made from a config dataclass's fields, with their
help from its docstring and their defaults from the fields (:func:`add_dataclass_arguments`).
Below every command-line module, so that none of them imports another's."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import re
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from veil.errors import ConfigError

T = TypeVar("T")


def parse_option(text: str, what: str = "option") -> tuple[str, Any]:
    """``NAME=VALUE`` -> ``(name, value)``, the value read as a Python literal when it is one;
    ``true`` and ``false`` (any case, as YAML and most shells' users write them) are booleans, and
    ``inf``, ``-inf`` and YAML's ``.inf`` floats (e.g. ``clip_ratio=inf``)."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"{what} {text!r} must look like NAME=VALUE")
    key, value = text.split("=", 1)
    name, word = key.strip().replace("-", "_"), value.strip().lower()
    if word in ("true", "false"):
        return name, word == "true"
    sign, bare = (word[0], word[1:]) if word[:1] in ("+", "-") else ("", word)
    if bare in ("inf", "infinity", ".inf"):  # inf, -inf, YAML's .inf; one sign at most
        return name, float(sign + "inf")
    try:
        parsed: Any = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        parsed = value
    return name, parsed


def type_name(hint: Any, names: dict[Any, str] | None = None) -> str:
    """The annotation ``hint`` in words (``names`` renames basic types, e.g. YAML's "integer")."""
    names = names or {}
    if hint in names:
        return names[hint]
    if hint is type(None):
        return "None"
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return " or ".join(repr(a) for a in typing.get_args(hint))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a, names) for a in typing.get_args(hint))
    if origin is not None:
        return getattr(origin, "__name__", str(origin))
    return getattr(hint, "__name__", str(hint))


def value_matches(value: Any, hint: Any) -> bool:
    """Whether ``value`` fits the annotation ``hint`` (int is no bool; a float field takes an int;
    a tuple field takes a list, as JSON and YAML give it)."""
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return any(value_matches(value, a) for a in args)
    if origin in (tuple, list):
        if not isinstance(value, (tuple, list)):
            return False
        inner = args[0] if args and (origin is list or (len(args) == 2 and args[1] is Ellipsis)) else None
        if inner is not None:
            return all(value_matches(v, inner) for v in value)
        return not args or (len(args) == len(value) and all(value_matches(v, a) for v, a in zip(value, args)))
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def check_types(config_cls: type, values: dict[str, Any], what: str, none_is_default: bool = True) -> None:
    """Each of ``values`` against the annotation of the field of the dataclass ``config_cls`` it
    names: the one type check of options and run settings. With ``none_is_default`` (options),
    ``None`` means "the default" and is not checked; without it (a built config) it must fit the
    annotation like any value.

    Raises:
        ConfigError: ``WHAT NAME must be TYPE, got VALUE``.
    """
    hints = typing.get_type_hints(config_cls)
    for key, value in values.items():
        if key not in hints or (value is None and none_is_default):
            continue
        if not value_matches(value, hints[key]):
            raise ConfigError(f"{what} {key} must be {type_name(hints[key])}, got {value!r}")


def build_options(kind: str, name: str, config_cls: type[T], options: dict[str, Any], hidden: frozenset[str] = frozenset()) -> T:
    """``config_cls(**options)``, ``None`` values left out (they mean "the default").

    Raises:
        ConfigError: an option name ``config_cls`` lacks (the message lists the ones it has, less
            ``hidden``), or a value its ``__post_init__`` refuses, named as ``KIND 'NAME'``.
    """
    fields = {f.name for f in dataclasses.fields(config_cls)}  # type: ignore[arg-type]
    unknown = sorted(k for k, v in options.items() if v is not None and k not in fields)
    if unknown:
        known = ", ".join(sorted(fields - hidden)) or "(none)"
        raise ConfigError(f"{kind} {name!r} has no option(s) {', '.join(unknown)}; options: {known}")
    check_types(config_cls, options, f"{kind} {name!r} option")
    try:
        return config_cls(**{k: v for k, v in options.items() if v is not None})
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{kind} {name!r}: {exc}") from exc


# ---------------------------------------------------------------------- flags from dataclasses
_ROLE = re.compile(r":(?:class|mod|func|meth|attr|data):`~?([^`]+)`")


def _plain(text: str) -> str:
    """Docstring text as plain help: roles and double back-quotes dropped, whitespace folded."""
    text = _ROLE.sub(lambda m: m.group(1), text).replace("``", "")
    return " ".join(text.split())


def attribute_docs(cls: type) -> dict[str, str]:
    """The ``Attributes:`` section of ``cls``'s docstring (Google style), as plain text by field
    name; an entry for several names (``a, b: text``) gives each of them the text."""
    doc = inspect.getdoc(cls) or ""
    lines = doc.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Attributes:") + 1
    except StopIteration:
        return {}
    entries: list[tuple[list[str], list[str]]] = []
    indent: int | None = None
    for line in lines[start:]:
        if not line.strip():
            continue
        width = len(line) - len(line.lstrip())
        if indent is None:
            indent = width
        if width < indent:
            break
        head = re.match(r"^([A-Za-z_][\w, ]*):\s*(.*)$", line.strip()) if width == indent else None
        if head:
            entries.append(([n.strip() for n in head.group(1).split(",")], [head.group(2)]))
        elif entries:
            entries[-1][1].append(line.strip())
    return {name: _plain(" ".join(text)) for names, text in entries for name in names}


def _first_sentence(text: str) -> str:
    """Up to the first ``.`` or ``;`` outside brackets that ends a word."""
    depth = 0
    for i, ch in enumerate(text):
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth = max(0, depth - 1)
        elif ch in ".;" and depth == 0 and (i + 1 == len(text) or text[i + 1] == " "):
            if not text[: i + 1].endswith(("e.g.", "i.e.")):
                return text[:i]
    return text


@dataclasses.dataclass(frozen=True)
class Flag:
    """How one dataclass field appears on the command line, where its type alone does not say.

    Attributes:
        type: the argparse ``type`` (default: from the field's annotation).
        choices: allowed values.
        metavar: the value's name in the help.
        help: the help text (default: the first sentence of the field's docstring entry).
        name: the flag without its dashes (default: the field's name with dashes).
        action: an argparse action instead of a typed value (``"append"`` for repeatable flags).
    """

    type: Callable[[str], Any] | None = None
    choices: Sequence[str] | None = None
    metavar: str | None = None
    help: str | None = None
    name: str | None = None
    action: str | None = None


def _annotation_type(annotation: Any) -> tuple[str, Callable[[str], Any] | None]:
    """``("bool" | "value", type)`` for an annotation given as a string (``int | None``)."""
    text = str(annotation).replace("typing.", "")
    parts = {p.strip() for p in text.split("|")} - {"None"}
    if parts == {"bool"}:
        return "bool", None
    for name, fn in (("int", int), ("float", float), ("str", str)):
        if parts == {name}:
            return "value", fn
    return "value", None


def add_dataclass_arguments(
    parser: argparse.ArgumentParser,
    cls: type,
    docs: dict[str, str],
    flags: dict[str, Flag] | None = None,
    skip: Sequence[str] = (),
) -> list[str]:
    """One flag per field of the dataclass ``cls`` (less ``skip``), its help from ``docs`` (e.g.
    :func:`attribute_docs`) and its default from the field, shown as ``(default X)``.

    A ``bool`` field that defaults to False becomes ``--name`` (store true), one that defaults to
    True ``--no-name`` (store false). ``flags`` adjusts a field's type, choices, metavar, help or
    flag name. The flags set no default of their own (give the parser ``argument_default=SUPPRESS``
    to tell given flags from defaults). Returns the fields given a flag.

    Raises:
        ValueError: a field without documentation in ``docs`` and without ``Flag.help``, or whose
            type is not ``bool``, ``int``, ``float`` or ``str`` and that has no ``Flag.type`` or
            ``Flag.action``: a new field must say what it is before it gets a flag.
    """
    flags = flags or {}
    done = []
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name in skip:
            continue
        spec = flags.get(f.name, Flag())
        text = spec.help or (_first_sentence(docs[f.name]) if f.name in docs else None)
        if text is None:
            raise ValueError(f"{cls.__name__}.{f.name} has no documentation to make its flag's help from")
        default = f.default if f.default is not dataclasses.MISSING else None
        kind, fn = _annotation_type(f.type)
        name = spec.name or f.name.replace("_", "-")
        if kind == "bool":
            if default:
                parser.add_argument(f"--{spec.name or 'no-' + name}", dest=f.name, action="store_false",
                                    help=f"turn off: {text}".replace("%", "%%"))
            else:
                parser.add_argument(f"--{name}", dest=f.name, action="store_true", help=text.replace("%", "%%"))
            done.append(f.name)
            continue
        if default is not None and default != "" and not isinstance(default, (dict, list)):
            text = f"{text} (default {default})"
        kwargs: dict[str, Any] = {"dest": f.name, "help": text.replace("%", "%%")}
        if spec.action is not None:
            kwargs["action"] = spec.action
        if spec.type is not None or fn is not None:
            kwargs["type"] = spec.type or fn
        elif spec.action is None:
            raise ValueError(f"{cls.__name__}.{f.name} ({f.type}) needs a Flag with a type to get a flag")
        if spec.choices is not None:
            kwargs["choices"] = list(spec.choices)
        if spec.metavar is not None:
            kwargs["metavar"] = spec.metavar
        parser.add_argument(f"--{name}", **kwargs)
        done.append(f.name)
    return done
