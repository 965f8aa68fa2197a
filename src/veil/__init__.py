"""veil: a research toolkit for invisible backdoor attacks on image classifiers.

veil exists so that defenses get tested against the strongest invisible attacks before attackers
use them. Use it on models and data you own.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
