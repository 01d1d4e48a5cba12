"""The machines kvmmem can boot: an architecture and a Debian kernel version.

Every fact here comes from ``kernel-matrix.md`` (the measured recipe): the Debian
suite that carries each kernel version, the kernel metapackage, the QEMU binary
and arguments, the serial console and the modules the guest needs on top of the
common virtio / 9p / ext4 set.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvmmem.machine.errors import UnknownMachine

ARCHES = ("arm64", "riscv", "x86")

SUITES = {
    "5.10": "bullseye",
    "6.1": "bookworm",
    "6.12": "trixie",
    "7.2": "sid",
    "7.3": "trixie-backports",
}
"""Kernel version (the 16K flavour included, without its suffix) -> Debian suite."""

USERLAND_SUITE = "trixie"
"""Suite of the guest's busybox and Python, for every machine (riscv64 has no
bookworm)."""

PYTHON_VERSION = "3.13"

_VERSIONS = {
    "arm64": ("5.10", "6.1", "6.12", "7.2", "7.3", "7.3-16k"),
    "riscv": ("6.12", "7.2"),
    "x86": ("6.1", "6.12", "7.2", "7.3"),
}

COMMON_MODULES = (
    "virtio_pci",
    "virtio_console",
    "virtio_blk",
    "netfs",
    "fscache",
    "9pnet",
    "9pnet_virtio",
    "9p",
    "crc32c_generic",
    "ext4",
)
"""Modules every guest loads (with their dependency closure) when they are modules
at all: names built into the kernel or absent from it are skipped."""

_ARCH_MODULES = {
    # virtio_gpu: DRM shmem dumb buffers, the source of the dmabuf mapping kind
    "arm64": ("crc32c_arm64", "virtio_gpu"),
    "riscv": ("kvm",),
    "x86": ("crc32c_intel", "irqbypass", "kvm", "ccp", "kvm_amd"),
}

VFIO_MODULES = ("vfio", "vfio_iommu_type1", "vfio_pci_core", "vfio_pci")
"""Modules a ``vfio-bar`` mapping needs (with their closure; ``vfio_iommu_type1`` is the
Type1 IOMMU backend, ``vfio_pci_core`` exists since v5.15).  They are not loaded at
boot: they travel in a separate archive (:data:`~kvmmem.machine.cache.VFIO_CPIO`) and
the agent loads them on the first ``vfio-bar`` mapping."""

_QEMU = {
    # arch: (binary, Debian package, machine args, console)
    # The IOMMU (arm64 SMMUv3, x86 VT-d on q35) gives the vfio device an IOMMU group:
    # Debian builds no kernel with CONFIG_VFIO_NOIOMMU.  QEMU 7.2 has none for riscv.
    "arm64": ("qemu-system-aarch64", "qemu-system-arm",
              ("-M", "virt,virtualization=on,gic-version=3,mte=on,iommu=smmuv3",
               "-cpu", "max,pauth-impdef=on", "-device", "virtio-gpu-pci"),
              "ttyAMA0"),
    "riscv": ("qemu-system-riscv64", "qemu-system-misc",
              ("-M", "virt", "-cpu", "rv64,h=true", "-bios", "default"),
              "ttyS0"),
    "x86": ("qemu-system-x86_64", "qemu-system-x86",
            ("-M", "q35", "-cpu", "max", "-device", "intel-iommu"),
            "ttyS0"),
}

_KERNEL_ARGS = {"arm64": (), "riscv": (), "x86": ("intel_iommu=on",)}
"""Kernel command-line words of each architecture (Debian's x86 kernels leave VT-d off
unless asked: ``CONFIG_INTEL_IOMMU_DEFAULT_ON`` is unset)."""

_DEBIAN_ARCH = {"arm64": "arm64", "riscv": "riscv64", "x86": "amd64"}


@dataclass(frozen=True)
class MachineSpec:
    """One machine of the catalog and how to fetch and boot it."""

    arch: str
    version: str

    @property
    def name(self) -> str:
        """``ARCH-VERSION``, e.g. ``arm64-7.3-16k``: the cache directory's name."""
        return f"{self.arch}-{self.version}"

    @property
    def kernel_version(self) -> str:
        """The kernel series without the flavour suffix (``7.3`` for ``7.3-16k``)."""
        return self.version.removesuffix("-16k")

    @property
    def flavour(self) -> str:
        """Debian kernel flavour: ``arm64``, ``arm64-16k``, ``riscv64`` or ``amd64``."""
        if self.version.endswith("-16k"):
            return "arm64-16k"
        return self.debian_arch

    @property
    def page_size(self) -> int:
        """The guest kernel's base page size in bytes."""
        return 16384 if self.version.endswith("-16k") else 4096

    @property
    def suite(self) -> str:
        """Debian suite carrying the kernel."""
        return SUITES[self.kernel_version]

    @property
    def debian_arch(self) -> str:
        """Debian architecture name: ``arm64``, ``riscv64`` or ``amd64``."""
        return _DEBIAN_ARCH[self.arch]

    @property
    def metapackage(self) -> str:
        """The kernel metapackage resolved in :attr:`suite`, e.g. ``linux-image-arm64``."""
        return f"linux-image-{self.flavour}"

    @property
    def qemu_binary(self) -> str:
        """QEMU system emulator's executable name."""
        return _QEMU[self.arch][0]

    @property
    def qemu_package(self) -> str:
        """Debian package providing :attr:`qemu_binary`."""
        return _QEMU[self.arch][1]

    @property
    def qemu_machine_args(self) -> tuple[str, ...]:
        """``-M`` / ``-cpu`` / firmware arguments of kernel-matrix.md."""
        return _QEMU[self.arch][2]

    @property
    def kernel_args(self) -> tuple[str, ...]:
        """Architecture-specific kernel command-line words."""
        return _KERNEL_ARGS[self.arch]

    @property
    def console(self) -> str:
        """Kernel console device of the first serial port."""
        return _QEMU[self.arch][3]

    @property
    def modules(self) -> tuple[str, ...]:
        """Modules to load in the guest (before dependency closure), in load order."""
        return COMMON_MODULES + _ARCH_MODULES[self.arch]

    @property
    def hugepages(self) -> int:
        """Size of the guest's hugetlb pool in default-size huge pages (16 x 2 MiB;
        2 x 32 MiB on the 16K-page kernel)."""
        return 2 if self.page_size == 16384 else 16


def machines() -> list[MachineSpec]:
    """Returns every machine of the catalog, by architecture then version."""
    return [MachineSpec(arch, v) for arch in ARCHES for v in _VERSIONS[arch]]


def versions(arch: str) -> tuple[str, ...]:
    """Returns the supported versions of ``arch``; raises :class:`UnknownMachine`."""
    if arch not in _VERSIONS:
        raise UnknownMachine(f"unknown architecture {arch!r}; known: {', '.join(ARCHES)}")
    return _VERSIONS[arch]


def known_machines_text() -> str:
    """Returns the catalog in one line, e.g. ``arm64 5.10|6.1|...; riscv 6.12|7.2; ...``."""
    return "; ".join(f"{a} {'|'.join(_VERSIONS[a])}" for a in ARCHES)


def get_machine(arch: str, version: str) -> MachineSpec:
    """Returns the catalog entry of ``arch`` ``version``.

    Raises :class:`UnknownMachine` (one line listing the known machines) when the
    pair is not in the catalog."""
    if arch not in _VERSIONS or version not in _VERSIONS[arch]:
        raise UnknownMachine(
            f"unknown machine {arch} {version}; known: {known_machines_text()}")
    return MachineSpec(arch, version)
