"""The catalog: every machine, its suite, Debian names and QEMU recipe."""

from __future__ import annotations

import pytest

from kvmmem.machine import MachineError, UnknownMachine, get_machine, machines
from kvmmem.machine.catalog import VFIO_MODULES, known_machines_text, versions


def test_catalog_lists_every_supported_machine() -> None:
    names = [m.name for m in machines()]
    assert names == [
        "arm64-5.10", "arm64-6.1", "arm64-6.12", "arm64-7.2", "arm64-7.3", "arm64-7.3-16k",
        "riscv-6.12", "riscv-7.2",
        "x86-6.1", "x86-6.12", "x86-7.2", "x86-7.3",
    ]


@pytest.mark.parametrize(("version", "suite"), [
    ("5.10", "bullseye"), ("6.1", "bookworm"), ("6.12", "trixie"), ("7.2", "sid"),
    ("7.3", "trixie-backports"), ("7.3-16k", "trixie-backports"),
])
def test_suite_per_version(version: str, suite: str) -> None:
    assert get_machine("arm64", version).suite == suite


def test_debian_names_and_qemu() -> None:
    arm = get_machine("arm64", "7.3-16k")
    assert (arm.debian_arch, arm.metapackage, arm.page_size) == (
        "arm64", "linux-image-arm64-16k", 16384)
    assert arm.qemu_machine_args == (
        "-M", "virt,virtualization=on,gic-version=3,mte=on,iommu=smmuv3", "-cpu",
        "max,pauth-impdef=on", "-device", "virtio-gpu-pci")
    assert arm.kernel_args == ()
    assert "virtio_gpu" in arm.modules
    assert (arm.qemu_binary, arm.qemu_package, arm.console) == (
        "qemu-system-aarch64", "qemu-system-arm", "ttyAMA0")
    rv = get_machine("riscv", "6.12")
    assert (rv.debian_arch, rv.metapackage, rv.qemu_package) == (
        "riscv64", "linux-image-riscv64", "qemu-system-misc")
    assert "h=true" in " ".join(rv.qemu_machine_args) and "kvm" in rv.modules
    x86 = get_machine("x86", "6.1")
    assert (x86.debian_arch, x86.metapackage, x86.qemu_binary) == (
        "amd64", "linux-image-amd64", "qemu-system-x86_64")
    assert x86.modules[-4:] == ("irqbypass", "kvm", "ccp", "kvm_amd")
    # VT-d on q35 gives the vfio device an IOMMU group (Debian sets no
    # CONFIG_VFIO_NOIOMMU, nor CONFIG_INTEL_IOMMU_DEFAULT_ON)
    assert x86.qemu_machine_args == ("-M", "q35", "-cpu", "max", "-device", "intel-iommu")
    assert x86.kernel_args == ("intel_iommu=on",)
    assert not set(VFIO_MODULES) & set(x86.modules)  # loaded on demand, not at boot
    assert "kvm" not in get_machine("arm64", "6.1").modules


def test_hugetlb_pool_is_small_on_16k_pages() -> None:
    assert get_machine("arm64", "7.3").hugepages == 16
    assert get_machine("arm64", "7.3-16k").hugepages == 2


@pytest.mark.parametrize(("arch", "version"), [
    ("arm64", "7.4"), ("mips", "6.1"), ("riscv", "7.3"), ("x86", "7.3-16k"), ("x86", "5.10"),
])
def test_unknown_machine_is_one_line_listing_the_known(arch: str, version: str) -> None:
    with pytest.raises(UnknownMachine) as info:
        get_machine(arch, version)
    message = str(info.value)
    assert "\n" not in message and known_machines_text() in message
    assert isinstance(info.value, MachineError) and info.value.exit_status == 2


def test_versions() -> None:
    assert versions("riscv") == ("6.12", "7.2")
    with pytest.raises(UnknownMachine, match="known: arm64, riscv, x86"):
        versions("ppc64")
