"""JSON output that survives jq and JavaScript: exact hex beside 64-bit values.

A JSON number is a double in jq and JavaScript, so a 64-bit ``value`` such as
``0xabababababababab`` prints there as ``12370169555311110000``.  The outcome
objects keep their integers (the contract of every ``--json``), and
:func:`with_hex` adds, right after each integer ``value`` and ``data`` of an
outcome (an object with a ``result``), the same number as an exact string:
``"value_hex": "0xabababababababab"``.
"""

from __future__ import annotations

import json
from typing import Any

HEX_KEYS: tuple[str, ...] = ("value", "data")
"""Outcome keys that can hold a 64-bit integer; each gets a ``KEY_hex`` twin."""


def hex_twins(outcome: dict[str, Any]) -> dict[str, Any]:
    """``outcome`` with ``KEY_hex`` ("0x..." strings) right after each integer key of
    :data:`HEX_KEYS`; every other key and the order are kept."""
    out: dict[str, Any] = {}
    for key, value in outcome.items():
        out[key] = value
        if key in HEX_KEYS and isinstance(value, int) and not isinstance(value, bool):
            out[f"{key}_hex"] = f"{value:#x}"
    return out


def with_hex(obj: Any) -> Any:
    """A copy of the JSON-ready ``obj`` where every outcome object (a dict with a
    ``result`` key), at any depth, carries the hex twins of :func:`hex_twins`."""
    if isinstance(obj, dict):
        items = {key: with_hex(value) for key, value in obj.items()}
        return hex_twins(items) if "result" in items else items
    if isinstance(obj, list | tuple):
        return [with_hex(value) for value in obj]
    return obj


def dumps(obj: Any) -> str:
    """``json.dumps`` of :func:`with_hex` of ``obj``: one line of JSON."""
    return json.dumps(with_hex(obj))
