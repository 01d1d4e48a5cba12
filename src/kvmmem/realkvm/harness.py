"""A real VM driven one scenario step at a time: what every architecture's harness
shares (:class:`HarnessVm`, its run loop :meth:`HarnessVm._drive`, and where the
harness's own memory goes: :func:`choose_layout`).

A harness VM (x86's :class:`~kvmmem.realkvm.x86.RealVm`, arm64's and riscv's
:class:`~kvmmem.realkvm.archvm.ArchVm`) creates a VM on ``/dev/kvm``, places its own
memory (guest code and page tables, one memslot) and the doorbell where the scenario
will never put anything, and offers one method per scenario step
(``set_memslot``, ``guest_read``, ``guest_write``, ``guest_exec``, ``prefault``,
``get_dirty_log``, ``clear_dirty_log``).  Each returns the step's outcome as a
dict in the SCENARIOS.md vocabulary:

* ``{"result": "ok"}`` (+ ``value`` for reads, ``dirty`` for get_dirty_log);
* ``{"result": "mmio", "gpa", "len", "is_write", "data"}`` - the access left the
  VM as ``KVM_EXIT_MMIO``; a read is answered with zero bytes and ``value``
  holds what the guest finally loaded.  If the access needed more than one
  MMIO exit (a page-crossing access whose two parts both exit), the later ones
  are listed under ``more_mmio``;
* ``{"result": "fault"}`` - ``KVM_RUN`` failed with EFAULT; ``gpa``, ``size``,
  ``flags`` only when the kernel reports them (``KVM_EXIT_MEMORY_FAULT``);
* ``{"result": "error", "errno": NAME}`` - an ioctl failed.

Extensions, where the contract has no word for what real KVM did:
``{"result": "abort", "abort": "#UD"}`` (an instruction fetch KVM could not
emulate: ``#UD`` is injected into a CPL>0 guest; any other exception that ends a
read or write is ``abort`` with the vector's mnemonic and ``vector``), ``{"result": "timeout",
"seconds": S}`` (the guest did not come back and was stopped by the
watchdog), ``{"result": "exit", "exit_reason": NAME}`` (any other exit, e.g.
``KVM_EXIT_SHUTDOWN``), ``{"result": "unsupported", "reason": TEXT}`` (a gpa the
guest's page tables cannot reach: beyond MAXPHYADDR, or straddling 2^47).

Harness placement: give the harness VM every guest physical range and slot
id the scenario will use (``reserved_gpas``, ``reserved_slots``); it takes the
highest free slot id and a free 4 MiB window (2 MiB of harness memory, then
2 MiB with no memslot for the doorbell) and raises :class:`HarnessConflict`
with a clear message when the scenario leaves no room.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Self

from kvmmem.realkvm import libc
from kvmmem.realkvm.ioctls import (
    KVM_CAP_ARM_MTE,
    KVM_CAP_DIRTY_LOG_RING,
    KVM_CAP_DIRTY_LOG_RING_ACQ_REL,
    KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP,
)
from kvmmem.realkvm.kvm import Kvm, KvmIoctlError, KvmUnsupported, VcpuFd, VmFd
from kvmmem.realkvm.stats import StatsFd
from kvmmem.realkvm.structs import (
    EXIT_REASONS,
    KVM_EXIT_INTERNAL_ERROR,
    KVM_EXIT_MEMORY_FAULT,
    KVM_EXIT_MMIO,
    KVM_EXIT_SHUTDOWN,
)
from kvmmem.types import PMD_SIZE, GiB, MiB

Outcome = dict[str, Any]

HARNESS_SLOT_SIZE = PMD_SIZE
"""The harness memslot: guest code (first page), the IDT/GDT/TSS page, the exception
stack page, then the page tables."""
HARNESS_WINDOW = 2 * PMD_SIZE
"""The guest physical window the harness claims: its slot, then a 2 MiB hole."""
DOORBELL_OFFSET = PMD_SIZE + 0x1000
PROBE_OFFSET = PMD_SIZE + 0x3000
EXC_DOORBELL_OFFSET = DOORBELL_OFFSET + 0x100
"""The exception doorbell (the vector at +0, CR2 at +8), as on arm64/riscv."""
MAX_EXITS = 64
"""MMIO exits answered inside one access before it is reported as a runaway."""
DEFAULT_TIMEOUT = 2.0
"""Seconds one guest step may run on this host before the watchdog stops it."""
ACCESS_SIZES = (1, 2, 4, 8)


class HarnessConflict(KvmUnsupported):
    """The scenario's guest physical ranges or slot ids leave the harness no room."""


@dataclass(frozen=True, slots=True)
class HarnessLayout:
    """Where the harness lives: ``slot`` covers ``[gpa, gpa + 2 MiB)``; ``doorbell`` and
    ``probe`` are addresses in the following 2 MiB, which no memslot covers."""

    slot: int
    gpa: int
    doorbell: int
    probe: int


def choose_layout(reserved_gpas: Iterable[tuple[int, int]], reserved_slots: Iterable[int],
                  max_slots: int, phys_bits: int) -> HarnessLayout:
    """Pick the harness slot id (the highest id below ``max_slots`` the scenario does not
    use) and window (the highest 4 MiB-aligned window below min(512 GiB, 2^phys_bits)
    that no reserved range touches, counting each range out to 2 MiB boundaries; then
    the rest of the guest-addressable space).

    Raises :class:`HarnessConflict` when no id or window is free."""
    used = set(reserved_slots)
    slot = next((s for s in range(max_slots - 1, -1, -1) if s not in used), None)
    if slot is None:
        raise HarnessConflict(
            f"the scenario uses every memslot id 0..{max_slots - 1}; the real-KVM harness "
            f"needs one id of its own for its code and page tables")
    spans = sorted((r_gpa // PMD_SIZE * PMD_SIZE,
                    -(-(r_gpa + r_size) // PMD_SIZE) * PMD_SIZE)
                   for r_gpa, r_size in reserved_gpas if r_size > 0)
    limit = min(1 << phys_bits, 1 << 47)
    for top in (min(512 * GiB, limit), limit):
        gpa = _highest_gap(spans, top)
        if gpa is not None:
            return HarnessLayout(slot, gpa, gpa + DOORBELL_OFFSET, gpa + PROBE_OFFSET)
    raise HarnessConflict(
        f"the scenario's guest physical ranges leave no free {HARNESS_WINDOW // MiB} MiB "
        f"window below 2^{min(phys_bits, 47)} for the real-KVM harness (code, page tables "
        f"and a doorbell address outside every memslot)")


def _highest_gap(spans: list[tuple[int, int]], top: int) -> int | None:
    """The highest ``HARNESS_WINDOW``-aligned start ``g`` with ``[g, g+window)`` below
    ``top`` and disjoint from every span (``spans`` sorted, 2 MiB-aligned)."""
    candidate = (top - HARNESS_WINDOW) // HARNESS_WINDOW * HARNESS_WINDOW
    for start, end in reversed(spans):
        if candidate < 0:
            return None
        if start >= candidate + HARNESS_WINDOW:
            continue
        if end <= candidate:
            return candidate
        candidate = (start - HARNESS_WINDOW) // HARNESS_WINDOW * HARNESS_WINDOW
    return candidate if candidate >= 0 else None


@dataclass(slots=True)
class _Slot:
    gpa: int
    size: int
    flags: int


class HarnessVm:
    """What every architecture's harness VM shares: the fds it owns and their release,
    the slot bookkeeping, and the VM-level steps (``set_memslot``, ``prefault``,
    ``get_dirty_log``, ``clear_dirty_log``, ``enable_cap``, ``supports``, ``stats``).  A subclass
    (:class:`~kvmmem.realkvm.x86.RealVm` for x86,
    :class:`~kvmmem.realkvm.archvm.ArchVm` for the ONE_REG architectures) creates the
    VM, its code and vCPUs in ``_setup`` and gives a vCPU's fd by index in
    ``_vcpu_fd``; its constructor ends with :meth:`_start`."""

    layout: HarnessLayout
    vm: VmFd
    vcpus: list[Any]

    def __init__(self, reserved_gpas: Iterable[tuple[int, int]], reserved_slots: Iterable[int],
                 timeout: float, kvm: Kvm | None,
                 dirty_ring: tuple[int, bool] = (0, False), mte: bool = False) -> None:
        self.reserved_gpas = tuple(reserved_gpas)
        self.reserved_slots = tuple(reserved_slots)
        self.timeout = timeout
        self.vcpus = []
        self.slots: dict[int, _Slot] = {}
        self._own_kvm = kvm is None
        self._given_kvm = kvm
        self.kvm: Kvm | None = None
        self._vm: VmFd | None = None
        self._mem = 0
        self._vm_stats: StatsFd | None = None
        self.dirty_ring_size = 0
        """Bytes of each vCPU's dirty ring (:meth:`enable_dirty_ring`), 0 without one."""
        self._ring_request = dirty_ring
        self._mte_request = mte
        """Enable KVM_CAP_ARM_MTE right after creating the VM, with the ring
        (:meth:`enable_mte`)."""
        """``(size, with_bitmap)`` the subclass's ``_setup`` enables right after creating
        the VM (:meth:`_enable_requested_ring`): before the harness's own memslot, which
        WITH_BITMAP must precede, and before any vCPU."""

    def _start(self) -> None:
        """Open /dev/kvm (unless one was given) and run ``_setup``; on any failure release
        everything made so far and re-raise."""
        try:
            self.kvm = Kvm() if self._given_kvm is None else self._given_kvm
            self._setup(self.kvm)
        except BaseException:
            self.close()
            raise

    def _setup(self, kvm: Kvm) -> None:
        raise NotImplementedError

    def _vcpu_fd(self, index: int) -> VcpuFd:
        """vCPU ``index``'s fd, the vCPU created and ready for a step."""
        raise NotImplementedError

    def _ready_vcpu(self, index: int, new: Callable[[VcpuFd], Any]) -> Any:
        """vCPU ``index``, created (with every lower one) on first use: ``new(fd)`` makes
        each one's record (an object with ``fd`` and ``pending``).  A vCPU whose last run
        may have left an exit half done first runs once with ``immediate_exit`` set, so
        KVM completes it (arm64 ``kvm_handle_mmio_return`` commits the PC advance, riscv
        ``kvm_riscv_vcpu_mmio_return`` moves ``sepc``, x86 finishes or drops its MMIO
        completion) before the next step writes registers.  Raises
        :class:`~kvmmem.realkvm.kvm.KvmUnsupported` when KVM refuses a vCPU."""
        while len(self.vcpus) <= index:
            try:
                fd = self.vm.create_vcpu(len(self.vcpus))
            except KvmIoctlError as exc:
                raise KvmUnsupported(f"this kernel's KVM cannot create vCPU {len(self.vcpus)}: "
                                     f"{exc.errno_name}") from None
            try:
                record = new(fd)
            except BaseException:
                fd.close()
                raise
            self.vcpus.append(record)
        v = self.vcpus[index]
        if v.pending:
            v.fd.run.immediate_exit = 1
            v.fd.kvm_run()
            v.fd.run.immediate_exit = 0
            v.pending = False
        return v

    def _map_harness_memory(self) -> int:
        """Anonymous memory for the harness slot: its host address.  Raises ``OSError``."""
        addr, err = libc.mmap(0, HARNESS_SLOT_SIZE, libc.PROT_READ | libc.PROT_WRITE,
                              libc.MAP_PRIVATE | libc.MAP_ANONYMOUS | libc.MAP_NORESERVE)
        if err:
            raise OSError(err, f"harness memory: {libc.errno_name(err)}")
        self._mem = addr
        return addr

    def _add_harness_slot(self, addr: int) -> None:
        """The harness's own memslot over ``addr``.  Raises ``OSError``."""
        err_name = self.vm.set_user_memory_region(self.layout.slot, 0, self.layout.gpa,
                                                  HARNESS_SLOT_SIZE, addr)
        if err_name is not None:
            raise OSError(getattr(errno, err_name, 0),
                          f"harness memslot {self.layout.slot}: {err_name}")

    # --- guest steps (the architecture's routines) -------------------------------------

    def guest_read(self, gpa: int, size: int, vcpu: int = 0,
                   path: str | None = None) -> Outcome:
        """The guest loads ``size`` (1, 2, 4, 8) bytes at ``gpa`` (zero-extending); the
        outcome has the little-endian ``value`` when the routine completed.  ``path``:
        ``native`` or ``emulated`` (x86 on this host; the other harnesses have one path
        and ignore it).  Raises ``ValueError`` for another size."""
        return self._access(f"read{size}", gpa, size, 0, vcpu, path, is_read=True)

    def guest_write(self, gpa: int, size: int, value: int, vcpu: int = 0,
                    path: str | None = None) -> Outcome:
        """The guest stores the low ``size`` bytes of ``value`` at ``gpa``."""
        return self._access(f"write{size}", gpa, size, value & ((1 << 8 * size) - 1), vcpu,
                            path, is_read=False)

    def guest_exec(self, gpa: int, vcpu: int = 0, path: str | None = None) -> Outcome:
        """An instruction fetch at ``gpa`` (each architecture says how it is made)."""
        raise NotImplementedError

    def _access(self, routine: str, gpa: int, size: int, value: int, vcpu: int,
                path: str | None, is_read: bool) -> Outcome:
        """Run the access ``routine`` once with its address and value registers set."""
        raise NotImplementedError

    @staticmethod
    def _check_size(size: int) -> None:
        if size not in ACCESS_SIZES:
            raise ValueError(f"access size must be 1, 2, 4 or 8, not {size}")

    @staticmethod
    def _access_outcome(out: Outcome, size: int, is_read: bool) -> Outcome:
        """A routine's run as the step's outcome: the doorbell's data, when the routine
        completed, is a read's ``value`` (its low ``size`` bytes); private keys go."""
        data = out.get("_doorbell")
        out = public(out)
        if is_read and data is not None:
            out["value"] = data & ((1 << 8 * size) - 1)
        return out

    # --- running the guest ------------------------------------------------------------

    reset_exit_reason: bool = False
    """Clear ``kvm_run.exit_reason`` before each ``KVM_RUN`` (x86: an EFAULT is then never
    mistaken for a stale ``KVM_EXIT_MEMORY_FAULT``).  arm64 and riscv must not: their
    ``KVM_RUN`` completes an MMIO exit only while ``exit_reason`` still says
    ``KVM_EXIT_MMIO`` (arm64 ``kvm_handle_mmio_return``)."""

    def _exception(self, first: int, second: int) -> Outcome:
        """The outcome of a guest exception whose handler rang the exception doorbell
        with ``first`` (the cause: x86 vector, arm64 ESR, riscv scause) then ``second``
        (the address: CR2, FAR, stval); :meth:`_drive` adds them as the private keys
        ``_cause`` and ``_address``."""
        raise NotImplementedError

    def _drive(self, fd: VcpuFd, until_doorbell: bool = True,
               stop_at_mmio: bool = False) -> tuple[Outcome, bool]:
        """Run ``fd`` (registers already set) until the doorbell rings (``ok`` with its
        data under ``_doorbell``), the exception doorbell rings twice (:meth:`_exception`),
        or anything else ends the run (``fault`` with the memory-fault fields when KVM
        fills them, ``error``, ``timeout`` from the watchdog or after ``MAX_EXITS``,
        ``exit`` with ``exit_reason`` and ``suberror`` for an internal error).  MMIO exits
        on the way are answered (reads with zero bytes) and collected; the first becomes
        the outcome when the run then completed or left (``more_mmio`` for the rest).
        ``until_doorbell`` False treats the doorbell as any MMIO exit; ``stop_at_mmio``
        ends the run at the first MMIO exit that is not the exception doorbell.

        Returns ``(outcome, stale)``: ``stale`` when the vCPU is left in a state the next
        step must rewrite (an exception, a timeout, a shutdown or an internal error)."""
        run = fd.run
        mmio = run.exit.mmio
        doorbell = self.layout.doorbell
        exc = self.layout.gpa + EXC_DOORBELL_OFFSET
        exits: list[Outcome] = []
        first: int | None = None
        out: Outcome | None = None
        stale = False
        with fd.watchdog(self.timeout) as alarm:
            for _ in range(MAX_EXITS):
                if self.reset_exit_reason:
                    run.exit_reason = 0
                err = fd.kvm_run()
                if err:
                    if err == errno.EINTR:
                        if alarm.fired:
                            out, stale = {"result": "timeout", "seconds": self.timeout}, True
                            break
                        continue
                    if err == errno.EFAULT:
                        out = {"result": "fault"}
                        if run.exit_reason == KVM_EXIT_MEMORY_FAULT:
                            fault = run.exit.memory_fault
                            out.update(gpa=fault.gpa, size=fault.size, flags=fault.flags)
                    else:
                        out = {"result": "error", "errno": libc.errno_name(err)}
                    break
                reason = run.exit_reason
                if reason != KVM_EXIT_MMIO:
                    out = {"result": "exit", "exit_reason": EXIT_REASONS.get(reason, str(reason))}
                    if reason == KVM_EXIT_INTERNAL_ERROR:
                        out["suberror"] = run.exit.internal.suberror
                    stale = reason in (KVM_EXIT_INTERNAL_ERROR, KVM_EXIT_SHUTDOWN)
                    break
                length = mmio.len
                data = int.from_bytes(bytes(mmio.data)[:length], "little")
                addr = mmio.phys_addr
                if mmio.is_write and length == 8 and addr in (exc, exc + 8):
                    if addr == exc:
                        first = data
                        continue
                    cause = -1 if first is None else first
                    out, stale = self._exception(cause, data), True
                    out.update(_cause=cause, _address=data)
                    break
                if until_doorbell and mmio.is_write and length == 8 and addr == doorbell:
                    out = {"result": "ok", "_doorbell": data}
                    break
                exit_out: Outcome = {"result": "mmio", "gpa": addr, "len": length,
                                     "is_write": bool(mmio.is_write)}
                if mmio.is_write:
                    exit_out["data"] = data
                else:
                    ctypes.memset(ctypes.addressof(mmio.data), 0, 8)
                exits.append(exit_out)
                if stop_at_mmio:
                    out = {"result": "ok"}
                    break
            else:
                out = {"result": "timeout", "seconds": self.timeout,
                       "reason": f"more than {MAX_EXITS} exits"}
                stale = True
        if out is None:  # pragma: no cover - the loop always sets it
            raise RuntimeError("guest run ended without an outcome")
        return assemble_outcome(exits, out), stale

    # --- lifetime -------------------------------------------------------------------

    def close(self) -> None:
        """Release the vCPUs, the VM, the harness memory and (if owned) /dev/kvm.
        Idempotent; safe after a failed construction."""
        if self._vm_stats is not None:
            self._vm_stats.close()
            self._vm_stats = None
        for v in self.vcpus:
            v.fd.close()
        self.vcpus.clear()
        if self._vm is not None:
            self._vm.close()
            self._vm = None
        if self._mem:
            libc.munmap(self._mem, HARNESS_SLOT_SIZE)
            self._mem = 0
        if self._own_kvm and self.kvm is not None:
            self.kvm.close()
            self.kvm = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- VM steps ---------------------------------------------------------------------

    def set_memslot(self, slot: int, gpa: int, size: int, hva: int, flags: int = 0,
                    guest_memfd: int | None = None, guest_memfd_offset: int = 0) -> Outcome:
        """``KVM_SET_USER_MEMORY_REGION`` (``size`` 0 deletes), or
        ``KVM_SET_USER_MEMORY_REGION2`` binding the file ``guest_memfd`` (an fd; pass
        ``0xFFFFFFFF`` for none) at ``guest_memfd_offset`` when ``guest_memfd`` is not
        ``None``: ``{"result": "ok"}`` or ``{"result": "error", "errno": NAME}``.  Raises
        :class:`HarnessConflict` when the request touches the harness's slot id or window
        (the scenario did not declare it)."""
        lay = self.layout
        if slot == lay.slot:
            raise HarnessConflict(f"memslot {slot} is the harness's own; declare every slot "
                                  f"id in reserved_slots")
        if size and gpa < lay.gpa + HARNESS_WINDOW and gpa + size > lay.gpa:
            raise HarnessConflict(
                f"memslot [{gpa:#x}, {gpa + size:#x}) overlaps the harness window at "
                f"{lay.gpa:#x}; declare every range in reserved_gpas")
        if guest_memfd is None:
            err = self.vm.set_user_memory_region(slot, flags, gpa, size, hva)
        else:
            err = self.vm.set_user_memory_region2(slot, flags, gpa, size, hva,
                                                  guest_memfd & 0xFFFF_FFFF,
                                                  guest_memfd_offset)
        if err is not None:
            return {"result": "error", "errno": err}
        if size:
            self.slots[slot] = _Slot(gpa, size, flags)
        else:
            self.slots.pop(slot, None)
        return {"result": "ok"}

    def prefault(self, gpa: int, size: int, vcpu: int = 0) -> Outcome:
        """One ``KVM_PRE_FAULT_MEMORY`` on vCPU ``vcpu``
        (:meth:`~kvmmem.realkvm.kvm.VcpuFd.pre_fault`): ``ok`` with ``remaining``, or
        ``error`` with the errno exactly as the ioctl answers, or ``timeout``."""
        return self._vcpu_fd(vcpu).pre_fault(gpa, size, self.timeout)

    def get_dirty_log(self, slot: int) -> Outcome:
        """``KVM_GET_DIRTY_LOG``: ``ok`` with ``dirty`` (sorted absolute gfns of the host
        page size; the call clears them) or ``error`` (ENOENT for a slot without dirty
        logging or none)."""
        shift = mmap.PAGESIZE.bit_length() - 1
        info = self.slots.get(slot)
        npages = info.size >> shift if info is not None else 64
        log = self.vm.get_dirty_log(slot, npages)
        if log.errno is not None:
            return {"result": "error", "errno": log.errno}
        base = info.gpa >> shift if info is not None else 0
        return {"result": "ok", "dirty": [base + p for p in log.pages]}

    def clear_dirty_log(self, slot: int, first_page: int, num_pages: int,
                        pages: list[int] | None = None) -> Outcome:
        """``KVM_CLEAR_DIRTY_LOG`` of ``num_pages`` pages from ``first_page``; the user
        bitmap sets the bits of ``pages`` (slot page numbers), or every bit."""
        err = self.vm.clear_dirty_log(slot, first_page, num_pages, pages)
        return {"result": "ok"} if err is None else {"result": "error", "errno": err}

    def enable_cap(self, cap: int, args: list[int], flags: int = 0) -> Outcome:
        """``KVM_ENABLE_CAP`` on the VM: ``ok`` or ``error`` with the errno exactly as the
        kernel answers (a kernel without the capability answers EINVAL: the model
        predicts that too, so it is no reason to call the step unsupported)."""
        err = self.vm.enable_cap(cap, *args, flags=flags)
        return {"result": "ok"} if err is None else {"result": "error", "errno": err}

    def enable_dirty_ring(self, size: int, with_bitmap: bool = False) -> None:
        """Enable the dirty ring before any vCPU or memslot exists, as a VMM does right
        after KVM_CREATE_VM: KVM_ENABLE_CAP of KVM_CAP_DIRTY_LOG_RING_ACQ_REL where this KVM
        offers it, else KVM_CAP_DIRTY_LOG_RING, with ``args[0]`` = ``size`` bytes; with
        ``with_bitmap`` then KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP.

        Raises :class:`~kvmmem.realkvm.kvm.KvmUnsupported` naming the capability this
        KVM lacks (both ring capabilities 0; WITH_BITMAP 0) or the errno it refused the
        setup with (a size it refuses: the scenario is not applicable, as the model
        says)."""
        assert not self.vcpus, "the ring is enabled before any vCPU"
        if self.vm.check_extension(KVM_CAP_DIRTY_LOG_RING_ACQ_REL):
            cap, name = KVM_CAP_DIRTY_LOG_RING_ACQ_REL, "KVM_CAP_DIRTY_LOG_RING_ACQ_REL"
        elif self.vm.check_extension(KVM_CAP_DIRTY_LOG_RING):
            cap, name = KVM_CAP_DIRTY_LOG_RING, "KVM_CAP_DIRTY_LOG_RING"
        else:
            raise KvmUnsupported("this KVM has no dirty ring (KVM_CAP_DIRTY_LOG_RING and "
                                 "KVM_CAP_DIRTY_LOG_RING_ACQ_REL are 0)")
        err = self.vm.enable_cap(cap, size)
        if err is not None:
            raise KvmUnsupported(f"dirty_ring: KVM_ENABLE_CAP of {name} ({size} bytes) failed "
                                 f"with {err}")
        self.dirty_ring_size = size
        if with_bitmap:
            if not self.vm.check_extension(KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP):
                raise KvmUnsupported("this KVM lacks KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP (0)")
            err = self.vm.enable_cap(KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP)
            if err is not None:
                raise KvmUnsupported("dirty_ring_with_bitmap: KVM_ENABLE_CAP of "
                                     f"KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP failed with {err}")

    def _enable_requested_ring(self) -> None:
        """The VM capabilities asked for at construction, right after KVM_CREATE_VM: the
        dirty ring (:meth:`enable_dirty_ring`) and MTE (:meth:`enable_mte`)."""
        size, with_bitmap = self._ring_request
        if size:
            self.enable_dirty_ring(size, with_bitmap)
        if self._mte_request:
            self.enable_mte()

    def enable_mte(self) -> None:
        """KVM_ENABLE_CAP(KVM_CAP_ARM_MTE) before any vCPU, as a VMM does right after
        KVM_CREATE_VM (QEMU's ``kvm_arm_enable_mte``).

        Raises :class:`~kvmmem.realkvm.kvm.KvmUnsupported` when this KVM does not offer
        it (KVM_CHECK_EXTENSION 0: no MTE in the CPU, or a kernel before v5.14) or
        refuses it (the errno): the scenario is not applicable, as the model says."""
        assert not self.vcpus, "MTE is enabled before any vCPU"
        if not self.vm.check_extension(KVM_CAP_ARM_MTE):
            raise KvmUnsupported("mte: this KVM does not offer KVM_CAP_ARM_MTE (0: no MTE "
                                 "in the CPU, or a kernel before v5.14)")
        err = self.vm.enable_cap(KVM_CAP_ARM_MTE)
        if err is not None:
            raise KvmUnsupported(f"mte: KVM_ENABLE_CAP of KVM_CAP_ARM_MTE failed with {err}")

    def ready_first_vcpu(self) -> None:
        """Create vCPU 0 now if no step has yet (the scenario's VM has it from the start)."""
        self._vcpu_fd(0)

    def harvest_dirty_ring(self, vcpu: int) -> Outcome:
        """The VMM reading vCPU ``vcpu``'s ring (mmapped on first use) from its fetch
        index: ``ok`` with ``dirty``, the absolute gfns (host page size) of the entries
        flagged dirty, in ring order; each is flagged reset.  An entry of a slot the
        harness does not know is skipped, as in the model."""
        fd = self._vcpu_fd(vcpu)
        err = fd.map_dirty_ring(self.dirty_ring_size)
        if err is not None:
            return {"result": "error", "errno": err}
        shift = mmap.PAGESIZE.bit_length() - 1
        gfns: list[int] = []
        for slot, offset in fd.harvest_dirty_ring():
            info = self.slots.get(slot & 0xFFFF) if slot >> 16 == 0 else None
            if info is not None:
                gfns.append((info.gpa >> shift) + offset)
        return {"result": "ok", "dirty": gfns}

    def reset_dirty_rings(self) -> Outcome:
        """``KVM_RESET_DIRTY_RINGS``: ``ok`` with ``reset`` (the entries reset, the ioctl's
        return value) or ``error``."""
        count, err = self.vm.reset_dirty_rings()
        return {"result": "ok", "reset": count} if err is None else {"result": "error",
                                                                     "errno": err}

    def set_memory_attributes(self, gpa: int, size: int, attributes: int,
                              flags: int = 0) -> Outcome:
        """``KVM_SET_MEMORY_ATTRIBUTES`` of ``[gpa, gpa + size)`` to ``attributes`` (the
        uapi bits): ``ok`` or ``error`` with the errno name, also where the kernel has no
        such ioctl (its unknown-ioctl errno: the model predicts those too).  Raises
        :class:`HarnessConflict` when the range touches the harness window (the scenario
        did not declare it)."""
        lay = self.layout
        if size and gpa < lay.gpa + HARNESS_WINDOW and gpa + size > lay.gpa:
            raise HarnessConflict(
                f"memory attributes of [{gpa:#x}, {gpa + size:#x}) would change the harness "
                f"window at {lay.gpa:#x}; declare every range in reserved_gpas")
        err = self.vm.set_memory_attributes(gpa, size, attributes, flags)
        return {"result": "ok"} if err is None else {"result": "error", "errno": err}

    def supports(self, ioctl: str) -> bool:
        """Whether this VM's KVM offers ``ioctl`` (its capability is non-zero)."""
        return self.vm.supports(ioctl)

    def stats(self, vcpu: int = 0) -> dict[str, int]:
        """The VM's binary stats merged with vCPU ``vcpu``'s (created if needed); ``{}``
        where the kernel has no ``KVM_GET_STATS_FD`` (before 5.14)."""
        if not self.vm.supports("KVM_GET_STATS_FD"):
            return {}
        if self._vm_stats is None:
            self._vm_stats = self.vm.stats()
        out = self._vm_stats.read()
        with self._vcpu_fd(vcpu).stats() as s:
            out.update(s.read())
        return out


def assemble_outcome(exits: list[Outcome], out: Outcome) -> Outcome:
    """One step's outcome from the MMIO exits seen on the way and how the run ended: the
    first exit (with ``more_mmio`` for the others and the doorbell's data carried over)
    when the run then completed (``ok``) or left otherwise (``exit``); else ``out``."""
    if exits and out["result"] in ("ok", "exit"):
        first = dict(exits[0])
        if "_doorbell" in out:
            first["_doorbell"] = out["_doorbell"]
        if len(exits) > 1:
            first["more_mmio"] = exits[1:]
        return first
    return out


def public(out: Outcome) -> Outcome:
    """``out`` without the harness's private keys (``_doorbell``, ``_cause``, ...)."""
    return {k: v for k, v in out.items() if not k.startswith("_")}
