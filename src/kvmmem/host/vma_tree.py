"""Changes to the VMA tree (``mm/vma.c``): linking and unlinking a VMA (with the
file's ``i_mmap``), ``__split_vma``, ``vma_merge`` and ``vma_modify_flags``.

Merging follows ``vma_merge``'s rules (equal flags, same file, contiguous
pgoff, compatible anon_vma, never VM_SPECIAL) at the edges of the range an
operation changed."""

from __future__ import annotations

from kvmmem.host.huge_memory import split_huge_pmd_address_op
from kvmmem.host.mm_types import MmStruct
from kvmmem.host.vma import VM_HUGEPAGE, VM_SPECIAL, Vma, VmaKind
from kvmmem.sync import Op
from kvmmem.types import Hva


def vma_link(mm: MmStruct, vma: Vma) -> None:
    """``vma_link``: insert ``vma`` in the tree and in its file's ``i_mmap``."""
    mm.mm_mt[vma.start] = vma
    if vma.file is not None:
        vma.file.mappings.append((mm, vma))


def vma_unlink(mm: MmStruct, vma: Vma) -> None:
    """Remove ``vma`` from the tree and its file's ``i_mmap`` (``vma_iter_clear`` +
    ``unlink_file_vma``); forgets the cached lookup."""
    mm.vmacache_invalidate()
    del mm.mm_mt[vma.start]
    if vma.file is not None:
        maps = vma.file.mappings
        for i, (owner, v) in enumerate(maps):
            if v is vma and owner is mm:
                del maps[i]
                break


def split_vma(mm: MmStruct, vma: Vma, addr: int) -> Vma:
    """``__split_vma(new_below=0)``: cut ``vma`` at ``addr``; returns the upper part.

    The caller has checked hugetlb alignment and that a THP straddling
    ``addr`` was split (``vma_adjust_trans_huge``)."""
    pg = vma.pg
    upper = Vma(addr, vma.end, vma.flags, vma.kind, vma.file,
                vma.pgoff + ((addr - vma.start) >> pg.page_shift), vma.anon_vma, pg=pg)
    if vma.resv:
        cut = upper.pgoff >> (pg.pmd_shift - pg.page_shift)
        upper.resv = {k: None for k in vma.resv if k >= cut}
        vma.resv = {k: None for k in vma.resv if k < cut}
    vma.end = Hva(addr)
    vma_link(mm, upper)
    return upper


def is_mergeable_vma(a: Vma, b: Vma) -> bool:
    """``is_mergeable_vma`` + ``is_mergeable_anon_vma`` + pgoff contiguity, a before b."""
    if a.end != b.start or a.flags != b.flags or a.file is not b.file:
        return False
    if a.flags & VM_SPECIAL:
        return False
    if a.anon_vma and b.anon_vma and a.anon_vma != b.anon_vma:
        return False
    return a.pgoff + a.npages == b.pgoff


def vma_expand(mm: MmStruct, a: Vma, b: Vma) -> Vma:
    """Fold ``b`` into ``a`` (``vma_expand`` + ``vma_complete``)."""
    vma_unlink(mm, b)
    a.end = b.end
    if not a.anon_vma:
        a.anon_vma = b.anon_vma
    if b.resv:
        a.resv.update(b.resv)
    return a


def vma_merge(mm: MmStruct, vma: Vma) -> Vma:
    """``vma_merge``: merge ``vma`` with its neighbours where the kernel would."""
    prev = mm.vma_prev(vma)
    if prev is not None and is_mergeable_vma(prev, vma):
        vma = vma_expand(mm, prev, vma)
    nxt = mm.vma_next(vma)
    if nxt is not None and is_mergeable_vma(vma, nxt):
        vma = vma_expand(mm, vma, nxt)
    return vma


def vma_modify_flags_op(mm: MmStruct, vma: Vma, start: int, end: int, newflags: int) -> Op[Vma]:
    """``vma_modify_flags``: split off ``[start, end)``, set flags, merge around."""
    if start > vma.start:
        yield from split_huge_pmd_address_op(mm, start)
        vma = split_vma(mm, vma, start)
    if end < vma.end:
        yield from split_huge_pmd_address_op(mm, end)
        split_vma(mm, vma, end)
    vma.flags = newflags
    if vma.is_anonymous():
        vma.kind = VmaKind.THP if newflags & VM_HUGEPAGE else VmaKind.ANON
    return vma_merge(mm, vma)
