"""YAML files read safely and within bounds: ``yaml.safe_load`` (no object construction) with a
limit on aliases and on the size of what they expand to, so that a "billion laughs" file of
nested anchors is refused with a clear error instead of filling memory."""

from __future__ import annotations

from typing import Any

import yaml

from veil.errors import ConfigError

#: most aliases (``*name``) a file may use
MAX_ALIASES = 256
#: most values (mapping entries, list items, scalars) the file may expand to
MAX_NODES = 100_000


class _CountingLoader(yaml.SafeLoader):
    """SafeLoader that counts the aliases it resolves."""

    aliases = 0

    def compose_node(self, parent: Any, index: Any) -> Any:  # type: ignore[override]
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > MAX_ALIASES:
                raise ConfigError(f"uses more than {MAX_ALIASES} YAML aliases")
        return super().compose_node(parent, index)


def _count(obj: Any, budget: list[int]) -> None:
    budget[0] -= 1
    if budget[0] < 0:
        raise ConfigError(f"expands to more than {MAX_NODES} values (nested YAML aliases?)")
    if isinstance(obj, dict):
        for k, v in obj.items():
            _count(k, budget)
            _count(v, budget)
    elif isinstance(obj, list):
        for v in obj:
            _count(v, budget)


def load_yaml(text: str, where: str) -> Any:
    """Parse ``text`` (the contents of ``where``, named in errors) with ``yaml.safe_load``'s rules.

    Raises:
        ConfigError: not valid YAML, too many aliases, or too large once they are expanded.
    """
    loader = _CountingLoader(text)
    try:
        data = loader.get_single_data()
    except ConfigError as exc:
        raise ConfigError(f"{where} {exc}; refusing it") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where} is not valid YAML ({' '.join(str(exc).split())})") from None
    finally:
        loader.dispose()
    try:
        _count(data, [MAX_NODES])
    except ConfigError as exc:
        raise ConfigError(f"{where} {exc}; refusing it") from None
    except RecursionError:
        raise ConfigError(f"{where} is nested too deeply; refusing it") from None
    return data
