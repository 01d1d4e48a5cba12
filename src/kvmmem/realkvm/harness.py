"""A real VM driven one scenario step at a time: :class:`RealVm`.

:class:`RealVm` creates a VM on ``/dev/kvm``, places its own memory (guest code
and page tables, one memslot) and the doorbell where the scenario will never
put anything, and offers one method per scenario step
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

Guest virtual = guest physical below 2^47.  A GiB above 2^47 is reached through
an alias GiB in the lower half that no reserved range uses (a CPL3 PVM guest
cannot touch the upper half).

Guest exceptions: the guest has an IDT, GDT and TSS of its own in the harness memslot
(:mod:`kvmmem.realkvm.guest`); every exception vector reports to the *exception
doorbell* (the doorbell + 0x100: the vector, then CR2).  A TDP host (VMX/SVM) delivers
them there; this host's PVM ends them in a triple fault (``KVM_EXIT_SHUTDOWN``) as it
did before.  After an exception, a shutdown, an internal error or a timeout the vCPU
is *stale*: before its next step its pending and injected events are dropped
(``KVM_SET_VCPU_EVENTS`` with nothing set) and its segment state is rewritten, so an
event KVM re-queued at the exit (``svm_complete_interrupts`` / ``vmx_complete_interrupts``
requeue the interrupted delivery) cannot leak into the next step.

Harness placement: give :class:`RealVm` every guest physical range and slot
id the scenario will use (``reserved_gpas``, ``reserved_slots``); it takes the
highest free slot id and a free 4 MiB window (2 MiB of harness memory, then
2 MiB with no memslot for the doorbell) and raises :class:`HarnessConflict`
with a clear message when the scenario leaves no room.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Self

from kvmmem.realkvm import libc
from kvmmem.realkvm.guest import (
    EXC_DOORBELL_FROM_CODE,
    LOWER_HALF,
    PATHS,
    RFLAGS_DEFAULT,
    RFLAGS_TF,
    STACK_TOP_OFFSET,
    SYSTEM_OFFSET,
    TABLES_OFFSET,
    VECTOR_NAMES,
    PageTables,
    long_mode_sregs,
    write_system_tables,
)
from kvmmem.realkvm.kvm import Kvm, KvmIoctlError, KvmUnsupported, VcpuFd, VmFd
from kvmmem.realkvm.stats import StatsFd
from kvmmem.realkvm.structs import (
    EXIT_REASONS,
    GPR_NAMES,
    KVM_EXIT_INTERNAL_ERROR,
    KVM_EXIT_MEMORY_FAULT,
    KVM_EXIT_MMIO,
    KVM_EXIT_SHUTDOWN,
    kvm_regs,
)
from kvmmem.types import PAGE_SIZE, PMD_SIZE, GiB, MiB

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
if EXC_DOORBELL_OFFSET != EXC_DOORBELL_FROM_CODE:  # pragma: no cover - a layout edit
    raise ImportError("the x86 exception handler's doorbell offset disagrees with the layout")
KVM_SET_VCPU_EVENTS = 0x4040AEA0
"""``_IOW(KVMIO, 0xa0, struct kvm_vcpu_events)`` (64 bytes; x86 base API since 2.6.32)."""
MAX_EXITS = 64
"""MMIO exits answered inside one access before it is reported as a runaway."""
DEFAULT_TIMEOUT = 2.0
"""Seconds one guest step may run on this host before the watchdog stops it."""
ACCESS_SIZES = (1, 2, 4, 8)
EXEC_POISON = 0xA000_0000_0000_0000
"""Register value during ``guest_exec``: non-canonical, and so are its sums and scaled
sums (x2, x4, x8), so a memory operand built from registers raises #GP/#SS."""


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
    ``get_dirty_log``, ``clear_dirty_log``, ``supports``, ``stats``).  A subclass
    (:class:`RealVm` for x86, :class:`~kvmmem.realkvm.archvm.ArchVm` for the ONE_REG
    architectures) creates the VM, its code and vCPUs in ``_setup`` and gives a vCPU's
    fd by index in ``_vcpu_fd``; its constructor ends with :meth:`_start`."""

    layout: HarnessLayout
    vm: VmFd
    vcpus: list[Any]

    def __init__(self, reserved_gpas: Iterable[tuple[int, int]], reserved_slots: Iterable[int],
                 timeout: float, kvm: Kvm | None) -> None:
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

    def set_memslot(self, slot: int, gpa: int, size: int, hva: int,
                    flags: int = 0) -> Outcome:
        """``KVM_SET_USER_MEMORY_REGION`` (``size`` 0 deletes): ``{"result": "ok"}`` or
        ``{"result": "error", "errno": NAME}``.  Raises :class:`HarnessConflict` when the
        request touches the harness's slot id or window (the scenario did not declare
        it)."""
        lay = self.layout
        if slot == lay.slot:
            raise HarnessConflict(f"memslot {slot} is the harness's own; declare every slot "
                                  f"id in reserved_slots")
        if size and gpa < lay.gpa + HARNESS_WINDOW and gpa + size > lay.gpa:
            raise HarnessConflict(
                f"memslot [{gpa:#x}, {gpa + size:#x}) overlaps the harness window at "
                f"{lay.gpa:#x}; declare every range in reserved_gpas")
        err = self.vm.set_user_memory_region(slot, flags, gpa, size, hva)
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

    def clear_dirty_log(self, slot: int, first_page: int, num_pages: int) -> Outcome:
        """``KVM_CLEAR_DIRTY_LOG`` of ``num_pages`` pages from ``first_page``."""
        err = self.vm.clear_dirty_log(slot, first_page, num_pages)
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


@dataclass(slots=True)
class _Vcpu:
    fd: VcpuFd
    path: str = ""
    stale: bool = True
    """True when the vCPU's state must be rewritten (new, or after an exception, a
    shutdown, an internal error or a timeout left it in an unknown state)."""
    pending: bool = False
    """True when an exit may still await completion (flushed with immediate_exit)."""


class RealVm(HarnessVm):
    """A VM on this host's KVM with the kvmmem guest harness.

    ``reserved_gpas``: every ``(gpa, size)`` a scenario will use (slots, accesses);
    ``reserved_slots``: every slot id it will use; ``path``: the default guest path
    (``native`` or ``emulated``); ``timeout``: seconds one guest step may run;
    ``kvm``: an open :class:`Kvm` to share (else one is opened and owned).

    Raises :class:`~kvmmem.realkvm.kvm.KvmUnavailable` without a usable /dev/kvm,
    :class:`HarnessConflict` when the scenario leaves no room.  Use as a context
    manager (or call :meth:`close`): every fd and mapping is released, also when the
    constructor fails half-way.  ``code``: the guest code page as
    :func:`kvmmem.realkvm.x86_code.code_blob` gives it (encoded here when absent; an
    agent inside an emulated machine, which has no iced-x86, is sent it)."""

    layout: HarnessLayout
    vm: VmFd
    reset_exit_reason = True

    def __init__(self, reserved_gpas: Iterable[tuple[int, int]] = (),
                 reserved_slots: Iterable[int] = (), path: str = "native",
                 timeout: float = DEFAULT_TIMEOUT, kvm: Kvm | None = None,
                 code: dict[str, Any] | None = None) -> None:
        if path not in PATHS:
            raise ValueError(f"path must be one of {PATHS}, not {path!r}")
        super().__init__(reserved_gpas, reserved_slots, timeout, kvm)
        self.path = path
        self.vcpus: list[_Vcpu] = []
        self._entries: dict[str, int] = {}
        self._phys_bits = 36
        self._alias: dict[int, int] = {}
        self._doorbell_va = 0
        self._probe_va = 0
        self._code = code
        self._start()

    def _setup(self, kvm: Kvm) -> None:
        self._vm = self.vm = kvm.create_vm()
        for ioctl in ("KVM_SET_USER_MEMORY_REGION", "KVM_SET_CPUID2"):
            self.vm.require(ioctl)
        self._phys_bits = kvm.phys_bits()
        self.layout = choose_layout(self.reserved_gpas, self.reserved_slots,
                                    self.vm.max_memslots() or 32, self._phys_bits)
        addr = self._map_harness_memory()
        if self._code is None:
            from kvmmem.realkvm.x86_code import code_blob  # iced-x86: host side only
            self._code = code_blob()
        code = bytes.fromhex(self._code["code"])
        self._entries = {name: self.layout.gpa + offset
                         for name, offset in self._code["entries"].items()}
        ctypes.memmove(addr, code, len(code))
        write_system_tables(self.layout.gpa, addr)
        self._tables = PageTables(self.layout.gpa + TABLES_OFFSET, addr + TABLES_OFFSET,
                                  HARNESS_SLOT_SIZE - TABLES_OFFSET)
        self._tables.map_gib(self.layout.gpa // GiB)
        self._tables.map_gib(self.layout.doorbell // GiB)
        self._doorbell_va = self.layout.doorbell
        self._probe_va = self.layout.probe
        self._add_harness_slot(addr)

    # --- vCPUs ----------------------------------------------------------------------

    def _vcpu(self, index: int, path: str | None) -> _Vcpu:
        """vCPU ``index`` (created on first use) set up for ``path``."""
        path = path or self.path
        if path not in PATHS:
            raise ValueError(f"path must be one of {PATHS}, not {path!r}")
        def new(fd: VcpuFd) -> _Vcpu:
            fd.set_cpuid2(self.vm.kvm.supported_cpuid())
            return _Vcpu(fd)

        v: _Vcpu = self._ready_vcpu(index, new)
        if v.stale or v.path != path:
            if v.stale:
                _drop_events(v.fd)
            v.fd.set_sregs(long_mode_sregs(v.fd.get_sregs(), self._tables.cr3, path,
                                           self.layout.gpa))
            v.path = path
            v.stale = False
        return v

    def _va(self, gpa: int, size: int) -> int | None:
        """The guest virtual address through which the guest reaches
        ``[gpa, gpa + size)``, mapping it first; ``None`` when it cannot be reached
        (beyond MAXPHYADDR, straddling 2^47, or in a GiB an undeclared range let the
        harness use as an alias).

        Below 2^47 the map is the identity.  Each GiB above gets an alias GiB in the lower
        half that no reserved range uses (a PVM guest's CPL3 cannot touch the upper
        half)."""
        end = gpa + max(size, 1)
        if gpa < 0 or end > min(1 << 48, 1 << self._phys_bits):
            return None
        first, last = gpa // GiB, (end - 1) // GiB
        if end <= LOWER_HALF:
            if any(self._tables.targets.get(g, g) != g for g in range(first, last + 1)):
                return None  # that virtual GiB already aliases an upper-half GiB
            for gib in range(first, last + 1):
                self._tables.map_gib(gib)
            return gpa
        if gpa < LOWER_HALF:
            return None
        base = self._alias.get(first)
        if base is None or any(self._alias.get(first + i) != base + i
                               for i in range(last - first + 1)):
            base = self._alloc_alias(last - first + 1)
            for i in range(last - first + 1):
                self._alias[first + i] = base + i
                self._tables.map_gib(base + i, first + i)
        return base * GiB + gpa % GiB

    def _alloc_alias(self, count: int) -> int:
        """``count`` consecutive free lower-half virtual GiBs (highest first)."""
        spans = sorted((g // GiB, -(-(g + s) // GiB)) for g, s in self.reserved_gpas if s > 0)
        gib = LOWER_HALF // GiB - count
        while gib >= 0:
            clash = next(((a, b) for a, b in spans if a < gib + count and b > gib), None)
            if clash is not None:
                gib = clash[0] - count
                continue
            taken = [g for g in range(gib, gib + count) if self._tables.is_mapped(g)]
            if taken:
                gib = taken[0] - count
                continue
            return gib
        raise HarnessConflict("no free lower-half GiB left to alias an upper-half gpa")

    # --- guest steps ----------------------------------------------------------------

    def _unreachable(self, gpa: int, size: int) -> Outcome:
        return {"result": "unsupported",
                "reason": f"[{gpa:#x}, {gpa + size:#x}) cannot be reached through the "
                          f"guest's page tables (MAXPHYADDR {self._phys_bits}, or it "
                          f"straddles 2^47)"}

    def _access(self, routine: str, gpa: int, size: int, value: int, vcpu: int,
                path: str | None, is_read: bool) -> Outcome:
        self._check_size(size)
        va = self._va(gpa, size)
        if va is None:
            return self._unreachable(gpa, size)
        v = self._vcpu(vcpu, path)
        regs = kvm_regs(rip=self._entries[routine], rsi=va, rax=value,
                        rdi=self._doorbell_va, rflags=RFLAGS_DEFAULT)
        return self._access_outcome(self._run(v, regs), size, is_read)

    def guest_exec(self, gpa: int, vcpu: int = 0, path: str | None = None) -> Outcome:
        """An instruction fetch at ``gpa``: the guest jumps there with the trap flag set
        and every general register holding a non-canonical address, so the fetched
        instruction either faults on its memory operand or single-steps, and the
        resulting guest exception ends the run: on a TDP host the harness's IDT reports
        it at the exception doorbell; a CPL3 PVM guest triple-faults
        (``KVM_EXIT_SHUTDOWN``).  Whatever the bytes at ``gpa`` are, at most about one
        instruction runs (RIP-relative operands aside).

        ``ok`` when the fetch succeeded (any exception, or an MMIO exit of the
        instruction's own access); ``fault`` on EFAULT; ``abort`` ``#UD`` when KVM
        could not fetch the instruction for emulation (``insn_emulation_fail`` rose:
        ``handle_emulation_failure`` injects #UD into a CPL>0 guest); an ``exit``
        outcome for anything else (``KVM_EXIT_INTERNAL_ERROR`` where KVM reports the
        emulation failure to userspace instead, as upstream does at CPL0)."""
        va = self._va(gpa, 1)
        if va is None:
            return self._unreachable(gpa, 1)
        v = self._vcpu(vcpu, path)
        primed = self._prime(v)
        if primed is not None:
            return primed
        regs = kvm_regs(**dict.fromkeys(GPR_NAMES, EXEC_POISON))
        regs.rip = va
        regs.rflags = RFLAGS_DEFAULT | RFLAGS_TF
        with v.fd.stats() as stats:
            before = stats.read()
            out = self._run(v, regs, until_doorbell=False)
            after = stats.read()
        failed = after.get("insn_emulation_fail", 0) > before.get("insn_emulation_fail", 0)
        if out["result"] == "abort" or (out["result"] == "exit"
                                        and out.get("exit_reason") == "KVM_EXIT_SHUTDOWN"):
            return {"result": "abort", "abort": "#UD"} if failed else {"result": "ok"}
        if out["result"] == "mmio":
            return {"result": "ok"}
        return public(out)

    def _prime(self, v: _Vcpu) -> Outcome | None:
        """Map the pages the delivery of a guest exception touches (the IDT/GDT/TSS page
        and, writable, the exception stack; the code page and page tables are in use
        already) before ``guest_exec`` raises one: ``None``, or the outcome of a prime
        that did not complete.

        Under QEMU's SVM (the x86 machines) an exception delivery interrupted by a
        nested page fault on one of these pages left the next exit, the handler's
        store to the exception doorbell, still flagged as happening during event
        delivery (EXITINTINFO valid), and KVM refuses to emulate MMIO then
        (``svm_check_emulate_instruction``: ``KVM_INTERNAL_ERROR_DELIVERY_EV``).
        Mapped pages take no fault during delivery."""
        base = self.layout.gpa
        out = self._run(v, kvm_regs(rip=self._entries["prime"], rsi=base + SYSTEM_OFFSET,
                                    rbx=base + STACK_TOP_OFFSET - 8,
                                    rdi=self._doorbell_va, rflags=RFLAGS_DEFAULT))
        if out["result"] == "ok":
            return None
        return public(out)

    def _run(self, v: _Vcpu, regs: kvm_regs, until_doorbell: bool = True) -> Outcome:
        """Enter the guest at ``regs`` and drive it (:meth:`HarnessVm._drive`) until the
        doorbell (or, with ``until_doorbell`` False, until it stops on its own): returns
        the outcome, with the doorbell's data under ``_doorbell`` when it rang.  A guest
        exception ends the run as ``abort`` with the vector's mnemonic and ``vector``
        (and the private ``_cause``/``_address``: vector and CR2)."""
        v.fd.set_regs(regs)
        out, stale = self._drive(v.fd, until_doorbell)
        v.pending = True
        v.stale = v.stale or stale
        return out

    def _exception(self, first: int, second: int) -> Outcome:
        name = VECTOR_NAMES[first] if 0 <= first < len(VECTOR_NAMES) else str(first)
        return {"result": "abort", "abort": name, "vector": first}

    def _vcpu_fd(self, index: int) -> VcpuFd:
        return self._vcpu(index, None).fd

    # --- measurements and diagnostics -------------------------------------------------

    def touch(self, gpa: int, count: int, stride: int = PAGE_SIZE, write: bool = True,
              vcpu: int = 0, path: str | None = None) -> tuple[Outcome, float]:
        """One guest routine that reads or writes one byte every ``stride`` bytes,
        ``count`` times from ``gpa``: ``(outcome, seconds inside KVM_RUN loop)``."""
        va = self._va(gpa, count * stride)
        if va is None:
            return self._unreachable(gpa, count * stride), 0.0
        v = self._vcpu(vcpu, path)
        regs = kvm_regs(rip=self._entries["touch_write" if write else "touch_read"],
                        rsi=va, rcx=count, rdx=stride, rdi=self._doorbell_va,
                        rflags=RFLAGS_DEFAULT)
        start = time.perf_counter()
        out = self._run(v, regs)
        elapsed = time.perf_counter() - start
        return public(out), elapsed

    def mmio_round_trips(self, count: int, vcpu: int = 0,
                         path: str | None = None) -> tuple[int, float]:
        """Run a guest loop whose every iteration is an MMIO write exit, re-entering
        after each: ``(exits seen, seconds)``."""
        v = self._vcpu(vcpu, path)
        fd, run = v.fd, v.fd.run
        fd.set_regs(kvm_regs(rip=self._entries["mmio_loop"], rcx=count,
                             rbx=self._probe_va, rdi=self._doorbell_va,
                             rflags=RFLAGS_DEFAULT))
        seen = 0
        probe = self.layout.probe
        with fd.watchdog(max(self.timeout, count * 1e-3)):
            start = time.perf_counter()
            while True:
                if fd.kvm_run() or run.exit_reason != KVM_EXIT_MMIO:
                    break
                if run.exit.mmio.phys_addr != probe:
                    break
                seen += 1
            elapsed = time.perf_counter() - start
        v.pending = True
        return seen, elapsed

    def spin(self, vcpu: int = 0, path: str | None = None) -> Outcome:
        """Enter a guest that loops forever; the watchdog stops it (``timeout``)."""
        v = self._vcpu(vcpu, path)
        return public(self._run(v, kvm_regs(rip=self._entries["spin"], rflags=RFLAGS_DEFAULT)))


def _drop_events(fd: VcpuFd) -> None:
    """``KVM_SET_VCPU_EVENTS`` with nothing set: no exception pending or injected, no
    interrupt or NMI injected, no interrupt shadow (fields a zero ``flags`` leaves
    alone, such as a pending NMI or SMI, cannot arise in the harness guest).  Raises
    :class:`KvmIoctlError`."""
    events = ctypes.create_string_buffer(64)
    ret = libc.ioctl_ptr(fd.fd, KVM_SET_VCPU_EVENTS, ctypes.addressof(events))
    if ret < 0:
        raise KvmIoctlError(-ret, "KVM_SET_VCPU_EVENTS")


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
