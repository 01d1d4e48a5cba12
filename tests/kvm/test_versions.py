"""Kernel versions as variants (issue 11): the switch timeline, version parsing, riscv's
absence before v5.16, the versioned slot limit, host mm history, the x86 prefault on an
obsolete root, mutations combined with a release, compare across releases, and conform's
choice of the model's variant."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kvmmem.cli import app
from kvmmem.conform import machine_variant, model_variant, unsupported_reason
from kvmmem.errors import InputError, KernelError
from kvmmem.kvm.vm import Vm
from kvmmem.scenario import load_scenario, load_scenario_text
from kvmmem.scenario.runner import run_scenario
from kvmmem.variants import (
    LINUX_5_4,
    SWITCHES,
    UPSTREAM,
    UPSTREAM_RELEASE,
    Variant,
    get_variant,
    parse_release,
    switch_values,
)

SCENARIOS = Path(__file__).resolve().parents[2] / "scenarios"
P = 4096


# --- the timeline -------------------------------------------------------------------


def test_every_switch_is_a_variant_field_with_its_history() -> None:
    """Each switch names a Variant field, its arches, what it controls, and changes in
    release order with a 12-hex commit (or None and a note saying what is known)."""
    fields = {f for f in Variant.__dataclass_fields__}
    for s in SWITCHES:
        assert s.name in fields, s.name
        assert s.what and s.arches and s.changes
        releases = [c.release for c in s.changes]
        assert releases == sorted(releases)
        for c in s.changes:
            assert c.commit is None or re.fullmatch(r"[0-9a-f]{12}", c.commit), c
            assert c.commit is not None or c.note, s.name
            assert c.title
        # the field's docstring in variants.py cites the commit (or says it is unknown)
        doc = Variant.__dataclass_fields__[s.name]
        assert doc is not None


# (switch, release just before the change, value there, release of the change, value)
AROUND = [
    ("arm64_prepare_write_check", "5.4", True, "5.5", False),
    ("arm64_prepare_premap", "5.13", True, "5.14", False),
    ("riscv_prepare_premap", "6.17", True, "6.18", False),
    ("remapped_always_writable", "5.11", True, "5.12", False),
    ("arm64_pfnmap_force_pte", "5.13", True, "5.14", False),
    ("notifier_counts_every_range", "5.12", True, "5.13", False),
    ("ipa_limit_off_by_one", "5.11", True, "5.12", False),
    ("small_memslot_limit", "5.11", True, "5.12", False),
    ("hugetlb_madv_dontneed", "5.17", False, "5.18", True),
    ("has_pre_fault_memory", "6.9", False, "6.10", True),
    ("x86_prefault_frees_obsolete_root", "6.14", False, "6.15", True),
    ("x86_elide_flush_if_young", "6.12", False, "6.13", True),
    ("riscv_exec_outside_slots_injects", "7.1", False, "7.2", True),
    ("arm64_pfnmap_vma_block", "5.13", False, "5.14", True),
    ("arm64_pfnmap_vma_block", "7.2", True, "7.3", False),
    ("arm64_cacheable_pfnmap_check", "6.16", False, "6.17", True),
    ("arm64_cacheable_pfnmap_fault", "6.16", False, "6.17", True),
    ("arm64_allow_any_uncached", "6.8", False, "6.9", True),
    ("arm64_dic_eager_exec", "5.9", False, "5.10", True),
    ("arm64_mte", "5.13", False, "5.14", True),
    ("arm64_mte_allowed_check", "6.1", False, "6.2", True),
    ("hugetlb_mte_allowed", "5.9", False, "5.10", True),
    ("vfio_pci_mmap", "5.7", 0, "5.8", 1),
    ("vfio_pci_mmap", "6.9", 1, "6.10", 2),
    ("vfio_pci_mmap", "6.11", 2, "6.12", 3),
    ("vfio_huge_fault_pfn_check", "6.12", False, "6.13", True),
    ("vfio_huge_fault_align", "6.14", False, "6.15", True),
    ("riscv_hugetlb_lookup", "6.16", 0, "6.17", 1),
    ("riscv_hugetlb_lookup", "7.1", 1, "7.2", 2),
    ("x86_guest_memfd", "6.7", False, "6.8", True),
    ("arm64_guest_memfd", "6.17", False, "6.18", True),
    ("gmem_mmap", "6.17", False, "6.18", True),
    ("gmem_bind_overlap_eexist", "7.1", False, "7.2", True),
    ("x86_dirty_log_initially_set", "5.6", False, "5.7", True),
    ("arm64_dirty_log_initially_set", "5.7", False, "5.8", True),
    ("riscv_dirty_log_initially_set", "6.18", False, "6.19", True),
    ("x86_dirty_ring", "5.10", False, "5.11", True),
    ("dirty_ring_acq_rel", "6.0", False, "6.1", True),
    ("arm64_dirty_ring", "6.1", False, "6.2", True),
    ("riscv_dirty_ring", "6.16", False, "6.17", True),
]


@pytest.mark.parametrize(("name", "before", "old", "at", "new"), AROUND,
                         ids=[f"{a[0]}@{a[3]}" for a in AROUND])
def test_switch_values_around_their_change(name: str, before: str, old: bool | int,
                                           at: str, new: bool | int) -> None:
    assert getattr(get_variant(before), name) == old
    assert getattr(get_variant(at), name) == new
    assert getattr(get_variant("5.4"), name) == getattr(LINUX_5_4, name)
    switch = next(s for s in SWITCHES if s.name == name)
    assert getattr(UPSTREAM, name) == getattr(get_variant("7.3"), name) \
        == switch.value_at(UPSTREAM_RELEASE)
    assert {a[0] for a in AROUND} == {s.name for s in SWITCHES}
    assert sum(a[0] == name for a in AROUND) == len(switch.changes)


def test_5_10_has_no_eperm_but_premaps() -> None:
    """The split: v5.5 dropped arm64's EPERM, v5.14 the premap; 5.10 is in between."""
    v = get_variant("5.10")
    assert (v.arm64_prepare_write_check, v.arm64_prepare_premap) == (False, True)
    assert (LINUX_5_4.arm64_prepare_write_check, LINUX_5_4.arm64_prepare_premap) == (True, True)


def test_upstream_is_the_newest_checked_release() -> None:
    assert UPSTREAM.release == UPSTREAM_RELEASE == (7, 3)
    assert switch_values((7, 3)) == {s.name: getattr(UPSTREAM, s.name) for s in SWITCHES}
    assert UPSTREAM.name == "upstream" and LINUX_5_4.name == "linux-5.4"


# --- names and errors ---------------------------------------------------------------------


@pytest.mark.parametrize(("text", "release"), [
    ("5.4", (5, 4)), ("5.10", (5, 10)), ("6.1", (6, 1)), ("6.12", (6, 12)), ("7.2", (7, 2)),
    ("7.3", (7, 3)), ("upstream", (7, 3)), ("linux-5.4", (5, 4)), ("v6.6", (6, 6)),
    ("5.19", (5, 19)), ("6.0", (6, 0)),
])
def test_release_names(text: str, release: tuple[int, int]) -> None:
    assert parse_release(text) == release
    assert get_variant(text).release == release


@pytest.mark.parametrize("text", ["5.3", "4.19", "7.4", "8.0", "5.20", "6.25", "linux-2.6",
                                  "banana", "6.1+nope", "6", ""])
def test_bad_variants_are_one_line(text: str) -> None:
    with pytest.raises(InputError) as err:
        get_variant(text)
    assert "\n" not in str(err.value)
    assert "variant" in str(err.value)


def test_mutations_combine_with_a_release() -> None:
    v = get_variant("6.1+no-tlb-flush")
    assert (v.name, v.release, v.mutation, v.zap_flushes_tlb) == (
        "6.1+no-tlb-flush", (6, 1), "no-tlb-flush", False)
    assert v.has_pre_fault_memory is False  # the release's switches stay
    bare = get_variant("no-tlb-flush")
    assert (bare.name, bare.release, bare.zap_flushes_tlb) == ("no-tlb-flush", (7, 3), False)
    assert get_variant("upstream+no-tlb-flush").zap_flushes_tlb is False
    assert get_variant("5.4+no-invalidate-retry").invalidate_retry is False
    assert get_variant("5.4+no-invalidate-retry").arm64_prepare_premap is True
    assert not get_variant("6.1").is_mutation and v.is_mutation


# --- riscv before v5.16 -------------------------------------------------------------------


def test_riscv_is_refused_before_5_16() -> None:
    msg = "riscv KVM was merged in v5.16; variant 5.10 has none"
    with pytest.raises(InputError, match=re.escape(msg)):
        Vm("riscv", variant="5.10")
    Vm("riscv", variant="5.16").close()
    res = CliRunner().invoke(app, ["run", str(SCENARIOS / "quickstart.yaml"), "--arch",
                                   "riscv", "--variant", "5.10"])
    assert res.exit_code == 2 and msg in res.output
    assert len(res.output.strip().splitlines()) == 1


def test_a_file_naming_riscv_at_an_old_release_skips_riscv_with_a_line(tmp_path: Path) -> None:
    text = ("kvmmem: 1\nname: t\narch: [arm64, riscv]\nvariant: 5.10\nmemory:\n"
            "  ram: {size: 16K, kind: anon, prot: rw}\nmemslots:\n  - {slot: 0, gpa: 0, size: 16K, "
            "memory: ram}\nsteps:\n  - guest_read: {gpa: 0, size: 4}\n")
    path = tmp_path / "riscv-510.yaml"
    path.write_text(text)
    res = CliRunner().invoke(app, ["run", str(path), "--json"])
    assert res.exit_code == 0, res.output
    assert "riscv: not applicable: riscv KVM was merged in v5.16" in res.stderr
    assert [json.loads(line)["arch"] for line in res.stdout.splitlines()] == ["arm64"]
    only = text.replace("[arm64, riscv]", "riscv")
    path.write_text(only)
    res = CliRunner().invoke(app, ["run", str(path)])
    assert res.exit_code == 2 and "variant 5.10 has none" in res.output


# --- versioned behaviour ------------------------------------------------------------------


@pytest.mark.parametrize(("arch", "release", "slot", "ok"), [
    ("x86", "5.10", 508, True), ("x86", "5.10", 509, False), ("x86", "5.12", 509, True),
    ("arm64", "5.10", 511, True), ("arm64", "5.10", 512, False), ("arm64", "5.12", 512, True),
    ("x86", "upstream", 32763, True), ("x86", "upstream", 32764, False),
])
def test_slot_limit_by_release(arch: str, release: str, slot: int, ok: bool) -> None:
    vm = Vm(arch, variant=release)
    hva = vm.mm.mmap(4 * P, 3, "anon")
    if ok:
        vm.set_user_memory_region(slot, 0, 4 * P, hva)
    else:
        with pytest.raises(KernelError) as err:
            vm.set_user_memory_region(slot, 0, 4 * P, hva)
        assert err.value.errno == "EINVAL"
    assert vm.memslots.limits.user_mem_slots == get_variant(release).user_mem_slots(arch)


def test_linux_5_4_refuses_slot_509_on_x86() -> None:
    vm = Vm("x86", variant="linux-5.4")
    hva = vm.mm.mmap(4 * P, 3, "anon")
    with pytest.raises(KernelError, match="509"):
        vm.set_user_memory_region(509, 0, 4 * P, hva)


def test_madvise_dontneed_on_hugetlb_before_5_18() -> None:
    for release, ok in (("5.17", False), ("5.18", True)):
        vm = Vm("x86", variant=release)
        hva = vm.mm.mmap(2 << 20, 3, "hugetlb")
        if ok:
            vm.mm.madvise(hva, 2 << 20, "dontneed")
        else:
            with pytest.raises(KernelError) as err:
                vm.mm.madvise(hva, 2 << 20, "dontneed")
            assert err.value.errno == "EINVAL"


def test_riscv_exec_outside_slots_by_release() -> None:
    scn = load_scenario(SCENARIOS / "row-no-slot-exec-riscv.yaml")
    old = run_scenario(scn, "riscv", "6.12")
    new = run_scenario(scn, "riscv", "7.2")
    exec_steps = [i for i, s in enumerate(scn.steps or ()) if s.op == "guest_exec"]
    assert exec_steps
    i = exec_steps[0]
    assert old.steps[i]["result"] == "error" and old.steps[i]["errno"] == "EOPNOTSUPP"
    assert new.steps[i]["result"] == "abort"


def test_x86_prefault_after_a_delete_times_out_before_6_15() -> None:
    """selftest-pre-fault-memory: the memslot delete (KVM_X86_QUIRK_SLOT_ZAP_ALL) makes the
    vCPU's root obsolete; before 20a6cff3b283 (v6.15) kvm_mmu_reload keeps it and every
    prefault retries until the harness's watchdog: ``{"result": "timeout"}``, until the
    vCPU enters the guest (its KVM_RUN frees the root)."""
    scn = load_scenario(SCENARIOS / "selftest-pre-fault-memory.yaml")
    results = {v: [s["result"] for s in run_scenario(scn, "x86", v).steps]
               for v in ("6.12", "6.15", "upstream")}
    assert results["6.12"][6] == "timeout" and results["6.12"][8] == "timeout"
    assert "timeout" not in results["6.15"] and results["6.15"] == results["upstream"]
    assert results["6.12"][9:] == ["ok", "ok"]


def test_prefault_without_an_earlier_root_does_not_time_out() -> None:
    """No root loaded before the delete: nothing is obsolete."""
    text = ("kvmmem: 1\nname: t\narch: x86\nmemory:\n  ram: {size: 8K, kind: anon, prot: rw}\n"
            "memslots:\n  - {slot: 0, gpa: 0, size: 8K, memory: ram}\n"
            "  - {slot: 1, gpa: 0x10000, size: 8K, memory: ram}\nsteps:\n"
            "  - set_memslot: {slot: 1, size: 0}\n  - prefault: {gpa: 0, size: 4K}\n")
    run = run_scenario(load_scenario_text(text), "x86", "6.12")
    assert run.steps[1]["result"] == "ok"


def test_5_10_premaps_a_read_only_pfnmap_writable() -> None:
    """v5.5-v5.13: no EPERM, and the premap is writable by the slot's flags: a writable
    stage-2 entry over a read-only device mapping, which the permission invariant
    reports against the setup memslot (the run stops there, before the guest's store)."""
    text = ("kvmmem: 1\nname: t\narch: arm64\nmemory:\n  bar: {size: 64K, kind: device, "
            "prot: r}\nmemslots:\n  - {slot: 1, gpa: 0x100000, size: 64K, memory: bar}\n"
            "steps:\n  - guest_write: {gpa: 0x100000, size: 4, value: 1}\n")
    scn = load_scenario_text(text)
    v54, v510, v514 = (run_scenario(scn, "arm64", v) for v in ("5.4", "5.10", "5.14"))
    assert v54.setup[0]["errno"] == "EPERM"
    assert v510.setup[0]["result"] == "ok"
    assert v510.vm is not None and v510.vm.stats.premapped_pages == 16
    assert v510.steps == [] and [(v["invariant"], v.get("setup")) for v in v510.violations] \
        == [("permission-containment", True)]
    assert v514.setup[0]["result"] == "ok" and v514.steps[0]["result"] == "fault"


# --- the command line -----------------------------------------------------------------------


def test_compare_across_releases_on_the_discussions_scenarios() -> None:
    res = CliRunner().invoke(app, ["compare", str(SCENARIOS / "pfnmap-faulted.yaml"), "--arch",
                                   "arm64", "--variant", "5.4,5.10,6.1,6.12,upstream",
                                   "--json"])
    assert res.exit_code == 0, res.output
    cmp = json.loads(res.stdout)
    assert [c["variant"] for c in cmp["columns"]] == ["5.4", "5.10", "6.1", "6.12", "upstream"]
    (row,) = [r for r in cmp["rows"] if r["label"] == "premapped_pages"]
    assert row["cells"] == ["16", "16", "0", "0", "0"]
    for name in ("ro-vma-at-create.yaml", "prefault-one-path.yaml"):
        res = CliRunner().invoke(app, ["compare", str(SCENARIOS / name), "--variant",
                                       "5.4,5.10,6.1,6.12,upstream"])
        assert res.exit_code in (0, 1), res.output


def test_the_premap_of_a_lazy_pfnmap_breaks_the_invariants_until_5_14() -> None:
    """5.4-5.13 arm64 premap a VM_PFNMAP range at creation from a physical address
    guessed from vm_pgoff: for a lazily populated mapping (nothing mapped yet, vm_pgoff
    not a pfn) that is other host memory, and the guest's store lands there instead of
    in the device page the host later maps: the invariants catch it (exit 3); from 5.14
    the fault path maps what the host maps."""
    res = CliRunner().invoke(app, ["compare", str(SCENARIOS / "row-pfnmap-ro-pte.yaml"),
                                   "--arch", "arm64", "--variant", "5.4,5.10,6.1,upstream",
                                   "--json"])
    assert res.exit_code == 3, res.output
    cmp = json.loads(res.stdout)
    broken = [bool(c["violations"]) for c in cmp["columns"]]
    assert broken == [True, True, False, False]


def test_run_takes_releases_and_combinations() -> None:
    res = CliRunner().invoke(app, ["run", str(SCENARIOS / "quickstart.yaml"), "--arch",
                                   "arm64", "--variant", "6.1,6.1+no-tlb-flush", "--json"])
    assert res.exit_code in (0, 1, 3), res.output
    assert [json.loads(line)["variant"] for line in res.stdout.splitlines()] == [
        "6.1", "6.1+no-tlb-flush"]


def test_the_scenario_variant_key_takes_a_release() -> None:
    for value in ("5.10", "6.1", "'6.12'", "6.1+no-tlb-flush", "upstream"):
        scn = load_scenario_text(f"kvmmem: 1\nname: t\nvariant: {value}\nsteps: []\n")
        assert scn.variant == value.strip("'") and scn.variant_given
    assert not load_scenario_text("kvmmem: 1\nname: t\nsteps: []\n").variant_given
    with pytest.raises(InputError, match="not a Linux release"):
        load_scenario_text("kvmmem: 1\nname: t\nvariant: 4.19\nsteps: []\n")


# --- conform's variant ----------------------------------------------------------------------


def test_conform_runs_the_machines_release() -> None:
    assert machine_variant("7.3-16k") == "7.3-16k" and machine_variant("6.1") == "6.1"
    # Debian's 6.12.117 carries the stable fix of the arm64 PFNMAP block sizing
    assert machine_variant("6.12") == "debian-6.12"
    plain = load_scenario(SCENARIOS / "quickstart.yaml")
    assert model_variant(plain, "6.12") == "6.12"
    assert unsupported_reason(plain, "x86", "machine x86-6.12", "6.12") is None
    old = load_scenario(SCENARIOS / "pfnmap-premap-5.4.yaml")
    assert model_variant(old, "6.12") == "linux-5.4"
    assert unsupported_reason(old, "arm64", "machine arm64-6.12", "6.12") == \
        "variant linux-5.4: the real kernel is 6.12"
    assert unsupported_reason(old, "arm64", "machine arm64-5.10", "5.10") == \
        "variant linux-5.4: the real kernel is 5.10"
    assert unsupported_reason(old, "arm64", "this host", "upstream") == \
        "variant linux-5.4: the real kernel is upstream"
    mutated = load_scenario_text("kvmmem: 1\nname: t\nvariant: 7.3+no-tlb-flush\nsteps: []\n")
    assert unsupported_reason(mutated, "x86", "machine x86-7.3", "7.3") is not None
    same = load_scenario_text("kvmmem: 1\nname: t\nvariant: 6.12\nsteps: []\n")
    assert unsupported_reason(same, "x86", "machine x86-6.12", "6.12") is None


def test_conform_runs_the_machines_page_size() -> None:
    """The 16 KiB-page machine runs the model with 16 KiB host pages (its variant carries
    the suffix); a scenario that pins another page size is not applicable there, naming
    both, and a 16K-pinned one is not applicable on a 4K kernel."""
    plain = load_scenario(SCENARIOS / "quickstart.yaml")
    assert model_variant(plain, "7.3-16k") == "7.3-16k"
    assert unsupported_reason(plain, "arm64", "machine arm64-7.3-16k", "7.3-16k") is None
    named = load_scenario_text("kvmmem: 1\nname: t\narch: arm64\nvariant: 7.3\nsteps: []\n")
    assert model_variant(named, "7.3-16k") == "7.3-16k"
    mutated = load_scenario_text(
        "kvmmem: 1\nname: t\narch: arm64\nvariant: 7.3+no-tlb-flush\nsteps: []\n")
    assert model_variant(mutated, "7.3-16k") == "7.3-16k+no-tlb-flush"
    pinned4 = load_scenario_text("kvmmem: 1\nname: t\narch: arm64\npage_size: 4K\nsteps: []\n")
    assert unsupported_reason(pinned4, "arm64", "machine arm64-7.3-16k", "7.3-16k") == \
        "page_size 4K: machine arm64-7.3-16k runs a kernel built with 16K pages"
    pinned16 = load_scenario_text(
        "kvmmem: 1\nname: t\narch: arm64\npage_size: 16K\nsteps: []\n")
    assert unsupported_reason(pinned16, "arm64", "machine arm64-7.3", "7.3") == \
        "page_size 16K: machine arm64-7.3 runs a kernel built with 4K pages"
    assert unsupported_reason(pinned16, "arm64", "machine arm64-7.3-16k", "7.3-16k") is None
    by_variant = load_scenario_text(
        "kvmmem: 1\nname: t\narch: arm64\nvariant: 7.3-64k\nsteps: []\n")
    assert unsupported_reason(by_variant, "arm64", "machine arm64-7.3-16k", "7.3-16k") == \
        "page_size 64K: machine arm64-7.3-16k runs a kernel built with 16K pages"


def test_riscv_premap_race_at_6_12() -> None:
    """race-premap-vs-munmap on riscv: the creation-time premap existed from v5.16 to
    v6.17, so 6.12 (not linux-5.4: no riscv KVM) is where the explorer finds it."""
    from kvmmem.explore import SearchParams, explore

    scenario = load_scenario(SCENARIOS / "race-premap-vs-munmap.yaml")
    assert explore(scenario, "riscv", "6.12", SearchParams(strategy="dpor")).verdict == \
        "violation"
    assert explore(scenario, "riscv", "upstream", SearchParams(strategy="dpor")).verdict == \
        "exhausted"


def test_versions_doc_lists_every_switch_with_its_commit() -> None:
    text = (Path(__file__).resolve().parents[2] / "docs" / "versions.md").read_text()
    for s in SWITCHES:
        assert f"`{s.name}`" in text, s.name
        for c in s.changes:
            assert (f"`{c.commit}`" if c.commit else "not identified") in text
            assert c.title in text


def test_debian_5_10_carries_the_writable_pfnmap_fix() -> None:
    """Debian's 5.10.223 is mainline 5.10 plus the v5.12 hva_to_pfn_remapped fix
    (bd2fae8da794): its variant differs from 5.10 in that switch alone, and the 5.10
    machine is held against it."""
    from kvmmem.conform import machine_variant
    from kvmmem.variants import DISTRIBUTIONS, get_variant

    mainline, debian = get_variant("5.10"), get_variant("debian-5.10")
    assert mainline.remapped_always_writable and not debian.remapped_always_writable
    differ = [f.name for f in dataclasses.fields(mainline)
              if f.name not in ("name", "description")
              and getattr(mainline, f.name) != getattr(debian, f.name)]
    assert differ == ["remapped_always_writable"]
    assert set(DISTRIBUTIONS) == {"debian-5.10", "debian-6.12"}
    assert machine_variant("5.10") == "debian-5.10"
    assert machine_variant("6.1") == "6.1" and machine_variant("7.3-16k") == "7.3-16k"
    text = SCENARIOS / "pfnmap-mprotect-after-premap.yaml"
    for variant, outcome in (("5.10", "violation"), ("debian-5.10", "fault"),
                             ("upstream", "fault")):
        res = CliRunner().invoke(app, ["run", str(text), "--variant", variant, "--json"])
        run = json.loads(res.stdout)
        got = "violation" if run["violations"] else run["steps"][3]["result"]
        assert got == outcome, (variant, res.stdout)


def test_debian_6_12_carries_the_pfnmap_block_fix() -> None:
    """Debian's 6.12.117 is mainline 6.12 plus the stable fix that stopped arm64 from
    sizing VM_PFNMAP blocks from vm_pgoff; 6.1 (Debian 6.1.176) keeps the old rule."""
    from kvmmem.variants import get_variant

    mainline, debian = get_variant("6.12"), get_variant("debian-6.12")
    differ = [f.name for f in dataclasses.fields(mainline)
              if f.name not in ("name", "description")
              and getattr(mainline, f.name) != getattr(debian, f.name)]
    assert differ == ["arm64_pfnmap_vma_block", "hugetlb_mte_allowed",
                      "vfio_huge_fault_pfn_check", "vfio_huge_fault_align"]
    assert mainline.arm64_pfnmap_vma_block and get_variant("6.1").arm64_pfnmap_vma_block


@pytest.mark.parametrize(("variant", "slot1_store"), [("6.12", "fault"), ("7.2", "ok")])
def test_riscv_hugetlb_block_outside_the_slot_by_release(variant: str,
                                                         slot1_store: str) -> None:
    """``kvm_riscv_gstage_map`` before 49476d58f217 (v7.2) keeps a hugetlb VMA's 2 MiB
    size for a slot starting 4 KiB past a 2 MiB boundary and looks the aligned gfn up in
    every memslot (``gfn_to_pfn_prot``): none covers it, -EFAULT (real riscv 6.12.117);
    7.2 maps the page 4K (real riscv 7.2.13).  The congruent slot 0 gets its 2 MiB
    block in both."""
    result = run_scenario(load_scenario(SCENARIOS / "row-huge-hugetlb.yaml"), "riscv",
                          variant)
    steps = {s["step"]: s["result"] for s in result.steps}
    assert steps[1] == "ok" and steps[3] == slot1_store
