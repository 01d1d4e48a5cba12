"""The arm64 encoder checked against capstone and the Debian cross assembler; the code
page's layout; the stage-1 identity map."""

from __future__ import annotations

import ctypes
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from kvmmem.realkvm import arm64_code as a

capstone = pytest.importorskip("capstone", reason="capstone (the test extra) is not installed")

BASE = 0x1000
"""Address the disassembler places each instruction at (capstone prints absolute
branch targets)."""

CASES: list[tuple[int, str, str, str]] = [
    # (word, capstone mnemonic, capstone operands, GNU as source)
    (a.ldr(1, 1, 0), "ldrb", "w1, [x0]", "ldrb w1, [x0]"),
    (a.ldr(2, 1, 0), "ldrh", "w1, [x0]", "ldrh w1, [x0]"),
    (a.ldr(4, 1, 0), "ldr", "w1, [x0]", "ldr w1, [x0]"),
    (a.ldr(8, 1, 0), "ldr", "x1, [x0]", "ldr x1, [x0]"),
    (a.ldr(8, 5, 30, 8 * 4095), "ldr", "x5, [x30, #0x7ff8]", "ldr x5, [x30, #32760]"),
    (a.ldr(2, 7, a.SP, 2), "ldrh", "w7, [sp, #2]", "ldrh w7, [sp, #2]"),
    (a.ldr(1, 30, 29, 4095), "ldrb", "w30, [x29, #0xfff]", "ldrb w30, [x29, #4095]"),
    (a.str_(1, 1, 0), "strb", "w1, [x0]", "strb w1, [x0]"),
    (a.str_(2, 1, 0), "strh", "w1, [x0]", "strh w1, [x0]"),
    (a.str_(4, 1, 0), "str", "w1, [x0]", "str w1, [x0]"),
    (a.str_(8, 1, 0), "str", "x1, [x0]", "str x1, [x0]"),
    (a.str_(8, 1, 2), "str", "x1, [x2]", "str x1, [x2]"),
    (a.str_(8, 27, 28, 8), "str", "x27, [x28, #8]", "str x27, [x28, #8]"),
    (a.str_(4, a.XZR, 3, 4), "str", "wzr, [x3, #4]", "str wzr, [x3, #4]"),
    (a.b(0), "b", f"#{BASE:#x}", "b ."),
    (a.b(-8), "b", f"#{BASE - 8:#x}", "b .-8"),
    (a.b(0x400), "b", f"#{BASE + 0x400:#x}", "b .+0x400"),
    (a.cbnz(3, -12), "cbnz", f"x3, #{BASE - 12:#x}", "cbnz x3, .-12"),
    (a.add_reg(0, 0, 4), "add", "x0, x0, x4", "add x0, x0, x4"),
    (a.add_imm(5, 6, 4095), "add", "x5, x6, #0xfff", "add x5, x6, #4095"),
    (a.sub_imm(3, 3, 1), "sub", "x3, x3, #1", "sub x3, x3, #1"),
    (a.subs_imm(3, 3, 1), "subs", "x3, x3, #1", "subs x3, x3, #1"),
    (a.mrs(27, a.ESR_EL1), "mrs", "x27, esr_el1", "mrs x27, esr_el1"),
    (a.mrs(27, a.FAR_EL1), "mrs", "x27, far_el1", "mrs x27, far_el1"),
    (a.mrs(0, a.SCTLR_EL1), "mrs", "x0, sctlr_el1", "mrs x0, sctlr_el1"),
    (a.mrs(0, a.VBAR_EL1), "mrs", "x0, vbar_el1", "mrs x0, vbar_el1"),
    (a.brk(0), "brk", "#0", "brk #0"),
    (a.brk(0x1234), "brk", "#0x1234", "brk #0x1234"),
    (a.nop(), "nop", "", "nop"),
]


def _target(address: int) -> str:
    """A branch target as capstone prints it (decimal below 10, else hex)."""
    return f"#{address}" if address < 10 else f"#{address:#x}"


def _disasm(word: int) -> tuple[str, str]:
    md = capstone.Cs(capstone.CS_ARCH_ARM64, capstone.CS_MODE_ARM)
    insns = list(md.disasm(struct.pack("<I", word), BASE))
    assert len(insns) == 1, f"{word:#010x} does not decode"
    return insns[0].mnemonic, insns[0].op_str


@pytest.mark.parametrize(("word", "mnemonic", "operands", "source"), CASES,
                         ids=[c[3] for c in CASES])
def test_encoding_matches_capstone(word: int, mnemonic: str, operands: str,
                                   source: str) -> None:
    assert _disasm(word) == (mnemonic, operands)


@pytest.fixture(scope="module")
def gnu_words(tmp_path_factory: pytest.TempPathFactory) -> list[int]:
    """Every case's source assembled by aarch64-linux-gnu-as, one word each."""
    as_, objcopy = shutil.which("aarch64-linux-gnu-as"), shutil.which("aarch64-linux-gnu-objcopy")
    if as_ is None or objcopy is None:
        pytest.skip("aarch64-linux-gnu-as/objcopy absent (Debian binutils-aarch64-linux-gnu)")
    tmp: Path = tmp_path_factory.mktemp("as")
    src = tmp / "t.s"
    src.write_text(".text\n" + "".join(f"{c[3]}\n" for c in CASES))
    subprocess.run([as_, "-o", str(tmp / "t.o"), str(src)], check=True)
    subprocess.run([objcopy, "-O", "binary", "-j", ".text", str(tmp / "t.o"),
                    str(tmp / "t.bin")], check=True)
    raw = (tmp / "t.bin").read_bytes()
    return [w for (w,) in struct.iter_unpack("<I", raw)]


def test_encodings_match_the_cross_assembler(gnu_words: list[int]) -> None:
    assert len(gnu_words) == len(CASES)
    for (word, _, _, source), gnu in zip(CASES, gnu_words, strict=True):
        assert word == gnu, f"{source}: ours {word:#010x}, as {gnu:#010x}"


@pytest.mark.parametrize("bad", [
    lambda: a.ldr(3, 1, 0), lambda: a.str_(16, 1, 0), lambda: a.ldr(8, 1, 0, 4),
    lambda: a.ldr(1, 1, 0, 4096), lambda: a.ldr(8, 32, 0), lambda: a.b(2),
    lambda: a.b(1 << 27), lambda: a.cbnz(0, 1 << 20), lambda: a.add_imm(0, 0, 4096),
    lambda: a.brk(1 << 16), lambda: a.x_reg_id(31),
])
def test_encoder_rejects_what_the_instruction_cannot_hold(bad: object) -> None:
    with pytest.raises(ValueError):
        bad()  # type: ignore[operator]


def test_program_layout_every_word_decodes() -> None:
    prog = a.assemble()
    assert len(prog.code) == a.CODE_SIZE
    assert prog.entries["vectors"] == 0x800 and prog.entries["vectors"] % 0x800 == 0
    md = capstone.Cs(capstone.CS_ARCH_ARM64, capstone.CS_MODE_ARM)
    insns = list(md.disasm(prog.code, 0))
    assert len(insns) == a.CODE_SIZE // 4
    text = {i.address: f"{i.mnemonic} {i.op_str}".strip() for i in insns}
    for size, reg in ((1, "w1"), (2, "w1"), (4, "w1"), (8, "x1")):
        start = prog.entries[f"read{size}"]
        load = {1: "ldrb", 2: "ldrh", 4: "ldr", 8: "ldr"}[size]
        assert text[start] == f"{load} {reg}, [x0]"
        assert text[start + 4] == "str x1, [x2]"
        assert text[start + 8] == f"b {_target(start + 8)}"
        start = prog.entries[f"write{size}"]
        store = {1: "strb", 2: "strh", 4: "str", 8: "str"}[size]
        assert text[start] == f"{store} {reg}, [x0]"
        assert text[start + 4] == "str x1, [x2]"
    for i in range(16):
        v = 0x800 + 0x80 * i
        assert [text[v + 4 * k] for k in range(5)] == [
            "mrs x27, esr_el1", "str x27, [x28]", "mrs x27, far_el1", "str x27, [x28, #8]",
            f"b {_target(v + 16)}"]
    assert text[prog.entries["spin"]] == f"b {_target(prog.entries['spin'])}"
    t = prog.entries["touch_write"]
    assert [text[t + 4 * k] for k in range(4)] == [
        "strb w1, [x0]", "add x0, x0, x4", "sub x3, x3, #1", f"cbnz x3, {_target(t)}"]


def test_one_reg_ids() -> None:
    # arch/arm64/include/uapi/asm/kvm.h: KVM_REG_ARM_CORE_REG(regs.regs[n]) = 2n etc.
    assert a.x_reg_id(0) == 0x6030_0000_0010_0000
    assert a.x_reg_id(30) == 0x6030_0000_0010_003C
    assert a.REG_SP == 0x6030_0000_0010_003E
    assert a.REG_PC == 0x6030_0000_0010_0040
    assert a.REG_PSTATE == 0x6030_0000_0010_0042
    # ARM64_SYS_REG(3, 0, 1, 0, 0) (SCTLR_EL1) and (3, 0, 12, 0, 0) (VBAR_EL1)
    assert a.SCTLR_EL1.one_reg_id == 0x6030_0000_0013_C080
    assert a.VBAR_EL1.one_reg_id == 0x6030_0000_0013_C600
    assert a.TCR_EL1.one_reg_id == 0x6030_0000_0013_C102


def test_describe_exception() -> None:
    assert a.describe_exception(0x21 << 26 | 0x10) == "prefetch abort"
    assert a.describe_exception(0x21 << 26) == "address size fault"
    assert a.describe_exception(0x25 << 26 | 0x00) == "address size fault"
    assert a.describe_exception(0x25 << 26 | 0x21) == "alignment fault"
    assert a.describe_exception(0x25 << 26 | 0x10) == "data abort"
    assert a.describe_exception(0x00) == "undefined instruction"
    assert a.describe_exception(0x3C << 26) == "breakpoint"
    assert a.describe_exception(0x16 << 26) == "EC 0x16"
    assert a.is_instruction_abort(0x20 << 26) and not a.is_instruction_abort(0x24 << 26)


def test_stage1_identity_map() -> None:
    mem = ctypes.create_string_buffer(4 * 4096)
    hva = ctypes.addressof(mem)
    t = a.Stage1Tables(0x7000_0000, hva, len(mem))
    t.map_gib(1)
    t.map_gib(1)
    t.map_gib(600)  # another level-0 entry
    words = struct.unpack(f"<{len(mem) // 8}Q", mem.raw)
    assert words[0] == (0x7000_0000 + 4096) | 0b11
    assert words[512 + 1] == (1 << 30) | 0x701
    assert words[1] == (0x7000_0000 + 2 * 4096) | 0b11
    assert words[2 * 512 + (600 & 511)] == (600 << 30) | 0x701
    assert t.mapped == {1, 600}
    with pytest.raises(ValueError):
        t.map_gib(1 << 18)
    t.map_gib(1200)
    with pytest.raises(MemoryError):
        t.map_gib(2000)


def test_system_register_values() -> None:
    assert a.SCTLR_VALUE & 1 and not a.SCTLR_VALUE & 2  # M on, A off
    assert a.TCR_VALUE & 0x3F == 16 and a.TCR_VALUE >> 32 & 7 == 5
    assert a.MAIR_VALUE & 0xFF == 0xFF
