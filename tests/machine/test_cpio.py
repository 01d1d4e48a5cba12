"""The newc cpio writer."""

from __future__ import annotations

import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from kvmmem.machine.cpio import cpio_bytes, read_cpio, write_cpio
from kvmmem.machine.initramfs import INIT_SCRIPT, init_overlay


def _tree(root: Path) -> None:
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/busybox").write_bytes(b"\x7fELF" + bytes(range(256)))
    (root / "usr/bin/busybox").chmod(0o755)
    (root / "usr/bin/sh").symlink_to("busybox")
    (root / "bin").symlink_to("usr/bin")
    (root / "init").write_text("#!/bin/sh\n")
    (root / "empty").mkdir()


def test_roundtrip(tmp_path: Path) -> None:
    root = tmp_path / "root"
    _tree(root)
    size = write_cpio(root, tmp_path / "out.cpio")
    assert size % 512 == 0 and size == (tmp_path / "out.cpio").stat().st_size
    entries = read_cpio(tmp_path / "out.cpio")
    assert set(entries) == {"usr", "usr/bin", "usr/bin/busybox", "usr/bin/sh", "bin", "init",
                            "empty"}
    mode, data = entries["usr/bin/busybox"]
    assert stat.S_ISREG(mode) and mode & 0o777 == 0o755 and data[:4] == b"\x7fELF"
    assert entries["bin"] == (stat.S_IFLNK | 0o777, b"usr/bin")
    assert stat.S_ISDIR(entries["empty"][0])
    names = list(entries)
    assert names.index("usr") < names.index("usr/bin") < names.index("usr/bin/busybox")


@pytest.mark.skipif(shutil.which("cpio") is None, reason="no cpio tool to cross-check")
def test_gnu_cpio_reads_it(tmp_path: Path) -> None:
    root = tmp_path / "root"
    _tree(root)
    write_cpio(root, tmp_path / "out.cpio")
    with open(tmp_path / "out.cpio", "rb") as archive:
        listing = subprocess.run(["cpio", "-it", "--quiet"], stdin=archive,
                                 capture_output=True, text=True, check=True).stdout.split()
    assert "usr/bin/busybox" in listing and "bin" in listing


def test_init_overlay_holds_the_current_init(tmp_path: Path) -> None:
    (tmp_path / "o.cpio").write_bytes(init_overlay())
    entries = read_cpio(tmp_path / "o.cpio")
    assert entries == {"init": (0o100755, INIT_SCRIPT.encode())}
    assert len(cpio_bytes([])) == 512


def test_init_script_recipe() -> None:
    assert INIT_SCRIPT.startswith("#!/bin/sh\n")
    for needle in ("mount -t 9p", "trans=virtio", "kvmmem /mnt/kvmmem", "/mnt/scratch",
                   "nr_hugepages", "kvmmem.shell", "python3 -m kvmmem.realkvm.agent",
                   "--poweroff", "PYTHONPATH=/mnt/kvmmem", "PYTHONDONTWRITEBYTECODE=1",
                   "poweroff -f", "/lib/modules/kvmmem.load"):
        assert needle in INIT_SCRIPT, needle
