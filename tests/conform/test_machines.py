"""Conformance on real kernels of every architecture: the machines CI fetches (arm64
7.3, riscv 7.2, x86 7.3 with TDP; ``kvmmem machine fetch``), each booted once per
session.

* Every bundled scenario that names the machine's architecture agrees with the model
  (``kvmmem conform --arch A --kernel V``), or is unsupported for a reason listed in
  ``MACHINE_UNSUPPORTED`` with its justification.
* The random differential test (strategies.py, as test_differential_kvm.py does on
  this host) runs on arm64 7.3 and riscv 7.2: 100 sequences each (``--long``: 1000),
  no difference.

``KVMMEM_MACHINES=all`` (every machine of the catalog) or a list such as
``KVMMEM_MACHINES=arm64-6.12,riscv-6.12`` runs both tests on those machines instead.
Skipped with the reason where a machine is not fetched or QEMU is missing.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings

from kvmmem.conform import MachineTarget, conform_scenario, tap_lines
from kvmmem.scenario import load_scenario, load_scenario_text

from .conftest import long_run
from .strategies import scenarios

SCENARIOS = Path(__file__).resolve().parents[2] / "scenarios"

CI_MACHINES = (("arm64", "7.3"), ("riscv", "7.2"), ("x86", "7.3"))


def _chosen() -> tuple[tuple[str, str], ...]:
    wanted = os.environ.get("KVMMEM_MACHINES", "")
    if not wanted:
        return CI_MACHINES
    from kvmmem.machine import machines
    if wanted == "all":
        return tuple((m.arch, m.version) for m in machines())
    return tuple(tuple(name.split("-", 1)) for name in wanted.split(","))  # type: ignore[misc]


MACHINES = _chosen()
DIFFERENTIAL = MACHINES if os.environ.get("KVMMEM_MACHINES") else CI_MACHINES[:2]

MACHINE_UNSUPPORTED: dict[str, str] = {
    r"has threads; real-KVM runs are sequential":
        "a concurrent scenario is for kvmmem explore",
    r"^variant [\w.+-]+: the real kernel is [\w.-]+$":
        "a scenario about another kernel's behaviour (variant)",
    r"the emulated access path exists only on this host":
        "the emulated path is this host's PVM instruction emulator",
    r"no VM_PFNMAP source (on this host|inside the machine) inserts (device )?frames lazily":
        "device-lazy: no source inside the machines behaves as the kind describes",
    r"KVM_CAP_VM_TYPES":
        "vm_type sw_protected: Debian's x86 kernels lack CONFIG_KVM_SW_PROTECTED_VM",
    r"declares cpu_features fwb and dic; this CPU lacks them":
        "QEMU's -cpu max has no FWB/DIC: v6.17+ refuses a cacheable VM_PFNMAP slot there",
    r"this kernel maps a .* without VM_PFNMAP":
        "dmabuf: 5.10's DRM shmem mmap is VM_MIXEDMAP, not VM_PFNMAP",
    r"KVM_CAP_(USER_MEMORY2|GUEST_MEMFD|GUEST_MEMFD_FLAGS) is 0(x[0-9a-f]+)? ":
        "guest_memfd: the kernel or its default VM type has none (before v6.8; x86 6.12's "
        "default VM; riscv) or lacks a flag (mmap, init_shared: v6.18)",
    r"host source cannot make a vfio-bar mapping|no vfio-pci device to map a BAR of":
        "vfio-bar: the machine has no PCI device bound to vfio-pci for the BAR",
    r"^vfio-bar: 0000:00:10\.0 has no IOMMU group .* CONFIG_VFIO_NOIOMMU":
        "vfio-bar on riscv: QEMU 7.2 emulates no riscv IOMMU and Debian builds no "
        "CONFIG_VFIO_NOIOMMU, so vfio-pci refuses the device (docs/conformance.md)",
    r"^vfio-bar: .*no vfio modules were found to load":
        "vfio-bar: the machine's vfio archive is not fetched (kvmmem machine fetch)",
    r"device-cacheable needs coherent device memory":
        "device-cacheable: Grace-style coherent device memory exists on no machine",
    r"this CPU has no MTE|does not offer KVM_CAP_ARM_MTE":
        "mte: a machine booted without mte=on, or a kernel before v5.14",
    r"^page_size \d+K: machine [\w.-]+ runs a kernel built with \d+K pages$":
        "a scenario pinned to another host page size (16K ones run on arm64-7.3-16k; no "
        "machine has 64K pages)",
    r"dirty_ring: KVM_ENABLE_CAP of KVM_CAP_DIRTY_LOG_RING\w* \(4096 bytes\) failed with "
    r"EINVAL":
        "a 4 KiB dirty ring on a 16 KiB-page kernel: below PAGE_SIZE, EINVAL (the model "
        "refuses it too)",
}
"""Reasons a scenario may be unsupported on a machine (regex -> justification)."""


def _files(arch: str) -> list[str]:
    return [p.name for p in sorted(SCENARIOS.glob("*.yaml"))
            if arch in load_scenario(p).arches]


@pytest.mark.parametrize(("arch", "version"), MACHINES, ids=[f"{a}-{v}" for a, v in MACHINES])
def test_bundled_scenarios_agree(arch: str, version: str, machines: Any) -> None:
    """Every bundled scenario naming ``arch``: agree, or unsupported for a listed reason."""
    target = MachineTarget(machines.get(arch, version))
    bad = []
    for name in _files(arch):
        result = conform_scenario(load_scenario(SCENARIOS / name), target=target)
        if result.verdict == "differ" or result.violations:
            bad.append("\n".join(tap_lines([result])))
        elif result.verdict == "unsupported" and not any(
                re.search(pattern, result.reason) for pattern in MACHINE_UNSUPPORTED):
            bad.append(f"{name}: unsupported for an unlisted reason: {result.reason}")
    assert bad == [], "\n".join(bad)


@pytest.mark.parametrize(("arch", "version"), DIFFERENTIAL,
                         ids=[f"{a}-{v}" for a, v in DIFFERENTIAL])
def test_random_sequences_agree(arch: str, version: str, machines: Any,
                                request: pytest.FixtureRequest) -> None:
    """hva_to_pfn / the stage-2 fault path / MMU notifiers / kvm_set_memory_region of a
    real arm64 or riscv kernel: every random sequence gives the model's outcomes."""
    target = MachineTarget(machines.get(arch, version))
    examples = 1000 if long_run(request.config) else 100

    @settings(max_examples=examples, deadline=None)
    @given(scenarios(arch, emulated=False))
    def run(text: str) -> None:
        result = conform_scenario(load_scenario_text(text, "differential.yaml"), target=target)
        assert result.verdict != "unsupported", result.reason
        assert result.violations == [], "\n" + text + "\n".join(tap_lines([result]))
        assert result.differences == [], "\n" + text + "\n".join(tap_lines([result]))

    run()


GMEM = """\
kvmmem: 1
name: gmem-machine
arch: [x86, arm64, riscv]
memory:
  g: {size: 128K, kind: guest_memfd, prot: rw, gmem_flags: [mmap, init_shared]}
  g2: {size: 64K, kind: guest_memfd, prot: rw, gmem_flags: [mmap, init_shared]}
memslots:
  - {slot: 0, gpa: 0x40000000, size: 128K, memory: g, guest_memfd: g, flags: [guest_memfd]}
steps:
  - guest_write: {gpa: 0x40010000, size: 8, value: 0x1122334455667788}
  - host_read: {memory: g, offset: 0x10000, size: 8}
  - host_write: {memory: g, offset: 0, size: 8, value: 0xabcdef}
  - guest_read: {gpa: 0x40000000, size: 8}
  - punch_hole: {memory: g, offset: 0x10000, size: 0x10000}
  - guest_read: {gpa: 0x40010000, size: 8}
  - host_read: {memory: g, offset: 0x10000, size: 8}
  - set_memslot: {slot: 1, gpa: 0x40100000, size: 64K, memory: g, guest_memfd: g,
                  flags: [guest_memfd]}
  - set_memslot: {slot: 2, gpa: 0x40200000, size: 64K, memory: g2, guest_memfd: g2,
                  flags: [guest_memfd, readonly]}
  - set_memslot: {slot: 3, gpa: 0x40300000, size: 64K, memory: g2, flags: [guest_memfd]}
"""
"""A gmem-only slot over a shared, mmapped guest_memfd (64K-aligned: every granule)."""


@pytest.mark.parametrize(("arch", "version"), MACHINES, ids=[f"{a}-{v}" for a, v in MACHINES])
def test_guest_memfd_on_machines(arch: str, version: str, machines: Any) -> None:
    """guest_memfd on the real kernel (the KVM side alone, whatever the model says): the
    guest and the host mapping see each other's stores, a punched page reads 0 from both,
    a second binding of a bound range is EEXIST (kvm_gmem_bind), readonly is refused
    (EINVAL) and the flag without a file is EBADF.  Skipped with the capability named
    where the machine's default VM has no guest_memfd."""
    target = MachineTarget(machines.get(arch, version))
    scenario = load_scenario_text(GMEM, "gmem-machine.yaml")
    run = target.run(target.program(scenario, "native", None))
    if not run.supported:
        assert re.search(r"KVM_CAP_(USER_MEMORY2|GUEST_MEMFD|GUEST_MEMFD_FLAGS) is", run.reason)
        pytest.skip(f"{target.name}: {run.reason}")
    assert [s["result"] for s in run.setup] == ["ok", "ok", "ok"]
    got = [{k: v for k, v in s.items() if k not in ("step", "op")} for s in run.steps]
    assert got == [
        {"result": "ok"},
        {"result": "ok", "value": 0x1122334455667788},
        {"result": "ok"},
        {"result": "ok", "value": 0xabcdef},
        {"result": "ok"},
        {"result": "ok", "value": 0},
        {"result": "ok", "value": 0},
        {"result": "error", "errno": "EEXIST"},
        {"result": "error", "errno": "EINVAL"},
        {"result": "error", "errno": "EBADF"},
    ]


# --- the command line ---------------------------------------------------------------


def test_cli_conform_on_a_machine() -> None:
    """``kvmmem conform FILE --arch arm64 --kernel 7.3 --json``: the verdicts carry the
    machine and its kernel release; the TAP report names them too."""
    import json

    from typer.testing import CliRunner

    from kvmmem.cli import app
    from kvmmem.machine import MachineUnavailable, get_machine, load_manifest

    if load_manifest(get_machine("arm64", "7.3")) is None:
        pytest.skip("machine arm64-7.3 not fetched: run kvmmem machine fetch arm64 7.3")
    try:
        from kvmmem.machine.qemu import require_qemu
        require_qemu(get_machine("arm64", "7.3"))
    except MachineUnavailable as exc:
        pytest.skip(str(exc))
    files = [str(SCENARIOS / "quickstart.yaml"), str(SCENARIOS / "slot-edge-crossing-x86.yaml")]
    res = CliRunner().invoke(app, ["conform", *files, "--arch", "arm64", "--kernel", "7.3",
                                   "--json"])
    assert res.exit_code == 0, res.output
    results = json.loads(res.stdout)["results"]
    assert [r["verdict"] for r in results] == ["agree", "unsupported"]
    assert {r["machine"] for r in results} == {"arm64-7.3"}
    assert results[0]["kernel"].startswith("7.3")
    assert results[1]["reason"] == "arch x86 only: machine arm64-7.3 is arm64"


@pytest.mark.parametrize(("args", "code", "message"), [
    (["--arch", "arm64"], 2, "give --kernel VERSION to run on an arm64 machine"),
    (["--arch", "sparc"], 2, "--arch: unknown arch 'sparc'"),
    (["--matrix", "--arch", "x86"], 2, "--matrix runs every fetched machine"),
    (["--arch", "arm64", "--kernel", "9.9"], 2, "9.9"),
])
def test_cli_bad_machine_arguments(args: list[str], code: int, message: str) -> None:
    """Bad --arch/--kernel/--matrix combinations: one line, exit 2, nothing booted."""
    from typer.testing import CliRunner

    from kvmmem.cli import app

    res = CliRunner().invoke(app, ["conform", str(SCENARIOS / "quickstart.yaml"), *args])
    assert res.exit_code == code, res.output
    assert message in res.output
    assert "Traceback" not in res.output


def test_cli_machine_not_fetched_is_skipped(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine that is not in the cache: one line naming the fetch command, exit 4;
    ``--matrix`` with nothing fetched: the same."""
    from typer.testing import CliRunner

    from kvmmem.cli import app

    monkeypatch.setenv("KVMMEM_CACHE_DIR", str(tmp_path))
    quick = str(SCENARIOS / "quickstart.yaml")
    res = CliRunner().invoke(app, ["conform", quick, "--arch", "riscv", "--kernel", "7.2"])
    assert res.exit_code == 4, res.output
    assert "kvmmem machine fetch riscv 7.2" in res.output
    res = CliRunner().invoke(app, ["conform", quick, "--matrix"])
    assert res.exit_code == 4, res.output
    assert "no machine is fetched" in res.output


def test_cli_matrix(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--matrix``: one column per fetched machine (here arm64 7.3 alone), a row per
    scenario with its verdict, ``n/a`` for a scenario of another architecture, and the
    totals; ``--json`` gives one results list per machine."""
    import json

    from rich.console import Console
    from typer.testing import CliRunner

    import kvmmem.machine
    from kvmmem.cli import app
    from kvmmem.conform import Conformance, matrix_table
    from kvmmem.machine import get_machine, load_manifest

    spec = get_machine("arm64", "7.3")
    if load_manifest(spec) is None:
        pytest.skip("machine arm64-7.3 not fetched: run kvmmem machine fetch arm64 7.3")
    monkeypatch.setattr(kvmmem.machine, "fetched_machines", lambda root=None: [spec])
    files = [SCENARIOS / "quickstart.yaml", SCENARIOS / "slot-edge-crossing-x86.yaml"]
    res = CliRunner().invoke(app, ["conform", *map(str, files), "--matrix", "--json"])
    assert res.exit_code == 0, res.output
    matrix = json.loads(res.stdout)["matrix"]
    assert [m["machine"] for m in matrix] == ["arm64-7.3"]
    results = matrix[0]["results"]
    assert [r["verdict"] for r in results] == ["agree", "unsupported"]
    column = [Conformance(r["scenario"], r["source"], r["path"], r["verdict"], r["reason"])
              for r in results]
    console = Console(width=160, record=True)
    console.print(matrix_table([load_scenario(f) for f in files],
                               [("arm64-7.3", matrix[0]["kernel"], column)]))
    lines = console.export_text().splitlines()
    assert any("ro-vma-after-create" in line and " ok " in line for line in lines)
    assert any("slot-edge-crossing-x86" in line and "\u00b7" in line for line in lines)
    assert any("1/0/1" in line for line in lines)
