"""Real host mappings for real-KVM scenario runs: :class:`HostMemory`.

Every mapping kind of SCENARIOS.md is made for real with libc calls
(``mmap``/``munmap``/``mprotect``/``madvise``):

* ``anon`` - private anonymous; ``thp`` - the same, PMD aligned (2 MiB; 32 MiB on
  a 16 KiB-page kernel: :data:`HOST_PAGES`, this kernel's page geometry), with
  ``MADV_HUGEPAGE``; ``hugetlb`` - ``MAP_HUGETLB`` (only when the host's hugetlb
  pool has enough free default-size huge pages: kvmmem never changes
  ``vm.nr_hugepages``);
* ``memfd`` - ``MAP_SHARED`` of a memfd; ``file``/``file-shared`` -
  ``MAP_PRIVATE``/``MAP_SHARED`` of an unlinked temporary file (nothing is left
  on disk);
* ``device`` - a real ``VM_PFNMAP|VM_IO`` mapping whose frames are present from
  mmap on: one perf-event user page (``perf_event_open`` of a disabled
  software dummy event, the only such source kvm-on-this-host.md §3.6 found)
  per 4 KiB page, placed side by side; writable ones are made writable at once
  (a host store triggers the driver's ``pfn_mkwrite``).  Given ``device_bar``
  (a PCI BAR's sysfs ``resourceN`` file, as inside an emulated machine with an
  ``ivshmem-plain`` device), slices of that BAR instead:
  ``pci_mmap_resource_range`` maps them with ``io_remap_pfn_range``, every
  frame present, no struct page.
* ``vfio-bar`` - a PCI BAR mapped through VFIO as a VMM maps a passed-through device
  (:mod:`kvmmem.realkvm.vfio`): given ``vfio_bar`` (a PCI device's name, as inside an
  emulated machine with a second ``ivshmem-plain`` device behind an emulated IOMMU),
  the device is bound to ``vfio-pci`` on first use and each mapping is the next slice
  of its BAR 2 aligned to the mapping's size (up to 1 GiB: a BAR is aligned to its
  size, and so is the model's; :class:`BarSlices`), reading zero (a slice an earlier
  run used is zeroed through the device fd: no user page is touched, for
  ``vfio_pci_core_mmap`` maps nothing and its fault handler inserts the frames) and
  ``mmap``-ed from the device fd at the region's offset; the host address is aligned
  the same way.  Refused (:class:`MappingUnsupported`, naming the step and errno)
  where no such device is, or VFIO cannot take it.
* ``device-lazy`` - no source here; :class:`MappingUnsupported` says why.
* ``guest_memfd`` - a file ``KVM_CREATE_GUEST_MEMFD`` made on the scenario's VM
  (:meth:`HostMemory.adopt_guest_memfd` takes the fd), ``MAP_SHARED`` in place when
  its flags hold ``GUEST_MEMFD_FLAG_MMAP``, else only a name for the file.

The file behind a ``memfd``, ``file``, ``file-shared`` or ``guest_memfd`` mapping
stays open until :meth:`HostMemory.close`, for ``punch_hole``
(:meth:`HostMemory.punch_hole`, ``fallocate(PUNCH_HOLE | KEEP_SIZE)``); holding it
changes nothing a scenario can see (a memfd's pages outlive an munmap, but no name
denotes them any more).
* ``dmabuf`` - a DRM shmem dumb buffer (``/dev/dri/card0``, as a virtio-gpu
  device gives inside an arm64 machine: ``DRM_IOCTL_MODE_CREATE_DUMB`` and
  ``MAP_DUMB``), else a udmabuf over a sealed memfd (``/dev/udmabuf``), mmapped in
  place; refused (:class:`MappingUnsupported`) where neither exists or where the
  kernel maps it without VM_PFNMAP (5.10's DRM mmap is VM_MIXEDMAP).

Mappings live in an arena reserved (``PROT_NONE``, ``MAP_NORESERVE``) far from
the addresses the kernel hands out on its own, so a range a scenario unmaps is
never reused behind its back, and closing releases the whole arena at once.

Host loads and stores never touch the memory directly: a load is
``write(pipe, addr, n)`` and a store is ``read(pipe, addr, n)``, so an
inaccessible address gives EFAULT instead of killing the process
(kvm-on-this-host.md §7).  EFAULT becomes ``{"result": "signal", "signal":
"SIGSEGV"}``, or ``SIGBUS`` when a VMA with the needed permission covers the
address (a beyond-EOF page, a driver that refuses the fault).
"""

from __future__ import annotations

import errno
import fcntl
import mmap as _mmap
import os
import struct
import tempfile
from dataclasses import dataclass
from typing import Any

from kvmmem.realkvm import libc, vfio
from kvmmem.types import PAGE_GEOMETRIES, PAGE_SIZE, PAGES_4K, PUD_SIZE, align_up

HOST_PAGES = PAGE_GEOMETRIES.get(_mmap.PAGESIZE, PAGES_4K)
"""The page geometry of the kernel this runs on (an arm64 machine may run 16 KiB pages).
Placement, THP alignment and the hugetlb pool use its PMD size; stores and device pages
stay in 4 KiB steps (a scenario's sizes are 4 KiB multiples; the kernel rounds a
mapping up to its page size, as the model does)."""
PMD_SIZE = HOST_PAGES.pmd_size

Outcome = dict[str, Any]

ARENA_HINT = 0x1000_0000_0000
"""Where the mapping arena is placed (16 TiB): far below the top-down area the
kernel allocates from, so nothing else lands in a hole a scenario makes."""
ARENA_SIZE = 1 << 40
ARENA_TRIES = 16
GUARD = PMD_SIZE
"""Unmapped (PROT_NONE) gap between two arena allocations, so VMAs never merge."""
MAX_DEVICE_SIZE = 64 << 20
"""A device mapping takes one perf event per page; larger ones are refused."""

KINDS = ("anon", "memfd", "file", "file-shared", "hugetlb", "thp", "device", "device-lazy",
         "dmabuf", "vfio-bar")
VFIO_BAR_INDEX = 2
"""The BAR of the ``vfio_bar`` device that ``vfio-bar`` mappings slice (ivshmem's
shared memory)."""
DRM_CARD = "/dev/dri/card0"
UDMABUF = "/dev/udmabuf"


def _iowr(group: int, nr: int, size: int) -> int:
    """``_IOWR(group, nr, size)`` (``_IOW`` differs only in the direction bits)."""
    return (3 << 30) | (size << 16) | (group << 8) | nr


DRM_IOCTL_MODE_CREATE_DUMB = _iowr(ord("d"), 0xB2, 32)
"""``struct drm_mode_create_dumb``: height, width, bpp, flags, handle, pitch (u32), size."""
DRM_IOCTL_MODE_MAP_DUMB = _iowr(ord("d"), 0xB3, 16)
"""``struct drm_mode_map_dumb``: handle, pad (u32), offset (u64)."""
UDMABUF_CREATE = (1 << 30) | (24 << 16) | (ord("u") << 8) | 0x42
"""``_IOW('u', 0x42, struct udmabuf_create)``: memfd, flags (u32), offset, size (u64)."""
UDMABUF_FLAGS_CLOEXEC = 1
F_ADD_SEALS = 1033
F_SEAL_SHRINK = 0x0002
MFD_ALLOW_SEALING = 0x0002
DUMB_PITCH = PAGE_SIZE
"""Dumb buffers are made 1024 pixels of 32 bits wide: one page per row, so a buffer
of N pages is N rows and exactly N pages."""


def vm_flags_of(addr: int) -> list[str]:
    """The smaps ``VmFlags`` of the mapping containing ``addr`` ([] when none)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(" ", 1)[0]
            if "-" in head and not head.endswith(":"):
                lo, _, hi = head.partition("-")
                try:
                    inside = int(lo, 16) <= addr < int(hi, 16)
                except ValueError:
                    inside = False
            elif inside and line.startswith("VmFlags:"):
                return line.split()[1:]
    return []
ADVICE = {
    "dontneed": libc.MADV_DONTNEED,
    "remove": libc.MADV_REMOVE,
    "hugepage": libc.MADV_HUGEPAGE,
    "nohugepage": libc.MADV_NOHUGEPAGE,
}


class MappingUnsupported(RuntimeError):
    """This host cannot make the mapping kind asked for; ``str()`` says why."""


class BarSlices:
    """Which slices of a RAM-like BAR (ivshmem's) the ``vfio-bar`` mappings of this boot
    have used: each new mapping takes the next slice aligned to its size
    (:func:`vfio_slice_alignment`), wrapping to the start when the BAR is used up.  The
    BAR is zero at boot and slices are handed out in order, so only a slice below the
    high-water mark of earlier ones can hold old data and needs zeroing: zeroing
    through the device fd takes about 45 s per GiB under TCG, so each byte is zeroed
    at most once per wrap."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.next = 0
        self.dirty_end = 0
        """Everything at or above it is untouched since boot."""

    def take(self, size: int, held: list[tuple[int, int]]) -> tuple[int, int]:
        """``(offset, bytes to zero from offset)`` of a new slice of ``size`` bytes that
        overlaps none of ``held`` (slices still mapped).  Raises ``ValueError`` when no
        such slice exists."""
        align = vfio_slice_alignment(size)
        offset = align_up(self.next, align)
        if offset + size > self.size:
            offset = 0
        if offset + size > self.size or any(o < offset + size and offset < o + n
                                            for o, n in held):
            used = sum(n for _, n in held)
            raise ValueError(f"a {size >> 10} KiB slice aligned to {align >> 10} KiB does "
                             f"not fit the {self.size >> 20} MiB BAR beside the "
                             f"{used >> 10} KiB this run maps")
        self.next = offset + size
        dirty = max(0, min(offset + size, self.dirty_end) - offset)
        self.dirty_end = max(self.dirty_end, offset + size)
        return offset, dirty


BAR_SLICES: dict[str, BarSlices] = {}
"""The slices of each vfio device's BAR used since boot (the agent process lives as long
as the machine), by PCI device name."""


def vfio_slice_alignment(size: int) -> int:
    """Where a ``vfio-bar`` mapping of ``size`` bytes starts in the BAR and in the
    arena: the smallest power of two not below ``size``, at least 2 MiB, at most
    1 GiB (a BAR is aligned to its size; the host's huge PFNMAP leaves are 2 MiB and
    1 GiB)."""
    align = PMD_SIZE
    while align < size and align < PUD_SIZE:
        align <<= 1
    return align


@dataclass(slots=True)
class HostMapping:
    """A mapping made by :meth:`HostMemory.mmap`: its name keeps denoting
    ``[hva, hva + size)`` after it is unmapped or replaced (SCENARIOS.md)."""

    name: str
    kind: str
    hva: int
    size: int
    prot: int
    fd: int = -1
    """The file behind the mapping (owned by :class:`HostMemory`), -1 for none."""
    mapped: bool = True
    """False for a guest_memfd without ``GUEST_MEMFD_FLAG_MMAP`` (``hva`` is 0)."""


def _meminfo(field: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key == field:
                return int(rest.split()[0])
    return 0


def _thp_mode() -> str:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            text = f.read()
    except OSError:
        return "never"
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if start >= 0 < end else "never"


def hugetlb_free_bytes() -> int:
    """Bytes of free default-size (PMD: 2 MiB, 32 MiB with 16 KiB pages) hugetlb pages in
    the host pool (0 without a pool)."""
    if _meminfo("Hugepagesize") != PMD_SIZE >> 10:
        return 0
    return _meminfo("HugePages_Free") * PMD_SIZE


def vma_covers(addr: int, size: int, perm: str) -> bool:
    """Whether VMAs with permission ``perm`` (``"r"`` or ``"w"``) cover
    ``[addr, addr + size)`` in /proc/self/maps."""
    need = addr
    end = addr + size
    with open("/proc/self/maps") as f:
        for line in f:
            span, perms = line.split()[:2]
            lo_text, hi_text = span.split("-")
            lo, hi = int(lo_text, 16), int(hi_text, 16)
            if lo <= need < hi:
                if perm not in perms:
                    return False
                need = hi
                if need >= end:
                    return True
    return False


class HostMemory:
    """The host side of a real-KVM scenario run: named mappings, host operations and
    safe host loads/stores.  Use as a context manager (or :meth:`close`): every
    mapping, fd and the pipe are released on every path."""

    def __init__(self, arena_size: int = ARENA_SIZE, file_dir: str | None = None,
                 device_bar: str | None = None, vfio_bar: str | None = None,
                 vfio_modules: str | None = None) -> None:
        self.mappings: dict[str, HostMapping] = {}
        self._file_dir = file_dir
        """Where ``file`` mappings get their (unlinked) file: a page-cache filesystem."""
        self._device_bar = device_bar
        self._bar_next = 0
        self._vfio_bar = vfio_bar
        """The PCI device (``DDDD:BB:SS.F``) whose BAR ``vfio-bar`` mappings slice."""
        self._vfio_modules = vfio_modules
        """Where the vfio modules and their ``load`` list are (None: built in or loaded)."""
        self._vfio: vfio.VfioPciDevice | None = None
        """The :class:`~kvmmem.realkvm.vfio.VfioPciDevice` once a vfio-bar is mapped."""
        self._vfio_slices: list[tuple[int, int]] = []
        """``(offset, size)`` of the BAR slices this object's mappings hold."""
        self._arena = 0
        self._arena_size = arena_size
        self._pipe: tuple[int, int] | None = None
        self._drm_fd = -1
        """``/dev/dri/card0`` while dumb buffers exist (their handles die with it)."""
        self._fds: list[int] = []
        """Files behind mappings, kept for ``punch_hole``; closed with the arena."""
        try:
            flags = libc.MAP_PRIVATE | libc.MAP_ANONYMOUS | libc.MAP_NORESERVE
            addr, err = 0, errno.EEXIST
            for k in range(ARENA_TRIES):  # another HostMemory may hold the first hint
                addr, err = libc.mmap(ARENA_HINT + k * arena_size, arena_size,
                                      libc.PROT_NONE, flags | libc.MAP_FIXED_NOREPLACE)
                if not err:
                    break
            if err:
                addr, err = libc.mmap(0, arena_size, libc.PROT_NONE, flags)
            if err:
                raise OSError(err, f"cannot reserve the mapping arena: {libc.errno_name(err)}")
            self._arena = addr
            self._next = align_up(addr, PMD_SIZE)
            self._pipe = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Unmap the whole arena (every mapping made here) and close the pipe.
        Idempotent."""
        if self._arena:
            libc.munmap(self._arena, self._arena_size)
            self._arena = 0
        if self._pipe is not None:
            for fd in self._pipe:
                os.close(fd)
            self._pipe = None
        if self._drm_fd >= 0:
            os.close(self._drm_fd)
            self._drm_fd = -1
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()
        if self._vfio is not None:
            self._vfio.close()  # after the arena: no mapping of the device is left
            self._vfio = None
        self.mappings.clear()

    def __enter__(self) -> HostMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- addresses ------------------------------------------------------------------

    def hva(self, name: str, offset: int = 0) -> int:
        """The host address ``offset`` bytes into mapping ``name``.  Raises ``KeyError``."""
        return self.mappings[name].hva + offset

    def _place(self, size: int, align: int = PMD_SIZE) -> int:
        base = align_up(self._next, align)
        end = base + align_up(size, PMD_SIZE)
        if end + GUARD > self._arena + self._arena_size:
            raise MappingUnsupported(f"the {self._arena_size >> 30} GiB mapping arena is full")
        self._next = end + GUARD
        return base

    # --- mmap -------------------------------------------------------------------------

    def mmap(self, name: str, size: int, kind: str, prot: int, fill: int | None = None,
             at: int | None = None) -> Outcome:
        """Create mapping ``name`` (SCENARIOS.md mapping keys; ``at`` is a host address for
        MAP_FIXED).  Returns ``{"result": "ok"}`` or ``{"result": "error", "errno": N}``;
        raises :class:`MappingUnsupported` for a kind this host cannot make and
        ``ValueError`` for an unknown kind."""
        if kind not in KINDS:
            raise ValueError(f"unknown mapping kind {kind!r}")
        if size <= 0 or size % PAGE_SIZE:
            return {"result": "error", "errno": "EINVAL"}
        self._check_supported(kind, size)
        align = vfio_slice_alignment(size) if kind == "vfio-bar" else PMD_SIZE
        hva = at if at is not None else self._place(size, align)
        map_prot = prot | libc.PROT_WRITE if fill is not None else prot
        fd = -1
        if kind == "device":
            err = self._map_device(hva, size, map_prot)
        elif kind == "vfio-bar":
            err = self._map_vfio_bar(hva, size, map_prot)
        elif kind == "dmabuf":
            err = self._map_dmabuf(hva, size, map_prot)
        else:
            err, fd = self._map_plain(hva, size, kind, map_prot)
        # The name denotes the range even when the mmap failed (SCENARIOS.md).
        self.mappings[name] = HostMapping(name, kind, hva, size, prot, fd)
        if err:
            return {"result": "error", "errno": libc.errno_name(err)}
        if fill is not None:
            self._fill(hva, size, kind, fill)
            if map_prot != prot:
                libc.mprotect(hva, size, prot)
        return {"result": "ok"}

    def _check_supported(self, kind: str, size: int) -> None:
        if kind == "hugetlb":
            # MAP_HUGETLB rounds the length up to the huge page size (ksys_mmap_pgoff)
            need = align_up(size, PMD_SIZE)
            huge = PMD_SIZE >> 20
            free = hugetlb_free_bytes()
            if free < need:
                raise MappingUnsupported(
                    f"hugetlb needs {need // PMD_SIZE} free {huge} MiB pages and the host "
                    f"pool has {free // PMD_SIZE} (HugePages_Free); kvmmem does not change "
                    "vm.nr_hugepages")
        elif kind == "thp" and _thp_mode() == "never":
            raise MappingUnsupported("transparent huge pages are disabled on this host "
                                     "(/sys/kernel/mm/transparent_hugepage/enabled)")
        elif kind == "device" and self._device_bar is not None:
            bar_size = os.stat(self._device_bar).st_size
            if self._bar_next + size > bar_size:
                raise MappingUnsupported(
                    f"device mappings of {(self._bar_next + size) >> 10} KiB in all do not "
                    f"fit the {bar_size >> 10} KiB PCI BAR {self._device_bar}")
        elif kind == "device" and size > MAX_DEVICE_SIZE:
            raise MappingUnsupported(
                f"a device mapping is built from one perf-event page per 4 KiB; "
                f"{size >> 20} MiB is more than the {MAX_DEVICE_SIZE >> 20} MiB kvmmem makes")
        elif kind == "vfio-bar" and self._vfio_bar is None:
            raise MappingUnsupported(
                "no PCI device here may be bound to vfio-pci for vfio-bar mappings (the "
                "machines give one: an ivshmem-plain device behind an emulated IOMMU)")
        elif kind == "device-lazy" and self._device_bar is not None:
            raise MappingUnsupported(
                "no VM_PFNMAP source inside the machine inserts device frames lazily the "
                "way device-lazy describes (read-only on a read fault, pfn_mkwrite on a "
                "write); DRM shmem buffers and udmabuf insert writable RAM pages on the "
                "first fault: that is the dmabuf kind")
        elif kind == "device-lazy":
            raise MappingUnsupported(
                "no VM_PFNMAP source on this host inserts frames lazily on first touch "
                "(perf rings map every page at mmap time; vvar cannot be placed; no "
                "dma-buf, vfio or uio device)")

    def adopt_guest_memfd(self, name: str, fd: int, size: int, prot: int, mapped: bool,
                          fill: int | None = None, at: int | None = None) -> Outcome:
        """Mapping ``name`` over the guest_memfd ``fd`` (this object owns it from now on;
        -1 when ``KVM_CREATE_GUEST_MEMFD`` failed: the name then stands for no file).
        ``mapped``: ``MAP_SHARED`` of ``size`` bytes with ``prot`` (at ``at``, else a
        new arena range), filled through the kernel (a page the guest_memfd refuses to
        the host, ``kvm_gmem_fault_user_mapping``'s SIGBUS, ends the fill with that
        signal); else the name denotes the file alone.  Returns ``ok``, ``error`` (the
        mmap's errno) or ``signal``."""
        if fd >= 0:
            self._fds.append(fd)
        if not mapped:
            self.mappings[name] = HostMapping(name, "guest_memfd", 0, size, prot, fd, False)
            return {"result": "ok"}
        hva = at if at is not None else self._place(size)
        map_prot = prot | libc.PROT_WRITE if fill is not None else prot
        self.mappings[name] = HostMapping(name, "guest_memfd", hva, size, prot, fd)
        _, err = libc.mmap(hva, size, map_prot, libc.MAP_SHARED | libc.MAP_FIXED, fd, 0)
        if err:
            return {"result": "error", "errno": libc.errno_name(err)}
        if fill is not None:
            page = bytes([fill]) * PAGE_SIZE
            for off in range(0, size, PAGE_SIZE):
                if not self._store(hva + off, page):
                    return self._signal(hva + off, PAGE_SIZE, "w")
            if map_prot != prot:
                libc.mprotect(hva, size, prot)
        return {"result": "ok"}

    def _map_plain(self, hva: int, size: int, kind: str, prot: int) -> tuple[int, int]:
        """mmap a plain kind in place: ``(errno or 0, the file's fd kept open or -1)``."""
        flags = libc.MAP_FIXED
        fd = -1
        try:
            if kind in ("anon", "thp"):
                flags |= libc.MAP_PRIVATE | libc.MAP_ANONYMOUS
            elif kind == "hugetlb":
                flags |= libc.MAP_PRIVATE | libc.MAP_ANONYMOUS | libc.MAP_HUGETLB
            elif kind == "memfd":
                fd = os.memfd_create("kvmmem", os.MFD_CLOEXEC)
                os.ftruncate(fd, size)
                flags |= libc.MAP_SHARED
            else:
                with tempfile.TemporaryFile(dir=self._file_dir) as tmp:  # unlinked: no file
                    fd = os.dup(tmp.fileno())
                os.ftruncate(fd, size)
                flags |= libc.MAP_SHARED if kind == "file-shared" else libc.MAP_PRIVATE
            _, err = libc.mmap(hva, size, prot, flags, fd, 0)
        except OSError as exc:
            if fd >= 0:
                os.close(fd)
            return exc.errno or errno.EIO, -1
        if fd >= 0:
            self._fds.append(fd)  # for punch_hole; closed with the arena
        if not err and kind == "thp":
            err = libc.madvise(hva, size, libc.MADV_HUGEPAGE)
        return err, fd

    def _map_device(self, hva: int, size: int, prot: int) -> int:
        """One perf user page per 4 KiB page, each MAP_SHARED|MAP_FIXED in place; or the
        next unused slice of the PCI BAR, zeroed first."""
        if self._device_bar is not None:
            return self._map_bar(hva, size, prot)
        for off in range(0, size, PAGE_SIZE):
            fd, err = libc.perf_event_open_dummy()
            if err:
                raise MappingUnsupported(
                    f"perf_event_open (the VM_PFNMAP source) failed: {libc.errno_name(err)}")
            try:
                _, err = libc.mmap(hva + off, PAGE_SIZE, prot, libc.MAP_SHARED | libc.MAP_FIXED,
                                   fd, 0)
            finally:
                os.close(fd)
            if err:
                return err
            if prot & libc.PROT_WRITE:
                # Frames are present from mmap on; make the PTE writable now, as
                # remap_pfn_range of a writable device mapping would (pfn_mkwrite).
                value = self.host_read(hva + off, 8)
                if value["result"] == "ok":
                    self.host_write(hva + off, 8, value["value"])
        return 0

    def _map_dmabuf(self, hva: int, size: int, prot: int) -> int:
        """A DRM dumb buffer (else a udmabuf) of ``size`` bytes, MAP_SHARED|MAP_FIXED at
        ``hva``; raises :class:`MappingUnsupported` without a source or when the kernel
        does not map it VM_PFNMAP (the mapping is replaced by the arena's PROT_NONE)."""
        fd, offset, source = self._dmabuf_source(size)
        try:
            _, err = libc.mmap(hva, size, prot, libc.MAP_SHARED | libc.MAP_FIXED, fd, offset)
        finally:
            if fd != self._drm_fd:
                os.close(fd)
        if err:
            return err
        flags = vm_flags_of(hva)
        if "pf" not in flags:
            libc.mmap(hva, size, libc.PROT_NONE, libc.MAP_PRIVATE | libc.MAP_ANONYMOUS
                      | libc.MAP_NORESERVE | libc.MAP_FIXED)
            raise MappingUnsupported(
                f"this kernel maps a {source} without VM_PFNMAP (VmFlags: {' '.join(flags)}; "
                "as 5.10's DRM shmem mmap is VM_MIXEDMAP), so it is not the dmabuf kind")
        return 0

    def _dmabuf_source(self, size: int) -> tuple[int, int, str]:
        """``(fd, mmap offset, what)`` of a new buffer of ``size`` bytes."""
        if os.path.exists(DRM_CARD):
            if self._drm_fd < 0:
                self._drm_fd = os.open(DRM_CARD, os.O_RDWR | os.O_CLOEXEC)
            # The mmap offset of a dumb buffer is its DRM fake offset, which these kernels
            # leave in vm_pgoff.  The model's dma-buf has vm_pgoff 0, so arm64's block
            # sizing sees the same congruence only when the fake offset is a multiple of
            # PMD_SIZE: a padding buffer fills the offset space up to the next multiple.
            # (Buffers are kept until the card is closed: a freed offset is not reused at
            # once.)
            # (a buffer takes whole pages of the offset space: the kernel's, 16 KiB on
            # a 16K-page kernel)
            _, offset = self._dumb_buffer(HOST_PAGES.page_size)
            pad = -(offset + HOST_PAGES.page_size) % PMD_SIZE
            if pad:
                self._dumb_buffer(pad)
            _, offset = self._dumb_buffer(size)
            if offset % PMD_SIZE:
                raise MappingUnsupported(
                    f"the DRM fake offset of a new dumb buffer is {offset:#x}, not a multiple "
                    f"of {PMD_SIZE >> 20} MiB as the model's dma-buf (vm_pgoff 0) needs")
            return self._drm_fd, offset, "DRM shmem dumb buffer"
        if os.path.exists(UDMABUF):
            memfd = os.memfd_create("kvmmem-udmabuf", os.MFD_CLOEXEC | MFD_ALLOW_SEALING)
            try:
                os.ftruncate(memfd, size)
                fcntl.fcntl(memfd, F_ADD_SEALS, F_SEAL_SHRINK)
                dev = os.open(UDMABUF, os.O_RDWR | os.O_CLOEXEC)
                try:
                    arg = bytearray(struct.pack("=IIQQ", memfd, UDMABUF_FLAGS_CLOEXEC, 0, size))
                    fd = fcntl.ioctl(dev, UDMABUF_CREATE, arg)
                finally:
                    os.close(dev)
            except OSError as exc:
                raise MappingUnsupported(
                    f"a {size >> 10} KiB udmabuf failed: {libc.errno_name(exc.errno or 0)}"
                ) from None
            finally:
                os.close(memfd)
            return fd, 0, "udmabuf"
        raise MappingUnsupported(
            f"no dma-buf source here: neither {DRM_CARD} (a DRM driver with dumb buffers, "
            f"such as virtio-gpu) nor {UDMABUF}")

    def _dumb_buffer(self, size: int) -> tuple[int, int]:
        """``(handle, mmap offset)`` of a new DRM dumb buffer of ``size`` bytes (one
        page per row)."""
        create = bytearray(struct.pack("=6IQ", size // DUMB_PITCH, DUMB_PITCH // 4, 32,
                                       0, 0, 0, 0))
        try:
            fcntl.ioctl(self._drm_fd, DRM_IOCTL_MODE_CREATE_DUMB, create)
            handle = struct.unpack_from("=6IQ", create)[4]
            mapped = bytearray(struct.pack("=IIQ", handle, 0, 0))
            fcntl.ioctl(self._drm_fd, DRM_IOCTL_MODE_MAP_DUMB, mapped)
        except OSError as exc:
            raise MappingUnsupported(
                f"a {size >> 10} KiB DRM dumb buffer on {DRM_CARD} failed: "
                f"{libc.errno_name(exc.errno or 0)}") from None
        return handle, struct.unpack_from("=IIQ", mapped)[2]

    def _vfio_device(self) -> vfio.VfioPciDevice:
        """The vfio-pci device of ``vfio_bar``, opened on first use: modules loaded,
        the device bound to vfio-pci, container, group and device fds.  Raises
        :class:`MappingUnsupported` with the step that failed."""
        if self._vfio is None:
            assert self._vfio_bar is not None
            try:
                if self._vfio_modules is not None:
                    vfio.load_vfio_modules(self._vfio_modules)
                vfio.bind_vfio_pci(self._vfio_bar)
                self._vfio = vfio.VfioPciDevice(self._vfio_bar)
            except vfio.VfioUnavailable as exc:
                hint = "" if self._vfio_modules is not None else (
                    " (no vfio modules were found to load: in a machine, kvmmem machine "
                    "fetch ARCH VERSION adds them)")
                raise MappingUnsupported(f"vfio-bar: {exc}{hint}") from None
        return self._vfio

    def _map_vfio_bar(self, hva: int, size: int, prot: int) -> int:
        """The next slice of the vfio device's BAR (aligned to the mapping's size; see
        :class:`BarSlices`), ``mmap``-ed from the device fd at ``hva``."""
        device = self._vfio_device()
        assert self._vfio_bar is not None
        try:
            bar_size = device.region_info(vfio.VFIO_PCI_BAR0_REGION_INDEX + VFIO_BAR_INDEX).size
            slices = BAR_SLICES.setdefault(self._vfio_bar, BarSlices(bar_size))
            offset, dirty = slices.take(size, self._vfio_slices)
            if dirty:
                device.zero_bar(VFIO_BAR_INDEX, offset, dirty)
        except vfio.VfioUnavailable as exc:
            raise MappingUnsupported(f"vfio-bar: {exc}") from None
        except ValueError as exc:
            raise MappingUnsupported(f"vfio-bar: {exc} (BAR {VFIO_BAR_INDEX} of "
                                     f"{self._vfio_bar})") from None
        err = device.mmap_bar(VFIO_BAR_INDEX, offset, size, hva, prot)
        if not err:
            self._vfio_slices.append((offset, size))
        return err

    def _map_bar(self, hva: int, size: int, prot: int) -> int:
        assert self._device_bar is not None
        offset = self._bar_next
        fd = os.open(self._device_bar, os.O_RDWR | os.O_CLOEXEC)
        try:
            _, err = libc.mmap(hva, size, prot | libc.PROT_READ | libc.PROT_WRITE,
                               libc.MAP_SHARED | libc.MAP_FIXED, fd, offset)
        finally:
            os.close(fd)
        if err:
            return err
        self._bar_next += size
        # The BAR is RAM-like and outlives scenarios: zero it with the kernel's aligned
        # page copies (libc's memset may use instructions Device memory refuses).
        zero = bytes(PAGE_SIZE)
        for off in range(0, size, PAGE_SIZE):
            self._store(hva + off, zero)
        return libc.mprotect(hva, size, prot)

    def _fill(self, hva: int, size: int, kind: str, byte: int) -> None:
        if kind not in ("device", "vfio-bar"):
            libc.memset(hva, byte, size)
            return
        page = bytes([byte]) * PAGE_SIZE
        for off in range(0, size, PAGE_SIZE):
            self._store(hva + off, page)

    # --- host operations ----------------------------------------------------------------

    def munmap(self, hva: int, size: int) -> Outcome:
        """``munmap(2)``: ``ok`` or ``error`` with the errno name."""
        return _outcome(libc.munmap(hva, size))

    def mprotect(self, hva: int, size: int, prot: int) -> Outcome:
        """``mprotect(2)``: ``ok`` or ``error``."""
        return _outcome(libc.mprotect(hva, size, prot))

    def madvise(self, hva: int, size: int, advice: str) -> Outcome:
        """``madvise(2)`` with ``advice`` one of ``dontneed``, ``remove``, ``hugepage``,
        ``nohugepage``: ``ok`` or ``error``.  Raises ``ValueError`` for another name."""
        if advice not in ADVICE:
            raise ValueError(f"unknown madvise advice {advice!r}")
        return _outcome(libc.madvise(hva, size, ADVICE[advice]))

    def punch_hole(self, name: str, offset: int, size: int) -> Outcome:
        """``fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, size)`` on the
        file behind mapping ``name``: ``ok`` or ``error`` with the errno name (EBADF for a
        guest_memfd KVM refused to create).  Raises :class:`MappingUnsupported` for a
        mapping with no file here (anonymous kinds, device, dmabuf) and ``KeyError`` for
        an unknown name."""
        mapping = self.mappings[name]
        if mapping.fd < 0 and mapping.kind != "guest_memfd":
            raise MappingUnsupported(f"punch_hole: memory {name} is kind {mapping.kind}: "
                                     "no file behind it here")
        return _outcome(libc.fallocate(
            mapping.fd, libc.FALLOC_FL_PUNCH_HOLE | libc.FALLOC_FL_KEEP_SIZE, offset, size))

    # --- loads and stores ---------------------------------------------------------------

    def host_read(self, hva: int, size: int) -> Outcome:
        """A userspace load of ``size`` bytes at ``hva``: ``ok`` with the little-endian
        ``value``, or ``signal`` (SIGSEGV / SIGBUS) where the load would fault."""
        data = self._load(hva, size)
        if data is None:
            return self._signal(hva, size, "r")
        return {"result": "ok", "value": int.from_bytes(data, "little")}

    def host_write(self, hva: int, size: int, value: int) -> Outcome:
        """A userspace store of the low ``size`` bytes of ``value`` at ``hva``: ``ok`` or
        ``signal``."""
        data = (value & ((1 << 8 * size) - 1)).to_bytes(size, "little")
        if not self._store(hva, data):
            return self._signal(hva, size, "w")
        return {"result": "ok"}

    def _pipe_fds(self) -> tuple[int, int]:
        if self._pipe is None:
            raise ValueError("HostMemory is closed")
        return self._pipe

    def _load(self, hva: int, size: int) -> bytes | None:
        """``size`` bytes at ``hva`` read by the kernel (``write(pipe, hva)``), or None."""
        rd, wr = self._pipe_fds()
        n, err = libc.write_from(wr, hva, size)
        data = os.read(rd, n) if n else b""
        return None if err or n < size else data

    def _store(self, hva: int, data: bytes) -> bool:
        """Store ``data`` at ``hva`` through the kernel (``read(pipe, hva)``)."""
        rd, wr = self._pipe_fds()
        os.write(wr, data)
        n, err = libc.read_into(rd, hva, len(data))
        if err or n < len(data):
            try:
                while os.read(rd, PAGE_SIZE):
                    pass
            except BlockingIOError:
                pass
            return False
        return True

    @staticmethod
    def _signal(hva: int, size: int, perm: str) -> Outcome:
        signal = "SIGBUS" if vma_covers(hva, size, perm) else "SIGSEGV"
        return {"result": "signal", "signal": signal}


def _outcome(err: int) -> Outcome:
    return {"result": "ok"} if err == 0 else {"result": "error", "errno": libc.errno_name(err)}
