"""The host page table: PMD slots holding either a PTE table or a huge leaf.

Two levels are modelled, as KVM sees them through ``host_pfn_mapping_level``:

* a PMD slot per ``PMD_SIZE`` of virtual address space (key ``hva >> PMD_SHIFT``)
  holding either a **PTE table** (an ``array('q')`` of ``PTRS_PER_PTE`` entries, 8 bytes
  per page: lean enough for 10^6 pages) or a **huge leaf** (an int: a PMD-sized THP or
  hugetlb mapping, ``pmd_trans_huge`` / ``pmd_leaf``);
* an entry is ``pfn << 12 | bits`` (a model encoding: the pfn in host pages whatever
  their size); 0 is ``pte_none``.

The geometry is the host's (:class:`~kvmmem.types.PageGeometry`, ``PageTable.pg``): with
4 KiB pages a PMD maps 2 MiB through 512 PTEs, with arm64's 16 KiB pages 32 MiB through
2048, with 64 KiB pages 512 MiB through 8192.

PTE tables are allocated on the first fault in their 2 MiB (``__pte_alloc``)
and freed by munmap (``free_pgtables``) or when a MADV_DONTNEED zap of a
whole 2 MiB leaves them empty (``CONFIG_PT_RECLAIM``, x86-64 since v6.14).
Whether a slot is populated matters: a THP can only be faulted into an
empty PMD slot (``pmd_none``), and mprotect notifies only for populated PUDs.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from kvmmem.types import PAGE_SIZE, PAGES_4K, PMD_SIZE, PageGeometry, Pfn

# PTE bits (model encoding, not an architecture's)
PTE_PRESENT = 1 << 0
"""Maps a frame (also set for PROT_NONE entries, which hardware cannot use)."""
PTE_WRITE = 1 << 1
PTE_DIRTY = 1 << 2
PTE_YOUNG = 1 << 3
"""The accessed bit (``pte_young``)."""
PTE_SPECIAL = 1 << 4
"""``pte_special``: no refcounted struct page behind it (zero page, PFNMAP)."""
PTE_PROTNONE = 1 << 5
"""``pte_protnone``: present but inaccessible (PROT_NONE VMA)."""
PTE_MIGRATION = 1 << 6
"""A migration entry (non-present; faults wait for the migration to end)."""
PTE_PUD = 1 << 7
"""Part of a PUD leaf (``pud_leaf``: a 1 GiB special PFNMAP entry that
``vmf_insert_pfn_pud`` installed, v6.12, x86).  The model holds it as the PMD slots it
covers, each a huge leaf of its own frames with this bit; they are made, cleared and
changed together (:func:`kvmmem.host.huge_memory.split_huge_pud_op`)."""
PFN_SHIFT = 12
PTE_FLAGS_MASK = (1 << PFN_SHIFT) - 1

PTRS_PER_PTE = 512
"""With 4 KiB pages (``PageTable.ptrs_per_pte`` for the host's)."""
PAGE_MASK = ~(PAGE_SIZE - 1)
"""With 4 KiB pages (``pg.page_mask`` for the host's)."""
HPAGE_MASK = ~(PMD_SIZE - 1)
"""With 4 KiB pages (``pg.hpage_mask`` for the host's)."""

Table = array  # array('q') of PTRS_PER_PTE entries


@dataclass(frozen=True, slots=True)
class HostPte:
    """What the host page table holds for one address (``pte_t`` / ``pmd_t`` decoded).

    ``pfn`` is the frame behind the address (what GUP returns; inside a PMD leaf
    the subpage), ``huge_size`` the leaf size (``PAGE_SIZE`` or ``PMD_SIZE``) and
    :attr:`leaf_pfn` the leaf's own frame (``pte_pfn`` / ``pmd_pfn``); ``page_shift``
    the host's ``PAGE_SHIFT``."""

    pfn: Pfn
    writable: bool
    dirty: bool
    young: bool
    huge_size: int
    special: bool
    protnone: bool
    page_shift: int = 12

    @property
    def leaf_pfn(self) -> Pfn:
        """The first frame of the leaf (``pmd_pfn`` for a PMD mapping)."""
        return Pfn(self.pfn & ~((self.huge_size >> self.page_shift) - 1))


def decode(entry: int, hva: int, huge: bool, pg: PageGeometry = PAGES_4K) -> HostPte | None:
    """The :class:`HostPte` of ``entry`` (a PTE, or a PMD leaf if ``huge``) seen at ``hva``
    on a host of page geometry ``pg``; None if not present."""
    if not entry & PTE_PRESENT:
        return None
    pfn = entry >> PFN_SHIFT
    if huge:
        pfn += (hva & (pg.pmd_size - 1)) >> pg.page_shift
    return HostPte(
        pfn=Pfn(pfn),
        writable=bool(entry & PTE_WRITE),
        dirty=bool(entry & PTE_DIRTY),
        young=bool(entry & PTE_YOUNG),
        huge_size=(pg.pud_size if entry & PTE_PUD else pg.pmd_size) if huge
        else pg.page_size,
        special=bool(entry & PTE_SPECIAL),
        protnone=bool(entry & PTE_PROTNONE),
        page_shift=pg.page_shift,
    )


class PageTable:
    """The page table of one address space: PMD index -> PTE table or huge leaf.

    ``pg`` is the host's page geometry; ``page_shift``, ``pmd_shift``, ``pte_mask``
    (``PTRS_PER_PTE - 1``) and ``pmd_size`` are its numbers the walks use."""

    __slots__ = ("_empty", "page_shift", "pg", "pmd", "pmd_shift", "pmd_size", "pte_mask")

    def __init__(self, pg: PageGeometry = PAGES_4K) -> None:
        self.pmd: dict[int, array[int] | int] = {}
        self.pg = pg
        self.page_shift = pg.page_shift
        self.pmd_shift = pg.pmd_shift
        self.pmd_size = pg.pmd_size
        self.pte_mask = pg.ptrs_per_pte - 1
        self._empty = array("q", [0]) * pg.ptrs_per_pte

    def new_table(self, idx: int) -> array[int]:
        """``__pte_alloc``: an empty PTE table at PMD index ``idx``."""
        tbl = self._empty[:]
        self.pmd[idx] = tbl
        return tbl

    def entry(self, hva: int) -> tuple[int, bool]:
        """``(entry, is_huge_leaf)`` mapping ``hva``; ``(0, False)`` when none."""
        slot = self.pmd.get(hva >> self.pmd_shift)
        if slot is None:
            return 0, False
        if isinstance(slot, int):
            return slot, True
        return slot[(hva >> self.page_shift) & self.pte_mask], False

    def view(self, tbl: array[int]) -> npt.NDArray[np.int64]:
        """A writable numpy view of a PTE table."""
        return np.frombuffer(tbl, dtype=np.int64)

    def indices(self, start: int, end: int) -> list[int]:
        """PMD indices with a slot in ``[start, end)`` (addresses), ascending."""
        lo = start >> self.pmd_shift
        hi = (end - 1) >> self.pmd_shift
        if hi - lo + 1 <= len(self.pmd):
            return [i for i in range(lo, hi + 1) if i in self.pmd]
        return sorted(i for i in self.pmd if lo <= i <= hi)

    def pud_populated(self, pud: int) -> bool:
        """Some PMD slot exists in the PUD-sized region ``pud`` (``!pud_none``: 1 GiB with
        4 KiB pages)."""
        n = 1 << (self.pg.pud_shift - self.pmd_shift)
        lo = pud * n
        if len(self.pmd) < n:
            return any(lo <= i < lo + n for i in self.pmd)
        return any(i in self.pmd for i in range(lo, lo + n))

    def snapshot(self) -> tuple[object, ...]:
        """A comparable picture: every huge leaf and every non-empty PTE table.

        Empty PTE tables are left out: the kernel, too, leaves one behind after
        a fault that failed (``__pte_alloc`` ran before the handler said SIGBUS)."""
        out: list[object] = []
        for idx in sorted(self.pmd):
            slot = self.pmd[idx]
            if isinstance(slot, int):
                out.append((idx, "huge", slot))
            else:
                arr = np.frombuffer(slot, dtype=np.int64)
                nz = np.flatnonzero(arr)
                if nz.size:
                    out.append((idx, "table", nz.tobytes() + arr[nz].tobytes()))
        return tuple(out)


# --- helpers on a page table (what the fault path, user accesses and GUP read) ------


def set_pte(pt: PageTable, hva: int, entry: int) -> None:
    """``set_pte_at``: store ``entry`` in the PTE for ``hva``, allocating the PTE table
    (``__pte_alloc``) when the PMD slot holds none."""
    idx = hva >> pt.pmd_shift
    slot = pt.pmd.get(idx)
    if slot is None or isinstance(slot, int):
        slot = pt.new_table(idx)
    slot[(hva >> pt.page_shift) & pt.pte_mask] = entry


def present_pfn(pt: PageTable, addr: int, write: bool) -> int:
    """The pfn an access at ``addr`` can use right now, or -1: the entry is
    present, not PROT_NONE, not a migration entry, and writable for a write."""
    slot = pt.pmd.get(addr >> pt.pmd_shift)
    if slot is None:
        return -1
    if isinstance(slot, int):
        e = slot
        sub = (addr >> pt.page_shift) & pt.pte_mask
    else:
        e = slot[(addr >> pt.page_shift) & pt.pte_mask]
        sub = 0
    if not e & PTE_PRESENT or e & (PTE_PROTNONE | PTE_MIGRATION) or (
            write and not e & PTE_WRITE):
        return -1
    return (e >> PFN_SHIFT) + sub


def touch_pte(pt: PageTable, addr: int, write: bool) -> None:
    """The MMU sets the accessed (and dirty) bit of the entry used."""
    idx = addr >> pt.pmd_shift
    slot = pt.pmd.get(idx)
    bits = PTE_YOUNG | (PTE_DIRTY if write else 0)
    if isinstance(slot, int):
        pt.pmd[idx] = slot | bits
    elif slot is not None:
        i = (addr >> pt.page_shift) & pt.pte_mask
        slot[i] |= bits


def mapping_size(pt: PageTable, addr: int) -> int:
    """``host_pfn_mapping_level`` as bytes: ``PUD_SIZE`` / ``PMD_SIZE`` for a huge leaf,
    ``PAGE_SIZE`` for a PTE, 0 when nothing usable is present (none, or a migration
    entry)."""
    e, huge = pt.entry(addr)
    if not e & PTE_PRESENT or e & PTE_MIGRATION:
        return 0
    if huge:
        return pt.pg.pud_size if e & PTE_PUD else pt.pmd_size
    return 1 << pt.page_shift


def pud_slot_range(pt: PageTable, idx: int) -> range:
    """The PMD indices of the PUD-sized region that PMD index ``idx`` lies in."""
    n = 1 << (pt.pg.pud_shift - pt.pmd_shift)
    lo = idx & ~(n - 1)
    return range(lo, lo + n)
