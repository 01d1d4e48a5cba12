"""The host page table: PMD slots holding either a PTE table or a huge leaf.

Two levels are modelled, as KVM sees them through ``host_pfn_mapping_level``:

* a PMD slot per 2 MiB of virtual address space (key ``hva >> 21``) holding
  either a **PTE table** (an ``array('q')`` of 512 entries, 8 bytes per page:
  lean enough for 10^6 pages) or a **huge leaf** (an int: THP or hugetlb
  2 MiB mapping, ``pmd_trans_huge`` / ``pmd_leaf``);
* an entry is ``pfn << 12 | bits``; 0 is ``pte_none``.

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

from kvmmem.types import PAGE_SHIFT, PAGE_SIZE, PMD_SIZE, Pfn

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
PFN_SHIFT = 12
PTE_FLAGS_MASK = (1 << PFN_SHIFT) - 1

PTRS_PER_PTE = 512
PAGE_MASK = ~(PAGE_SIZE - 1)
HPAGE_MASK = ~(PMD_SIZE - 1)
_EMPTY = array("q", [0]) * PTRS_PER_PTE

Table = array  # array('q') of PTRS_PER_PTE entries


@dataclass(frozen=True, slots=True)
class HostPte:
    """What the host page table holds for one address (``pte_t`` / ``pmd_t`` decoded).

    ``pfn`` is the 4 KiB frame behind the address (what GUP returns; inside a
    2 MiB leaf the subpage), ``huge_size`` the leaf size (4096 or 2 MiB) and
    :attr:`leaf_pfn` the leaf's own frame (``pte_pfn`` / ``pmd_pfn``)."""

    pfn: Pfn
    writable: bool
    dirty: bool
    young: bool
    huge_size: int
    special: bool
    protnone: bool

    @property
    def leaf_pfn(self) -> Pfn:
        """The first frame of the leaf (``pmd_pfn`` for a 2 MiB mapping)."""
        return Pfn(self.pfn & ~((self.huge_size >> PAGE_SHIFT) - 1))


def decode(entry: int, hva: int, huge: bool) -> HostPte | None:
    """The :class:`HostPte` of ``entry`` (a PTE, or a PMD leaf if ``huge``) seen at ``hva``;
    None if not present."""
    if not entry & PTE_PRESENT:
        return None
    pfn = entry >> PFN_SHIFT
    if huge:
        pfn += (hva & (PMD_SIZE - 1)) >> PAGE_SHIFT
    return HostPte(
        pfn=Pfn(pfn),
        writable=bool(entry & PTE_WRITE),
        dirty=bool(entry & PTE_DIRTY),
        young=bool(entry & PTE_YOUNG),
        huge_size=PMD_SIZE if huge else PAGE_SIZE,
        special=bool(entry & PTE_SPECIAL),
        protnone=bool(entry & PTE_PROTNONE),
    )


class PageTable:
    """The page table of one address space: PMD index -> PTE table or huge leaf."""

    __slots__ = ("pmd",)

    def __init__(self) -> None:
        self.pmd: dict[int, array[int] | int] = {}

    def new_table(self, idx: int) -> array[int]:
        """``__pte_alloc``: an empty PTE table at PMD index ``idx``."""
        tbl = _EMPTY[:]
        self.pmd[idx] = tbl
        return tbl

    def entry(self, hva: int) -> tuple[int, bool]:
        """``(entry, is_huge_leaf)`` mapping ``hva``; ``(0, False)`` when none."""
        slot = self.pmd.get(hva >> 21)
        if slot is None:
            return 0, False
        if isinstance(slot, int):
            return slot, True
        return slot[(hva >> PAGE_SHIFT) & 511], False

    def view(self, tbl: array[int]) -> npt.NDArray[np.int64]:
        """A writable numpy view of a PTE table."""
        return np.frombuffer(tbl, dtype=np.int64)

    def indices(self, start: int, end: int) -> list[int]:
        """PMD indices with a slot in ``[start, end)`` (addresses), ascending."""
        lo = start >> 21
        hi = (end - 1) >> 21
        if hi - lo + 1 <= len(self.pmd):
            return [i for i in range(lo, hi + 1) if i in self.pmd]
        return sorted(i for i in self.pmd if lo <= i <= hi)

    def pud_populated(self, pud: int) -> bool:
        """Some PMD slot exists in the 1 GiB region ``pud`` (``!pud_none``)."""
        lo = pud << 9
        if len(self.pmd) < 512:
            return any(lo <= i < lo + 512 for i in self.pmd)
        return any(i in self.pmd for i in range(lo, lo + 512))

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
    idx = hva >> 21
    slot = pt.pmd.get(idx)
    if slot is None or isinstance(slot, int):
        slot = pt.new_table(idx)
    slot[(hva >> PAGE_SHIFT) & 511] = entry


def present_pfn(pt: PageTable, addr: int, write: bool) -> int:
    """The 4 KiB pfn an access at ``addr`` can use right now, or -1: the entry is
    present, not PROT_NONE, not a migration entry, and writable for a write."""
    slot = pt.pmd.get(addr >> 21)
    if slot is None:
        return -1
    if isinstance(slot, int):
        e = slot
        sub = (addr >> PAGE_SHIFT) & 511
    else:
        e = slot[(addr >> PAGE_SHIFT) & 511]
        sub = 0
    if not e & PTE_PRESENT or e & (PTE_PROTNONE | PTE_MIGRATION) or (
            write and not e & PTE_WRITE):
        return -1
    return (e >> PFN_SHIFT) + sub


def touch_pte(pt: PageTable, addr: int, write: bool) -> None:
    """The MMU sets the accessed (and dirty) bit of the entry used."""
    idx = addr >> 21
    slot = pt.pmd.get(idx)
    bits = PTE_YOUNG | (PTE_DIRTY if write else 0)
    if isinstance(slot, int):
        pt.pmd[idx] = slot | bits
    elif slot is not None:
        i = (addr >> PAGE_SHIFT) & 511
        slot[i] |= bits


def mapping_size(pt: PageTable, addr: int) -> int:
    """``host_pfn_mapping_level`` as bytes: 2 MiB for a huge leaf, 4096 for a PTE, 0
    when nothing usable is present (none, or a migration entry)."""
    e, huge = pt.entry(addr)
    if not e & PTE_PRESENT or e & PTE_MIGRATION:
        return 0
    return PMD_SIZE if huge else PAGE_SIZE
