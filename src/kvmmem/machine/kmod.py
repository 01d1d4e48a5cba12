"""Kernel modules on the host side: find them in an extracted kernel package, read
their dependencies, decompress them.

Debian's packages ship no ``modules.dep`` (``depmod`` runs at install time), so the
dependencies come from each module's ``.modinfo`` ELF section (``depends=``) unless
a ``modules.dep`` is there."""

from __future__ import annotations

import lzma
import shutil
import struct
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path

from kvmmem.machine.errors import MachineError, MachineUnavailable

SUFFIXES = (".ko.xz", ".ko.zst", ".ko.gz", ".ko")


def module_name(path: str | Path) -> str:
    """Returns the module name of a ``.ko[.xz|.zst|.gz]`` path, ``-`` folded to ``_``."""
    name = Path(path).name
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return name.replace("-", "_")


def index_modules(moddir: Path) -> dict[str, Path]:
    """Returns module name -> file of every module under ``moddir/kernel``."""
    index: dict[str, Path] = {}
    for path in sorted((moddir / "kernel").rglob("*.ko*")):
        if path.name.endswith(SUFFIXES):
            index[module_name(path)] = path
    return index


def read_builtin(moddir: Path) -> set[str]:
    """Returns the names of ``modules.builtin`` (empty when the file is absent)."""
    path = moddir / "modules.builtin"
    if not path.exists():
        return set()
    return {module_name(ln.strip()) for ln in path.read_text().splitlines() if ln.strip()}


def parse_modules_dep(text: str) -> dict[str, list[str]]:
    """Returns module -> direct dependencies from the text of a ``modules.dep``."""
    deps: dict[str, list[str]] = {}
    for line in text.splitlines():
        if ":" not in line:
            continue
        mod, _, rest = line.partition(":")
        deps[module_name(mod.strip())] = [module_name(d) for d in rest.split()]
    return deps


def decompress(path: Path) -> bytes:
    """Returns the plain ELF bytes of a module file (xz via lzma, zstd via the
    ``zstd`` tool, gzip via gzip).

    Raises :class:`MachineUnavailable` when ``zstd`` is needed and missing,
    :class:`MachineError` when the file cannot be decompressed."""
    data = path.read_bytes()
    try:
        if path.name.endswith(".xz"):
            return lzma.decompress(data)
        if path.name.endswith(".gz"):
            import gzip
            return gzip.decompress(data)
        if path.name.endswith(".zst"):
            if shutil.which("zstd") is None:
                raise MachineUnavailable(
                    f"zstd not found (needed for {path.name}): apt-get install zstd")
            return subprocess.run(["zstd", "-dc", str(path)], capture_output=True,
                                  check=True).stdout
    except (lzma.LZMAError, OSError, subprocess.CalledProcessError) as exc:
        raise MachineError(f"cannot decompress {path.name}: {exc}") from None
    return data


def modinfo(elf: bytes) -> dict[str, list[str]]:
    """Returns the ``.modinfo`` section of a 64-bit little-endian ELF module as
    key -> values; raises :class:`MachineError` on a malformed file."""
    try:
        if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
            raise ValueError("not a 64-bit little-endian ELF file")
        shoff, = struct.unpack_from("<Q", elf, 0x28)
        shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)
        sections = [struct.unpack_from("<IIQQQQ", elf, shoff + i * shentsize)
                    for i in range(shnum)]
        stroff = sections[shstrndx][4]
        out: dict[str, list[str]] = {}
        for name_off, _type, _flags, _addr, off, size in sections:
            end = elf.index(b"\0", stroff + name_off)
            if elf[stroff + name_off:end] != b".modinfo":
                continue
            for item in elf[off:off + size].split(b"\0"):
                key, sep, value = item.decode("utf-8", "replace").partition("=")
                if sep:
                    out.setdefault(key, []).append(value)
        return out
    except (ValueError, IndexError, struct.error) as exc:
        raise MachineError(f"malformed kernel module: {exc}") from None


def deps_from_modinfo(info: Mapping[str, list[str]]) -> list[str]:
    """Returns a module's hard dependencies (``depends=``) then its ``softdep pre:``
    modules, as names."""
    names = [d for v in info.get("depends", []) for d in v.split(",") if d]
    for soft in info.get("softdep", []):
        pre = soft.partition("pre:")[2].partition("post:")[0]
        names += pre.split()
    return [module_name(n) for n in names]


def closure(wanted: Iterable[str], deps: Mapping[str, list[str]],
            available: Iterable[str]) -> list[str]:
    """Returns the modules to load for ``wanted``, dependencies first (each once).

    Names not in ``available`` (built in or absent) are dropped with their
    subtrees; ``deps`` maps a module to its direct dependencies."""
    have = set(available)
    order: list[str] = []
    seen: set[str] = set()

    def visit(name: str, stack: tuple[str, ...]) -> None:
        if name in seen or name not in have or name in stack:
            return
        for dep in deps.get(name, []):
            visit(dep, (*stack, name))
        seen.add(name)
        order.append(name)

    for name in wanted:
        visit(module_name(name), ())
    return order


def resolve(moddir: Path, wanted: Iterable[str], outdir: Path) -> list[str]:
    """Decompresses the closure of ``wanted`` from ``moddir`` into ``outdir`` as
    ``NAME.ko``; returns the names in load order.

    Uses ``moddir/modules.dep`` when present, else each module's ``.modinfo``."""
    index = index_modules(moddir)
    builtin = read_builtin(moddir)
    dep_file = moddir / "modules.dep"
    deps: dict[str, list[str]] = (parse_modules_dep(dep_file.read_text())
                                  if dep_file.exists() else {})
    plain: dict[str, bytes] = {}

    def load(name: str) -> bytes:
        if name not in plain:
            plain[name] = decompress(index[name])
        return plain[name]

    # Compute deps lazily from .modinfo for the modules reached.
    if not dep_file.exists():
        todo = [module_name(w) for w in wanted]
        while todo:
            name = todo.pop()
            if name in deps or name not in index or name in builtin:
                continue
            deps[name] = deps_from_modinfo(modinfo(load(name)))
            todo += deps[name]
    order = closure(wanted, deps, set(index) - builtin)
    outdir.mkdir(parents=True, exist_ok=True)
    for name in order:
        (outdir / f"{name}.ko").write_bytes(load(name))
    return order
