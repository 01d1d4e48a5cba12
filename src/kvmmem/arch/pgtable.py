"""The page-table engine shared by the three stage-2 formats.

One :class:`Stage2` holds a radix tree of table pages exactly as the MMU
reads it: every table page is a ``numpy.uint64`` array of
``granule / 8`` entries (the root may be several concatenated pages), and
every entry is the integer the hardware would load - output address,
permission, memory-type, access/dirty and type bits in their architectural
places.  Nothing else describes a mapping: walking the tree *is* the
translation.

The architectures (:mod:`kvmmem.arch.arm64`, :mod:`~kvmmem.arch.x86`,
:mod:`~kvmmem.arch.riscv`) subclass :class:`Stage2` and supply the entry
format and the few places where the kernels behave differently (see
"Per-architecture behaviour" below).  Use :func:`kvmmem.arch.make_stage2`
to build one.

Addresses and frames
--------------------
``gpa`` is a guest physical address (IPA on arm64); ``pfn`` a host frame
number in units of the granule (``pa >> page_shift``): the granule is the host's
``PAGE_SIZE`` (arm64 stage-2 always uses it; x86 EPT and the riscv G-stage are 4 KiB,
as those hosts' pages are), so a pfn is the host's.  Table pages live at model
physical addresses from :data:`TABLE_BASE` (32 TiB) upwards so that a table entry's
output address names its child table; slot ``i`` is at ``TABLE_BASE + i * granule``.

The API (stable; the KVM core calls it with ``kvm->mmu_lock`` held)
--------------------------------------------------------------------
``map(gpa, pfn, size, prot, attr)``
    Install one leaf of ``size`` (a leaf size of the format) mapping
    ``[gpa, gpa + size)`` to ``pfn``; returns the number of entries written
    (0 when nothing changed).  Mirrors ``kvm_pgtable_stage2_map`` (arm64),
    ``kvm_tdp_mmu_map`` (x86) and ``kvm_riscv_gstage_map_page`` (riscv),
    including what each does with a larger block or a table already there.
``unmap_range(gpa, size)``
    Remove the leaves in the range; returns True when the caller still has to
    flush TLBs (x86 and riscv: ``kvm_flush_remote_tlbs_range``; arm64
    invalidates entry by entry itself and returns False, like
    ``kvm_unmap_gfn_range``).  ``unmap_all()`` drops everything.
``walk(gpa)``
    The hardware walk: a :class:`Leaf` (``pfn`` of ``gpa`` itself) or None.
``wrprotect_range``, ``test_clear_young``, ``collect_dirty``,
``relax_perms``, ``mkyoung``, ``hw_access``
    Permission and access/dirty bit updates.
``split(gpa)``, ``split_range(gpa, size)``, ``collapse(gpa, size)``
    Block <-> table conversions.
``for_each_leaf(start, end)``
    Leaves in gpa order; ``walk_path(gpa)`` every entry a walk reads.
``counters``
    :class:`Counters`: entries written, TLB invalidations by address, range
    and whole VM, tables allocated / freed and live table bytes.
``tlbi_listeners``
    Callables receiving every :class:`Tlbi` the engine issues (arm64's
    break-before-make invalidations happen inside ``map``/``unmap_range``;
    the vCPU TLB model subscribes here).  ``flush_tlb_gpa``,
    ``flush_remote_tlbs_range`` and ``flush_remote_tlbs`` record the flushes
    a caller requests.
``history``
    None, or (after ``record_history()``) the list of every entry write
    (:class:`PteWrite`) and invalidation (:class:`Tlbi`) in order, for
    :func:`kvmmem.arch.validate.validate_bbm`.

Per-architecture behaviour (class flags and hooks)
--------------------------------------------------
* mapping inside a larger block: arm64 breaks the block and installs an
  *empty* table (the rest of the block is faulted back lazily,
  ``stage2_map_walk_leaf``); x86 and riscv split the block into a full table
  first (``tdp_mmu_split_huge_page``, ``kvm_riscv_gstage_split_huge``);
* a valid entry changed to another valid entry: arm64 always goes
  valid -> invalid -> TLBI -> valid (break-before-make); x86 and riscv
  replace it in place and flush afterwards;
* a permission-only change through ``map``: arm64 writes nothing (-EAGAIN,
  use ``relax_perms``); riscv, mapping a block where a smaller leaf of the
  same (aligned) frame exists, only re-protects that leaf
  (``kvm_riscv_gstage_update_pte_prot``);
* unmapping: arm64 frees tables left empty (``stage2_unmap_walker``); x86
  zaps leaves only (``tdp_mmu_zap_leafs``), riscv too and it skips a leaf
  the range only partly covers (``kvm_riscv_gstage_unmap_range`` WARNs).

Errors: bad arguments (unaligned, outside the input-address range, a size
that is not a leaf size, an encoding the format cannot express) raise
:class:`kvmmem.errors.InputError` before anything changes.
"""

from __future__ import annotations

from typing import NoReturn

from kvmmem.arch.pgtable_tree import Stage2Tree, tables_consistent
from kvmmem.arch.pgtable_types import (
    _PERMS,
    PERM_NONE,
    PERM_R,
    PERM_RW,
    PERM_RWX,
    PERM_RX,
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
from kvmmem.arch.validate import validate_bbm
from kvmmem.errors import InputError
from kvmmem.types import format_size

__all__ = [
    "PERM_NONE",
    "PERM_R",
    "PERM_RW",
    "PERM_RWX",
    "PERM_RX",
    "TABLE_BASE",
    "Counters",
    "HistoryEvent",
    "Leaf",
    "MemAttr",
    "Perm",
    "PteWrite",
    "Stage2",
    "Stage2Tree",
    "Table",
    "Tlbi",
    "TlbiKind",
    "TlbiListener",
    "Translation",
    "WalkStep",
    "tables_consistent",
]
"""The engine's names, the types and the tree included (callers import them from
here)."""


class Stage2(Stage2Tree):
    """A second-stage page table; subclassed per architecture.

    The tree, its primitives and its walks are :class:`Stage2Tree`'s; this class
    adds the operations that change mappings (the API above).
    """

    # --- the API --------------------------------------------------------------------

    def map(
        self,
        gpa: int,
        pfn: int,
        size: int,
        prot: Perm | None = None,
        attr: MemAttr | None = None,
        *,
        prefetch: bool = False,
        host_writable: bool | None = None,
        read: bool = True,
        write: bool = False,
        execute: bool = False,
        device: bool = False,
        lookup: int | None = None,
    ) -> int:
        """Install one leaf mapping ``[gpa, gpa + size)`` to frames from ``pfn``.

        ``prot`` defaults to ``Perm(read, write, execute)``, ``attr`` to DEVICE
        if ``device`` else NORMAL.  ``prefetch`` (x86 ``make_spte``): the entry
        is made without the accessed bit.  ``host_writable`` (x86): the
        Host-writable software bit; defaults to ``prot.write``.  ``lookup``
        (riscv): the address ``kvm_riscv_gstage_map_page`` looks an existing
        leaf up at, its own gpa argument, which need not be aligned to ``size``
        (default ``gpa``).

        Returns the number of entries written (0 when the entry already said
        this, or on arm64 when it differs only in permissions: the kernel
        returns -EAGAIN there and the vCPU re-faults into ``relax_perms``).
        Raises InputError for an unaligned ``gpa``/``pfn``, a size that is not
        a leaf size, an address outside the IPA range or a pfn beyond the
        format's output-address width; nothing changes then.
        """
        if prot is None:
            prot = _PERMS.get((read, write, execute)) or Perm(read, write, execute)
        if attr is None:
            attr = MemAttr.DEVICE if device else MemAttr.NORMAL
        target = self._leaf_depth.get(size)
        pa = pfn << self.page_shift
        if target is None or (gpa | pa) & (size - 1) or gpa < 0 or gpa + size > self._limit \
                or pa >> self.max_pa_bits or pfn < 0:
            self._bad_map(gpa, pfn, size)
        assert target is not None
        bits = self._leaf_cache.get((prot, attr, target, prefetch, host_writable))
        if bits is None:
            bits = self._leaf_bits(prot, attr, target, prefetch, host_writable)
        new = bits | (pa >> self._RSH)
        c = self.counters
        before = c.entries_written
        self._map_pte(gpa, new, target, gpa if lookup is None else lookup)
        return c.entries_written - before

    def _bad_map(self, gpa: int, pfn: int, size: int) -> NoReturn:
        self.level_of_size(size)
        pa = pfn << self.page_shift
        if pfn < 0 or pa >> self.max_pa_bits:
            raise InputError(f"pfn: {pfn:#x} is beyond the {self.max_pa_bits}-bit output "
                             "address range")
        if (gpa | pa) & (size - 1):
            raise InputError(f"map: gpa {gpa:#x} and pfn {pfn:#x} must both be aligned to the "
                             f"{format_size(size)} leaf size")
        self._check_range(gpa, size, "map")
        raise InputError(f"map: cannot map {gpa:#x} -> pfn {pfn:#x} size {size:#x}")

    def _map_pte(self, gpa: int, new: int, target: int, lookup: int) -> None:
        """Descend to depth ``target`` for ``gpa`` (allocating tables, dealing
        with blocks on the way) and store the leaf ``new`` there (``lookup``:
        see :meth:`map`)."""
        tabs = self._tabs
        shifts = self._shift
        masks = self._mask
        sizes = self._size
        nvalid = self._nvalid
        V, TM, TV, OAM, RSH, TBS = self._V, self._TM, self._TV, self._OAM, self._RSH, self._tbs
        c = self.counters
        hist = self.history
        slot = 0
        t = tabs[0]
        assert t is not None
        d = 0
        while d < target:
            idx = (gpa >> shifts[d]) & masks[d]
            pte: int = t.item(idx)
            if not pte & V:
                child = self._alloc_table()
                tp = self._table_pte(child)
                t[idx] = tp
                c.entries_written += 1
                nvalid[slot] += 1
                if hist is not None:
                    sz = sizes[d]
                    hist.append(PteWrite(gpa & ~(sz - 1), sz, pte, tp))
                slot = child
            elif (pte & TM) == TV:
                slot = (((pte & OAM) << RSH) - TABLE_BASE) >> TBS
            else:
                slot = self._map_into_block(slot, idx, pte, d, gpa)
            t = tabs[slot]
            assert t is not None
            d += 1
        idx = (gpa >> shifts[d]) & masks[d]
        old: int = t.item(idx)
        if not old & V:
            t[idx] = new
            c.entries_written += 1
            nvalid[slot] += 1
            if hist is not None:
                sz = sizes[d]
                hist.append(PteWrite(gpa & ~(sz - 1), sz, old, new))
        elif self._is_table(old, d):
            self._map_over_table(slot, idx, old, new, d, gpa, lookup)
        else:
            self._map_over_leaf(slot, idx, old, new, d, gpa)

    # hooks for map(); the defaults are the x86 behaviour
    def _map_into_block(self, slot: int, idx: int, pte: int, d: int, gpa: int) -> int:
        """The walk for a smaller mapping met block ``pte`` at depth ``d``;
        returns the slot of the table that replaces it."""
        child = self._split_table(pte, d, gpa)
        self._write(slot, idx, pte, self._table_pte(child), gpa, d)
        return child

    def _map_over_table(self, slot: int, idx: int, old: int, new: int, d: int, gpa: int,
                        lookup: int) -> None:
        """``map`` found the table ``old`` where the block goes."""
        self._replace_table(slot, idx, old, new, d, gpa)

    def _replace_table(self, slot: int, idx: int, old: int, new: int, d: int, gpa: int) -> None:
        """The block ``new`` replaces the table ``old`` and everything below it
        (default, x86: in place, then flush the block's range)."""
        self._write(slot, idx, old, new, gpa, d)
        self._free_subtree(self._slot_of(old), d + 1)
        self._tlbi(TlbiKind.ADDR, gpa & ~(self._size[d] - 1), self._size[d])

    def _map_over_leaf(self, slot: int, idx: int, old: int, new: int, d: int, gpa: int) -> None:
        """A leaf replaces the valid leaf ``old`` of the same size."""
        if old == new:
            return
        self._write(slot, idx, old, new, gpa, d)
        self._tlbi(TlbiKind.ADDR, gpa & ~(self._size[d] - 1), self._size[d])

    # --- removal ---------------------------------------------------------------------

    def unmap_range(self, gpa: int, size: int, *, free_tables: bool | None = None) -> bool:
        """Remove every leaf meeting ``[gpa, gpa + size)``.

        Mirrors ``kvm_pgtable_stage2_unmap`` (arm64: each leaf broken with its
        own TLBI, empty tables freed), ``tdp_mmu_zap_leafs`` (x86: leaves only)
        and ``kvm_riscv_gstage_unmap_range`` (riscv: leaves only; a leaf the
        range covers only in part is skipped, as the kernel WARNs and skips
        it).  ``free_tables`` overrides whether tables left empty are freed.
        Returns True when the caller must still flush the range from the TLBs.
        Raises InputError outside the IPA range.
        """
        self._check_range(gpa, size, "unmap_range")
        free = self.FREES_EMPTY_TABLES if free_tables is None else free_tables
        # fast path: the range lies inside the extent of the entry ending the walk
        path = self._find_path(gpa)
        slot, idx, d, pte = path[-1]
        ext = self._size[d]
        base = gpa & ~(ext - 1)
        end = gpa + size
        if end > base + ext:
            return self._unmap_table(0, 0, 0, gpa, end, free)
        if not pte & self._V:
            return False
        if not self.UNMAP_PARTIAL_LEAVES and (base < gpa or base + ext > end):
            self.counters.unmap_skipped += 1
            return False
        flush = self._zap_leaf(slot, idx, pte, d, base)
        if free:
            for i in range(len(path) - 2, -1, -1):
                pslot, pidx, pd, ppte = path[i]
                child = path[i + 1][0]
                if self._nvalid[child]:
                    break
                flush |= self._zap_table(pslot, pidx, ppte, pd, gpa & ~(self._size[pd] - 1))
                self._release_table(child)
        return flush

    def _find_path(self, gpa: int) -> list[tuple[int, int, int, int]]:
        """Like ``_find`` but every (slot, index, depth, value) on the way."""
        out: list[tuple[int, int, int, int]] = []
        slot = 0
        d = 0
        while True:
            t = self._tab(slot)
            idx = (gpa >> self._shift[d]) & self._mask[d]
            pte: int = t.item(idx)
            out.append((slot, idx, d, pte))
            if not pte & self._V or not self._is_table(pte, d):
                return out
            slot = self._slot_of(pte)
            d += 1

    def _unmap_table(self, slot: int, d: int, tbase: int, start: int, end: int,
                     free: bool) -> bool:
        t = self._tab(slot)
        lo, hi = self._index_span(d, tbase, start, end)
        if lo > hi:
            return False
        sh = self._shift[d]
        sz = 1 << sh
        flush = False
        for idx in self._valid_indices(t, lo, hi):
            pte: int = t.item(idx)
            ebase = tbase + (idx << sh)
            if self._is_table(pte, d):
                child = self._slot_of(pte)
                flush |= self._unmap_table(child, d + 1, ebase, start, end, free)
                if free and self._nvalid[child] == 0:
                    flush |= self._zap_table(slot, idx, pte, d, ebase)
                    self._release_table(child)
            elif not self.UNMAP_PARTIAL_LEAVES and (ebase < start or ebase + sz > end):
                self.counters.unmap_skipped += 1
            else:
                flush |= self._zap_leaf(slot, idx, pte, d, ebase)
        return flush

    def _zap_leaf(self, slot: int, idx: int, pte: int, d: int, gpa: int) -> bool:
        """Clear one leaf; True if the caller must flush (default: no own TLBI)."""
        self._write(slot, idx, pte, self._EMPTY, gpa, d)
        return True

    def _zap_table(self, slot: int, idx: int, pte: int, d: int, gpa: int) -> bool:
        """Clear the entry of an empty table (the caller frees the table)."""
        self._write(slot, idx, pte, self._EMPTY, gpa, d)
        return True

    def unmap_all(self) -> bool:
        """Drop every mapping and every table below the root (x86
        ``kvm_mmu_zap_all``, arm64/riscv freeing the stage-2 tables); returns
        True if anything was mapped (the caller flushes the VM's TLBs; arm64
        has already invalidated the whole VMID)."""
        root = self._tab(0)
        valid = self._valid_indices(root, 0, self._mask[0])
        for idx in valid:
            pte: int = root.item(idx)
            self._write(0, idx, pte, self._EMPTY, idx << self._shift[0], 0)
            if self._is_table(pte, 0):
                self._free_subtree(self._slot_of(pte), 1)
        if valid and self.BREAK_BEFORE_MAKE:
            if not self.skip_tlbi:
                self._tlbi(TlbiKind.VM)
            return False
        return bool(valid)

    # --- attribute updates ---------------------------------------------------------

    def _update_leaves(self, start: int, end: int, set_bits: int, clear_bits: int,
                       only_if: int = 0) -> list[tuple[int, int, int]]:
        """Set/clear bits on every leaf meeting the range (leaves lacking all of
        ``only_if`` are skipped); returns (first gpa, depth, old value) of each
        leaf that changed."""
        changed: list[tuple[int, int, int]] = []
        for slot, idx, d, base, pte in list(self._iter_leaves(start, end)):
            if only_if and not pte & only_if:
                continue
            new = (pte | set_bits) & ~clear_bits
            if new != pte:
                self._write(slot, idx, pte, new, base, d)
                changed.append((base, d, pte))
        return changed

    def wrprotect_range(self, gpa: int, size: int) -> bool:
        """Remove write permission from every leaf meeting the range
        (``kvm_pgtable_stage2_wrprotect``, x86 ``wrprot_gfn_range``, riscv
        ``kvm_riscv_gstage_wp_range``); no TLBI here.  Returns True if any
        entry changed (the caller flushes)."""
        self._check_range(gpa, size, "wrprotect_range")
        return bool(self._update_leaves(gpa, gpa + size, 0, self._WRITE))

    def test_clear_young(self, gpa: int, size: int, clear: bool = True) -> bool:
        """``kvm_age_gfn`` (``clear``) / ``kvm_test_age_gfn``: whether any leaf
        meeting the range has its access flag set; with ``clear`` the flags are
        cleared (no TLBI, as in the kernel)."""
        self._check_range(gpa, size, "test_clear_young")
        if not clear:
            return any(pte & self._YOUNG for *_x, pte in self._iter_leaves(gpa, gpa + size))
        return bool(self._update_leaves(gpa, gpa + size, 0, self._YOUNG, self._YOUNG))

    def mkyoung(self, gpa: int) -> bool:
        """Set the access flag of the leaf translating ``gpa``
        (``kvm_pgtable_stage2_mkyoung``, arm64 ``handle_access_fault``);
        returns False if there is no leaf."""
        slot, idx, d, pte = self._find(gpa)
        if not pte & self._V or self._is_table(pte, d):
            return False
        if not pte & self._YOUNG:
            self._write(slot, idx, pte, pte | self._YOUNG, gpa, d)
        return True

    def collect_dirty(self, gpa: int, size: int, clear: bool = True) -> list[int]:
        """Gfns (granule-sized frames, clipped to the range) of every leaf whose
        hardware dirty bit is set (EPT D, riscv D; arm64 stage-2 has none
        that KVM uses, so none).  With ``clear`` the bits are cleared, as
        ``kvm_tdp_mmu_clear_dirty_slot`` does under PML."""
        self._check_range(gpa, size, "collect_dirty")
        if not self._DIRTY:
            return []
        end = gpa + size
        found = (self._update_leaves(gpa, end, 0, self._DIRTY, self._DIRTY) if clear else
                 [(b, d, p) for _s, _i, d, b, p in self._iter_leaves(gpa, end)
                  if p & self._DIRTY])
        out: list[int] = []
        for base, d, _pte in found:
            lo = max(base, gpa) >> self.page_shift
            hi = min(base + self._size[d], end) >> self.page_shift
            out.extend(range(lo, hi))
        return out

    def relax_perms(self, gpa: int, prot: Perm) -> bool:
        """Add the permissions in ``prot`` to the leaf translating ``gpa``
        (``kvm_pgtable_stage2_relax_perms``; x86 ``fast_page_fault`` making an
        MMU-writable entry writable; riscv ``kvm_riscv_gstage_update_pte_prot``).
        Permission-only: no break-before-make (the architecture allows it).
        Returns False if there is no leaf."""
        slot, idx, d, pte = self._find(gpa)
        if not pte & self._V or self._is_table(pte, d):
            return False
        set_bits, clear_bits = self._relax_bits(prot)
        new = (pte | set_bits) & ~clear_bits
        if new != pte:
            self._write(slot, idx, pte, new, gpa, d)
            self._after_relax(gpa, d)
        return True

    def _after_relax(self, gpa: int, d: int) -> None:
        """The invalidation (if any) after a permission relaxation."""

    def hw_access(self, gpa: int, write: bool) -> Leaf | None:
        """A guest access as the hardware walker performs it: the leaf (None on
        a translation fault), after setting its accessed bit and, for a write
        to a writable entry, its dirty bit (EPT A/D, arm64 hardware AF,
        riscv Svadu).  Permission checks are the caller's."""
        slot, idx, d, pte = self._find(gpa)
        if not pte & self._V or self._is_table(pte, d):
            return None
        new = pte | self._YOUNG
        if write and pte & self._WRITE:
            new |= self._DIRTY
        if new != pte:
            t = self._tab(slot)
            t[idx] = new
            self.counters.hw_ad_updates += 1
            pte = new
        return self._make_leaf(gpa & ~(self.granule - 1), pte, d, True)

    # --- block <-> table ----------------------------------------------------------

    def split(self, gpa: int) -> int:
        """Split the block translating ``gpa`` into a table of next-level
        leaves mapping the same memory (eager splitting:
        ``kvm_pgtable_stage2_split``, ``tdp_mmu_split_huge_page``,
        ``kvm_riscv_gstage_split_huge``).  Returns entries written; 0 if no
        block translates ``gpa``."""
        self._check_range(gpa, 1, "split")
        slot, idx, d, pte = self._find(gpa)
        if not pte & self._V or d == self._last or self._is_table(pte, d):
            return 0
        before = self.counters.entries_written
        child = self._split_table(pte, d, gpa)
        self._link_split(slot, idx, pte, child, d, gpa)
        return self.counters.entries_written - before

    def _link_split(self, slot: int, idx: int, old: int, child: int, d: int, gpa: int) -> None:
        """Replace block ``old`` by the populated table ``child`` (default:
        in place, no flush - the translation is unchanged)."""
        self._write(slot, idx, old, self._table_pte(child), gpa, d)

    def split_range(self, gpa: int, size: int, to_size: int | None = None) -> int:
        """Split every block meeting the range until its leaves are at most
        ``to_size`` (default: the granule); returns entries written."""
        self._check_range(gpa, size, "split_range")
        if to_size is None:
            to_size = self.granule
        written = 0
        again = True
        while again:
            again = False
            for _slot, _idx, d, base, _pte in list(self._iter_leaves(gpa, gpa + size)):
                if self._size[d] > to_size and d < self._last:
                    written += self.split(base)
                    again = True
        return written

    def collapse(self, gpa: int, size: int) -> int:
        """Replace the table covering the ``size``-aligned block around ``gpa``
        by one block leaf of ``size``, if every page of the block is mapped by
        smaller leaves that together map one aligned, contiguous physical
        range with the same permissions and attributes.  The block's accessed
        and dirty bits are the OR of the leaves'.  (x86
        ``kvm_mmu_recover_huge_pages``; on arm64 and riscv the kernel gets the
        same result by mapping the block over the table.)  Returns entries
        written; 0 when the block cannot be formed."""
        self.level_of_size(size)
        base = gpa & ~(size - 1)
        self._check_range(base, size, "collapse")
        d = self._leaf_depth[size]
        # find the table entry at depth d
        tabs = self._tabs
        slot = 0
        for depth in range(d):
            t = tabs[slot]
            assert t is not None
            pte: int = t.item((base >> self._shift[depth]) & self._mask[depth])
            if not pte & self._V or not self._is_table(pte, depth):
                return 0
            slot = self._slot_of(pte)
        t = self._tab(slot)
        idx = (base >> self._shift[d]) & self._mask[d]
        old: int = t.item(idx)
        if not old & self._V or not self._is_table(old, d):
            return 0
        leaves = list(self._iter_table(self._slot_of(old), d + 1, base, base, base + size))
        total = sum(self._size[ld] for _s, _i, ld, _b, _p in leaves)
        if total != size:
            return 0
        ad = self._YOUNG | self._DIRTY
        first = leaves[0][4]
        pa0 = self._pa_of(first)
        if pa0 & (size - 1):
            return 0
        ref = (first & ~self._OAM & ~self._TYPE_MASK) & ~ad
        flags = 0
        for _s, _i, _ld, lbase, pte in leaves:
            if (pte & ~self._OAM & ~self._TYPE_MASK) & ~ad != ref:
                return 0
            if self._pa_of(pte) - pa0 != lbase - base:
                return 0
            flags |= pte & ad
        new = ref | flags | self._type_bits[d] | (pa0 >> self._RSH)
        before = self.counters.entries_written
        self._replace_table(slot, idx, old, new, d, base)
        return self.counters.entries_written - before

    # --- flushes a caller requests ----------------------------------------------------

    def flush_tlb_gpa(self, gpa: int, size: int | None = None) -> None:
        """Record an invalidation of one entry's translation at ``gpa`` (``size``:
        the entry's, default the granule)."""
        if size is None:
            size = self.granule
        self._tlbi(TlbiKind.ADDR, gpa & ~(size - 1), size)

    def flush_remote_tlbs_range(self, gpa: int, size: int) -> None:
        """``kvm_flush_remote_tlbs_range``: invalidate ``[gpa, gpa + size)``."""
        self._tlbi(TlbiKind.RANGE, gpa, size)

    def flush_remote_tlbs(self) -> None:
        """``kvm_flush_remote_tlbs``: invalidate everything of the VM."""
        self._tlbi(TlbiKind.VM)

    def validate_bbm(self) -> None:
        """:func:`kvmmem.arch.validate.validate_bbm` on this table's history."""
        validate_bbm(self)
