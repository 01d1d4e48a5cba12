"""Kernel modules: names, dependency closure, .modinfo, decompression."""

from __future__ import annotations

import lzma
import struct
from pathlib import Path

import pytest

from kvmmem.machine import MachineError
from kvmmem.machine.kmod import (
    closure,
    decompress,
    deps_from_modinfo,
    modinfo,
    module_name,
    parse_modules_dep,
    resolve,
)

MODULES_DEP = """kernel/fs/9p/9p.ko.xz: kernel/fs/netfs/netfs.ko.xz kernel/net/9p/9pnet.ko.xz
kernel/net/9p/9pnet_virtio.ko.xz: kernel/net/9p/9pnet.ko.xz
kernel/net/9p/9pnet.ko.xz:
kernel/fs/netfs/netfs.ko.xz:
kernel/fs/ext4/ext4.ko.xz: kernel/fs/jbd2/jbd2.ko.xz kernel/fs/mbcache.ko.xz kernel/lib/crc16.ko.xz
kernel/fs/jbd2/jbd2.ko.xz:
kernel/fs/mbcache.ko.xz:
kernel/lib/crc16.ko.xz:
kernel/arch/x86/kvm/kvm-amd.ko.xz: kernel/arch/x86/kvm/kvm.ko.xz kernel/drivers/crypto/ccp/ccp.ko.xz
kernel/arch/x86/kvm/kvm.ko.xz: kernel/virt/lib/irqbypass.ko.xz
kernel/drivers/crypto/ccp/ccp.ko.xz:
kernel/virt/lib/irqbypass.ko.xz:
"""


def fake_module(info: dict[str, str]) -> bytes:
    """A 64-bit little-endian ELF with a .modinfo section and a section name table."""
    modinfo_data = b"".join(f"{k}={v}".encode() + b"\0" for k, v in info.items())
    shstrtab = b"\0.modinfo\0.shstrtab\0"
    data_off = 64
    str_off = data_off + len(modinfo_data)
    shoff = (str_off + len(shstrtab) + 7) // 8 * 8
    header = b"\x7fELF" + bytes([2, 1, 1]) + b"\0" * 9
    header += struct.pack("<HHIQQQIHHHHHH", 1, 183, 1, 0, 0, shoff, 0, 64, 0, 0, 64, 3, 2)
    body = header + modinfo_data + shstrtab
    body += b"\0" * (shoff - len(body))
    sections = [
        struct.pack("<IIQQQQIIQQ", 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
        struct.pack("<IIQQQQIIQQ", 1, 1, 2, 0, data_off, len(modinfo_data), 0, 0, 1, 0),
        struct.pack("<IIQQQQIIQQ", 10, 3, 0, 0, str_off, len(shstrtab), 0, 0, 1, 0),
    ]
    return body + b"".join(sections)


def test_module_names() -> None:
    assert module_name("kernel/arch/x86/kvm/kvm-amd.ko.xz") == "kvm_amd"
    assert module_name("9pnet_virtio.ko.zst") == "9pnet_virtio"
    assert module_name(Path("a/ext4.ko")) == "ext4"


def test_closure_puts_dependencies_first_once() -> None:
    deps = parse_modules_dep(MODULES_DEP)
    assert deps["kvm_amd"] == ["kvm", "ccp"]
    everything = set(deps)
    order = closure(["9pnet_virtio", "9p", "ext4", "irqbypass", "kvm", "ccp", "kvm_amd"],
                    deps, everything)
    assert order == ["9pnet", "9pnet_virtio", "netfs", "9p", "jbd2", "mbcache", "crc16",
                     "ext4", "irqbypass", "kvm", "ccp", "kvm_amd"]


def test_builtin_or_absent_modules_need_nothing() -> None:
    deps = parse_modules_dep(MODULES_DEP)
    available = set(deps) - {"netfs", "kvm_amd"}
    assert closure(["9p", "kvm_amd", "virtio_pci"], deps, available) == ["9pnet", "9p"]


def test_modinfo_depends_and_softdeps() -> None:
    elf = fake_module({"license": "GPL", "depends": "jbd2,mbcache,crc16",
                       "softdep": "pre: crc32c", "name": "ext4"})
    info = modinfo(elf)
    assert info["name"] == ["ext4"]
    assert deps_from_modinfo(info) == ["jbd2", "mbcache", "crc16", "crc32c"]
    assert deps_from_modinfo(modinfo(fake_module({"depends": ""}))) == []


def test_modinfo_of_garbage_is_a_machine_error() -> None:
    with pytest.raises(MachineError, match="malformed kernel module"):
        modinfo(b"not an elf file at all" * 4)


def _tree(tmp_path: Path, with_dep_file: bool) -> Path:
    moddir = tmp_path / "usr/lib/modules/7.3.4+deb13-amd64"
    mods = {"kernel/arch/x86/kvm/kvm-amd.ko.xz": "kvm,ccp", "kernel/arch/x86/kvm/kvm.ko.xz":
            "irqbypass", "kernel/drivers/crypto/ccp/ccp.ko.xz": "",
            "kernel/virt/lib/irqbypass.ko.xz": "", "kernel/fs/9p/9p.ko.xz": "netfs,9pnet",
            "kernel/net/9p/9pnet.ko.xz": "", "kernel/fs/netfs/netfs.ko.xz": ""}
    for rel, dep in mods.items():
        path = moddir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(lzma.compress(fake_module({"depends": dep})))
    (moddir / "modules.builtin").write_text("kernel/fs/netfs/netfs.ko\n")
    if with_dep_file:
        (moddir / "modules.dep").write_text(MODULES_DEP)
    return moddir


@pytest.mark.parametrize("with_dep_file", [False, True])
def test_resolve_decompresses_the_closure(tmp_path: Path, with_dep_file: bool) -> None:
    moddir = _tree(tmp_path, with_dep_file)
    out = tmp_path / "out"
    order = resolve(moddir, ["9p", "kvm_amd", "virtio_console"], out)
    assert order == ["9pnet", "9p", "irqbypass", "kvm", "ccp", "kvm_amd"]
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{m}.ko" for m in order)
    assert (out / "kvm.ko").read_bytes()[:4] == b"\x7fELF"


def test_decompress_errors_are_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "x.ko.xz"
    bad.write_bytes(b"not xz")
    with pytest.raises(MachineError, match=r"cannot decompress x\.ko\.xz"):
        decompress(bad)
    plain = tmp_path / "y.ko"
    plain.write_bytes(b"\x7fELF")
    assert decompress(plain) == b"\x7fELF"
