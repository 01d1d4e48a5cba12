"""Thin objects over the three kinds of KVM file descriptor: :class:`Kvm`
(``/dev/kvm``), :class:`VmFd` and :class:`VcpuFd`.

Each owns its fd (and the vCPU its ``kvm_run`` mapping); ``close()`` is
idempotent and every object is a context manager, so a ``with`` block releases
everything on every path.  Calls whose failure is an *outcome* for kvmmem
(``set_user_memory_region``, ``get_dirty_log``, ``pre_fault_memory``, ...)
return the errno name (``"EEXIST"``) or ``None`` instead of raising; the others
raise :class:`KvmIoctlError`.  ioctl numbers and the capability each needs come
from :mod:`kvmmem.realkvm.ioctls`.

A vCPU run can be bounded by :meth:`VcpuFd.watchdog`: a ``SIGALRM`` timer whose
handler sets ``kvm_run.immediate_exit``, so a guest that never exits is
stopped (``KVM_RUN`` fails with EINTR; Documentation/virt/kvm/api.rst,
"immediate_exit").
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import platform
import signal
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType
from typing import Protocol

from kvmmem.realkvm import libc
from kvmmem.realkvm.ioctls import (
    IOCTLS,
    KVM_CAP_NR_MEMSLOTS,
    KVM_CAP_VM_TYPES,
    ioctl_number,
)
from kvmmem.realkvm.stats import StatsFd
from kvmmem.realkvm.structs import (
    KVM_DIRTY_GFN_F_DIRTY,
    KVM_DIRTY_GFN_F_RESET,
    KVM_DIRTY_LOG_PAGE_OFFSET,
    cpuid2_buffer,
    kvm_clear_dirty_log,
    kvm_cpuid2,
    kvm_cpuid_entry2,
    kvm_create_guest_memfd,
    kvm_dirty_gfn,
    kvm_dirty_log,
    kvm_enable_cap,
    kvm_memory_attributes,
    kvm_pre_fault_memory,
    kvm_regs,
    kvm_run,
    kvm_sregs,
    kvm_userspace_memory_region,
    kvm_userspace_memory_region2,
)
from kvmmem.types import VM_TYPES

KVM_API_VERSION = 12
KVM_DEV = "/dev/kvm"

_KVM_RUN = ioctl_number("KVM_RUN")


class KvmIoctlError(OSError):
    """An ioctl kvmmem did not expect to fail failed; ``ioctl`` names it."""

    def __init__(self, code: int, ioctl: str) -> None:
        super().__init__(code, f"{ioctl}: {libc.errno_name(code)} ({os.strerror(code)})")
        self.ioctl = ioctl

    def __str__(self) -> str:
        return str(self.strerror)

    @property
    def errno_name(self) -> str:
        """The errno's name, e.g. ``"EINVAL"``."""
        return libc.errno_name(self.errno or 0)


class KvmUnavailable(RuntimeError):
    """``/dev/kvm`` is missing or cannot run a VM; ``str()`` is one line saying why."""


class KvmUnsupported(RuntimeError):
    """This host's KVM lacks a capability an ioctl needs."""


def _call(fd: int, name: str, arg: int = 0) -> int:
    """ioctl ``name`` on ``fd`` with a pointer (or integer) argument; returns the
    kernel's non-negative result, raises :class:`KvmIoctlError`."""
    ret = libc.ioctl_ptr(fd, IOCTLS[name][0], arg)
    if ret < 0:
        raise KvmIoctlError(-ret, name)
    return ret


def _try(fd: int, name: str, arg: int = 0) -> str | None:
    """ioctl ``name``; ``None`` on success, else the errno name."""
    ret = libc.ioctl_ptr(fd, IOCTLS[name][0], arg)
    return None if ret >= 0 else libc.errno_name(-ret)


class _Fd:
    """An owned file descriptor with capability lookups cached."""

    fd: int

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._caps: dict[int, int] = {}

    def check_extension(self, cap: int) -> int:
        """``KVM_CHECK_EXTENSION(cap)``: 0 when unsupported, else a cap-specific value
        (cached per fd)."""
        if cap not in self._caps:
            ret = libc.ioctl_ptr(self.fd, ioctl_number("KVM_CHECK_EXTENSION"), cap)
            self._caps[cap] = max(ret, 0)
        return self._caps[cap]

    def supports(self, ioctl: str) -> bool:
        """Whether the capability ioctl ``ioctl`` needs is reported (always True for the
        base API)."""
        cap = IOCTLS[ioctl][1]
        return cap is None or self.check_extension(cap) > 0

    def require(self, ioctl: str) -> None:
        """Raise :class:`KvmUnsupported` unless :meth:`supports` ``ioctl``."""
        if not self.supports(ioctl):
            raise KvmUnsupported(f"{ioctl} needs capability {IOCTLS[ioctl][1]}, which this "
                                 f"host's KVM does not report")

    def stats(self) -> StatsFd:
        """``KVM_GET_STATS_FD``: the binary stats of this VM or vCPU (caller closes it)."""
        self.require("KVM_GET_STATS_FD")
        return StatsFd(_call(self.fd, "KVM_GET_STATS_FD"))

    def close(self) -> None:
        """Release the fd (idempotent)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Kvm(_Fd):
    """``/dev/kvm``.  Raises :class:`KvmUnavailable` when it cannot be opened or speaks
    another API version."""

    def __init__(self, path: str = KVM_DEV) -> None:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise KvmUnavailable(f"cannot open {path}: {exc.strerror}") from None
        super().__init__(fd)
        self.path = path
        self._cpuid: bytes | None = None
        try:
            version = _call(fd, "KVM_GET_API_VERSION")
            if version != KVM_API_VERSION:
                raise KvmUnavailable(f"{path} speaks KVM API {version}, not {KVM_API_VERSION}")
            self.vcpu_mmap_size = _call(fd, "KVM_GET_VCPU_MMAP_SIZE")
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Kvm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def supported_cpuid(self) -> bytes:
        """``KVM_GET_SUPPORTED_CPUID``: a ``kvm_cpuid2`` buffer (header and entries),
        ready for ``KVM_SET_CPUID2``.  Cached."""
        if self._cpuid is None:
            nent = 64
            while True:
                buf = cpuid2_buffer(nent)
                err = _try(self.fd, "KVM_GET_SUPPORTED_CPUID", ctypes.addressof(buf))
                if err is None:
                    got = kvm_cpuid2.from_buffer(buf).nent
                    self._cpuid = bytes(buf)[:ctypes.sizeof(kvm_cpuid2)
                                             + got * ctypes.sizeof(kvm_cpuid_entry2)]
                    break
                if err != "E2BIG" or nent >= 4096:
                    raise KvmIoctlError(getattr(errno, err, 0), "KVM_GET_SUPPORTED_CPUID")
                nent *= 2
        return self._cpuid

    def cpuid_entry(self, function: int, index: int = 0) -> kvm_cpuid_entry2 | None:
        """The supported CPUID leaf ``function``/``index``, or ``None``."""
        raw = self.supported_cpuid()
        nent = kvm_cpuid2.from_buffer_copy(raw).nent
        size = ctypes.sizeof(kvm_cpuid_entry2)
        for i in range(nent):
            off = ctypes.sizeof(kvm_cpuid2) + i * size
            entry = kvm_cpuid_entry2.from_buffer_copy(raw[off:off + size])
            if entry.function == function and entry.index == index:
                return entry
        return None

    def phys_bits(self) -> int:
        """The guest's MAXPHYADDR (CPUID 0x80000008 EAX[7:0]; 36 without the leaf)."""
        entry = self.cpuid_entry(0x80000008)
        return entry.eax & 0xFF if entry is not None else 36

    def create_vm(self, vm_type: int = 0) -> VmFd:
        """``KVM_CREATE_VM``; raises :class:`KvmIoctlError`."""
        return VmFd(self, _call(self.fd, "KVM_CREATE_VM", vm_type))


class _Extensions(Protocol):
    def check_extension(self, cap: int) -> int: ...


def require_vm_type(kvm: _Extensions, vm_type: int) -> None:
    """Raise :class:`KvmUnsupported` unless ``KVM_CHECK_EXTENSION(KVM_CAP_VM_TYPES)`` on
    ``kvm`` (``/dev/kvm``) has bit ``1 << vm_type`` (x86, v6.8: ``kvm_caps.supported_vm_types``;
    ``KVM_X86_SW_PROTECTED_VM`` only with ``CONFIG_KVM_SW_PROTECTED_VM``).  Type 0 (the
    default VM) always passes, also on kernels without the capability."""
    if vm_type == 0:
        return
    offered = kvm.check_extension(KVM_CAP_VM_TYPES)
    if not offered >> vm_type & 1:
        names = [name for name, number in VM_TYPES.items() if number == vm_type]
        label = f"{names[0]} ({vm_type})" if names else str(vm_type)
        raise KvmUnsupported(
            f"VM type {label} is not offered by this KVM: KVM_CAP_VM_TYPES is {offered:#x} "
            f"(bit {vm_type} clear; x86 lists KVM_X86_SW_PROTECTED_VM only with "
            f"CONFIG_KVM_SW_PROTECTED_VM, and kernels before v6.8 have no VM types)")


@dataclass(frozen=True, slots=True)
class DirtyLog:
    """The result of ``KVM_GET_DIRTY_LOG``: ``errno`` (name) or the dirty page indexes
    (relative to the slot's first gfn)."""

    errno: str | None
    pages: tuple[int, ...] = ()


class VmFd(_Fd):
    """A VM.  Owns its fd; vCPUs it created are closed with it."""

    def __init__(self, kvm: Kvm, fd: int) -> None:
        super().__init__(fd)
        self.kvm = kvm
        self.vcpus: list[VcpuFd] = []

    def __enter__(self) -> VmFd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close every vCPU of this VM, then the VM fd (idempotent)."""
        for vcpu in self.vcpus:
            vcpu.close()
        self.vcpus.clear()
        super().close()

    def max_memslots(self) -> int:
        """``KVM_CAP_NR_MEMSLOTS``: how many slot ids (0..n-1) address space 0 has."""
        return self.check_extension(KVM_CAP_NR_MEMSLOTS)

    def set_user_memory_region(self, slot: int, flags: int, gpa: int, size: int,
                               hva: int) -> str | None:
        """``KVM_SET_USER_MEMORY_REGION`` (size 0 deletes): ``None`` or the errno name."""
        region = kvm_userspace_memory_region(slot=slot, flags=flags, guest_phys_addr=gpa,
                                             memory_size=size, userspace_addr=hva)
        return _try(self.fd, "KVM_SET_USER_MEMORY_REGION", ctypes.addressof(region))

    def set_user_memory_region2(self, slot: int, flags: int, gpa: int, size: int, hva: int,
                                guest_memfd: int = 0, guest_memfd_offset: int = 0) -> str | None:
        """``KVM_SET_USER_MEMORY_REGION2``: ``None`` or the errno name."""
        region = kvm_userspace_memory_region2(
            slot=slot, flags=flags, guest_phys_addr=gpa, memory_size=size, userspace_addr=hva,
            guest_memfd=guest_memfd, guest_memfd_offset=guest_memfd_offset)
        return _try(self.fd, "KVM_SET_USER_MEMORY_REGION2", ctypes.addressof(region))

    def set_memory_attributes(self, address: int, size: int, attributes: int,
                              flags: int = 0) -> str | None:
        """``KVM_SET_MEMORY_ATTRIBUTES`` of ``[address, address + size)`` to
        ``attributes`` (``KVM_MEMORY_ATTRIBUTE_*``) with ``flags``: ``None`` or the errno
        name.  Issued whatever the VM reports: a kernel without the ioctl answers with its
        unknown-VM-ioctl errno (x86 ``kvm_arch_vm_ioctl`` ENOTTY), itself an outcome."""
        arg = kvm_memory_attributes(address=address, size=size, attributes=attributes,
                                    flags=flags)
        return _try(self.fd, "KVM_SET_MEMORY_ATTRIBUTES", ctypes.addressof(arg))

    def create_guest_memfd(self, size: int, flags: int = 0) -> tuple[int, str | None]:
        """``KVM_CREATE_GUEST_MEMFD`` of ``size`` bytes with ``GUEST_MEMFD_FLAG_*``
        ``flags``: ``(fd, None)`` (the caller owns the fd) or ``(-1, errno name)``."""
        arg = kvm_create_guest_memfd(size=size, flags=flags)
        ret = libc.ioctl_ptr(self.fd, IOCTLS["KVM_CREATE_GUEST_MEMFD"][0], ctypes.addressof(arg))
        if ret < 0:
            return -1, libc.errno_name(-ret)
        return ret, None

    def get_dirty_log(self, slot: int, npages: int) -> DirtyLog:
        """``KVM_GET_DIRTY_LOG`` of ``slot`` with a bitmap for ``npages`` pages (the kernel
        writes ``ALIGN(npages, 64) / 8`` bytes); reports and clears."""
        nbytes = max(8, (npages + 63) // 64 * 8)
        bitmap = (ctypes.c_uint64 * (nbytes // 8))()
        log = kvm_dirty_log(slot=slot, dirty_bitmap=ctypes.addressof(bitmap))
        err = _try(self.fd, "KVM_GET_DIRTY_LOG", ctypes.addressof(log))
        if err is not None:
            return DirtyLog(err)
        pages = [w * 64 + b for w, word in enumerate(bitmap) if word
                 for b in range(64) if word >> b & 1]
        return DirtyLog(None, tuple(pages))

    def clear_dirty_log(self, slot: int, first_page: int, num_pages: int,
                        pages: Sequence[int] | None = None) -> str | None:
        """``KVM_CLEAR_DIRTY_LOG`` of ``[first_page, first_page+num_pages)``; bit ``i`` of
        the user bitmap is page ``first_page + i``: set for each of ``pages``, or for
        every page: ``None`` or the errno name."""
        nwords = max(1, (num_pages + 63) // 64)
        if pages is None:
            bitmap = (ctypes.c_uint64 * nwords)(*([~0 & (2**64 - 1)] * nwords))
        else:
            bitmap = (ctypes.c_uint64 * nwords)()
            for page in pages:
                bit = page - first_page
                bitmap[bit >> 6] |= 1 << (bit & 63)
        arg = kvm_clear_dirty_log(slot=slot, num_pages=num_pages, first_page=first_page,
                                  dirty_bitmap=ctypes.addressof(bitmap))
        return _try(self.fd, "KVM_CLEAR_DIRTY_LOG", ctypes.addressof(arg))

    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> str | None:
        """``KVM_ENABLE_CAP`` on the VM (``struct kvm_enable_cap {cap, flags, args[4]}``):
        ``None`` or the errno name."""
        arg = kvm_enable_cap(cap=cap, flags=flags)
        for i, value in enumerate(args):
            arg.args[i] = value
        return _try(self.fd, "KVM_ENABLE_CAP", ctypes.addressof(arg))

    def reset_dirty_rings(self) -> tuple[int, str | None]:
        """``KVM_RESET_DIRTY_RINGS``: ``(entries reset, None)`` or ``(0, errno name)``."""
        ret = libc.ioctl_ptr(self.fd, IOCTLS["KVM_RESET_DIRTY_RINGS"][0], 0)
        return (ret, None) if ret >= 0 else (0, libc.errno_name(-ret))

    def create_vcpu(self, vcpu_id: int) -> VcpuFd:
        """``KVM_CREATE_VCPU`` and map its ``kvm_run``; raises :class:`KvmIoctlError`."""
        fd = _call(self.fd, "KVM_CREATE_VCPU", vcpu_id)
        vcpu = VcpuFd(self, fd, vcpu_id)
        self.vcpus.append(vcpu)
        return vcpu

    def preferred_target(self) -> tuple[int, tuple[int, ...]]:
        """arm64 ``KVM_ARM_PREFERRED_TARGET``: ``(target, seven feature words)`` for
        :meth:`VcpuFd.arm_vcpu_init`.  Raises :class:`KvmIoctlError` (ENOTTY elsewhere)."""
        from kvmmem.realkvm.structs import kvm_vcpu_init
        arg = kvm_vcpu_init()
        _call(self.fd, "KVM_ARM_PREFERRED_TARGET", ctypes.addressof(arg))
        return int(arg.target), tuple(int(w) for w in arg.features)


class _Alarm:
    """The one process-wide SIGALRM watchdog (Python runs signal handlers on the main
    thread only)."""

    run: kvm_run | None = None
    fired: bool = False


def _on_alarm(signum: int, frame: FrameType | None) -> None:
    run = _Alarm.run
    if run is not None:
        run.immediate_exit = 1
        _Alarm.fired = True


class VcpuFd(_Fd):
    """A vCPU with its ``kvm_run`` page mapped at :attr:`run_addr` (:attr:`run`)."""

    def __init__(self, vm: VmFd, fd: int, vcpu_id: int) -> None:
        super().__init__(fd)
        self.vm = vm
        self.vcpu_id = vcpu_id
        self.run_size = vm.kvm.vcpu_mmap_size
        addr, err = libc.mmap(0, self.run_size, libc.PROT_READ | libc.PROT_WRITE,
                              libc.MAP_SHARED, fd, 0)
        if err:
            os.close(fd)
            self.fd = -1
            raise KvmIoctlError(err, "mmap(kvm_run)")
        self.run_addr = addr
        self.run = kvm_run.from_address(addr)
        self.ring_addr = 0
        self.ring_size = 0
        self.ring_fetch = 0
        """The VMM's fetch index into the mapped dirty ring (:meth:`harvest_dirty_ring`)."""

    def map_dirty_ring(self, size: int) -> str | None:
        """mmap this vCPU's dirty ring (``size`` bytes, the VM's ring size) shared and
        writable at ``KVM_DIRTY_LOG_PAGE_OFFSET`` pages into the vCPU fd: ``None`` or the
        errno name (idempotent)."""
        if self.ring_addr:
            return None
        addr, err = libc.mmap(0, size, libc.PROT_READ | libc.PROT_WRITE, libc.MAP_SHARED,
                              self.fd, KVM_DIRTY_LOG_PAGE_OFFSET * mmap.PAGESIZE)
        if err:
            return libc.errno_name(err)
        self.ring_addr, self.ring_size = addr, size
        return None

    def harvest_dirty_ring(self) -> list[tuple[int, int]]:
        """Read the mapped ring from the fetch index: each entry flagged
        ``KVM_DIRTY_GFN_F_DIRTY`` is collected as ``(slot, offset)`` and flagged
        ``KVM_DIRTY_GFN_F_RESET`` (the kernel's ``kvm_dirty_ring_reset`` then takes it),
        as QEMU's ``kvm_dirty_ring_reap_one`` does."""
        entries = self.ring_size // ctypes.sizeof(kvm_dirty_gfn)
        ring = (kvm_dirty_gfn * entries).from_address(self.ring_addr)
        out: list[tuple[int, int]] = []
        while True:
            entry = ring[self.ring_fetch & (entries - 1)]
            if entry.flags != KVM_DIRTY_GFN_F_DIRTY:
                break
            out.append((entry.slot, entry.offset))
            entry.flags |= KVM_DIRTY_GFN_F_RESET
            self.ring_fetch += 1
        return out

    def check_extension(self, cap: int) -> int:
        """Capabilities are asked of the VM (a vCPU fd does not answer
        ``KVM_CHECK_EXTENSION``)."""
        return self.vm.check_extension(cap)

    def close(self) -> None:
        """Unmap ``kvm_run`` and close the fd (idempotent)."""
        if self.ring_addr:
            libc.munmap(self.ring_addr, self.ring_size)
            self.ring_addr = 0
        if self.run_addr:
            if _Alarm.run is self.run:
                _Alarm.run = None
            libc.munmap(self.run_addr, self.run_size)
            self.run_addr = 0
        super().close()

    def __enter__(self) -> VcpuFd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def kvm_run(self) -> int:
        """One ``KVM_RUN``: 0 when it returned with an exit in ``run.exit_reason``, else
        the errno (EFAULT, EINTR when stopped by the watchdog, ...)."""
        try:
            fcntl.ioctl(self.fd, _KVM_RUN, 0)
        except OSError as exc:
            return exc.errno or errno.EIO
        return 0

    @contextmanager
    def watchdog(self, seconds: float) -> Iterator[_Alarm]:
        """Bound the ``KVM_RUN`` calls made inside the block to about ``seconds``.

        On expiry the SIGALRM handler sets ``immediate_exit``; ``KVM_RUN`` then fails
        with EINTR (the timer repeats every 50 ms after the first expiry, so a signal
        that lands just before the guest is entered is followed by one that interrupts
        it).  The yielded object's ``fired`` says whether it expired.  Raises
        ``RuntimeError`` off the main thread."""
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("the KVM_RUN watchdog needs the main thread (SIGALRM)")
        previous = signal.signal(signal.SIGALRM, _on_alarm)
        _Alarm.run = self.run
        _Alarm.fired = False
        self.run.immediate_exit = 0
        signal.setitimer(signal.ITIMER_REAL, max(seconds, 1e-3), 0.05)
        try:
            yield _Alarm()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0, 0)
            signal.signal(signal.SIGALRM, previous)
            _Alarm.run = None
            if self.run_addr:
                self.run.immediate_exit = 0

    def get_regs(self) -> kvm_regs:
        """``KVM_GET_REGS``."""
        regs = kvm_regs()
        _call(self.fd, "KVM_GET_REGS", ctypes.addressof(regs))
        return regs

    def set_regs(self, regs: kvm_regs) -> None:
        """``KVM_SET_REGS``."""
        _call(self.fd, "KVM_SET_REGS", ctypes.addressof(regs))

    def get_sregs(self) -> kvm_sregs:
        """``KVM_GET_SREGS``."""
        sregs = kvm_sregs()
        _call(self.fd, "KVM_GET_SREGS", ctypes.addressof(sregs))
        return sregs

    def set_sregs(self, sregs: kvm_sregs) -> None:
        """``KVM_SET_SREGS``."""
        _call(self.fd, "KVM_SET_SREGS", ctypes.addressof(sregs))

    def set_cpuid2(self, cpuid: bytes) -> None:
        """``KVM_SET_CPUID2`` with a buffer from :meth:`Kvm.supported_cpuid`."""
        buf = ctypes.create_string_buffer(cpuid, len(cpuid))
        _call(self.fd, "KVM_SET_CPUID2", ctypes.addressof(buf))

    def pre_fault_memory(self, gpa: int, size: int, flags: int = 0) -> tuple[str | None, int, int]:
        """``KVM_PRE_FAULT_MEMORY``: ``(errno name or None, gpa, size)`` with the range the
        kernel left unprocessed."""
        arg = kvm_pre_fault_memory(gpa=gpa, size=size, flags=flags)
        err = _try(self.fd, "KVM_PRE_FAULT_MEMORY", ctypes.addressof(arg))
        return err, arg.gpa, arg.size

    def pre_fault(self, gpa: int, size: int, timeout: float) -> dict[str, object]:
        """One ``KVM_PRE_FAULT_MEMORY`` call as a scenario outcome: ``ok`` with
        ``remaining`` (the bytes the kernel left unprocessed: ``kvm_vcpu_pre_fault_memory``
        returns 0 once any page was mapped, stopping at the first page that fails), or
        ``error`` with the errno when nothing was (EINVAL/ENOTTY where KVM has no such
        ioctl).  A call interrupted before any progress (EINTR) is repeated until
        ``timeout`` seconds have passed, then ``{"result": "timeout", "seconds": S}``:
        ``kvm_tdp_map_page`` retries until a signal is pending, and on x86 6.10-6.14 it
        retries forever after a memslot delete (an obsolete root that
        ``kvm_mmu_reload`` did not free until 20a6cff3b283, v6.15)."""
        with self.watchdog(timeout) as alarm:
            while True:
                err, gpa, size = self.pre_fault_memory(gpa, size)
                if err != "EINTR":
                    break
                if alarm.fired:
                    return {"result": "timeout", "seconds": timeout}
        if err is not None:
            return {"result": "error", "errno": err}
        return {"result": "ok", "remaining": size}

    # arm64 / riscv (the structures are imported here so this module's import list stays
    # the x86 one)

    def get_one_reg(self, reg_id: int) -> int:
        """``KVM_GET_ONE_REG``: the register ``reg_id`` names, as an unsigned integer (the
        id encodes its size, 1 to 256 bytes, read little-endian).  Raises
        :class:`KvmIoctlError` (ENOENT for an id this vCPU lacks)."""
        from kvmmem.realkvm.structs import kvm_one_reg, kvm_reg_size
        buf = ctypes.create_string_buffer(kvm_reg_size(reg_id))
        arg = kvm_one_reg(id=reg_id, addr=ctypes.addressof(buf))
        _call(self.fd, "KVM_GET_ONE_REG", ctypes.addressof(arg))
        return int.from_bytes(buf.raw, "little")

    def set_one_reg(self, reg_id: int, value: int) -> None:
        """``KVM_SET_ONE_REG``: store ``value`` (truncated to the id's size) in register
        ``reg_id``.  Raises :class:`KvmIoctlError` (EINVAL for a value KVM refuses)."""
        from kvmmem.realkvm.structs import kvm_one_reg, kvm_reg_size
        size = kvm_reg_size(reg_id)
        buf = ctypes.create_string_buffer(
            (value & ((1 << 8 * size) - 1)).to_bytes(size, "little"), size)
        arg = kvm_one_reg(id=reg_id, addr=ctypes.addressof(buf))
        _call(self.fd, "KVM_SET_ONE_REG", ctypes.addressof(arg))

    def arm_vcpu_init(self, target: int, features: tuple[int, ...] = ()) -> None:
        """arm64 ``KVM_ARM_VCPU_INIT`` with ``target`` (from :meth:`VmFd.preferred_target`)
        and up to seven feature words.  Raises :class:`KvmIoctlError`."""
        from kvmmem.realkvm.structs import kvm_vcpu_init
        arg = kvm_vcpu_init(target=target)
        for i, word in enumerate(features):
            arg.features[i] = word
        _call(self.fd, "KVM_ARM_VCPU_INIT", ctypes.addressof(arg))

    def get_mp_state(self) -> int:
        """``KVM_GET_MP_STATE``: the vCPU's ``KVM_MP_STATE_*``.  Raises
        :class:`KvmIoctlError`."""
        from kvmmem.realkvm.structs import kvm_mp_state
        arg = kvm_mp_state()
        _call(self.fd, "KVM_GET_MP_STATE", ctypes.addressof(arg))
        return int(arg.mp_state)

    def set_mp_state(self, state: int) -> None:
        """``KVM_SET_MP_STATE`` (riscv keeps vCPUs other than 0 STOPPED until this makes them
        RUNNABLE).  Raises :class:`KvmIoctlError`."""
        from kvmmem.realkvm.structs import kvm_mp_state
        arg = kvm_mp_state(mp_state=state)
        _call(self.fd, "KVM_SET_MP_STATE", ctypes.addressof(arg))


def probe_kvm(path: str = KVM_DEV) -> str | None:
    """Whether this host can run kvmmem's real-KVM backend: ``None`` when ``path`` opens,
    speaks API 12 and can create a VM with one vCPU on an x86-64, arm64 or riscv64 host
    (the machines' guests); else a one-line
    reason (e.g. ``"/dev/kvm: cannot open /dev/kvm: No such file or directory"``)."""
    machine = platform.machine()
    if machine not in ("x86_64", "AMD64", "aarch64", "riscv64"):
        return (f"/dev/kvm: kvmmem's real-KVM guests are x86-64, arm64 and riscv64; this "
                f"host is {machine}")
    try:
        with Kvm(path) as kvm, kvm.create_vm() as vm:
            vm.create_vcpu(0)
    except (KvmUnavailable, OSError) as exc:
        return f"{path}: {exc}"
    return None
