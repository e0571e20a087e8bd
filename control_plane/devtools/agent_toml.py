"""An agent's TOML config written as text, the way a user would write it.

The control plane never imports the agent package (the layers forbid it): the demo, the local
fleet and ``edgefleet devices agent-config`` describe an agent's config as plain values and
write them here; the agent alone validates them (``edgefleet-agent run`` and ``enroll`` refuse
anything it does not know).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

__all__ = ["agent_toml"]


def agent_toml(values: Mapping[str, Any]) -> str:
    """Render ``values`` (top-level keys, and one mapping per ``[section]``) as TOML.

    Args:
        values: e.g. ``{"device_id": "pi-1", "broker": {"host": "127.0.0.1", "port": 1883}}``.
            ``None`` values are left out (TOML has no null: the agent's default applies).

    Returns:
        The TOML text.

    Raises:
        TypeError: A value TOML cannot hold here (a nested table inside a section, say).
    """
    lines = [f"{key} = {_value(value)}" for key, value in values.items() if not isinstance(value, Mapping | type(None))]
    for name, table in values.items():
        if isinstance(table, Mapping):
            lines.append(f"\n[{name}]")
            lines += [f"{key} = {_value(value)}" for key, value in table.items() if value is not None]
    return "\n".join(lines) + "\n"


def _value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        # JSON string escapes are valid TOML basic-string escapes (ensure_ascii would emit surrogate pairs).
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as a TOML value here")
