"""The x86 harness's own IDT, GDT and TSS, its exception stubs, and the stale-vCPU
re-initialisation after an exit that leaves the vCPU in an unknown state.

The table and code checks need no /dev/kvm; the RealVm ones use this host's (skipped
without one).  On a TDP host (the x86 machines) the exception doorbell is what ends a
``guest_exec``; this host's PVM ignores the IDT and triple-faults as before, which the
RealVm tests accept either way.
"""

from __future__ import annotations

import ctypes

from iced_x86 import Decoder, Formatter, FormatterSyntax

from kvmmem.realkvm import HostMemory, RealVm, libc
from kvmmem.realkvm.guest import (
    EXC_DOORBELL_FROM_CODE,
    GDT_OFFSET,
    IDT_OFFSET,
    KERNEL_CS,
    STACK_TOP_OFFSET,
    TSS_LIMIT,
    TSS_OFFSET,
    TSS_SEL,
    USER_CS,
    USER_DS,
    VECTOR_NAMES,
    VECTOR_OFFSET,
    VECTOR_STRIDE,
    VECTORS,
    long_mode_sregs,
    write_system_tables,
)
from kvmmem.realkvm.harness import DOORBELL_OFFSET, EXC_DOORBELL_OFFSET
from kvmmem.realkvm.structs import kvm_sregs
from kvmmem.realkvm.x86_code import assemble

from .helpers import G, M

BASE = 0x7FFFC00000
RW = libc.PROT_READ | libc.PROT_WRITE


def _tables() -> ctypes.Array[ctypes.c_char]:
    buf = ctypes.create_string_buffer(4 * 4096)
    write_system_tables(BASE, ctypes.addressof(buf))
    return buf


def _u64(buf: ctypes.Array[ctypes.c_char], offset: int) -> int:
    return int.from_bytes(buf.raw[offset:offset + 8], "little")


def test_idt_gates_point_at_the_stubs_on_ist1() -> None:
    """Every vector 0-31 is a present DPL0 64-bit interrupt gate to KERNEL_CS:stub on
    IST1; the stubs are VECTOR_STRIDE apart in the code page."""
    buf = _tables()
    for vector in range(VECTORS):
        low, high = _u64(buf, IDT_OFFSET + 16 * vector), _u64(buf, IDT_OFFSET + 16 * vector + 8)
        handler = (low & 0xFFFF) | ((low >> 48) & 0xFFFF) << 16 | high << 32
        assert handler == BASE + VECTOR_OFFSET + vector * VECTOR_STRIDE
        assert (low >> 16) & 0xFFFF == KERNEL_CS
        assert (low >> 32) & 0x7 == 1  # IST1
        assert (low >> 40) & 0xFF == 0x8E  # P, DPL0, 64-bit interrupt gate


def test_gdt_and_tss() -> None:
    """The GDT holds the selectors long_mode_sregs loads and a busy 64-bit TSS whose
    RSP0 and IST1 are the top of the exception stack page."""
    buf = _tables()
    access = {sel: (_u64(buf, GDT_OFFSET + sel) >> 40) & 0xFF
              for sel in (KERNEL_CS, 0x10, USER_DS & ~3, USER_CS & ~3)}
    assert access == {KERNEL_CS: 0x9B, 0x10: 0x93, USER_DS & ~3: 0xF3, USER_CS & ~3: 0xFB}
    assert (_u64(buf, GDT_OFFSET + KERNEL_CS) >> 53) & 1 == 1  # L: 64-bit code
    tss = _u64(buf, GDT_OFFSET + TSS_SEL)
    base = ((tss >> 16) & 0xFFFFFF) | ((tss >> 56) & 0xFF) << 24
    base |= _u64(buf, GDT_OFFSET + TSS_SEL + 8) << 32
    assert base == BASE + TSS_OFFSET and tss & 0xFFFF == TSS_LIMIT
    assert (tss >> 40) & 0xFF == 0x8B
    stack = BASE + STACK_TOP_OFFSET
    assert _u64(buf, TSS_OFFSET + 4) == stack  # RSP0
    assert _u64(buf, TSS_OFFSET + 36) == stack  # IST1


def test_sregs_point_at_the_tables() -> None:
    """With a system base, IDTR, GDTR and TR address the harness's tables."""
    sregs = long_mode_sregs(kvm_sregs(), 0x1000, "native", BASE)
    assert (sregs.idt.base, sregs.idt.limit) == (BASE + IDT_OFFSET, 16 * VECTORS - 1)
    assert sregs.gdt.base == BASE + GDT_OFFSET
    assert (sregs.tr.base, sregs.tr.limit, sregs.tr.selector, sregs.tr.type,
            sregs.tr.present) == (BASE + TSS_OFFSET, TSS_LIMIT, TSS_SEL, 11, 1)
    assert sregs.cs.selector == USER_CS
    bare = long_mode_sregs(kvm_sregs(), 0x1000, "emulated")
    assert bare.idt.base == 0 and bare.cs.selector == KERNEL_CS


def test_exception_stubs_ring_the_exception_doorbell() -> None:
    """Stub v: ``mov eax, v; jmp common``; the common handler stores the vector and CR2
    at the exception doorbell, which is the harness's doorbell + 0x100."""
    assert EXC_DOORBELL_OFFSET == DOORBELL_OFFSET + 0x100 == EXC_DOORBELL_FROM_CODE
    page, _ = assemble(BASE)
    fmt = Formatter(FormatterSyntax.NASM)
    common = BASE + VECTOR_OFFSET + VECTORS * VECTOR_STRIDE
    for vector in (0, 1, 6, 13, 14, 31):
        off = VECTOR_OFFSET + vector * VECTOR_STRIDE
        insns = list(Decoder(64, page[off:off + VECTOR_STRIDE], ip=BASE + off))[:2]
        assert insns[0].immediate32 == vector
        assert insns[1].near_branch_target == common
    off = common - BASE
    listing = [fmt.format(i) for i in list(Decoder(64, page[off:off + 32], ip=common))[:5]]
    assert listing[0] == f"lea rdi,[rel {BASE + EXC_DOORBELL_FROM_CODE:X}h]"
    assert listing[1:4] == ["mov rdx,cr2", "mov [rdi],rax", "mov [rdi+8],rdx"]
    assert len(VECTOR_NAMES) == VECTORS and VECTOR_NAMES[6] == "#UD"


def test_exec_then_access_after_every_kind_of_end(host: HostMemory, vm: RealVm) -> None:
    """A guest_exec that ends in an exception (fetched, single-stepped or faulted), in
    #UD from a failed emulation, or (emulated path) in KVM_EXIT_INTERNAL_ERROR leaves
    the vCPU stale; the next access re-initialises it and completes at once."""
    assert host.mmap("m", M, "anon", RW, 0x90) == {"result": "ok"}
    assert vm.set_memslot(0, G, M, host.hva("m")) == {"result": "ok"}
    assert vm.guest_exec(G) == {"result": "ok"}
    assert vm.guest_write(G + 0x100, 4, 7) == {"result": "ok"}
    assert vm.guest_exec(G + 8 * M) == {"result": "abort", "abort": "#UD"}
    assert vm.guest_read(G + 0x100, 4) == {"result": "ok", "value": 7}
    out = vm.guest_exec(G + 8 * M, path="emulated")
    assert out["result"] == "exit" and out["exit_reason"] == "KVM_EXIT_INTERNAL_ERROR"
    assert vm.vcpus[0].stale
    assert vm.guest_read(G + 0x100, 4) == {"result": "ok", "value": 7}
    assert vm.guest_read(G + 0x100, 4, path="emulated") == {"result": "ok", "value": 7}
