"""uapi layouts, ioctl numbers, guest code and harness placement: no /dev/kvm needed."""

from __future__ import annotations

import ctypes
import pathlib

import pytest
from iced_x86 import Decoder, Formatter, FormatterSyntax

from kvmmem.realkvm import ioctls, probe_kvm, structs
from kvmmem.realkvm.guest import ROUTINE_STRIDE
from kvmmem.realkvm.harness import (
    HARNESS_WINDOW,
    HarnessConflict,
    choose_layout,
)
from kvmmem.realkvm.x86_code import ROUTINES, assemble, code_blob
from kvmmem.types import GiB, MiB


@pytest.mark.parametrize(("struct", "size"), list(structs.KERNEL_SIZES.items()),
                         ids=lambda x: getattr(x, "__name__", str(x)))
def test_struct_sizes_match_the_kernel(struct: type[ctypes.Structure], size: int) -> None:
    """Every uapi struct has the size include/uapi/linux/kvm.h gives it on x86-64."""
    assert ctypes.sizeof(struct) == size


def test_kvm_run_union_offsets() -> None:
    """struct kvm_run: exit_reason at 8, the exit union at 32, mmio.data at 32+8,
    mmio.len at 32+16, is_write at 32+20, sync regs at 304 (kvm-on-this-host.md §2)."""
    run = structs.kvm_run
    assert run.exit_reason.offset == 8
    assert run.exit.offset == 32
    assert structs.kvm_run_mmio.data.offset == 8
    assert structs.kvm_run_mmio.len.offset == 16
    assert structs.kvm_run_mmio.is_write.offset == 20
    assert structs.kvm_run_exit.memory_fault.offset == 0
    assert structs.kvm_run_internal.data.offset == 8
    assert run.s.offset == 304


@pytest.mark.parametrize(("name", "number"), [
    ("KVM_CREATE_VM", 0xAE01),
    ("KVM_SET_USER_MEMORY_REGION", 0x4020AE46),
    ("KVM_SET_USER_MEMORY_REGION2", 0x40A0AE49),
    ("KVM_GET_DIRTY_LOG", 0x4010AE42),
    ("KVM_CLEAR_DIRTY_LOG", 0xC018AEC0),
    ("KVM_RUN", 0xAE80),
    ("KVM_GET_REGS", 0x8090AE81),
    ("KVM_SET_SREGS", 0x4138AE84),
    ("KVM_SET_CPUID2", 0x4008AE90),
    ("KVM_GET_SUPPORTED_CPUID", 0xC008AE05),
    ("KVM_PRE_FAULT_MEMORY", 0xC040AED5),
    ("KVM_GET_STATS_FD", 0xAECE),
])
def test_ioctl_numbers(name: str, number: int) -> None:
    """_IO/_IOW/_IOR/_IOWR (include/uapi/asm-generic/ioctl.h) give the kernel's numbers."""
    assert ioctls.ioctl_number(name) == number


def test_every_ioctl_names_its_capability() -> None:
    """The table pairs each ioctl with the KVM_CAP_* it needs, or None for the base API."""
    assert ioctls.ioctl_capability("KVM_PRE_FAULT_MEMORY") == ioctls.KVM_CAP_PRE_FAULT_MEMORY
    assert ioctls.ioctl_capability("KVM_GET_STATS_FD") == ioctls.KVM_CAP_BINARY_STATS_FD
    assert ioctls.ioctl_capability("KVM_RUN") is None
    assert all(cap is None or cap in ioctls.CAPABILITIES.values()
               for _, cap in ioctls.IOCTLS.values())


def test_guest_routines_decode_as_intended() -> None:
    """The iced-x86 routines: one access, then the doorbell store and a jump back to it."""
    base = 0x7FC0000000
    page, entries = assemble(base)
    fmt = Formatter(FormatterSyntax.NASM)

    def listing(name: str) -> list[str]:
        off = entries[name] - base
        insns = list(Decoder(64, page[off:off + ROUTINE_STRIDE], ip=entries[name]))
        return [fmt.format(i) for i in insns[:4]]

    assert set(entries) == set(ROUTINES)
    assert listing("read8")[:2] == ["mov rax,[rsi]", "mov [rdi],rax"]
    assert listing("read1")[0] == "movzx eax,byte [rsi]"
    assert listing("write2")[:2] == ["mov [rsi],ax", "mov [rdi],rax"]
    assert listing("doorbell")[1].startswith("jmp short 0000007FC00005")
    assert listing("touch_write")[:3] == ["mov [rsi],al", "add rsi,rdx", "dec rcx"]


def test_guest_code_is_position_independent() -> None:
    """The bytes are the same at every base (relative branches only), so the blob the
    host ships to an agent inside an emulated machine (no iced-x86 there) is right
    wherever that agent's harness lands."""
    blob = code_blob()
    for base in (0x1000, 0x7FC0000000, 0x3F_FFC0_0000):
        page, entries = assemble(base)
        assert page.hex() == blob["code"]
        assert {k: v - base for k, v in entries.items()} == blob["entries"]


def test_layout_takes_the_highest_free_slot_and_window() -> None:
    """The harness picks the highest unused slot id and a 4 MiB window below 512 GiB."""
    lay = choose_layout([(0, 4 * GiB)], [0, 1, 32763], 32764, 48)
    assert lay.slot == 32762
    assert lay.gpa == 512 * GiB - HARNESS_WINDOW
    assert lay.doorbell - lay.gpa > 2 * MiB - 1


def test_layout_avoids_ranges_rounded_to_2m() -> None:
    """A reserved range touching the top window pushes the harness below its 2 MiB
    extent."""
    top = 512 * GiB - HARNESS_WINDOW
    lay = choose_layout([(top + 0x1000, 0x1000)], [], 32, 48)
    assert lay.gpa + HARNESS_WINDOW <= top
    lay = choose_layout([(0, 512 * GiB)], [], 32, 48)
    assert lay.gpa >= 512 * GiB


def test_layout_reports_no_room() -> None:
    """A scenario using every slot id, or all guest physical space, leaves no room."""
    with pytest.raises(HarnessConflict, match="every memslot id"):
        choose_layout([], range(8), 8, 48)
    with pytest.raises(HarnessConflict, match="no free 4 MiB window"):
        choose_layout([(0, 1 << 47)], [], 8, 48)


def test_probe_says_why_in_one_line(tmp_path: pathlib.Path) -> None:
    """Without a usable /dev/kvm the probe gives a one-line reason (commands print it and
    exit 4), for a missing node and for a file that is not KVM."""
    missing = probe_kvm(str(tmp_path / "kvm"))
    assert missing is not None and "cannot open" in missing and "\n" not in missing
    (tmp_path / "notkvm").write_bytes(b"")
    wrong = probe_kvm(str(tmp_path / "notkvm"))
    assert wrong is not None and "KVM_GET_API_VERSION: ENOTTY" in wrong
