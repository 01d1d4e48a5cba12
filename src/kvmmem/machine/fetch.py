"""``fetch``: download a machine's kernel and userland, build its initramfs, cache it."""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from kvmmem.machine import initramfs as ir
from kvmmem.machine.apt import AptConfig, depends, mirror_uri
from kvmmem.machine.cache import (
    VFIO_CPIO,
    Manifest,
    cache_root,
    load_manifest,
    load_vfio_info,
    machine_dir,
    write_manifest,
    write_vfio_info,
)
from kvmmem.machine.catalog import (
    PYTHON_VERSION,
    USERLAND_SUITE,
    VFIO_MODULES,
    MachineSpec,
    get_machine,
)
from kvmmem.machine.cpio import write_cpio
from kvmmem.machine.errors import MachineError
from kvmmem.machine.kmod import resolve

Progress = Callable[[str], None]

PY = PYTHON_VERSION
USERLAND_PACKAGES = (
    "busybox-static",
    f"python{PY}-minimal",
    f"libpython{PY}-minimal",
    f"libpython{PY}-stdlib",
    "libc6",
)


def terminal_progress() -> Progress | None:
    """Returns a printer of progress lines on stderr when stderr is a terminal, else
    ``None`` (quiet when piped)."""
    if not sys.stderr.isatty():
        return None

    def show(line: str) -> None:
        print(f"kvmmem: {line}", file=sys.stderr, flush=True)

    return show


def kernel_packages(apt: AptConfig, metapackage: str) -> tuple[str, dict[str, str]]:
    """Returns the metapackage's version and the concrete kernel packages it pulls in
    (name -> version): the ``linux-*`` closure of its Depends whose names carry a
    version (image, binary, modules, base of 7.x; the image alone before).

    Raises :class:`MachineError` when the suite lacks a package."""
    meta = apt.show(metapackage)
    found: dict[str, str] = {}
    seen: set[str] = set()
    todo = [metapackage]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        record = meta if name == metapackage else apt.show(name)
        if re.search(r"-\d+\.\d+", name):
            found[name] = record.get("Version", "")
        for alts in depends(record):
            pick = next((a for a in alts if a.startswith("linux-")
                         and a != "linux-initramfs-tool"), None)
            if pick is not None:
                todo.append(pick)
    if not found:
        raise MachineError(f"{metapackage} in {apt.suite} depends on no kernel package")
    return meta.get("Version", ""), found


def _find_kernel(root: Path) -> tuple[Path, str]:
    """Returns the kernel image in an extracted kernel tree and its release."""
    candidates = [p for pattern in ("boot/vmlinuz-*", "boot/vmlinux-*",
                                    "usr/lib/modules/*/vmlinuz", "lib/modules/*/vmlinuz")
                  for p in sorted(root.glob(pattern))]
    if not candidates:
        raise MachineError("the kernel packages hold no vmlinuz")
    image = candidates[0]
    in_boot = image.parent.name == "boot"
    release = image.name.split("-", 1)[1] if in_boot else image.parent.name
    return image, release


def _module_dir(root: Path, release: str) -> Path:
    for d in (root / "usr/lib/modules" / release, root / "lib/modules" / release):
        if d.is_dir():
            return d
    raise MachineError(f"the kernel packages hold no modules directory for {release}")


def fetch(arch: str, version: str, progress: Progress | None = None, *,
          force: bool = False, root: Path | None = None) -> Manifest:
    """Fetches machine ``arch`` ``version`` into the cache unless already there;
    returns its manifest.

    Downloads (never installs) the kernel packages of the machine's suite and
    trixie's busybox-static and Python for the guest's architecture with a private
    apt configuration, builds an uncompressed cpio initramfs, and writes the
    manifest last after moving the finished directory into place.  ``progress``
    gets one line per step (default: stderr when it is a terminal).

    Raises :class:`~kvmmem.machine.errors.UnknownMachine` for a machine not in the
    catalog, :class:`MachineError` when a download or a step fails and
    :class:`~kvmmem.machine.errors.MachineUnavailable` when a host tool is missing."""
    spec = get_machine(arch, version)
    root = root or cache_root()
    say = progress if progress is not None else (terminal_progress() or (lambda _l: None))
    if not force:
        done = load_manifest(spec, root)
        if done is not None and _has_vfio(spec, done, root):
            return done
    root.mkdir(parents=True, exist_ok=True)
    # One fetch at a time per cache: machines share the private apt lists (apt's own
    # locking is off, the lists are ours) and the host's two cores.
    with open(root / ".fetch.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not force:
            done = load_manifest(spec, root)
            if done is not None:
                if not _has_vfio(spec, done, root):
                    fetch_vfio_modules(spec, done, root, say)
                return done
        tmp = root / f".{spec.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        for stale in root.glob(f".{spec.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        try:
            return _fetch_into(spec, root, tmp, say)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _fetch_into(spec: MachineSpec, root: Path, tmp: Path, say: Progress) -> Manifest:
    start = time.monotonic()
    mirror = mirror_uri()
    work = tmp / "work"
    debs = work / "debs"
    kroot = work / "kernel"
    rootfs = work / "rootfs"
    for d in (debs, kroot, rootfs):
        d.mkdir(parents=True)

    kapt = AptConfig(root / "apt" / f"{spec.suite}-{spec.debian_arch}", spec.suite,
                     spec.debian_arch, mirror)
    say(f"{spec.name}: apt update {spec.suite} {spec.debian_arch}")
    kapt.update()
    meta_version, kpkgs = kernel_packages(kapt, spec.metapackage)
    say(f"{spec.name}: {spec.metapackage} {meta_version}: downloading {', '.join(kpkgs)}")
    packages = dict(kpkgs)
    for deb in kapt.download(sorted(kpkgs), debs / "kernel"):
        ir.dpkg_extract(deb, kroot)
        deb.unlink()
    image, release = _find_kernel(kroot)
    moddir = _module_dir(kroot, release)

    uapt = AptConfig(root / "apt" / f"{USERLAND_SUITE}-{spec.debian_arch}", USERLAND_SUITE,
                     spec.debian_arch, mirror)
    if uapt.root != kapt.root:
        say(f"{spec.name}: apt update {USERLAND_SUITE} {spec.debian_arch}")
        uapt.update()
    say(f"{spec.name}: downloading busybox and python{PY} ({USERLAND_SUITE} {spec.debian_arch})")
    for name in USERLAND_PACKAGES:
        packages[name] = uapt.show(name).get("Version", "")
    for deb in uapt.download(list(USERLAND_PACKAGES), debs / "user"):
        ir.dpkg_extract(deb, rootfs)
        deb.unlink()
    dropped = _python_libraries(uapt, rootfs, debs / "user", packages, say, spec)
    ir.merge_usr(rootfs)
    ir.install_busybox(rootfs)
    ir.trim_python(rootfs, PY)

    say(f"{spec.name}: modules")
    loaded = resolve(moddir, spec.modules, rootfs / "usr/lib/modules")
    ir.write_init(rootfs, loaded)

    out = tmp / "out"
    out.mkdir()
    write_vfio_archive(moddir, release, work / "vfio", out)
    shutil.copy2(image, out / "vmlinuz")
    config = next(iter([*sorted(kroot.glob("boot/config-*")), moddir / "config"]), None)
    files = ["vmlinuz", "initramfs.cpio"]
    if config is not None and config.exists():
        shutil.copy2(config, out / "config")
        files.append("config")
    say(f"{spec.name}: initramfs")
    write_cpio(rootfs, out / "initramfs.cpio")
    shutil.rmtree(work)

    manifest = Manifest(
        arch=spec.arch, version=spec.version, suite=spec.suite,
        kernel_package=meta_version, kernel_release=release, packages=packages,
        kernel="vmlinuz", initramfs="initramfs.cpio", modules=loaded,
        files={f: (out / f).stat().st_size for f in files},
        python=packages.get(f"python{PY}-minimal", ""),
        fetch_seconds=round(time.monotonic() - start, 1),
        fetched_at=datetime.now(UTC).isoformat(timespec="seconds"),
        dropped=dropped, requested=list(spec.modules),
    )
    final = machine_dir(spec, root)
    if final.exists():
        shutil.rmtree(final)
    out.rename(final)
    write_manifest(final, manifest)
    say(f"{spec.name}: fetched {release} ({manifest.size / 2**20:.0f} MiB, "
        f"{manifest.fetch_seconds:.0f} s) into {final}")
    return manifest


def _has_vfio(spec: MachineSpec, manifest: Manifest, root: Path) -> bool:
    """Whether the machine has its vfio archive (or a recorded reason it cannot)."""
    info = load_vfio_info(spec, manifest, root)
    return info is not None and "error" not in info


def write_vfio_archive(moddir: Path, release: str, work: Path, out: Path) -> list[str]:
    """Builds :data:`~kvmmem.machine.cache.VFIO_CPIO` of the :data:`VFIO_MODULES` closure
    found in ``moddir`` (those the kernel lacks are left out: riscv has no
    ``vfio_iommu_type1``) into ``out``, with its info file; returns the modules in load
    order."""
    target = work / "usr/lib/modules/vfio"
    loaded = resolve(moddir, VFIO_MODULES, target)
    (target / "load").write_text("".join(m + "\n" for m in loaded), encoding="utf-8")
    size = write_cpio(work, out / VFIO_CPIO)
    write_vfio_info(out, {"release": release, "modules": loaded, "size": size})
    return loaded


def fetch_vfio_modules(spec: MachineSpec, manifest: Manifest, root: Path,
                       progress: Progress) -> None:
    """Adds the vfio archive to a machine fetched without it: downloads the exact kernel
    packages of its manifest again (their modules must match the cached kernel) and
    keeps only the vfio modules.  A failure does not fail the fetch (the machine runs
    everything else): it is said on ``progress`` and recorded in the info file, whose
    ``error`` a ``vfio-bar`` mapping then reports; the next fetch tries again."""
    directory = machine_dir(spec, root)
    tmp = root / f".{spec.name}.vfio-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        kapt = AptConfig(root / "apt" / f"{spec.suite}-{spec.debian_arch}", spec.suite,
                         spec.debian_arch, mirror_uri())
        wanted = [f"{name}={version}" for name, version in sorted(manifest.packages.items())
                  if name.startswith(("linux-image-", "linux-modules-"))]
        progress(f"{spec.name}: vfio modules: downloading {', '.join(wanted)}")
        kapt.update()
        for deb in kapt.download(wanted, tmp / "debs"):
            ir.dpkg_extract(deb, tmp / "kernel")
            deb.unlink()
        moddir = _module_dir(tmp / "kernel", manifest.kernel_release)
        loaded = write_vfio_archive(moddir, manifest.kernel_release, tmp / "vfio", directory)
        progress(f"{spec.name}: vfio modules {', '.join(loaded)}")
    except MachineError as exc:
        progress(f"{spec.name}: vfio modules not fetched: {exc}")
        write_vfio_info(directory, {"release": manifest.kernel_release, "error": str(exc)})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _python_libraries(apt: AptConfig, rootfs: Path, debdir: Path, packages: dict[str, str],
                      say: Progress, spec: MachineSpec) -> list[str]:
    """Adds the shared libraries the guest's Python and its extensions need (ELF
    NEEDED, to a fixed point); removes the extensions needing a library that is not
    in :data:`~kvmmem.machine.initramfs.SONAME_PACKAGES` or whose package the suite
    lacks.  Returns the removed extensions' file names."""
    dropped: list[str] = []
    tried: set[str] = set()
    while True:
        missing: dict[str, list[Path]] = {}
        for elf in ir.python_elves(rootfs, PY):
            if not elf.exists():
                continue
            for soname in ir.elf_needed(elf):
                if ir.find_library(rootfs, soname) is None:
                    missing.setdefault(soname, []).append(elf)
        wanted: list[str] = []
        for soname, users in sorted(missing.items()):
            package = ir.SONAME_PACKAGES.get(soname)
            if package is not None and package not in tried:
                if package not in wanted:
                    wanted.append(package)
                continue
            for user in users:
                if "lib-dynload" in str(user) and user.exists():
                    user.unlink()
                    dropped.append(user.name)
        if not wanted:
            return sorted(dropped)
        say(f"{spec.name}: libraries {', '.join(wanted)}")
        available = []
        for name in wanted:
            tried.add(name)
            try:
                packages[name] = apt.show(name).get("Version", "")
                available.append(name)
            except MachineError:
                continue
        if available:
            for deb in apt.download(available, debdir):
                ir.dpkg_extract(deb, rootfs)
                deb.unlink()
