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
"""

from __future__ import annotations

import difflib
import errno as _errno
import os
import re
import signal as _signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Final

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from kvmmem.errors import InputError
from kvmmem.scenario import schema
from kvmmem.scenario.model import (
    ACCESS_SIZES,
    ARCHES,
    FORMAT_VERSION,
    GRANULES,
    GUEST_STEPS,
    MEMSLOT_FLAGS,
    PROT_EXEC,
    PROT_NONE,
    PROT_READ,
    PROT_WRITE,
    RESULT_KEYS,
    RESULTS,
    STEP_TYPES,
    HvaRef,
    Mapping,
    Scenario,
    SetMemslot,
    Step,
)
from kvmmem.types import CPU_FEATURES, PAGE_SIZE, PMD_SIZE, format_size, parse_size
from kvmmem.variants import VARIANTS, get_variant

__all__ = ["MAX_DEPTH", "MAX_FILE_BYTES", "MAX_VCPUS", "load_scenario", "load_scenario_text"]

MAX_FILE_BYTES: Final = 4 << 20
"""Larger files are refused before parsing."""
MAX_DEPTH: Final = 64
"""Deeper YAML nesting is refused (the schema needs fewer than ten levels)."""
MAX_VCPUS: Final = schema.MAX_VCPUS
"""Upper bound of ``vcpus``."""

_U32: Final = (1 << 32) - 1
_U64: Final = (1 << 64) - 1
_MAX_NUMBER_CHARS: Final = 80

_T = "tag:yaml.org,2002:"
_STR, _INT, _FLOAT, _BOOL, _NULL = _T + "str", _T + "int", _T + "float", _T + "bool", _T + "null"
_MAP, _SEQ, _MERGE = _T + "map", _T + "seq", _T + "merge"
_STRINGISH = frozenset({_STR, _T + "timestamp", _T + "value", _MERGE})
"""Scalar tags read as plain text (a date or ``=`` or ``<<`` written as a value)."""
_SCALAR_TAGS = _STRINGISH | {_INT, _FLOAT, _BOOL, _NULL}

_TOP_KEYS = tuple(k.name for k in schema.TOP_KEYS)
_STRUCTURAL = frozenset({"mappings", "memslots", "steps", "threads"})
"""Key types the checker walks itself (their checks span entries)."""
_ERRNO_NAMES = frozenset(n for n in dir(_errno) if n.startswith("E") and n.isupper())
"""Every errno name, aliases included (EOPNOTSUPP as well as ENOTSUP)."""
_SIGNAL_NAMES = frozenset(_signal.Signals.__members__)
_INT_RE = re.compile(r"([-+]?)(0b[01_]*|0x[0-9a-fA-F_]*|[0-9][0-9_]*)")


class _Bad(Exception):
    """A field was wrong; the mistake is already recorded."""


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


def _reporters(key: str) -> str:
    """The step kinds whose outcome can carry ``key``: ``guest_read and host_read``."""
    return " and ".join(op for op, cls in STEP_TYPES.items() if key in cls.reports)


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


# --- the checker ----------------------------------------------------------------------


class _Checker:
    """Walks a composed YAML tree against the v1 schema, recording mistakes."""

    def __init__(self, filename: str) -> None:
        self.filename = filename
        self.errors: list[tuple[int, int, int, int, str]] = []
        # id(node) -> (node, entries); holding the node keeps its id from being reused
        self._entries: dict[int, tuple[Node, list[tuple[str, ScalarNode, Node]]]] = {}
        self._in_progress: set[int] = set()
        self.vcpus: int | None = 1

    # -- recording -------------------------------------------------------------------

    def err(self, node: Node, path: str, message: str, *, at_end: bool = False) -> _Bad:
        """Record ``message`` at ``node`` for field ``path``; returns the exception to raise.

        ``at_end`` (a key missing from mapping ``node``) orders the mistake at the end of
        the mapping, where it is noticed, so that a misspelt key inside it is reported
        first; the message still names the mapping's first line."""
        mark = node.end_mark if at_end else node.start_mark
        text = f"{path}: {message}" if path else message
        text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
        self.errors.append((int(mark.line), int(mark.column), len(self.errors), _line(node), text))
        return _Bad()

    def first_error(self) -> InputError:
        *_, line, text = min(self.errors)
        return InputError(f"{self.filename}:{line}: {text}")

    # -- generic YAML structure ---------------------------------------------------------

    def entries(self, node: MappingNode, path: str) -> list[tuple[str, ScalarNode, Node]]:
        """``(key, key_node, value_node)`` of a mapping in file order, merges applied.

        Records duplicate keys, non-scalar keys, bad and recursive merges (and
        skips them).  Explicit keys win over merged ones, earlier merges over later."""
        cached = self._entries.get(id(node))
        if cached is not None:
            return cached[1]
        self._in_progress.add(id(node))
        explicit: list[tuple[str, ScalarNode, Node]] = []
        seen: dict[str, ScalarNode] = {}
        merges: list[tuple[ScalarNode, Node]] = []
        for knode, vnode in node.value:
            if isinstance(knode, ScalarNode) and knode.tag == _MERGE:
                merges.append((knode, vnode))
                continue
            if not isinstance(knode, ScalarNode):
                self.err(knode, path, f"a key must be a plain word, not {_show(knode)}")
                continue
            key = str(knode.value)
            if key in seen:
                self.err(knode, _join(path, key),
                         f"duplicate key (first given on line {_line(seen[key])})")
                continue
            seen[key] = knode
            explicit.append((key, knode, vnode))
        merged: list[tuple[str, ScalarNode, Node]] = []
        for _knode, vnode in merges:
            if isinstance(vnode, MappingNode):
                sources = [vnode]
            elif isinstance(vnode, SequenceNode) and all(
                    isinstance(v, MappingNode) for v in vnode.value):
                sources = list(vnode.value)
            else:
                self.err(vnode, _join(path, "<<"),
                         f"a merge takes a mapping or a list of mappings, not {_show(vnode)}")
                continue
            for src in sources:
                if id(src) in self._in_progress:
                    self.err(src, _join(path, "<<"), "a mapping cannot merge itself")
                    continue
                for key, sk, sv in self.entries(src, path):
                    if key not in seen:
                        seen[key] = sk
                        merged.append((key, sk, sv))
        self._in_progress.discard(id(node))
        result = explicit + merged
        self._entries[id(node)] = (node, result)
        return result

    def prewalk(self, root: Node) -> None:
        """Visit every node once: unsupported tags, duplicate keys, bad merges."""
        seen: set[int] = set()
        todo: list[tuple[Node, str]] = [(root, "")]
        while todo:
            node, path = todo.pop()
            if id(node) in seen:
                continue
            seen.add(id(node))
            if isinstance(node, MappingNode):
                if node.tag != _MAP:
                    self.err(node, path, f"unsupported YAML tag {_tag(node)}")
                children: list[tuple[Node, str]] = []
                for knode, vnode in node.value:
                    if isinstance(knode, ScalarNode) and knode.tag == _MERGE:
                        children.append((vnode, _join(path, "<<")))
                    elif isinstance(knode, ScalarNode):
                        children.append((knode, path))
                        children.append((vnode, _join(path, str(knode.value))))
                    else:
                        children.append((knode, path))
                        children.append((vnode, path))
                self.entries(node, path)
                todo.extend(reversed(children))
            elif isinstance(node, SequenceNode):
                if node.tag != _SEQ:
                    self.err(node, path, f"unsupported YAML tag {_tag(node)}")
                todo.extend((v, f"{path}[{i}]") for i, v in reversed(list(enumerate(node.value))))
            elif node.tag not in _SCALAR_TAGS:
                self.err(node, path, f"unsupported YAML tag {_tag(node)}")

    # -- scalars --------------------------------------------------------------------------

    def integer(self, node: Node, path: str) -> int:
        """A YAML integer (decimal, 0x hex, 0b binary, underscores allowed)."""
        if not isinstance(node, ScalarNode) or node.tag != _INT:
            raise self.err(node, path, f"expected an integer, got {_show(node)}")
        text = str(node.value)
        if len(text) > _MAX_NUMBER_CHARS:
            raise self.err(node, path, f"{_show(node)} is too large")
        m = _INT_RE.fullmatch(text)
        if m is None:
            raise self.err(node, path, f"{_show(node)} is not an integer")
        sign, body = m.group(1), m.group(2).replace("_", "")
        if len(body) > 1 and body[0] == "0" and body[1].isdigit():
            raise self.err(node, path, f"{text} is ambiguous (YAML 1.1 reads a leading 0 as "
                                       f"octal); write {int(body, 10)} or a 0x number")
        try:
            if body[:2] in ("0x", "0b"):
                value = int(body[2:], 16 if body[1] == "x" else 2)
            else:
                value = int(body, 10)
        except ValueError:
            raise self.err(node, path, f"{_show(node)} is not an integer") from None
        return -value if sign == "-" else value

    def bounded(self, node: Node, path: str, low: int, high: int) -> int:
        """An integer in ``low..high``."""
        value = self.integer(node, path)
        if not low <= value <= high:
            raise self.err(node, path, f"{_show(node)} is out of range ({low}..{high})")
        return value

    def u32(self, node: Node, path: str) -> int:
        return self.bounded_unsigned(node, path, _U32)

    def u64(self, node: Node, path: str) -> int:
        return self.bounded_unsigned(node, path, _U64)

    def bounded_unsigned(self, node: Node, path: str, high: int) -> int:
        value = self.integer(node, path)
        if value < 0:
            raise self.err(node, path, f"{_show(node)} is negative (expected 0..{high:#x})")
        if value > high:
            raise self.err(node, path, f"{_show(node)} is too large (at most {high:#x})")
        return value

    def size(self, node: Node, path: str) -> int:
        """A size or address: integer, hex, or K/M/G/T suffix; 0 .. 2^64-1."""
        if isinstance(node, ScalarNode) and node.tag == _INT:
            value = self.integer(node, path)
            if value < 0:
                raise self.err(node, path, f"{_show(node)} is negative (a size or address "
                                           "is 0 .. 2^64 - 1)")
        elif isinstance(node, ScalarNode) and node.tag == _STR:
            text = str(node.value)
            value = -1
            if len(text) <= _MAX_NUMBER_CHARS:
                try:
                    value = parse_size(text)
                except (InputError, ValueError):
                    value = -1
            if value < 0:
                raise self.err(node, path, f"{_show(node)} is not a size (use an integer, "
                                           "hex like 0x1000, or a K/M/G/T suffix like 2M)")
        else:
            raise self.err(node, path, f"expected a size (like 4096, 0x1000 or 2M), "
                                       f"got {_show(node)}")
        if value > _U64:
            raise self.err(node, path, f"{_show(node)} is too large (at most 2^64 - 1)")
        return value

    def string(self, node: Node, path: str) -> str:
        if not isinstance(node, ScalarNode) or node.tag not in _STRINGISH:
            raise self.err(node, path, f"expected a string, got {_show(node)}")
        return str(node.value)

    def name(self, node: Node, path: str) -> str:
        """A non-empty name (scenario, mapping or thread)."""
        text = self.string(node, path)
        if not text.strip():
            raise self.err(node, path, "a name cannot be empty")
        return text

    def choice(self, node: Node, path: str, choices: tuple[str, ...], what: str) -> str:
        if not isinstance(node, ScalarNode) or node.tag not in _STRINGISH:
            raise self.err(node, path, f"expected {what} ({_listing(choices)}), "
                                       f"got {_show(node)}")
        text = str(node.value)
        if text not in choices:
            raise self.err(node, path, f"{_show(node)} is not {what} ({_listing(choices)})")
        return text

    def variant_name(self, node: Node, path: str) -> str:
        """A variant: a named one (``upstream``, ``linux-5.4``, a mutation), a release
        ``X.Y`` from 5.4 to upstream (YAML reads ``5.10`` as a float: the text is kept),
        or ``RELEASE+MUTATION``."""
        if not isinstance(node, ScalarNode) or node.tag not in _STRINGISH | {_FLOAT}:
            raise self.err(node, path, f"expected a variant ({_listing(tuple(VARIANTS))} "
                                       f"or a release such as 6.1), got {_show(node)}")
        text = str(node.value)
        try:
            get_variant(text)
        except InputError as exc:
            raise self.err(node, path, str(exc)) from None
        return text

    def boolean(self, node: Node, path: str) -> bool:
        if isinstance(node, ScalarNode) and node.tag == _BOOL:
            text = str(node.value).lower()
            if text in ("true", "yes", "on"):
                return True
            if text in ("false", "no", "off"):
                return False
        raise self.err(node, path, f"expected true or false, got {_show(node)}")

    def prot(self, node: Node, path: str) -> int:
        """``r``, ``w``, ``x`` letters (each at most once) or ``none`` -> PROT_* bits."""
        hint = "(letters r, w, x, or none)"
        if not isinstance(node, ScalarNode) or node.tag not in _STRINGISH:
            raise self.err(node, path, f"expected a protection {hint}, got {_show(node)}")
        text = str(node.value)
        if text == "none":
            return PROT_NONE
        bits = {"r": PROT_READ, "w": PROT_WRITE, "x": PROT_EXEC}
        prot = 0
        for c in text:
            if c not in bits or prot & bits[c]:
                prot = -1
                break
            prot |= bits[c]
        if prot <= 0:
            raise self.err(node, path, f"{_show(node)} is not a protection {hint}")
        return prot

    def access_size(self, node: Node, path: str) -> int:
        value = self.size(node, path)
        if value not in ACCESS_SIZES:
            raise self.err(node, path, f"{_show(node)} is not a valid access size "
                                       f"({_listing(ACCESS_SIZES)})")
        return value

    def fill(self, node: Node, path: str) -> int:
        value = self.integer(node, path)
        if not 0 <= value <= 0xFF:
            raise self.err(node, path, f"{_show(node)} is not a byte (0..255)")
        return value

    def vcpu(self, node: Node, path: str) -> int:
        value = self.integer(node, path)
        if value < 0:
            raise self.err(node, path, f"{_show(node)} is negative (vCPUs count from 0)")
        if self.vcpus is not None and value >= self.vcpus:
            raise self.err(node, path, f"{_show(node)} is out of range (the scenario has "
                                       f"vcpus: {self.vcpus})")
        return value

    def flags(self, node: Node, path: str) -> tuple[str, ...]:
        return self.word_list(node, path, tuple(MEMSLOT_FLAGS), "flag", "a memslot flag")

    def cpu_features(self, node: Node, path: str) -> tuple[str, ...]:
        return self.word_list(node, path, CPU_FEATURES, "CPU feature", "a CPU feature")

    def word_list(self, node: Node, path: str, names: tuple[str, ...], noun: str,
                  what: str) -> tuple[str, ...]:
        """A list of distinct words from ``names``."""
        if not isinstance(node, SequenceNode):
            raise self.err(node, path, f"expected a list of {noun}s ({_listing(names)}), "
                                       f"got {_show(node)}")
        out: list[str] = []
        bad = False
        for i, item in enumerate(node.value):
            try:
                flag = self.choice(item, f"{path}[{i}]", names, what)
            except _Bad:
                bad = True
                continue
            if flag in out:
                self.err(item, f"{path}[{i}]", f"{flag} is listed twice")
                bad = True
            out.append(flag)
        if bad:
            raise _Bad()
        return tuple(out)

    def ref(self, node: Node, path: str, names: _Names) -> str:
        """A mapping name that ``names`` allows at this point of the file."""
        name = self.string(node, path)
        if name in names.known:
            return name
        if name in names.elsewhere:
            raise self.err(node, path, f"mapping {name!r} {names.elsewhere[name]}")
        known = _listing(names.known) or "none"
        raise self.err(node, path, f"unknown mapping {name!r} (known here: {known})")

    # -- the schema's keys ---------------------------------------------------------------

    def parser(self, key: schema.Key, names: _Names | None) -> Parser:
        """How a value of ``key`` is read (:data:`kvmmem.scenario.schema.TYPES`);
        ``names``: the mapping names usable here (for ``memory`` and ``hva_ref``)."""
        t = key.type
        if t == "choice":
            return lambda n, p: self.choice(n, p, key.choices, key.what)
        if t == "range":
            return lambda n, p: self.bounded(n, p, key.low, key.high)
        if t in ("memory", "hva_ref"):
            assert names is not None
            if t == "memory":
                return lambda n, p: self.ref(n, p, names)
            return lambda n, p: self.hva_ref(n, p, names)
        simple: dict[str, Parser] = {
            "version": lambda n, p: None, "name": self.name, "string": self.string,
            "arches": self.arches,
            "variant": self.variant_name,
            "granule": self.granule, "size": self.size, "u32": self.u32, "u64": self.u64,
            "access_size": self.access_size, "vcpu": self.vcpu, "prot": self.prot,
            "fill": self.fill, "flags": self.flags, "cpu_features": self.cpu_features,
            "bool": self.boolean,
            "errno": self.errno_name, "signal": self.signal_name, "gfns": self.gfn_list,
        }
        return simple[t]

    def fields(self, keys: tuple[schema.Key, ...],
               names: _Names | None = None) -> dict[str, Parser]:
        """``{key name: parser}`` of a section, in the declared order."""
        return {k.name: self.parser(k, names) for k in keys if k.type not in _STRUCTURAL}

    @staticmethod
    def required(keys: tuple[schema.Key, ...]) -> tuple[str, ...]:
        """The names of the required keys of a section."""
        return tuple(k.name for k in keys if k.required)

    # -- mappings of fields ---------------------------------------------------------------

    def record(self, node: Node, path: str, fields: dict[str, Parser],
               required: tuple[str, ...] = (), *, null_is_empty: bool = False,
               ) -> dict[str, tuple[Any, Node]] | None:
        """Parse a mapping of known ``fields``: ``{key: (value, value_node)}``, or None
        after recording every mistake (unknown key, bad value, missing key)."""
        if null_is_empty and isinstance(node, ScalarNode) and node.tag == _NULL:
            node = MappingNode(_MAP, [], node.start_mark, node.end_mark)
        if not isinstance(node, MappingNode):
            self.err(node, path, f"expected a mapping of {_listing(fields)}, got {_show(node)}")
            return None
        out: dict[str, tuple[Any, Node]] = {}
        present: set[str] = set()
        ok = True
        keys = tuple(fields)
        for key, knode, vnode in self.entries(node, path):
            if key not in fields:
                self.err(knode, _join(path, key),
                         f"unknown key{_hint(key, keys)} (known keys: {_listing(keys)})")
                ok = False
                continue
            present.add(key)
            try:
                out[key] = (fields[key](vnode, _join(path, key)), vnode)
            except _Bad:
                ok = False
        for key in required:
            if key not in present:
                self.err(node, _join(path, key), "required key missing", at_end=True)
                ok = False
        return out if ok else None

    # -- the scenario -----------------------------------------------------------------------

    def scenario(self, root: Node) -> Scenario:
        """The validated :class:`Scenario`; raises InputError with the first mistake."""
        if not isinstance(root, MappingNode):
            raise InputError(
                f"{self.filename}:{_line(root)}: the top level must be a mapping "
                f"(kvmmem: 1, name: ..., steps: ...), not {_show(root)}"
            )
        self.prewalk(root)
        top = {key: (knode, vnode) for key, knode, vnode in self.entries(root, "")}
        self.check_version(root, top)

        values: dict[str, Any] = {}
        scalar_fields = self.fields(schema.TOP_KEYS)
        for key, knode, vnode in self.entries(root, ""):
            if key not in _TOP_KEYS:
                self.err(knode, _join("", key),
                         f"unknown key{_hint(key, _TOP_KEYS)} (known keys: {_listing(_TOP_KEYS)})")
            elif key in scalar_fields:
                try:
                    values[key] = scalar_fields[key](vnode, key)
                except _Bad:
                    if key == "vcpus":
                        self.vcpus = None
        if "vcpus" in values:
            self.vcpus = values["vcpus"]
        if "name" not in top:
            self.err(root, "name", "required key missing", at_end=True)

        mmap_sites = self.mmap_sites(top)
        memory = self.memory(top.get("memory"), mmap_sites)
        memslots = self.memslots(top.get("memslots"), memory, mmap_sites)
        steps, threads = self.step_lists(root, top, memory, mmap_sites)

        if self.errors:
            raise self.first_error()
        assert memory is not None and memslots is not None
        return Scenario(
            name=values["name"],
            description=values.get("description", ""),
            arches=values.get("arch", ("x86",)),
            variant=values.get("variant", "upstream"),
            variant_given="variant" in values,
            granule=values.get("granule", GRANULES["4K"]),
            vcpus=values.get("vcpus", 1),
            memory={n: m for n, m in memory.items() if m is not None},
            memslots=memslots,
            steps=steps,
            threads=threads,
            ipa_bits=values.get("ipa_bits"),
            cpu_features=values.get("cpu_features", ()),
            source=self.filename,
        )

    def check_version(self, root: MappingNode, top: dict[str, tuple[ScalarNode, Node]]) -> None:
        """``kvmmem: 1`` first: a file of another version is not checked any further."""
        if "kvmmem" not in top:
            raise InputError(f"{self.filename}:{_line(root)}: kvmmem: required key missing "
                             f"(the format version: kvmmem: {FORMAT_VERSION})")
        node = top["kvmmem"][1]
        if (not isinstance(node, ScalarNode) or node.tag != _INT
                or str(node.value) != str(FORMAT_VERSION)):
            raise InputError(f"{self.filename}:{_line(node)}: kvmmem: unsupported format "
                             f"version {_show(node)} (this kvmmem reads version "
                             f"{FORMAT_VERSION})")

    def arches(self, node: Node, path: str) -> tuple[str, ...]:
        if isinstance(node, SequenceNode):
            if not node.value:
                raise self.err(node, path, "the list of architectures is empty")
            out: list[str] = []
            bad = False
            for i, item in enumerate(node.value):
                try:
                    arch = self.choice(item, f"{path}[{i}]", ARCHES, "an architecture")
                except _Bad:
                    bad = True
                    continue
                if arch in out:
                    self.err(item, f"{path}[{i}]", f"{arch} is listed twice")
                    bad = True
                out.append(arch)
            if bad:
                raise _Bad()
            return tuple(out)
        return (self.choice(node, path, ARCHES, "an architecture"),)

    def granule(self, node: Node, path: str) -> int:
        value = self.size(node, path)
        if value not in GRANULES.values():
            raise self.err(node, path, f"{_show(node)} is not a stage-2 granule "
                                       f"({_listing(GRANULES)})")
        return value

    # -- mappings ------------------------------------------------------------------------------

    def hva_ref(self, node: Node, path: str, names: _Names) -> HvaRef:
        rec = self.record(node, path, self.fields(schema.HVA_REF_KEYS, names),
                          self.required(schema.HVA_REF_KEYS))
        if rec is None:
            raise _Bad()
        return HvaRef(rec["memory"][0], rec.get("offset", (0, None))[0])

    def check_mapping_size(self, rec: dict[str, tuple[Any, Node]], path: str,
                           allow_empty: bool) -> bool:
        """Page-multiple size (2M multiple for hugetlb); records and returns False if not."""
        size, node = rec["size"]
        if size == 0 and not allow_empty:
            self.err(node, _join(path, "size"), "a mapping cannot be empty (size 0)")
            return False
        if rec["kind"][0] == "hugetlb" and size % PMD_SIZE:
            self.err(node, _join(path, "size"), f"{_show(node)} is not a multiple of the "
                                                f"huge page size ({format_size(PMD_SIZE)})")
            return False
        if size % PAGE_SIZE:
            self.err(node, _join(path, "size"), f"{_show(node)} is not a multiple of the "
                                                f"page size ({format_size(PAGE_SIZE)})")
            return False
        return True

    def mmap_sites(self, top: dict[str, tuple[ScalarNode, Node]]) -> dict[str, tuple[str, int]]:
        """Names created by host_mmap steps anywhere -> (thread or "", line): a cheap
        look-ahead so that a use before the creating step gets a precise message."""
        sites: dict[str, tuple[str, int]] = {}
        for label, steps in self.raw_step_lists(top):
            for step in steps:
                if not isinstance(step, MappingNode):
                    continue
                for key, _, args in self.entries(step, ""):
                    if key != "host_mmap" or not isinstance(args, MappingNode):
                        continue
                    for akey, _, anode in self.entries(args, ""):
                        if (akey == "name" and isinstance(anode, ScalarNode)
                                and anode.tag in _STRINGISH):
                            sites.setdefault(str(anode.value), (label, _line(anode)))
        return sites

    def raw_step_lists(self, top: dict[str, tuple[ScalarNode, Node]],
                       ) -> Iterator[tuple[str, list[Node]]]:
        steps = top.get("steps")
        if steps is not None and isinstance(steps[1], SequenceNode):
            yield "", list(steps[1].value)
        threads = top.get("threads")
        if threads is not None and isinstance(threads[1], MappingNode):
            for key, _, vnode in self.entries(threads[1], "threads"):
                if isinstance(vnode, SequenceNode):
                    yield key, list(vnode.value)

    def memory(self, item: tuple[ScalarNode, Node] | None,
               sites: dict[str, tuple[str, int]]) -> dict[str, Mapping | None]:
        """The ``memory`` section: name -> Mapping (None for a bad entry, whose name
        still counts as declared)."""
        out: dict[str, Mapping | None] = {}
        if item is None:
            return out
        node = item[1]
        if not isinstance(node, MappingNode):
            self.err(node, "memory", f"expected a mapping of name -> {{size, kind, prot}}, "
                                     f"got {_show(node)}")
            return out
        entries = self.entries(node, "memory")
        later = {key: _line(knode) for key, knode, _ in entries}
        known: dict[str, int] = {}
        for key, knode, vnode in entries:
            path = _join("memory", key)
            if knode.tag not in _STRINGISH or not key.strip():
                self.err(knode, path, f"a mapping name must be a non-empty string, "
                                      f"not {_show(knode)}")
                continue
            elsewhere = {n: f"is declared after this one (line {line})"
                         for n, line in later.items() if n not in known}
            elsewhere[key] = "cannot be placed at itself"
            elsewhere.update({n: f"is created by a step (line {line}); 'at' in memory can "
                                 "only name mappings declared before it"
                              for n, (_, line) in sites.items() if n not in later})
            names = _Names(dict(known), elsewhere)
            rec = self.record(vnode, path, self.fields(schema.MAPPING_KEYS, names),
                              self.required(schema.MAPPING_KEYS))
            known[key] = _line(knode)
            if rec is None or not self.check_mapping_size(rec, path, allow_empty=False):
                out[key] = None
                continue
            out[key] = Mapping(
                name=key, size=rec["size"][0], kind=rec["kind"][0], prot=rec["prot"][0],
                fill=rec.get("fill", (None, None))[0], at=rec.get("at", (None, None))[0],
                line=_line(knode),
            )
        return out

    # -- memslots ---------------------------------------------------------------------------------

    def memslot_args(self, rec: dict[str, tuple[Any, Node]], path: str) -> dict[str, Any] | None:
        """Cross-field checks of a memslot; the SetMemslot keyword arguments, or None."""
        if "memory" in rec and "hva" in rec:
            later = max(rec["memory"][1], rec["hva"][1],
                        key=lambda n: (n.start_mark.line, n.start_mark.column))
            key = "hva" if later is rec["hva"][1] else "memory"
            self.err(later, _join(path, key), "give memory (+ offset) or hva, not both")
            return None
        if "offset" in rec and "memory" not in rec:
            self.err(rec["offset"][1], _join(path, "offset"),
                     "offset needs memory (a raw address goes in hva)")
            return None
        args = {key: value for key, (value, _) in rec.items()}
        if "memory" not in rec:
            args.setdefault("hva", 0)
        return args

    def memslots(self, item: tuple[ScalarNode, Node] | None, memory: dict[str, Mapping | None],
                 sites: dict[str, tuple[str, int]]) -> tuple[SetMemslot, ...] | None:
        if item is None:
            return ()
        node = item[1]
        if not isinstance(node, SequenceNode):
            self.err(node, "memslots", f"expected a list of memslots, got {_show(node)}")
            return None
        names = _Names(
            {n: 0 for n in memory},
            {n: f"is created by a step (line {line}); memslots can only use memory"
             for n, (_, line) in sites.items() if n not in memory},
        )
        out: list[SetMemslot] = []
        used: dict[int, str] = {}
        ok = True
        for i, entry in enumerate(node.value):
            path = f"memslots[{i}]"
            rec = self.record(entry, path, self.fields(schema.MEMSLOT_KEYS, names),
                              self.required(schema.MEMSLOT_KEYS))
            if rec is None:
                ok = False
                continue
            slot, snode = rec["slot"]
            if slot in used:
                self.err(snode, _join(path, "slot"), f"duplicate slot {slot} "
                                                     f"(already used by {used[slot]})")
                ok = False
                continue
            used[slot] = path
            size, znode = rec["size"]
            if size == 0:
                self.err(znode, _join(path, "size"), "a memslot made before the steps cannot "
                                                     "be empty (size 0 deletes: use a "
                                                     "set_memslot step)")
                ok = False
                continue
            args = self.memslot_args(rec, path)
            if args is None:
                ok = False
                continue
            out.append(SetMemslot(index=i, line=_line(entry), **args))
        return tuple(out) if ok else None

    # -- steps ---------------------------------------------------------------------------

    def step_lists(self, root: MappingNode, top: dict[str, tuple[ScalarNode, Node]],
                   memory: dict[str, Mapping | None], sites: dict[str, tuple[str, int]],
                   ) -> tuple[tuple[Step, ...] | None, dict[str, tuple[Step, ...]] | None]:
        if "steps" in top and "threads" in top:
            ks, kt = top["steps"][0], top["threads"][0]
            later, key = (kt, "threads") if _line(kt) >= _line(ks) else (ks, "steps")
            self.err(later, key, "give steps or threads, not both")
            return None, None
        if "steps" not in top and "threads" not in top:
            self.err(root, "steps", "required key missing (or threads, for a concurrent "
                                    "scenario)", at_end=True)
            return None, None
        declared = dict.fromkeys(memory, 0)
        if "steps" in top:
            node = top["steps"][1]
            if not isinstance(node, SequenceNode):
                self.err(node, "steps", f"expected a list of steps, got {_show(node)}")
                return None, None
            steps = self.step_list(node.value, "steps", None, memory, sites, declared)
            return steps, None
        node = top["threads"][1]
        if not isinstance(node, MappingNode):
            self.err(node, "threads", f"expected a mapping of thread name -> list of steps, "
                                      f"got {_show(node)}")
            return None, None
        entries = self.entries(node, "threads")
        if not entries:
            self.err(node, "threads", "no threads given")
            return None, None
        threads: dict[str, tuple[Step, ...]] = {}
        ok = True
        for key, knode, vnode in entries:
            path = _join("threads", key)
            if knode.tag not in _STRINGISH or not key.strip():
                self.err(knode, path, f"a thread name must be a non-empty string, "
                                      f"not {_show(knode)}")
                ok = False
                continue
            if not isinstance(vnode, SequenceNode):
                self.err(vnode, path, f"expected a list of steps, got {_show(vnode)}")
                ok = False
                continue
            if not vnode.value:
                self.err(vnode, path, "a thread needs at least one step")
                ok = False
                continue
            tsteps = self.step_list(vnode.value, path, key, memory, sites, declared)
            if tsteps is None:
                ok = False
            else:
                threads[key] = tsteps
        return None, (threads if ok else None)

    def step_list(self, nodes: list[Node], path: str, thread: str | None,
                  memory: dict[str, Mapping | None], sites: dict[str, tuple[str, int]],
                  declared: dict[str, int]) -> tuple[Step, ...] | None:
        """One list of steps (``steps`` or a thread's); ``declared`` collects every
        mapping name (memory and host_mmap) to catch duplicates across threads."""
        label = thread or ""
        names = _Names(dict.fromkeys(memory, 0), {})
        for name, (where, line) in sites.items():
            if name in memory:
                continue
            if where == label:
                names.elsewhere[name] = (f"does not exist yet here (host_mmap creates it "
                                         f"on line {line})")
            else:
                owner = f"thread {where!r}" if where else "the steps"
                names.elsewhere[name] = (f"belongs to {owner} (created on line {line}); a "
                                         "thread can use memory and its own host_mmap names")
        out: list[Step] = []
        ok = True
        for i, node in enumerate(nodes):
            step = self.step(node, f"{path}[{i}]", i, thread, names, declared)
            if step is None:
                ok = False
            else:
                out.append(step)
        return tuple(out) if ok else None

    def step_fields(self, op: str, names: _Names) -> tuple[dict[str, Parser], tuple[str, ...]]:
        """The keys of step kind ``op`` with their parsers, and the required ones."""
        keys = schema.STEPS_BY_OP[op].keys
        return self.fields(keys, names), self.required(keys)

    def step(self, node: Node, path: str, index: int, thread: str | None, names: _Names,
             declared: dict[str, int]) -> Step | None:
        kinds = tuple(STEP_TYPES)
        if not isinstance(node, MappingNode):
            self.err(node, path, f"a step must be a mapping like {{guest_read: {{...}}}}, "
                                 f"got {_show(node)}")
            return None
        kind: tuple[str, Node] | None = None
        expect_node: Node | None = None
        ok = True
        for key, knode, vnode in self.entries(node, path):
            if key == "expect":
                expect_node = vnode
            elif key in STEP_TYPES:
                if kind is not None:
                    self.err(knode, _join(path, key), f"a step has one kind, this one "
                                                      f"already is {kind[0]}")
                    ok = False
                else:
                    kind = (key, vnode)
            else:
                self.err(knode, _join(path, key), f"unknown step kind{_hint(key, kinds)} "
                                                  f"(step kinds: {_listing(kinds)})")
                ok = False
        if kind is None:
            if ok:
                self.err(node, path, f"no step kind given (one of {_listing(kinds)})",
                         at_end=True)
            return None
        op, args_node = kind
        fields, required = self.step_fields(op, names)
        apath = _join(path, op)
        rec = self.record(args_node, apath, fields, required, null_is_empty=True)
        if op == "host_mmap" and rec is not None and not self.check_mapping_size(
                rec, apath, allow_empty=True):
            rec = None
        if op == "host_mmap":
            self.declare(args_node, apath, names, declared)
        expect = None
        if expect_node is not None:
            try:
                expect = self.expect(expect_node, _join(path, "expect"), op, rec)
            except _Bad:
                ok = False
        if rec is None or not ok or not self.value_fits(op, rec, apath):
            return None
        if op == "set_memslot":
            args = self.memslot_args(rec, apath)
            if args is None:
                return None
        else:
            args = {key: value for key, (value, _) in rec.items()}
        cls = STEP_TYPES[op]
        return cls(index=index, line=_line(node), expect=expect, thread=thread, **args)

    def declare(self, args: Node, path: str, names: _Names, declared: dict[str, int]) -> None:
        """Make a host_mmap's name usable by the steps after it (and catch duplicates)."""
        if not isinstance(args, MappingNode):
            return
        for key, _, vnode in self.entries(args, path):
            if key != "name" or not isinstance(vnode, ScalarNode) or vnode.tag not in _STRINGISH:
                continue
            name = str(vnode.value)
            if name in declared:
                first = declared[name]
                where = f" on line {first}" if first else " in memory"
                self.err(vnode, _join(path, "name"),
                         f"duplicate mapping name {name!r} (already declared{where})")
                continue
            declared[name] = _line(vnode)
            names.known[name] = _line(vnode)
            names.elsewhere.pop(name, None)

    def value_fits(self, op: str, rec: dict[str, tuple[Any, Node]], path: str) -> bool:
        if "value" in rec:  # a store of ``size`` bytes: guest_write, host_write
            value, vnode = rec["value"]
            size = rec["size"][0]
            if value >> (8 * size):
                unit = "byte" if size == 1 else "bytes"
                self.err(vnode, _join(path, "value"),
                         f"{_show(vnode)} does not fit in {size} {unit}")
                return False
        return True

    # -- expectations --------------------------------------------------------------------

    def expect(self, node: Node, path: str, op: str,
               args: dict[str, tuple[Any, Node]] | None) -> dict[str, object]:
        """The ``expect`` mapping: outcome key -> value, checked against the outcome table."""
        keys = tuple(k.name for k in schema.EXPECT_KEYS)
        parsers = self.fields(schema.EXPECT_KEYS)
        if not isinstance(node, MappingNode):
            raise self.err(node, path, f"expected a mapping of outcome keys "
                                       f"({_listing(keys)}), got {_show(node)}")
        out: dict[str, object] = {}
        nodes: dict[str, Node] = {}
        ok = True
        for key, knode, vnode in self.entries(node, path):
            if key not in parsers:
                self.err(knode, _join(path, key),
                         f"unknown key{_hint(key, keys)} (outcome keys: {_listing(keys)})")
                ok = False
                continue
            try:
                out[key] = parsers[key](vnode, _join(path, key))
                nodes[key] = knode
            except _Bad:
                ok = False
        if not ok:
            raise _Bad()
        self.expect_consistent(out, nodes, path, op, args)
        return out

    def expect_consistent(self, out: dict[str, object], nodes: dict[str, Node], path: str,
                          op: str, args: dict[str, tuple[Any, Node]] | None) -> None:
        """Keys that no single outcome of ``op`` can carry together are a mistake."""
        result = out.get("result")
        if result in ("mmio", "fault") and op not in GUEST_STEPS:
            raise self.err(nodes["result"], _join(path, "result"),
                           f"{op} cannot end in {result!r} (only guest accesses do)")
        candidates = [result] if isinstance(result, str) else list(RESULTS)
        seen: list[str] = []
        for key in out:
            if key == "result":
                continue
            left = [r for r in candidates if key in RESULT_KEYS[r]]
            if not left:
                if isinstance(result, str):
                    allowed = _listing(RESULT_KEYS[result])
                    msg = f"an outcome with result {result!r} has no {key} (it has: {allowed})"
                else:
                    msg = f"{key} and {_listing(seen)} never appear in the same outcome"
                raise self.err(nodes[key], _join(path, key), msg)
            candidates = left
            seen.append(key)
        if "value" in out:
            if "value" not in STEP_TYPES[op].reports:
                raise self.err(nodes["value"], _join(path, "value"),
                               f"{op} reports no value (only {_reporters('value')} do)")
            if args is not None:
                size = args["size"][0]
                value = out["value"]
                assert isinstance(value, int)
                if value >> (8 * size):
                    unit = "byte" if size == 1 else "bytes"
                    raise self.err(nodes["value"], _join(path, "value"),
                                   f"{value:#x} does not fit in the {size} {unit} read")
        if "dirty" in out and "dirty" not in STEP_TYPES[op].reports:
            raise self.err(nodes["dirty"], _join(path, "dirty"),
                           f"{op} reports no dirty list (only {_reporters('dirty')} does)")

    def errno_name(self, node: Node, path: str) -> str:
        text = self.string(node, path)
        if text not in _ERRNO_NAMES:
            raise self.err(node, path, f"{_show(node)} is not an errno name "
                                       "(like EINVAL, EEXIST, EFAULT)")
        return text

    def signal_name(self, node: Node, path: str) -> str:
        text = self.string(node, path)
        if text not in _SIGNAL_NAMES:
            raise self.err(node, path, f"{_show(node)} is not a signal name "
                                       "(like SIGSEGV, SIGBUS)")
        return text

    def gfn_list(self, node: Node, path: str) -> list[int]:
        if not isinstance(node, SequenceNode):
            raise self.err(node, path, f"expected a list of gfns, got {_show(node)}")
        out: list[int] = []
        bad = False
        for i, item in enumerate(node.value):
            try:
                out.append(self.u64(item, f"{path}[{i}]"))
            except _Bad:
                bad = True
        if bad:
            raise _Bad()
        return out
