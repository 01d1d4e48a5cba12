"""``kvmmem run``: the step table, ``--json`` in the SCENARIOS.md shape, exit
status 0 / 1 / 2 / 3, ``--show stage2,maps,stats`` and scenarios naming
several architectures.

The expected outcomes are the kernel's, as each scenario's description
derives them (kernel-semantics.md §3.5, kvm-on-this-host.md §3.5): a write
through a slot whose VMA was replaced read-only with MAP_FIXED fails with
EFAULT (``kvm_handle_error_pfn`` / ``user_mem_abort`` -> -EFAULT), an access
outside every memslot is an MMIO exit.  The stage-2 entries are checked
against the architectures' bit layouts (Intel SDM "EPT paging-structure
entries"; Arm ARM stage-2 descriptors as ``stage2_set_prot_attr`` fills
them; RISC-V privileged spec PTEs as ``kvm_riscv_gstage_map_page`` writes
them), the host mappings against ``show_map_vma`` / ``show_smap_vma_flags``
(fs/proc/task_mmu.c).

Other keys (a run-level ``notes`` list, "note" lines) may be added to the
output; these tests assert what must be there, not that nothing else is.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from typer.testing import CliRunner

from kvmmem.cli import app
from kvmmem.report.text import print_run
from kvmmem.scenario.loader import load_scenario_text
from kvmmem.scenario.runner import run_scenario

SCENARIOS = Path(__file__).resolve().parents[2] / "scenarios"
QUICKSTART = str(SCENARIOS / "quickstart.yaml")
WIDE = {"COLUMNS": "200"}  # no wrapped table rows

# quickstart.yaml (ro-vma-after-create), every step, on x86 and arm64 alike.
QUICKSTART_STEPS: list[dict[str, Any]] = [
    {"step": 0, "op": "guest_write", "result": "ok"},
    {"step": 1, "op": "host_read", "result": "ok", "value": 0x1122334455667788},
    {"step": 2, "op": "host_mmap", "result": "ok"},
    {"step": 3, "op": "guest_read", "result": "ok", "value": 0xABABABABABABABAB},
    {"step": 4, "op": "guest_write", "result": "fault"},
    {"step": 5, "op": "guest_read", "result": "mmio", "gpa": 0x200000, "len": 4,
     "is_write": False},
]

WRONG_EXPECT = """\
kvmmem: 1
name: wrong-expect
arch: arm64
memory:
  ram: {size: 64K, kind: anon, prot: rw, fill: 0x11}
memslots:
  - {slot: 0, gpa: 0x40000000, size: 64K, memory: ram}
steps:
  - guest_read: {gpa: 0x40000000, size: 4}
    expect: {result: ok, value: 0x11111111}
  - guest_read: {gpa: 0x40000000, size: 2}
    expect: {result: ok, value: 0x2222}
  - guest_read: {gpa: 0x80000000, size: 4}
    expect: {result: mmio}
"""
WRONG_LINE = 11  # the line of the step whose expectation fails

# RAM written through slot 0, a remap_pfn_range device region read through a
# KVM_MEM_READONLY slot 1.
SHOW = """\
kvmmem: 1
name: show-all
arch: [arm64, x86, riscv]
memory:
  ram: {size: 64K, kind: anon, prot: rw}
  bar: {size: 16K, kind: device, prot: rw}
memslots:
  - {slot: 0, gpa: 0x40000000, size: 64K, memory: ram}
  - {slot: 1, gpa: 0x50000000, size: 16K, memory: bar, flags: [readonly]}
steps:
  - guest_write: {gpa: 0x40001000, size: 4, value: 7}
    expect: {result: ok}
  - guest_read: {gpa: 0x50000000, size: 4}
    expect: {result: ok, value: 0}
"""


def run(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(app, ["run", *args], env=WIDE)
    return res.exit_code, res.output


def run_text(text: str, *args: str) -> tuple[int, str]:
    """``kvmmem run`` on a scenario written to a temporary file."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "scenario.yaml"
        path.write_text(text)
        return run(str(path), *args)


def table_rows(output: str) -> list[list[str]]:
    """The body rows of the step tables in ``output``, as stripped cells."""
    return [[c.strip() for c in line.split("│")[1:-1]]
            for line in output.splitlines() if line.startswith("│")]


def json_lines(output: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


def check_steps(steps: list[dict[str, Any]], expected: list[dict[str, Any]]) -> None:
    """Every expected key with its value (more keys are allowed)."""
    assert len(steps) == len(expected)
    for got, want in zip(steps, expected, strict=True):
        assert {k: got.get(k) for k in want} == want, got


# =====================================================================================
# The readable table
# =====================================================================================


def test_table_rows_of_a_bundled_scenario() -> None:
    """One row per setup memslot (numbered s0, s1, ...) and step (0, 1, ...): index,
    step name, result, details (values in hex), and every expectation of the file,
    met (✓) or not (✗), in the same notation; nothing failed, exit 0."""
    code, out = run(QUICKSTART, "--arch", "x86")
    assert code == 0, out
    assert "ro-vma-after-create  arch=x86  variant=upstream" in out
    rows = table_rows(out)
    assert [r[:3] for r in rows] == [
        ["s0", "setup set_memslot", "ok"], ["0", "guest_write", "ok"],
        ["1", "host_read", "ok"], ["2", "host_mmap", "ok"], ["3", "guest_read", "ok"],
        ["4", "guest_write", "fault"], ["5", "guest_read", "mmio"]]
    assert [r[3] for r in rows] == [
        "", "", "value=0x1122334455667788", "", "value=0xabababababababab",
        "", "gpa=0x200000 len=0x4 is_write=no"]
    assert [r[4] for r in rows] == [
        "", "✓ result=ok", "✓ result=ok value=0x1122334455667788", "",
        "✓ result=ok value=0xabababababababab", "✓ result=fault",
        "✓ result=mmio gpa=0x200000 len=0x4 is_write=no"]


def test_failed_expectation_is_marked_and_exits_1() -> None:
    """Step 1 reads 0x1111 where the file expects 0x2222: its row carries what
    was expected (in the details' notation), a line names the step, its op,
    its line in the file and both outcomes; the other steps still run; exit 1."""
    code, out = run_text(WRONG_EXPECT)
    assert code == 1, out
    rows = table_rows(out)
    assert [r[1:3] for r in rows] == [["setup set_memslot", "ok"], ["guest_read", "ok"],
                                      ["guest_read", "ok"], ["guest_read", "mmio"]]
    assert rows[2][3] == "value=0x1111"
    assert rows[2][4] == "✗ result=ok value=0x2222"
    line = next(ln for ln in out.splitlines() if ln.startswith("step 1 "))
    assert line == (f"step 1 (guest_read, line {WRONG_LINE}): expected result=ok "
                    "value=0x2222, got result=ok value=0x1111")
    code, out = run_text(WRONG_EXPECT, "--json")
    assert code == 1
    (obj,) = json_lines(out)
    assert obj["steps"][1]["value"] == 0x1111 and obj["violations"] == []


def test_failed_expectation_is_red() -> None:
    """On a terminal the expected column and the failure line are bold red."""
    result = run_scenario(load_scenario_text(WRONG_EXPECT, "wrong.yaml"), "arm64")
    buf = io.StringIO()
    print_run(Console(file=buf, force_terminal=True, color_system="standard", width=200,
                      highlight=False), result, [])
    text = buf.getvalue()
    bold_red = "\x1b[1;31m"
    assert f"{bold_red}✗ result=ok value=0x2222" in text
    assert f"{bold_red}step 1 (guest_read, line {WRONG_LINE})" in text
    assert "\x1b[36mmmio" in text  # results coloured by kind


# =====================================================================================
# --json: the SCENARIOS.md contract
# =====================================================================================


def test_json_is_the_scenarios_contract() -> None:
    """``{"scenario", "arch", "variant", "steps": [{"step", "op", "result", ...}],
    "violations": []}``, one object per line and architecture, in the file's
    order; integers as JSON numbers, ``is_write`` a boolean."""
    code, out = run(QUICKSTART, "--json")
    assert code == 0, out
    objs = json_lines(out)
    assert [o["arch"] for o in objs] == ["x86", "arm64"]
    for obj in objs:
        assert {"scenario", "arch", "variant", "steps", "violations"} <= obj.keys()
        assert obj["scenario"] == "ro-vma-after-create"
        assert obj["variant"] == "upstream"
        assert obj["violations"] == []
        check_steps(obj["steps"], QUICKSTART_STEPS)
        assert obj["steps"][5]["is_write"] is False
    code, out = run(QUICKSTART, "--json", "--arch", "riscv", "--variant", "6.12")
    (obj,) = json_lines(out)
    assert (obj["arch"], obj["variant"]) == ("riscv", "6.12")


def test_json_error_outcome_carries_the_errno_name() -> None:
    """A refused KVM_SET_USER_MEMORY_REGION is ``{"result": "error", "errno":
    "EEXIST"}``: a slot overlapping another's gpa range (``__kvm_set_memory_region``
    -> -EEXIST)."""
    text = WRONG_EXPECT.replace("    expect: {result: ok, value: 0x2222}\n", "").replace(
        "steps:\n", "steps:\n  - set_memslot: {slot: 1, gpa: 0x40008000, size: 4K, "
        "memory: ram}\n    expect: {result: error, errno: EEXIST}\n")
    code, out = run_text(text, "--json")
    assert code == 0, out
    (obj,) = json_lines(out)
    check_steps(obj["steps"], [
        {"step": 0, "op": "set_memslot", "result": "error", "errno": "EEXIST"},
        {"step": 1, "op": "guest_read", "result": "ok", "value": 0x11111111},
        {"step": 2, "op": "guest_read", "result": "ok", "value": 0x1111},
        {"step": 3, "op": "guest_read", "result": "mmio", "gpa": 0x80000000, "len": 4,
         "is_write": False}])


# =====================================================================================
# Exit status 2 (bad input) and 3 (an invariant violated)
# =====================================================================================


def test_bad_input_exits_2_with_one_line() -> None:
    """A bad file, a missing file, an unknown variant: through the console entry
    point, one ``kvmmem: error:`` line naming the file, line and field; nothing on
    stdout (nothing ran)."""
    bad = WRONG_EXPECT.replace("size: 2}", "size: 3}")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bad.yaml"
        path.write_text(bad)
        cases = [([str(path)], f"{path}:{WRONG_LINE}: steps[1].guest_read.size: 3"),
                 ([str(Path(tmp) / "missing.yaml")], "missing.yaml: no such file"),
                 ([QUICKSTART, "--variant", "nope"], "unknown variant 'nope'")]
        for args, message in cases:
            proc = subprocess.run([sys.executable, "-m", "kvmmem.cli", "run", *args],
                                  capture_output=True, text=True, timeout=120, check=False)
            assert proc.returncode == 2, proc.stderr
            assert proc.stdout == ""
            assert proc.stderr.startswith("kvmmem: error: ") and message in proc.stderr, \
                proc.stderr
            assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["--arch", "mips"], "--arch: unknown arch 'mips'"),
    (["--arch", ""], "--arch: empty list"),
    (["--show", "stage2,tlb"], "--show: unknown show 'tlb'"),
])
def test_bad_options_exit_2(args: list[str], message: str) -> None:
    code, out = run(QUICKSTART, *args)
    assert code == 2
    assert f"kvmmem: error: {message}" in out
    assert "ro-vma-after-create" not in out  # nothing ran


def test_invariant_violation_exits_3() -> None:
    """pfnmap-readonly-vma under ``remapped-no-write-check`` (the bug fixed by
    bd2fae8da794, "KVM: do not assume PTE is writable after follow_pfn"): the
    first read maps the PROT_READ device page writable, permission containment
    fails after step 0 and the run stops there; upstream the store is emulated
    and leaves as an MMIO exit (``KVM_PFN_ERR_RO_FAULT``)."""
    path = str(SCENARIOS / "pfnmap-readonly-vma.yaml")
    code, out = run(path, "--json", "--variant", "remapped-no-write-check")
    assert code == 3, out
    (obj,) = json_lines(out)
    assert obj["variant"] == "remapped-no-write-check"
    check_steps(obj["steps"], [{"step": 0, "op": "guest_read", "result": "ok", "value": 0}])
    (violation,) = obj["violations"]
    assert {k: violation[k] for k in ("invariant", "step")} == \
        {"invariant": "permission-containment", "step": 0}
    assert "writable gfn 0x100" in violation["detail"]
    code, out = run(path, "--variant", "remapped-no-write-check")
    assert code == 3
    assert "invariant permission-containment violated after step 0" in out
    assert [r[1] for r in table_rows(out)] == ["setup set_memslot", "guest_read"]
    code, out = run(path, "--json")
    assert code == 0, out
    (obj,) = json_lines(out)
    check_steps(obj["steps"], [
        {"step": 0, "op": "guest_read", "result": "ok", "value": 0},
        {"step": 1, "op": "guest_write", "result": "mmio", "gpa": 0x100000, "len": 4,
         "is_write": True, "data": 0x0BAD},
        {"step": 2, "op": "host_read", "result": "ok", "value": 0}])


# =====================================================================================
# --show stage2,maps,stats
# =====================================================================================


def _leaf_lines(out: str) -> dict[int, tuple[int, int, str]]:
    """gpa -> (pfn, raw entry, decoded text) of every ``--show stage2`` leaf line."""
    leaves = {}
    for m in re.finditer(r"^  gpa (0x[0-9a-f]+) size 0x1000 -> pfn (0x[0-9a-f]+) "
                         r"\([a-zA-Z, ]+\)  (0x[0-9a-f]{16})  (.*)$", out, re.M):
        leaves[int(m[1], 16)] = (int(m[2], 16), int(m[3], 16), m[4])
    return leaves


def test_show_stage2_arm64_entries_bit_exact() -> None:
    """arm64 leaves as ``stage2_set_prot_attr`` writes them: a valid page
    descriptor (bits 1:0 = 0b11), OA = pfn << 12, AF (bit 10), SH inner
    shareable (bits 9:8 = 0b11), S2AP (bits 7:6) RW for the written RAM and R-
    for the read-only slot, XN (bits 54:53) set on data faults, MemAttr (bits
    5:2) 0b1111 Normal write-back for RAM, 0b0001 Device-nGnRE for the device
    frame (``KVM_S2_MEMATTR(kvm, DEVICE_nGnRE)``)."""
    code, out = run_text(SHOW, "--arch", "arm64", "--show", "stage2")
    assert code == 0, out
    assert "stage-2 (arm64) leaves:" in out
    leaves = _leaf_lines(out)
    assert sorted(leaves) == [0x40001000, 0x50000000]
    for gpa, (pfn, raw, text) in leaves.items():
        ram = gpa == 0x40001000
        assert raw & 3 == 0b11 and raw & (1 << 10)
        assert (raw >> 8) & 3 == 0b11
        assert raw & 0x0000_FFFF_FFFF_F000 == pfn << 12
        assert (raw >> 53) & 3 == 0b10
        assert (raw >> 6) & 3 == (0b11 if ram else 0b01)
        assert (raw >> 2) & 0xF == (0b1111 if ram else 0b0001)
        assert text.startswith(f"L3 PAGE OA={pfn << 12:#x} S2AP={'RW' if ram else 'R-'} ")
        assert ("MemAttr=0b1111(Normal-oWB-iWB)" if ram else
                "MemAttr=0b0001(Device-nGnRE)") in text


def test_show_stage2_x86_and_riscv_entries_bit_exact() -> None:
    """x86 EPT (``make_spte``, ``vmx_get_mt_mask``): R/W/X in bits 2:0 (X always
    for TDP), memory type in bits 5:3 WB (6) with IPAT (bit 6) for RAM and UC
    (0) without IPAT for host MMIO, A (bit 8) and, after the write, D (bit 9),
    address = pfn << 12; the read-only slot maps R-X.  RISC-V G-stage
    (``kvm_riscv_gstage_map_page``): V, R, W (not for the read-only slot), X, U,
    A and D set, PPN in bits 53:10."""
    code, out = run_text(SHOW, "--arch", "x86", "--show", "stage2")
    assert code == 0, out
    leaves = _leaf_lines(out)
    (pfn, raw, text) = leaves[0x40001000]
    assert raw & 7 == 0b111 and (raw >> 3) & 7 == 6 and raw & (1 << 6)
    assert raw & (1 << 8) and raw & (1 << 9)
    assert raw & 0x000F_FFFF_FFFF_F000 == pfn << 12
    assert "RWX MT=6(WB) IPAT=1 A=1 D=1" in text
    (pfn, raw, text) = leaves[0x50000000]
    assert raw & 7 == 0b101 and (raw >> 3) & 7 == 0 and not raw & (1 << 6)
    assert "R-X MT=0(UC) IPAT=0" in text
    code, out = run_text(SHOW, "--arch", "riscv", "--show", "stage2")
    assert code == 0, out
    for gpa, (pfn, raw, text) in _leaf_lines(out).items():
        ram = gpa == 0x40001000
        assert raw & 0xFF == (0b11011111 if ram else 0b11011011)  # D A - U X W R V
        assert raw >> 10 & ((1 << 44) - 1) == pfn
        assert text.startswith("L0 4K ") and ("VRWXU-AD" if ram else "VR-XU-AD") in text


def test_show_maps_mtree_and_proc_maps() -> None:
    """The guest physical map in ``info mtree`` style, each memslot marked KVM
    with its hva and flags; the host VMAs as /proc/PID/maps prints them
    (``show_map_vma``: offset 0 for anonymous memory, ``s`` for a shared
    mapping) with the smaps ``VmFlags`` mnemonics: the private RAM is accounted
    (``ac``), the remap_pfn_range mapping is ``pf io de dd`` (VM_PFNMAP | VM_IO |
    VM_DONTEXPAND | VM_DONTDUMP)."""
    code, out = run_text(SHOW, "--arch", "x86", "--show", "maps")
    assert code == 0, out
    assert "address-space: guest physical memory" in out
    slot0 = re.search(r"^  0000000040000000-000000004000ffff \(prio 0, ram\): slot0 KVM "
                      r"hva (0x[0-9a-f]+)$", out, re.M)
    slot1 = re.search(r"^  0000000050000000-0000000050003fff \(prio 0, ram\): slot1 KVM "
                      r"hva (0x[0-9a-f]+) readonly$", out, re.M)
    assert slot0 is not None and slot1 is not None, out
    assert "host mappings (/proc/PID/maps):" in out
    ram_hva, bar_hva = int(slot0[1], 16), int(slot1[1], 16)
    ram = re.search(rf"^  {ram_hva:012x}-{ram_hva + 0x10000:012x} rw-p 00000000 +"
                    r"\[(.*)\]$", out, re.M)
    bar = re.search(rf"^  {bar_hva:012x}-{bar_hva + 0x4000:012x} rw-s [0-9a-f]{{8,}} bar +"
                    r"\[(.*)\]$", out, re.M)
    assert ram is not None and bar is not None, out
    assert ram[1].split() == ["rd", "wr", "mr", "mw", "me", "ac"]
    assert {"rd", "wr", "sh", "mr", "mw", "me", "ms", "pf", "io", "de", "dd"} <= \
        set(bar[1].split())
    assert "ac" not in bar[1].split()


def test_show_stats_counters() -> None:
    """Counters named like KVM's binary stats: two faults taken and fixed (the
    RAM write, the device read), two 4K leaves, no MMIO exit, no EFAULT; the
    quickstart's write to the read-only VMA is one ``pf_efault`` and its access
    outside the slots one MMIO exit."""
    code, out = run_text(SHOW, "--arch", "arm64", "--show", "stats")
    assert code == 0, out

    def counters(text: str) -> dict[str, int]:
        body = text.split("counters:\n", 1)[1]
        return {m[1]: int(m[2]) for m in re.finditer(r"^  ([a-z0-9_]+) +(\d+)$", body, re.M)}

    stats = counters(out)
    assert {k: stats[k] for k in ("pf_taken", "pf_fixed", "pages_4k", "pages_2m",
                                  "mmio_exits", "pf_efault")} == \
        {"pf_taken": 2, "pf_fixed": 2, "pages_4k": 2, "pages_2m": 0, "mmio_exits": 0,
         "pf_efault": 0}
    code, out = run(QUICKSTART, "--arch", "arm64", "--show", "stats")
    stats = counters(out)
    assert (stats["pf_efault"], stats["mmio_exits"], stats["pages_4k"]) == (1, 1, 1)


def test_show_all_three_in_order() -> None:
    """``--show stage2,maps,stats`` prints the three sections after the table."""
    code, out = run_text(SHOW, "--arch", "riscv", "--show", "stage2,maps,stats")
    assert code == 0, out
    positions = [out.index(s) for s in ("show-all  arch=riscv", "stage-2 (riscv) leaves:",
                                        "address-space: guest physical memory", "counters:")]
    assert positions == sorted(positions)


# =====================================================================================
# Several architectures in one file
# =====================================================================================


def test_each_architecture_of_the_file_runs_in_turn() -> None:
    """``arch: [arm64, x86, riscv]``: without ``--arch`` each runs, in the file's
    order, with its own table (and JSON line); ``--arch`` picks some."""
    code, out = run_text(SHOW)
    assert code == 0, out
    titles = re.findall(r"show-all  arch=(\w+)  variant=upstream", out)
    assert titles == ["arm64", "x86", "riscv"]
    assert len(table_rows(out)) == 3 * 4
    code, out = run_text(SHOW, "--json")
    assert [o["arch"] for o in json_lines(out)] == ["arm64", "x86", "riscv"]
    code, out = run_text(SHOW, "--arch", "riscv,x86", "--json")
    assert code == 0
    assert [o["arch"] for o in json_lines(out)] == ["riscv", "x86"]


def test_exit_status_is_the_worst_run() -> None:
    """ro-vma-at-create.yaml on riscv: KVM_SET_USER_MEMORY_REGION refuses the
    writable slot over a read-only VMA with EPERM (``kvm_arch_prepare_memory_region``,
    riscv until v6.18), so the file's expectations fail there (exit 1) while
    x86 holds: with both, the status is the worst, 1."""
    path = str(SCENARIOS / "ro-vma-at-create.yaml")
    code, out = run(path, "--arch", "x86")
    assert code == 0, out
    code, out = run(path, "--arch", "riscv", "--json")
    assert code == 1
    (obj,) = json_lines(out)
    assert obj["setup"][0]["result"] == "error" and obj["setup"][0]["errno"] == "EPERM"
    code, _ = run(path, "--arch", "x86,riscv")
    assert code == 1


def test_show_stage2_decodes_device_memory_types() -> None:
    """``--show stage2`` names each leaf's frame kind and decodes the memory types of
    issue 14: a vfio-pci BAR Normal-NC (MemAttr 0b0101, v6.9), another driver's BAR
    Device-nGnRE (0b0001), Grace-style cacheable device memory Normal write-back in the
    FEAT_S2FWB encoding (0b0110) with FWB and DIC (v6.17)."""
    code, out = run(str(SCENARIOS / "vfio-bar-normal-nc.yaml"), "--show", "stage2")
    assert code == 0, out
    assert re.search(r"pfn 0x[0-9a-f]+ \(device\)  0x[0-9a-f]{16}  L3 PAGE .*"
                     r"MemAttr=0b0101\(Normal-oNC-iNC\)", out)
    assert "MemAttr=0b0001(Device-nGnRE)" in out
    code, out = run(str(SCENARIOS / "device-cacheable-fwb-dic.yaml"), "--show", "stage2")
    assert code == 0, out
    assert "leaves (FEAT_S2FWB encodings):" in out
    assert re.search(r"\(device, cacheable\)  0x[0-9a-f]{16}  L3 PAGE .* XN=0b00 .*"
                     r"MemAttr=0b0110\(Normal-WB \(FWB\)\)", out)
