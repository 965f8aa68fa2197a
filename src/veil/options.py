"""Options of attacks and defenses: ``NAME=VALUE`` strings as ``veil run --attack-opt`` and ``veil
defend --opt`` give them, and the one check of option names and values every caller uses
(:func:`build_options`). Below every command-line module, so that none of them imports another's."""

from __future__ import annotations

import argparse
import ast
import dataclasses
from typing import Any, TypeVar

from veil.errors import ConfigError

T = TypeVar("T")


def parse_option(text: str, what: str = "option") -> tuple[str, Any]:
    """``NAME=VALUE`` -> ``(name, value)``, the value read as a Python literal when it is one."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"{what} {text!r} must look like NAME=VALUE")
    key, value = text.split("=", 1)
    try:
        parsed: Any = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        parsed = value
    return key.strip().replace("-", "_"), parsed


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
    try:
        return config_cls(**{k: v for k, v in options.items() if v is not None})
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{kind} {name!r}: {exc}") from exc
