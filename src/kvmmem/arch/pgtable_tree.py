"""The radix tree under every stage-2 format, and the walks that read it.

:class:`Stage2Tree` holds the table pages (``numpy.uint64`` arrays, the root
possibly several concatenated pages), the format's entry layout, the
entry-level primitives every operation is made of (allocate and free a table,
write an entry, issue a TLBI, break an entry: ``stage2_try_break_pte``, split a
block into a table) and the hardware walk (``walk``, ``translate``,
``walk_path``, ``for_each_leaf``: the ``kvm_pgtable_walk`` /
``kvm_pgtable_get_leaf`` side).  :func:`tables_consistent` checks the tree's
structure.  The operations that change mappings (``map``, ``unmap_range``, the
attribute updates, split and collapse) are :class:`kvmmem.arch.pgtable.Stage2`'s;
the module docstring there describes the engine as a whole.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import ClassVar

import numpy as np

from kvmmem.arch.pgtable_types import (
    TABLE_BASE,
    Counters,
    HistoryEvent,
    Leaf,
    MemAttr,
    Perm,
    PteWrite,
    Table,
    Tlbi,
    TlbiKind,
    TlbiListener,
    Translation,
    WalkStep,
)
from kvmmem.errors import InputError
from kvmmem.types import format_size


class Stage2Tree:
    """The tree of a second-stage page table and its read-only walks; the base of
    :class:`kvmmem.arch.pgtable.Stage2`, which adds the operations that change it.

    Construction is the subclass's business (it knows the format); this base
    provides the tree, the entry-level primitives, the walks and the accounting.
    """

    arch: ClassVar[str] = "generic"
    # --- behaviour switches, set by the subclasses -------------------------
    FREES_EMPTY_TABLES: ClassVar[bool] = False
    """``unmap_range`` frees tables it leaves empty (arm64)."""
    UNMAP_PARTIAL_LEAVES: ClassVar[bool] = True
    """``unmap_range`` removes a leaf the range covers only in part."""
    BREAK_BEFORE_MAKE: ClassVar[bool] = False
    """Valid entries are changed through invalid + TLBI (arm64)."""


    # --- construction ---------------------------------------------------------

    def __init__(
        self,
        *,
        granule: int,
        ia_bits: int,
        nlevels: int,
        level_numbers: list[int],
        leaf_depths: list[int],
        valid_mask: int,
        table_mask: int,
        table_value: int,
        oa_mask: int,
        oa_rshift: int,
        empty: int,
        table_bits: int,
        young_bit: int,
        dirty_bit: int,
        write_bit: int,
        type_bits: list[int],
        type_mask: int,
        max_pa_bits: int,
        record_history: bool = False,
    ) -> None:
        if granule not in (4096, 16384, 65536):
            raise InputError(f"granule: {granule} is not 4K, 16K or 64K")
        page_shift = granule.bit_length() - 1
        bits = page_shift - 3
        shifts = [page_shift + (nlevels - 1 - d) * bits for d in range(nlevels)]
        if not shifts[0] < ia_bits <= shifts[0] + bits + 4:
            raise InputError(
                f"ipa_bits: {ia_bits} bits cannot be translated by {nlevels} levels of "
                f"{granule // 1024}K tables")
        self.granule = granule
        self.page_shift = page_shift
        self.ipa_bits = ia_bits
        self.nlevels = nlevels
        self.levels = tuple(level_numbers)
        self.max_pa_bits = max_pa_bits
        self._shift = shifts
        self._size = [1 << s for s in shifts]
        per_table = 1 << bits
        root_entries = 1 << (ia_bits - shifts[0])
        self._mask = [root_entries - 1] + [per_table - 1] * (nlevels - 1)
        self.entries_per_table = per_table
        self.root_entries = root_entries
        self.root_pages = max(1, root_entries // per_table)
        self._leaf_depth = {self._size[d]: d for d in leaf_depths}
        self.leaf_sizes = tuple(sorted(self._leaf_depth))
        self._last = nlevels - 1
        self._limit = 1 << ia_bits
        # --- format ------------------------------------------------------------
        self._V = valid_mask
        self._TM = table_mask
        self._TV = table_value
        self._OAM = oa_mask
        self._RSH = oa_rshift
        self._EMPTY = empty
        self._TBITS = table_bits
        self._YOUNG = young_bit
        self._DIRTY = dirty_bit
        self._WRITE = write_bit
        self._type_bits = type_bits
        self._TYPE_MASK = type_mask
        self._np_valid = np.uint64(valid_mask)
        # --- the tree --------------------------------------------------------------
        self._tbs = page_shift  # table slot shift: slot i at TABLE_BASE + (i << _tbs)
        self._tabs: list[Table | None] = []
        self._nvalid: list[int] = []
        self._free: list[int] = []
        self.counters = Counters()
        self.history: list[HistoryEvent] | None = None
        self.tlbi_listeners: list[TlbiListener] = []
        self.skip_tlbi = False
        """Mutation switch: the engine's own invalidations (arm64 BBM) are not
        issued (the ``no-tlb-flush`` variant)."""
        self._leaf_cache: dict[tuple[Perm, MemAttr, int, bool, bool | None], int] = {}
        self._decode_cache: dict[int, tuple[Perm, MemAttr, bool, bool, bool]] = {}
        root = self._new_array(self.root_pages * per_table)
        self._tabs.append(root)
        self._nvalid.append(0)
        for _ in range(self.root_pages - 1):
            self._tabs.append(None)
            self._nvalid.append(0)
        self.counters.tables_allocated += self.root_pages
        self.counters.table_bytes += self.root_pages * granule
        if record_history:
            self.record_history()

    # --- format hooks (subclasses) -------------------------------------------

    def _encode_leaf(self, prot: Perm, attr: MemAttr, depth: int, prefetch: bool,
                     host_writable: bool | None) -> int:
        """The non-address bits of a leaf at ``depth``; raises InputError."""
        raise NotImplementedError

    def _decode_leaf(self, bits: int) -> tuple[Perm, MemAttr, bool, bool, bool]:
        """(perm, attr, young, dirty, accessible) of a leaf's non-address bits."""
        raise NotImplementedError

    def _relax_bits(self, prot: Perm) -> tuple[int, int]:
        """(bits to set, bits to clear) that add the permissions in ``prot``."""
        raise NotImplementedError

    def describe_entry(self, raw: int, level: int) -> str:
        """The decoded fields of entry ``raw`` at ``level`` (printer)."""
        raise NotImplementedError

    def level_of_size(self, size: int) -> int:
        """The architecture's level number of a leaf of ``size``; InputError if none."""
        d = self._leaf_depth.get(size)
        if d is None:
            raise InputError(f"size: {format_size(size)} is not a {self.arch} stage-2 leaf size "
                             f"(allowed: {', '.join(format_size(s) for s in self.leaf_sizes)})")
        return self.levels[d]

    def size_of_level(self, level: int) -> int:
        """Bytes one entry at architecture level ``level`` translates."""
        return self._size[self.levels.index(level)]

    # --- small helpers ------------------------------------------------------------

    def _new_array(self, n: int) -> Table:
        if self._EMPTY:
            return np.full(n, self._EMPTY, dtype=np.uint64)
        return np.zeros(n, dtype=np.uint64)

    def _alloc_table(self) -> int:
        arr = self._new_array(self.entries_per_table)
        if self._free:
            slot = self._free.pop()
            self._tabs[slot] = arr
            self._nvalid[slot] = 0
        else:
            slot = len(self._tabs)
            self._tabs.append(arr)
            self._nvalid.append(0)
        c = self.counters
        c.tables_allocated += 1
        c.table_bytes += self.granule
        return slot

    def _release_table(self, slot: int) -> None:
        self._tabs[slot] = None
        self._nvalid[slot] = 0
        self._free.append(slot)
        c = self.counters
        c.tables_freed += 1
        c.table_bytes -= self.granule

    def _table_pte(self, slot: int) -> int:
        return self._TBITS | ((TABLE_BASE + (slot << self._tbs)) >> self._RSH)

    def _slot_of(self, pte: int) -> int:
        return (((pte & self._OAM) << self._RSH) - TABLE_BASE) >> self._tbs

    def _pa_of(self, pte: int) -> int:
        return (pte & self._OAM) << self._RSH

    def _is_table(self, pte: int, d: int) -> bool:
        return d < self._last and (pte & self._TM) == self._TV

    def _tab(self, slot: int) -> Table:
        t = self._tabs[slot]
        assert t is not None
        return t

    def _write(self, slot: int, idx: int, old: int, new: int, gpa: int, d: int) -> None:
        """Store ``new`` at ``idx`` of table ``slot`` (depth ``d``, entry for ``gpa``)."""
        t = self._tabs[slot]
        assert t is not None
        t[idx] = new
        self.counters.entries_written += 1
        V = self._V
        if old & V:
            if not new & V:
                self._nvalid[slot] -= 1
        elif new & V:
            self._nvalid[slot] += 1
        if self.history is not None:
            size = self._size[d]
            self.history.append(PteWrite(gpa & ~(size - 1), size, old, new))

    def _tlbi(self, kind: TlbiKind, gpa: int = 0, size: int = 0) -> None:
        c = self.counters
        if kind is TlbiKind.ADDR:
            c.tlbi_addr += 1
        elif kind is TlbiKind.RANGE:
            c.tlbi_range += 1
        else:
            c.tlbi_vm += 1
            gpa = size = 0
        if self.history is None and not self.tlbi_listeners:
            return
        ev = Tlbi(kind, gpa, size)
        if self.history is not None:
            self.history.append(ev)
        for fn in self.tlbi_listeners:
            fn(ev)

    def _break(self, slot: int, idx: int, old: int, gpa: int, d: int) -> None:
        """Break-before-make, first half: invalidate the entry, then the TLB
        (by address and level for a leaf, by range for a table:
        ``stage2_try_break_pte``)."""
        size = self._size[d]
        base = gpa & ~(size - 1)
        self._write(slot, idx, old, self._EMPTY, base, d)
        if self.skip_tlbi:
            return
        if self._is_table(old, d):
            self._tlbi(TlbiKind.RANGE, base, size)
        else:
            self._tlbi(TlbiKind.ADDR, base, size)

    def _free_subtree(self, slot: int, d: int) -> None:
        """Free table ``slot`` (entries at depth ``d``) and every table below it,
        without writing their entries (the kernel frees an unlinked table,
        ``kvm_pgtable_stage2_free_unlinked`` / ``handle_removed_pt``)."""
        if d < self._last:
            t = self._tab(slot)
            valid = np.flatnonzero(t & self._np_valid)
            if valid.size:
                vals = t[valid]
                tables = vals[(vals & np.uint64(self._TM)) == np.uint64(self._TV)]
                for pte in tables.tolist():
                    self._free_subtree(self._slot_of(pte), d + 1)
        self._release_table(slot)

    def _leaf_bits(self, prot: Perm, attr: MemAttr, d: int, prefetch: bool = False,
                   host_writable: bool | None = None) -> int:
        key = (prot, attr, d, prefetch, host_writable)
        bits = self._leaf_cache.get(key)
        if bits is None:
            bits = self._leaf_cache[key] = self._encode_leaf(prot, attr, d, prefetch,
                                                             host_writable)
        return bits

    def _child_leaf_base(self, pte: int, d: int) -> int:
        """The first child entry at depth ``d + 1`` of block ``pte`` (same
        attributes, next level's type bits)."""
        attrs = (pte & ~self._OAM & ~self._TYPE_MASK) | self._type_bits[d + 1]
        return attrs | (pte & self._OAM)

    def _split_table(self, pte: int, d: int, gpa: int) -> int:
        """A new table holding the ``entries_per_table`` leaves that together map
        what block ``pte`` (depth ``d``, covering ``gpa``) maps; returns its slot.
        The child entries are written before the table is linked."""
        slot = self._alloc_table()
        t = self._tab(slot)
        n = self.entries_per_table
        step = self._size[d + 1] >> self._RSH
        first = self._child_leaf_base(pte, d)
        t[:] = np.uint64(first) + np.arange(n, dtype=np.uint64) * np.uint64(step)
        self._nvalid[slot] = n
        self.counters.entries_written += n
        if self.history is not None:
            csize = self._size[d + 1]
            base = gpa & ~(self._size[d] - 1)
            empty = self._EMPTY
            self.history.extend(
                PteWrite(base + i * csize, csize, empty, first + i * step) for i in range(n))
        return slot

    def _find(self, gpa: int) -> tuple[int, int, int, int]:
        """Walk to the entry that ends the walk for ``gpa``: a leaf, an invalid
        entry, or the last-level entry.  Returns (slot, index, depth, value)."""
        tabs = self._tabs
        shifts = self._shift
        masks = self._mask
        V, TM, TV, OAM, RSH, TBS = self._V, self._TM, self._TV, self._OAM, self._RSH, self._tbs
        last = self._last
        slot = 0
        d = 0
        while True:
            idx = (gpa >> shifts[d]) & masks[d]
            pte: int = tabs[slot].item(idx)  # type: ignore[union-attr]
            if not pte & V or d == last or (pte & TM) != TV:
                return slot, idx, d, pte
            slot = (((pte & OAM) << RSH) - TABLE_BASE) >> TBS
            d += 1

    def _check_range(self, gpa: int, size: int, what: str) -> None:
        if size <= 0 or gpa < 0 or gpa + size > self._limit:
            raise InputError(
                f"{what}: [{gpa:#x}, {gpa + size:#x}) is outside the {self.ipa_bits}-bit "
                "input address range")

    # --- lookups ----------------------------------------------------------------------

    def walk(self, gpa: int) -> Leaf | None:
        """The hardware walk for ``gpa``: the leaf translating it (``pfn`` of
        ``gpa``'s own page) or None (translation fault).  Raises InputError
        outside the IPA range."""
        if gpa < 0 or gpa >= self._limit:
            raise InputError(f"walk: gpa {gpa:#x} is outside the {self.ipa_bits}-bit IPA range")
        _slot, _idx, d, pte = self._find(gpa)
        if not pte & self._V or self._is_table(pte, d):
            return None
        return self._make_leaf(gpa & ~(self.granule - 1), pte, d, True)

    def translate(self, gpa: int, young: bool = False) -> Translation | None:
        """What a TLB caches from :meth:`walk`: the :class:`Translation`
        ``(pfn, writable, executable)`` of ``gpa``'s page, or None when the walk
        faults (no valid leaf, or one the hardware cannot use:
        :attr:`Leaf.accessible` false).  ``gpa`` must be inside the IPA range
        (the caller checks it).

        ``young``: a walk that succeeds then sets the leaf's accessed flag, as
        :meth:`hw_access` for a read does (one walk instead of two)."""
        tabs = self._tabs
        shifts = self._shift
        masks = self._mask
        V, TM, TV, OAM, RSH, TBS = self._V, self._TM, self._TV, self._OAM, self._RSH, self._tbs
        last = self._last
        slot = 0
        d = 0
        while True:  # _find, ending at a leaf only
            idx = (gpa >> shifts[d]) & masks[d]
            pte: int = tabs[slot].item(idx)  # type: ignore[union-attr]
            if not pte & V:
                return None
            if d == last or (pte & TM) != TV:
                break
            slot = (((pte & OAM) << RSH) - TABLE_BASE) >> TBS
            d += 1
        bits = pte & ~OAM
        dec = self._decode_cache.get(bits)
        if dec is None:
            dec = self._decode_cache[bits] = self._decode_leaf(bits)
        if not dec[4]:
            return None
        if young:
            new = pte | self._YOUNG
            if new != pte:  # hw_access(gpa, False)
                tabs[slot][idx] = new  # type: ignore[index]
                self.counters.hw_ad_updates += 1
        perm = dec[0]
        size = self._size[d]
        shift = self.page_shift
        pa = ((pte & OAM) << RSH) + (gpa & (size - 1))
        return Translation(pa >> shift, perm.write, perm.execute)

    def _make_leaf(self, gpa: int, pte: int, d: int, offset: bool) -> Leaf:
        bits = pte & ~self._OAM
        dec = self._decode_cache.get(bits)
        if dec is None:
            dec = self._decode_cache[bits] = self._decode_leaf(bits)
        size = self._size[d]
        pa = (pte & self._OAM) << self._RSH
        if offset:
            pa += gpa & (size - 1)
        perm, attr, young, dirty, accessible = dec
        return Leaf(gpa, pa >> self.page_shift, size, self.levels[d], perm, attr, young, dirty,
                    pte, accessible, self.page_shift)

    def walk_path(self, gpa: int) -> list[WalkStep]:
        """Every entry the hardware reads to translate ``gpa``, root first
        (the last one is the leaf, an invalid entry, or a last-level entry)."""
        if gpa < 0 or gpa >= self._limit:
            raise InputError(f"walk: gpa {gpa:#x} is outside the {self.ipa_bits}-bit IPA range")
        out: list[WalkStep] = []
        slot = 0
        d = 0
        while True:
            t = self._tab(slot)
            idx = (gpa >> self._shift[d]) & self._mask[d]
            pte: int = t.item(idx)
            tpa = TABLE_BASE + (slot << self._tbs)
            out.append(WalkStep(self.levels[d], tpa, idx, tpa + 8 * idx, pte))
            if not self._is_table(pte, d) or not pte & self._V:
                return out
            slot = self._slot_of(pte)
            d += 1

    def _iter_leaves(self, start: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
        """(slot, index, depth, first gpa, value) of each valid leaf meeting
        ``[start, end)``, in gpa order."""
        yield from self._iter_table(0, 0, 0, start, end)

    def _valid_indices(self, t: Table, lo: int, hi: int) -> list[int]:
        if hi - lo < 8:
            V = self._V
            return [i for i in range(lo, hi + 1) if t.item(i) & V]
        seg = t[lo:hi + 1]
        out: list[int] = (np.flatnonzero(seg & self._np_valid) + lo).tolist()
        return out

    def _index_span(self, d: int, tbase: int, start: int, end: int) -> tuple[int, int]:
        sh = self._shift[d]
        span = (self._mask[d] + 1) << sh
        lo = (max(start, tbase) - tbase) >> sh
        hi = (min(end, tbase + span) - 1 - tbase) >> sh
        return lo, hi

    def _iter_table(self, slot: int, d: int, tbase: int, start: int, end: int
                    ) -> Iterator[tuple[int, int, int, int, int]]:
        t = self._tab(slot)
        lo, hi = self._index_span(d, tbase, start, end)
        if lo > hi:
            return
        sh = self._shift[d]
        for idx in self._valid_indices(t, lo, hi):
            pte: int = t.item(idx)
            ebase = tbase + (idx << sh)
            if self._is_table(pte, d):
                yield from self._iter_table(self._slot_of(pte), d + 1, ebase, start, end)
            else:
                yield slot, idx, d, ebase, pte

    def for_each_leaf(self, start: int = 0, end: int | None = None) -> Iterator[Leaf]:
        """Every valid leaf meeting ``[start, end)`` in gpa order; ``gpa`` and
        ``pfn`` of each are the leaf's first address and frame."""
        stop = self._limit if end is None else min(end, self._limit)
        for _slot, _idx, d, base, pte in self._iter_leaves(max(0, start), stop):
            yield self._make_leaf(base, pte, d, False)

    # --- history, accounting --------------------------------------------------------

    def record_history(self, on: bool = True) -> None:
        """Start (or stop) recording every entry write and TLBI in
        :attr:`history` (a fresh list); needed by ``validate_bbm``."""
        self.history = [] if on else None


    @property
    def tables_live(self) -> int:
        """Table pages allocated now, root pages included."""
        return self.counters.tables_allocated - self.counters.tables_freed

    def model_bytes(self) -> int:
        """Bytes of Python memory the tree takes in this model: the arrays
        (data and object headers) and the per-table bookkeeping."""
        total = sys.getsizeof(self._tabs) + sys.getsizeof(self._nvalid) + sys.getsizeof(
            self._free)
        for t in self._tabs:
            if t is not None:
                total += sys.getsizeof(t)
        small = 256  # CPython caches ints up to 256
        total += sum(sys.getsizeof(n) for n in self._nvalid if n > small)
        return total

    def __repr__(self) -> str:
        return (f"<{type(self).__name__} ipa_bits={self.ipa_bits} granule={self.granule} "
                f"levels={self.nlevels} tables={self.tables_live}>")

    # for the printer
    def entry_kind(self, raw: int, level: int) -> str:
        """``invalid``, ``table`` or ``leaf`` for entry ``raw`` at ``level``."""
        d = self.levels.index(level)
        if not raw & self._V:
            return "invalid"
        return "table" if self._is_table(raw, d) else "leaf"

    def depth_of_level(self, level: int) -> int:
        """Position (0 = root) of architecture level ``level``."""
        return self.levels.index(level)

    def iter_entries(self) -> Iterator[tuple[int, int, int, int]]:
        """(level, first gpa, entry physical address, value) of every valid
        entry, tables before their children, in gpa order."""
        yield from self._iter_entries(0, 0, 0)

    def _iter_entries(self, slot: int, d: int, tbase: int) -> Iterator[tuple[int, int, int, int]]:
        t = self._tab(slot)
        sh = self._shift[d]
        tpa = TABLE_BASE + (slot << self._tbs)
        for idx in self._valid_indices(t, 0, self._mask[d]):
            pte: int = t.item(idx)
            ebase = tbase + (idx << sh)
            yield self.levels[d], ebase, tpa + 8 * idx, pte
            if self._is_table(pte, d):
                yield from self._iter_entries(self._slot_of(pte), d + 1, ebase)


def tables_consistent(s2: Stage2Tree) -> list[str]:
    """Structural problems of ``s2``'s tree (empty list when sound): every
    linked table is live and linked once, valid counts match, leaves sit at
    leaf levels with aligned output addresses, accounting matches."""
    problems: list[str] = []
    seen: dict[int, int] = {}

    def visit(slot: int, d: int, tbase: int) -> None:
        t = s2._tabs[slot]
        if t is None:
            problems.append(f"table slot {slot} at depth {d} is linked but freed")
            return
        n = 0
        sh = s2._shift[d]
        for idx in range(s2._mask[d] + 1):
            pte: int = t.item(idx)
            if not pte & s2._V:
                if pte != s2._EMPTY and d > 0:
                    problems.append(f"invalid entry {pte:#x} at depth {d} is not the empty value")
                continue
            n += 1
            ebase = tbase + (idx << sh)
            if s2._is_table(pte, d):
                child = s2._slot_of(pte)
                if child in seen:
                    problems.append(f"table slot {child} linked twice")
                    continue
                seen[child] = d + 1
                visit(child, d + 1, ebase)
            else:
                if d not in s2._leaf_depth.values():
                    problems.append(f"leaf at gpa {ebase:#x} on depth {d}, not a leaf level")
                if s2._pa_of(pte) & (s2._size[d] - 1):
                    problems.append(f"leaf at gpa {ebase:#x}: output address not aligned")
        if n != s2._nvalid[slot]:
            problems.append(f"table slot {slot}: {n} valid entries, counted {s2._nvalid[slot]}")

    seen[0] = 0
    visit(0, 0, 0)
    live = sum(1 for t in s2._tabs if t is not None)
    linked = len(seen)
    if live != linked:
        problems.append(f"{live} table pages live but {linked} reachable from the root")
    expect = (live + s2.root_pages - 1) * s2.granule
    if s2.counters.table_bytes != expect:
        problems.append(f"table_bytes {s2.counters.table_bytes} != {expect}")
    if s2.tables_live != live + s2.root_pages - 1:
        problems.append(f"tables_live {s2.tables_live} != {live + s2.root_pages - 1}")
    return problems
