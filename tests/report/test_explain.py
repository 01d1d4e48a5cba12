"""``kvmmem run --explain``: the kernel-function tree of a step and its decisive node.

For each row of the stage-2 fault decision tables (kernel-semantics.md §3.5.1 and
§3.5.2, the rows tests/kvm/test_decision_tables.py checks outcome by outcome) the
explained decisive node must be the kernel function the row's rule comes from:
``get_user_pages_unlocked`` for a VMA that lacks the right (``check_vma_flags``),
``hva_to_pfn_remapped`` for a read-only PFNMAP PTE, ``user_mem_abort`` /
``kvm_riscv_mmu_map`` for a vanished VMA (their ``vma_lookup``), the install for a
mapping, the x86 emulator for what ends in an MMIO exit there, and so on.  Explaining
must not change any outcome, and every entry of the source table must exist and name
its kernel function in its docstring.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kvmmem.cli import optional_values
from kvmmem.host import PROT_NONE, PROT_READ, PROT_WRITE
from kvmmem.kvm.memslot import KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY
from kvmmem.kvm.vcpu import Access
from kvmmem.kvm.vm import Vm
from kvmmem.report.explain import Explainer, Node, explain_text, mark_decisive, run_explained
from kvmmem.report.sources import SOURCES, resolve
from kvmmem.scenario.loader import load_scenario
from kvmmem.scenario.runner import run_scenario

ARCHES = ("x86", "arm64", "riscv")
P = 4096
G = 0x4000_0000
NOSLOT = 0x9000_0000
RW = PROT_READ | PROT_WRITE
READ, WRITE, EXEC = Access.READ, Access.WRITE, Access.EXEC
SCENARIOS = Path(__file__).resolve().parents[2] / "scenarios"


def slot_vm(arch: str, *, kind: str = "anon", prot: int = RW, flags: int = 0,
            fill: int | None = 0x11, features: tuple[str, ...] = ()) -> tuple[Vm, int]:
    vm = Vm(arch, cpu_features=features)
    hva = vm.mm.mmap(16 * P, RW, kind, fill=fill)
    vm.set_user_memory_region(0, G, 16 * P, hva, flags)
    if prot != RW:  # after the slot, as a VMM's mprotect (riscv's prepare refuses before)
        vm.mm.mprotect(hva, 16 * P, prot)
    return vm, hva


def explained(vm: Vm, run: Callable[[], dict[str, Any]]) -> tuple[dict[str, Any], Node]:
    """Run ``run`` (one step) under an explainer; its outcome and explained tree."""
    root = Node("step", "")
    with Explainer(vm.arch_name, vm.variant.release).step(root):
        outcome = run()
    mark_decisive(root, outcome)
    return outcome, root


def access(vm: Vm, gpa: int, kind: Access) -> tuple[dict[str, Any], Node]:
    return explained(vm, lambda: vm.guest_access(gpa, 4, kind, 0x5A).to_outcome())


def decisive(root: Node) -> str:
    node = root.decisive_node()
    assert node is not None, "no node marked decisive"
    return node.function


def per_arch(x86: str, arm64: str, riscv: str) -> dict[str, str]:
    return {"x86": x86, "arm64": arm64, "riscv": riscv}


# --- §3.5.1: no memslot ----------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHES)
def test_no_slot_access_is_decided_by_the_mmio_branch(arch: str) -> None:
    """Loads and stores outside every slot: arm64 ``kvm_handle_guest_abort``'s I/O branch,
    riscv ``gstage_page_fault``, x86 the emulator after RET_PF_EMULATE."""
    for kind in (READ, WRITE):
        out, root = access(Vm(arch), NOSLOT, kind)
        assert out["result"] == "mmio"
        assert decisive(root) == per_arch("emulator_read_write", "kvm_handle_guest_abort",
                                          "gstage_page_fault")[arch]


@pytest.mark.parametrize("arch", ["arm64", "riscv"])
def test_no_slot_exec(arch: str) -> None:
    """An instruction fetch outside every slot: an abort injected (arm64), an
    instruction access fault (riscv), decided where the I/O branch refuses fetches."""
    out, root = access(Vm(arch), NOSLOT, EXEC)
    assert out["result"] == "abort"
    assert decisive(root) == {"arm64": "kvm_handle_guest_abort",
                              "riscv": "gstage_page_fault"}[arch]


# --- §3.5.2: in a memslot ------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHES)
def test_present_page_is_decided_by_the_install(arch: str) -> None:
    out, root = access(slot_vm(arch)[0], G, READ)
    assert out == {"result": "ok", "value": 0x11111111}
    assert decisive(root) == per_arch("kvm_tdp_mmu_map", "kvm_pgtable_stage2_map",
                                      "kvm_riscv_mmu_map")[arch]


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("prot,kinds", [(PROT_READ, (WRITE,)), (PROT_NONE, (READ, WRITE))])
def test_vma_without_the_right_is_decided_by_gup(arch: str, prot: int,
                                                 kinds: tuple[Access, ...]) -> None:
    """A write to a PROT_READ VMA, any access to a PROT_NONE one: -EFAULT, because
    ``get_user_pages_unlocked`` fails ``check_vma_flags`` and the VMA is no PFNMAP."""
    for kind in kinds:
        vm, _ = slot_vm(arch, prot=prot)
        out, root = access(vm, G, kind)
        assert out["result"] == "fault"
        node = root.decisive_node()
        assert node is not None and node.function == "get_user_pages_unlocked"
        assert "check_vma_flags" in node.result


@pytest.mark.parametrize("arch", ARCHES)
def test_munmapped_hva(arch: str) -> None:
    """No VMA behind the slot: arm64 and riscv look the VMA up first (``vma_lookup`` in
    ``user_mem_abort`` / ``kvm_riscv_mmu_map``); x86 learns it from GUP."""
    vm, hva = slot_vm(arch)
    vm.mm.munmap(hva, 16 * P)
    out, root = access(vm, G, READ)
    assert out["result"] == "fault"
    assert decisive(root) == per_arch("get_user_pages_unlocked", "user_mem_abort",
                                      "kvm_riscv_mmu_map")[arch]


@pytest.mark.parametrize("arch", ARCHES)
def test_write_to_readonly_pfnmap_pte(arch: str) -> None:
    """A read-only device mapping written: ``hva_to_pfn_remapped`` answers
    KVM_PFN_ERR_RO_FAULT; arm64 and riscv fail with -EFAULT there, x86 emulates and the
    emulator, unable to store, exits to userspace as MMIO."""
    vm, _ = slot_vm(arch, kind="device", prot=PROT_READ, fill=None)
    out, root = access(vm, G, WRITE)
    assert out["result"] == ("mmio" if arch == "x86" else "fault")
    assert decisive(root) == per_arch("emulator_read_write", "hva_to_pfn_remapped",
                                      "hva_to_pfn_remapped")[arch]
    remapped = [n for n in root.walk() if n.function == "hva_to_pfn_remapped"]
    assert remapped and remapped[0].result.startswith("KVM_PFN_ERR_RO_FAULT")


def test_exec_from_device_memory_arm64() -> None:
    """arm64: an instruction fetch from device memory is refused by ``user_mem_abort``
    (-ENOEXEC, a prefetch abort injected)."""
    vm, _ = slot_vm("arm64", kind="device", fill=None)
    out, root = access(vm, G, EXEC)
    assert out["result"] == "abort"
    assert decisive(root) == "user_mem_abort"


@pytest.mark.parametrize("arch", ARCHES)
def test_write_to_readonly_slot(arch: str) -> None:
    """KVM_MEM_READONLY written: MMIO; arm64 and riscv decide in the fault handler's
    I/O branch, x86 in the emulator (RO_BAD hva, RET_PF_EMULATE)."""
    vm, _ = slot_vm(arch, flags=KVM_MEM_READONLY)
    out, root = access(vm, G, WRITE)
    assert out["result"] == "mmio"
    assert decisive(root) == per_arch("emulator_read_write", "kvm_handle_guest_abort",
                                      "gstage_page_fault")[arch]


@pytest.mark.parametrize("arch", ARCHES)
def test_logged_write_marks_dirty_after_mapping(arch: str) -> None:
    """LOG_DIRTY write: mapped (the install decides) and ``mark_page_dirty_in_slot``
    is on the path."""
    vm, _ = slot_vm(arch, flags=KVM_MEM_LOG_DIRTY_PAGES)
    out, root = access(vm, G, WRITE)
    assert out == {"result": "ok"}
    assert any(n.function == "mark_page_dirty_in_slot" for n in root.walk())
    assert decisive(root) == per_arch("kvm_tdp_mmu_map", "kvm_pgtable_stage2_map",
                                      "kvm_riscv_mmu_map")[arch]


@pytest.mark.parametrize("arch", ARCHES)
def test_hwpoison_is_decided_by_gup(arch: str) -> None:
    vm, hva = slot_vm(arch)
    pfn = vm.mm.host_pte(hva)
    assert pfn is not None
    vm.mm.physmem.hwpoison(int(pfn.pfn))
    out, root = access(vm, G, READ)
    assert out == {"result": "error", "errno": "EINTR"}
    node = root.decisive_node()
    assert node is not None and node.function == "get_user_pages_unlocked"
    assert node.result.startswith("-EHWPOISON")


def test_cacheable_pfnmap_refused_by_prepare_arm64() -> None:
    """arm64 (v6.17) without FWB and DIC: ``kvm_arch_prepare_memory_region`` refuses a
    slot over a cacheable VM_PFNMAP VMA (a dma-buf) with EINVAL."""
    vm = Vm("arm64")
    hva = vm.mm.mmap(16 * P, RW, "dmabuf", file=vm.mm.create_dmabuf("buf", 16 * P))

    def create() -> dict[str, Any]:
        try:
            vm.set_user_memory_region(0, G, 16 * P, hva, 0)
        except Exception as err:
            return {"result": "error", "errno": getattr(err, "errno", "?")}
        return {"result": "ok"}

    out, root = explained(vm, create)
    assert out == {"result": "error", "errno": "EINVAL"}
    node = root.decisive_node()
    assert node is not None and node.function == "kvm_arch_prepare_memory_region"
    assert node.source == "arch/arm64/kvm/mmu.c" and "FWB" in node.result


@pytest.mark.parametrize("arch", ARCHES)
def test_absent_pfnmap_pte_is_filled_by_the_driver(arch: str) -> None:
    """VM_PFNMAP with the PTE absent: ``hva_to_pfn_remapped`` asks
    ``fixup_user_fault`` (the driver's fault handler inserts the frame), then the
    install decides."""
    vm, _ = slot_vm(arch, kind="device-lazy", fill=None)
    out, root = access(vm, G, READ)
    assert out == {"result": "ok", "value": 0}
    names = [n.function for n in root.walk()]
    assert names.index("hva_to_pfn_remapped") < names.index("fixup_user_fault")
    assert decisive(root) == per_arch("kvm_tdp_mmu_map", "kvm_pgtable_stage2_map",
                                      "kvm_riscv_mmu_map")[arch]


def test_private_access_without_guest_memfd_x86() -> None:
    """x86 sw_protected VM: a private gfn of a slot with no guest_memfd fails with a
    memory-fault exit decided in ``kvm_tdp_mmu_page_fault`` (its faultin part,
    ``kvm_mmu_faultin_pfn``)."""
    from kvmmem.kvm.memory_attributes import KVM_MEMORY_ATTRIBUTE_PRIVATE
    from kvmmem.sync import drive

    vm = Vm("x86", vm_type="sw_protected")
    hva = vm.mm.mmap(4 * P, RW, "anon", fill=0x5A)
    vm.set_user_memory_region(0, G, 4 * P, hva, 0)
    drive(vm.set_memory_attributes_op(G, P, KVM_MEMORY_ATTRIBUTE_PRIVATE))
    out, root = access(vm, G, READ)
    assert out["result"] == "fault" and out["flags"] == 8
    assert decisive(root) == "kvm_tdp_mmu_page_fault"


@pytest.mark.parametrize("arch", ARCHES)
def test_logged_read_maps_readonly_on_arm64_and_riscv(arch: str) -> None:
    """LOG_DIRTY read: the install decides; arm64 and riscv install it read-only
    (``writable`` no in the fault handler's facts), x86 writable."""
    vm, _ = slot_vm(arch, flags=KVM_MEM_LOG_DIRTY_PAGES)
    out, root = access(vm, G, READ)
    assert out == {"result": "ok", "value": 0x11111111}
    handler = per_arch("kvm_tdp_mmu_page_fault", "user_mem_abort", "kvm_riscv_mmu_map")[arch]
    node = next(n for n in root.walk() if n.function == handler)
    if arch != "x86":
        assert node.facts["writable"] == "no" and node.facts["logging"] == "yes"
    assert decisive(root) == per_arch("kvm_tdp_mmu_map", "kvm_pgtable_stage2_map",
                                      "kvm_riscv_mmu_map")[arch]


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("row", ["exec-ram", "readonly-read", "readonly-exec",
                                 "pfnmap-present", "log-dirty-readonly-write"])
def test_mapping_rows_are_decided_by_the_install(arch: str, row: str) -> None:
    """The rows that end in a mapping are decided by the install: an instruction fetch
    from RAM, a read and a fetch in a KVM_MEM_READONLY slot, a write to a present
    writable PFNMAP PTE.  A write in a LOG_DIRTY|READONLY slot is MMIO, decided where
    any read-only slot's write is."""
    flags = {"readonly-read": KVM_MEM_READONLY, "readonly-exec": KVM_MEM_READONLY,
             "log-dirty-readonly-write": KVM_MEM_READONLY | KVM_MEM_LOG_DIRTY_PAGES
             }.get(row, 0)
    kind = "device" if row == "pfnmap-present" else "anon"
    vm, _ = slot_vm(arch, kind=kind, flags=flags, fill=None if kind == "device" else 0x11)
    access_kind = {"exec-ram": EXEC, "readonly-exec": EXEC, "pfnmap-present": WRITE,
                   "log-dirty-readonly-write": WRITE}.get(row, READ)
    out, root = access(vm, G, access_kind)
    if row == "log-dirty-readonly-write":
        assert out["result"] == "mmio"
        assert decisive(root) == per_arch("emulator_read_write", "kvm_handle_guest_abort",
                                          "gstage_page_fault")[arch]
        return
    assert out["result"] == "ok"
    assert decisive(root) == per_arch("kvm_tdp_mmu_map", "kvm_pgtable_stage2_map",
                                      "kvm_riscv_mmu_map")[arch]


# --- sources, versions, outcomes unchanged ---------------------------------------------------

def test_every_source_entry_exists_and_its_docstring_names_the_function() -> None:
    for target, source in SOURCES.items():
        func = resolve(target)
        if source.arch:
            continue  # one model function for three kernels' run loops
        doc = func.__doc__ or ""
        names = {name for _, name in source.names}
        assert any(f"``{n}" in doc or n in doc for n in names), (target, names)


def test_files_follow_the_release() -> None:
    """arm64's KVM moved from virt/kvm/arm to arch/arm64/kvm in v5.8, x86's MMU into
    arch/x86/kvm/mmu/ in v5.6; the PFNMAP PTE is read by follow_pfn, then follow_pte
    (v5.12), then follow_pfnmap_start (v6.12)."""
    def sources(arch: str, variant: str, kind: str) -> dict[str, str]:
        vm = Vm(arch, variant=variant)
        hva = vm.mm.mmap(16 * P, RW, kind, fill=0x11 if kind == "anon" else None)
        vm.set_user_memory_region(0, G, 16 * P, hva, 0)
        _, root = access(vm, G, READ)
        return {n.function: n.source for n in root.walk()}

    for variant, file in (("linux-5.4", "virt/kvm/arm/mmu.c"), ("5.8", "arch/arm64/kvm/mmu.c")):
        assert sources("arm64", variant, "anon")["user_mem_abort"] == file
    for variant, file, follow in (("linux-5.4", "arch/x86/kvm/mmu.c", "follow_pfn"),
                                  ("6.1", "arch/x86/kvm/mmu/mmu.c", "follow_pte"),
                                  ("upstream", "arch/x86/kvm/mmu/mmu.c", "follow_pfnmap_start")):
        found = sources("x86", variant, "device-lazy")
        assert found["kvm_mmu_page_fault"] == file
        assert follow in found


def _sequential() -> list[Path]:
    return [p for p in sorted(SCENARIOS.glob("*.yaml"))
            if load_scenario(p).steps is not None]


@pytest.mark.parametrize("path", _sequential(), ids=lambda p: p.stem)
def test_explaining_changes_no_outcome(path: Path) -> None:
    """The same outcomes, violations and exit status with and without --explain, and a
    tree for every step."""
    scn = load_scenario(path)
    for arch in scn.arches:
        try:
            plain = run_scenario(scn, arch)
        except Exception:  # refused on this arch: refused alike
            continue
        told = run_explained(scn, arch)
        assert told.steps == plain.steps and told.violations == plain.violations
        assert told.exit_status == plain.exit_status
        assert set(told.explanations) == {o["step"] for o in told.steps}
        assert set(told.setup_explanations) == {o["step"] for o in told.setup}
        for outcome in told.steps:
            assert explain_text(outcome, told.explanations[outcome["step"]])
    assert sys.gettrace() is None or "coverage" in type(sys.gettrace()).__module__


def test_optional_value_of_explain() -> None:
    assert optional_values(["run", "f.yaml", "--explain"]) == ["run", "f.yaml", "--explain=all"]
    assert optional_values(["run", "--explain", "--json", "f"]) == \
        ["run", "--explain=all", "--json", "f"]
    assert optional_values(["run", "f", "--explain", "1,3"]) == ["run", "f", "--explain=1,3"]
    assert optional_values(["run", "--", "--explain"]) == ["run", "--", "--explain"]


def test_explore_replay_explains_each_thread_step() -> None:
    """``explore --replay TOKEN --explain``: the steps of the failing execution of the
    device-write-vs-mprotect race under no-invalidate-retry, each under its own root
    although their pauses interleave: the vCPU's fault maps the page writable without
    any ``mmu_invalidate_retry`` on its path, after the host's mprotect went through
    the MMU notifier."""
    from kvmmem.explore import explore
    from kvmmem.report.explain import replay_explained

    scn = load_scenario(SCENARIOS / "race-device-write-vs-mprotect.yaml")
    found = explore(scn, "arm64", "no-invalidate-retry")
    assert found.violation is not None and found.token is not None
    replayed, steps = replay_explained(scn, found.token)
    assert replayed.violation is not None
    assert replayed.violation.invariant == found.violation.invariant
    by_thread = {entry["thread"]: entry["explain"] for entry in steps}

    def names(tree: dict[str, Any]) -> list[str]:
        return [tree["function"]] + [n for c in tree["children"] for n in names(c)]

    vcpu = names(by_thread["vcpu"])
    assert "user_mem_abort" in vcpu and "kvm_pgtable_stage2_map" in vcpu
    assert "mmu_invalidate_retry" not in vcpu
    assert "kvm_mmu_notifier_invalidate_range_start" in names(by_thread["host"])


def test_compare_explain_names_where_the_paths_part() -> None:
    """``compare --explain`` on the read-only-VMA slot, arm64 linux-5.4 vs upstream: v5.4's
    prepare refused the writable slot (EPERM), so its fault ends in the no-slot MMIO
    branch of ``kvm_handle_guest_abort``; upstream reaches ``user_mem_abort`` and the
    write is refused by GUP's ``check_vma_flags``."""
    from kvmmem.report.compare import compare_runs, divergences

    scn = load_scenario(SCENARIOS / "ro-vma-at-create.yaml")
    cmp = compare_runs(scn, ["arm64"], ["linux-5.4", "upstream"], explain=True)
    found = {d["op"]: d for d in divergences(cmp)}
    write = found["guest_write"]
    assert write["path"] == ["KVM_RUN", "handle_exit", "kvm_handle_guest_abort"]
    assert write["diverge"][0] is None and write["diverge"][1]["function"] == "user_mem_abort"
    assert [n["function"] for n in write["decided"]] == ["kvm_handle_guest_abort",
                                                        "get_user_pages_unlocked"]
    assert write["decided"][0]["source"] == "virt/kvm/arm/mmu.c"
    setup = next(d for d in divergences(cmp) if d.get("setup"))
    assert setup["decided"][0]["function"] == "kvm_arch_prepare_memory_region"
    assert setup["decided"][0]["result"].startswith("-EPERM")
    assert setup["decided"][1] is None  # upstream makes the slot: nothing refused it
    assert "divergences" in cmp.to_json()
    assert "divergences" not in compare_runs(scn, ["arm64"], ["upstream"]).to_json()


def test_cli_explain_without_and_with_step_numbers() -> None:
    """Through the console entry point: ``--explain`` followed by another option explains
    every step; ``--explain 1`` only step 1; ``explore --explain`` needs ``--replay``."""
    import json
    import subprocess

    path = str(SCENARIOS / "pfnmap-dmabuf-no-fwb.yaml")

    def kvmmem(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "kvmmem", *args], capture_output=True,
                              text=True, timeout=120, check=False)

    every = json.loads(kvmmem("run", path, "--explain", "--json").stdout)
    assert all("explain" in o for o in every["steps"] + every["setup"])
    one = json.loads(kvmmem("run", path, "--explain", "1", "--json").stdout)
    assert ["explain" in o for o in one["steps"]] == [False, True, False]
    assert not any("explain" in o for o in one["setup"])
    bad = kvmmem("run", path, "--explain", "7")
    assert bad.returncode == 2 and "steps 0 .. 2, not 7" in bad.stderr
    race = kvmmem("explore", str(SCENARIOS / "race-device-write-vs-mprotect.yaml"),
                  "--explain")
    assert race.returncode == 2 and "--replay" in race.stderr
