"""Files and the page cache: ``struct file`` / ``struct address_space``.

One :class:`File` is one inode.  Its page cache (``mapping->i_pages``) maps a
file page index to the frame holding it and is shared by every mapping of
the file, in every address space (``filemap_fault`` / ``shmem_fault`` find
the same folio).  ``mappings`` is ``mapping->i_mmap``: the VMAs that map the
file, walked by truncation and hole punching (``unmap_mapping_range``).

Kinds:

* ``shmem`` - a memfd (``memfd_create``): pages appear zero-filled on first
  touch, no write-notify (a read fault of a writable shared mapping maps the
  page writable at once);
* ``regular`` - a file on a disk filesystem (ext4): content comes from "disk"
  (an optional uniform ``fill`` byte, zero after EOF or in punched holes),
  shared writable mappings are write-notified (read faults map read-only,
  the first write makes the PTE writable, ``do_page_mkwrite``);
* ``hugetlbfs`` - PMD-sized pages, 2 MiB with 4 KiB base pages (anonymous MAP_HUGETLB
  gets a private one, like ``hugetlb_file_setup``);
* ``device`` - a device node whose mmap maps device frames (no page cache);
* ``guest_memfd`` - the inode of a guest_memfd (``kvmmem.kvm.guest_memfd``): pages
  zeroed on first use, its ``fault`` and ``fallocate`` supplied by KVM.

Access beyond EOF (``pgoff >= i_size`` in pages) is SIGBUS in the fault path.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum
from typing import Protocol

from kvmmem.errors import InputError
from kvmmem.host.physmem import PG_DIRTY, PhysMem
from kvmmem.sync import Op
from kvmmem.types import Pfn


class Mapping(Protocol):
    """What ``i_mmap`` needs of a mapping of the file: its range (a
    :class:`~kvmmem.host.vma.Vma`; the file module does not import it, the VMA
    module imports this one)."""

    @property
    def start(self) -> int: ...

    @property
    def end(self) -> int: ...


class FileKind(Enum):
    """What backs a :class:`File`."""

    SHMEM = "shmem"
    REGULAR = "regular"
    HUGETLBFS = "hugetlbfs"
    DEVICE = "device"
    GUEST_MEMFD = "guest_memfd"


class File:
    """An open file: inode, size, page cache and the VMAs that map it.

    ``writable`` is ``FMODE_WRITE`` of the open file (False models O_RDONLY:
    a MAP_SHARED PROT_WRITE mmap of it fails with EACCES and its shared
    mappings lose VM_MAYWRITE)."""

    def __init__(
        self,
        physmem: PhysMem,
        ino: int,
        name: str,
        kind: FileKind,
        size: int,
        *,
        writable: bool = True,
        fill: int | None = None,
        anon_hugetlb: bool = False,
        device_base: int = 0,
        device_lazy: bool = False,
        dmabuf: bool = False,
        vfio_bar: bool = False,
    ) -> None:
        self.physmem = physmem
        self.ino = ino
        self.name = name
        self.kind = kind
        self.size = size
        self.writable = writable
        self.cache: dict[int, int] = {}
        """Page cache: index -> pfn (hugetlbfs: huge page index -> head pfn)."""
        self.mappings: list[tuple[object, Mapping]] = []
        """``i_mmap``: (address space, VMA) for every VMA mapping this file, in map order
        (:func:`kvmmem.host.rmap.for_each_mapping` walks it with their types)."""
        self._fill = fill or 0
        self._fill_end = size if fill else 0  # bytes [0, _fill_end) hold the fill byte
        self._holes: dict[int, None] = {}  # punched pages inside the filled part
        self.anon_hugetlb = anon_hugetlb
        self.device_base = device_base
        self.device_lazy = device_lazy
        self.vfio_bar = vfio_bar
        """A vfio-pci device's BAR region (kvmmem.host.vfio): mapped only as kind
        ``vfio-bar``, its frames inserted by vfio-pci's fault handler."""
        self.dmabuf = dmabuf
        """A shmem object exported by a driver (a DRM shmem buffer, a udmabuf):
        mapped only as kind ``dmabuf`` (VM_PFNMAP), its pages pinned by the driver."""
        self.resv: dict[int, None] = {}
        """hugetlbfs shared reservations: huge page indices reserved, not yet allocated."""
        self.fallocate: Callable[[int, int, int], Op[None]] | None = None
        """``f_op->fallocate`` where the file's owner supplies its own (a guest_memfd:
        ``kvm_gmem_fallocate``); None: the generic shmem / disk-file hole punch."""
        self.fault: Callable[[int], int | None] | None = None
        """``vm_ops->fault`` where the file's owner supplies its own (a guest_memfd:
        ``kvm_gmem_fault_user_mapping``): page index -> pfn, None for SIGBUS."""
        self.mmap_refused: str | None = None
        """Why ``f_op->mmap`` refuses (ENODEV), or None (a guest_memfd without
        GUEST_MEMFD_FLAG_MMAP)."""

    def __repr__(self) -> str:
        return f"File({self.name!r}, {self.kind.value}, size={self.size:#x})"

    # --- geometry ------------------------------------------------------------------

    @property
    def writenotify(self) -> bool:
        """``vma_wants_writenotify`` for shared mappings: dirty tracking on disk files."""
        return self.kind is FileKind.REGULAR

    @property
    def unit_shift(self) -> int:
        """Page-cache granule: the PMD's shift for hugetlbfs (21 with 4 KiB pages), else
        ``PAGE_SHIFT``."""
        pg = self.physmem.pg
        return pg.pmd_shift if self.kind is FileKind.HUGETLBFS else pg.page_shift

    def npages(self) -> int:
        """Pages inside i_size (the last one may be partial); index >= this is SIGBUS."""
        unit = 1 << self.unit_shift
        return (self.size + unit - 1) >> self.unit_shift

    def maps_name(self) -> str:
        """The pathname /proc/PID/maps shows for a mapping of this file."""
        if self.kind is FileKind.HUGETLBFS and self.anon_hugetlb:
            return "/anon_hugepage (deleted)"
        if self.kind is FileKind.SHMEM or self.kind is FileKind.HUGETLBFS:
            return f"/memfd:{self.name} (deleted)"
        return self.name

    # --- the page cache ------------------------------------------------------------

    def find_get_page(self, index: int) -> Pfn | None:
        """``filemap_get_folio``: the cached frame of page ``index``, or None."""
        pfn = self.cache.get(index)
        return None if pfn is None else Pfn(pfn)

    def _init_content(self, pfn: int, index: int) -> None:
        if not self._fill or index in self._holes:
            return
        page_size = self.physmem.page_size
        off = index * page_size
        end = min(self._fill_end, off + page_size)
        if end <= off:
            return
        if end - off == page_size:
            self.physmem.fill(pfn, self._fill)
        else:
            self.physmem.write(pfn, 0, bytes((self._fill,)) * (end - off))

    def get_page(self, index: int) -> Pfn:
        """``filemap_fault`` / ``shmem_get_folio``: find or create page ``index``.

        A new page is read from "disk" (fill byte / zero) and held by the
        cache with one reference.  Returns its pfn (hugetlbfs: head pfn; may
        raise nothing, the caller checks EOF and the hugetlb pool)."""
        pfn = self.cache.get(index)
        if pfn is not None:
            return Pfn(pfn)
        new = self.physmem.alloc_page()
        self._init_content(new, index)
        self.cache[index] = new
        return new

    def add_huge_page(self, index: int, head: int) -> None:
        """Insert a hugetlb page (already allocated) at huge page index ``index``."""
        self.cache[index] = head

    def drop_pages(self, first: int, last: int | None = None, *, hole: bool) -> list[int]:
        """Remove cache pages ``first..last`` (inclusive; None: to the end).

        Drops the cache's reference (pages still mapped stay allocated until
        unmapped).  ``hole`` marks the range as a punched hole (reads zero
        afterwards).  Returns the pfns removed, in index order."""
        keys = sorted(k for k in self.cache if k >= first and (last is None or k <= last))
        removed = [self.cache.pop(k) for k in keys]
        page_shift = self.physmem.page_shift
        if hole and self._fill_end and self.unit_shift == page_shift:
            last_filled = (self._fill_end - 1) >> page_shift
            stop = last_filled if last is None else min(last, last_filled)
            for i in range(first, stop + 1):
                self._holes[i] = None
        for pfn in removed:
            self.physmem.put_page(pfn)
        return removed

    def set_size(self, size: int) -> None:
        """Record the new i_size after truncation/extension; bytes past it read zero."""
        if size < self.size:
            if self._fill_end > size:
                self._fill_end = size
            # truncate_inode_partial_folio: zero the tail of the page holding EOF
            page_shift, page_size = self.physmem.page_shift, self.physmem.page_size
            if size & (page_size - 1) and self.unit_shift == page_shift:
                pfn = self.cache.get(size >> page_shift)
                if pfn is not None:
                    tail = page_size - (size & (page_size - 1))
                    self.physmem.write(pfn, size & (page_size - 1), bytes(tail))
        self.size = size

    # --- read(2)/write(2) through the page cache ---------------------------------

    def pread(self, offset: int, size: int) -> bytes:
        """``pread(2)``: up to ``size`` bytes at ``offset`` (short read at EOF).

        Reads through the page cache without populating it for holes."""
        if not isinstance(offset, int) or not isinstance(size, int) or offset < 0 or size < 0:
            raise InputError("pread: offset and size must be non-negative ints")
        if self.kind is FileKind.DEVICE:
            raise InputError("pread: device files are not readable in the model")
        size = max(0, min(size, self.size - offset))
        out = bytearray()
        shift = self.unit_shift
        page_shift, page_size = self.physmem.page_shift, self.physmem.page_size
        while size > 0:
            index = offset >> shift
            within = offset & ((1 << shift) - 1)
            n = min(size, page_size - (within & (page_size - 1)))
            pfn = self.cache.get(index)
            if pfn is not None:
                out += self.physmem.read(pfn + (within >> page_shift), within & (page_size - 1),
                                         n)
            else:
                page = offset >> page_shift
                filled = self._fill and page not in self._holes and offset < self._fill_end
                out += bytes((self._fill if filled else 0,)) * n
            offset += n
            size -= n
        return bytes(out)

    def pwrite(self, offset: int, data: bytes) -> int:
        """``pwrite(2)``: store ``data`` at ``offset`` through the page cache.

        Extends i_size when writing past it; returns the byte count.  Raises
        :class:`InputError` for a read-only file or bad arguments (the kernel
        would return EBADF)."""
        if not isinstance(offset, int) or offset < 0 or not isinstance(data, bytes | bytearray):
            raise InputError("pwrite: offset must be a non-negative int and data bytes")
        if not self.writable:
            raise InputError(f"pwrite: {self.name} is open read-only (EBADF)")
        if self.kind in (FileKind.DEVICE, FileKind.HUGETLBFS):
            raise InputError(f"pwrite: not supported on {self.kind.value} files")
        end = offset + len(data)
        if end > self.size:
            self.size = end
        pos = 0
        page_shift, page_size = self.physmem.page_shift, self.physmem.page_size
        while pos < len(data):
            index = (offset + pos) >> page_shift
            within = (offset + pos) & (page_size - 1)
            n = min(len(data) - pos, page_size - within)
            pfn = self.get_page(index)
            self.physmem.write(pfn, within, bytes(data[pos : pos + n]))
            self.physmem.set_flags(pfn, PG_DIRTY)
            pos += n
        return len(data)

    def huge_index(self, offset: int) -> int:
        """Huge page index of byte ``offset`` (hugetlbfs)."""
        return offset >> self.physmem.pg.pmd_shift

    def snapshot(self) -> tuple[object, ...]:
        """A comparable picture of the inode and its page cache."""
        return (
            self.ino,
            self.size,
            tuple(sorted(self.cache.items())),
            tuple((id(mm), v.start, v.end) for mm, v in self.mappings),
            self._fill_end,
            tuple(sorted(self._holes)),
            tuple(self.resv),
        )
