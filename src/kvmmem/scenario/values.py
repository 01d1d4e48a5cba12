"""Scalar value checks of the scenario format, and the recording of mistakes.

:class:`_ValueChecker` holds what every check needs: the list of recorded
mistakes (the earliest is reported), the generic YAML structure (mapping
entries with merges applied, the pre-walk of every node) and one method per
kind of scalar value (integers, sizes, names, choices, protections...).  The
structural checker (:mod:`kvmmem.scenario.checker`) builds on it.
"""

from __future__ import annotations

import re
from typing import Final

from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from kvmmem.errors import InputError
from kvmmem.scenario.model import (
    ACCESS_SIZES,
    ENABLE_CAP_ARGS,
    GMEM_FLAGS,
    MEMORY_ATTRIBUTES,
    MEMSLOT_FLAGS,
    PROT_EXEC,
    PROT_NONE,
    PROT_READ,
    PROT_WRITE,
)
from kvmmem.scenario.nodes import (
    _BOOL,
    _FLOAT,
    _INT,
    _MAP,
    _MERGE,
    _SCALAR_TAGS,
    _SEQ,
    _STR,
    _STRINGISH,
    _Bad,
    _join,
    _line,
    _listing,
    _Names,
    _show,
    _tag,
)
from kvmmem.types import CPU_FEATURES, parse_size
from kvmmem.variants import VARIANTS, get_variant

_U32: Final = (1 << 32) - 1
_U64: Final = (1 << 64) - 1
_MAX_NUMBER_CHARS: Final = 80
_INT_RE = re.compile(r"([-+]?)(0b[01_]*|0x[0-9a-fA-F_]*|[0-9][0-9_]*)")


class _ValueChecker:
    """Records mistakes and reads scalar values; :class:`~kvmmem.scenario.checker._Checker`
    walks the schema's structure on top of it."""

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

    def mem_attributes(self, node: Node, path: str) -> tuple[str, ...]:
        return self.word_list(node, path, tuple(MEMORY_ATTRIBUTES), "memory attribute",
                              "a memory attribute")

    def cap_args(self, node: Node, path: str) -> tuple[int, ...]:
        """``enable_cap`` ``args``: at most :data:`ENABLE_CAP_ARGS` u64 values."""
        if not isinstance(node, SequenceNode):
            raise self.err(node, path, f"expected a list of at most {ENABLE_CAP_ARGS} "
                                       f"integers, got {_show(node)}")
        if len(node.value) > ENABLE_CAP_ARGS:
            raise self.err(node, path, f"struct kvm_enable_cap has {ENABLE_CAP_ARGS} args, "
                                       f"got {len(node.value)}")
        return tuple(self.u64_items(node, path))

    def gfn_list(self, node: Node, path: str) -> list[int]:
        if not isinstance(node, SequenceNode):
            raise self.err(node, path, f"expected a list of gfns, got {_show(node)}")
        return self.u64_items(node, path)

    def page_list(self, node: Node, path: str) -> tuple[int, ...]:
        """``clear_dirty_log`` ``pages``: distinct page numbers, sorted."""
        if not isinstance(node, SequenceNode):
            raise self.err(node, path, f"expected a list of page numbers, got {_show(node)}")
        return tuple(sorted(set(self.u64_items(node, path))))

    def u64_items(self, node: SequenceNode, path: str) -> list[int]:
        """Every item of a list as a u64, each mistake recorded (then _Bad)."""
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

    def gmem_flags(self, node: Node, path: str) -> tuple[str, ...]:
        return self.word_list(node, path, tuple(GMEM_FLAGS), "guest_memfd flag",
                              "a guest_memfd flag")

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
