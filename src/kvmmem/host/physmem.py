"""Physical memory: RAM frames with struct-page state, device frames without.

A frame is one page of the host kernel's ``PAGE_SIZE`` (:attr:`PhysMem.pg`: 4 KiB, or
arm64's 16 KiB / 64 KiB); pfns count in those pages.

Mirrors the parts of ``struct page`` / ``struct folio`` that KVM's behaviour
depends on (``include/linux/mm.h``, ``mm/page_alloc.c``):

* a **refcount** (``page_count``/``get_page``/``put_page``): a frame returns to
  the allocator only when it drops to zero, exactly like ``folio_put``;
* a **mapcount** per subpage (``page_mapcount``): how many host PTEs (or
  PMDs) map it;
* **content**, stored sparsely: a frame whose bytes are all equal keeps one
  fill byte; a bytearray is created only on the first non-uniform write;
* a **generation**, bumped every time the frame is freed, so a checker can
  tell that a stale translation points at a frame that was freed (and maybe
  reused) since it was taken;
* **compound** PMD-sized frames for hugetlb and THP (2 MiB, order 9, with 4 KiB pages;
  32 MiB with 16 KiB, 512 MiB with 64 KiB): head pfn aligned to the order,
  refcount kept on the head (``folio_ref_count``), mapcount per subpage.

Freed frames are reused LIFO (the most recently freed frame is handed out
first), so a stale mapping reads somebody else's data: bugs show up quickly.
Freed frames keep their old bytes until reallocated (the allocator zeroes on
allocation, like ``__GFP_ZERO`` / ``clear_user_highpage``).

Device frames (``add_device_region``) model PCI BAR memory: no struct page,
``pfn_valid()`` is false, they are never refcounted, their bytes are stored
sparsely too.

The shared zero page (``zero_pfn``, ``ZERO_PAGE(0)``) and the huge zero page
(``huge_zero_pfn``, ``mm_get_huge_zero_folio``) are allocated once and never
freed.

State lives in compact ``array.array`` columns indexed by ``pfn - RAM_BASE_PFN``
that grow by doubling; bulk operations view them as numpy arrays.
"""

from __future__ import annotations

import bisect
from array import array
from collections.abc import Iterable, Sequence

import numpy as np
import numpy.typing as npt

from kvmmem.errors import InputError, KernelError
from kvmmem.types import PAGES_4K, PageGeometry, Pfn, page_geometry

RAM_BASE_PFN = 0x200
"""First RAM pfn (2 MiB physical with 4 KiB pages, 8 MiB with 16 KiB, 32 MiB with 64
KiB); compound frames are aligned in pfn space (a frame below the first aligned head is
an ordinary free frame)."""
DEVICE_BASE_PFN = 0x8000000
"""First device pfn (512 GiB physical with 4 KiB pages): far above any RAM the model
allocates."""
HUGE_ORDER = 9
"""The order of a PMD-sized compound frame with 4 KiB pages (``HPAGE_PMD_ORDER``: 11 with
16 KiB pages, 13 with 64 KiB; :attr:`PhysMem.huge_order`)."""

# page flags (one byte per frame); names after the kernel's PG_* bits
PG_FREE = 0x01  # on the allocator's free list (refcount 0)
PG_HEAD = 0x02  # PG_head: first page of a compound (order-9) frame
PG_TAIL = 0x04  # tail page of a compound frame
PG_ANON = 0x08  # PageAnon: belongs to an anon_vma (else page cache / special)
PG_ANON_EXCLUSIVE = 0x10  # PageAnonExclusive: mapped by exactly one process, COW-reusable
PG_HWPOISON = 0x20  # PG_hwpoison: memory_failure() marked it
PG_HUGETLB = 0x40  # folio_test_hugetlb: belongs to the hugetlb pool
PG_DIRTY = 0x80  # PG_dirty

_MASK64 = (1 << 64) - 1


class PhysMem:
    """The host's physical memory: RAM frames, device frames and the allocator.

    ``hugetlb_pages`` sizes the hugetlb pool (``/proc/sys/vm/nr_hugepages``):
    ``None`` means unlimited, ``0`` mirrors a host with no huge pages (then a
    hugetlb mmap fails with ENOMEM unless it is MAP_NORESERVE, and its first
    touch is SIGBUS).  ``page_size`` is the kernel's ``PAGE_SIZE`` (4096, 16384 or
    65536, or a :class:`~kvmmem.types.PageGeometry`): a frame is one page, a compound
    (THP or hugetlb) frame one PMD (``pg.pages_per_pmd`` frames)."""

    def __init__(self, *, hugetlb_pages: int | None = None,
                 page_size: int | PageGeometry = PAGES_4K) -> None:
        self.pg: PageGeometry = page_geometry(page_size)
        """The host's page geometry (``PAGE_SIZE``, ``PMD_SIZE``, ...)."""
        self.page_size = self.pg.page_size
        self.page_shift = self.pg.page_shift
        self.pages_per_pmd = self.pg.pages_per_pmd
        self.huge_order = self.pg.pmd_shift - self.pg.page_shift
        self._zero_page = bytes(self.page_size)
        if hugetlb_pages is not None and (
            not isinstance(hugetlb_pages, int) or isinstance(hugetlb_pages, bool)
            or hugetlb_pages < 0
        ):
            raise InputError(f"hugetlb_pages: expected a count >= 0 or None, got {hugetlb_pages!r}")
        self._cap = 0
        self._ref: array[int] = array("i")
        self._map: array[int] = array("i")
        self._gen: array[int] = array("I")
        self._flags: array[int] = array("B")
        self._fill: array[int] = array("B")
        self._content: dict[int, bytearray] = {}
        self._free: list[int] = []  # LIFO stack of free order-0 pfns
        self._free_huge: list[int] = []  # LIFO stack of free order-9 heads (THP)
        self._top = 0  # frames [RAM_BASE_PFN, RAM_BASE_PFN + _top) exist
        self._dev_bases: list[int] = []
        self._dev_sizes: list[int] = []
        self._dev_cacheable: set[int] = set()
        """Indices of the device regions added ``cacheable``."""
        self._dev_top = DEVICE_BASE_PFN
        self._dev_content: dict[int, bytearray] = {}
        self._foreign: dict[int, bytearray] = {}
        """Frames outside the model's RAM and devices that a stage-2 entry reached anyway
        (a v5.4-era premap's pfn guessed from ``vm_pgoff``): other host memory, zero
        until the guest writes it."""
        # hugetlb pool (hstate): free pages live in _hugetlb_free (LIFO)
        self.hugetlb_pages = hugetlb_pages
        self._hugetlb_free: list[int] = []
        self._hugetlb_in_use = 0
        self.hugetlb_resv = 0
        self._grow(1024)
        self.zero_pfn: Pfn = self.alloc_page()
        """The shared zero page (``my_zero_pfn``): all zero, never freed."""
        self._huge_zero: Pfn | None = None

    # --- storage -------------------------------------------------------------------

    def _grow(self, need: int) -> None:
        new = max(need, self._cap * 2, 1024)
        if RAM_BASE_PFN + new > DEVICE_BASE_PFN:
            new = DEVICE_BASE_PFN - RAM_BASE_PFN
            if new < need:
                raise KernelError("ENOMEM", "alloc_pages", "model RAM exhausted")
        extra = new - self._cap
        self._ref.frombytes(bytes(4 * extra))
        self._map.frombytes(bytes(4 * extra))
        self._gen.frombytes(bytes(4 * extra))
        self._flags.frombytes(bytes(extra))
        self._fill.frombytes(bytes(extra))
        self._cap = new

    def _np(self, col: array[int], dtype: type[np.generic]) -> npt.NDArray[np.generic]:
        return np.frombuffer(col, dtype=dtype)[: self._top]

    # --- allocation ------------------------------------------------------------------

    def _init_frame(self, i: int) -> None:
        self._ref[i] = 1
        self._map[i] = 0
        self._flags[i] = 0
        self._fill[i] = 0
        self._content.pop(i + RAM_BASE_PFN, None)

    def alloc_page(self) -> Pfn:
        """``alloc_page(GFP_HIGHUSER | __GFP_ZERO)``: a zeroed RAM frame (one page).

        Returns its pfn with refcount 1 and mapcount 0; reuses the most
        recently freed frame first (LIFO)."""
        if self._free:
            pfn = self._free.pop()
        else:
            if self._top >= self._cap:
                self._grow(self._top + 1)
            pfn = RAM_BASE_PFN + self._top
            self._top += 1
        self._init_frame(pfn - RAM_BASE_PFN)
        return Pfn(pfn)

    def _alloc_compound(self) -> int:
        if self._free_huge:
            head = self._free_huge.pop()
        else:
            ppm = self.pages_per_pmd
            # the head is aligned in pfn space (RAM_BASE_PFN is 512-aligned only)
            aligned = ((RAM_BASE_PFN + self._top + ppm - 1) & ~(ppm - 1)) - RAM_BASE_PFN
            if aligned + ppm > self._cap:
                self._grow(aligned + ppm)
            # frames skipped for alignment become ordinary free frames
            for i in range(aligned - 1, self._top - 1, -1):
                self._flags[i] = PG_FREE
                self._free.append(RAM_BASE_PFN + i)
            head = RAM_BASE_PFN + aligned
            self._top = aligned + ppm
        ppm = self.pages_per_pmd
        i = head - RAM_BASE_PFN
        sl = slice(i, i + ppm)
        np.frombuffer(self._ref, dtype=np.int32)[sl] = 0
        np.frombuffer(self._map, dtype=np.int32)[sl] = 0
        np.frombuffer(self._fill, dtype=np.uint8)[sl] = 0
        np.frombuffer(self._flags, dtype=np.uint8)[sl] = PG_TAIL
        self._flags[i] = PG_HEAD
        self._ref[i] = 1
        if self._content:
            for p in range(head, head + ppm):
                self._content.pop(p, None)
        return head

    def alloc_huge(self, order: int | None = None) -> Pfn:
        """``folio_alloc(order=HPAGE_PMD_ORDER)``: a zeroed PMD-sized compound frame (THP:
        2 MiB with 4 KiB pages, order 9).

        Returns the head pfn (aligned to the order), refcount 1 on the head.  Raises
        :class:`InputError` for any order other than the PMD's."""
        if order is not None and order != self.huge_order:
            raise InputError(f"alloc_huge: only order {self.huge_order} (the PMD size) is "
                             "modelled")
        return Pfn(self._alloc_compound())

    def alloc_hugetlb(self, *, reserved: bool) -> Pfn | None:
        """``alloc_hugetlb_folio``: a PMD-sized page (2 MiB with 4 KiB pages) from the
        hugetlb pool.

        ``reserved`` consumes one reservation made at mmap time.  Returns the
        head pfn, or None when the pool has no free page (the fault then
        raises SIGBUS, as ``vmf_error(-ENOSPC)`` does)."""
        if reserved:
            self.hugetlb_resv -= 1
        elif self.hugetlb_pages is not None and (
            self._hugetlb_in_use + self.hugetlb_resv >= self.hugetlb_pages
        ):
            return None
        if self._hugetlb_free:
            head = self._hugetlb_free.pop()
            i = head - RAM_BASE_PFN
            sl = slice(i, i + self.pages_per_pmd)
            np.frombuffer(self._map, dtype=np.int32)[sl] = 0
            np.frombuffer(self._fill, dtype=np.uint8)[sl] = 0
            np.frombuffer(self._flags, dtype=np.uint8)[sl] = PG_TAIL | PG_HUGETLB
            if self._content:
                for p in range(head, head + self.pages_per_pmd):
                    self._content.pop(p, None)
        else:
            head = self._alloc_compound()
            i = head - RAM_BASE_PFN
            np.frombuffer(self._flags, dtype=np.uint8)[i : i + self.pages_per_pmd] |= PG_HUGETLB
        self._flags[head - RAM_BASE_PFN] = PG_HEAD | PG_HUGETLB
        self._ref[head - RAM_BASE_PFN] = 1
        self._hugetlb_in_use += 1
        return Pfn(head)

    def hugetlb_reserve(self, npages: int) -> bool:
        """``hugetlb_acct_memory``: reserve ``npages`` pool pages; False if short."""
        if self.hugetlb_pages is not None and (
            self._hugetlb_in_use + self.hugetlb_resv + npages > self.hugetlb_pages
        ):
            return False
        self.hugetlb_resv += npages
        return True

    def hugetlb_unreserve(self, npages: int) -> None:
        """Give back ``npages`` unused reservations."""
        self.hugetlb_resv -= npages

    @property
    def huge_zero_pfn(self) -> Pfn:
        """The huge zero page (head pfn of a PMD-sized all-zero frame), made on first use."""
        if self._huge_zero is None:
            self._huge_zero = Pfn(self._alloc_compound())
        return self._huge_zero

    def is_huge_zero(self, pfn: int) -> bool:
        """``is_huge_zero_pfn``: ``pfn`` lies in the huge zero page."""
        hz = self._huge_zero
        return hz is not None and hz <= pfn < hz + self.pages_per_pmd

    def add_device_region(self, npages: int, *, align: int = 1,
                          cacheable: bool = False) -> Pfn:
        """A device memory region (a PCI BAR) of ``npages`` frames without struct page.

        Returns its base pfn, aligned to ``align`` frames (default a PMD; a PCI BAR's
        base is aligned to its size: pass the size).  ``cacheable``: memory the device
        exposes coherently, to be mapped cacheable (Grace-style GPU memory, outside the
        kernel's linear map all the same: ``pfn_is_map_memory`` is false)."""
        if not isinstance(npages, int) or isinstance(npages, bool) or npages <= 0:
            raise InputError(f"add_device_region: npages must be a positive int, got {npages!r}")
        if not isinstance(align, int) or isinstance(align, bool) or align <= 0 \
                or align & (align - 1):
            raise InputError(f"add_device_region: align must be a power of two, got {align!r}")
        a = max(align, self.pages_per_pmd)
        base = (self._dev_top + a - 1) & ~(a - 1)
        self._dev_bases.append(base)
        self._dev_sizes.append(npages)
        if cacheable:
            self._dev_cacheable.add(len(self._dev_bases) - 1)
        self._dev_top = base + npages
        return Pfn(base)

    # --- queries -----------------------------------------------------------------------

    def pfn_valid(self, pfn: int) -> bool:
        """``pfn_valid()``: the frame is RAM with a struct page (free or not)."""
        return RAM_BASE_PFN <= pfn < RAM_BASE_PFN + self._top

    def is_device(self, pfn: int) -> bool:
        """The frame is device memory (inside a region from add_device_region)."""
        k = bisect.bisect_right(self._dev_bases, pfn) - 1
        return k >= 0 and pfn < self._dev_bases[k] + self._dev_sizes[k]

    def is_cacheable_device(self, pfn: int) -> bool:
        """The frame is device memory of a region added ``cacheable``."""
        k = bisect.bisect_right(self._dev_bases, pfn) - 1
        return k >= 0 and pfn < self._dev_bases[k] + self._dev_sizes[k] \
            and k in self._dev_cacheable

    def _index(self, pfn: int, what: str) -> int:
        if not isinstance(pfn, int) or isinstance(pfn, bool):
            raise InputError(f"{what}: pfn must be an int, got {pfn!r}")
        if not self.pfn_valid(pfn):
            raise InputError(f"{what}: pfn {pfn:#x} has no struct page")
        return pfn - RAM_BASE_PFN

    def compound_head(self, pfn: int) -> Pfn:
        """``compound_head()``: the head pfn of the frame holding ``pfn``."""
        i = pfn - RAM_BASE_PFN
        if self._flags[i] & PG_TAIL:
            return Pfn(pfn & ~(self.pages_per_pmd - 1))
        return Pfn(pfn)

    def is_compound(self, pfn: int) -> bool:
        """The frame is part of a PMD-sized compound frame."""
        return bool(self._flags[pfn - RAM_BASE_PFN] & (PG_HEAD | PG_TAIL))

    def page_count(self, pfn: int) -> int:
        """``page_count()``: the refcount of the folio holding ``pfn``."""
        i = self._index(pfn, "page_count")
        if self._flags[i] & PG_TAIL:
            i = (pfn & ~(self.pages_per_pmd - 1)) - RAM_BASE_PFN
        return self._ref[i]

    def page_mapcount(self, pfn: int) -> int:
        """``page_mapcount()``: how many host page-table entries map this subpage."""
        return self._map[self._index(pfn, "page_mapcount")]

    def is_free(self, pfn: int) -> bool:
        """The frame is on a free list (refcount 0)."""
        return bool(self._flags[self._index(pfn, "is_free")] & PG_FREE)

    def generation(self, pfn: int) -> int:
        """How many times the frame has been freed (0 for device frames)."""
        if not self.pfn_valid(pfn):
            return 0
        return self._gen[pfn - RAM_BASE_PFN]

    def page_flags(self, pfn: int) -> int:
        """The PG_* byte of a RAM frame."""
        return self._flags[self._index(pfn, "page_flags")]

    def is_anon(self, pfn: int) -> bool:
        """``PageAnon()``."""
        return bool(self._flags[pfn - RAM_BASE_PFN] & PG_ANON)

    def is_hwpoison(self, pfn: int) -> bool:
        """``PageHWPoison()``."""
        return self.pfn_valid(pfn) and bool(self._flags[pfn - RAM_BASE_PFN] & PG_HWPOISON)

    def hwpoison(self, pfn: int) -> None:
        """``memory_failure()`` reduced to its mark: later accesses SIGBUS, GUP gives EHWPOISON."""
        i = self._index(pfn, "hwpoison")
        self._flags[i] |= PG_HWPOISON

    def set_flags(self, pfn: int, flags: int) -> None:
        """OR ``flags`` into the PG_* byte (used by the mm code)."""
        self._flags[pfn - RAM_BASE_PFN] |= flags

    def clear_flags(self, pfn: int, flags: int) -> None:
        """Clear ``flags`` from the PG_* byte (used by the mm code)."""
        self._flags[pfn - RAM_BASE_PFN] &= ~flags & 0xFF

    # --- refcount ------------------------------------------------------------------------

    def get_page(self, pfn: int) -> None:
        """``get_page()``/``folio_get()``: take a reference on the folio holding ``pfn``.

        Raises :class:`InputError` for a device pfn or a free frame (the kernel
        would BUG)."""
        i = self._index(pfn, "get_page")
        if self._flags[i] & PG_TAIL:
            i = (pfn & ~(self.pages_per_pmd - 1)) - RAM_BASE_PFN
        if self._ref[i] <= 0:
            raise InputError(f"get_page: pfn {pfn:#x} is free (refcount 0)")
        self._ref[i] += 1

    def try_get_page(self, pfn: int) -> bool:
        """``try_grab_folio_fast()`` as ``gup_fast`` uses it: take a reference on
        the folio holding ``pfn`` unless the page is poisoned or the folio free
        (False then).  Raises :class:`InputError` like :meth:`page_count` for a
        pfn without struct page."""
        i = self._index(pfn, "page_count")
        if self._flags[i] & PG_HWPOISON:
            return False
        if self._flags[i] & PG_TAIL:
            i = (pfn & ~(self.pages_per_pmd - 1)) - RAM_BASE_PFN
        if self._ref[i] <= 0:
            return False
        self._ref[i] += 1
        return True

    def put_page(self, pfn: int) -> None:
        """``put_page()``/``folio_put()``: drop a reference; at zero the folio is freed.

        A freed frame goes back to its free list (LIFO) and its generation is
        bumped.  The zero pages are never freed."""
        i = self._index(pfn, "put_page")
        if self._flags[i] & PG_TAIL:
            i = (pfn & ~(self.pages_per_pmd - 1)) - RAM_BASE_PFN
        if self._ref[i] <= 0:
            raise InputError(f"put_page: pfn {pfn:#x} refcount underflow")
        self._ref[i] -= 1
        if self._ref[i] == 0:
            self._free_folio(i + RAM_BASE_PFN)

    def _free_folio(self, head: int) -> None:
        i = head - RAM_BASE_PFN
        if head == self.zero_pfn or head == self._huge_zero:
            self._ref[i] = 1  # never freed
            return
        fl = self._flags[i]
        if fl & PG_HEAD:
            sl = slice(i, i + self.pages_per_pmd)
            np.frombuffer(self._gen, dtype=np.uint32)[sl] += 1
            np.frombuffer(self._map, dtype=np.int32)[sl] = 0
            if fl & PG_HUGETLB:
                np.frombuffer(self._flags, dtype=np.uint8)[sl] = PG_FREE | PG_HUGETLB
                self._hugetlb_in_use -= 1
                self._hugetlb_free.append(head)
            else:
                np.frombuffer(self._flags, dtype=np.uint8)[sl] = PG_FREE
                self._free_huge.append(head)
        else:
            self._gen[i] += 1
            self._map[i] = 0
            self._flags[i] = PG_FREE
            self._free.append(head)

    def put_pages(self, pfns: npt.NDArray[np.int64]) -> None:
        """Drop one reference for each pfn in ``pfns`` (vectorised ``put_page``).

        Duplicates count once each; folios reaching zero are freed in the
        order their pfns appear."""
        if pfns.size == 0:
            return
        idx = pfns - RAM_BASE_PFN
        flags = np.frombuffer(self._flags, dtype=np.uint8)
        tail = (flags[idx] & PG_TAIL) != 0
        if tail.any():
            idx = np.where(tail, (pfns & ~(self.pages_per_pmd - 1)) - RAM_BASE_PFN, idx)
        ref = np.frombuffer(self._ref, dtype=np.int32)
        np.subtract.at(ref, idx, 1)
        vals = ref[idx]
        if (vals < 0).any():
            bad = int(pfns[np.argmax(vals < 0)])
            np.add.at(ref, idx, 1)
            raise InputError(f"put_page: pfn {bad:#x} refcount underflow")
        zero = idx[vals == 0]
        if not zero.size:
            return
        _, first = np.unique(zero, return_index=True)
        zero = zero[np.sort(first)]  # each folio once, in the order given
        fz = flags[zero]
        small = zero[(fz & PG_HEAD) == 0]
        keep = (small != self.zero_pfn - RAM_BASE_PFN)
        if not keep.all():
            self._ref[self.zero_pfn - RAM_BASE_PFN] = 1
            small = small[keep]
        if small.size:
            np.frombuffer(self._gen, dtype=np.uint32)[small] += 1
            np.frombuffer(self._map, dtype=np.int32)[small] = 0
            flags[small] = PG_FREE
            self._free.extend((small + RAM_BASE_PFN).tolist())
        for i in zero[(fz & PG_HEAD) != 0].tolist():
            self._free_folio(i + RAM_BASE_PFN)

    def get_pages(self, pfns: npt.NDArray[np.int64], n: int = 1) -> None:
        """Take ``n`` references on the folio of each pfn (vectorised ``get_page``)."""
        if pfns.size == 0:
            return
        idx = pfns - RAM_BASE_PFN
        flags = np.frombuffer(self._flags, dtype=np.uint8)
        tail = (flags[idx] & PG_TAIL) != 0
        if tail.any():
            idx = np.where(tail, (pfns & ~(self.pages_per_pmd - 1)) - RAM_BASE_PFN, idx)
        np.add.at(np.frombuffer(self._ref, dtype=np.int32), idx, n)

    def add_mapcount(self, pfns: npt.NDArray[np.int64], delta: int) -> None:
        """Add ``delta`` to the mapcount of each subpage in ``pfns``."""
        if pfns.size:
            np.add.at(np.frombuffer(self._map, dtype=np.int32), pfns - RAM_BASE_PFN, delta)

    def map_one(self, pfn: int) -> None:
        """One more mapping of ``pfn``: mapcount + 1 and a reference (folio_add_*_rmap_pte)."""
        i = pfn - RAM_BASE_PFN
        self._map[i] += 1
        if self._flags[i] & PG_TAIL:
            i = (pfn & ~(self.pages_per_pmd - 1)) - RAM_BASE_PFN
        self._ref[i] += 1

    def alloc_pages_bulk(self, n: int) -> npt.NDArray[np.int64]:
        """``alloc_pages_bulk``: ``n`` zeroed frames (refcount 1), LIFO reuse first.

        Returns their pfns in the order ``alloc_page`` would have returned them."""
        take = min(n, len(self._free))
        parts: list[npt.NDArray[np.int64]] = []
        if take:
            reused = np.array(self._free[len(self._free) - take :][::-1], dtype=np.int64)
            del self._free[len(self._free) - take :]
            parts.append(reused)
        rest = n - take
        if rest:
            if self._top + rest > self._cap:
                self._grow(self._top + rest)
            fresh = np.arange(self._top, self._top + rest, dtype=np.int64) + RAM_BASE_PFN
            self._top += rest
            parts.append(fresh)
        pfns = np.concatenate(parts) if len(parts) != 1 else parts[0]
        idx = pfns - RAM_BASE_PFN
        np.frombuffer(self._ref, dtype=np.int32)[idx] = 1
        np.frombuffer(self._map, dtype=np.int32)[idx] = 0
        np.frombuffer(self._flags, dtype=np.uint8)[idx] = 0
        np.frombuffer(self._fill, dtype=np.uint8)[idx] = 0
        if self._content and take:
            for p in pfns[:take].tolist():
                self._content.pop(p, None)
        return pfns

    def set_fill_bulk(self, pfns: npt.NDArray[np.int64], byte: int) -> None:
        """Make every byte of each frame in ``pfns`` equal to ``byte`` (a memset)."""
        np.frombuffer(self._fill, dtype=np.uint8)[pfns - RAM_BASE_PFN] = byte
        if self._content:
            for p in pfns.tolist():
                self._content.pop(p, None)

    def set_flags_bulk(self, pfns: npt.NDArray[np.int64], flags: int) -> None:
        """OR ``flags`` into the PG_* byte of each frame in ``pfns``."""
        np.frombuffer(self._flags, dtype=np.uint8)[pfns - RAM_BASE_PFN] |= flags

    # --- content ---------------------------------------------------------------------------

    def _frame_bytes(self, pfn: int) -> bytearray | None:
        if RAM_BASE_PFN <= pfn < RAM_BASE_PFN + self._top:
            return self._content.get(pfn)
        if self.is_device(pfn):
            return self._dev_content.get(pfn)
        return self._foreign.get(pfn)

    def read(self, pfn: int, offset: int, size: int) -> bytes:
        """The ``size`` bytes at ``offset`` in frame ``pfn`` (may run on into pfn+1...).

        Raises :class:`InputError` for an unknown pfn or a negative offset/size."""
        if offset < 0 or size < 0:
            raise InputError("read: negative offset or size")
        out = bytearray()
        while size > 0:
            pfn += offset >> self.page_shift
            offset &= self.page_size - 1
            n = min(size, self.page_size - offset)
            data = self._frame_bytes(pfn)
            if data is not None:
                out += data[offset : offset + n]
            elif RAM_BASE_PFN <= pfn < RAM_BASE_PFN + self._top:
                out += bytes((self._fill[pfn - RAM_BASE_PFN],)) * n
            else:
                out += self._zero_page[:n]
            size -= n
            offset += n
        return bytes(out)

    def read_int(self, pfn: int, offset: int, size: int) -> int:
        """Little-endian load of ``size`` bytes inside one frame (the fast path)."""
        data = self._frame_bytes(pfn) if pfn < DEVICE_BASE_PFN else self._dev_content.get(pfn)
        if data is not None:
            return int.from_bytes(data[offset : offset + size], "little")
        if not RAM_BASE_PFN <= pfn < RAM_BASE_PFN + self._top:
            return 0
        b = self._fill[pfn - RAM_BASE_PFN]
        if b == 0:
            return 0
        return int.from_bytes(bytes((b,)) * size, "little")

    def write(self, pfn: int, offset: int, data: bytes) -> None:
        """Store ``data`` at ``offset`` in frame ``pfn`` (may run on into pfn+1...).

        A frame whose bytes stay uniform keeps its single fill byte; a
        bytearray is created on the first non-uniform write."""
        if offset < 0:
            raise InputError("write: negative offset")
        mv = memoryview(bytes(data))
        while len(mv):
            pfn += offset >> self.page_shift
            offset &= self.page_size - 1
            n = min(len(mv), self.page_size - offset)
            self._store(pfn, offset, mv[:n])
            mv = mv[n:]
            offset += n

    def _store(self, pfn: int, offset: int, chunk: memoryview | bytes) -> None:
        if pfn >= DEVICE_BASE_PFN or not RAM_BASE_PFN <= pfn < RAM_BASE_PFN + self._top:
            store = self._dev_content if self.is_device(pfn) else self._foreign
            buf = store.get(pfn)
            if buf is None:
                if not any(chunk):
                    return
                buf = store[pfn] = bytearray(self.page_size)
            buf[offset : offset + len(chunk)] = chunk
            return
        buf = self._content.get(pfn)
        n = len(chunk)
        if n == self.page_size:
            raw = bytes(chunk)
            if raw.count(raw[0]) == n:
                self._fill[pfn - RAM_BASE_PFN] = raw[0]
                if buf is not None:
                    del self._content[pfn]
                return
        if buf is None:
            i = pfn - RAM_BASE_PFN
            raw = bytes(chunk)
            b = self._fill[i]
            if raw.count(b) == n:
                return
            buf = self._content[pfn] = bytearray((b,)) * self.page_size
        buf[offset : offset + len(chunk)] = chunk

    def write_int(self, pfn: int, offset: int, size: int, value: int) -> None:
        """Little-endian store of ``size`` bytes inside one frame (the fast path)."""
        self._store(pfn, offset, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))

    def fill(self, pfn: int, byte: int) -> None:
        """Set every byte of frame ``pfn`` to ``byte``."""
        if pfn >= DEVICE_BASE_PFN:
            self._dev_content[pfn] = bytearray((byte,)) * self.page_size
            return
        self._fill[pfn - RAM_BASE_PFN] = byte
        self._content.pop(pfn, None)

    def copy_page(self, dst: int, src: int) -> None:
        """``copy_user_highpage()``: frame ``dst`` gets the bytes of frame ``src``."""
        data = self._frame_bytes(src)
        if dst >= DEVICE_BASE_PFN:
            self._dev_content[dst] = bytearray(self.read(src, 0, self.page_size))
            return
        if data is not None:
            self._content[dst] = bytearray(data)
        else:
            self._content.pop(dst, None)
            self._fill[dst - RAM_BASE_PFN] = (
                self._fill[src - RAM_BASE_PFN] if src < DEVICE_BASE_PFN else 0
            )

    def uniform_byte(self, pfn: int) -> int | None:
        """The fill byte if every byte of the frame is equal, else None."""
        data = self._frame_bytes(pfn)
        if data is None:
            return self._fill[pfn - RAM_BASE_PFN] if pfn < DEVICE_BASE_PFN else 0
        return data[0] if data.count(data[0]) == self.page_size else None

    # --- introspection -----------------------------------------------------------------------

    def nr_allocated(self) -> int:
        """Frames with refcount > 0 or belonging to an allocated compound (order-0 count)."""
        flags = np.frombuffer(self._flags, dtype=np.uint8)[: self._top]
        return int(np.count_nonzero((flags & PG_FREE) == 0))

    def snapshot(self) -> tuple[object, ...]:
        """A comparable picture of all struct-page state (for "changed nothing" checks)."""
        top = self._top
        return (
            top,
            bytes(memoryview(self._ref)[:top].cast("B")),
            bytes(memoryview(self._map)[:top].cast("B")),
            bytes(memoryview(self._gen)[:top].cast("B")),
            bytes(memoryview(self._flags)[:top]),
            bytes(memoryview(self._fill)[:top]),
            tuple(sorted((k, bytes(v)) for k, v in self._content.items())),
            tuple(sorted((k, bytes(v)) for k, v in self._dev_content.items())),
            tuple(self._free),
            tuple(self._free_huge),
            tuple(self._hugetlb_free),
            self._hugetlb_in_use,
            self.hugetlb_resv,
            tuple(self._dev_bases),
        )

    def iter_allocated(self) -> Iterable[int]:
        """Pfns of every RAM frame not on a free list, ascending."""
        flags = np.frombuffer(self._flags, dtype=np.uint8)[: self._top]
        return (np.nonzero((flags & PG_FREE) == 0)[0] + RAM_BASE_PFN).tolist()

    def refcounts(self, pfns: Sequence[int]) -> list[int]:
        """``page_count`` of each pfn (folio refcount)."""
        return [self.page_count(p) for p in pfns]
