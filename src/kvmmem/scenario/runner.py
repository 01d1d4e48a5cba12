"""The sequential runner: one scenario, one architecture, one variant.

It builds a fresh host address space and VM, makes the ``memory`` mappings
and ``memslots`` in order, then runs every step to completion (the
sequential driver of "one code path, many drivers"), producing one outcome
per step in the SCENARIOS.md vocabulary.  After every setup memslot and every
step it checks the invariants (``kvmmem.kvm.invariants``); the first violation
stops the run.  At the end it checks path independence on the final state.

Outcome extensions (keys SCENARIOS.md does not fix; tools may ignore them):
``setup`` in the run object (the outcomes of the top-level ``memslots``),
``"setup": true`` on a violation found right after a ``memslots`` entry (its
``step`` is then the entry's index in ``memslots``), ``abort`` (an exception
injected into the guest, e.g. an arm64 prefetch abort for an instruction fetch
from device memory), ``remaining`` on a
``prefault`` outcome (bytes of the range left unprocessed).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, assert_never

from kvmmem.errors import InputError, KernelError, ValidationError
from kvmmem.host import HostSignal, Mm
from kvmmem.host.file import File
from kvmmem.host.truncate import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, vfs_fallocate_op
from kvmmem.kvm.dirty_log import kvm_clear_dirty_log, kvm_get_dirty_log, kvm_vm_ioctl_enable_cap
from kvmmem.kvm.dirty_ring import kvm_dirty_ring_harvest, kvm_vm_ioctl_reset_dirty_pages
from kvmmem.kvm.guest_memfd import GmemFile
from kvmmem.kvm.invariants import validate_coherence, validate_path_independence, validate_vm
from kvmmem.kvm.prefault import PrefaultHang, kvm_vcpu_pre_fault_memory_op
from kvmmem.kvm.stats import EventLog
from kvmmem.kvm.vcpu import Access
from kvmmem.kvm.vm import MTE_ENABLE_CALL, Vm
from kvmmem.scenario.model import (
    ClearDirtyLog,
    EnableCap,
    GetDirtyLog,
    GuestAccess,
    GuestExec,
    GuestRead,
    GuestWrite,
    HarvestDirtyRing,
    HostMadvise,
    HostMmap,
    HostMprotect,
    HostMunmap,
    HostRead,
    HostWrite,
    Mapping,
    Prefault,
    PunchHole,
    ResetDirtyRings,
    Scenario,
    SetMemoryAttributes,
    SetMemslot,
    Step,
    as_step,
    host_page_size,
)
from kvmmem.sync import Op, drive
from kvmmem.types import format_size

StepWrapper = Callable[[Step, bool, Callable[[], dict[str, Any]]], dict[str, Any]]
"""``(step, setup, do) -> outcome``: runs ``do`` (the step; ``setup``: a top-level
``memslots`` entry) and returns its outcome."""


@dataclass
class Mismatch:
    """A failed expectation: step index, what was expected and what happened.
    ``setup``: the step is a top-level ``memslots`` entry (indexed apart)."""

    step: int
    op: str
    line: int
    expected: dict[str, Any]
    actual: dict[str, Any]
    setup: bool = False


@dataclass
class RunResult:
    """What one run produced: outcomes, failed expectations, violations, the VM."""

    scenario: str
    arch: str
    variant: str
    steps: list[dict[str, Any]] = field(default_factory=list)
    setup: list[dict[str, Any]] = field(default_factory=list)
    mismatches: list[Mismatch] = field(default_factory=list)
    violations: list[dict[str, Any]] = field(default_factory=list)
    notes: list[dict[str, Any]] = field(default_factory=list)
    """Observations of the end-of-run checks that are not violations
    (``{"invariant", "detail"}``; see validate_path_independence)."""
    vm: Vm | None = None
    events: EventLog | None = None
    expects: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict)
    """Every expectation of the file by ``("setup" | "step", index)``, met or not."""
    explanations: dict[int, dict[str, Any]] = field(default_factory=dict)
    """``kvmmem run --explain``: step index -> the step's ``explain`` tree
    (kvmmem.report.explain)."""
    setup_explanations: dict[int, dict[str, Any]] = field(default_factory=dict)
    """The same for the top-level ``memslots`` entries, by their index."""
    page_size: int = 4096
    """The host ``PAGE_SIZE`` the run had (:func:`~kvmmem.scenario.model.host_page_size`)."""

    @property
    def exit_status(self) -> int:
        """SCENARIOS.md: 3 a violation, 1 a failed expectation, else 0."""
        if self.violations:
            return 3
        if self.mismatches:
            return 1
        return 0

    def to_json(self) -> dict[str, Any]:
        """The ``kvmmem run --json`` object."""
        def explained(outcomes: list[dict[str, Any]],
                      trees: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
            return [{**o, "explain": trees[o["step"]]} if o["step"] in trees else o
                    for o in outcomes]

        return {"scenario": self.scenario, "arch": self.arch, "variant": self.variant,
                "page_size": format_size(self.page_size),
                "steps": explained(self.steps, self.explanations),
                "violations": self.violations,
                "setup": explained(self.setup, self.setup_explanations), "notes": self.notes}


GMEM_NO_FD = 0xFFFFFFFF
"""The ``guest_memfd`` field of a REGION2 request that names no guest_memfd mapping (fd
-1 as the u32 the ioctl takes: EBADF where the kernel looks at it)."""


def expectation_holds(expect: dict[str, Any] | None, outcome: dict[str, Any]) -> bool:
    """Every key of ``expect`` is in ``outcome`` with an equal value."""
    if not expect:
        return True
    return all(key in outcome and outcome[key] == value for key, value in expect.items())


class Runner:
    """Runs the steps of one scenario on a fresh VM (``arch``, ``variant``)."""

    def __init__(self, scenario: Scenario, arch: str, variant: str | None = None, *,
                 trace: bool = False, check: bool = True, keep_going: bool = False) -> None:
        self.scenario = scenario
        self.arch = arch
        self.variant = variant or scenario.variant
        # The host kernel's page size: the variant's suffix, else the file's pin, else 4K
        self.page_size = host_page_size(scenario, self.variant)
        self.mm = Mm(page_size=self.page_size)
        try:
            self.vm = Vm(arch, variant=self.variant, mm=self.mm, vcpus=scenario.vcpus,
                         granule=scenario.granule if scenario.granule_given else None,
                         ipa_bits=scenario.ipa_bits,
                         cpu_features=scenario.cpu_features, vm_type=scenario.vm_type,
                         dirty_ring=scenario.dirty_ring,
                         dirty_ring_with_bitmap=scenario.dirty_ring_with_bitmap,
                         mte=scenario.mte)
        except KernelError as err:
            if err.call == MTE_ENABLE_CALL:
                raise InputError(f"{scenario.source}:{scenario.mte_line}: mte: "
                                 f"KVM_ENABLE_CAP(KVM_CAP_ARM_MTE) failed with {err.errno} "
                                 f"({err.reason})") from None
            # The ring's KVM_ENABLE_CAP is part of the VM's setup, as a guest_memfd
            # memory entry's creation is (make_memory): a refusal is the file's problem.
            raise InputError(f"{scenario.source}:{scenario.dirty_ring_line}: dirty_ring: "
                             f"KVM_ENABLE_CAP of the dirty ring ({scenario.dirty_ring} bytes"
                             f"{', with bitmap' if scenario.dirty_ring_with_bitmap else ''}) "
                             f"failed with {err.errno} ({err.reason})") from None
        self.check = check
        self.keep_going = keep_going
        """After the first invariant violation, run the remaining steps unchecked (as the
        kernel would go on) instead of stopping there: conform compares them."""
        if trace:
            self.vm.log = EventLog()
        self.explain: StepWrapper | None = None
        """Set by ``kvmmem run --explain`` (kvmmem.report.explain): runs each step and
        top-level memslot, recording its explanation."""
        self.ranges: dict[str, tuple[int, int]] = {}
        self.files: dict[str, File] = {}
        self.gmems: dict[str, GmemFile] = {}
        """The guest_memfd files of the ``guest_memfd`` mappings, by name."""

    # --- host mappings -------------------------------------------------------

    def hva(self, memory: str, offset: int) -> int:
        """The address ``offset`` bytes into mapping ``memory``."""
        rng = self.ranges.get(memory)
        if rng is None:
            raise InputError(f"{self.scenario.source}: memory {memory} has no host address "
                             "(a guest_memfd without gmem_flags: [mmap])")
        return rng[0] + offset

    def munmap_range(self, step: HostMunmap) -> tuple[int, int]:
        """The ``(hva, size)`` a ``host_munmap`` step unmaps: ``size`` bytes from
        ``offset``, or without ``size`` the rest of the named range from ``offset``
        (never past its end: what follows belongs to another mapping)."""
        size = step.size if step.size is not None else self.ranges[step.memory][1] - step.offset
        return self.hva(step.memory, step.offset), size

    def mmap(self, m: Mapping | HostMmap) -> None:
        """Make a host mapping (a ``memory`` entry or a ``host_mmap`` step)."""
        drive(self.mmap_op(m))

    def mmap_op(self, m: Mapping | HostMmap) -> Op[None]:
        """The host mapping as an operation (pauses inside mmap)."""
        mm = self.mm
        addr = None
        if m.at is not None:
            addr = self.hva(m.at.memory, m.at.offset)
        kind = m.kind
        file: File | None = None
        if kind == "guest_memfd":
            spec = m.mapping if isinstance(m, HostMmap) else m
            gmem = self.vm.create_guest_memfd(spec.size, spec.gmem_flag_bits)
            self.gmems[m.name] = gmem
            self.files[m.name] = gmem.inode
            if not spec.mapped:
                return
            file = gmem.inode
        elif kind == "device":
            file = mm.open_device(m.name, -(-m.size // mm.page_size), lazy=False)
        elif kind == "device-lazy":
            file = mm.open_device(m.name, -(-m.size // mm.page_size), lazy=True)
        elif kind == "device-cacheable":
            file = mm.open_device(m.name, -(-m.size // mm.page_size), cacheable=True)
        elif kind == "vfio-bar":
            file = mm.open_vfio_bar(m.name, m.size)
        elif kind == "dmabuf":
            file = mm.create_dmabuf(m.name, m.size)
        elif kind in ("file", "file-shared"):
            file = mm.open_file(m.name, m.size)
        elif kind == "memfd":
            file = mm.memfd_create(m.name, m.size)
        fill = m.fill
        prot = m.prot
        if fill is not None and not prot & 2:
            # userspace fills through a writable mapping, then drops the write permission
            hva = yield from mm.mmap_op(m.size, prot | 2, kind, addr=addr, fixed=addr is not None,
                                        file=file, fill=fill)
            yield from mm.mprotect_op(hva, m.size, prot)
        else:
            hva = yield from mm.mmap_op(m.size, prot, kind, addr=addr, fixed=addr is not None,
                                        file=file, fill=fill)
        self.ranges[m.name] = (hva, m.size)
        if file is not None:
            self.files[m.name] = file

    def file_of(self, memory: str, line: int) -> File:
        """The file behind mapping ``memory``; InputError where it has none."""
        f = self.files.get(memory)
        if f is None:
            kind = self.kind_of(memory)
            raise InputError(f"{self.scenario.source}:{line}: memory {memory} is kind {kind}: "
                             "no file behind it")
        return f

    def kind_of(self, memory: str) -> str:
        """The kind of the mapping named ``memory`` (a ``memory`` entry or ``host_mmap``)."""
        m = self.scenario.memory.get(memory)
        if m is not None:
            return m.kind
        for step in self.scenario.all_steps():
            if isinstance(step, HostMmap) and step.name == memory:
                return step.kind
        return "unknown"

    # --- steps ---------------------------------------------------------------

    def do(self, step: Step) -> dict[str, Any]:
        """Run one step to completion; returns its outcome (without ``step``/``op``)."""
        return drive(self.step_op(step))

    def step_op(self, step: Step) -> Op[dict[str, Any]]:
        """One step as an operation: it pauses at the kernel's synchronisation
        points (the explorer interleaves these); returns the step's outcome."""
        try:
            return (yield from self._step_op(step))
        except KernelError as err:
            return {"result": "error", "errno": err.errno}
        except HostSignal as sig:
            return {"result": "signal", "signal": sig.signal}

    def _step_op(self, step: Step) -> Op[dict[str, Any]]:
        vm, mm = self.vm, self.mm
        match as_step(step):
            case GuestRead() | GuestWrite() | GuestExec() as access:
                return (yield from self.guest_op(access))
            case HostRead() as read:
                value = yield from mm.host_read_op(self.hva(read.memory, read.offset), read.size)
                return {"result": "ok", "value": value}
            case HostWrite() as write:
                yield from mm.host_write_op(self.hva(write.memory, write.offset), write.size,
                                            write.value)
            case HostMmap() as mmap:
                yield from self.mmap_op(mmap)
            case HostMunmap() as munmap:
                yield from mm.munmap_op(*self.munmap_range(munmap))
            case HostMprotect() as mprotect:
                yield from mm.mprotect_op(self.hva(mprotect.memory, mprotect.offset),
                                          mprotect.size, mprotect.prot)
            case HostMadvise() as madvise:
                yield from mm.madvise_op(self.hva(madvise.memory, madvise.offset), madvise.size,
                                         madvise.advice)
            case SetMemslot() as memslot:
                yield from self.set_memslot_op(memslot)
            case Prefault() as prefault:
                try:
                    left = yield from kvm_vcpu_pre_fault_memory_op(
                        vm, vm.vcpus[prefault.vcpu], prefault.gpa, prefault.size)
                except PrefaultHang:
                    # x86 before v6.15: retries until a signal; the real harness's watchdog
                    # reports {"result": "timeout", "seconds": S}
                    return {"result": "timeout"}
                return {"result": "ok", "remaining": left}
            case GetDirtyLog() as get:
                return {"result": "ok", "dirty": kvm_get_dirty_log(vm, get.slot)}
            case ClearDirtyLog() as clear:
                kvm_clear_dirty_log(vm, clear.slot, clear.first_page, clear.num_pages, clear.pages)
            case SetMemoryAttributes() as attrs:
                yield from vm.set_memory_attributes_op(attrs.gpa, attrs.size,
                                                       attrs.attribute_bits, attrs.flags)
            case PunchHole() as punch:
                yield from vfs_fallocate_op(self.file_of(punch.memory, punch.line),
                                            FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                                            punch.offset, punch.size)
            case EnableCap() as enable:
                kvm_vm_ioctl_enable_cap(vm, enable.cap_number, enable.flags, enable.cap_args)
            case HarvestDirtyRing() as harvest:
                if not vm.dirty_ring_size:
                    raise InputError(f"{self.scenario.source}:{harvest.line}: "
                                     "harvest_dirty_ring needs a VM with a dirty ring (the "
                                     "top-level dirty_ring)")
                ring = vm.vcpus[harvest.vcpu].dirty_ring
                return {"result": "ok", "dirty": kvm_dirty_ring_harvest(vm, ring)}
            case ResetDirtyRings():
                return {"result": "ok", "reset": kvm_vm_ioctl_reset_dirty_pages(vm)}
            case unknown:
                assert_never(unknown)
        return {"result": "ok"}

    def set_memslot_op(self, step: SetMemslot) -> Op[None]:
        """KVM_SET_USER_MEMORY_REGION from a ``set_memslot`` step or ``memslots`` entry."""
        if step.hva is not None:
            hva = step.hva
        elif step.memory is not None:
            hva = self.hva(step.memory, step.offset)
        else:
            hva = 0
        if not step.region2:
            yield from self.vm.set_user_memory_region_op(step.slot, step.gpa, step.size, hva,
                                                         step.flag_bits)
            return
        fd = GMEM_NO_FD
        if step.guest_memfd is not None:
            gmem = self.gmems.get(step.guest_memfd)
            if gmem is None:
                raise InputError(f"{self.scenario.source}:{step.line}: guest_memfd "
                                 f"{step.guest_memfd} is not a guest_memfd mapping made so far")
            fd = gmem.fd
        yield from self.vm.set_user_memory_region_op(
            step.slot, step.gpa, step.size, hva, step.flag_bits, guest_memfd=fd,
            guest_memfd_offset=step.guest_memfd_offset, v2=True)

    def guest_op(self, step: GuestAccess) -> Op[dict[str, Any]]:
        """A guest access on the step's vCPU (and path, when the step names one)."""
        vcpu = self.vm.vcpus[step.vcpu]
        path = step.path if step.path is not None else vcpu.path
        taken = self.vm.stats.pf_taken
        match step:
            case GuestRead():
                r = yield from vcpu.access_op(step.gpa, step.access_size, Access.READ, path=path)
            case GuestWrite():
                r = yield from vcpu.access_op(step.gpa, step.access_size, Access.WRITE,
                                              step.value, path=path)
                if r.result == "ok" and self.check:
                    validate_coherence(self.vm, step.gpa, step.size, step.value, step.vcpu,
                                       emulated=path == "emulated")
            case GuestExec():
                r = yield from vcpu.access_op(step.gpa, step.access_size, Access.EXEC,
                                              path=path)
            case unknown:
                assert_never(unknown)
        out = r.to_outcome()
        if step.count_faults:
            out["faults"] = self.vm.stats.pf_taken - taken
        return out

    # --- the run -------------------------------------------------------------

    def run(self) -> RunResult:
        """Set up, run every step, check invariants; returns the :class:`RunResult`.

        The invariants are checked after every setup memslot as after every step: a
        violation made by a ``memslots`` entry is reported against that entry
        (``"setup": true``, ``"step"`` its index in ``memslots``), not against step 0."""
        scn = self.scenario
        self.check_arch_support()
        result = RunResult(scn.name, self.arch, self.vm.variant.name, vm=self.vm,
                           events=self.vm.log, page_size=self.page_size)
        self.make_memory()
        for slot in scn.memslots:
            if not self._run_step(result, slot, setup=True):
                return result
        for step in scn.steps or ():
            if self.vm.log is not None:
                self.vm.log.step = step.index
            if not self._run_step(result, step):
                return result
        if self.check:
            try:
                result.notes = [{"invariant": "path-independence", "detail": note}
                                for note in validate_path_independence(self.vm)]
            except ValidationError as err:
                last = len(scn.steps or ()) - 1
                result.violations.append({"invariant": err.invariant, "step": last,
                                          "detail": err.detail})
        return result

    def make_memory(self) -> None:
        """Make the scenario's ``memory`` mappings, in file order.

        Raises :class:`~kvmmem.errors.InputError` (``FILE:LINE: memory.NAME: ...``)
        where the host refuses one: the file asks for a mapping that cannot exist."""
        scn = self.scenario
        for mapping in scn.memory.values():
            try:
                self.mmap(mapping)
            except KernelError as err:
                who = "KVM_CREATE_GUEST_MEMFD failed" if err.call == "KVM_CREATE_GUEST_MEMFD" \
                    else "the host refused the mapping"
                raise InputError(f"{scn.source}:{mapping.line}: memory.{mapping.name}: {who} "
                                 f"with {err.errno} ({err.reason})") from None

    def _run_step(self, result: RunResult, step: Step, setup: bool = False) -> bool:
        """Run ``step`` (a ``memslots`` entry when ``setup``), record its outcome and
        expectation, then check the invariants; False when the run stops here."""
        outcome: dict[str, Any] = {"step": step.index, "op": step.op}
        record = result.setup if setup else result.steps
        try:
            if self.explain is None:
                outcome.update(self.do(step))
            else:
                outcome.update(self.explain(step, setup, lambda: self.do(step)))
        except ValidationError as err:
            outcome.update({"result": "violation"})
            record.append(outcome)
            result.violations.append(self._violation(err, step.index, setup))
            return False
        record.append(outcome)
        self._expect(result, step, outcome, setup=setup)
        if self.check and not self._check(result, step.index, setup):
            if not self.keep_going:
                return False
            self.check = False
        return True

    def check_arch_support(self) -> None:
        """Refuse, before anything runs, what this architecture cannot do."""
        reason = arch_unsupported(self.scenario, self.arch)
        if reason is not None:
            raise InputError(reason)

    def _check(self, result: RunResult, index: int, setup: bool = False) -> bool:
        try:
            validate_vm(self.vm)
        except ValidationError as err:
            result.violations.append(self._violation(err, index, setup))
            return False
        return True

    @staticmethod
    def _violation(err: ValidationError, index: int, setup: bool) -> dict[str, Any]:
        """The ``violations`` entry of ``err`` seen after step (or setup entry) ``index``."""
        out: dict[str, Any] = {"invariant": err.invariant, "step": index, "detail": err.detail}
        if setup:
            out["setup"] = True
        return out

    @staticmethod
    def _expect(result: RunResult, step: Step, outcome: dict[str, Any],
                setup: bool = False) -> None:
        if step.expect:
            result.expects[("setup" if setup else "step", step.index)] = dict(step.expect)
        if not expectation_holds(step.expect, outcome):
            result.mismatches.append(Mismatch(step.index, step.op, step.line,
                                              dict(step.expect or {}), outcome, setup))


def arch_unsupported(scenario: Scenario, arch: str) -> str | None:
    """Why ``scenario`` cannot run on ``arch`` (``FILE:LINE: FIELD: WHAT``), or None.

    Today one thing is architecture-specific: ``path: emulated`` names x86's
    instruction emulator, which arm64 and riscv do not have.  Commands ask this
    for every architecture before running any, so that a file naming several
    runs on those it can and says why not on the others."""
    if arch == "x86":
        return None
    if scenario.vm_type != "default":
        return (f"{scenario.source}: vm_type: {scenario.vm_type} is an x86 VM type; {arch} "
                "has none")
    for step in scenario.all_steps():
        if isinstance(step, GuestAccess) and step.path == "emulated":
            return (f"{scenario.source}:{step.line}: {step.op}.path: the emulated path is "
                    f"x86's instruction emulator; {arch} has none")
    return None


def run_scenario(scenario: Scenario, arch: str, variant: str | None = None, *,
                 trace: bool = False, check: bool = True) -> RunResult:
    """Run ``scenario`` on ``arch`` with ``variant`` (default: the file's)."""
    if scenario.steps is None:
        raise InputError(f"{scenario.source}: {scenario.name} has threads, not steps: "
                         "run it with `kvmmem explore`")
    return Runner(scenario, arch, variant, trace=trace, check=check).run()
