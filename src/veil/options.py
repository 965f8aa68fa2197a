"""``NAME=VALUE`` option strings, as ``veil run --attack-opt``, ``veil defend --opt`` and sweep files
give them; below every command-line module, so that none of them imports another's."""

from __future__ import annotations

import argparse
import ast
from typing import Any


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
