"""The files a process maps: ``memfd_create`` (``mm/memfd.c``, shmem or
hugetlbfs), a regular file opened on a disk filesystem, a device node over a
BAR, and a dma-buf a driver exports over pinned shmem pages."""

from __future__ import annotations

from kvmmem.errors import ArgumentError, InputError, KernelError
from kvmmem.host.args import bool_arg
from kvmmem.host.file import File, FileKind
from kvmmem.host.mm_types import MmStruct


def memfd_create(mm: MmStruct, name: str, size: int, *, hugetlb: bool = False) -> File:
    """``memfd_create(name)`` + ``ftruncate(size)``: a shmem (or hugetlbfs) file.

    Raises :class:`KernelError` EINVAL for a hugetlbfs size that is not a
    multiple of the huge page size (``PMD_SIZE``: 2 MiB with 4 KiB pages); InputError
    for wrong types."""
    if not isinstance(name, str):
        raise InputError(f"memfd_create: name must be a str, got {name!r}")
    size = size_arg(size, "memfd_create")
    bool_arg(hugetlb, "memfd_create: hugetlb")
    if hugetlb:
        if size % mm.pg.pmd_size:
            raise KernelError("EINVAL", f"ftruncate({name}, {size:#x})", "hugetlbfs size")
        return File(mm.physmem, mm.new_ino(), name, FileKind.HUGETLBFS, size)
    return File(mm.physmem, mm.new_ino(), name, FileKind.SHMEM, size)


def open_file(
    mm: MmStruct, name: str, size: int, *, writable: bool = True, fill: int | None = None
) -> File:
    """A regular file of ``size`` bytes on a disk filesystem, opened O_RDWR (or O_RDONLY).

    ``fill`` is the byte every byte of the file holds on disk (None: zero).
    Its page cache is shared by every mapping of the returned File."""
    if not isinstance(name, str):
        raise InputError(f"open_file: name must be a str, got {name!r}")
    size = size_arg(size, "open_file")
    bool_arg(writable, "open_file: writable")
    if fill is not None and (not isinstance(fill, int) or isinstance(fill, bool)
                             or not 0 <= fill <= 255):
        raise InputError(f"open_file: fill must be a byte 0..255, got {fill!r}")
    return File(mm.physmem, mm.new_ino(), name, FileKind.REGULAR, size,
                writable=writable, fill=fill)


def open_device(mm: MmStruct, name: str, npages: int, *, lazy: bool = False,
                cacheable: bool = False) -> File:
    """A device node over a fresh device region of ``npages`` frames (a PCI BAR).

    mmap kind ``device`` remaps every frame up front (``remap_pfn_range``);
    kind ``device-lazy`` inserts them from the fault handler.  ``cacheable``: memory
    the device exposes coherently (kind ``device-cacheable``: nvgrace-gpu's usemem
    region, remapped at mmap with the default cacheable type)."""
    if not isinstance(name, str):
        raise InputError(f"open_device: name must be a str, got {name!r}")
    bool_arg(cacheable, "open_device: cacheable")
    base = mm.physmem.add_device_region(npages, cacheable=cacheable)
    return File(mm.physmem, mm.new_ino(), name, FileKind.DEVICE, npages * mm.page_size,
                device_base=base, device_lazy=lazy)


def open_vfio_bar(mm: MmStruct, name: str, size: int) -> File:
    """A vfio-pci device fd's BAR region of ``size`` bytes (a power of two, at least a
    page): the BAR's physical base is aligned to its size, as PCI assigns it.

    Raises InputError for a size that is not a power of two."""
    if not isinstance(name, str):
        raise InputError(f"open_vfio_bar: name must be a str, got {name!r}")
    size = size_arg(size, "open_vfio_bar")
    if size < mm.page_size or size & (size - 1):
        raise InputError(f"open_vfio_bar: a PCI BAR's size is a power of two of at least "
                         f"{mm.page_size:#x} bytes, not {size:#x}")
    npages = size >> mm.page_shift
    base = mm.physmem.add_device_region(npages, align=npages)
    return File(mm.physmem, mm.new_ino(), name, FileKind.DEVICE, size,
                device_base=base, vfio_bar=True)


def create_dmabuf(mm: MmStruct, name: str, size: int) -> File:
    """A dma-buf over shmem pages a driver pins when it exports the buffer: a DRM
    shmem dumb buffer (``drm_gem_shmem_get_pages``) or a udmabuf over a memfd.

    Every page is allocated now.  The kernel promises no physical contiguity;
    the model allocates the pages from the last index down, so no page's next
    frame is the buffer's next page (a mapping that assumes contiguity shows)."""
    if not isinstance(name, str):
        raise InputError(f"create_dmabuf: name must be a str, got {name!r}")
    size = size_arg(size, "create_dmabuf")
    if size == 0 or size % mm.page_size:
        raise KernelError("EINVAL", f"create_dmabuf({name}, {size:#x})",
                          "size must be a positive multiple of the page size")
    f = File(mm.physmem, mm.new_ino(), name, FileKind.SHMEM, size, dmabuf=True)
    for index in reversed(range(size >> mm.page_shift)):
        f.get_page(index)
    return f


def size_arg(size: object, call: str) -> int:
    if not isinstance(size, int) or isinstance(size, bool):
        raise ArgumentError(f"{call}: size", f"expected an int, got {size!r}")
    if size < 0:
        raise KernelError("EINVAL", call, "negative size")
    return size
