"""``vfio-bar`` mappings on real kernels: the second ivshmem-plain device of each machine,
bound to vfio-pci behind the emulated IOMMU (arm64 SMMUv3, x86 VT-d), its BAR mmapped
from the device fd and put under a memslot.  What the CI machines answered when this
source was written (docs/conformance.md, "The vfio-bar source"); skipped where the
machine is not fetched."""

from __future__ import annotations

from typing import Any

import pytest

G = 0x4000_0000
M = 1 << 20


def _program(arch: str) -> dict[str, Any]:
    steps: list[dict[str, Any]] = [
        {"op": "guest_read", "gpa": G + 0x5000, "size": 8, "count_faults": True},
        {"op": "host_write", "memory": "bar", "offset": 0x1000, "size": 8,
         "value": 0x1122334455667788},
        {"op": "guest_read", "gpa": G + 0x1000, "size": 8, "count_faults": True},
        {"op": "guest_read", "gpa": G + 0x1FF000, "size": 4, "count_faults": True},
        {"op": "guest_read", "gpa": G + 0x200000, "size": 4, "count_faults": True},
        {"op": "guest_write", "gpa": G + 0x5000, "size": 8, "value": 0xABCDEF},
        {"op": "host_read", "memory": "bar", "offset": 0x5000, "size": 8},
    ]
    return {"scenario": f"vfio-bar-{arch}", "arch": arch, "path": "native", "timeout": 10.0,
            "ipa_bits": None, "reserved_gpas": [[G, 4 * M]], "reserved_slots": [0],
            "needs": [],
            "memory": [{"name": "bar", "size": 4 * M, "kind": "vfio-bar", "prot": 3,
                        "fill": None, "at": None}],
            "memslots": [{"index": 0, "op": "set_memslot", "slot": 0, "gpa": G, "size": 4 * M,
                          "memory": "bar", "offset": 0, "flags": 0}],
            "steps": [{"index": i, **s} for i, s in enumerate(steps)],
            "x86_code": _x86_code() if arch == "x86" else None}


def _x86_code() -> dict[str, Any]:
    from kvmmem.realkvm.x86_code import code_blob  # the host encodes the x86 guest code
    return code_blob()


@pytest.mark.parametrize(("arch", "version"), [("arm64", "7.3"), ("x86", "7.3")])
def test_a_vfio_bar_under_a_memslot(arch: str, version: str, machines: Any) -> None:
    """The guest and the host see each other's stores through the BAR; one stage-2
    (NPT) fault maps a whole 2 MiB block (the host's PMD leaf from vfio's huge_fault,
    v6.12).  Twice in one boot: the second run reopens the group (the first closed every
    fd) and its slice reads zero again."""
    machine = machines.get(arch, version)
    for _ in range(2):
        run = machine.request("run", program=_program(arch), timeout=120)
        assert run["supported"], run["reason"]
        assert run["setup"] == [{"memory": "bar", "result": "ok"},
                                {"memslot": 0, "result": "ok"}]
        got = [{k: v for k, v in s.items() if k not in ("step", "op")} for s in run["steps"]]
        faults = [{"faults": 1}, {"faults": 0}, {"faults": 0}, {"faults": 1}]
        assert got == [
            {"result": "ok", "value": 0, **faults[0]},
            {"result": "ok"},
            {"result": "ok", "value": 0x1122334455667788, **faults[1]},
            {"result": "ok", "value": 0, **faults[2]},
            {"result": "ok", "value": 0, **faults[3]},
            {"result": "ok"},
            {"result": "ok", "value": 0xABCDEF},
        ]


def test_riscv_has_no_vfio_bar(machines: Any) -> None:
    """QEMU 7.2 emulates no IOMMU for riscv and Debian builds no CONFIG_VFIO_NOIOMMU:
    vfio-pci's probe refuses the device, and the run says so."""
    run = machines.get("riscv", "7.2").request("run", program=_program("riscv"), timeout=120)
    assert not run["supported"]
    assert run["reason"].startswith("vfio-bar: 0000:00:10.0 has no IOMMU group")
    assert "CONFIG_VFIO_NOIOMMU" in run["reason"]
