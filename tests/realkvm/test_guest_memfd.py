"""guest_memfd plumbing of the real-KVM backend: the uapi struct and ioctl, the program's
guest_memfd fields, the capability gate, REGION2 arguments and punch_hole through
fallocate.  Only the last test needs /dev/kvm (and checks whichever answer it gives)."""

from __future__ import annotations

import ctypes
import json
import os
from typing import Any

import pytest

from kvmmem.realkvm import HostMemory, Kvm, ioctls, structs
from kvmmem.realkvm import program as prog
from kvmmem.realkvm.host import MappingUnsupported
from kvmmem.realkvm.runner import run_scenario, scenario_program
from kvmmem.scenario import load_scenario_text
from kvmmem.scenario.model import GMEM_FLAGS, KVM_MEM_GUEST_MEMFD
from kvmmem.types import PAGE_SIZE

from .helpers import G, open_fds

GMEM = f"""\
kvmmem: 1
name: gmem
arch: [x86, arm64]
memory:
  g: {{size: 64K, kind: guest_memfd, prot: rw, gmem_flags: [mmap, init_shared]}}
  p: {{size: 64K, kind: guest_memfd, prot: rw}}
memslots:
  - {{slot: 0, gpa: {G:#x}, size: 64K, memory: g, guest_memfd: g, flags: [guest_memfd]}}
steps:
  - guest_write: {{gpa: {G + 0x1000:#x}, size: 8, value: 0x1122334455667788}}
  - host_read: {{memory: g, offset: 0x1000, size: 8}}
  - punch_hole: {{memory: g, offset: 0x1000, size: 0x1000}}
  - guest_read: {{gpa: {G + 0x1000:#x}, size: 8}}
  - set_memslot: {{slot: 1, gpa: {G + 0x100000:#x}, size: 32K, guest_memfd: p,
                  guest_memfd_offset: 32K, flags: [guest_memfd]}}
  - set_memslot: {{slot: 2, gpa: {G + 0x200000:#x}, size: 64K, memory: g,
                  flags: [guest_memfd]}}
  - host_mmap: {{name: h, size: 64K, kind: guest_memfd, prot: rw, gmem_flags: [mmap]}}
"""


def _program() -> dict[str, Any]:
    return scenario_program(load_scenario_text(GMEM, "gmem.yaml"), "x86")


def test_create_guest_memfd_layout_and_number() -> None:
    """struct kvm_create_guest_memfd is 64 bytes; KVM_CREATE_GUEST_MEMFD is
    _IOWR(KVMIO, 0xd4, 64) and needs KVM_CAP_GUEST_MEMFD (234); the flags capability is
    244 (include/uapi/linux/kvm.h)."""
    assert ctypes.sizeof(structs.kvm_create_guest_memfd) == 64
    assert ioctls.ioctl_number("KVM_CREATE_GUEST_MEMFD") == 0xC040AED4
    assert ioctls.ioctl_capability("KVM_CREATE_GUEST_MEMFD") == ioctls.KVM_CAP_GUEST_MEMFD == 234
    assert ioctls.KVM_CAP_GUEST_MEMFD_FLAGS == 244
    assert ioctls.ioctl_capability("KVM_SET_USER_MEMORY_REGION2") == ioctls.KVM_CAP_USER_MEMORY2
    region2 = structs.kvm_userspace_memory_region2
    assert (region2.guest_memfd_offset.offset, region2.guest_memfd.offset) == (32, 40)


def test_flag_names_match_the_scenario_contract() -> None:
    """The uapi GUEST_MEMFD_FLAG_* bits are the scenario's gmem_flags; the memslot flag is
    KVM_MEM_GUEST_MEMFD."""
    assert structs.GUEST_MEMFD_FLAGS == GMEM_FLAGS
    assert structs.KVM_MEM_GUEST_MEMFD == KVM_MEM_GUEST_MEMFD
    assert structs.guest_memfd_flag_names(3) == ["mmap", "init_shared"]
    assert structs.guest_memfd_flag_names(0x6) == ["init_shared", "0x4"]


def test_program_carries_the_guest_memfd_fields() -> None:
    """Mappings carry gmem_flags as bits; slots their guest_memfd name and offset with
    the flag in the uapi mask; punch_hole its memory, offset and size; all JSON."""
    p = _program()
    json.dumps(p)
    assert [(m["name"], m["kind"], m["gmem_flags"]) for m in p["memory"]] == [
        ("g", "guest_memfd", 3), ("p", "guest_memfd", 0)]
    slot = p["memslots"][0]
    assert (slot["flags"], slot["guest_memfd"], slot["guest_memfd_offset"]) == (
        KVM_MEM_GUEST_MEMFD, "g", 0)
    punch = p["steps"][2]
    assert {k: punch[k] for k in ("op", "memory", "offset", "size")} == {
        "op": "punch_hole", "memory": "g", "offset": 0x1000, "size": 0x1000}
    gmem_only = p["steps"][4]
    assert (gmem_only["memory"], gmem_only["hva"], gmem_only["guest_memfd"],
            gmem_only["guest_memfd_offset"]) == (None, 0, "p", 0x8000)
    assert p["steps"][5]["guest_memfd"] is None
    assert p["steps"][6]["mapping"]["gmem_flags"] == 1
    assert prog.guest_memfd_needs(p) == (True, True, 3)


def test_guest_memfd_needs() -> None:
    """A program without guest_memfd needs nothing; a flag alone needs REGION2 and
    guest_memfd; a mapping alone guest_memfd and its flags."""
    plain = {"memory": [{"name": "a", "kind": "anon"}],
             "memslots": [{"op": "set_memslot", "flags": 1}], "steps": []}
    assert prog.guest_memfd_needs(plain) == (False, False, 0)
    flag = {**plain, "steps": [{"op": "set_memslot", "flags": KVM_MEM_GUEST_MEMFD}]}
    assert prog.guest_memfd_needs(flag) == (True, True, 0)
    mapping = {**plain, "steps": [{"op": "host_mmap", "mapping": {
        "name": "g", "kind": "guest_memfd", "gmem_flags": 2}}]}
    assert prog.guest_memfd_needs(mapping) == (False, True, 2)


class _Caps:
    """A VM fd answering KVM_CHECK_EXTENSION from a table."""

    def __init__(self, caps: dict[int, int]) -> None:
        self.caps = caps

    def check_extension(self, cap: int) -> int:
        return self.caps.get(cap, 0)

    def supports(self, ioctl: str) -> bool:
        cap = ioctls.ioctl_capability(ioctl)
        return cap is None or self.caps.get(cap, 0) > 0


class _FakeVm:
    """What the program asks of a harness VM, recording set_memslot calls."""

    def __init__(self, caps: dict[int, int]) -> None:
        self.vm = _Caps(caps)
        self.kvm = None  # no /dev/kvm behind the fake
        self.calls: list[tuple[Any, ...]] = []

    def supports(self, ioctl: str) -> bool:
        return self.vm.supports(ioctl)

    def set_memslot(self, *args: Any) -> dict[str, Any]:
        self.calls.append(args)
        return {"result": "ok"}


ALL = {ioctls.KVM_CAP_USER_MEMORY2: 1, ioctls.KVM_CAP_GUEST_MEMFD: 1,
       ioctls.KVM_CAP_GUEST_MEMFD_FLAGS: 3}


@pytest.mark.parametrize(("caps", "reason"), [
    ({**ALL, ioctls.KVM_CAP_USER_MEMORY2: 0}, "KVM_CAP_USER_MEMORY2 is 0"),
    ({**ALL, ioctls.KVM_CAP_GUEST_MEMFD: 0}, "KVM_CAP_GUEST_MEMFD is 0 on this VM"),
    ({**ALL, ioctls.KVM_CAP_GUEST_MEMFD_FLAGS: 0},
     "KVM_CAP_GUEST_MEMFD_FLAGS is 0x0 on this VM (lacks mmap, init_shared)"),
    ({**ALL, ioctls.KVM_CAP_GUEST_MEMFD_FLAGS: 1},
     "KVM_CAP_GUEST_MEMFD_FLAGS is 0x1 on this VM (lacks init_shared)"),
    (ALL, None),
], ids=["no-region2", "no-gmem", "no-flags", "mmap-only", "all"])
def test_capability_gate_names_the_capability(caps: dict[int, int],
                                               reason: str | None) -> None:
    """A program using guest_memfd is unsupported, with the capability named, where the
    VM lacks REGION2, guest_memfd or a flag it asks for (x86 6.12's default VM: 0)."""
    vm: Any = _FakeVm(caps)
    if reason is None:
        prog._check_capabilities(_program(), vm)
        return
    with pytest.raises(prog._Unsupported, match=reason.replace("(", r"\(").replace(")", r"\)")):
        prog._check_capabilities(_program(), vm)


def test_set_memslot_arguments() -> None:
    """REGION2 with the named file's fd and offset; the flag without a name passes fd
    0xFFFFFFFF; no memory gives hva 0; a slot without guest_memfd stays REGION."""
    vm: Any = _FakeVm(ALL)
    fd = os.memfd_create("gmem-stand-in", os.MFD_CLOEXEC)
    os.ftruncate(fd, 0x10000)
    with HostMemory() as host:
        assert host.adopt_guest_memfd("p", fd, 0x10000, 3, mapped=False) == {"result": "ok"}
        assert host.mappings["p"].hva == 0
        host.mmap("a", 0x10000, "anon", 3)
        prog._set_memslot(host, vm, {"slot": 1, "gpa": G, "size": 0x8000, "memory": None,
                                     "hva": None, "flags": KVM_MEM_GUEST_MEMFD,
                                     "guest_memfd": "p", "guest_memfd_offset": 0x8000})
        prog._set_memslot(host, vm, {"slot": 2, "gpa": G, "size": 0x8000, "memory": "a",
                                     "offset": 0, "flags": KVM_MEM_GUEST_MEMFD,
                                     "guest_memfd": None, "guest_memfd_offset": 0})
        prog._set_memslot(host, vm, {"slot": 3, "gpa": G, "size": 0x8000, "memory": "a",
                                     "offset": 0x1000, "flags": 0})
        hva = host.hva("a")
    assert vm.calls == [(1, G, 0x8000, 0, KVM_MEM_GUEST_MEMFD, fd, 0x8000),
                        (2, G, 0x8000, hva, KVM_MEM_GUEST_MEMFD, 0xFFFF_FFFF, 0),
                        (3, G, 0x8000, hva + 0x1000, 0)]


def test_punch_hole_on_a_memfd() -> None:
    """fallocate(PUNCH_HOLE | KEEP_SIZE) on the file behind a memfd mapping: the page
    reads 0 afterwards, its neighbours keep their data; an anonymous mapping has no file
    (unsupported); a guest_memfd KVM refused (fd -1) answers EBADF; the kept files are
    closed with the HostMemory."""
    fds = open_fds()
    with HostMemory() as host:
        host.mmap("m", 4 * PAGE_SIZE, "memfd", 3, fill=0x11)
        assert host.punch_hole("m", PAGE_SIZE, PAGE_SIZE) == {"result": "ok"}
        assert host.host_read(host.hva("m", PAGE_SIZE), 8) == {"result": "ok", "value": 0}
        assert host.host_read(host.hva("m"), 1) == {"result": "ok", "value": 0x11}
        assert host.host_read(host.hva("m", 2 * PAGE_SIZE), 1)["value"] == 0x11
        host.mmap("f", 4 * PAGE_SIZE, "file-shared", 3, fill=0x22)
        assert host.punch_hole("f", 0, 4 * PAGE_SIZE) == {"result": "ok"}
        assert host.host_read(host.hva("f", 3 * PAGE_SIZE), 8)["value"] == 0
        host.mmap("a", PAGE_SIZE, "anon", 3)
        with pytest.raises(MappingUnsupported, match="kind anon: no file"):
            host.punch_hole("a", 0, PAGE_SIZE)
        host.adopt_guest_memfd("bad", -1, PAGE_SIZE, 3, mapped=False)
        assert host.punch_hole("bad", 0, PAGE_SIZE) == {"result": "error", "errno": "EBADF"}
        assert host.punch_hole("m", 0, 0) == {"result": "error", "errno": "EINVAL"}
    assert open_fds() == fds


def test_adopted_file_mapped_and_filled() -> None:
    """A mapped guest_memfd stand-in (a memfd) is MAP_SHARED in the arena and filled
    through the kernel."""
    fd = os.memfd_create("gmem-stand-in", os.MFD_CLOEXEC)
    os.ftruncate(fd, 2 * PAGE_SIZE)
    with HostMemory() as host:
        out = host.adopt_guest_memfd("g", fd, 2 * PAGE_SIZE, 1, mapped=True, fill=0x5A)
        assert out == {"result": "ok"}
        assert host.host_read(host.hva("g", PAGE_SIZE), 2) == {"result": "ok", "value": 0x5A5A}
        assert host.host_write(host.hva("g"), 1, 0) == {"result": "signal", "signal": "SIGSEGV"}


def test_guest_memfd_on_this_host(kvm: Kvm) -> None:
    """This host's KVM either runs a guest through a gmem-only slot (coherent with the
    mapping, zero after punch_hole) or says the scenario is unsupported naming the
    capability it lacks."""
    fds = open_fds()
    run = run_scenario(load_scenario_text(GMEM, "gmem.yaml"), kvm=kvm)
    assert open_fds() == fds
    if not run.supported:
        assert "KVM_CAP_" in run.reason
        return
    got = [{k: v for k, v in s.items() if k not in ("step", "op")} for s in run.steps]
    assert got[:4] == [{"result": "ok"}, {"result": "ok", "value": 0x1122334455667788},
                       {"result": "ok"}, {"result": "ok", "value": 0}]
