"""A PCI BAR mapped through vfio-pci (``drivers/vfio/pci/vfio_pci_core.c``): how
``vfio_pci_core_mmap`` sets the VMA up and how its fault handler fills it, per release
(the variant switch ``vfio_pci_mmap``, set on the mm by the VM, kvmmem.kvm.vm):

* :data:`VFIO_REMAP_AT_MMAP` (before v5.8): ``remap_pfn_range`` of the whole VMA at
  mmap; ``vm_pgoff`` is the pfn;
* :data:`VFIO_FAULT_REMAP` (v5.8, 11c4cd07ba11 "vfio-pci: Fault mmaps to enable vma
  tracking"): nothing at mmap, ``vm_pgoff`` the pfn; the first fault remaps the whole
  VMA (``io_remap_pfn_range``);
* :data:`VFIO_FAULT_INSERT_VMA` (v6.10, aac6db75a9fc "vfio/pci: Use
  unmap_mapping_range()" and d71a989cf5d9 "vfio/pci: Insert full vma on mmap'd MMIO
  fault"): ``vm_pgoff`` keeps the region offset (``VFIO_PCI_INDEX_TO_OFFSET``: the BAR
  index above bit 40 of the file offset) and the fault inserts the faulting page, then
  every other page of the VMA (``vmf_insert_pfn``);
* :data:`VFIO_HUGE_FAULT` (v6.12, f9e54c3a2f5b "vfio/pci: implement huge_fault
  support"): each fault inserts one page, or a PMD/PUD special leaf where the
  architecture has huge PFNMAP leaves (``ARCH_SUPPORTS_PMD_PFNMAP`` x86 and arm64,
  ``_PUD_PFNMAP`` x86 only), nothing more.  Until v6.15 only a fault at an
  order-aligned address gets the leaf, checked for its pfn's alignment since v6.13
  (09dfc8a5f2ce); since v6.15 (c1d9dac0db16 "vfio/pci: Align huge faults to order") the
  address is aligned down and the block containing it is inserted if it lies in the VMA.

Every mapping is ``VM_IO | VM_PFNMAP | VM_DONTEXPAND | VM_DONTDUMP`` with a
non-cacheable ``vm_page_prot`` (``pgprot_noncached``), since v6.9 also
``VM_ALLOW_ANY_UNCACHED`` (a39d3a966a09, arm64 KVM maps it Normal-NC).  A leaf is
writable when the mapping is (``vm_page_prot`` of a shared writable VMA: PFNMAP VMAs
want no write notification).  The device is always enabled here (no
``memory_lock``/runtime-PM refusal: those end in SIGBUS in the kernel).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvmmem.host.mm_types import VM_FAULT_FALLBACK, VM_FAULT_OK, VM_FAULT_SIGBUS, MmStruct
from kvmmem.host.pagetable import (
    PFN_SHIFT,
    PTE_DIRTY,
    PTE_PRESENT,
    PTE_PUD,
    PTE_SPECIAL,
    PTE_WRITE,
    PTE_YOUNG,
    set_pte,
)
from kvmmem.host.vma import VM_SHARED, VM_WRITE, Vma
from kvmmem.types import PageGeometry

if TYPE_CHECKING:
    from kvmmem.host.file import File

VFIO_REMAP_AT_MMAP = 0
VFIO_FAULT_REMAP = 1
VFIO_FAULT_INSERT_VMA = 2
VFIO_HUGE_FAULT = 3

VFIO_PCI_OFFSET_SHIFT = 40
"""``VFIO_PCI_OFFSET_SHIFT``: a region's file offset is its index << 40."""
VFIO_BAR_INDEX = 0
"""The region a ``vfio-bar`` mapping maps: BAR 0 (``VFIO_PCI_BAR0_REGION_INDEX``)."""


def _leaf_bits(vma: Vma) -> int:
    """A special entry as ``vmf_insert_pfn*`` / ``remap_pfn_range`` make it from
    ``vm_page_prot``: present, special, young; writable in a shared writable VMA."""
    writable = vma.flags & VM_WRITE and vma.flags & VM_SHARED
    return PTE_PRESENT | PTE_SPECIAL | PTE_YOUNG | ((PTE_WRITE | PTE_DIRTY) if writable else 0)


def vfio_pci_core_mmap(mm: MmStruct, vma: Vma) -> None:
    """``vfio_pci_core_mmap`` after the VMA is linked: ``vm_pgoff`` becomes the pfn
    before v6.10 (``pci_resource_start >> PAGE_SHIFT`` plus the page offset), and before
    v5.8 every frame is remapped now (``remap_pfn_range``).  The flags were set by the
    mmap (kvmmem.host.mmap)."""
    f = vma.file
    assert f is not None
    if mm.vfio_pci_mmap <= VFIO_FAULT_REMAP:
        vma.pgoff = f.device_base + _region_page(mm.pg, vma.pgoff)
    if mm.vfio_pci_mmap == VFIO_REMAP_AT_MMAP:
        _remap_vma(mm, vma)


def vma_to_pfn(mm: MmStruct, vma: Vma) -> int:
    """``vma_to_pfn`` (v6.10): the pfn at ``vm_start``: the region's base plus the page
    offset kept in ``vm_pgoff``; before v6.10 ``vm_pgoff`` is that pfn itself."""
    if mm.vfio_pci_mmap <= VFIO_FAULT_REMAP:
        return vma.pgoff
    f = vma.file
    assert f is not None
    return f.device_base + _region_page(mm.pg, vma.pgoff)


def _region_page(pg: PageGeometry, pgoff: int) -> int:
    """The page offset inside the region that ``vm_pgoff`` holds (below the index)."""
    return pgoff & ((1 << (VFIO_PCI_OFFSET_SHIFT - pg.page_shift)) - 1)


def vfio_region_pgoff(pg: PageGeometry) -> int:
    """The ``vm_pgoff`` of an mmap of BAR :data:`VFIO_BAR_INDEX` from its start
    (``VFIO_PCI_INDEX_TO_OFFSET(index) >> PAGE_SHIFT``)."""
    return VFIO_BAR_INDEX << (VFIO_PCI_OFFSET_SHIFT - pg.page_shift)


def _remap_vma(mm: MmStruct, vma: Vma) -> None:
    """``io_remap_pfn_range`` / the v6.10 insertion loop over the whole VMA: every
    absent page gets its frame (present ones are left alone, as ``insert_pfn`` leaves
    them)."""
    base = vma_to_pfn(mm, vma)
    bits = _leaf_bits(vma)
    shift = mm.page_shift
    for hva in range(vma.start, vma.end, mm.page_size):
        e, _huge = mm.pt.entry(hva)
        if e & PTE_PRESENT:
            continue
        set_pte(mm.pt, hva, ((base + ((hva - vma.start) >> shift)) << PFN_SHIFT) | bits)


def vfio_pci_mmap_fault(mm: MmStruct, vma: Vma, hva: int) -> int:
    """The page-sized fault (``vfio_pci_mmap_fault``; since v6.12
    ``vfio_pci_mmap_page_fault`` -> ``vfio_pci_mmap_huge_fault(vmf, 0)``): the
    faulting page, and before v6.12 the rest of the VMA with it.  Returns a VM_FAULT_*
    code (SIGBUS for a VMA remapped at mmap, which has no fault handler)."""
    mode = mm.vfio_pci_mmap
    if mode == VFIO_REMAP_AT_MMAP:
        return VM_FAULT_SIGBUS
    if mode in (VFIO_FAULT_REMAP, VFIO_FAULT_INSERT_VMA):
        _remap_vma(mm, vma)
        return VM_FAULT_OK
    page = hva & mm.pg.page_mask
    pfn = vma_to_pfn(mm, vma) + ((page - vma.start) >> mm.page_shift)
    set_pte(mm.pt, page, (pfn << PFN_SHIFT) | _leaf_bits(vma))
    return VM_FAULT_OK


def vfio_pci_mmap_huge_fault(mm: MmStruct, vma: Vma, hva: int, size: int) -> int:
    """``vfio_pci_mmap_huge_fault(vmf, order)`` for a PMD or PUD ``size``: a special
    leaf of that size, or VM_FAULT_FALLBACK (also where the architecture has no such
    leaves: ``mm.huge_pfnmap``).  The caller found the entry empty (``pmd_none`` /
    ``pud_none``); the leaf is stored at the aligned address.

    Before v6.15 the fault address itself must be aligned and the block fit the VMA
    (and from v6.13 its pfn be aligned); since v6.15 the aligned-down block must lie in
    the VMA and its pfn be aligned.  Without the pfn check (v6.12) an unaligned pfn is
    inserted as ``pfn_pmd`` encodes it: the leaf's output address is aligned down
    (x86 masks it with ``PHYSICAL_PMD_PAGE_MASK``; arm64 block descriptors hold no
    bits below the block), so the block maps the frames before the intended ones."""
    pg = mm.pg
    level = {pg.pmd_size: "pmd", pg.pud_size: "pud"}.get(size)
    if mm.vfio_pci_mmap < VFIO_HUGE_FAULT or level not in mm.huge_pfnmap:
        return VM_FAULT_FALLBACK
    npages = size >> pg.page_shift
    page = hva & pg.page_mask
    if mm.vfio_huge_fault_align:
        addr = page & ~(size - 1)
        pfn = vma_to_pfn(mm, vma) + ((addr - vma.start) >> pg.page_shift)
        if addr < vma.start or addr + size > vma.end or pfn & (npages - 1):
            return VM_FAULT_FALLBACK
    else:
        addr = page
        pfn = vma_to_pfn(mm, vma) + ((addr - vma.start) >> pg.page_shift)
        if addr & (size - 1) or addr + size > vma.end \
                or (mm.vfio_huge_fault_pfn_check and pfn & (npages - 1)):
            return VM_FAULT_FALLBACK
    leaf = ((pfn & ~(npages - 1)) << PFN_SHIFT) | _leaf_bits(vma)
    if level == "pmd":
        mm.pt.pmd[addr >> pg.pmd_shift] = leaf
        return VM_FAULT_OK
    # vmf_insert_pfn_pud: one PUD leaf, held as the PMD slots it covers (PTE_PUD)
    for i in range(size >> pg.pmd_shift):
        mm.pt.pmd[(addr >> pg.pmd_shift) + i] = \
            (leaf + ((i * pg.pages_per_pmd) << PFN_SHIFT)) | PTE_PUD
    return VM_FAULT_OK


def is_vfio_bar(f: File | None) -> bool:
    """The file is a vfio-pci BAR region (:func:`kvmmem.host.memfd.open_vfio_bar`)."""
    return f is not None and f.vfio_bar
