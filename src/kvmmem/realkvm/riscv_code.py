"""The riscv64 guest program: an RV64I/Zicsr encoder for the few instructions it needs
and the routines (standard library only: it runs on the emulated machine's bare
Python).

Every encoder returns the 32-bit instruction word (no compressed forms);
``tests/realkvm/test_riscv_code.py`` checks each against capstone and against the
Debian cross assembler (The RISC-V Instruction Set Manual, vol. I, "RV32I/RV64I Base
Integer Instruction Set" and "Zicsr").  No hand-written instruction bytes.

Register conventions (set with ``KVM_SET_ONE_REG`` before each run): ``a0`` address,
``a1`` value, ``a2`` doorbell, ``a3`` count, ``a4`` stride, ``s11`` exception doorbell;
``t5`` is the trap handler's scratch.  Loads zero-extend (``LBU``/``LHU``/``LWU``/``LD``)
so the doorbell carries the little-endian value read.  Each access routine performs one
access, then ``SD a1`` to the doorbell (a gpa in no memslot: ``KVM_EXIT_MMIO`` of 8
bytes), then spins.  The trap handler (``stvec``, direct mode) stores ``scause`` to the
exception doorbell and ``stval`` to the 8 bytes after it, then spins.

The guest runs in VS-mode (``mode`` S) with ``satp`` 0 (Bare): guest virtual =
guest physical, no guest page tables.
"""

from __future__ import annotations

from kvmmem.realkvm.code_page import GuestProgram, lay_out, routine_table

PAGE_SIZE = 4096

ZERO, RA, SP, GP, TP = 0, 1, 2, 3, 4
T0, T1, T2 = 5, 6, 7
S0, S1 = 8, 9
A0, A1, A2, A3, A4, A5, A6, A7 = range(10, 18)
S11 = 27
T3, T4, T5, T6 = 28, 29, 30, 31

ABI_NAMES = ("zero", "ra", "sp", "gp", "tp", "t0", "t1", "t2", "s0", "s1",
             "a0", "a1", "a2", "a3", "a4", "a5", "a6", "a7",
             "s2", "s3", "s4", "s5", "s6", "s7", "s8", "s9", "s10", "s11",
             "t3", "t4", "t5", "t6")
"""x0..x31 by their ABI names."""

# --- encoders --------------------------------------------------------------------------------

_LOAD_FUNCT3 = {1: 0b100, 2: 0b101, 4: 0b110, 8: 0b011}
"""LBU, LHU, LWU, LD: zero-extending (LD needs none)."""
_STORE_FUNCT3 = {1: 0b000, 2: 0b001, 4: 0b010, 8: 0b011}
"""SB, SH, SW, SD."""
OP_LOAD, OP_STORE, OP_IMM, OP_REG = 0x03, 0x23, 0x13, 0x33
OP_BRANCH, OP_JAL, OP_SYSTEM = 0x63, 0x6F, 0x73


def _reg(r: int) -> int:
    if not 0 <= r <= 31:
        raise ValueError(f"RISC-V register number {r} is outside 0..31")
    return r


def _simm(imm: int, bits: int) -> int:
    if not -(1 << (bits - 1)) <= imm < 1 << (bits - 1):
        raise ValueError(f"immediate {imm} does not fit {bits} signed bits")
    return imm & ((1 << bits) - 1)


def _i_type(opcode: int, funct3: int, rd: int, rs1: int, imm: int) -> int:
    return (_simm(imm, 12) << 20 | _reg(rs1) << 15 | funct3 << 12 | _reg(rd) << 7
            | opcode)


def load(size: int, rd: int, rs1: int, offset: int = 0) -> int:
    """``LBU`` / ``LHU`` / ``LWU`` / ``LD rd, offset(rs1)`` for ``size`` 1 / 2 / 4 / 8.
    Raises ``ValueError`` for another size, a register outside 0..31 or an offset
    outside -2048..2047."""
    if size not in _LOAD_FUNCT3:
        raise ValueError(f"load size must be 1, 2, 4 or 8, not {size}")
    return _i_type(OP_LOAD, _LOAD_FUNCT3[size], rd, rs1, offset)


def store(size: int, rs2: int, rs1: int, offset: int = 0) -> int:
    """``SB`` / ``SH`` / ``SW`` / ``SD rs2, offset(rs1)``.  Raises ``ValueError`` like
    :func:`load`."""
    if size not in _STORE_FUNCT3:
        raise ValueError(f"store size must be 1, 2, 4 or 8, not {size}")
    imm = _simm(offset, 12)
    return ((imm >> 5) << 25 | _reg(rs2) << 20 | _reg(rs1) << 15
            | _STORE_FUNCT3[size] << 12 | (imm & 0x1F) << 7 | OP_STORE)


def addi(rd: int, rs1: int, imm: int) -> int:
    """``ADDI rd, rs1, imm`` (-2048..2047)."""
    return _i_type(OP_IMM, 0, rd, rs1, imm)


def add(rd: int, rs1: int, rs2: int) -> int:
    """``ADD rd, rs1, rs2``."""
    return _reg(rs2) << 20 | _reg(rs1) << 15 | _reg(rd) << 7 | OP_REG


def jal(rd: int, offset: int) -> int:
    """``JAL rd, pc + offset`` (even, ±1 MiB); ``jal(ZERO, 0)`` spins."""
    if offset % 2:
        raise ValueError(f"jump offset {offset} is odd")
    imm = _simm(offset, 21)
    return ((imm >> 20 & 1) << 31 | (imm >> 1 & 0x3FF) << 21 | (imm >> 11 & 1) << 20
            | (imm >> 12 & 0xFF) << 12 | _reg(rd) << 7 | OP_JAL)


def bne(rs1: int, rs2: int, offset: int) -> int:
    """``BNE rs1, rs2, pc + offset`` (even, ±4 KiB)."""
    if offset % 2:
        raise ValueError(f"branch offset {offset} is odd")
    imm = _simm(offset, 13)
    return ((imm >> 12 & 1) << 31 | (imm >> 5 & 0x3F) << 25 | _reg(rs2) << 20
            | _reg(rs1) << 15 | 0b001 << 12 | (imm >> 1 & 0xF) << 8 | (imm >> 11 & 1) << 7
            | OP_BRANCH)


def csrrs(rd: int, csr: int, rs1: int = ZERO) -> int:
    """``CSRRS rd, csr, rs1`` (``CSRR rd, csr`` with ``rs1`` zero)."""
    if not 0 <= csr < 1 << 12:
        raise ValueError(f"CSR number {csr:#x} is outside 12 bits")
    return csr << 20 | _reg(rs1) << 15 | 0b010 << 12 | _reg(rd) << 7 | OP_SYSTEM


def ebreak() -> int:
    """``EBREAK``."""
    return 0x00100073


CSR_SSTATUS = 0x100
CSR_STVEC = 0x105
CSR_SCAUSE = 0x142
CSR_STVAL = 0x143
CSR_SATP = 0x180

# --- ONE_REG ids ---------------------------------------------------------------------------

KVM_REG_RISCV = 0x8000_0000_0000_0000
KVM_REG_SIZE_U64 = 0x0030_0000_0000_0000
KVM_REG_RISCV_CORE = 0x02 << 24
KVM_REG_RISCV_CSR = 0x03 << 24
KVM_RISCV_MODE_S = 1


def core_reg_id(index: int) -> int:
    """The ONE_REG id of ``struct kvm_riscv_core`` field ``index`` (unsigned longs):
    0 ``regs.pc``, ``n`` = x``n`` for 1..31, 32 ``mode``."""
    if not 0 <= index <= 32:
        raise ValueError(f"kvm_riscv_core has no field {index}")
    return KVM_REG_RISCV | KVM_REG_SIZE_U64 | KVM_REG_RISCV_CORE | index


def x_reg_id(n: int) -> int:
    """x``n`` (1..31)."""
    if not 1 <= n <= 31:
        raise ValueError(f"x{n} has no ONE_REG id (x1..x31)")
    return core_reg_id(n)


REG_PC = core_reg_id(0)
REG_MODE = core_reg_id(32)
CSR_FIELDS = ("sstatus", "sie", "stvec", "sscratch", "sepc", "scause", "stval", "sip",
              "satp", "scounteren", "senvcfg")
"""``struct kvm_riscv_csr`` in order."""


def csr_reg_id(name: str) -> int:
    """The ONE_REG id of the guest (VS-level) CSR ``name`` of ``struct kvm_riscv_csr``.
    Raises ``ValueError`` for another name."""
    if name not in CSR_FIELDS:
        raise ValueError(f"kvm_riscv_csr has no field {name!r}")
    return KVM_REG_RISCV | KVM_REG_SIZE_U64 | KVM_REG_RISCV_CSR | CSR_FIELDS.index(name)


# --- the routines --------------------------------------------------------------------------

R_ADDR, R_VALUE, R_DOORBELL, R_COUNT, R_STRIDE = A0, A1, A2, A3, A4
R_SCRATCH = T5
R_EXC_DOORBELL = S11
ROUTINE_REGS = (R_ADDR, R_VALUE, R_DOORBELL, R_COUNT, R_STRIDE)
ROUTINE_STRIDE = 0x40
TRAP_OFFSET = 0x800
CODE_SIZE = PAGE_SIZE


def _access_routine(size: int, is_write: bool) -> list[int]:
    access = store(size, R_VALUE, R_ADDR) if is_write else load(size, R_VALUE, R_ADDR)
    return [access, store(8, R_VALUE, R_DOORBELL), jal(ZERO, 0)]


def _touch_routine(is_write: bool) -> list[int]:
    access = store(1, R_VALUE, R_ADDR) if is_write else load(1, R_VALUE, R_ADDR)
    return [
        access,                                 # loop:
        add(R_ADDR, R_ADDR, R_STRIDE),
        addi(R_COUNT, R_COUNT, -1),
        bne(R_COUNT, ZERO, -12),
        store(8, R_COUNT, R_DOORBELL),
        jal(ZERO, 0),
    ]


def _trap_handler() -> list[int]:
    return [
        csrrs(R_SCRATCH, CSR_SCAUSE),
        store(8, R_SCRATCH, R_EXC_DOORBELL),
        csrrs(R_SCRATCH, CSR_STVAL),
        store(8, R_SCRATCH, R_EXC_DOORBELL, 8),
        jal(ZERO, 0),
    ]


def routines() -> dict[str, list[int]]:
    """Every routine's instruction words by name (:func:`code_page.routine_table`)."""
    return routine_table(_access_routine, _touch_routine, [jal(ZERO, 0)])


def assemble() -> GuestProgram:
    """The code page: routines at ``ROUTINE_STRIDE`` steps, the trap handler at
    ``TRAP_OFFSET`` (entry ``trap``, the stvec target), ``EBREAK`` everywhere else."""
    return lay_out(routines(), size=CODE_SIZE, stride=ROUTINE_STRIDE, filler=ebreak(),
                   trap_name="trap", trap_offset=TRAP_OFFSET, trap=_trap_handler())


# --- trap causes ---------------------------------------------------------------------------

CAUSES = {
    0: "instruction address misaligned",
    1: "instruction access fault",
    2: "illegal instruction",
    3: "breakpoint",
    4: "load address misaligned",
    5: "load access fault",
    6: "store address misaligned",
    7: "store access fault",
    8: "environment call from U-mode",
    9: "environment call from S-mode",
    12: "instruction page fault",
    13: "load page fault",
    15: "store page fault",
}
"""``scause`` exception codes (privileged spec, table "Supervisor cause register")."""


def describe_cause(scause: int) -> str:
    """The name of the synchronous exception ``scause`` reports (``cause N`` when unknown,
    ``interrupt N`` for an interrupt)."""
    if scause >> 63:
        return f"interrupt {scause & ~(1 << 63)}"
    return CAUSES.get(scause, f"cause {scause}")


def is_fetch_fault(scause: int) -> bool:
    """Whether ``scause`` is an instruction fetch exception (misaligned, access, page)."""
    return scause in (0, 1, 12)
