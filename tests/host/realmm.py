"""The real Linux mm of the test process, driven through ctypes on libc.

This is the reference side of the differential test (tests/host/test_differential.py):
every call here is the real system call - ``mmap(2)``, ``munmap(2)``, ``mprotect(2)``,
``madvise(2)``, ``mremap(2)`` - made by this very process, and the result is read back
from ``/proc/self/smaps`` (``show_smap()`` in fs/proc/task_mmu.c).

Safety: everything happens inside a *scratch window*, a range of pages reserved with one
PROT_NONE private anonymous mapping.  Every call that can create or destroy a mapping
must name fixed addresses inside the window (MAP_FIXED / MAP_FIXED_NOREPLACE /
MREMAP_FIXED); :class:`RealMm` refuses (ValueError) any call whose page-rounded range
leaves the window, and never lets the kernel pick an address.  The window is placed far
below the top-down mmap area (``_WINDOW_HINTS``), so that a hole punched into it is
never the highest free gap ``get_unmapped_area`` would hand to another mmap of this
process (the Python allocator, numpy, ...): a MAP_FIXED into such a hole could otherwise
clobber the interpreter's own memory.

Loads and stores never touch the memory from user mode (a real SIGSEGV/SIGBUS would kill
the test run).  They go through a pipe instead:

* a load of ``n`` bytes at ``addr`` is ``write(pipe_w, addr, n)`` (``copy_from_user``) and
  reading the bytes back out of the pipe;
* a store is writing the bytes into the pipe first and then ``read(pipe_r, addr, n)``
  (``copy_to_user``).

Both user copies take the ordinary page-fault path of the kernel (``handle_mm_fault``
via ``do_user_addr_fault``): pages are faulted in, write faults break COW and call
``page_mkwrite``, exactly as a user-mode access does.  Where a user access would get a
signal, the user copy fails with EFAULT instead.  EFAULT cannot tell SIGSEGV (no VMA,
protection) from SIGBUS (beyond EOF of a file mapping): the harness reports both as
"fault" and the caller decides what the model had to raise.  Accesses never cross a page
boundary, so a copy is all or nothing.

Files: memfds (``memfd_create``) and regular files in a private
``tempfile.TemporaryDirectory`` (optionally opened O_RDONLY).  :meth:`RealMm.close`
unmaps the whole window, closes every descriptor and removes the directory: the process
is left as it was found.
"""

from __future__ import annotations

import ctypes
import errno as _errno
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from types import TracebackType

PAGE_SIZE = 4096

# include/uapi/asm-generic/mman-common.h and mman.h (x86-64 values)
PROT_NONE = 0x0
PROT_READ = 0x1
PROT_WRITE = 0x2
PROT_EXEC = 0x4
MAP_SHARED = 0x01
MAP_PRIVATE = 0x02
MAP_FIXED = 0x10
MAP_ANONYMOUS = 0x20
MAP_NORESERVE = 0x4000
MAP_FIXED_NOREPLACE = 0x100000
MADV_NORMAL = 0
MADV_DONTNEED = 4
MADV_REMOVE = 9
MADV_HUGEPAGE = 14
MADV_NOHUGEPAGE = 15
MADVICE: dict[str, int] = {
    "normal": MADV_NORMAL,
    "dontneed": MADV_DONTNEED,
    "remove": MADV_REMOVE,
    "hugepage": MADV_HUGEPAGE,
    "nohugepage": MADV_NOHUGEPAGE,
}
MREMAP_MAYMOVE = 1
MREMAP_FIXED = 2

_MAP_FAILED = (1 << 64) - 1

# /proc/PID/pagemap entry bits (Documentation/admin-guide/mm/pagemap.rst)
PM_PRESENT = 1 << 63
PM_SWAP = 1 << 62
PM_FILE = 1 << 61
PM_MMAP_EXCLUSIVE = 1 << 56

# Far below mmap_base (~0x7fxx_xxxx_xxxx with ASLR) and far above brk: see the module doc.
_WINDOW_HINTS = (0x3A5A_0000_0000, 0x2A5A_0000_0000, 0x1A5A_0000_0000, 0x4A5A_0000_0000)

KINDS = ("anon", "memfd", "file", "file-shared")
"""The mapping kinds the harness can create (the model's VmaKind scenario names)."""


def unsupported_reason() -> str | None:
    """Why the real mm cannot be driven here (None: it can)."""
    if not sys.platform.startswith("linux"):
        return f"needs Linux (/proc/self/smaps, mmap flags), running on {sys.platform}"
    if os.uname().machine != "x86_64":
        return f"flag values and fault rules are those of x86-64, not {os.uname().machine}"
    if os.sysconf("SC_PAGE_SIZE") != PAGE_SIZE:
        return "needs 4 KiB pages"
    if not hasattr(os, "memfd_create"):
        return "needs os.memfd_create"
    return None


def _page_align(n: int) -> int:
    return (n + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)


def errno_name(err: int) -> str:
    """``EINVAL`` for 22: the name the model's KernelError carries."""
    return _errno.errorcode.get(err, f"E{err}")


class RealError(Exception):
    """A real system call failed; ``errno`` is its name (``"EINVAL"``)."""

    def __init__(self, call: str, err: int) -> None:
        self.errno = errno_name(err)
        super().__init__(f"{call}: {self.errno} ({os.strerror(err)})")


def _load_libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    vp, sz, i, ssz = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_ssize_t
    libc.mmap.argtypes = [vp, sz, i, i, i, ctypes.c_long]
    libc.mmap.restype = vp
    libc.munmap.argtypes = [vp, sz]
    libc.munmap.restype = i
    libc.mprotect.argtypes = [vp, sz, i]
    libc.mprotect.restype = i
    libc.madvise.argtypes = [vp, sz, i]
    libc.madvise.restype = i
    # mremap(2) is variadic; on x86-64 integer varargs travel exactly like fixed ones.
    libc.mremap.argtypes = [vp, sz, sz, i, vp]
    libc.mremap.restype = vp
    libc.read.argtypes = [i, vp, sz]
    libc.read.restype = ssz
    libc.write.argtypes = [i, vp, sz]
    libc.write.restype = ssz
    return libc


_libc: ctypes.CDLL | None = None


def libc() -> ctypes.CDLL:
    """The C library of this process, with the prototypes the harness uses."""
    global _libc
    if _libc is None:
        _libc = _load_libc()
    return _libc


@dataclass(frozen=True)
class RealFile:
    """A file the harness created: ``label`` is the name tests use for it."""

    label: str
    fd: int
    size: int
    shmem: bool
    writable: bool
    shown: str
    """The pathname /proc/self/maps shows for a mapping of it."""


@dataclass(frozen=True)
class MapsEntry:
    """One VMA of ``/proc/self/smaps``: the header line plus ``VmFlags``."""

    start: int
    end: int
    perms: str
    offset: int
    inode: int
    pathname: str
    vmflags: tuple[str, ...]


@dataclass(frozen=True)
class PageView:
    """What /proc/self/smaps says about one page (None for a page no VMA maps).

    ``kind`` is derived from the pathname and the shared bit: ``anon`` (no file,
    private), ``memfd`` (a memfd, shared), ``memfd-private``, ``file`` (regular file,
    private), ``file-shared``; ``file`` names the backing file by label and
    ``file_page`` is the page index of the file mapped there (vm_pgoff + offset).
    """

    perms: str
    kind: str
    file: str | None
    file_page: int | None
    vmflags: tuple[str, ...]


_HEADER = re.compile(
    r"^([0-9a-f]+)-([0-9a-f]+) ([-r][-w][-x][ps]) ([0-9a-f]+) ([0-9a-f]+:[0-9a-f]+) (\d+)"
    r"[ \t]*(.*)$",
    re.MULTILINE,
)


def read_smaps(lo: int, hi: int) -> list[MapsEntry]:
    """The VMAs of this process that intersect ``[lo, hi)``, clipped to it, in order.

    Parses ``/proc/self/smaps`` (``show_map_vma`` header + ``show_smap_vma_flags``).
    """
    with open("/proc/self/smaps", encoding="utf-8", errors="replace") as f:
        text = f.read()
    out: list[MapsEntry] = []
    for m in _HEADER.finditer(text):
        start, end = int(m.group(1), 16), int(m.group(2), 16)
        if end <= lo:
            continue
        if start >= hi:
            break  # smaps lists the VMAs in address order
        cs = max(start, lo)
        offset = int(m.group(4), 16) + (cs - start if m.group(7) else 0)
        at = text.find("\nVmFlags:", m.end())
        nxt = text.find("\n", at + 1)
        flags = tuple(text[at + 9 : nxt if nxt >= 0 else None].split()) if at >= 0 else ()
        out.append(MapsEntry(cs, min(end, hi), m.group(3), offset, int(m.group(6)),
                             m.group(7), flags))
    return out


class RealMm:
    """A scratch window of ``npages`` pages in this process's real address space.

    Use as a context manager (or call :meth:`close`).  Addresses are absolute; the
    window is ``[base, base + npages * PAGE_SIZE)``.  Failing calls raise
    :class:`RealError` with the errno name; a call that would reach outside the
    window raises ValueError before anything is done.
    """

    def __init__(self, npages: int) -> None:
        self.npages = npages
        self.size = npages * PAGE_SIZE
        self._lib = libc()
        self.files: dict[str, RealFile] = {}
        self._shown: dict[str, str] = {}
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._rfd, self._wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.base = 0
        try:
            self.base = self._reserve()
        except BaseException:
            os.close(self._rfd)
            os.close(self._wfd)
            raise

    # --- lifetime --------------------------------------------------------------

    def _reserve(self) -> int:
        flags = MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE
        for hint in _WINDOW_HINTS:
            got = self._lib.mmap(hint, self.size, PROT_NONE, flags, -1, 0)
            if got == hint:
                return hint
            if got is not None and got != _MAP_FAILED:
                # a kernel without MAP_FIXED_NOREPLACE took it as a hint
                self._lib.munmap(got, self.size)
        raise RuntimeError("could not reserve a scratch window at any hint address")

    def close(self) -> None:
        """Unmap the window, close every descriptor, remove the temporary directory."""
        if self.base:
            if self._lib.munmap(self.base, self.size) != 0:  # pragma: no cover
                raise RealError("munmap(window)", ctypes.get_errno())
            self.base = 0
        for f in self.files.values():
            os.close(f.fd)
        self.files.clear()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
        if self._rfd >= 0:
            os.close(self._rfd)
            os.close(self._wfd)
            self._rfd = self._wfd = -1

    def __enter__(self) -> RealMm:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def page(self, index: int) -> int:
        """The address of page ``index`` of the window."""
        return self.base + index * PAGE_SIZE

    def _check(self, addr: int, length: int, what: str) -> None:
        lo = addr & ~(PAGE_SIZE - 1)
        hi = (addr + length + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
        if not (self.base <= lo and hi <= self.base + self.size and length >= 0):
            raise ValueError(f"{what} [{addr:#x}, +{length:#x}) leaves the scratch window")

    # --- files -----------------------------------------------------------------

    def memfd(self, label: str, size: int) -> RealFile:
        """``memfd_create(label)`` + ``ftruncate(size)``; pages read as zero."""
        fd = os.memfd_create(label, os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        f = RealFile(label, fd, size, True, True, f"/memfd:{label} (deleted)")
        self._register(f)
        return f

    def regular_file(
        self, label: str, size: int, *, fill: int | None = None, writable: bool = True
    ) -> RealFile:
        """A regular file of ``size`` bytes (each ``fill`` or a sparse hole of zeros)
        in the harness's temporary directory, opened O_RDWR or (writable=False) O_RDONLY."""
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="kvmmem-realmm-")
        path = os.path.realpath(os.path.join(self._tmp.name, label))
        with open(path, "wb") as w:
            if fill:
                w.write(bytes([fill]) * size)
            else:
                w.truncate(size)
        fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
        f = RealFile(label, fd, size, False, writable, path)
        self._register(f)
        return f

    def _register(self, f: RealFile) -> None:
        if f.label in self.files:
            os.close(f.fd)
            raise ValueError(f"file label {f.label!r} used twice")
        self.files[f.label] = f
        self._shown[f.shown] = f.label

    # --- system calls ----------------------------------------------------------

    def mmap(
        self,
        addr: int,
        length: int,
        prot: int,
        kind: str,
        *,
        file: RealFile | None = None,
        offset: int = 0,
        noreplace: bool = False,
    ) -> int:
        """``mmap(addr, length, prot, MAP_FIXED[_NOREPLACE] | kind flags, fd, offset)``.

        ``kind``: ``anon`` (MAP_PRIVATE|MAP_ANONYMOUS), ``memfd`` / ``file-shared``
        (MAP_SHARED of ``file``), ``file`` (MAP_PRIVATE of ``file``).  Returns the address;
        raises RealError.
        """
        self._check(addr, length, "mmap")
        flags = MAP_FIXED_NOREPLACE if noreplace else MAP_FIXED
        if kind == "anon":
            flags |= MAP_PRIVATE | MAP_ANONYMOUS
            fd = -1
        else:
            if file is None:
                raise ValueError(f"kind {kind} needs a file")
            flags |= MAP_PRIVATE if kind == "file" else MAP_SHARED
            fd = file.fd
        got = self._lib.mmap(addr, length, prot, flags, fd, offset)
        if got is None or got == _MAP_FAILED:
            raise RealError("mmap", ctypes.get_errno())
        if got != addr:  # pragma: no cover - MAP_FIXED guarantees it
            raise AssertionError(f"mmap returned {got:#x} for a fixed {addr:#x}")
        return int(got)

    def munmap(self, addr: int, length: int) -> None:
        """``munmap(2)``; raises RealError."""
        self._check(addr, length, "munmap")
        if self._lib.munmap(addr, length) != 0:
            raise RealError("munmap", ctypes.get_errno())

    def mprotect(self, addr: int, length: int, prot: int) -> None:
        """``mprotect(2)``; raises RealError (after changing the VMAs before a hole)."""
        self._check(addr, length, "mprotect")
        if self._lib.mprotect(addr, length, prot) != 0:
            raise RealError("mprotect", ctypes.get_errno())

    def madvise(self, addr: int, length: int, advice: str) -> None:
        """``madvise(2)`` with the advice named as in :data:`MADVICE`; raises RealError."""
        self._check(addr, length, "madvise")
        if self._lib.madvise(addr, length, MADVICE[advice]) != 0:
            raise RealError("madvise", ctypes.get_errno())

    def mremap(
        self,
        old_addr: int,
        old_len: int,
        new_len: int,
        *,
        maymove: bool = False,
        fixed_addr: int | None = None,
        force_fixed_flag: bool = False,
    ) -> int:
        """``mremap(2)``: in place, or MREMAP_MAYMOVE|MREMAP_FIXED to ``fixed_addr``.

        MREMAP_MAYMOVE without a fixed target is refused unless it cannot move
        (``new_len <= old_len``): the kernel would pick an address outside the window.
        ``force_fixed_flag`` passes MREMAP_FIXED even without MREMAP_MAYMOVE (EINVAL).
        Returns the new address; raises RealError.
        """
        self._check(old_addr, old_len, "mremap source")
        flags = MREMAP_MAYMOVE if maymove else 0
        target = 0
        if fixed_addr is not None or force_fixed_flag:
            flags |= MREMAP_FIXED
            target = old_addr if fixed_addr is None else fixed_addr
            self._check(target, new_len, "mremap target")
        else:
            if maymove and _page_align(new_len) > _page_align(old_len):
                raise ValueError("MREMAP_MAYMOVE growth without MREMAP_FIXED may leave the window")
            self._check(old_addr, new_len, "mremap in place")
        got = self._lib.mremap(old_addr, old_len, new_len, flags, target)
        if got is None or got == _MAP_FAILED:
            raise RealError("mremap", ctypes.get_errno())
        return int(got)

    # --- user accesses (through the pipe, never from user mode) -----------------

    def _drain(self) -> None:
        try:
            while os.read(self._rfd, 1 << 16):
                pass
        except BlockingIOError:
            pass

    def load_bytes(self, addr: int, n: int) -> bytes | None:
        """The ``n`` bytes at ``addr`` as a user load sees them; None if the load would
        fault (SIGSEGV or SIGBUS).  ``[addr, addr+n)`` must not cross a page."""
        self._check(addr, n, "load")
        if (addr & (PAGE_SIZE - 1)) + n > PAGE_SIZE:
            raise ValueError("a load must not cross a page boundary")
        got = self._lib.write(self._wfd, addr, n)
        if got < 0:
            err = ctypes.get_errno()
            if err != _errno.EFAULT:  # pragma: no cover
                raise RealError("write(pipe)", err)
            return None
        if got != n:  # pragma: no cover - a page is all or nothing
            self._drain()
            raise AssertionError(f"short copy_from_user: {got} of {n}")
        data = b""
        while len(data) < n:
            data += os.read(self._rfd, n - len(data))
        return data

    def store_bytes(self, addr: int, data: bytes) -> bool:
        """Store ``data`` at ``addr`` as a user store would; False if it would fault
        (nothing is written then).  Must not cross a page."""
        n = len(data)
        self._check(addr, n, "store")
        if (addr & (PAGE_SIZE - 1)) + n > PAGE_SIZE:
            raise ValueError("a store must not cross a page boundary")
        os.write(self._wfd, data)
        got = self._lib.read(self._rfd, addr, n)
        if got < 0:
            err = ctypes.get_errno()
            self._drain()
            if err != _errno.EFAULT:  # pragma: no cover
                raise RealError("read(pipe)", err)
            return False
        if got != n:  # pragma: no cover
            self._drain()
            raise AssertionError(f"short copy_to_user: {got} of {n}")
        return True

    def load(self, addr: int, size: int) -> int | None:
        """A little-endian load of ``size`` bytes; None if it would fault."""
        data = self.load_bytes(addr, size)
        return None if data is None else int.from_bytes(data, "little")

    def store(self, addr: int, size: int, value: int) -> bool:
        """A little-endian store of ``size`` bytes; False if it would fault."""
        return self.store_bytes(addr, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))

    def read_page(self, addr: int) -> bytes | None:
        """The 4 KiB page at ``addr`` (faulting it in for read); None if it would fault."""
        return self.load_bytes(addr, PAGE_SIZE)

    def fill(self, addr: int, length: int, byte: int) -> int:
        """memset(addr, byte, length) page by page; returns the number of pages written
        before the first one that would fault (all of them normally)."""
        done = 0
        for a in range(addr, addr + length, PAGE_SIZE):
            if not self.store_bytes(a, bytes([byte]) * min(PAGE_SIZE, addr + length - a)):
                break
            done += 1
        return done

    # --- what /proc shows -------------------------------------------------------

    def maps(self) -> list[MapsEntry]:
        """The VMAs inside the window (clipped), from /proc/self/smaps."""
        return read_smaps(self.base, self.base + self.size)

    def classify(self, e: MapsEntry) -> tuple[str, str | None]:
        """(kind, file label) of a VMA from its pathname and shared bit."""
        shared = e.perms[3] == "s"
        if not e.pathname:
            return ("anon-shared?" if shared else "anon"), None
        label = self._shown.get(e.pathname)
        if label is None:
            return f"foreign:{e.pathname}", None
        if self.files[label].shmem:
            return ("memfd" if shared else "memfd-private"), label
        return ("file-shared" if shared else "file"), label

    def pages(self, entries: list[MapsEntry] | None = None) -> list[PageView | None]:
        """Per page of the window: what smaps shows there (None: no VMA).  ``entries``:
        a :meth:`maps` result to use instead of reading smaps again."""
        out: list[PageView | None] = [None] * self.npages
        for e in self.maps() if entries is None else entries:
            kind, label = self.classify(e)
            first = (e.start - self.base) // PAGE_SIZE
            for i in range((e.end - e.start) // PAGE_SIZE):
                fpage = None if label is None else e.offset // PAGE_SIZE + i
                out[first + i] = PageView(e.perms, kind, label, fpage, e.vmflags)
        return out

    def page_states(self) -> list[str]:
        """Per page of the window, what backs it according to /proc/self/pagemap
        (``pte_to_pagemap_entry`` in fs/proc/task_mmu.c):

        * ``"anon"`` - present, an anonymous page (not PM_FILE) mapped once
          (PM_MMAP_EXCLUSIVE): a private page of this process;
        * ``"zero"`` - present, no struct page behind it as far as pagemap goes
          (neither PM_FILE nor PM_MMAP_EXCLUSIVE): the shared zero page;
        * ``"file"`` - present, a page-cache or shmem page (PM_FILE);
        * ``"-"``    - not present (nothing, or swapped out: the test host has no swap).

        Page-cache pages may be mapped by fault-around (``filemap_map_pages``) beyond the
        faulting page, so ``"file"`` vs ``"-"`` depends on the page cache; callers compare
        ``"anon"`` and ``"zero"`` only.
        """
        fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        try:
            raw = os.pread(fd, 8 * self.npages, (self.base // PAGE_SIZE) * 8)
        finally:
            os.close(fd)
        out: list[str] = []
        for i in range(self.npages):
            e = int.from_bytes(raw[8 * i : 8 * i + 8], "little")
            if not e & PM_PRESENT:
                out.append("-")
            elif e & PM_FILE:
                out.append("file")
            elif e & PM_MMAP_EXCLUSIVE:
                out.append("anon")
            else:
                out.append("zero")
        return out

    def vma_bounds(self, entries: list[MapsEntry] | None = None) -> list[tuple[int, int]]:
        """``[(first page, end page), ...]`` of the VMAs in the window (clipped)."""
        return [
            ((e.start - self.base) // PAGE_SIZE, (e.end - self.base) // PAGE_SIZE)
            for e in (self.maps() if entries is None else entries)
        ]

