"""Where fetched machines live and their manifests."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kvmmem.machine.catalog import MachineSpec, machines

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
VFIO_CPIO = "vfio.cpio"
"""The vfio modules of a machine's kernel (``/lib/modules/vfio/NAME.ko`` and its
``load`` list), a cpio archive appended to the initramfs at boot.  It lives beside the
manifest, not in it, so a machine fetched before it existed stays valid and gets it
from ``kvmmem machine fetch``."""
VFIO_INFO = "vfio.json"
"""What :data:`VFIO_CPIO` holds: ``{"release", "modules", "size"}``, or ``{"release",
"error"}`` when the modules could not be fetched."""


def cache_root() -> Path:
    """Returns the directory holding every fetched machine: ``$KVMMEM_CACHE_DIR`` when
    set, else ``$XDG_CACHE_HOME/kvmmem/machines`` (``~/.cache/kvmmem/machines``)."""
    env = os.environ.get("KVMMEM_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "kvmmem" / "machines"


def machine_dir(spec: MachineSpec, root: Path | None = None) -> Path:
    """Returns the cache directory of one machine, ``ROOT/ARCH-VERSION``."""
    return (root or cache_root()) / spec.name


@dataclass
class Manifest:
    """What a completed fetch produced (written last, so its presence means done)."""

    arch: str
    version: str
    suite: str
    kernel_package: str
    """Concrete Debian version of the kernel metapackage, e.g. ``7.3.4-1~bpo13+1``."""
    kernel_release: str
    """``uname -r`` of the kernel, e.g. ``7.3.4+deb13-arm64``."""
    packages: dict[str, str]
    """Every downloaded package -> its version."""
    kernel: str
    initramfs: str
    modules: list[str]
    files: dict[str, int]
    """File name (relative to the machine directory) -> size in bytes."""
    python: str
    fetch_seconds: float
    fetched_at: str
    format: int = MANIFEST_FORMAT
    dropped: list[str] = field(default_factory=list)
    """Python extension modules left out (their libraries are not in the guest)."""
    requested: list[str] = field(default_factory=list)
    """The catalog's module list this initramfs was built for (``MachineSpec.modules``):
    a machine fetched for another list is fetched again."""

    @property
    def size(self) -> int:
        """Total bytes of the machine's files."""
        return sum(self.files.values())

    def to_json(self) -> dict[str, Any]:
        """Returns the manifest as a JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Manifest:
        """Returns the manifest of a dict; raises ``KeyError``/``TypeError`` when a
        field is missing or unknown."""
        return cls(**data)


def write_manifest(directory: Path, manifest: Manifest) -> Path:
    """Writes ``manifest.json`` in ``directory`` atomically; returns its path."""
    path = directory / MANIFEST
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest.to_json(), indent=1, sort_keys=True) + "\n",
                   encoding="utf-8")
    tmp.replace(path)
    return path


def load_manifest(spec: MachineSpec, root: Path | None = None) -> Manifest | None:
    """Returns the manifest of a completely fetched machine, ``None`` when it is not
    fetched, half-fetched, of another format, built for another module list, or any of
    its files is missing or has another size."""
    directory = machine_dir(spec, root)
    try:
        data = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
        manifest = Manifest.from_json(data)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if manifest.format != MANIFEST_FORMAT or (manifest.arch, manifest.version) != (
            spec.arch, spec.version) or tuple(manifest.requested) != spec.modules:
        return None
    for name, size in manifest.files.items():
        try:
            if (directory / name).stat().st_size != size:
                return None
        except OSError:
            return None
    return manifest


def fetched_machines(root: Path | None = None) -> list[MachineSpec]:
    """Returns the machines of the catalog that are completely fetched, in catalog
    order."""
    return [spec for spec in machines() if load_manifest(spec, root) is not None]


def load_vfio_info(spec: MachineSpec, manifest: Manifest,
                   root: Path | None = None) -> dict[str, Any] | None:
    """Returns the machine's :data:`VFIO_INFO` when it belongs to the manifest's kernel
    (and, unless it records an ``error``, its archive has the recorded size); ``None``
    when absent, stale or damaged."""
    directory = machine_dir(spec, root)
    try:
        info = json.loads((directory / VFIO_INFO).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or info.get("release") != manifest.kernel_release:
        return None
    if "error" in info:
        return info
    try:
        if (directory / VFIO_CPIO).stat().st_size != info.get("size"):
            return None
    except OSError:
        return None
    return info


def write_vfio_info(directory: Path, info: dict[str, Any]) -> Path:
    """Writes :data:`VFIO_INFO` in ``directory`` atomically; returns its path."""
    path = directory / VFIO_INFO
    tmp = directory / (VFIO_INFO + ".tmp")
    tmp.write_text(json.dumps(info, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path
