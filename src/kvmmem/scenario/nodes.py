"""YAML node helpers of the scenario loader: tags, positions and how a value is shown.

Internal to :mod:`kvmmem.scenario.loader`: the value checks
(:mod:`kvmmem.scenario.values`) and the structural checker
(:mod:`kvmmem.scenario.checker`) read composed ``yaml.nodes`` through these.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

_T = "tag:yaml.org,2002:"
_STR, _INT, _FLOAT, _BOOL, _NULL = _T + "str", _T + "int", _T + "float", _T + "bool", _T + "null"
_MAP, _SEQ, _MERGE = _T + "map", _T + "seq", _T + "merge"
_STRINGISH = frozenset({_STR, _T + "timestamp", _T + "value", _MERGE})
"""Scalar tags read as plain text (a date or ``=`` or ``<<`` written as a value)."""
_SCALAR_TAGS = _STRINGISH | {_INT, _FLOAT, _BOOL, _NULL}


class _Bad(Exception):
    """A field was wrong; the mistake is already recorded."""


# --- small helpers -----------------------------------------------------------------


def _line(node: Node) -> int:
    return int(node.start_mark.line) + 1


def _join(path: str, key: str) -> str:
    """``path.key``; a key that is empty or has surrounding blanks is quoted."""
    if not key or key.strip() != key:
        key = repr(key)
    return f"{path}.{key}" if path else key


def _show(node: Node) -> str:
    """How a value is quoted in messages: its text as written, ``a list``, ``a mapping``."""
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    text = str(node.value)
    if node.tag == _NULL and text in ("", "~"):
        return "nothing"
    if len(text) > 40:
        text = text[:37] + "..."
    if (isinstance(node, ScalarNode) and node.style) or node.tag in _STRINGISH:
        return repr(text)
    return text


def _tag(node: Node) -> str:
    tag = str(node.tag)
    return "!!" + tag[len(_T):] if tag.startswith(_T) else tag


def _hint(word: str, choices: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.75)
    return f", did you mean {close[0]!r}?" if close else ""


def _listing(names: Any) -> str:
    return ", ".join(str(n) for n in names)


Parser = Callable[[Node, str], Any]


@dataclass
class _Names:
    """The mapping names a reference may use at one point of the file.

    ``known`` maps usable names to their line; ``elsewhere`` maps names that
    exist but not here to why (used for a precise message)."""

    known: dict[str, int]
    elsewhere: dict[str, str]

