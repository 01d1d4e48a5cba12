"""Cache location and manifests: a half-done fetch is never taken as done."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvmmem.machine import (
    UnknownMachine,
    cache_root,
    fetch,
    fetched_machines,
    get_machine,
    load_manifest,
    machine_dir,
)
from kvmmem.machine.cache import (
    MANIFEST,
    VFIO_CPIO,
    VFIO_INFO,
    Manifest,
    load_vfio_info,
    write_manifest,
    write_vfio_info,
)


def test_cache_root_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KVMMEM_CACHE_DIR", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    assert machine_dir(get_machine("arm64", "7.3-16k")) == tmp_path / "c/arm64-7.3-16k"
    monkeypatch.delenv("KVMMEM_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg/kvmmem/machines"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home/.cache/kvmmem/machines"


def make_manifest(root: Path, arch: str = "riscv", version: str = "7.2",
                  vfio: bool = True) -> Manifest:
    """A fetched-looking machine in ``root`` with small fake files (and a fake vfio
    archive unless ``vfio`` is false)."""
    directory = root / f"{arch}-{version}"
    directory.mkdir(parents=True)
    (directory / "vmlinuz").write_bytes(b"k" * 100)
    (directory / "initramfs.cpio").write_bytes(b"i" * 512)
    manifest = Manifest(
        arch=arch, version=version, suite="sid", kernel_package="7.2.13-1",
        kernel_release="7.2.13+deb14-riscv64", packages={"linux-image-riscv64": "7.2.13-1"},
        kernel="vmlinuz", initramfs="initramfs.cpio", modules=["kvm"],
        files={"vmlinuz": 100, "initramfs.cpio": 512}, python="3.13.5-2",
        fetch_seconds=1.0, fetched_at="2026-12-07T00:00:00+00:00",
        requested=list(get_machine(arch, version).modules))
    write_manifest(directory, manifest)
    if vfio:
        (directory / VFIO_CPIO).write_bytes(b"v" * 512)
        write_vfio_info(directory, {"release": manifest.kernel_release,
                                    "modules": ["vfio", "vfio_pci"], "size": 512})
    return manifest


def test_manifest_roundtrip_and_fetched(tmp_path: Path) -> None:
    written = make_manifest(tmp_path)
    spec = get_machine("riscv", "7.2")
    loaded = load_manifest(spec, tmp_path)
    assert loaded == written and loaded.size == 612
    assert [s.name for s in fetched_machines(tmp_path)] == ["riscv-7.2"]
    assert load_manifest(get_machine("riscv", "6.12"), tmp_path) is None


def test_incomplete_machines_are_not_fetched(tmp_path: Path) -> None:
    make_manifest(tmp_path)
    spec = get_machine("riscv", "7.2")
    directory = machine_dir(spec, tmp_path)
    (directory / "initramfs.cpio").write_bytes(b"short")
    assert load_manifest(spec, tmp_path) is None
    (directory / "initramfs.cpio").unlink()
    assert load_manifest(spec, tmp_path) is None
    (directory / MANIFEST).write_text("{not json")
    assert load_manifest(spec, tmp_path) is None
    (directory / MANIFEST).write_text(json.dumps({"arch": "riscv"}))
    assert load_manifest(spec, tmp_path) is None
    assert fetched_machines(tmp_path) == []


def test_machine_built_for_another_module_list_is_fetched_again(tmp_path: Path) -> None:
    """A catalog that asks for more modules (arm64 gained virtio_gpu for the dmabuf
    kind) makes an older initramfs stale."""
    make_manifest(tmp_path)
    spec = get_machine("riscv", "7.2")
    path = machine_dir(spec, tmp_path) / MANIFEST
    data = json.loads(path.read_text())
    data["requested"] = data["requested"][:-1]
    path.write_text(json.dumps(data))
    assert load_manifest(spec, tmp_path) is None
    del data["requested"]
    path.write_text(json.dumps(data))
    assert load_manifest(spec, tmp_path) is None


def test_manifest_of_another_machine_is_ignored(tmp_path: Path) -> None:
    make_manifest(tmp_path)
    (tmp_path / "riscv-7.2").rename(tmp_path / "riscv-6.12")
    assert load_manifest(get_machine("riscv", "6.12"), tmp_path) is None


def test_fetch_of_a_cached_machine_downloads_nothing(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    written = make_manifest(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path / "no-tools"))  # apt-get would be missing
    lines: list[str] = []
    assert fetch("riscv", "7.2", progress=lines.append, root=tmp_path) == written
    assert lines == []
    with pytest.raises(UnknownMachine):
        fetch("riscv", "7.3", root=tmp_path)


def test_vfio_archive_belongs_to_the_kernel(tmp_path: Path) -> None:
    """The vfio archive lives beside the manifest (a manifest without it stays valid);
    it counts only for the manifest's kernel release and at its recorded size."""
    manifest = make_manifest(tmp_path)
    spec = get_machine("riscv", "7.2")
    directory = machine_dir(spec, tmp_path)
    assert load_vfio_info(spec, manifest, tmp_path) == {
        "release": "7.2.13+deb14-riscv64", "modules": ["vfio", "vfio_pci"], "size": 512}
    (directory / VFIO_CPIO).write_bytes(b"short")
    assert load_vfio_info(spec, manifest, tmp_path) is None
    (directory / VFIO_CPIO).unlink()
    assert load_vfio_info(spec, manifest, tmp_path) is None
    write_vfio_info(directory, {"release": "7.2.1+deb14-riscv64", "modules": [], "size": 0})
    assert load_vfio_info(spec, manifest, tmp_path) is None
    write_vfio_info(directory, {"release": manifest.kernel_release, "error": "gone"})
    assert load_vfio_info(spec, manifest, tmp_path) == {
        "release": manifest.kernel_release, "error": "gone"}
    (directory / VFIO_INFO).write_text("{not json")
    assert load_vfio_info(spec, manifest, tmp_path) is None
    assert load_manifest(spec, tmp_path) == manifest


def test_fetch_without_the_vfio_archive_fails_softly(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine fetched before the vfio archive existed gets it from the next fetch;
    when that cannot download (here: no apt), the machine is still returned, the reason
    is said and recorded, and a later fetch tries again."""
    written = make_manifest(tmp_path, vfio=False)
    monkeypatch.setenv("PATH", str(tmp_path / "no-tools"))
    lines: list[str] = []
    assert fetch("riscv", "7.2", progress=lines.append, root=tmp_path) == written
    assert lines[0] == "riscv-7.2: vfio modules: downloading linux-image-riscv64=7.2.13-1"
    assert lines[-1] == ("riscv-7.2: vfio modules not fetched: apt-get not found: this "
                         "needs a Debian host with apt")
    said = len(lines)
    spec = get_machine("riscv", "7.2")
    info = load_vfio_info(spec, written, tmp_path)
    assert info is not None and "apt" in info["error"]
    assert fetch("riscv", "7.2", progress=lines.append, root=tmp_path) == written
    assert len(lines) == 2 * said


def test_vfio_archive_holds_the_closure_and_its_load_list(tmp_path: Path) -> None:
    """What ``kvmmem machine fetch`` adds beside a machine: the vfio modules of its kernel
    with their dependencies (those the kernel lacks are left out) and the load order."""
    import lzma

    from kvmmem.machine.cpio import read_cpio
    from kvmmem.machine.fetch import write_vfio_archive

    from .test_kmod import fake_module

    moddir = tmp_path / "usr/lib/modules/7.2.13+deb14-riscv64"
    mods = {"drivers/vfio/vfio.ko.xz": "", "virt/lib/irqbypass.ko.xz": "",
            "drivers/vfio/pci/vfio-pci-core.ko.xz": "vfio,irqbypass",
            "drivers/vfio/pci/vfio-pci.ko.xz": "vfio,vfio-pci-core"}
    for rel, dep in mods.items():
        path = moddir / "kernel" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(lzma.compress(fake_module({"depends": dep})))
    out = tmp_path / "out"
    out.mkdir()
    loaded = write_vfio_archive(moddir, "7.2.13+deb14-riscv64", tmp_path / "work", out)
    assert loaded == ["vfio", "irqbypass", "vfio_pci_core", "vfio_pci"]  # no type1 here
    entries = read_cpio(out / VFIO_CPIO)
    assert entries["usr/lib/modules/vfio/load"][1] == b"vfio\nirqbypass\nvfio_pci_core\nvfio_pci\n"
    assert entries["usr/lib/modules/vfio/vfio_pci.ko"][1][:4] == b"\x7fELF"
    info = json.loads((out / VFIO_INFO).read_text())
    assert info == {"release": "7.2.13+deb14-riscv64", "modules": loaded,
                    "size": (out / VFIO_CPIO).stat().st_size}
