"""Random host, memslot, prefault and guest operations on every architecture,
with every invariant of DESIGN.md checked after every step (issue 4).

The world is small on purpose, so that operations collide: an 8 MiB scratch
area of host address space (mappings of every kind, 4 KiB to 4 MiB, placed
with MAP_FIXED so they replace each other), up to three memslots over it in
an 8 MiB window of guest physical address space, and guest accesses of 1-8
bytes, some crossing a page.  Every operation is a plain value (``Mmap``,
``SetSlot``, ``Guest``, ``Race``...) applied by :class:`World`, so a failing
sequence prints as data and can be replayed on another variant.

After every operation (``World.apply``):

* ``validate_vm`` (invariants 1 no-stale-translation, 2 permission
  containment, 3 memory type, 7 break-before-make, and the dirty half of 2);
* after a guest write or read that completed, ``validate_coherence``
  (invariant 5: host userspace sees, through its own page table, the bytes the
  guest wrote or read);
* after ``KVM_GET_DIRTY_LOG``, every page the guest wrote while the slot was
  logging is reported (invariant 6, checked against the test's own record,
  kvm_prepare_memory_region's rule that a MOVE or flags change keeps the
  bitmap while logging stays on);
* a memslot ioctl, munmap or mmap that fails changes nothing
  (``__kvm_set_memory_region``, ``do_mmap`` / ``do_vmi_munmap`` error paths);
* a successful ``KVM_PRE_FAULT_MEMORY`` leaves the range it reports as done
  mapped (``kvm_vcpu_pre_fault_memory``);
* a sequential guest access never ends in the retry cap (a sequential fault
  always makes progress: nothing is in flight to retry for);
* at the end of the sequence, ``validate_path_independence`` (invariant 4).

``Race`` runs a guest access and one host mm operation as two threads, at the
synchronisation points the kernel code yields (kvmmem.sync), in an order
hypothesis picks, on the explorer's scheduling core (kvmmem.explore.threads:
the lock table and thread stepping of ``kvmmem explore``); the invariants are checked
at every pause.  This is how the ``no-invalidate-retry`` mutation shows: the
fault samples ``mmu_invalidate_seq``, resolves its pfn, and only then takes
``mmu_lock``; an munmap that runs entirely in between must make it retry.

``test_state_machine_catches_mutation`` runs the same state machine on each
deliberately broken variant and requires a ValidationError, then replays the
sequence it found on ``upstream`` and requires it to pass;
``test_known_sequence_shows_mutation`` does the same with the smallest
sequences written out (for ``no-invalidate-retry`` a Race whose schedule steps
the fault up to its ``acquire mmu_lock`` pause, then runs a whole munmap).

Runs: 3 x 170 = 510 random sequences of up to 30 operations (about 45 s), and
the mutation searches (about 30 s).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    precondition,
    rule,
    run_state_machine_as_test,
)

from kvmmem.errors import KernelError, ValidationError
from kvmmem.explore.threads import Threads
from kvmmem.host import PROT_EXEC, PROT_READ, PROT_WRITE
from kvmmem.host.mm import HostSignal
from kvmmem.kvm.dirty_log import kvm_get_dirty_log
from kvmmem.kvm.invariants import (
    validate_break_before_make,
    validate_coherence,
    validate_memory_type,
    validate_no_stale_translation,
    validate_path_independence,
    validate_permission_containment,
    validate_vm,
)
from kvmmem.kvm.memslot import KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY
from kvmmem.kvm.prefault import kvm_vcpu_pre_fault_memory
from kvmmem.kvm.vcpu import Access, AccessResult
from kvmmem.kvm.vm import ARCHES, Vm
from kvmmem.sync import Op, SyncKind, drive
from kvmmem.types import PAGE_SHIFT, PAGE_SIZE
from kvmmem.variants import MUTATIONS

K = 1024
M = 1024 * K
SCRATCH = 0x7E00_0000_0000
"""The host scratch area (2 MiB aligned, below mmap_base)."""
SCRATCH_SIZE = 8 * M
GPA_BASE = 0x1_0000_0000
"""The guest window: 4 GiB, inside every architecture's IPA range."""

SEQUENCES_PER_ARCH = 170  # x 3 architectures = 510 sequences per run
STEPS = 30
RUN_SETTINGS = settings(max_examples=SEQUENCES_PER_ARCH, stateful_step_count=STEPS,
                        deadline=None, database=None,
                        suppress_health_check=[HealthCheck.too_slow,
                                               HealthCheck.filter_too_much])
# The mutation search stops at the first violation (typically within 5-100
# sequences); it does not shrink, to keep the run short: the sequence it found is
# replayed on upstream as it is.
SEARCH_SETTINGS = settings(max_examples=1000, stateful_step_count=STEPS, deadline=None,
                           database=None, phases=[Phase.generate],
                           report_multiple_bugs=False,
                           suppress_health_check=[HealthCheck.too_slow,
                                                  HealthCheck.filter_too_much])

PROTS = {
    "---": 0,
    "r--": PROT_READ,
    "rw-": PROT_READ | PROT_WRITE,
    "r-x": PROT_READ | PROT_EXEC,
    "rwx": PROT_READ | PROT_WRITE | PROT_EXEC,
}
KINDS = ("anon", "memfd", "file", "file-shared", "hugetlb", "thp", "device", "device-lazy")
FILE_KINDS = {"memfd": "memfd", "file": "file", "file-shared": "file", "device": "device",
              "device-lazy": "device-lazy"}
ACCESSES = {"read": Access.READ, "write": Access.WRITE, "exec": Access.EXEC}
FLAGS = {"-": 0, "log": KVM_MEM_LOG_DIRTY_PAGES, "ro": KVM_MEM_READONLY,
         "log+ro": KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY}


# --- operations as values ------------------------------------------------------


def _fmt(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 4096:
        return hex(value)
    return repr(value)


class OpBase:
    """Operations print with their offsets in hex."""

    def __repr__(self) -> str:
        fields = ", ".join(f"{f.name}={_fmt(getattr(self, f.name))}"
                           for f in dataclasses.fields(self))  # type: ignore[arg-type]
        return f"{type(self).__name__}({fields})"


@dataclass(frozen=True, repr=False)
class Mmap(OpBase):
    """``mmap(SCRATCH+off, length, prot, MAP_FIXED, kind)``; file kinds map the
    world's file at ``file_off``; ``fill`` is a byte userspace stores after."""

    off: int
    length: int
    prot: str
    kind: str
    file_off: int
    fill: int | None


@dataclass(frozen=True, repr=False)
class Munmap(OpBase):
    off: int
    length: int


@dataclass(frozen=True, repr=False)
class Mprotect(OpBase):
    off: int
    length: int
    prot: str


@dataclass(frozen=True, repr=False)
class Madvise(OpBase):
    off: int
    length: int
    advice: str


@dataclass(frozen=True, repr=False)
class HostWrite(OpBase):
    """A userspace store (faults in, breaks COW)."""

    off: int
    size: int
    value: int


@dataclass(frozen=True, repr=False)
class Migrate(OpBase):
    off: int


@dataclass(frozen=True, repr=False)
class SetSlot(OpBase):
    """``KVM_SET_USER_MEMORY_REGION``: create, move, flags change, or delete (size 0)."""

    slot: int
    gpa_off: int
    size: int
    hva_off: int
    flags: str


@dataclass(frozen=True, repr=False)
class Prefault(OpBase):
    gpa_off: int
    size: int


@dataclass(frozen=True, repr=False)
class Guest(OpBase):
    access: str
    gpa_off: int
    size: int
    value: int


@dataclass(frozen=True, repr=False)
class DirtyLog(OpBase):
    slot: int


HostOp = Mmap | Munmap | Mprotect | Madvise | HostWrite | Migrate


@dataclass(frozen=True, repr=False)
class Race(OpBase):
    """A guest access (thread 0) and a host mm operation (thread 1), stepped
    pause by pause as ``schedule`` says (0 or 1 per step); when the schedule
    runs out, thread 1 runs first, then thread 0.  With ``aim`` the host
    operation is moved onto the 4 KiB page the guest address is backed by (its
    ``off`` becomes that page's offset, a length becomes 4 KiB), when a slot
    covers the address."""

    guest: Guest
    other: HostOp
    schedule: tuple[int, ...]
    aim: bool = False


AnyOp = Mmap | Munmap | Mprotect | Madvise | HostWrite | Migrate | SetSlot | Prefault | Guest \
    | DirtyLog | Race


# --- strategies ----------------------------------------------------------------

HVA_OFFS = (0, 4 * K, 64 * K, 1 * M, 2 * M, 2 * M + 4 * K, 4 * M, 6 * M)
LENGTHS = (4 * K, 8 * K, 64 * K, 2 * M, 4 * M)
GPA_OFFS = (0, 4 * K, 2 * M, 4 * M, 6 * M)
SLOT_SIZES = (4 * K, 64 * K, 2 * M, 4 * M)
PAGES = (0, 1, 2, 15, 16, 17, 511, 512, 513, 1024, 1025, 1535, 1536, 2047)
BYTES = (0, 8, 4092)
VALUES = st.sampled_from((0, 0x5A, 0xFFFF_FFFF_FFFF_FFFF, 0x1122_3344_5566_7788)) \
    | st.integers(0, (1 << 64) - 1)

hva_offs = st.sampled_from(HVA_OFFS)
lengths = st.sampled_from(LENGTHS)
prots = st.sampled_from(tuple(PROTS))
gpa_offs = st.builds(lambda p, b: p * PAGE_SIZE + b, st.sampled_from(PAGES),
                     st.sampled_from(BYTES))
sizes = st.sampled_from((1, 2, 4, 8))

mmaps = st.builds(
    Mmap, off=hva_offs, length=lengths, prot=prots, kind=st.sampled_from(KINDS),
    file_off=st.sampled_from((0, 2 * M)), fill=st.none() | st.sampled_from((0x00, 0xA5)))
munmaps = st.builds(Munmap, off=hva_offs, length=lengths)
mprotects = st.builds(Mprotect, off=hva_offs, length=lengths, prot=prots)
madvises = st.builds(Madvise, off=hva_offs, length=lengths,
                     advice=st.sampled_from(("dontneed", "remove")))
host_writes = st.builds(HostWrite, off=gpa_offs, size=sizes, value=VALUES)
migrates = st.builds(Migrate, off=gpa_offs.map(lambda o: o & ~(PAGE_SIZE - 1)))
set_slots = st.builds(SetSlot, slot=st.integers(0, 2), gpa_off=st.sampled_from(GPA_OFFS),
                      size=st.sampled_from(SLOT_SIZES), hva_off=hva_offs,
                      flags=st.sampled_from(tuple(FLAGS)))
delete_slots = st.builds(SetSlot, slot=st.integers(0, 2), gpa_off=st.just(0), size=st.just(0),
                         hva_off=st.just(0), flags=st.just("-"))
prefaults = st.builds(Prefault, gpa_off=st.sampled_from(GPA_OFFS),
                      size=st.sampled_from((4 * K, 16 * K, 64 * K)))
guests = st.builds(Guest, access=st.sampled_from(tuple(ACCESSES)), gpa_off=gpa_offs, size=sizes,
                   value=VALUES)
dirty_logs = st.builds(DirtyLog, slot=st.integers(0, 2))
race_others = st.one_of(munmaps, madvises, mprotects, mmaps, host_writes, migrates)
# Schedules: the fault runs k pauses, then the host operation runs whole (the
# window between sampling mmu_invalidate_seq and taking mmu_lock is one such k);
# or the host operation runs k pauses and the fault runs whole inside it; or any
# mix.
schedules = st.one_of(
    st.integers(0, 8).map(lambda k: (0,) * k),
    st.integers(1, 10).map(lambda k: (1,) * k + (0,) * 16),
    st.lists(st.integers(0, 1), max_size=12).map(tuple),
)
races = st.builds(Race, guest=guests, other=race_others, schedule=schedules, aim=st.booleans())

# Initial layouts: a world starts empty or with RAM, a shared memfd and a BAR
# already mapped and covered by slots.
LAYOUTS: dict[str, tuple[AnyOp, ...]] = {
    "empty": (),
    "ram": (
        Mmap(0, 4 * M, "rw-", "anon", 0, None),
        SetSlot(0, 0, 2 * M, 0, "-"),
    ),
    "mixed": (
        Mmap(0, 2 * M, "rw-", "anon", 0, None),
        Mmap(2 * M, 2 * M, "rw-", "memfd", 0, 0xA5),
        Mmap(4 * M, 64 * K, "rw-", "device", 0, None),
        Mmap(6 * M, 2 * M, "rw-", "thp", 0, None),
        SetSlot(0, 0, 4 * M, 0, "-"),
        SetSlot(1, 4 * M, 64 * K, 4 * M, "-"),
        SetSlot(2, 6 * M, 2 * M, 6 * M, "log"),
    ),
}


# --- the two-thread interleaving driver ------------------------------------------


def caught(op: Op[Any]) -> Op[Any]:
    """``op`` with the kernel error or signal it raises returned as its result."""
    try:
        return (yield from op)
    except (KernelError, HostSignal) as err:
        return err


def interleave(threads: Threads, schedule: tuple[int, ...],
               check: Callable[[], None]) -> None:
    """Step ``threads`` (the explorer's scheduling core: the same lock rules
    as ``kvmmem explore``) as ``schedule`` picks, a blocked or finished pick
    falling to the other thread; then the rest, later threads first.
    ``check`` runs after every step.  Raises AssertionError on a deadlock."""
    picks: Iterator[int] = iter(schedule)
    while not threads.finished:
        enabled = threads.enabled()
        if not enabled:
            raise AssertionError("interleaving deadlock: " + threads.describe_waits())
        choice = next(picks, None)
        tid = enabled[-1] if choice is None else choice if choice in enabled else enabled[0]
        threads.resume(tid, [])
        check()


# --- the world -----------------------------------------------------------------


class World:
    """One VM over one host mm, and the test's own record of what must hold."""

    def __init__(self, arch: str, variant: str) -> None:
        self.arch = arch
        self.vm = Vm(arch, variant=variant)
        mm = self.vm.mm
        self.files = {
            "memfd": mm.memfd_create("scratch-memfd", SCRATCH_SIZE),
            "file": mm.open_file("scratch-file", SCRATCH_SIZE, fill=0x11),
            "device": mm.open_device("bar0", SCRATCH_SIZE // PAGE_SIZE),
            "device-lazy": mm.open_device("bar1", SCRATCH_SIZE // PAGE_SIZE, lazy=True),
        }
        self.ops: list[AnyOp] = []
        # slot id -> page offsets the guest wrote since the last harvest (logging slots)
        self.written: dict[int, set[int]] = {}

    # --- checks --------------------------------------------------------------

    def check(self) -> None:
        validate_vm(without_lazy_pfnmap_blocks(self.vm))

    def check_in_flight(self) -> None:
        """The invariants at a pause inside a race, with two windows the kernel
        itself has (KVM_FINDINGS #11), read from what the model publishes:

        * a page the fault has mapped writable but not yet marked dirty
          (``Vcpu.unmarked_dirty``: arm64's user_mem_abort calls
          mark_page_dirty_in_slot after dropping mmu_lock);
        * while an mm operation holds mmap_lock around its changes
          (``mm.changes_in_flight``), the VMA may already be gone or read-only
          while stage-2 still maps the page writable: munmap detaches the VMAs
          (vms_gather_munmap_vmas) and mprotect resets vm_flags (mprotect_fixup)
          before the notifier start zaps; permission containment is checked once
          the mm operation is done."""
        unmarked = any(v.unmarked_dirty is not None for v in self.vm.vcpus)
        mm_writer = bool(self.vm.mm.changes_in_flight)
        vm = without_lazy_pfnmap_blocks(self.vm)
        validate_no_stale_translation(vm)
        if not mm_writer:
            try:
                validate_permission_containment(vm)
            except ValidationError as err:
                if err.invariant != "dirty-log-completeness" or not unmarked:
                    raise
        validate_memory_type(vm)
        validate_break_before_make(vm)

    def snapshot(self) -> tuple[Any, ...]:
        vm = self.vm
        slots = [(s.as_id, s.id, s.base_gfn, s.npages, s.userspace_addr, s.flags)
                 for s in vm.memslots.all_slots()]
        leaves = [(lf.gpa, lf.size, lf.pfn, lf.writable, lf.device)
                  for lf in vm.stage2.for_each_leaf()]
        vmas = [(v.start, v.end, v.prot, v.kind) for v in vm.mm.for_each_vma()]
        return slots, leaves, vmas

    def record_write(self, gpa: int, size: int) -> None:
        for gfn in range(gpa >> PAGE_SHIFT, ((gpa + size - 1) >> PAGE_SHIFT) + 1):
            slot = self.vm.gfn_to_memslot(gfn)
            if slot is not None and slot.id in self.written:
                self.written[slot.id].add(gfn - slot.base_gfn)

    # --- operations --------------------------------------------------------

    def host_op(self, op: HostOp) -> Op[Any]:
        """The generator of a host mm operation."""
        mm = self.vm.mm
        if isinstance(op, Mmap):
            kw: dict[str, Any] = {"addr": SCRATCH + op.off, "fixed": True}
            prot = PROTS[op.prot]
            if op.fill is not None and prot & PROT_WRITE:
                kw["fill"] = op.fill
            if op.kind in FILE_KINDS:
                kw["file"] = self.files[FILE_KINDS[op.kind]]
                kw["offset"] = op.file_off
            return mm.mmap_op(op.length, prot, op.kind, **kw)
        if isinstance(op, Munmap):
            return mm.munmap_op(SCRATCH + op.off, op.length)
        if isinstance(op, Mprotect):
            return mm.mprotect_op(SCRATCH + op.off, op.length, PROTS[op.prot])
        if isinstance(op, Madvise):
            return mm.madvise_op(SCRATCH + op.off, op.length, op.advice)
        if isinstance(op, HostWrite):
            return mm.host_write_op(SCRATCH + op.off, op.size,
                                    op.value & ((1 << (8 * op.size)) - 1))
        return mm.migrate_op(SCRATCH + op.off)

    def apply(self, op: AnyOp) -> None:
        """Run ``op`` and check everything; raises ValidationError (an invariant)
        or AssertionError (a property of the operation's own result)."""
        self.ops.append(op)
        if isinstance(op, Race):
            self._race(op)
        elif isinstance(op, SetSlot):
            self._set_slot(op)
        elif isinstance(op, Guest):
            self._guest(op)
        elif isinstance(op, Prefault):
            self._prefault(op)
        elif isinstance(op, DirtyLog):
            self._dirty_log(op)
        else:
            before = self.snapshot() if isinstance(op, Mmap | Munmap) else None
            error = drive(caught(self.host_op(op)))
            if isinstance(error, KernelError) and before is not None:
                assert self.snapshot() == before, f"{op} failed ({error}) but changed state"
        self.check()

    def _set_slot(self, op: SetSlot) -> None:
        vm = self.vm
        old = vm.memslots.id_to_memslot(op.slot)
        old_logging = old is not None and bool(old.flags & KVM_MEM_LOG_DIRTY_PAGES)
        before = self.snapshot()
        try:
            vm.set_user_memory_region(op.slot, GPA_BASE + op.gpa_off, op.size,
                                      SCRATCH + op.hva_off, FLAGS[op.flags])
        except KernelError as err:
            # A failing call changes nothing, except that a DELETE or MOVE whose
            # prepare step fails has already zapped the old slot's mappings
            # (kvm_invalidate_memslot -> kvm_arch_flush_shadow_memslot runs before
            # kvm_prepare_memory_region in kvm_set_memslot).
            slots, leaves, vmas = self.snapshot()
            assert (slots, vmas) == (before[0], before[2]), \
                f"{op} failed ({err}) but changed state"
            assert set(leaves) <= set(before[1]), f"{op} failed ({err}) but mapped pages"
            return
        new = vm.memslots.id_to_memslot(op.slot)
        if new is None or not new.flags & KVM_MEM_LOG_DIRTY_PAGES:
            self.written.pop(op.slot, None)
        elif not old_logging:
            # kvm_prepare_memory_region: a fresh bitmap; a MOVE or a flags change
            # with logging on both sides keeps the old one.
            self.written[op.slot] = set()

    def _guest(self, op: Guest) -> None:
        vm = self.vm
        gpa = GPA_BASE + op.gpa_off
        access = ACCESSES[op.access]
        value = op.value & ((1 << (8 * op.size)) - 1) if access is Access.WRITE else 0
        r = vm.guest_access(gpa, op.size, access, value)
        assert r.result in ("ok", "mmio", "fault", "error", "abort"), r
        assert not (r.result == "error" and r.errno == "EAGAIN"), \
            f"{op}: a sequential fault hit the retry cap"
        if r.result != "ok":
            return
        gfns = range(gpa >> PAGE_SHIFT, ((gpa + op.size - 1) >> PAGE_SHIFT) + 1)
        if any(start <= g < end for start, end in lazy_pfnmap_blocks(vm) for g in gfns):
            # the access went through an arm64 block over device frames the
            # driver never inserted: the host has no page to compare with
            if access is Access.WRITE:
                self.record_write(gpa, op.size)
            return
        if access is Access.WRITE:
            self.record_write(gpa, op.size)
            validate_coherence(vm, gpa, op.size, value)
        elif access is Access.READ:
            assert r.value is not None
            validate_coherence(vm, gpa, op.size, r.value)

    def _prefault(self, op: Prefault) -> None:
        vm = self.vm
        gpa = GPA_BASE + op.gpa_off
        try:
            left = kvm_vcpu_pre_fault_memory(vm, vm.vcpus[0], gpa, op.size)
        except KernelError as err:
            if self.arch != "x86":
                assert err.errno in ("EOPNOTSUPP", "EINVAL"), err
            return
        assert self.arch == "x86", "KVM_PRE_FAULT_MEMORY exists only on x86"
        for page in range(gpa, gpa + op.size - left, PAGE_SIZE):
            assert vm.stage2.walk(page) is not None, \
                f"{op}: KVM_PRE_FAULT_MEMORY reported gpa {page:#x} done but did not map it"

    def _dirty_log(self, op: DirtyLog) -> None:
        vm = self.vm
        try:
            gfns = kvm_get_dirty_log(vm, op.slot)
        except KernelError:
            assert op.slot not in self.written or vm.memslots.id_to_memslot(op.slot) is None
            return
        slot = vm.memslots.id_to_memslot(op.slot)
        assert slot is not None
        reported = {g - slot.base_gfn for g in gfns}
        missing = self.written.get(op.slot, set()) - reported
        if missing:
            raise ValidationError(
                "dirty-log-completeness",
                f"slot {op.slot}: the guest wrote gfns "
                f"{sorted(hex(slot.base_gfn + m) for m in missing)} while logging, but "
                "KVM_GET_DIRTY_LOG does not report them")
        self.written[op.slot] = set()

    def _race(self, op: Race) -> None:
        vm = self.vm
        g = op.guest
        gpa = GPA_BASE + g.gpa_off
        access = ACCESSES[g.access]
        value = g.value & ((1 << (8 * g.size)) - 1) if access is Access.WRITE else 0
        host = op.other
        slot = vm.gfn_to_memslot(gpa >> PAGE_SHIFT)
        if op.aim and slot is not None:
            off = slot.gfn_to_hva(gpa >> PAGE_SHIFT) - SCRATCH
            if isinstance(host, HostWrite):
                host = dataclasses.replace(host, off=off + (gpa & (PAGE_SIZE - 8)))
            elif isinstance(host, Migrate):
                host = dataclasses.replace(host, off=off)
            else:
                host = dataclasses.replace(host, off=off, length=PAGE_SIZE)
        threads = Threads()
        fault = threads.threads[threads.add(
            "vcpu0", caught(vm.vcpus[0].access_op(gpa, g.size, access, value)))]
        threads.add("host", caught(self.host_op(host)))
        interleave(threads, op.schedule, self.check_in_flight)
        r = fault.result
        if isinstance(r, AccessResult) and r.result == "ok" and access is Access.WRITE:
            self.record_write(gpa, g.size)

    def finish(self) -> None:
        """End of a sequence: invariant 4, then destroy the VM."""
        validate_path_independence(self.vm)
        self.vm.close()


def lazy_pfnmap_blocks(vm: Vm) -> list[tuple[int, int]]:
    """Finding: arm64 ``get_vma_page_shift`` sizes a VM_PFNMAP fault by the
    vm_pgoff congruence of the VMA alone, so ``user_mem_abort`` maps a PMD block
    over a lazily populated PFNMAP VMA whose other pages the driver never
    inserted (kernel-semantics.md §3.3 step 5, open question 4).  Invariant 1
    reports it; test_arm64_block_over_lazy_pfnmap shows it.  The gfn ranges of
    such blocks (device leaves above 4K over a host page that is not present)."""
    out: list[tuple[int, int]] = []
    if vm.arch_name != "arm64":
        return out
    for leaf in vm.stage2.for_each_leaf():
        if leaf.size == PAGE_SIZE or not leaf.device:
            continue
        gfn = leaf.gpa >> PAGE_SHIFT
        slot = vm.gfn_to_memslot(gfn)
        if slot is None:
            continue
        npages = leaf.size >> PAGE_SHIFT
        if any(vm.mm.host_pte(slot.gfn_to_hva(gfn + i)) is None for i in range(npages)):
            out.append((gfn, gfn + npages))
    return out


def without_lazy_pfnmap_blocks(vm: Vm) -> Vm:
    """``vm``, or a copy without the blocks :func:`lazy_pfnmap_blocks` finds (so
    every invariant is still checked on everything else)."""
    blocks = lazy_pfnmap_blocks(vm)
    if not blocks:
        return vm
    clone = copy.deepcopy(vm)
    for start, end in blocks:
        clone.zap_gfn_range(start, end)
        for vcpu in clone.vcpus:
            vcpu.tlb_flush_gfn_range(start, end)
    return clone


@pytest.mark.parametrize("variant", ["7.2", "upstream"])
def test_arm64_block_over_lazy_pfnmap(variant: str) -> None:
    """arm64 user_mem_abort on a read fault in a 2 MiB-aligned, lazily populated
    VM_PFNMAP VMA (vm_pgoff congruent with the hva): from v5.14 to 7.2
    get_vma_page_shift returns PMD_SHIFT, hva_to_pfn_remapped faults in the block's
    first page only, and the stage-2 block maps 511 device frames the host page table
    does not map (7.3 sizes it from the host PTE: 4K); x86 (host_pfn_mapping_level:
    the PTE's level) and riscv map 4K."""
    block = variant == "7.2"
    for arch, size in (("arm64", 2 * M if block else 4 * K), ("x86", 4 * K),
                       ("riscv", 4 * K)):
        vm = Vm(arch, variant=variant)
        hva = vm.mm.mmap(4 * M, PROT_READ, "device-lazy")
        hva = (hva + 2 * M - 1) & ~(2 * M - 1)
        vm.set_user_memory_region(0, 1 << 30, 2 * M, hva, KVM_MEM_READONLY)
        assert vm.guest_access(1 << 30, 1, Access.READ).to_outcome()["result"] == "ok"
        assert [leaf.size for leaf in vm.stage2.for_each_leaf()] == [size]
        assert vm.mm.host_pte(hva + 4 * K) is None
        assert lazy_pfnmap_blocks(vm) == ([((1 << 30) >> PAGE_SHIFT, ((1 << 30) + 2 * M)
                                            >> PAGE_SHIFT)] if arch == "arm64" and block
                                          else [])
        if arch == "arm64" and block:
            with pytest.raises(ValidationError, match="no-stale-translation"):
                validate_vm(vm)
        else:
            validate_vm(vm)


def test_state_machine_reads_through_a_lazy_pfnmap_block() -> None:
    """The sequence that found the arm64 block (reads of two pages of a lazy
    device mapping put over the slot): the world keeps checking every
    invariant on everything but that block, on every architecture."""
    for arch in ARCHES:
        replay(arch, "upstream", [*LAYOUTS["ram"], Mmap(0, 2 * M, "r--", "device-lazy", 0, None),
                                  Guest("read", 0, 1, 0), Guest("read", 0x1000, 1, 0)])


def replay(arch: str, variant: str, ops: list[AnyOp]) -> World:
    """Apply ``ops`` in a fresh world; raises what the first failing check raises."""
    world = World(arch, variant)
    for op in ops:
        world.apply(op)
    world.finish()
    return world


# --- the state machine ---------------------------------------------------------


class KvmMachine(RuleBasedStateMachine):
    """Rules draw operations; ``World.apply`` runs and checks them."""

    arch: ClassVar[str] = "x86"
    variant: ClassVar[str] = "upstream"
    sequences: ClassVar[int] = 0
    failures: ClassVar[list[list[AnyOp]]] = []

    def __init__(self) -> None:
        super().__init__()
        self.world = World(self.arch, self.variant)

    def do(self, op: AnyOp) -> None:
        try:
            self.world.apply(op)
        except (ValidationError, AssertionError):
            type(self).failures.append(list(self.world.ops))
            raise

    @initialize(layout=st.sampled_from(tuple(LAYOUTS)))
    def layout(self, layout: str) -> None:
        for op in LAYOUTS[layout]:
            self.do(op)

    @rule(op=mmaps)
    def mmap(self, op: Mmap) -> None:
        self.do(op)

    @rule(op=st.one_of(munmaps, mprotects, madvises, host_writes, migrates))
    def host(self, op: HostOp) -> None:
        self.do(op)

    @rule(op=set_slots)
    def set_memslot(self, op: SetSlot) -> None:
        self.do(op)

    @rule(op=delete_slots)
    def delete_memslot(self, op: SetSlot) -> None:
        self.do(op)

    @precondition(lambda self: self.arch == "x86")
    @rule(op=prefaults)
    def prefault(self, op: Prefault) -> None:
        self.do(op)

    @rule(op=guests)
    def guest(self, op: Guest) -> None:
        self.do(op)

    @rule(op=guests)
    def guest_again(self, op: Guest) -> None:
        self.do(op)

    @rule(op=dirty_logs)
    def dirty_log(self, op: DirtyLog) -> None:
        self.do(op)

    @rule(op=races)
    def race(self, op: Race) -> None:
        self.do(op)

    @rule(op=st.builds(Race, guest=guests, other=race_others,
                       schedule=st.integers(0, 8).map(lambda k: (0,) * k), aim=st.just(True)))
    def race_aimed(self, op: Race) -> None:
        self.do(op)

    def teardown(self) -> None:
        try:
            self.world.finish()
        except (ValidationError, AssertionError):
            type(self).failures.append(list(self.world.ops))
            raise
        type(self).sequences += 1


def machine(arch: str, variant: str) -> type[KvmMachine]:
    """A KvmMachine subclass for one architecture and variant, with fresh counters."""
    return type(f"KvmMachine_{arch}_{variant.replace('-', '_')}", (KvmMachine,),
                {"arch": arch, "variant": variant, "sequences": 0, "failures": []})


# --- tests ---------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHES)
def test_random_sequences_keep_every_invariant(arch: str) -> None:
    """Random mm (mmap MAP_FIXED of every kind, munmap, mprotect, madvise, userspace
    stores, migration), KVM_SET_USER_MEMORY_REGION, KVM_PRE_FAULT_MEMORY,
    KVM_GET_DIRTY_LOG and guest accesses, sequential and raced against mm
    changes at their sync points: every invariant holds after every step, on
    today's kernel (kernel-semantics.md; DESIGN.md invariants 1-7)."""
    cls = machine(arch, "upstream")
    run_state_machine_as_test(cls, settings=RUN_SETTINGS)
    assert cls.sequences >= SEQUENCES_PER_ARCH


# The smallest sequences that show each mutation, written out: the same ops pass
# on upstream (the mutation test below finds such sequences on its own).
RAM = Mmap(0, 2 * M, "rw-", "anon", 0, None)
SLOT0 = SetSlot(0, 0, 2 * M, 0, "-")
KNOWN: dict[str, list[AnyOp]] = {
    # mmu_invalidate_retry: the fault resolves the pfn, then a whole munmap (zap,
    # PTE clear, sequence bump) runs before it takes mmu_lock.  Schedule: step the
    # fault until it pauses before mmu_lock (x86: 3 pauses with a GUP slow path;
    # arm64/riscv: also the VMA lookup), then the munmap.
    "no-invalidate-retry": [
        RAM, SLOT0,
        Race(Guest("write", 0, 8, 0x42), Munmap(0, 4 * K), (0, 0, 0, 0, 0)),
    ],
    # hva_to_pfn_remapped: a read-only PFNMAP PTE behind a writable slot; a guest
    # write must not get a writable stage-2 entry (bd2fae8da794).  The BAR is made
    # read-only after the slot exists: riscv's kvm_arch_prepare_memory_region
    # refuses (EPERM) a writable slot over a VMA without VM_WRITE.
    "remapped-no-write-check": [
        Mmap(0, 64 * K, "rw-", "device", 0, None),
        SetSlot(0, 0, 64 * K, 0, "-"),
        Mprotect(0, 64 * K, "r--"),
        Guest("write", 0, 8, 0x42),
    ],
    # kvm_flush_remote_tlbs after a notifier zap: the guest fills its TLB, the host
    # unmaps the page; the vCPU must not keep the translation.
    "no-tlb-flush": [
        RAM, SLOT0,
        Guest("read", 0, 8, 0),
        Munmap(0, 4 * K),
    ],
}


def _fault_pauses_before_mmu_lock(arch: str) -> tuple[int, ...]:
    """How many times to step the fault so that it pauses before ``mmu_lock``
    (every pause of a fresh write fault up to that acquire)."""
    world = World(arch, "upstream")
    for op in KNOWN["no-invalidate-retry"][:2]:
        world.apply(op)
    for n, sync in enumerate(world.vm.vcpus[0].access_op(GPA_BASE, 8, Access.WRITE, 0x42), 1):
        if sync.kind is SyncKind.ACQUIRE and sync.name == "mmu_lock":
            return (0,) * n
    raise AssertionError(f"{arch}: the write fault never takes mmu_lock")


def known_sequence(mutation: str, arch: str) -> list[AnyOp]:
    ops = list(KNOWN[mutation])
    if mutation == "no-invalidate-retry":
        race = ops[-1]
        assert isinstance(race, Race)
        ops[-1] = dataclasses.replace(race, schedule=_fault_pauses_before_mmu_lock(arch))
    return ops


HOST_MUTATIONS = tuple(m for m in MUTATIONS if m not in ("no-gmem-invalidate",
                                                         "no-ring-reprotect"))
"""The mutations this machine's operations can reach: it makes no guest_memfd and no
dirty ring, so no-gmem-invalidate and no-ring-reprotect are shown by their races
(race-gmem-punch-vs-fault, race-dirty-ring-reset-vs-write) instead."""


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("mutation", HOST_MUTATIONS)
def test_known_sequence_shows_mutation(mutation: str, arch: str) -> None:
    """The written-out sequence violates an invariant under the mutation and keeps
    every invariant on upstream (mmu_invalidate_retry_gfn, hva_to_pfn_remapped's
    pte_write check, kvm_flush_remote_tlbs in kvm_mmu_notifier_invalidate_range_start)."""
    ops = known_sequence(mutation, arch)
    replay(arch, "upstream", ops)
    with pytest.raises(ValidationError):
        replay(arch, mutation, ops)


EXPECTED_INVARIANT = {
    # a stale pfn installed after the invalidation: stale, or writable over a PTE
    # the invalidation made read-only, or a write the host no longer sees, or (arm64
    # user_mem_abort classifies by the vm_flags it snapshotted before the change) a
    # device frame of a VMA that MAP_FIXED put there mapped as normal memory
    "no-invalidate-retry": {"no-stale-translation", "permission-containment", "coherence",
                            "path-independence", "memory-type"},
    "remapped-no-write-check": {"permission-containment"},
    # a TLB entry that outlived the zap: stale, or writable after a downgrade
    "no-tlb-flush": {"no-stale-translation", "permission-containment"},
}


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("mutation", HOST_MUTATIONS)
def test_state_machine_catches_mutation(mutation: str, arch: str) -> None:
    """The random state machine, run on a deliberately broken variant, finds a
    sequence that violates an invariant; hypothesis shrinks it; the same
    sequence keeps every invariant on upstream (DESIGN.md "Variants")."""
    cls = machine(arch, mutation)
    with pytest.raises(ValidationError) as caught:
        run_state_machine_as_test(cls, settings=SEARCH_SETTINGS)
    assert caught.value.invariant in EXPECTED_INVARIANT[mutation], caught.value
    assert cls.failures, "the failing sequence was not recorded"
    ops = cls.failures[-1]
    with pytest.raises(ValidationError):
        replay(arch, mutation, ops)
    replay(arch, "upstream", ops)


@pytest.mark.parametrize("arch,change", [("riscv", "mprotect"), ("arm64", "device"),
                                         ("riscv", "device")])
def test_path_independence_after_vma_change(arch: str, change: str) -> None:
    """arm64 and riscv kvm_arch_prepare_memory_region check the VMAs only when
    the slot is set (arch/*/kvm/mmu.c); a later mprotect(PROT_READ) under a
    writable slot, or a MAP_FIXED device mapping under a logging slot, is legal
    and the guest keeps running, so invariant 4 must hold for the state."""
    world = World(arch, "upstream")
    flags = "-" if change == "mprotect" else "log"
    for op in (Mmap(0, 2 * M, "rw-", "anon", 0, 7), SetSlot(0, 0, 2 * M, 0, flags),
               Guest("read", 0, 1, 0)):
        world.apply(op)
    if change == "mprotect":
        world.apply(Mprotect(0, 2 * M, "r--"))
    else:
        world.apply(Mmap(0, 64 * K, "rw-", "device", 0, None))
    world.apply(Guest("read", 64 * K, 1, 0))
    validate_path_independence(world.vm)


@pytest.mark.parametrize("arch", ARCHES)
def test_readonly_slot_over_pfnmap_maps_readonly(arch: str) -> None:
    """kvm_follow_pfn clears map_writable for a KVM_MEM_READONLY slot, so
    hva_to_pfn_remapped cannot hand out a writable PFNMAP page: the leaf stays
    read-only and permission containment holds (virt/kvm/kvm_main.c)."""
    replay(arch, "upstream", [Mmap(0, 64 * K, "rw-", "device", 0, None),
                              SetSlot(0, 0, 64 * K, 0, "ro"), Guest("read", 0, 4, 0)])


def test_x86_write_after_dirty_log_reprotect_completes() -> None:
    """After KVM_GET_DIRTY_LOG write-protects a page, the next guest write faults
    once, gets a writable SPTE (make_spte) and completes; an EPT violation drops
    the stale cached translation (Intel SDM "Operations that Invalidate Cached
    Mappings")."""
    replay("x86", "upstream", [Mmap(0, 64 * K, "rw-", "anon", 0, 1),
                               SetSlot(0, 0, 64 * K, 0, "log"), Guest("write", 0x2000, 4, 0x22),
                               DirtyLog(0), Guest("write", 0x2000, 4, 0x23)])
