"""State fingerprints: a canonical encoding of everything an execution holds.

The explorer is a stateless model checker (executions are replayed from
scratch), but it still needs to know when two interleavings reach the *same*
state: to count distinct states, to prune an interleaving that converges on a
state already explored (``dpor``), and to tell whether a transition changed
any shared data at all (the independence relation of the sleep sets).

:class:`Canon` walks an object graph generically - ``__slots__`` and
``__dict__`` fields in declaration order, containers in iteration order,
``array``/``numpy`` buffers as bytes, suspended generators as their code,
instruction offset and locals - and emits a flat token list; shared objects
are encoded once and referred to by visit number afterwards, so aliasing is
part of the encoding.  Dict insertion order is kept (two states that differ
only in it are *different* states: sound, if slightly less reduction).

What is left out, on purpose: counters and event logs (``stats``,
``counters``, ``log`` attributes), which the model only ever adds to and
never reads back to decide anything, and memoisation caches (see
:data:`SKIPPED_ATTRIBUTES`).  Objects registered as *opaque*
(the scenario and its steps, the execution driving the threads) stand for
themselves by registration number.

The digest is a 128-bit BLAKE2b of the pickled token list: stable across
processes (no ``hash()`` of strings), so worker processes and Dask workers
agree on state identities.
"""

from __future__ import annotations

import array
import copyreg
import enum
import hashlib
import io
import pickle
import types
from typing import Any

import numpy as np
from sortedcontainers import SortedDict, SortedList, SortedSet

SKIPPED_ATTRIBUTES = frozenset({"stats", "counters", "log", "_vmacache", "_leaf_cache",
                                "_decode_cache", "_last_used_slot", "fault_wait",
                                "unmarked_dirty", "update_in_flight", "changes_in_flight"})
"""Attributes never part of a state: append-only statistics and event logs,
pure memoisation caches (the last VMA found, entry encodings, a vCPU's
last memslot found) whose content depends on which lookups happened, not on
the state, and the in-flight bookkeeping the model publishes for the
explorer (a vCPU's fault wait and unmarked dirty gfn, the memslot update
and the mm changes in progress), which follows from where threads are
paused (``Vcpu.__getstate__`` leaves the vCPU's out of pickles too)."""

_PRIMITIVES: frozenset[type] = frozenset({int, float, str, bytes, bool, type(None)})
_FIELDS: dict[type, tuple[str, ...]] = {}


def _slot_fields(cls: type) -> tuple[str, ...]:
    names = _FIELDS.get(cls)
    if names is None:
        seen: list[str] = []
        for klass in reversed(cls.__mro__):
            slots = klass.__dict__.get("__slots__", ())
            if isinstance(slots, str):
                slots = (slots,)
            for name in slots:
                if name in ("__dict__", "__weakref__") or name in SKIPPED_ATTRIBUTES:
                    continue
                if name not in seen:
                    seen.append(name)
        names = _FIELDS[cls] = tuple(seen)
    return names


class Canon:
    """One canonical encoding in progress.

    ``opaque`` objects are encoded as ``("K", index)``; call :meth:`walk` on
    each root in a fixed order, then :meth:`digest` (or :meth:`mark` /
    :meth:`digest_upto` for the digest of a prefix of the roots)."""

    __slots__ = ("memo", "opaque", "out")

    def __init__(self, opaque: dict[int, int]) -> None:
        self.memo: dict[int, int] = {}
        self.opaque = opaque
        self.out: list[Any] = []

    def mark(self) -> int:
        """The current length of the token list (a prefix boundary)."""
        return len(self.out)

    def digest(self, start: int = 0, end: int | None = None) -> bytes:
        """128-bit digest of the tokens ``[start, end)``."""
        tokens = self.out[start:end] if start or end is not None else self.out
        return hashlib.blake2b(pickle.dumps(tokens, 4), digest_size=16).digest()

    def walk(self, obj: Any) -> None:
        """Append the encoding of ``obj`` (recursively)."""
        out = self.out
        cls = type(obj)
        if cls in _PRIMITIVES:
            out.append(obj)
            return
        if cls is tuple:
            out.append(("T", len(obj)))
            for item in obj:
                self.walk(item)
            return
        key = id(obj)
        index = self.opaque.get(key)
        if index is not None:
            out.append(("K", index))
            return
        index = self.memo.get(key)
        if index is not None:
            out.append(("@", index))
            return
        self.memo[key] = len(self.memo)
        if cls is list:
            out.append(("L", len(obj)))
            for item in obj:
                self.walk(item)
        elif cls is dict:
            out.append(("D", len(obj)))
            for k, v in obj.items():
                self.walk(k)
                self.walk(v)
        elif cls is array.array:
            out.append(("A", obj.typecode, obj.tobytes()))
        elif cls is np.ndarray:
            out.append(("N", obj.dtype.str, obj.shape, obj.tobytes()))
        elif cls is bytearray:
            out.append(("B", bytes(obj)))
        elif cls is types.GeneratorType:
            self._generator(obj)
        elif cls is types.MethodType:
            out.append(("M", obj.__func__.__qualname__))
            self.walk(obj.__self__)
        elif cls in (set, frozenset):
            out.append(("S", len(obj)))
            for item in sorted(obj, key=repr):
                self.walk(item)
        elif isinstance(obj, enum.Enum):
            out.append(("E", cls.__qualname__, obj.name))
        elif isinstance(obj, np.generic):
            out.append(("n", obj.dtype.str, obj.item()))
        elif cls in (types.FunctionType, types.BuiltinFunctionType, type):
            out.append(("F", getattr(obj, "__module__", ""), obj.__qualname__))
        elif isinstance(obj, SortedDict):
            # content only: the internal load-balanced lists depend on history
            out.append(("SD", len(obj)))
            for k, v in obj.items():
                self.walk(k)
                self.walk(v)
        elif isinstance(obj, SortedList | SortedSet):
            out.append(("SL", len(obj)))
            for item in obj:
                self.walk(item)
        elif isinstance(obj, dict):  # other dict subclasses
            out.append(("d", cls.__qualname__, len(obj)))
            for k, v in obj.items():
                self.walk(k)
                self.walk(v)
            self._fields(obj, cls)
        elif isinstance(obj, list):
            out.append(("l", cls.__qualname__, len(obj)))
            for item in obj:
                self.walk(item)
            self._fields(obj, cls)
        else:
            out.append(("O", cls.__module__, cls.__qualname__))
            self._fields(obj, cls)

    def _fields(self, obj: Any, cls: type) -> None:
        out = self.out
        for name in _slot_fields(cls):
            self.walk(getattr(obj, name, None))
        attrs = getattr(obj, "__dict__", None)
        if attrs:
            for name, value in attrs.items():
                if name not in SKIPPED_ATTRIBUTES:
                    out.append(name)
                    self.walk(value)

    def _generator(self, gen: types.GeneratorType[Any, Any, Any]) -> None:
        """A suspended generator: its code, where it stopped, its locals and
        the generator it is delegating to (``yield from``)."""
        frame = gen.gi_frame
        code = gen.gi_code
        if frame is None:
            self.out.append(("G", code.co_filename, code.co_qualname, -1))
            return
        self.out.append(("G", code.co_filename, code.co_qualname, frame.f_lasti))
        self.walk(frame.f_locals)
        self.walk(gen.gi_yieldfrom)


# --- the fast path: C pickle with a few reducers -------------------------------------------


def _opaque(key: object) -> object:  # pragma: no cover - only named in pickles, never called
    return key


def _generator(*where: object) -> object:  # pragma: no cover - likewise
    return where


def _without_skipped(cls_name: str) -> object:  # pragma: no cover - likewise
    return cls_name


def _reduce_generator(gen: types.GeneratorType[Any, Any, Any]) -> tuple[Any, ...]:
    frame = gen.gi_frame
    code = gen.gi_code
    if frame is None:
        return (_generator, (code.co_filename, code.co_qualname, -1))
    # (callable, args, state): pickle memoises the generator before its state,
    # so a frame that refers back to it costs one reference
    return (_generator, (code.co_filename, code.co_qualname, frame.f_lasti),
            (frame.f_locals, gen.gi_yieldfrom))


def _reduce_skipping(obj: Any) -> tuple[Any, ...]:
    state = {k: v for k, v in getattr(obj, "__dict__", {}).items()
             if k not in SKIPPED_ATTRIBUTES}
    for name in _slot_fields(type(obj)):
        state[name] = getattr(obj, name, None)
    return (_without_skipped, (type(obj).__qualname__,), state)


def _reducer_leaving_out(names: frozenset[str]) -> Any:
    """A reducer like :func:`_reduce_skipping` that also leaves out ``names``."""
    def reduce(obj: Any) -> tuple[Any, ...]:
        state = {k: v for k, v in getattr(obj, "__dict__", {}).items()
                 if k not in SKIPPED_ATTRIBUTES and k not in names}
        for name in _slot_fields(type(obj)):
            if name not in names:
                state[name] = getattr(obj, name, None)
        return (_without_skipped, (type(obj).__qualname__,), state)
    return reduce


class StatePickler:
    """The same canonical encoding as :class:`Canon`, done by the C pickler:
    objects are encoded field by field with pickle's memo for aliasing, and
    ``reducers`` replace what must not be encoded as is - generators become
    their code, offset, locals and delegate; classes that carry counters or
    logs lose them (``leave_out``: and the fields named); ``opaque`` types (the
    scenario, its steps, the execution) become a fixed key.  About three times
    faster than :class:`Canon`; an object graph pickle cannot encode raises (the
    caller falls back)."""

    def __init__(self, opaque: dict[type, Any], skipping: tuple[type, ...],
                 leave_out: dict[type, frozenset[str]] | None = None) -> None:
        table: dict[type, Any] = dict(copyreg.dispatch_table)
        table[types.GeneratorType] = _reduce_generator
        for cls in skipping:
            table[cls] = _reduce_skipping
        for cls, names in (leave_out or {}).items():
            table[cls] = _reducer_leaving_out(names)
        for cls, key_of in opaque.items():
            table[cls] = (lambda f: (lambda obj: (_opaque, (f(obj),))))(key_of)
        self.table = table

    def digests(self, data_roots: tuple[Any, ...], rest: tuple[Any, ...]) -> tuple[bytes, bytes]:
        """``(digest of data_roots, digest of data_roots + rest)``."""
        buf = io.BytesIO()
        pickler = pickle.Pickler(buf, 4)
        pickler.dispatch_table = self.table
        pickler.dump(data_roots)
        cut = buf.tell()
        pickler.dump(rest)
        view = buf.getbuffer()
        data = hashlib.blake2b(view[:cut], digest_size=16).digest()
        full = hashlib.blake2b(view, digest_size=16).digest()
        view.release()
        return data, full
