"""The riscv64 encoder checked against capstone and the Debian cross assembler; the code
page's layout; ONE_REG ids."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from kvmmem.realkvm import riscv_code as r

capstone = pytest.importorskip("capstone", reason="capstone (the test extra) is not installed")

CASES: list[tuple[int, str, str, str]] = [
    # (word, capstone mnemonic, capstone operands, GNU as source)
    (r.load(1, r.A1, r.A0), "lbu", "a1, 0(a0)", "lbu a1, 0(a0)"),
    (r.load(2, r.A1, r.A0), "lhu", "a1, 0(a0)", "lhu a1, 0(a0)"),
    (r.load(4, r.A1, r.A0), "lwu", "a1, 0(a0)", "lwu a1, 0(a0)"),
    (r.load(8, r.A1, r.A0), "ld", "a1, 0(a0)", "ld a1, 0(a0)"),
    (r.load(8, r.T6, r.SP, -2048), "ld", "t6, -0x800(sp)", "ld t6, -2048(sp)"),
    (r.load(1, r.S1, r.T2, 2047), "lbu", "s1, 0x7ff(t2)", "lbu s1, 2047(t2)"),
    (r.store(1, r.A1, r.A0), "sb", "a1, 0(a0)", "sb a1, 0(a0)"),
    (r.store(2, r.A1, r.A0), "sh", "a1, 0(a0)", "sh a1, 0(a0)"),
    (r.store(4, r.A1, r.A0), "sw", "a1, 0(a0)", "sw a1, 0(a0)"),
    (r.store(8, r.A1, r.A2), "sd", "a1, 0(a2)", "sd a1, 0(a2)"),
    (r.store(8, r.T5, r.S11, 8), "sd", "t5, 8(s11)", "sd t5, 8(s11)"),
    (r.store(8, r.RA, r.SP, -8), "sd", "ra, -8(sp)", "sd ra, -8(sp)"),
    (r.store(4, r.T0, r.GP, 2047), "sw", "t0, 0x7ff(gp)", "sw t0, 2047(gp)"),
    (r.jal(r.ZERO, 0), "j", "0", "jal zero, ."),
    (r.jal(r.RA, -2048), "jal", "-0x800", "jal ra, .-2048"),
    (r.jal(r.ZERO, 0x7FFFE), "j", "0x7fffe", "jal zero, .+0x7fffe"),
    (r.bne(r.A3, r.ZERO, -12), "bnez", "a3, -0xc", "bne a3, zero, .-12"),
    (r.bne(r.A0, r.A1, 4094), "bne", "a0, a1, 0xffe", "bne a0, a1, .+4094"),
    (r.addi(r.A3, r.A3, -1), "addi", "a3, a3, -1", "addi a3, a3, -1"),
    (r.add(r.A0, r.A0, r.A4), "add", "a0, a0, a4", "add a0, a0, a4"),
    (r.csrrs(r.T5, r.CSR_SCAUSE), "csrr", "t5, scause", "csrrs t5, scause, zero"),
    (r.csrrs(r.T5, r.CSR_STVAL), "csrr", "t5, stval", "csrrs t5, stval, zero"),
    (r.csrrs(r.A0, r.CSR_SATP, r.A1), "csrrs", "a0, satp, a1", "csrrs a0, satp, a1"),
    (r.ebreak(), "ebreak", "", "ebreak"),
]


def _disasm(word: int) -> tuple[str, str]:
    md = capstone.Cs(capstone.CS_ARCH_RISCV, capstone.CS_MODE_RISCV64)
    insns = list(md.disasm(struct.pack("<I", word), 0x1000))
    assert len(insns) == 1, f"{word:#010x} does not decode"
    return insns[0].mnemonic, insns[0].op_str


@pytest.mark.parametrize(("word", "mnemonic", "operands", "source"), CASES,
                         ids=[c[3] for c in CASES])
def test_encoding_matches_capstone(word: int, mnemonic: str, operands: str,
                                   source: str) -> None:
    assert _disasm(word) == (mnemonic, operands)


@pytest.fixture(scope="module")
def gnu_words(tmp_path_factory: pytest.TempPathFactory) -> list[int]:
    """Every case's source assembled by riscv64-linux-gnu-as (no compressed forms, no
    relaxation: branch offsets are resolved by the assembler), one word each."""
    as_ = shutil.which("riscv64-linux-gnu-as")
    objcopy = shutil.which("riscv64-linux-gnu-objcopy")
    if as_ is None or objcopy is None:
        pytest.skip("riscv64-linux-gnu-as/objcopy absent (Debian binutils-riscv64-linux-gnu)")
    tmp: Path = tmp_path_factory.mktemp("as")
    src = tmp / "t.s"
    src.write_text(".option norvc\n.option norelax\n.text\n"
                   + "".join(f"{c[3]}\n" for c in CASES))
    subprocess.run([as_, "-march=rv64i_zicsr", "-o", str(tmp / "t.o"), str(src)], check=True)
    subprocess.run([objcopy, "-O", "binary", "-j", ".text", str(tmp / "t.o"),
                    str(tmp / "t.bin")], check=True)
    raw = (tmp / "t.bin").read_bytes()
    return [w for (w,) in struct.iter_unpack("<I", raw)]


def test_encodings_match_the_cross_assembler(gnu_words: list[int]) -> None:
    assert len(gnu_words) == len(CASES)
    for (word, _, _, source), gnu in zip(CASES, gnu_words, strict=True):
        assert word == gnu, f"{source}: ours {word:#010x}, as {gnu:#010x}"


@pytest.mark.parametrize("bad", [
    lambda: r.load(3, 1, 2), lambda: r.store(16, 1, 2), lambda: r.load(1, 1, 2, 2048),
    lambda: r.store(1, 1, 2, -2049), lambda: r.jal(0, 1), lambda: r.jal(0, 1 << 20),
    lambda: r.bne(1, 2, 4096), lambda: r.addi(32, 0, 0), lambda: r.csrrs(1, 0x1000),
    lambda: r.x_reg_id(0), lambda: r.csr_reg_id("mstatus"),
])
def test_encoder_rejects_what_the_instruction_cannot_hold(bad: object) -> None:
    with pytest.raises(ValueError):
        bad()  # type: ignore[operator]


def test_program_layout_every_word_decodes() -> None:
    prog = r.assemble()
    assert len(prog.code) == r.CODE_SIZE
    md = capstone.Cs(capstone.CS_ARCH_RISCV, capstone.CS_MODE_RISCV64)
    insns = list(md.disasm(prog.code, 0))
    assert len(insns) == r.CODE_SIZE // 4 and all(i.size == 4 for i in insns)
    text = {i.address: f"{i.mnemonic} {i.op_str}".strip() for i in insns}
    for size in (1, 2, 4, 8):
        start = prog.entries[f"read{size}"]
        load = {1: "lbu", 2: "lhu", 4: "lwu", 8: "ld"}[size]
        assert [text[start + 4 * k] for k in range(3)] == [
            f"{load} a1, 0(a0)", "sd a1, 0(a2)", "j 0"]
        start = prog.entries[f"write{size}"]
        store = {1: "sb", 2: "sh", 4: "sw", 8: "sd"}[size]
        assert [text[start + 4 * k] for k in range(3)] == [
            f"{store} a1, 0(a0)", "sd a1, 0(a2)", "j 0"]
    trap = prog.entries["trap"]
    assert trap % 4 == 0
    assert [text[trap + 4 * k] for k in range(5)] == [
        "csrr t5, scause", "sd t5, 0(s11)", "csrr t5, stval", "sd t5, 8(s11)", "j 0"]
    t = prog.entries["touch_read"]
    assert [text[t + 4 * k] for k in range(4)] == [
        "lbu a1, 0(a0)", "add a0, a0, a4", "addi a3, a3, -1", "bnez a3, -0xc"]


def test_one_reg_ids() -> None:
    # arch/riscv/include/uapi/asm/kvm.h: KVM_REG_RISCV | KVM_REG_SIZE_U64 | CORE | index
    assert r.REG_PC == 0x8030_0000_0200_0000
    assert r.x_reg_id(r.A0) == 0x8030_0000_0200_000A
    assert r.REG_MODE == 0x8030_0000_0200_0020
    assert r.csr_reg_id("stvec") == 0x8030_0000_0300_0002
    assert r.csr_reg_id("satp") == 0x8030_0000_0300_0008


def test_describe_cause() -> None:
    assert r.describe_cause(2) == "illegal instruction"
    assert r.describe_cause(12) == "instruction page fault"
    assert r.describe_cause(99) == "cause 99"
    assert r.describe_cause(1 << 63 | 5) == "interrupt 5"
    assert r.is_fetch_fault(1) and not r.is_fetch_fault(13)
