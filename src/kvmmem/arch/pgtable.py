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
number in 4 KiB units (:data:`kvmmem.types.PAGE_SHIFT`), whatever the
granule.  Table pages live at model physical addresses from
:data:`TABLE_BASE` (32 TiB) upwards so that a table entry's output address
names its child table; slot ``i`` is at ``TABLE_BASE + i * granule``.

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

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from enum import Enum
from typing import ClassVar, NamedTuple, NoReturn, TypeAlias

import numpy as np
from numpy.typing import NDArray

from kvmmem.errors import InputError
from kvmmem.types import PAGE_SHIFT, PAGE_SIZE, format_size

TABLE_BASE = 1 << 45
"""Model physical address of table slot 0 (32 TiB): far above the frames the
host model hands out, below every format's output-address limit."""

Table: TypeAlias = NDArray[np.uint64]


class MemAttr(Enum):
    """The memory type of a mapping, as KVM chooses it."""

    NORMAL = "normal"
    """RAM: Normal write-back (arm64 MemAttr 0b1111), EPT WB + ignore-PAT."""
    NORMAL_NC = "normal-nc"
    """Normal non-cacheable (arm64 ``VM_ALLOW_ANY_UNCACHED``; riscv PBMT=NC)."""
    DEVICE = "device"
    """Device memory: arm64 Device-nGnRE, EPT UC, riscv PBMT=IO."""

    # members are singletons: identity hashing (C level) keeps the encoding
    # cache lookup in map() cheap; Enum's own __hash__ is Python code
    __hash__ = object.__hash__


class Translation(NamedTuple):
    """One page's translation as the hardware walk yields it (what a TLB caches):
    the host ``pfn`` of the page and whether the leaf allows writes and
    instruction fetches.  A tuple, so ``pfn, writable, executable = t`` works."""

    pfn: int
    writable: bool
    executable: bool


class Perm(NamedTuple):
    """Stage-2 permissions."""

    read: bool = True
    write: bool = False
    execute: bool = False

    def __str__(self) -> str:
        return ("r" if self.read else "-") + ("w" if self.write else "-") + (
            "x" if self.execute else "-")


PERM_NONE = Perm(False, False, False)
PERM_R = Perm(True, False, False)
PERM_RW = Perm(True, True, False)
PERM_RX = Perm(True, False, True)
PERM_RWX = Perm(True, True, True)
_PERMS = {(r, w, x): Perm(r, w, x) for r in (False, True) for w in (False, True)
          for x in (False, True)}
"""The eight permission sets, shared (``Perm`` is immutable): ``map`` builds none."""


class Leaf(NamedTuple):
    """One valid leaf entry as a walk finds it.

    ``gpa``/``pfn``: from :meth:`Stage2.walk` the page-aligned address that
    was walked and the frame *it* maps; from :meth:`Stage2.for_each_leaf`
    the first address of the leaf and its first frame.  ``level`` is the
    architecture's own numbering (arm64 0-3 with 3 = page; x86 PG_LEVEL
    1 = 4K, 2 = 2M, 3 = 1G; riscv 0 = 4K, 1 = 2M, 2 = 1G).  ``raw`` is the
    entry as the hardware holds it."""

    gpa: int
    pfn: int
    size: int
    level: int
    perm: Perm
    attr: MemAttr
    young: bool
    dirty: bool
    raw: int
    accessible: bool
    """False when the hardware would fault on this entry although it is valid
    (arm64 access flag clear; riscv A clear without Svadu)."""

    @property
    def writable(self) -> bool:
        """The entry allows writes."""
        return self.perm.write

    @property
    def executable(self) -> bool:
        """The entry allows instruction fetches."""
        return self.perm.execute

    @property
    def device(self) -> bool:
        """Mapped uncached (Device or Normal-NC), i.e. not as normal RAM."""
        return self.attr is not MemAttr.NORMAL

    @property
    def valid_for_access(self) -> bool:
        """Alias of :attr:`accessible`."""
        return self.accessible

    @property
    def base_gpa(self) -> int:
        """First address the leaf maps."""
        return self.gpa & ~(self.size - 1)

    @property
    def base_pfn(self) -> int:
        """First frame the leaf maps."""
        return self.pfn - ((self.gpa & (self.size - 1)) >> PAGE_SHIFT)


class TlbiKind(Enum):
    """What a TLB invalidation covers."""

    ADDR = "addr"
    """One entry's translation (arm64 ``TLBI IPAS2E1IS`` + level hint, riscv
    ``HFENCE.GVMA`` of one gpa, x86 ``kvm_flush_remote_tlbs_gfn``)."""
    RANGE = "range"
    """A gpa range (``kvm_tlb_flush_vmid_range``, ``kvm_flush_remote_tlbs_range``)."""
    VM = "vm"
    """Everything of the VM (``__kvm_tlb_flush_vmid``, ``kvm_flush_remote_tlbs``)."""


class Tlbi(NamedTuple):
    """One TLB invalidation of ``[gpa, gpa + size)`` (VM: gpa 0, size 0)."""

    kind: TlbiKind
    gpa: int
    size: int


class PteWrite(NamedTuple):
    """One write of an entry: the entry translating ``[gpa, gpa + size)``
    (its position in the tree) changed from ``old`` to ``new``."""

    gpa: int
    size: int
    old: int
    new: int


HistoryEvent: TypeAlias = PteWrite | Tlbi


class WalkStep(NamedTuple):
    """One entry a hardware walk reads: its level, the table holding it, the
    index, the entry's own physical address and its value."""

    level: int
    table_pa: int
    idx: int
    entry_pa: int
    raw: int


@dataclass(slots=True)
class Counters:
    """What the engine did, cumulative since creation."""

    entries_written: int = 0
    tlbi_addr: int = 0
    tlbi_range: int = 0
    tlbi_vm: int = 0
    tables_allocated: int = 0
    tables_freed: int = 0
    table_bytes: int = 0
    """Bytes of table pages live now (root included), as the hardware sees them."""
    hw_ad_updates: int = 0
    """Access/dirty bits set by the hardware walker (:meth:`Stage2.hw_access`)."""
    unmap_skipped: int = 0
    """riscv: leaves an unmap only partly covered and left in place (WARN)."""

    def as_dict(self) -> dict[str, int]:
        """The counters by name."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


TlbiListener: TypeAlias = Callable[[Tlbi], None]


class Stage2:
    """A second-stage page table; subclassed per architecture.

    Construction is the subclass's business (it knows the format); this base
    provides the tree, the operations and the accounting.
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
        pa = pfn << PAGE_SHIFT
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
        pa = pfn << PAGE_SHIFT
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
        return self._make_leaf(gpa & ~(PAGE_SIZE - 1), pte, d, True)

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
        pa = ((pte & OAM) << RSH) + (gpa & ~(PAGE_SIZE - 1) & (size - 1))
        return Translation(pa >> PAGE_SHIFT, perm.write, perm.execute)

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
        return Leaf(gpa, pa >> PAGE_SHIFT, size, self.levels[d], perm, attr, young, dirty, pte,
                    accessible)

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
        """Gfns (4 KiB frames, clipped to the range) of every leaf whose
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
            lo = max(base, gpa) >> PAGE_SHIFT
            hi = min(base + self._size[d], end) >> PAGE_SHIFT
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
        return self._make_leaf(gpa & ~(PAGE_SIZE - 1), pte, d, True)

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

    def split_range(self, gpa: int, size: int, to_size: int = PAGE_SIZE) -> int:
        """Split every block meeting the range until its leaves are at most
        ``to_size``; returns entries written."""
        self._check_range(gpa, size, "split_range")
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

    def flush_tlb_gpa(self, gpa: int, size: int = PAGE_SIZE) -> None:
        """Record an invalidation of one entry's translation at ``gpa``."""
        self._tlbi(TlbiKind.ADDR, gpa & ~(size - 1), size)

    def flush_remote_tlbs_range(self, gpa: int, size: int) -> None:
        """``kvm_flush_remote_tlbs_range``: invalidate ``[gpa, gpa + size)``."""
        self._tlbi(TlbiKind.RANGE, gpa, size)

    def flush_remote_tlbs(self) -> None:
        """``kvm_flush_remote_tlbs``: invalidate everything of the VM."""
        self._tlbi(TlbiKind.VM)

    # --- history, accounting --------------------------------------------------------

    def record_history(self, on: bool = True) -> None:
        """Start (or stop) recording every entry write and TLBI in
        :attr:`history` (a fresh list); needed by ``validate_bbm``."""
        self.history = [] if on else None

    def validate_bbm(self) -> None:
        """:func:`kvmmem.arch.validate.validate_bbm` on this table's history."""
        from kvmmem.arch.validate import validate_bbm

        validate_bbm(self)

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


def tables_consistent(s2: Stage2) -> list[str]:
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


