"""One-line errors and exit statuses: not fetched, QEMU missing, unknown machine."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kvmmem.cli import app
from kvmmem.machine import Machine, MachineUnavailable
from kvmmem.machine.qemu import console_tail

from .test_cache import make_manifest


def test_not_fetched(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KVMMEM_CACHE_DIR", str(tmp_path))
    with pytest.raises(MachineUnavailable) as info:
        Machine("arm64", "7.3")
    assert str(info.value) == ("machine arm64-7.3 not fetched: run kvmmem machine fetch "
                               "arm64 7.3")
    assert info.value.exit_status == 4


def test_qemu_missing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    make_manifest(tmp_path / "cache")
    monkeypatch.setenv("KVMMEM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    with pytest.raises(MachineUnavailable,
                       match=r"^qemu-system-riscv64 not found: apt-get install "
                             r"qemu-system-misc$"):
        Machine("riscv", "7.2")


def test_command_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    make_manifest(tmp_path / "cache")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "qemu-system-riscv64").write_text("#!/bin/sh\n")
    (bindir / "qemu-system-riscv64").chmod(0o755)
    monkeypatch.setenv("KVMMEM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    machine = Machine("riscv", "7.2", share=tmp_path)
    cmd = machine.qemu_command(tmp_path / "w")
    joined = " ".join(cmd)
    assert cmd[:8] == [str(bindir / "qemu-system-riscv64"), "-M", "virt", "-cpu",
                       "rv64,h=true", "-bios", "default", "-smp"]
    for needle in ("-no-reboot", "-nic none", "virtio-serial-pci",
                   f"socket,id=ch0,path={tmp_path / 'w/agent.sock'},server=on,wait=off",
                   "virtserialport,chardev=ch0,name=kvmmem",
                   f"local,path={tmp_path},mount_tag=kvmmem,security_model=none,readonly=on",
                   "virtio-blk-pci,drive=scratch", "ivshmem-plain,memdev=ivmem",
                   "memory-backend-ram,id=ivmem,size=16M",
                   "memory-backend-ram,id=vfiomem,size=1024M",
                   "ivshmem-plain,memdev=vfiomem,addr=0x10"):
        assert needle in joined, needle
    append = cmd[cmd.index("-append") + 1]
    assert append == ("console=ttyS0 rdinit=/init panic=-1 quiet cryptomgr.notests "
                      "rodata=off hugepages=16 kvmmem.vfio=0000:00:10.0")
    bare = Machine("riscv", "7.2", share=tmp_path, vfio_bar_mib=0)
    assert "vfiomem" not in " ".join(bare.qemu_command(tmp_path / "w"))
    assert "kvmmem.vfio" not in bare.kernel_cmdline()
    assert "kvmmem.shell" in machine.kernel_cmdline(shell=True)
    assert "mon:stdio" not in joined and "-nographic" in machine.qemu_command(
        tmp_path / "w", shell=True)
    assert machine.release == "7.2.13+deb14-riscv64" and machine.name == "riscv-7.2"


def test_console_tail(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    log.write_text("\x1b[6nline one\r\n\nline two\nKernel panic - not syncing\n")
    assert console_tail(log, 2) == "line two | Kernel panic - not syncing"
    assert console_tail(tmp_path / "absent") == "(no console output)"


def test_cli_exit_statuses(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KVMMEM_CACHE_DIR", str(tmp_path))
    runner = CliRunner()
    bad = runner.invoke(app, ["machine", "ping", "arm64", "9.9"])
    assert bad.exit_code == 2
    assert "unknown machine arm64 9.9; known: arm64 5.10|6.1" in bad.output
    missing = runner.invoke(app, ["machine", "ping", "x86", "7.3"])
    assert missing.exit_code == 4
    assert "kvmmem: skipped: machine x86-7.3 not fetched" in missing.output
    shell = runner.invoke(app, ["machine", "shell", "riscv", "6.12"])
    assert shell.exit_code == 4
    listing = runner.invoke(app, ["machine", "list", "--json"])
    assert listing.exit_code == 0
    assert len(listing.output.splitlines()) == 12 and '"fetched": false' in listing.output


def test_cli_list_shows_fetched(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    make_manifest(tmp_path)
    monkeypatch.setenv("KVMMEM_CACHE_DIR", str(tmp_path))
    out = CliRunner().invoke(app, ["machine", "list"]).output
    row = next(line for line in out.splitlines() if "riscv" in line and "7.2" in line)
    assert "yes" in row and "7.2.13-1" in row


def test_initrd_carries_the_vfio_archive(monkeypatch: pytest.MonkeyPatch,
                                         tmp_path: Path) -> None:
    """The cached initramfs, then the vfio modules' archive (when fetched for this
    kernel and the machine has the vfio device), then the current /init."""
    make_manifest(tmp_path / "cache")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "qemu-system-riscv64").write_text("#!/bin/sh\n")
    (bindir / "qemu-system-riscv64").chmod(0o755)
    monkeypatch.setenv("KVMMEM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    for vfio_bar_mib, archive in ((1024, b"v" * 512), (0, b"")):
        work = tmp_path / f"w{vfio_bar_mib}"
        work.mkdir()
        Machine("riscv", "7.2", share=tmp_path, scratch_mib=0,
                vfio_bar_mib=vfio_bar_mib)._prepare(work)
        initrd = (work / "initrd.cpio").read_bytes()
        assert initrd.startswith(b"i" * 512 + archive + b"070701")
