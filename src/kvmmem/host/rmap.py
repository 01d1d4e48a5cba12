"""Reverse mapping (``mm/rmap.c``): anon_vma assignment, the walk from a folio to
every (mm, address) mapping it, and the accessed-bit ("young") notifiers that
reclaim and page_idle run over a range.

A file's mappings are its ``i_mmap`` list; :func:`for_each_mapping` is the one
typed way to walk it (``vma_interval_tree_foreach``).
"""

from __future__ import annotations

from typing import cast

from kvmmem.host.args import ulong_arg
from kvmmem.host.file import File
from kvmmem.host.mm_types import MmStruct
from kvmmem.host.pagetable import (
    PFN_SHIFT,
    PTE_DIRTY,
    PTE_PRESENT,
    PTE_SPECIAL,
    PTE_WRITE,
    PTE_YOUNG,
)
from kvmmem.host.vma import VM_ACCESS_FLAGS, VM_SOFTDIRTY, Vma
from kvmmem.types import Hva

_P, _W, _D, _Y, _S = PTE_PRESENT, PTE_WRITE, PTE_DIRTY, PTE_YOUNG, PTE_SPECIAL


def for_each_mapping(f: File) -> list[tuple[MmStruct, Vma]]:
    """``vma_interval_tree_foreach`` over the whole file: its ``i_mmap`` as (mm, VMA)
    pairs, in map order (a copy: callers may unmap while walking)."""
    return [(cast(MmStruct, mm), cast(Vma, vma)) for mm, vma in f.mappings]


def _new_anon_vma(mm: MmStruct) -> int:
    mm.anon_vma_seq += 1
    return mm.anon_vma_seq


def anon_vma_prepare(mm: MmStruct, vma: Vma) -> None:
    """``anon_vma_prepare()``: give the VMA an anon_vma on its first anonymous page,
    reusing an adjacent VMA's where the two could merge but for their protections
    (``find_mergeable_anon_vma``), so a later mprotect that makes them equal merges
    them, as the kernel does."""
    if not vma.anon_vma:
        vma.anon_vma = find_mergeable_anon_vma(mm, vma) or _new_anon_vma(mm)


def find_mergeable_anon_vma(mm: MmStruct, vma: Vma) -> int:
    """``find_mergeable_anon_vma``: the anon_vma of the next, else the previous, VMA
    when it is adjacent, of the same file, pgoff-contiguous and of the same flags
    apart from VM_READ/WRITE/EXEC and VM_SOFTDIRTY (``anon_vma_compatible``); 0
    when neither is.  (The kernel also wants the neighbour's anon_vma to be its
    only one, ``list_is_singular``; the model has no fork, so it always is.)"""
    def compatible(a: Vma, b: Vma) -> bool:
        ignore = VM_ACCESS_FLAGS | VM_SOFTDIRTY
        return (a.end == b.start and a.file is b.file
                and (a.flags ^ b.flags) & ~ignore == 0
                and a.pgoff + a.npages == b.pgoff)
    nxt = mm.vma_next(vma)
    if nxt is not None and nxt.anon_vma and compatible(vma, nxt):
        return nxt.anon_vma
    prev = mm.vma_prev(vma)
    if prev is not None and prev.anon_vma and compatible(prev, vma):
        return prev.anon_vma
    return 0


def rmap_walk(mm: MmStruct, head: int, huge: bool, hva: int) -> list[tuple[MmStruct, int]]:
    """``rmap_walk``: every (mm, address) mapping the folio ``head``."""
    pm = mm.physmem
    out: list[tuple[MmStruct, int]] = []
    mask = mm.pg.hpage_mask if huge else mm.pg.page_mask
    if pm.is_anon(head):
        return [(mm, hva & mask)]
    vma = mm.vma_lookup(hva)
    f = None if vma is None else vma.file
    if f is None:
        return [(mm, hva & mask)]
    index = None
    for k, cached in f.cache.items():
        if cached == head:
            index = k
            break
    if index is None:
        return [(mm, hva & mask)]
    pgoff = index * mm.pg.pages_per_pmd if huge else index
    for owner, v in for_each_mapping(f):
        if v.pgoff <= pgoff < v.pgoff + v.npages:
            at = v.hva_of(pgoff)
            ent, _ = owner.pt.entry(at)
            if ent & _P and ent >> PFN_SHIFT == head:
                out.append((owner, at))
    return out


def clear_young(mm: MmStruct, start: int, end: int) -> bool:
    """``page_idle_clear_pte_refs`` / ``ptep_clear_young_notify`` over ``[start, end)``:
    clears the host accessed bits and asks every subscriber (``clear_young``);
    returns True if any was young."""
    s = ulong_arg(start, "clear_young: start")
    e = ulong_arg(end, "clear_young: end")
    young = _clear_young_ptes(mm, s, e)
    return mm.notifiers.clear_young(Hva(s), Hva(e)) or young


def clear_flush_young(mm: MmStruct, start: int, end: int) -> bool:
    """``ptep_clear_flush_young_notify`` (reclaim's ``folio_referenced``)."""
    s = ulong_arg(start, "clear_flush_young: start")
    e = ulong_arg(end, "clear_flush_young: end")
    young = _clear_young_ptes(mm, s, e)
    return mm.notifiers.clear_flush_young(Hva(s), Hva(e)) or young


def test_young(mm: MmStruct, start: int, end: int) -> bool:
    """``mmu_notifier_test_young`` or a host accessed bit in ``[start, end)``."""
    s = ulong_arg(start, "test_young: start")
    e = ulong_arg(end, "test_young: end")
    pt = mm.pt
    for idx in pt.indices(s, e):
        slot = pt.pmd[idx]
        if isinstance(slot, int):
            if slot & _Y:
                return True
        else:
            base = idx << pt.pmd_shift
            lo, hi = max(s, base), min(e, base + pt.pmd_size)
            if (pt.view(slot)[(lo - base) >> pt.page_shift:(hi - base) >> pt.page_shift]
                    & _Y).any():
                return True
    return mm.notifiers.test_young(Hva(s), Hva(e))


def _clear_young_ptes(mm: MmStruct, s: int, e: int) -> bool:
    young = False
    pt = mm.pt
    for idx in pt.indices(s, e):
        slot = pt.pmd[idx]
        if isinstance(slot, int):
            young |= bool(slot & _Y)
            pt.pmd[idx] = slot & ~_Y
        else:
            base = idx << pt.pmd_shift
            lo, hi = max(s, base), min(e, base + pt.pmd_size)
            arr = pt.view(slot)[(lo - base) >> pt.page_shift:(hi - base) >> pt.page_shift]
            young |= bool((arr & _Y).any())
            arr &= ~_Y
    return young
