"""vCPUs: a guest access goes TLB -> stage-2 walk -> fault -> resolver ->
install -> access, or ends in an exit.

An access is split at 4 KiB page boundaries into fragments, as the hardware
faults page by page.  On x86 KVM's emulator completes a page-crossing access
fragment by fragment (``emulator_read_write_onepage``): the part inside a
memslot is performed, only the part outside exits as MMIO
(kvm-on-this-host.md §3.3); contiguous MMIO fragments form one exit.  arm64
and riscv have no such emulator: a page-crossing access completes whole or
exits whole (:meth:`Vcpu._whole_access_op`).

Two paths, chosen per vCPU (kvm-on-this-host.md §0, §6):

* ``native`` - the access takes the stage-2 MMU path: TLB, walk, and on a
  miss the architecture's fault handler;
* ``emulated`` (x86) - every access goes through KVM's instruction emulator:
  ``kvm_vcpu_read_guest``/``kvm_vcpu_write_guest`` -> memslot -> hva ->
  ``copy_from_user``/``copy_to_user``; any access that cannot be completed
  becomes an MMIO exit, never EFAULT.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kvmmem.errors import InputError
from kvmmem.host.mm import HostSignal
from kvmmem.kvm.dirty_ring import KVM_EXIT_DIRTY_RING_FULL, kvm_dirty_ring_check_request
from kvmmem.kvm.fault import (
    EFAULT,
    EMULATE,
    MMIO,
    RESUME,
    RETRY,
    Access,
    AccessResult,
    Fault,
    FaultResult,
)
from kvmmem.kvm.memslot import mark_page_dirty_in_slot
from kvmmem.kvm.mmu_notifier import FaultWait
from kvmmem.sync import Op, acquire, drive, release
from kvmmem.types import Hva

if TYPE_CHECKING:
    from kvmmem.kvm.dirty_ring import DirtyRing
    from kvmmem.kvm.kvm_host import Kvm
    from kvmmem.kvm.memslot import MemorySlot, MemslotSet

__all__ = [
    "EFAULT", "EMULATE", "MAX_FAULT_RETRIES", "MMIO", "RESUME", "RETRY", "Access",
    "AccessResult", "Fault", "FaultResult", "TlbEntry", "Vcpu",
]
"""The vCPU's names and the fault types of :mod:`kvmmem.kvm.fault` (callers import
them from here)."""

MAX_FAULT_RETRIES = 64
"""A fault that keeps asking to retry (an invalidation that never ends in a
sequential run) is reported instead of spinning forever."""


_SRCU_READ_LOCK = acquire("srcu", shared=True)
_SRCU_READ_UNLOCK = release("srcu", shared=True)
DIRTY_RING_FULL = AccessResult("exit", exit_reason=KVM_EXIT_DIRTY_RING_FULL)
"""KVM_RUN's exit when ``kvm_dirty_ring_check_request`` finds the ring soft-full."""

@dataclass(slots=True)
class TlbEntry:
    """One cached gfn -> pfn translation with its permissions."""

    pfn: int
    writable: bool
    executable: bool


def _page_fragments(gpa: int, size: int, page_size: int) -> list[tuple[int, int, int]]:
    """``[gpa, gpa + size)`` cut at (stage-2, i.e. host) page boundaries: ``(gpa, length,
    offset in the access)`` per page, in order."""
    out = []
    done = 0
    while done < size:
        frag_gpa = gpa + done
        frag_len = min(size - done, page_size - (frag_gpa & (page_size - 1)))
        out.append((frag_gpa, frag_len, done))
        done += frag_len
    return out


@dataclass
class Vcpu:
    """A vCPU: its TLB (gfn -> translation; gfns in host pages, ``page_shift``, the VM's
    ``PAGE_SHIFT``) and which access path it uses."""

    vm: Kvm
    index: int
    path: str = "native"
    tlb: dict[int, TlbEntry] = field(default_factory=dict)
    page_shift: int = field(default=12, init=False)
    page_size: int = field(default=4096, init=False)
    _last_used_slot: tuple[MemslotSet, int, MemorySlot] | None = field(
        default=None, init=False, repr=False, compare=False)
    """``vcpu->last_used_slot`` with the set and generation it was found in
    (a lookup cache: not part of the state, see explore/fingerprint.py)."""
    fault_wait: FaultWait | None = field(default=None, init=False, repr=False, compare=False)
    """In-flight state the explorer reads: what the fault this vCPU was answered
    RETRY for waits on, from the RETRY until its next attempt proceeds (None
    otherwise).  Bookkeeping, not state: left out of pickles and copies."""
    dirty_ring: DirtyRing | None = None
    """``vcpu->dirty_ring``: allocated at creation in a VM with a dirty ring
    (kvm/dirty_ring.py), else None."""
    unmarked_dirty: int | None = field(default=None, init=False, repr=False, compare=False)
    """In-flight state the explorer reads: the gfn this vCPU's fault has made
    writable in stage-2 and not yet marked dirty (arm64's ``user_mem_abort``
    marks it after dropping ``mmu_lock``), or None.  Left out like
    :attr:`fault_wait`."""

    def __post_init__(self) -> None:
        self.page_shift = self.vm.pg.page_shift
        self.page_size = self.vm.pg.page_size

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("fault_wait", None)
        state.pop("unmarked_dirty", None)
        state.pop("_last_used_slot", None)
        return state

    # --- memslots ------------------------------------------------------------

    def gfn_to_memslot(self, gfn: int) -> MemorySlot | None:
        """``kvm_vcpu_gfn_to_memslot``: the active slot of address space 0
        holding ``gfn`` (INVALID slots included), or None.  The slot this vCPU
        found last is tried first; it is forgotten once the active set or its
        generation changes (every memslot update moves the generation)."""
        slots = self.vm.memslots.memslots(0)
        gen = slots.generation
        last = self._last_used_slot
        if last is not None and last[0] is slots and last[1] == gen:
            used = last[2]  # try_get_memslot
            if used.base_gfn <= gfn < used.base_gfn + used.npages:
                return used
        slot = slots.search_memslots(gfn)
        if slot is not None:
            self._last_used_slot = (slots, gen, slot)
        return slot

    # --- TLB ---------------------------------------------------------------

    def tlb_flush(self) -> None:
        """Drop every cached translation."""
        self.tlb.clear()

    def tlb_flush_gfn_range(self, start: int, end: int) -> None:
        """Drop cached translations for gfns in ``[start, end)``."""
        tlb = self.tlb
        if end - start > len(tlb):
            for gfn in [g for g in tlb if start <= g < end]:
                del tlb[gfn]
        else:
            for gfn in range(start, end):
                tlb.pop(gfn, None)

    def _translate(self, gpa: int, access: Access) -> TlbEntry | None:
        """The TLB, then a stage-2 walk: a translation allowing ``access``, or None."""
        gfn = gpa >> self.page_shift
        tlb = self.tlb
        entry = tlb.get(gfn)
        if entry is None:
            leaf = self.vm.stage2_lookup(gpa)
            if leaf is None:
                return None
            entry = tlb[gfn] = TlbEntry(*leaf)
        if access is Access.WRITE and not entry.writable:
            return None
        if access is Access.EXEC and not entry.executable:
            return None
        return entry

    # --- accesses ----------------------------------------------------------

    def access(self, gpa: int, size: int, access: Access, value: int = 0,
               path: str | None = None) -> AccessResult:
        """A guest access run to completion (the sequential driver).

        An access inside one page that hits the TLB completes here without
        entering the operation machinery (what the hardware does on a hit), unless a
        pending request stops the entry (the dirty ring's soft-full exit)."""
        ring = self.dirty_ring
        page_size = self.page_size
        if (path or self.path) == "native" and (gpa & (page_size - 1)) + size <= page_size \
                and (ring is None or not ring.soft_full_request):
            entry = self.tlb.get(gpa >> self.page_shift)
            if entry is not None and (access is Access.READ or (
                    entry.writable if access is Access.WRITE else entry.executable)):
                return self.vm.touch_frame(entry.pfn, gpa, size, access, value)
        return drive(self.access_op(gpa, size, access, value, path=path))

    def access_op(self, gpa: int, size: int, access: Access, value: int = 0,
                  path: str | None = None) -> Op[AccessResult]:
        """One guest load, store or instruction fetch of ``size`` bytes at ``gpa``
        on ``path`` (``native`` or ``emulated``; default: the vCPU's)."""
        vm = self.vm
        emulated = (path or self.path) == "emulated"
        vm.vcpu_enter_guest(self.index)  # KVM_RUN: obsolete roots freed, one loaded
        if kvm_dirty_ring_check_request(self.dirty_ring):
            return DIRTY_RING_FULL
        if emulated and not vm.arch.has_emulated_path:
            raise InputError(f"path: the emulated access path is x86's instruction emulator; "
                             f"{vm.arch_name} has none (use path: native)")
        page_size = self.page_size
        if not emulated and not vm.arch.emulates_page_crossing \
                and (gpa & (page_size - 1)) + size > page_size:
            return (yield from self._whole_access_op(gpa, size, access, value))
        got = 0
        mmio_gpa = -1
        mmio_len = 0
        mmio_data = 0
        ram_part = False
        for frag_gpa, frag_len, done in _page_fragments(gpa, size, page_size):
            frag_val = (value >> (8 * done)) & ((1 << (8 * frag_len)) - 1)
            r = yield from self._fragment_op(frag_gpa, frag_len, access, frag_val, emulated)
            if r.result == "ok":
                ram_part = True
                if r.value is not None:
                    got |= r.value << (8 * done)
            elif r.result == "mmio":
                # The exit carries the first MMIO fragment only; later ones are
                # later exits (emulator_read_write_onepage queues one per page).
                if mmio_gpa < 0:
                    mmio_gpa, mmio_len, mmio_data = frag_gpa, frag_len, frag_val
                if vm.arch.emulates_page_crossing:
                    # RET_PF_EMULATE: the emulator completes the rest of the
                    # instruction through the hva (x86_emulate_instruction).
                    emulated = True
            else:
                return r
        if mmio_gpa >= 0:
            # The MMIO read is answered with zero bytes: the value holds the RAM part.
            return self._mmio_exit(mmio_gpa, mmio_len, access, mmio_data,
                                   got if ram_part and access is Access.READ else None)
        if access is Access.READ:
            return AccessResult("ok", value=got)
        return AccessResult("ok")

    def _whole_access_op(self, gpa: int, size: int, access: Access,
                         value: int) -> Op[AccessResult]:
        """A page-crossing access on arm64 or riscv: no emulator splits it.  Every page
        it touches is faulted in before any byte moves (the instruction re-executes
        until all its translations exist); a page that is MMIO ends the whole access as
        one exit of the access's full length at that page's first byte, with all of a
        store's bytes and none of them stored (arm64 ``io_mem_abort`` takes the length
        from ESR_EL2.SAS and the data from the register; riscv
        ``kvm_riscv_vcpu_mmio_store``/``_load`` decode both from the trapped
        instruction).  Seen on real arm64 6.1, 6.12, 7.3 and riscv 6.12, 7.2
        (``selftest-readonly-mem``, ``row-no-slot-mmio``)."""
        vm = self.vm
        frags = _page_fragments(gpa, size, self.page_size)
        data = value & ((1 << (8 * size)) - 1)
        for _ in range(MAX_FAULT_RETRIES):
            for frag_gpa, frag_len, _off in frags:
                r = yield from self._fragment_op(frag_gpa, frag_len, access, 0, False,
                                                 touch=False)
                if r.result == "mmio":
                    return self._mmio_exit(frag_gpa, size, access,
                                           data if access is Access.WRITE else 0, None)
                if r.result != "ok":
                    return r
            entries = [self._translate(g, access) for g, _, _ in frags]
            if any(e is None for e in entries):
                continue  # a translation went away meanwhile: the instruction re-faults
            got = 0
            for (frag_gpa, frag_len, off), entry in zip(frags, entries, strict=True):
                assert entry is not None
                part = (value >> (8 * off)) & ((1 << (8 * frag_len)) - 1)
                r = vm.touch_frame(entry.pfn, frag_gpa, frag_len, access, part)
                if r.result != "ok":
                    return r
                if r.value is not None:
                    got |= r.value << (8 * off)
            return AccessResult("ok", value=got) if access is Access.READ else AccessResult("ok")
        return AccessResult("error", errno="EAGAIN")

    def _mmio_exit(self, gpa: int, length: int, access: Access, data: int,
                   value: int | None) -> AccessResult:
        """The KVM_EXIT_MMIO of an access whose first MMIO fragment is
        ``[gpa, gpa + length)`` (``data`` its bytes for a write); ``value`` is
        the RAM part a read got."""
        vm = self.vm
        err = vm.arch.mmio_exit_error(gpa, length)
        if err is not None:
            return AccessResult("error", errno=err)
        vm.stats.mmio_exits += 1
        vm.stats.exits += 1
        is_write = access is Access.WRITE
        if vm.log is not None:
            vm.log.emit("kvm_mmio", type="write" if is_write else "unsatisfied-read",
                        len=length, gpa=gpa, val=data if is_write else 0)
        return AccessResult("mmio", value=value, gpa=gpa, length=length, is_write=is_write,
                            data=data)

    def _fragment_op(self, gpa: int, size: int, access: Access, value: int,
                     emulated: bool, touch: bool = True) -> Op[AccessResult]:
        """One page's part of an access: translated (faulting it in) and, with
        ``touch``, performed; without, ``ok`` once the translation exists."""
        vm = self.vm
        if emulated:
            return (yield from self._emulated_op(gpa, size, access, value))
        for _ in range(MAX_FAULT_RETRIES):
            entry = self._translate(gpa, access)
            if entry is not None:
                self.fault_wait = None
                if not touch:
                    return AccessResult("ok")
                return vm.touch_frame(entry.pfn, gpa, size, access, value)
            # A translation that faults is not kept: an EPT violation / stage-2
            # abort invalidates what the TLB cached for the faulting address.
            self.tlb.pop(gpa >> self.page_shift, None)
            vm.stats.pf_taken += 1
            # The fault reads the memslots under SRCU (kvm_vcpu_srcu_read_lock in the run loop).
            yield _SRCU_READ_LOCK
            self.fault_wait = None  # the attempt proceeds
            decision = yield from vm.arch.handle_fault(vm, self, gpa, access)
            yield _SRCU_READ_UNLOCK
            kind = decision.kind
            if kind is Fault.RESUME or kind is Fault.RETRY:
                if kind is Fault.RETRY:
                    vm.stats.pf_retry += 1
                    arch = vm.arch
                    self.fault_wait = FaultWait(gpa >> self.page_shift, arch.retry_checks_gfn,
                                                arch.retries_invalid_slot)
                # Back into the guest: vcpu_enter_guest frees a root made obsolete
                # meanwhile (KVM_REQ_MMU_FREE_OBSOLETE_ROOTS) before the access re-faults.
                vm.vcpu_enter_guest(self.index)
                if kvm_dirty_ring_check_request(self.dirty_ring):
                    # The fault pushed the ring to its soft limit: KVM_RUN returns before
                    # the guest retries the access (which is therefore not done).
                    return DIRTY_RING_FULL
                continue
            if kind is Fault.MMIO:
                vm.stats.pf_emulate += 1
                return AccessResult("mmio")
            if kind is Fault.EMULATE:
                vm.stats.pf_emulate += 1
                return (yield from self._emulated_op(gpa, size, access, value))
            if kind is Fault.EFAULT:
                vm.stats.pf_efault += 1
                if vm.log is not None:
                    vm.log.emit("kvm_userspace_exit", reason="error", errno="EFAULT")
                return AccessResult("fault", gpa=gpa, length=size)
            if kind is Fault.ERRNO:
                return AccessResult("error", errno=decision.errno)
            if kind is Fault.MEMORY_FAULT:
                if decision.errno != "EFAULT":
                    return AccessResult("error", errno=decision.errno)
                return AccessResult("fault", gpa=decision.gpa, length=decision.size,
                                    memory_fault=True, flags=decision.flags)
            return AccessResult("abort", abort=decision.abort)
        self.fault_wait = None
        return AccessResult("error", errno="EAGAIN")

    def _emulated_op(self, gpa: int, size: int, access: Access,
                     value: int) -> Op[AccessResult]:
        """``emulator_read_write``: ``kvm_vcpu_read_guest``/``kvm_vcpu_write_guest``
        through the hva, as
        the x86 emulator does: anything it cannot complete is MMIO."""
        vm = self.vm
        shift = self.page_shift
        slot = self.gfn_to_memslot(gpa >> shift)
        if slot is None or slot.invalid or (access is Access.WRITE and slot.readonly):
            if access is Access.EXEC:
                # The emulator cannot fetch an instruction from MMIO: emulation
                # fails, KVM_EXIT_INTERNAL_ERROR / KVM_INTERNAL_ERROR_EMULATION at CPL0.
                return AccessResult("exit", exit_reason="KVM_EXIT_INTERNAL_ERROR", suberror=1)
            return AccessResult("mmio")
        hva = Hva(slot.gfn_to_hva(gpa >> shift) + (gpa & ((1 << shift) - 1)))
        # kvm_vcpu_{read,write}_guest copy through __copy_{from,to}_user; a page
        # fault there takes mmap_lock for read (do_user_addr_fault), so the
        # access pauses where a concurrent mmap_lock writer can block it.
        try:
            if access is Access.WRITE:
                yield from vm.mm.host_write_op(hva, size, value)
                mark_page_dirty_in_slot(slot, gpa >> shift, self)
                return AccessResult("ok")
            return AccessResult("ok", value=(yield from vm.mm.host_read_op(hva, size)))
        except HostSignal:
            return AccessResult("mmio")
