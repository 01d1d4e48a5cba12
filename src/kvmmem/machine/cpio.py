"""An uncompressed ``newc`` cpio writer (what the kernel unpacks as initramfs)."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO


def _header(ino: int, mode: int, size: int, name: bytes, nlink: int = 1) -> bytes:
    fields = (ino, mode, 0, 0, nlink, 0, size, 0, 0, 0, 0, len(name) + 1, 0)
    head = b"070701" + b"".join(b"%08X" % f for f in fields) + name + b"\0"
    return head + b"\0" * (-len(head) % 4)


def _entry(out: BinaryIO, ino: int, mode: int, name: str, data: bytes = b"") -> int:
    out.write(_header(ino, mode, len(data), name.encode()))
    out.write(data)
    out.write(b"\0" * (-len(data) % 4))
    return ino + 1


def cpio_bytes(entries: list[tuple[str, int, bytes]]) -> bytes:
    """Returns a newc archive of ``(name, mode, data)`` entries (``mode`` with its
    file type bits), trailer included, padded to 512 bytes."""
    import io

    out = io.BytesIO()
    ino = 1
    for name, mode, data in entries:
        ino = _entry(out, ino, mode, name, data)
    out.write(_header(0, 0, 0, b"TRAILER!!!"))
    out.write(b"\0" * (-out.tell() % 512))
    return out.getvalue()


def write_cpio(root: Path, out_path: Path) -> int:
    """Writes every file, directory and symlink under ``root`` into a newc archive
    at ``out_path`` (owner root, paths relative, parents before children); returns
    the archive's size in bytes."""
    ino = 1
    with open(out_path, "wb") as out:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            base = Path(dirpath)
            rel_dir = base.relative_to(root)
            if rel_dir != Path("."):
                ino = _entry(out, ino, stat.S_IFDIR | 0o755, str(rel_dir))
            # os.walk lists symlinks to directories among dirnames: write them here.
            for name in sorted(filenames + [d for d in dirnames if (base / d).is_symlink()]):
                path = base / name
                rel = str(rel_dir / name) if rel_dir != Path(".") else name
                st = path.lstat()
                if stat.S_ISLNK(st.st_mode):
                    ino = _entry(out, ino, stat.S_IFLNK | 0o777, rel,
                                 os.readlink(path).encode())
                elif stat.S_ISREG(st.st_mode):
                    ino = _entry(out, ino, stat.S_IFREG | (st.st_mode & 0o777), rel,
                                 path.read_bytes())
            dirnames[:] = [d for d in dirnames if not (base / d).is_symlink()]
        out.write(_header(0, 0, 0, b"TRAILER!!!"))
        out.write(b"\0" * (-out.tell() % 512))
        return out.tell()


def read_cpio(path: Path) -> dict[str, tuple[int, bytes]]:
    """Returns name -> (mode, data) of a newc archive (for tests and checks)."""
    data = path.read_bytes()
    pos = 0
    entries: dict[str, tuple[int, bytes]] = {}
    while True:
        if data[pos:pos + 6] != b"070701":
            raise ValueError(f"bad cpio magic at {pos}")
        fields = [int(data[pos + 6 + 8 * i: pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        pos += 110
        name = data[pos:pos + namesize - 1].decode()
        pos += namesize
        pos += -pos % 4
        if name == "TRAILER!!!":
            return entries
        entries[name] = (mode, data[pos:pos + size])
        pos += size
        pos += -pos % 4
