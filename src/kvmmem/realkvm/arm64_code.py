"""The arm64 guest program: an A64 encoder for the few instructions it needs, the
routines, the exception vectors and the stage-1 identity map (standard library only:
it runs on the emulated machine's bare Python).

Every encoder returns the 32-bit instruction word; ``tests/realkvm/test_arm64_code.py``
checks each against capstone and against the Debian cross assembler (Arm ARM, C6
"A64 base instruction descriptions").  No hand-written instruction bytes.

Register conventions of the routines (set by the host with ``KVM_SET_ONE_REG`` before
each run): ``X0`` address, ``X1`` value (written, or loaded), ``X2`` doorbell, ``X3``
count, ``X4`` stride, ``X28`` exception doorbell; ``X27`` is the vectors' scratch.
Each access routine performs one access, then stores ``X1`` (8 bytes) to the doorbell,
which no memslot covers: ``KVM_EXIT_MMIO`` of length 8 tells the host it is done and
carries the loaded value.  Every exception vector stores ``ESR_EL1`` to the exception
doorbell and ``FAR_EL1`` to the 8 bytes after it, then spins.

The guest runs at EL1h (``PSTATE`` 0x3c5) with the stage-1 MMU on
(:class:`Stage1Tables`): the identity map of every GiB a scenario touches, as 1 GiB
Normal write-back blocks, and ``SCTLR_EL1.A`` clear, so unaligned and page-crossing
accesses reach stage 2 as single accesses instead of faulting in the guest (with the
MMU off every data access is Device-nGnRnE and an unaligned one takes an alignment
fault before KVM sees anything).  GiBs without a memslot are mapped Normal too: the
stage-2 fault (``kvm_handle_guest_abort`` -> ``io_mem_abort``) does not depend on the
stage-1 memory type, and a Device type would make the guest's own alignment check
pre-empt KVM for unaligned MMIO accesses.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

from kvmmem.realkvm.code_page import GuestProgram, lay_out, routine_table

GiB = 1 << 30
PAGE_SIZE = 4096

XZR = 31
SP = 31
"""Register number 31: XZR in data-processing and load/store data operands, SP as a
load/store base."""

# --- encoders ------------------------------------------------------------------------------

_LOAD_OPS = {1: 0x39400000, 2: 0x79400000, 4: 0xB9400000, 8: 0xF9400000}
"""LDRB / LDRH / LDR (W) / LDR (X), unsigned immediate offset: every one zero-extends."""
_STORE_OPS = {1: 0x39000000, 2: 0x79000000, 4: 0xB9000000, 8: 0xF9000000}
"""STRB / STRH / STR (W) / STR (X), unsigned immediate offset."""


def _reg(r: int) -> int:
    if not 0 <= r <= 31:
        raise ValueError(f"A64 register number {r} is outside 0..31")
    return r


def _uoffset(size: int, offset: int) -> int:
    if offset % size or not 0 <= offset // size < 4096:
        raise ValueError(f"offset {offset} is not a multiple of {size} in 0..{4095 * size}")
    return offset // size


def ldr(size: int, rt: int, rn: int, offset: int = 0) -> int:
    """``LDRB Wt`` / ``LDRH Wt`` / ``LDR Wt`` / ``LDR Xt`` ``[Xn|SP, #offset]`` for ``size``
    1 / 2 / 4 / 8 (zero-extending).  Raises ``ValueError`` for another size, a register
    outside 0..31 or an offset the unsigned scaled immediate cannot hold."""
    if size not in _LOAD_OPS:
        raise ValueError(f"load size must be 1, 2, 4 or 8, not {size}")
    return _LOAD_OPS[size] | _uoffset(size, offset) << 10 | _reg(rn) << 5 | _reg(rt)


def str_(size: int, rt: int, rn: int, offset: int = 0) -> int:
    """``STRB`` / ``STRH`` / ``STR Wt`` / ``STR Xt`` ``[Xn|SP, #offset]``.  Raises
    ``ValueError`` like :func:`ldr`."""
    if size not in _STORE_OPS:
        raise ValueError(f"store size must be 1, 2, 4 or 8, not {size}")
    return _STORE_OPS[size] | _uoffset(size, offset) << 10 | _reg(rn) << 5 | _reg(rt)


def _imm12(imm: int) -> int:
    if not 0 <= imm < 4096:
        raise ValueError(f"immediate {imm} is outside 0..4095")
    return imm << 10


def add_imm(rd: int, rn: int, imm: int) -> int:
    """``ADD Xd|SP, Xn|SP, #imm`` (64-bit, ``imm`` 0..4095)."""
    return 0x91000000 | _imm12(imm) | _reg(rn) << 5 | _reg(rd)


def sub_imm(rd: int, rn: int, imm: int) -> int:
    """``SUB Xd|SP, Xn|SP, #imm`` (64-bit)."""
    return 0xD1000000 | _imm12(imm) | _reg(rn) << 5 | _reg(rd)


def subs_imm(rd: int, rn: int, imm: int) -> int:
    """``SUBS Xd, Xn|SP, #imm`` (64-bit; ``CMP`` when ``rd`` is XZR)."""
    return 0xF1000000 | _imm12(imm) | _reg(rn) << 5 | _reg(rd)


def add_reg(rd: int, rn: int, rm: int) -> int:
    """``ADD Xd, Xn, Xm`` (shifted register, LSL #0)."""
    return 0x8B000000 | _reg(rm) << 16 | _reg(rn) << 5 | _reg(rd)


def _branch_offset(offset: int, bits: int) -> int:
    if offset % 4:
        raise ValueError(f"branch offset {offset} is not a multiple of 4")
    words = offset // 4
    if not -(1 << (bits - 1)) <= words < 1 << (bits - 1):
        raise ValueError(f"branch offset {offset} does not fit {bits} bits of words")
    return words & ((1 << bits) - 1)


def b(offset: int) -> int:
    """``B`` to ``pc + offset`` (±128 MiB, a multiple of 4); ``b(0)`` is ``B .``."""
    return 0x14000000 | _branch_offset(offset, 26)


def cbnz(rt: int, offset: int) -> int:
    """``CBNZ Xt`` to ``pc + offset`` (±1 MiB)."""
    return 0xB5000000 | _branch_offset(offset, 19) << 5 | _reg(rt)


@dataclass(frozen=True, slots=True)
class SysReg:
    """A system register by its encoding (op0, op1, CRn, CRm, op2)."""

    name: str
    op0: int
    op1: int
    crn: int
    crm: int
    op2: int

    @property
    def one_reg_id(self) -> int:
        """Its ``KVM_{GET,SET}_ONE_REG`` id: ``KVM_REG_ARM64 | KVM_REG_SIZE_U64 |
        KVM_REG_ARM64_SYSREG`` | the encoding (arch/arm64/include/uapi/asm/kvm.h)."""
        return (KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM64_SYSREG
                | self.op0 << 14 | self.op1 << 11 | self.crn << 7 | self.crm << 3 | self.op2)


SCTLR_EL1 = SysReg("sctlr_el1", 3, 0, 1, 0, 0)
TTBR0_EL1 = SysReg("ttbr0_el1", 3, 0, 2, 0, 0)
TCR_EL1 = SysReg("tcr_el1", 3, 0, 2, 0, 2)
ESR_EL1 = SysReg("esr_el1", 3, 0, 5, 2, 0)
FAR_EL1 = SysReg("far_el1", 3, 0, 6, 0, 0)
MAIR_EL1 = SysReg("mair_el1", 3, 0, 10, 2, 0)
VBAR_EL1 = SysReg("vbar_el1", 3, 0, 12, 0, 0)
ELR_EL1 = SysReg("elr_el1", 3, 0, 4, 0, 1)


def mrs(rt: int, reg: SysReg) -> int:
    """``MRS Xt, <reg>``."""
    return (0xD5200000 | reg.op0 << 19 | reg.op1 << 16 | reg.crn << 12 | reg.crm << 8
            | reg.op2 << 5 | _reg(rt))


def brk(imm: int = 0) -> int:
    """``BRK #imm`` (16-bit immediate)."""
    if not 0 <= imm < 1 << 16:
        raise ValueError(f"BRK immediate {imm} is outside 0..65535")
    return 0xD4200000 | imm << 5


def nop() -> int:
    """``NOP``."""
    return 0xD503201F


# --- ONE_REG ids of the core registers (struct kvm_regs, in u32 units) ------------------------

KVM_REG_ARM64 = 0x6000_0000_0000_0000
KVM_REG_SIZE_U64 = 0x0030_0000_0000_0000
KVM_REG_ARM_CORE = 0x0010 << 16
KVM_REG_ARM64_SYSREG = 0x0013 << 16


def core_reg_id(offset_bytes: int) -> int:
    """The ONE_REG id of the 64-bit field at byte ``offset_bytes`` of ``struct kvm_regs``
    (``KVM_REG_ARM_CORE_REG`` counts u32 units)."""
    return KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM_CORE | offset_bytes // 4


def x_reg_id(n: int) -> int:
    """``regs.regs[n]`` (X0..X30)."""
    if not 0 <= n <= 30:
        raise ValueError(f"X{n} does not exist (X0..X30)")
    return core_reg_id(8 * n)


REG_SP = core_reg_id(8 * 31)
REG_PC = core_reg_id(8 * 32)
REG_PSTATE = core_reg_id(8 * 33)

PSTATE_EL1H_MASKED = 0x3C5
"""EL1 with SP_EL1 (M[3:0] = 0b0101) and D, A, I, F masked."""

# --- the routines -----------------------------------------------------------------------------

X_ADDR, X_VALUE, X_DOORBELL, X_COUNT, X_STRIDE = 0, 1, 2, 3, 4
X_SCRATCH = 27
X_EXC_DOORBELL = 28
ROUTINE_REGS = (X_ADDR, X_VALUE, X_DOORBELL, X_COUNT, X_STRIDE)

ROUTINE_STRIDE = 0x40
VECTORS_OFFSET = 0x800
"""VBAR_EL1 needs 2 KiB alignment: the 16 vectors (0x80 bytes each) fill the code page's
second half."""
VECTOR_COUNT = 16
VECTOR_SIZE = 0x80
CODE_SIZE = PAGE_SIZE


def _access_routine(size: int, is_write: bool) -> list[int]:
    access = str_(size, X_VALUE, X_ADDR) if is_write else ldr(size, X_VALUE, X_ADDR)
    return [access, str_(8, X_VALUE, X_DOORBELL), b(0)]


def _touch_routine(is_write: bool) -> list[int]:
    """``count`` one-byte accesses ``stride`` apart from ``X0``, then the doorbell
    (``X1`` is stored by a write, clobbered by a read)."""
    access = str_(1, X_VALUE, X_ADDR) if is_write else ldr(1, X_VALUE, X_ADDR)
    return [
        access,                               # loop:
        add_reg(X_ADDR, X_ADDR, X_STRIDE),
        sub_imm(X_COUNT, X_COUNT, 1),
        cbnz(X_COUNT, -12),                   # b.loop while count != 0
        str_(8, X_COUNT, X_DOORBELL),
        b(0),
    ]


def _vector() -> list[int]:
    return [
        mrs(X_SCRATCH, ESR_EL1),
        str_(8, X_SCRATCH, X_EXC_DOORBELL),
        mrs(X_SCRATCH, FAR_EL1),
        str_(8, X_SCRATCH, X_EXC_DOORBELL, 8),
        b(0),
    ]


def routines() -> dict[str, list[int]]:
    """Every routine's instruction words by name (:func:`code_page.routine_table`)."""
    return routine_table(_access_routine, _touch_routine, [b(0)])


def assemble() -> GuestProgram:
    """The code page: routines at ``ROUTINE_STRIDE`` steps from 0, the vector table at
    ``VECTORS_OFFSET`` (entry ``vectors``, the VBAR_EL1 offset: every one of its
    ``VECTOR_COUNT`` slots holds the same handler); unused words are ``BRK #0``."""
    return lay_out(routines(), size=CODE_SIZE, stride=ROUTINE_STRIDE, filler=brk(0),
                   trap_name="vectors", trap_offset=VECTORS_OFFSET, trap=_vector(),
                   trap_copies=VECTOR_COUNT, trap_stride=VECTOR_SIZE)


# --- exception syndromes (ESR_ELx) -------------------------------------------------------------

EC_UNKNOWN = 0x00
EC_IABT_LOW, EC_IABT_CUR = 0x20, 0x21
EC_PC_ALIGN = 0x22
EC_DABT_LOW, EC_DABT_CUR = 0x24, 0x25
EC_SP_ALIGN = 0x26
EC_BRK = 0x3C
FSC_EXTABT = 0x10
"""The fault status code ``kvm_inject_pabt``/``kvm_inject_dabt`` put in ESR_EL1
(synchronous external abort)."""


def describe_exception(esr: int) -> str:
    """A name for the guest exception ``esr`` (ESR_EL1) reports, in the model's vocabulary
    where it has a word: ``prefetch abort`` (an instruction abort, e.g. KVM's
    ``kvm_inject_pabt`` for a fetch outside every memslot), ``address size fault`` (FSC
    0-3, e.g. ``kvm_inject_size_fault`` beyond the IPA size), ``data abort``,
    ``alignment fault``, ``undefined instruction``, ``breakpoint``, else ``EC 0xNN``."""
    ec = esr >> 26 & 0x3F
    fsc = esr & 0x3F
    if ec in (EC_IABT_LOW, EC_IABT_CUR, EC_DABT_LOW, EC_DABT_CUR):
        if fsc <= 3:
            return "address size fault"
        if fsc == 0x21:
            return "alignment fault"
        return "prefetch abort" if ec in (EC_IABT_LOW, EC_IABT_CUR) else "data abort"
    if ec == EC_UNKNOWN:
        return "undefined instruction"
    if ec == EC_BRK:
        return "breakpoint"
    if ec in (EC_PC_ALIGN, EC_SP_ALIGN):
        return "alignment fault"
    return f"EC {ec:#04x}"


def is_instruction_abort(esr: int) -> bool:
    """Whether ``esr`` reports an instruction abort (EC 0x20/0x21)."""
    return esr >> 26 & 0x3F in (EC_IABT_LOW, EC_IABT_CUR)


# --- stage 1: identity map of 1 GiB blocks -----------------------------------------------------

MAIR_VALUE = 0x00_04_FF
"""Attr0 Normal inner/outer write-back read/write-allocate, Attr1 Device-nGnRE, Attr2
Device-nGnRnE."""
ATTR_NORMAL = 0
TCR_VALUE = (16                # T0SZ: 48-bit VA through TTBR0
             | 1 << 8          # IRGN0 write-back write-allocate
             | 1 << 10         # ORGN0 write-back write-allocate
             | 3 << 12         # SH0 inner shareable
             | 0 << 14         # TG0 4 KiB
             | 1 << 23         # EPD1: no walks through TTBR1
             | 5 << 32)        # IPS 48 bits
SCTLR_RES1 = 0x30D00800
"""The SCTLR_EL1 bits that are RES1 in ARMv8.0 (11, 20, 22, 23, 28, 29)."""
SCTLR_VALUE = SCTLR_RES1 | 1 << 0 | 1 << 2 | 1 << 12
"""M (MMU on), C and I (caches on); A (alignment check), SA and WXN clear."""

DESC_TABLE = 0b11
DESC_BLOCK = 0b01
DESC_AF = 1 << 10
DESC_SH_INNER = 3 << 8
BLOCK_FLAGS = DESC_BLOCK | ATTR_NORMAL << 2 | DESC_SH_INNER | DESC_AF
"""A 1 GiB level-1 block: Normal write-back, EL1 read/write (AP 00), executable at EL1."""
VA_BITS = 48


class Stage1Tables:
    """The guest's stage-1 tables in host memory: a level-0 table at ``gpa`` (mapped by the
    host at ``hva``) and one level-1 table per 512 GiB the guest reaches, taken from the
    following pages (``size`` bytes in all).  :meth:`map_gib` identity-maps one GiB."""

    def __init__(self, gpa: int, hva: int, size: int) -> None:
        self.gpa = gpa
        self.hva = hva
        self.pages = size // PAGE_SIZE
        self._next = 1
        self._level1: dict[int, int] = {}
        self.mapped: set[int] = set()
        ctypes.memset(hva, 0, PAGE_SIZE)

    @property
    def ttbr0(self) -> int:
        """The TTBR0_EL1 value (ASID 0)."""
        return self.gpa

    def _entry(self, table_page: int, index: int) -> ctypes.c_uint64:
        return ctypes.c_uint64.from_address(self.hva + table_page * PAGE_SIZE + 8 * index)

    def map_gib(self, gib: int) -> None:
        """Map guest virtual GiB ``gib`` to the same guest physical GiB (idempotent).
        Raises ``ValueError`` beyond the 48-bit VA space, ``MemoryError`` when the table
        pages are used up."""
        if not 0 <= gib < 1 << (VA_BITS - 30):
            raise ValueError(f"GiB {gib} is beyond the {VA_BITS}-bit virtual address space")
        if gib in self.mapped:
            return
        l0 = gib >> 9
        page = self._level1.get(l0)
        if page is None:
            if self._next >= self.pages:
                raise MemoryError("the harness's stage-1 table pages are used up")
            page = self._next
            self._next += 1
            ctypes.memset(self.hva + page * PAGE_SIZE, 0, PAGE_SIZE)
            self._level1[l0] = page
            self._entry(0, l0).value = (self.gpa + page * PAGE_SIZE) | DESC_TABLE
        self._entry(page, gib & 511).value = gib * GiB | BLOCK_FLAGS
        self.mapped.add(gib)
