"""Scenario files, format version 1: from YAML text to a validated :class:`Scenario`.

:func:`load_scenario` (a path) and :func:`load_scenario_text` (a string) either
return a :class:`~kvmmem.scenario.model.Scenario` whose every value has been
checked against SCENARIOS.md, or raise one :class:`~kvmmem.errors.InputError`
whose message reads::

    quick.yaml:12: steps[3].guest_write.size: 3 is not a valid access size (1, 2, 4, 8)

that is ``FILE:LINE: FIELD: WHAT``, naming the first mistake in file order.
Only problems with the file itself (missing, a directory, too large) carry no
line.  Nothing else escapes: YAML syntax errors, binary input, unsupported
tags, duplicate keys, recursive aliases and absurd nesting all become that one
``InputError``.  A bad file therefore never runs half-way.

How it works: the YAML is *composed* (``yaml.SafeLoader``'s node tree, never
constructed into Python objects), so every node keeps its line and its raw
text.  Scalars are interpreted here: a size (``4096``, ``0x1000``, ``2M``)
goes through :func:`kvmmem.types.parse_size`; an integer written with a
leading zero (``010``, octal in YAML 1.1) is rejected as ambiguous.  The checks
then walk the schema, recording every mistake with its position; the one
reported is the earliest.  Two exceptions to "earliest": a missing or wrong
``kvmmem`` version is reported before anything else (the rest of the file may
be another format), and a name that failed to parse does not make its later
uses fail too.

Anchors, aliases and merge keys (``<<: *defaults``) are allowed.  The loader
imports nothing that runs the model.

Where the parts live: this module reads the file and composes the YAML;
:mod:`kvmmem.scenario.nodes` holds the node helpers (tags, lines, how a value
is quoted), :mod:`kvmmem.scenario.values` the recording of mistakes and the
scalar value checks, :mod:`kvmmem.scenario.checker` the structural checker.
"""

from __future__ import annotations

import os
from typing import Final

import yaml
from yaml.nodes import Node

from kvmmem.errors import InputError
from kvmmem.scenario import schema
from kvmmem.scenario.checker import _Checker
from kvmmem.scenario.model import Scenario
from kvmmem.types import format_size

__all__ = ["MAX_DEPTH", "MAX_FILE_BYTES", "MAX_VCPUS", "load_scenario", "load_scenario_text"]

MAX_FILE_BYTES: Final = 4 << 20
"""Larger files are refused before parsing."""
MAX_DEPTH: Final = 64
"""Deeper YAML nesting is refused (the schema needs fewer than ten levels)."""
MAX_VCPUS: Final = schema.MAX_VCPUS
"""Upper bound of ``vcpus``."""


class _TooDeep(Exception):
    def __init__(self, line: int) -> None:
        super().__init__(line)
        self.line = line


class _Composer(yaml.SafeLoader):
    """``SafeLoader`` that refuses nesting deeper than :data:`MAX_DEPTH` (PyYAML's
    composer recurses per level and would otherwise hit RecursionError)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Node | None, index: int) -> Node | None:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                event = self.peek_event()  # type: ignore[no-untyped-call]
                raise _TooDeep(int(event.start_mark.line) + 1)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


# --- entry points ------------------------------------------------------------------


def load_scenario(path: str | os.PathLike[str]) -> Scenario:
    """Read and validate the scenario file at ``path``.

    Returns the :class:`Scenario`; raises :class:`InputError` (message
    ``FILE:LINE: FIELD: WHAT``) when the file cannot be read or is not a valid
    version-1 scenario.
    """
    name = os.fspath(path)
    try:
        if os.path.isdir(name):
            raise InputError(f"{name}: is a directory, not a scenario file")
        with open(name, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise InputError(f"{name}: no such file") from None
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise InputError(f"{name}: cannot read the file ({reason})") from None
    return load_scenario_text(data, filename=name)


def load_scenario_text(text: str | bytes, filename: str = "<string>") -> Scenario:
    """Validate scenario ``text`` (``str``, or ``bytes`` holding UTF-8).

    ``filename`` only names the source in messages and in ``Scenario.source``.
    Returns the :class:`Scenario`; raises :class:`InputError` naming
    ``filename``, the line and the field of the first mistake.
    """
    if len(text) > MAX_FILE_BYTES:
        raise InputError(
            f"{filename}: too large for a scenario file ({len(text)} bytes, "
            f"at most {format_size(MAX_FILE_BYTES)})"
        )
    if isinstance(text, bytes):
        raw = text
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = raw.count(b"\n", 0, exc.start) + 1
            column = exc.start - raw.rfind(b"\n", 0, exc.start)
            raise InputError(
                f"{filename}:{line}: not UTF-8 text (byte 0x{raw[exc.start]:02x} "
                f"in column {column})"
            ) from None
    if text.startswith("\ufeff"):
        text = text[1:]
    root = _compose(text, filename)
    if root is None:
        raise InputError(f"{filename}:1: the file is empty (a scenario starts with 'kvmmem: 1')")
    return _Checker(filename).scenario(root)


def _compose(text: str, filename: str) -> Node | None:
    """The YAML node tree of ``text``; every YAML-level problem becomes InputError."""
    loader: _Composer | None = None
    try:
        loader = _Composer(text)
        return loader.get_single_node()
    except _TooDeep as exc:
        raise InputError(
            f"{filename}:{exc.line}: YAML nesting deeper than {MAX_DEPTH} levels"
        ) from None
    except RecursionError:  # pragma: no cover - MAX_DEPTH keeps the composer shallow
        raise InputError(f"{filename}:1: YAML nesting too deep") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        problem = exc.problem or exc.context or "malformed YAML"
        if exc.problem and exc.context and exc.problem.startswith("but "):
            problem = f"{exc.context}, {exc.problem}"
        elif exc.problem and exc.context:
            where = ""
            if exc.context_mark is not None and exc.context_mark.line + 1 != line:
                where = f" on line {exc.context_mark.line + 1}"
            problem = f"{exc.problem} ({exc.context}{where})"
        raise InputError(f"{filename}:{line}: YAML syntax error: {problem}") from None
    except yaml.reader.ReaderError as exc:
        position = exc.position if isinstance(exc.position, int) else 0
        line = text.count("\n", 0, position) + 1
        char = exc.character
        code = ord(char) if isinstance(char, str) and len(char) == 1 else char
        shown = f"#x{code:04x}" if isinstance(code, int) else repr(code)
        raise InputError(
            f"{filename}:{line}: character {shown} is not allowed in a YAML file"
        ) from None
    except yaml.YAMLError as exc:  # pragma: no cover - every PyYAML error is one of the above
        raise InputError(f"{filename}:1: YAML error: {exc}") from None
    finally:
        if loader is not None:
            loader.dispose()
