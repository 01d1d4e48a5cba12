"""The x86 guest routines, encoded with iced-x86 on the host.

Each routine performs one scenario access and then rings the doorbell (see
:mod:`kvmmem.realkvm.guest`).  Every branch is relative, so the code page is
position independent: :func:`assemble` at base 0 gives the bytes for any base,
and the host ships them to an agent inside an emulated machine (which has no
iced-x86) as :func:`code_blob`.  ``tests/realkvm/test_structs.py`` checks both.

Past the routines, at :data:`~kvmmem.realkvm.guest.VECTOR_OFFSET`, are the exception
stubs the harness's IDT points at (one per vector, :data:`~kvmmem.realkvm.guest.VECTOR_STRIDE`
bytes apart: ``mov eax, VECTOR; jmp common``) and their common handler, which stores
the vector and then CR2 to the exception doorbell (reached RIP-relative, so it too is
position independent; see :mod:`kvmmem.realkvm.guest`).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

from iced_x86 import BlockEncoder, Code, Instruction, MemoryOperand, Register

from kvmmem.realkvm.guest import (
    EXC_DOORBELL_FROM_CODE,
    ROUTINE_STRIDE,
    VECTOR_OFFSET,
    VECTOR_STRIDE,
    VECTORS,
)
from kvmmem.types import PAGE_SIZE

if TYPE_CHECKING:
    from iced_x86._iced_x86_py import Code as CodeValue
    from iced_x86._iced_x86_py import Register as RegisterValue


_LOAD: dict[int, tuple[CodeValue, RegisterValue]] = {
    1: (Code.MOVZX_R32_RM8, Register.EAX),
    2: (Code.MOVZX_R32_RM16, Register.EAX),
    4: (Code.MOV_R32_RM32, Register.EAX),
    8: (Code.MOV_R64_RM64, Register.RAX),
}
_STORE: dict[int, tuple[CodeValue, RegisterValue]] = {
    1: (Code.MOV_RM8_R8, Register.AL),
    2: (Code.MOV_RM16_R16, Register.AX),
    4: (Code.MOV_RM32_R32, Register.EAX),
    8: (Code.MOV_RM64_R64, Register.RAX),
}


def _labelled(label: int, instr: Instruction) -> Instruction:
    """Give ``instr`` the label ``label`` (BlockEncoder resolves branches by IP)."""
    instr.ip = label
    return instr


def _doorbell(label: int) -> list[Instruction]:
    """``label: mov [rdi], rax; jmp label``: every re-entry rings the doorbell again."""
    return [
        _labelled(label, Instruction.create_mem_reg(
            Code.MOV_RM64_R64, MemoryOperand(Register.RDI), Register.RAX)),
        Instruction.create_branch(Code.JMP_REL32_64, label),
    ]


def _read(size: int) -> list[Instruction]:
    code, reg = _LOAD[size]
    return [Instruction.create_reg_mem(code, reg, MemoryOperand(Register.RSI)),
            *_doorbell(1)]


def _write(size: int) -> list[Instruction]:
    code, reg = _STORE[size]
    return [Instruction.create_mem_reg(code, MemoryOperand(Register.RSI), reg),
            *_doorbell(1)]


def _touch(write: bool) -> list[Instruction]:
    """``loop: access byte [rsi]; rsi += rdx; loop while --rcx``, then the doorbell."""
    access = (Instruction.create_mem_reg(Code.MOV_RM8_R8, MemoryOperand(Register.RSI),
                                         Register.AL)
              if write else
              Instruction.create_reg_mem(Code.MOV_R8_RM8, Register.AL,
                                         MemoryOperand(Register.RSI)))
    return [
        _labelled(2, access),
        Instruction.create_reg_reg(Code.ADD_RM64_R64, Register.RSI, Register.RDX),
        Instruction.create_reg(Code.DEC_RM64, Register.RCX),
        Instruction.create_branch(Code.JNE_REL32_64, 2),
        *_doorbell(1),
    ]


def _mmio_loop() -> list[Instruction]:
    """``rcx`` stores to ``[rbx]`` (each one an MMIO exit), then the doorbell."""
    return [
        _labelled(2, Instruction.create_mem_reg(
            Code.MOV_RM64_R64, MemoryOperand(Register.RBX), Register.RAX)),
        Instruction.create_reg(Code.DEC_RM64, Register.RCX),
        Instruction.create_branch(Code.JNE_REL32_64, 2),
        *_doorbell(1),
    ]


def _prime() -> list[Instruction]:
    """``mov al, [rsi]; mov [rbx], al``, then the doorbell: the harness points ``rsi`` at
    its IDT/GDT/TSS page and ``rbx`` into the exception stack, so that both are mapped
    (the stack writable) before a guest exception needs them."""
    return [
        Instruction.create_reg_mem(Code.MOV_R8_RM8, Register.AL, MemoryOperand(Register.RSI)),
        Instruction.create_mem_reg(Code.MOV_RM8_R8, MemoryOperand(Register.RBX), Register.AL),
        *_doorbell(1),
    ]


def _spin() -> list[Instruction]:
    """``jmp $``: a guest that never exits on its own (for the watchdog)."""
    return [_labelled(1, Instruction.create_branch(Code.JMP_REL32_64, 1))]


ROUTINES: dict[str, Callable[[], list[Instruction]]] = {
    **{f"read{n}": partial(_read, n) for n in (1, 2, 4, 8)},
    **{f"write{n}": partial(_write, n) for n in (1, 2, 4, 8)},
    "touch_read": partial(_touch, False),
    "touch_write": partial(_touch, True),
    "mmio_loop": _mmio_loop,
    "doorbell": partial(_doorbell, 1),
    "spin": _spin,
    "prime": _prime,
}
"""Routine name -> its instruction list (labels are local to the routine)."""


def _exception_stub(vector: int, common: int) -> list[Instruction]:
    """``mov eax, vector; jmp common``."""
    return [Instruction.create_reg_u32(Code.MOV_R32_IMM32, Register.EAX, vector),
            Instruction.create_branch(Code.JMP_REL32_64, common)]


def _exception_common(doorbell: int) -> list[Instruction]:
    """``lea rdi, [rip -> doorbell]; mov rdx, cr2; again: mov [rdi], rax;
    mov [rdi+8], rdx; jmp again`` (CPL0, on the IST stack; ``rax`` holds the vector).
    Each re-entry rings the same pair again."""
    again = 1
    return [
        Instruction.create_reg_mem(Code.LEA_R64_M, Register.RDI,
                                   MemoryOperand(Register.RIP, displ=doorbell)),
        Instruction.create_reg_reg(Code.MOV_R64_CR, Register.RDX, Register.CR2),
        _labelled(again, Instruction.create_mem_reg(
            Code.MOV_RM64_R64, MemoryOperand(Register.RDI), Register.RAX)),
        Instruction.create_mem_reg(Code.MOV_RM64_R64, MemoryOperand(Register.RDI, displ=8),
                                   Register.RDX),
        Instruction.create_branch(Code.JMP_REL32_64, again),
    ]


def _encode(instructions: list[Instruction], rip: int) -> bytes:
    encoder = BlockEncoder(64)
    encoder.add_many(instructions)
    return bytes(encoder.encode(rip))


def _exception_block(base: int) -> bytes:
    """The exception stubs and their common handler, for a code page at ``base``."""
    start = base + VECTOR_OFFSET
    common = start + VECTORS * VECTOR_STRIDE
    out = bytearray()
    for vector in range(VECTORS):
        stub = _encode(_exception_stub(vector, common), start + vector * VECTOR_STRIDE)
        if len(stub) > VECTOR_STRIDE:  # pragma: no cover - 10 bytes
            raise ValueError(f"exception stub {vector} is {len(stub)} bytes")
        out += stub.ljust(VECTOR_STRIDE, b"\xcc")
    out += _encode(_exception_common(base + EXC_DOORBELL_FROM_CODE), common)
    return bytes(out)


def assemble(base: int) -> tuple[bytes, dict[str, int]]:
    """Encode every routine for a code page at guest address ``base``, and the exception
    stubs at :data:`~kvmmem.realkvm.guest.VECTOR_OFFSET` (not listed in the entries:
    the harness's IDT points at them).

    Returns the page's bytes and each routine's entry address.  Raises
    ``ValueError`` if a routine outgrows :data:`ROUTINE_STRIDE` or the routines reach
    the exception stubs."""
    if len(ROUTINES) * ROUTINE_STRIDE > VECTOR_OFFSET:
        raise ValueError("the guest routines overlap the exception stubs")
    page = bytearray(PAGE_SIZE)
    block = _exception_block(base)
    page[VECTOR_OFFSET:VECTOR_OFFSET + len(block)] = block
    entries: dict[str, int] = {}
    for i, (name, make) in enumerate(ROUTINES.items()):
        rip = base + i * ROUTINE_STRIDE
        encoder = BlockEncoder(64)
        encoder.add_many(make())
        code = encoder.encode(rip)
        if len(code) > ROUTINE_STRIDE:
            raise ValueError(f"guest routine {name} is {len(code)} bytes")
        page[i * ROUTINE_STRIDE:i * ROUTINE_STRIDE + len(code)] = code
        entries[name] = rip
    return bytes(page), entries


def code_blob() -> dict[str, Any]:
    """The code page for base 0 as JSON-ready data: ``{"code": HEX, "entries":
    {ROUTINE: OFFSET}}`` (what :class:`~kvmmem.realkvm.x86.RealVm` takes as
    ``code``)."""
    page, entries = assemble(0)
    return {"code": page.hex(), "entries": entries}
