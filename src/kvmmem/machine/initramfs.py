"""The guest's root filesystem: busybox, Python, kernel modules and ``/init``."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from kvmmem.machine.errors import MachineError, MachineUnavailable

SHARE_TAG = "kvmmem"
SHARE_MOUNT = "/mnt/kvmmem"
SCRATCH_MOUNT = "/mnt/scratch"
PORT_NAME = "kvmmem"
PORT_PATH = f"/dev/virtio-ports/{PORT_NAME}"
SHELL_FLAG = "kvmmem.shell"

BUSYBOX_APPLETS = (
    "sh", "ash", "mount", "umount", "insmod", "rmmod", "lsmod", "mkdir", "rmdir",
    "poweroff", "reboot", "halt", "cat", "ls", "echo", "ln", "sleep", "grep", "dmesg",
    "setsid", "cttyhack", "uname", "ps", "free", "df", "du", "mknod", "rm", "cp", "mv",
    "vi", "head", "tail", "sed", "awk", "hexdump", "find", "chmod", "sync", "stat",
    "top", "kill", "env", "true", "false", "test", "[", "seq", "wc", "dd", "tr", "cut",
    "sort", "uptime", "basename", "dirname", "readlink", "touch", "less", "more",
    "printf", "xargs", "id", "date", "time", "timeout", "od", "strings", "watch",
)

STDLIB_TRIM = (
    "test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "pydoc_data",
    "turtle.py", "__phello__", "sqlite3", "curses", "dbm", "venv", "config-*",
)

SONAME_PACKAGES = {
    "libz.so.1": "zlib1g",
    "libexpat.so.1": "libexpat1",
    "libffi.so.8": "libffi8",
    "libbz2.so.1.0": "libbz2-1.0",
    "liblzma.so.5": "liblzma5",
    "libzstd.so.1": "libzstd1",
    "libmpdec.so.4": "libmpdec4",
    "libmpdec.so.3": "libmpdec3",
    "libuuid.so.1": "libuuid1",
    "libcrypt.so.1": "libcrypt1",
}
"""Shared libraries the guest's Python may use and their Debian packages; an
extension module needing any other library (OpenSSL, sqlite, curses, readline,
dbm) is left out of the initramfs."""

INIT_SCRIPT = r"""#!/bin/sh
# kvmmem guest init (busybox sh): modules, 9p share, scratch disk, hugetlb pool,
# then the agent on the virtio-serial port (or a shell with kvmmem.shell).
export PATH=/usr/bin:/usr/sbin:/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm /tmp /mnt/kvmmem /mnt/scratch /dev/virtio-ports
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /dev/shm
mount -t devpts devpts /dev/pts 2>/dev/null
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
echo "kvmmem: init $(cut -d' ' -f1 /proc/uptime)s"
for m in $(cat /lib/modules/kvmmem.load); do
    insmod /lib/modules/$m.ko 2>/dev/null || echo "kvmmem: insmod $m failed"
done
# udev's /dev/virtio-ports/NAME links, made by hand
i=0
grep -q kvmmem.shell /proc/cmdline && i=50
while [ $i -lt 50 ]; do
    for p in /sys/class/virtio-ports/*; do
        [ -e "$p/name" ] || continue
        n=$(cat "$p/name")
        [ -n "$n" ] && ln -sf "/dev/${p##*/}" "/dev/virtio-ports/$n"
    done
    [ -e /dev/virtio-ports/kvmmem ] && break
    i=$((i + 1)); sleep 0.1
done
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144,cache=loose kvmmem /mnt/kvmmem \
    || echo "kvmmem: 9p mount of the share failed"
if [ -b /dev/vda ]; then
    mount -t ext4 /dev/vda /mnt/scratch || echo "kvmmem: scratch disk mount failed"
fi
# ivshmem-plain: enable its BARs so resource2 can be mmapped without a driver
for d in /sys/bus/pci/devices/*; do
    if [ "$(cat $d/vendor)" = 0x1af4 ] && [ "$(cat $d/device)" = 0x1110 ]; then
        echo 1 > $d/enable 2>/dev/null
    fi
done
hp=$(sed -n 's/.*hugepages=\([0-9]*\).*/\1/p' /proc/cmdline)
if [ -n "$hp" ] && [ "$(cat /proc/sys/vm/nr_hugepages)" = 0 ]; then
    echo "$hp" > /proc/sys/vm/nr_hugepages
fi
[ -e /sys/module/kvm_amd/parameters/npt ] && \
    echo "kvmmem: kvm_amd npt=$(cat /sys/module/kvm_amd/parameters/npt)"
echo "kvmmem: modules loaded $(cut -d' ' -f1 /proc/uptime)s"
cd /
if grep -q kvmmem.shell /proc/cmdline; then
    echo "kvmmem: shell; the share is at /mnt/kvmmem (PYTHONPATH is set); poweroff -f to leave"
    export PYTHONPATH=/mnt/kvmmem PYTHONDONTWRITEBYTECODE=1 HOME=/tmp
    setsid cttyhack sh
else
    # The port is the agent's stdin and stdout (a character device: not seekable,
    # so it cannot be opened "r+" by path); stderr stays on the console.
    PYTHONPATH=/mnt/kvmmem PYTHONDONTWRITEBYTECODE=1 HOME=/tmp \
        python3 -m kvmmem.realkvm.agent --poweroff <>/dev/virtio-ports/kvmmem >&0
    echo "kvmmem: agent exited with status $?"
fi
sync
poweroff -f
echo o > /proc/sysrq-trigger
"""


def dpkg_extract(deb: Path, dest: Path) -> None:
    """``dpkg-deb -x deb dest`` (no maintainer scripts); raises :class:`MachineError`."""
    if shutil.which("dpkg-deb") is None:
        raise MachineUnavailable("dpkg-deb not found: apt-get install dpkg")
    proc = subprocess.run(["dpkg-deb", "-x", str(deb), str(dest)], capture_output=True,
                          text=True, check=False)
    if proc.returncode != 0:
        raise MachineError(f"dpkg-deb -x {deb.name} failed: {proc.stderr.strip()[-300:]}")


def merge_usr(root: Path) -> None:
    """Makes ``/bin``, ``/sbin``, ``/lib``, ``/lib64`` symlinks into ``/usr`` (moving
    anything a package put there), as a merged-/usr Debian system has them."""
    for name in ("bin", "sbin", "lib", "lib64"):
        top, usr = root / name, root / "usr" / name
        usr.mkdir(parents=True, exist_ok=True)
        if top.is_dir() and not top.is_symlink():
            for item in top.iterdir():
                target = usr / item.name
                if not target.exists() and not target.is_symlink():
                    item.rename(target)
            shutil.rmtree(top)
        if not top.is_symlink():
            top.symlink_to(f"usr/{name}")


def elf_needed(path: Path) -> list[str]:
    """Returns the ``DT_NEEDED`` sonames of an ELF file (``readelf -d``); raises
    :class:`MachineUnavailable` without binutils."""
    if shutil.which("readelf") is None:
        raise MachineUnavailable("readelf not found: apt-get install binutils")
    proc = subprocess.run(["readelf", "-d", str(path)], capture_output=True, text=True,
                          check=False)
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", proc.stdout)


def find_library(root: Path, soname: str) -> Path | None:
    """Returns where ``soname`` is in the tree (usr/lib and its multiarch dirs)."""
    multiarch = sorted((root / "usr/lib").glob("*-linux-gnu*"))
    for d in (root / "usr/lib", root / "usr/lib64", *multiarch):
        if (d / soname).exists() or (d / soname).is_symlink():
            return d / soname
    return None


def python_elves(root: Path, version: str) -> list[Path]:
    """Returns the Python binary, its extension modules and the libraries besides libc
    in the tree: everything whose NEEDED must be satisfied."""
    libdir = root / f"usr/lib/python{version}"
    elves = [root / f"usr/bin/python{version}", *sorted(libdir.glob("lib-dynload/*.so"))]
    for soname in SONAME_PACKAGES:
        lib = find_library(root, soname)
        if lib is not None:
            elves.append(lib)
    return elves


def trim_python(root: Path, version: str) -> None:
    """Removes what a guest agent never uses from the stdlib (tests, GUI, docs,
    bytecode caches) and ``/usr/share``."""
    libdir = root / f"usr/lib/python{version}"
    for pattern in STDLIB_TRIM:
        for path in libdir.glob(pattern):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
    for cache in list(libdir.rglob("__pycache__")):
        shutil.rmtree(cache, ignore_errors=True)
    shutil.rmtree(root / "usr/share", ignore_errors=True)
    for gconv in (root / "usr/lib").glob("*/gconv"):
        shutil.rmtree(gconv)
    for extra in ("etc", "var", "usr/lib/valgrind", "usr/libexec"):
        shutil.rmtree(root / extra, ignore_errors=True)


def install_busybox(root: Path) -> None:
    """Puts busybox at ``/usr/bin/busybox`` with the applet links ``/init`` uses;
    raises :class:`MachineError` when busybox-static left no binary."""
    candidates = [root / "usr/bin/busybox", root / "bin/busybox", root / "usr/sbin/busybox"]
    found = next((c for c in candidates if c.exists() and not c.is_symlink()), None)
    if found is None:
        raise MachineError("busybox-static package had no busybox binary")
    dest = root / "usr/bin/busybox"
    if found != dest:
        shutil.move(str(found), dest)
    for applet in BUSYBOX_APPLETS:
        link = root / "usr/bin" / applet
        if not link.exists() and not link.is_symlink():
            link.symlink_to("busybox")
    py = root / "usr/bin/python3"
    if not py.exists() and not py.is_symlink():
        for cand in sorted((root / "usr/bin").glob("python3.*")):
            py.symlink_to(cand.name)
            break


def init_overlay() -> bytes:
    """Returns a cpio archive holding only the current ``/init``: appended to a cached
    initramfs at boot (the kernel unpacks concatenated archives, later entries
    replacing earlier ones), so a changed ``/init`` needs no new fetch."""
    from kvmmem.machine.cpio import cpio_bytes

    return cpio_bytes([("init", 0o100755, INIT_SCRIPT.encode())])


def write_init(root: Path, modules: list[str]) -> None:
    """Writes ``/init`` and ``/lib/modules/kvmmem.load`` (the modules in load order)
    and the empty mount points."""
    (root / "init").write_text(INIT_SCRIPT, encoding="utf-8")
    os.chmod(root / "init", 0o755)
    moddir = root / "usr/lib/modules"
    moddir.mkdir(parents=True, exist_ok=True)
    (moddir / "kvmmem.load").write_text("".join(m + "\n" for m in modules), encoding="utf-8")
    for d in ("proc", "sys", "dev", "tmp", "mnt/kvmmem", "mnt/scratch", "root", "run"):
        (root / d).mkdir(parents=True, exist_ok=True)
