"""The entry printer: hex plus decoded fields, per architecture (field names
as in the Arm ARM, the Intel SDM EPT tables and the RISC-V privileged spec)."""

from __future__ import annotations

import pytest

from kvmmem.arch import PERM_RW, PERM_RX, MemAttr, make_stage2
from kvmmem.arch.printer import decode_entry, dump_stage2, format_entry, format_walk
from kvmmem.errors import InputError

K4, M2 = 4096, 2 << 20


def test_arm64_entry_printed_with_stage2_fields() -> None:
    s2 = make_stage2("arm64")
    assert format_entry(s2, 0x0040_0000_4000_07FF, 3) == (
        "0x00400000400007ff  L3 PAGE OA=0x40000000 S2AP=RW XN=0b10 AF=1 SH=ISH "
        "MemAttr=0b1111(Normal-oWB-iWB)")
    assert decode_entry("arm64", 0x0040_0000_C000_07C5, 1) == (
        "L1 BLOCK OA=0xc0000000 S2AP=RW XN=0b10 AF=1 SH=ISH MemAttr=0b0001(Device-nGnRE)")
    assert decode_entry("arm64", 0x18, 3, fwb=True) == "invalid"
    assert "Normal-WB (FWB)" in decode_entry("arm64", 0x75B, 3, fwb=True)
    assert decode_entry("arm64", 0x2000_0000_3003, 1) == "L1 TABLE next=0x200000003000"


def test_x86_entry_printed_with_ept_fields_and_kvm_software_bits() -> None:
    assert decode_entry("x86", 0x8600_0000_4000_0B77, 1) == (
        "PTE 4K PA=0x40000000 RWX MT=6(WB) IPAT=1 A=1 D=1 MMU-present Host-writable "
        "MMU-writable SVE")
    assert decode_entry("x86", 0x8000_0000_0000_0000, 1) == "not-present SVE"
    assert decode_entry("x86", 0x8000_2000_0000_1907, 4) == (
        "PML4E TABLE next=0x200000001000 RWX A=1 MMU-present SVE")
    assert decode_entry("x86", 0x8600_0000_C000_0B83, 3).startswith("PDPTE 1G PA=0xc0000000 RW-")


def test_riscv_entry_printed_with_pte_flags_and_pbmt() -> None:
    assert decode_entry("riscv", 0x2008_00DF, 0) == "L0 4K PA=0x80200000 VRWXU-AD PBMT=0(PMA)"
    assert decode_entry("riscv", 0x4000_0000_3000_00D7, 2) == (
        "L2 1G PA=0xc0000000 VRW-U-AD PBMT=2(IO)")
    assert decode_entry("riscv", 0x0800_0000_1001, 2) == "L2 TABLE next=0x200000004000"
    with pytest.raises(InputError):
        decode_entry("mips", 0, 0)


@pytest.mark.parametrize("arch", ["arm64", "x86", "riscv"])
def test_walk_and_dump(arch: str) -> None:
    s2 = make_stage2(arch)
    s2.map(M2, 0x200, M2, PERM_RX, MemAttr.DEVICE)
    for i in range(3):
        s2.map(i * K4, 0x10 + i, K4, PERM_RW)
    walk = format_walk(s2, K4)
    assert len(walk) == s2.nlevels
    leaf = s2.walk(K4)
    assert leaf is not None and f"  {leaf.raw:#018x}  " in walk[-1]
    dump = dump_stage2(s2)
    leaves = dump_stage2(s2, leaves_only=True)
    assert len(leaves) == 4
    assert leaves[0].lstrip().startswith("0x000000000000-0x000000000fff")
    assert len(dump) > len(leaves)
    short = dump_stage2(s2, limit=2)
    assert short[-1].startswith("...") and len(short) == 3
