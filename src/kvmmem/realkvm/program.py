"""A scenario as plain data, and the one driver that performs it on real KVM.

A *program* is a sequential scenario reduced to JSON-ready values, so that the
same driver runs it on this host's ``/dev/kvm`` and, through the agent
(:mod:`kvmmem.realkvm.agent`), inside an emulated machine whose Python has
nothing but the standard library.  :func:`kvmmem.realkvm.runner.scenario_program`
makes one from a loaded scenario; :func:`run_program` performs it.

Shape (every address and size an integer)::

    {"scenario": NAME, "arch": "x86" | "arm64" | "riscv", "path": "native",
     "timeout": SECONDS, "ipa_bits": null | N, "vm_type": TYPE,
     "reserved_gpas": [[GPA, SIZE], ...], "reserved_slots": [ID, ...],
     "needs": ["prefault", ...],
     "memory": [MAPPING, ...], "memslots": [STEP, ...], "steps": [STEP, ...],
     "x86_code": null | {"code": HEX, "entries": {ROUTINE: OFFSET}}}

    MAPPING = {"name", "size", "kind", "prot", "fill": null | BYTE,
               "at": null | [NAME, OFFSET], "gmem_flags": BITS}
    STEP    = {"index": I, "op": NAME, ...the step's keys (SCENARIOS.md)}

``set_memslot`` steps carry ``flags`` as the uapi bit mask, and ``guest_memfd`` (the
name of a guest_memfd mapping, or null) with ``guest_memfd_offset``; a mapping's
``gmem_flags`` are the ``GUEST_MEMFD_FLAG_*`` bits.  A program that uses
guest_memfd (a guest_memfd mapping, a slot with the ``guest_memfd`` flag or name)
runs only where the VM reports ``KVM_CAP_USER_MEMORY2``, ``KVM_CAP_GUEST_MEMFD`` and
every flag it asks in ``KVM_CAP_GUEST_MEMFD_FLAGS``; elsewhere it is unsupported with
the capability named.  ``vm_type`` is ``KVM_CREATE_VM``'s x86 type number
(``kvmmem.types.VM_TYPES``; 0 when absent): a type ``KVM_CAP_VM_TYPES`` does not list
makes the program unsupported, naming the capability.  ``set_memory_attributes``
steps carry ``attributes`` as the uapi bits (``KVM_MEMORY_ATTRIBUTE_PRIVATE`` is
``1 << 3``) and ``flags``.  ``enable_cap`` steps carry ``cap`` as the ``KVM_CAP_*``
number (``manual_dirty_log_protect2`` is 168), ``args`` (up to four) and ``flags``.
``dirty_ring`` (bytes, 0 or absent: none) enables each vCPU's dirty ring right after
KVM_CREATE_VM (``_ACQ_REL`` where offered), ``dirty_ring_with_bitmap`` then
KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP; a KVM without them, or refusing the size, makes the
program unsupported naming the capability or errno.  ``harvest_dirty_ring`` steps carry
``vcpu``; ``reset_dirty_rings`` none.
This module and everything it imports at the top is standard library only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from kvmmem.realkvm.harness import DEFAULT_TIMEOUT, HarnessVm
from kvmmem.realkvm.host import HostMemory, MappingUnsupported, hugetlb_free_bytes
from kvmmem.realkvm.ioctls import (
    KVM_CAP_ARM_MTE,
    KVM_CAP_DIRTY_LOG_RING,
    KVM_CAP_DIRTY_LOG_RING_ACQ_REL,
    KVM_CAP_GUEST_MEMFD,
    KVM_CAP_GUEST_MEMFD_FLAGS,
    KVM_CAP_MEMORY_ATTRIBUTES,
    KVM_CAP_USER_MEMORY2,
)
from kvmmem.realkvm.kvm import Kvm, KvmUnsupported
from kvmmem.realkvm.structs import (
    GUEST_MEMFD_FLAG_MMAP,
    KVM_MEM_GUEST_MEMFD,
    guest_memfd_flag_names,
)
from kvmmem.realkvm.tracefs import FAULT_EVENTS, EventCounter, tdp_enabled
from kvmmem.realkvm.x86 import RealVm
from kvmmem.types import EXEC_FETCH_SIZE, PAGE_SIZE

Outcome = dict[str, Any]
Program = dict[str, Any]


@dataclass(slots=True)
class RealRun:
    """The result of one scenario on real KVM: ``supported`` (False with ``reason``
    when the kernel or machine cannot run it), the outcomes of the ``memory`` and
    ``memslots`` setup (``setup``) and of each step (``steps``, in order; a run that
    became unsupported half-way keeps the steps done so far)."""

    scenario: str
    path: str
    supported: bool = True
    reason: str = ""
    setup: list[Outcome] = field(default_factory=list)
    steps: list[Outcome] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {"scenario": self.scenario, "path": self.path, "supported": self.supported,
                "reason": self.reason, "setup": self.setup, "steps": self.steps}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RealRun:
        """The inverse of :meth:`as_dict` (what the agent sends back)."""
        return cls(str(data["scenario"]), str(data["path"]), bool(data["supported"]),
                   str(data.get("reason", "")), list(data.get("setup", [])),
                   list(data.get("steps", [])))


class _Unsupported(Exception):
    pass


def kernel_version() -> tuple[int, int]:
    """This machine's kernel release as ``(major, minor)`` (``uname -r``)."""
    parts = os.uname().release.split(".")
    try:
        return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)
    except (IndexError, ValueError):
        return (0, 0)


def host_arch() -> str:
    """This machine's architecture in kvmmem's names (``x86``, ``arm64``, ``riscv``), or
    ``uname -m`` for another."""
    machine = os.uname().machine
    return {"x86_64": "x86", "aarch64": "arm64", "riscv64": "riscv"}.get(machine, machine)


def make_vm(program: Program, kvm: Kvm | None) -> HarnessVm:
    """A real VM of the program's architecture with room for its footprint.

    The program's dirty ring (``dirty_ring``, ``dirty_ring_with_bitmap``) is enabled
    right after KVM_CREATE_VM, before the harness's memslot and any vCPU.

    Raises :class:`~kvmmem.realkvm.kvm.KvmUnsupported` when this machine's KVM is of
    another architecture or refuses the dirty ring (naming the capability or errno),
    :class:`~kvmmem.realkvm.kvm.KvmUnavailable` without /dev/kvm."""
    arch = program["arch"]
    if arch != host_arch():
        raise KvmUnsupported(f"this machine's KVM is {host_arch()}; the program is for {arch}")
    ranges = [(int(g), int(s)) for g, s in program.get("reserved_gpas", ())]
    slots = [int(s) for s in program.get("reserved_slots", ())]
    timeout = float(program.get("timeout", DEFAULT_TIMEOUT))
    vm_type = int(program.get("vm_type") or 0)
    ring = (int(program.get("dirty_ring") or 0), bool(program.get("dirty_ring_with_bitmap")))
    mte = bool(program.get("mte"))
    if mte and arch != "arm64":
        raise KvmUnsupported(f"mte is arm64's (KVM_CAP_ARM_MTE); the program is for {arch}")
    if arch == "x86":
        return RealVm(ranges, slots, path=program.get("path", "native"), timeout=timeout,
                      kvm=kvm, code=program.get("x86_code"), vm_type=vm_type, dirty_ring=ring)
    if vm_type:
        raise KvmUnsupported(f"VM type {vm_type} is x86's (KVM_CREATE_VM's type on {arch} is "
                             "another thing); the harness creates no such VM here")
    if arch == "arm64":
        from kvmmem.realkvm.arm64 import Arm64Vm
        return Arm64Vm(ranges, slots, timeout=timeout, kvm=kvm,
                       ipa_bits=program.get("ipa_bits"), dirty_ring=ring, mte=mte)
    if arch == "riscv":
        from kvmmem.realkvm.riscv import RiscvVm
        return RiscvVm(ranges, slots, timeout=timeout, kvm=kvm, dirty_ring=ring)
    raise KvmUnsupported(f"no real-KVM harness for architecture {arch!r}")


def run_program(program: Program, kvm: Kvm | None = None, file_dir: str | None = None,
                device_bar: str | None = None, vfio_bar: str | None = None,
                vfio_modules: str | None = None) -> RealRun:
    """Perform ``program`` on this machine's real KVM.  ``file_dir``: where ``file``
    mappings get their file (a page-cache filesystem; default the temp dir);
    ``device_bar``: a PCI BAR's sysfs resource file for ``device`` mappings (default:
    perf-event pages); ``vfio_bar``: the PCI device whose BAR ``vfio-bar`` mappings
    slice through vfio-pci, ``vfio_modules`` the directory of the modules it needs
    (default: none here).  Every fd and mapping is released before returning.

    Raises :class:`~kvmmem.realkvm.kvm.KvmUnavailable` without a usable /dev/kvm."""
    out = RealRun(program["scenario"], program.get("path", "native"))
    try:
        with HostMemory(file_dir=file_dir, device_bar=device_bar, vfio_bar=vfio_bar,
                        vfio_modules=vfio_modules) as host:
            vm = make_vm(program, kvm)
            faults: EventCounter | None = None
            try:
                _check_capabilities(program, vm)
                for mapping in program.get("memory", ()):
                    out.setup.append({"memory": mapping["name"], **_mmap(host, vm, mapping)})
                for slot in program.get("memslots", ()):
                    out.setup.append({"memslot": slot["index"], **_set_memslot(host, vm, slot)})
                faults = _fault_counter(program)
                for step in program.get("steps", ()):
                    outcome = _counted_step(host, vm, step, faults)
                    out.steps.append({"step": step["index"], "op": step["op"], **outcome})
                    if outcome["result"] == "unsupported":
                        raise _Unsupported(outcome.get("reason", ""))
            finally:
                if faults is not None:
                    faults.close()
                vm.close()
    except (MappingUnsupported, KvmUnsupported, _Unsupported) as exc:
        out.supported, out.reason = False, str(exc)
    return out


KVM_CAP_ARM_CACHEABLE_PFNMAP_SUPPORTED = 243
"""arm64, v6.17: ``kvm_supports_cacheable_pfnmap()`` (the CPU has FWB and DIC)."""


def _check_capabilities(program: Program, vm: HarnessVm) -> None:
    """Raise :class:`_Unsupported` when the program needs what this KVM cannot give.

    A scenario declaring arm64 ``cpu_features`` fwb and dic needs a CPU with both on
    kernels that ask (v6.17+).  ``prefault`` on x86 needs KVM_PRE_FAULT_MEMORY, which
    upstream x86 offers only with TDP (``kvm_arch_vcpu_pre_fault_memory`` refuses a
    shadow-paging MMU with EOPNOTSUPP; this host's nested PVM has capability 0), so the
    model's upstream outcome has no real counterpart there.  A kernel older than v6.10
    has no such ioctl at all, nor do arm64 and riscv: their EINVAL is itself the
    outcome to compare."""
    if program["arch"] == "arm64" and {"fwb", "dic"} <= set(program.get("cpu_features", ())) \
            and kernel_version() >= (6, 17) \
            and not vm.vm.check_extension(KVM_CAP_ARM_CACHEABLE_PFNMAP_SUPPORTED):
        raise _Unsupported("the scenario declares cpu_features fwb and dic; this CPU lacks "
                           "them (KVM_CAP_ARM_CACHEABLE_PFNMAP_SUPPORTED is 0), so "
                           "cacheable VM_PFNMAP slots are refused here")
    if program["arch"] == "arm64" and "mte" in program.get("cpu_features", ()) \
            and kernel_version() >= (5, 14) and not vm.vm.check_extension(KVM_CAP_ARM_MTE):
        raise _Unsupported("the scenario declares cpu_features mte; this CPU has no MTE "
                           "(KVM_CAP_ARM_MTE is 0: QEMU's virt machine needs mte=on)")
    _check_mapping_kinds(program)
    _check_guest_memfd(program, vm)
    _check_memory_attributes(program, vm)
    if "prefault" in program.get("needs", ()) and program["arch"] == "x86" \
            and kernel_version() >= (6, 10) and not vm.supports("KVM_PRE_FAULT_MEMORY"):
        raise _Unsupported("KVM_PRE_FAULT_MEMORY needs a TDP (EPT/NPT) MMU; this KVM uses "
                           "shadow paging (KVM_CAP_PRE_FAULT_MEMORY is 0)")


def _check_mapping_kinds(program: Program) -> None:
    """Raise :class:`_Unsupported` naming a mapping kind this machine cannot make:
    ``device-cacheable`` (coherent device memory outside the kernel's linear map, a
    Grace-style GPU's through nvgrace-gpu: no emulated machine has such memory) and any
    kind the host source does not offer (:data:`~kvmmem.realkvm.host.KINDS`)."""
    from kvmmem.realkvm.host import KINDS
    mappings = [*program.get("memory", ()),
                *(s["mapping"] for s in program.get("steps", ()) if s["op"] == "host_mmap")]
    for m in mappings:
        kind = m["kind"]
        if kind == "device-cacheable":
            raise _Unsupported("device-cacheable needs coherent device memory outside the "
                               "kernel's linear map (a Grace-style GPU's, through "
                               "nvgrace-gpu's usemem region); no machine here has any")
        if kind not in KINDS and kind != "guest_memfd":
            raise _Unsupported(f"this machine's host source cannot make a {kind} mapping")


def guest_memfd_needs(program: Program) -> tuple[bool, bool, int]:
    """What the program asks of guest_memfd: ``(region2, guest_memfd, flags)``: whether
    a slot needs ``KVM_SET_USER_MEMORY_REGION2`` (a ``guest_memfd`` name or flag),
    whether anything uses guest_memfd at all, and the union of the
    ``GUEST_MEMFD_FLAG_*`` bits its guest_memfd mappings ask for."""
    mappings = [*program.get("memory", ()),
                *(s["mapping"] for s in program.get("steps", ()) if s["op"] == "host_mmap")]
    gmem = [m for m in mappings if m["kind"] == "guest_memfd"]
    flags = 0
    for m in gmem:
        flags |= int(m.get("gmem_flags", 0))
    region2 = any(_region2(s) for s in (*program.get("memslots", ()),
                                        *program.get("steps", ()))
                  if s["op"] == "set_memslot")
    return region2, region2 or bool(gmem), flags


def _region2(step: dict[str, Any]) -> bool:
    return step.get("guest_memfd") is not None or bool(step["flags"] & KVM_MEM_GUEST_MEMFD)


def _check_guest_memfd(program: Program, vm: HarnessVm) -> None:
    """Raise :class:`_Unsupported` naming the capability when the program uses guest_memfd
    and this VM lacks it: ``KVM_CAP_USER_MEMORY2`` (v6.8) for a guest_memfd slot,
    ``KVM_CAP_GUEST_MEMFD`` (asked of the VM: x86 6.12 reports 1 on /dev/kvm and 0 on a
    default VM, which has no private memory then), ``KVM_CAP_GUEST_MEMFD_FLAGS`` (v6.18)
    for every flag a guest_memfd mapping asks."""
    region2, gmem, flags = guest_memfd_needs(program)
    if region2 and not vm.vm.check_extension(KVM_CAP_USER_MEMORY2):
        raise _Unsupported("the scenario binds a guest_memfd in a memslot "
                           "(KVM_SET_USER_MEMORY_REGION2); KVM_CAP_USER_MEMORY2 is 0 here")
    if gmem and not vm.vm.check_extension(KVM_CAP_GUEST_MEMFD):
        raise _Unsupported("the scenario uses guest_memfd; KVM_CAP_GUEST_MEMFD is 0 on this "
                           "VM (a kernel or VM type without guest_memfd)")
    offered = vm.vm.check_extension(KVM_CAP_GUEST_MEMFD_FLAGS) if flags else 0
    if flags & ~offered:
        asked = ", ".join(guest_memfd_flag_names(flags))
        lacking = ", ".join(guest_memfd_flag_names(flags & ~offered))
        raise _Unsupported(f"the scenario creates a guest_memfd with gmem_flags {asked}; "
                           f"KVM_CAP_GUEST_MEMFD_FLAGS is {offered:#x} on this VM "
                           f"(lacks {lacking})")


def _check_memory_attributes(program: Program, vm: HarnessVm) -> None:
    """Raise :class:`_Unsupported` when an x86 kernel of v6.8 or later has no memory
    attributes at all (``KVM_CAP_MEMORY_ATTRIBUTES`` 0 on /dev/kvm): it was built without
    ``CONFIG_KVM_GENERIC_MEMORY_ATTRIBUTES`` (no SW_PROTECTED, SEV or TDX), a
    configuration the model, which follows releases, does not describe.  Older kernels
    and other architectures answer the ioctl as the model predicts (ENOTTY, EINVAL)."""
    kvm = vm.kvm
    if program["arch"] != "x86" or kernel_version() < (6, 8) or kvm is None:
        return
    if not any(s.get("op") == "set_memory_attributes" for s in program.get("steps", ())):
        return
    if not kvm.check_extension(KVM_CAP_MEMORY_ATTRIBUTES):
        raise _Unsupported("the scenario sets memory attributes; KVM_CAP_MEMORY_ATTRIBUTES "
                           "is 0 on /dev/kvm (a kernel built without "
                           "CONFIG_KVM_GENERIC_MEMORY_ATTRIBUTES)")


def _fault_counter(program: Program) -> EventCounter | None:
    """The tracepoint counter ``count_faults`` steps need on this architecture, or None
    (no such step, no such tracepoint, x86 without TDP: their outcomes then carry no
    ``faults``)."""
    event = FAULT_EVENTS.get(program["arch"])
    if event is None or not any(s.get("count_faults") for s in program.get("steps", ())):
        return None
    if program["arch"] == "x86" and not tdp_enabled():
        return None
    return EventCounter.open(*event)


def _counted_step(host: HostMemory, vm: HarnessVm, step: dict[str, Any],
                  faults: EventCounter | None) -> Outcome:
    """:func:`_step`, with ``faults`` (the stage-2 faults taken) for a guest access that
    asks for ``count_faults`` where this kernel can count them."""
    if faults is None or not step.get("count_faults"):
        return _step(host, vm, step)
    faults.reset()
    outcome = _step(host, vm, step)
    gpa = step["gpa"]
    end = gpa + step.get("size", EXEC_FETCH_SIZE)
    outcome["faults"] = faults.count(gpa & ~(PAGE_SIZE - 1), -(-end // PAGE_SIZE) * PAGE_SIZE)
    return outcome


def _hva(host: HostMemory, step: dict[str, Any]) -> int:
    return host.hva(step["memory"], step.get("offset", 0))


def _mmap(host: HostMemory, vm: HarnessVm, mapping: dict[str, Any]) -> Outcome:
    """A mapping of any kind; a guest_memfd is ``KVM_CREATE_GUEST_MEMFD`` on ``vm`` (its
    errno is the outcome, the name then standing for no file), mapped only with
    ``GUEST_MEMFD_FLAG_MMAP``."""
    at = mapping.get("at")
    hva = host.hva(at[0], at[1]) if at else None
    if mapping["kind"] == "guest_memfd":
        flags = int(mapping.get("gmem_flags", 0))
        fd, err = vm.vm.create_guest_memfd(mapping["size"], flags)
        mapped = bool(flags & GUEST_MEMFD_FLAG_MMAP)
        outcome = host.adopt_guest_memfd(mapping["name"], fd, mapping["size"], mapping["prot"],
                                         mapped and err is None, mapping.get("fill"), hva)
        return outcome if err is None else {"result": "error", "errno": err}
    return host.mmap(mapping["name"], mapping["size"], mapping["kind"], mapping["prot"],
                     mapping.get("fill"), hva)


NO_GUEST_MEMFD = 0xFFFF_FFFF
"""The ``guest_memfd`` field of a REGION2 slot that names no file (fd -1: EBADF where the
``KVM_MEM_GUEST_MEMFD`` flag asks for one)."""


def _set_memslot(host: HostMemory, vm: HarnessVm, step: dict[str, Any]) -> Outcome:
    """``KVM_SET_USER_MEMORY_REGION``, or ``..._REGION2`` when the slot names a
    guest_memfd or has the flag; ``hva`` is 0 for a slot without ``memory`` or
    ``hva`` (a gmem-only slot may have ``userspace_addr`` 0)."""
    hva = _hva(host, step) if step.get("memory") is not None else (step.get("hva") or 0)
    if not _region2(step):
        return vm.set_memslot(step["slot"], step["gpa"], step["size"], hva, step["flags"])
    name = step.get("guest_memfd")
    fd = host.mappings[name].fd if name is not None else -1
    return vm.set_memslot(step["slot"], step["gpa"], step["size"], hva, step["flags"],
                          NO_GUEST_MEMFD if fd < 0 else fd,
                          int(step.get("guest_memfd_offset") or 0))


def _step(host: HostMemory, vm: HarnessVm, step: dict[str, Any]) -> Outcome:
    """Perform one step; returns its outcome (without ``step``/``op``)."""
    op = step["op"]
    vcpu, path = step.get("vcpu", 0), step.get("path")
    if op == "guest_read":
        return vm.guest_read(step["gpa"], step["size"], vcpu, path)
    if op == "guest_write":
        return vm.guest_write(step["gpa"], step["size"], step["value"], vcpu, path)
    if op == "guest_exec":
        return vm.guest_exec(step["gpa"], vcpu, path)
    if op == "host_read":
        return host.host_read(_hva(host, step), step["size"])
    if op == "host_write":
        return host.host_write(_hva(host, step), step["size"], step["value"])
    if op == "host_mmap":
        return _mmap(host, vm, step["mapping"])
    if op == "host_munmap":
        mapping = host.mappings[step["memory"]]
        offset = step.get("offset", 0)
        size = step.get("size")
        return host.munmap(mapping.hva + offset, mapping.size - offset if size is None else size)
    if op == "host_mprotect":
        return host.mprotect(_hva(host, step), step["size"], step["prot"])
    if op == "host_madvise":
        return host.madvise(_hva(host, step), step["size"], step["advice"])
    if op == "set_memslot":
        return _set_memslot(host, vm, step)
    if op == "prefault":
        return vm.prefault(step["gpa"], step["size"], vcpu)
    if op == "get_dirty_log":
        return vm.get_dirty_log(step["slot"])
    if op == "clear_dirty_log":
        return vm.clear_dirty_log(step["slot"], step["first_page"], step["num_pages"],
                                  step.get("pages"))
    if op == "punch_hole":
        return host.punch_hole(step["memory"], step.get("offset", 0), step["size"])
    if op == "set_memory_attributes":
        return vm.set_memory_attributes(step["gpa"], step["size"], int(step["attributes"]),
                                        int(step.get("flags", 0)))
    if op == "harvest_dirty_ring":
        if not vm.dirty_ring_size:
            return {"result": "unsupported", "reason": "harvest_dirty_ring needs dirty_ring"}
        return vm.harvest_dirty_ring(int(step.get("vcpu", 0)))
    if op == "reset_dirty_rings":
        return vm.reset_dirty_rings()
    if op == "enable_cap":
        if int(step["cap"]) in (KVM_CAP_DIRTY_LOG_RING, KVM_CAP_DIRTY_LOG_RING_ACQ_REL):
            # The harness makes vCPUs on first use; the contract's VM has its vCPUs when
            # the steps run, and the ring's capability is refused once one exists.
            vm.ready_first_vcpu()
        return vm.enable_cap(int(step["cap"]), [int(a) for a in step.get("args") or ()],
                             int(step.get("flags", 0)))
    return {"result": "unsupported", "reason": f"step {op!r} has no real-KVM driver"}


PROBED_CAPABILITIES = ("KVM_CAP_USER_MEMORY2", "KVM_CAP_MEMORY_FAULT_INFO",
                       "KVM_CAP_MEMORY_ATTRIBUTES", "KVM_CAP_GUEST_MEMFD", "KVM_CAP_VM_TYPES",
                       "KVM_CAP_PRE_FAULT_MEMORY", "KVM_CAP_GUEST_MEMFD_FLAGS")
"""The capabilities :func:`probe` reports, asked of /dev/kvm and of a default VM (they
may differ: x86 6.12 reports KVM_CAP_GUEST_MEMFD 1 on /dev/kvm, 0 on a default VM)."""


def probe_capabilities(kvm: Kvm | None = None) -> dict[str, dict[str, int]]:
    """:data:`PROBED_CAPABILITIES` as ``{"dev": {NAME: VALUE}, "vm": {NAME: VALUE}}``
    (``KVM_CHECK_EXTENSION`` on /dev/kvm and on a new default VM); ``{}`` without a
    usable /dev/kvm."""
    from kvmmem.realkvm.ioctls import CAPABILITIES
    from kvmmem.realkvm.kvm import KvmUnavailable
    try:
        own = kvm is None
        dev = Kvm() if kvm is None else kvm
    except KvmUnavailable:
        return {}
    try:
        with dev.create_vm() as vm:
            return {"dev": {n: dev.check_extension(CAPABILITIES[n]) for n in PROBED_CAPABILITIES},
                    "vm": {n: vm.check_extension(CAPABILITIES[n]) for n in PROBED_CAPABILITIES}}
    except OSError:
        return {}
    finally:
        if own:
            dev.close()


def probe(file_dir: str | None = None, device_bar: str | None = None,
          vfio_bar: str | None = None, vfio_modules: str | None = None) -> dict[str, Any]:
    """What this machine offers scenarios: ``arch``, ``release``, free hugetlb bytes,
    where ``file``, ``device`` and ``vfio-bar`` mappings come from, and the memory
    capabilities (:func:`probe_capabilities`)."""
    return {"arch": host_arch(), "release": os.uname().release,
            "hugetlb_free": hugetlb_free_bytes(), "file_dir": file_dir,
            "device_bar": device_bar, "vfio_bar": vfio_bar, "vfio_modules": vfio_modules,
            "capabilities": probe_capabilities()}
