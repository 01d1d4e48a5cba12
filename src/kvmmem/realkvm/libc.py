"""The few libc calls kvmmem needs that Python's ``os``/``mmap`` modules do not
offer with addresses: ``mmap`` (at a chosen address, MAP_FIXED), ``munmap``,
``mprotect``, ``madvise``, ``memset``, ``read``/``write`` on raw addresses (the
pipe trick of :mod:`kvmmem.realkvm.host`), ``fallocate``, ``perf_event_open`` (through
``syscall``) and ``ioctl`` with a pointer argument.

Every wrapper returns ``(value, errno)`` or an errno (0 on success) instead of
raising, so a caller turns a failure into the errno name the scenario outcome
wants (:func:`errno_name`).
"""

from __future__ import annotations

import ctypes
import errno as _errno

_libc = ctypes.CDLL(None, use_errno=True)

_mmap = _libc.mmap
_mmap.restype = ctypes.c_void_p
_mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                  ctypes.c_long]
_munmap = _libc.munmap
_munmap.restype = ctypes.c_int
_munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_mprotect = _libc.mprotect
_mprotect.restype = ctypes.c_int
_mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_madvise = _libc.madvise
_madvise.restype = ctypes.c_int
_madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_read = _libc.read
_read.restype = ctypes.c_ssize_t
_read.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
_write = _libc.write
_write.restype = ctypes.c_ssize_t
_write.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
_fallocate = _libc.fallocate
_fallocate.restype = ctypes.c_int
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_ioctl = _libc.ioctl
_ioctl.restype = ctypes.c_int
_ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]

PROT_NONE = 0
PROT_READ = 1
PROT_WRITE = 2
PROT_EXEC = 4

MAP_SHARED = 0x01
MAP_PRIVATE = 0x02
MAP_FIXED = 0x10
MAP_ANONYMOUS = 0x20
MAP_NORESERVE = 0x4000
MAP_POPULATE = 0x8000
MAP_HUGETLB = 0x40000
MAP_FIXED_NOREPLACE = 0x100000
MAP_FAILED = ctypes.c_void_p(-1).value

MADV_DONTNEED = 4
MADV_REMOVE = 9
MADV_HUGEPAGE = 14
MADV_NOHUGEPAGE = 15

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

SYS_perf_event_open = 298  # x86-64


def errno_name(code: int) -> str:
    """The errno's name (``14`` -> ``"EFAULT"``); EOPNOTSUPP and ENOTSUP share a number and
    print as ``EOPNOTSUPP``, the name the kernel sources use."""
    if code == _errno.EOPNOTSUPP:
        return "EOPNOTSUPP"
    return _errno.errorcode.get(code, f"E{code}")


def mmap(addr: int, length: int, prot: int, flags: int, fd: int = -1,
         offset: int = 0) -> tuple[int, int]:
    """``mmap(2)``: ``(address, 0)`` on success, ``(0, errno)`` on failure."""
    ret = _mmap(addr or None, length, prot, flags, fd, offset)
    if ret is None or ret == MAP_FAILED:
        return 0, ctypes.get_errno()
    return int(ret), 0


def munmap(addr: int, length: int) -> int:
    """``munmap(2)``: 0 or the errno."""
    return 0 if _munmap(addr, length) == 0 else ctypes.get_errno()


def mprotect(addr: int, length: int, prot: int) -> int:
    """``mprotect(2)``: 0 or the errno."""
    return 0 if _mprotect(addr, length, prot) == 0 else ctypes.get_errno()


def madvise(addr: int, length: int, advice: int) -> int:
    """``madvise(2)``: 0 or the errno."""
    return 0 if _madvise(addr, length, advice) == 0 else ctypes.get_errno()


def fallocate(fd: int, mode: int, offset: int, length: int) -> int:
    """``fallocate(2)`` (``off_t`` is 64-bit on every architecture kvmmem runs on): 0 or
    the errno."""
    return 0 if _fallocate(fd, mode, offset, length) == 0 else ctypes.get_errno()


def memset(addr: int, byte: int, length: int) -> None:
    """Store ``byte`` to ``length`` bytes at ``addr``.  The caller guarantees the range is
    mapped writable and backed (a fault here kills the process)."""
    ctypes.memset(addr, byte, length)


def write_from(fd: int, addr: int, length: int) -> tuple[int, int]:
    """``write(fd, addr, length)``: ``(bytes written, 0)`` or ``(0, errno)``."""
    ret = _write(fd, addr, length)
    if ret < 0:
        return 0, ctypes.get_errno()
    return int(ret), 0


def read_into(fd: int, addr: int, length: int) -> tuple[int, int]:
    """``read(fd, addr, length)``: ``(bytes read, 0)`` or ``(0, errno)``."""
    ret = _read(fd, addr, length)
    if ret < 0:
        return 0, ctypes.get_errno()
    return int(ret), 0


def ioctl_ptr(fd: int, request: int, arg: int) -> int:
    """``ioctl(fd, request, arg)`` with a pointer argument: 0 (or the positive result)
    on success, ``-errno`` on failure."""
    ret = _ioctl(fd, request, arg)
    if ret < 0:
        return -ctypes.get_errno()
    return int(ret)


class perf_event_attr(ctypes.Structure):
    """The first fields of ``struct perf_event_attr`` (PERF_ATTR_SIZE_VER0, 64 bytes)."""

    _fields_ = [
        ("type", ctypes.c_uint32),
        ("size", ctypes.c_uint32),
        ("config", ctypes.c_uint64),
        ("sample_period", ctypes.c_uint64),
        ("sample_type", ctypes.c_uint64),
        ("read_format", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
        ("wakeup_events", ctypes.c_uint32),
        ("bp_type", ctypes.c_uint32),
        ("config1", ctypes.c_uint64),
    ]


PERF_TYPE_SOFTWARE = 1
PERF_COUNT_SW_DUMMY = 9
PERF_ATTR_FLAG_DISABLED = 1 << 0
PERF_FLAG_FD_CLOEXEC = 1 << 3


def perf_event_open_dummy() -> tuple[int, int]:
    """A disabled software dummy perf event on this thread: ``(fd, 0)`` or ``(-1, errno)``.
    Its ``mmap`` is a VM_PFNMAP|VM_IO mapping (kvm-on-this-host.md §3.6)."""
    attr = perf_event_attr(type=PERF_TYPE_SOFTWARE, size=ctypes.sizeof(perf_event_attr),
                           config=PERF_COUNT_SW_DUMMY, flags=PERF_ATTR_FLAG_DISABLED)
    fd = _syscall(ctypes.c_long(SYS_perf_event_open), ctypes.byref(attr), ctypes.c_int(0),
                  ctypes.c_int(-1), ctypes.c_int(-1), ctypes.c_ulong(PERF_FLAG_FD_CLOEXEC))
    if fd < 0:
        return -1, ctypes.get_errno()
    return int(fd), 0
