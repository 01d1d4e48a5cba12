"""Consistency checks for stage-2 tables, kept apart from the fast paths.

* :func:`validate_bbm` - DESIGN.md invariant 7 (arm64 break-before-make) over
  the recorded history of entry writes and TLB invalidations;
* :func:`validate_tables` - the tree is structurally sound and its
  accounting matches.

Both raise :class:`kvmmem.errors.ValidationError` and change nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from kvmmem.arch.arm64_pte import BBM_RELAXABLE, KVM_PTE_TYPE, KVM_PTE_VALID
from kvmmem.arch.pgtable_tree import Stage2Tree, tables_consistent
from kvmmem.arch.pgtable_types import HistoryEvent, PteWrite, Tlbi, TlbiKind
from kvmmem.errors import ValidationError

INVARIANT = "break-before-make"


@dataclass(slots=True)
class BbmState:
    """Where an incremental :func:`validate_bbm` stopped: the next history
    index and the entries broken but not yet invalidated."""

    cursor: int = 0
    pending: dict[tuple[int, int], tuple[int, int]] = field(default_factory=dict)
    """(gpa, size) -> (history index of the break, old value)."""


def _is_leaf(value: int, size: int, granule: int) -> bool:
    return size == granule or not value & KVM_PTE_TYPE


def _fmt(value: int) -> str:
    return f"{value:#018x}"


def check_bbm_events(events: Sequence[HistoryEvent], state: BbmState, *,
                     granule: int = 4096, relaxable: int = BBM_RELAXABLE) -> None:
    """Check ``events[state.cursor:]`` and advance ``state``; raises
    ValidationError at the first violation.

    The rules (Arm ARM, "Using break-before-make when updating translation
    table entries"):

    * a valid entry may be overwritten by a valid entry only if nothing but
      ``relaxable`` bits (S2AP, XN, AF, DBM, software bits) changes;
    * once a valid entry has been made invalid, a TLB invalidation must
      cover it before a new valid entry may translate any of its addresses:
      for a leaf, an invalidation by address inside it, a range meeting it or
      the whole VM; for a table (whose leaves may be cached), a range
      covering all of it or the whole VM.
    """
    pending = state.pending
    for i in range(state.cursor, len(events)):
        ev = events[i]
        if isinstance(ev, Tlbi):
            if ev.kind is TlbiKind.VM:
                pending.clear()
                continue
            lo, hi = ev.gpa, ev.gpa + ev.size
            done = []
            for (g, s), (_j, old) in pending.items():
                if ev.kind is TlbiKind.ADDR:
                    hit = g <= ev.gpa < g + s and _is_leaf(old, s, granule)
                elif _is_leaf(old, s, granule):
                    hit = g < hi and lo < g + s
                else:
                    hit = lo <= g and g + s <= hi
                if hit:
                    done.append((g, s))
            for key in done:
                del pending[key]
            continue
        assert isinstance(ev, PteWrite)
        old_valid = bool(ev.old & KVM_PTE_VALID)
        new_valid = bool(ev.new & KVM_PTE_VALID)
        where = f"entry for [{ev.gpa:#x}, {ev.gpa + ev.size:#x})"
        if old_valid and new_valid:
            changed = (ev.old ^ ev.new) & ~relaxable
            if changed:
                state.cursor = i
                raise ValidationError(
                    INVARIANT,
                    f"history[{i}]: {where} changed from {_fmt(ev.old)} to {_fmt(ev.new)} "
                    f"(bits {changed:#x} differ: output address, type or attributes) without "
                    "an invalid entry and a TLB invalidation in between")
        elif old_valid:
            pending[(ev.gpa, ev.size)] = (i, ev.old)
        elif new_valid:
            leaf = _is_leaf(ev.new, ev.size, granule)
            for (g, s), (j, old) in pending.items():
                same = (g, s) == (ev.gpa, ev.size)
                overlap = g < ev.gpa + ev.size and ev.gpa < g + s
                if same or (leaf and overlap):
                    state.cursor = i
                    raise ValidationError(
                        INVARIANT,
                        f"history[{i}]: {where} made valid ({_fmt(ev.new)}) while the entry "
                        f"for [{g:#x}, {g + s:#x}) invalidated at history[{j}] (was "
                        f"{_fmt(old)}) has had no covering TLB invalidation")
    state.cursor = len(events)


def validate_bbm(obj: Stage2Tree | Sequence[HistoryEvent], *, granule: int = 4096) -> None:
    """Invariant 7: no valid -> valid change of output address, type or size
    without invalid + TLBI in between.

    ``obj`` is a :class:`Stage2` (arm64 only; other architectures have no such
    rule and pass; checked incrementally from where the last call stopped,
    over :attr:`Stage2.history`, which must be recording - else nothing is
    checked) or a plain sequence of :class:`PteWrite` / :class:`Tlbi` events
    (``granule``: the table's page size).  Raises ValidationError.
    """
    if isinstance(obj, Stage2Tree):
        if not obj.BREAK_BEFORE_MAKE or obj.history is None:
            return
        state: BbmState | None = getattr(obj, "_bbm_state", None)
        if state is None or state.cursor > len(obj.history):
            state = BbmState()
            obj._bbm_state = state  # type: ignore[attr-defined]
        check_bbm_events(obj.history, state, granule=obj.granule)
        return
    check_bbm_events(obj, BbmState(), granule=granule)


def validate_tables(s2: Stage2Tree) -> None:
    """The tree is sound: linked tables live and linked once, valid-entry
    counts right, leaves only at leaf levels with aligned output addresses,
    table accounting matching.  Raises ValidationError."""
    problems = tables_consistent(s2)
    if problems:
        raise ValidationError("stage2-tables", "; ".join(problems[:5]))
