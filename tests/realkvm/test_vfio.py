"""The VFIO source of ``vfio-bar`` mappings without a machine: the uapi numbers and
structures, the bind and open sequence against a fake sysfs and fake ioctls, the slices
of the BAR, and the reasons given where VFIO cannot take the device.  The real thing
runs in the machines (tests/realkvm/test_vfio_machine.py)."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvmmem.realkvm import agent, libc, vfio
from kvmmem.realkvm.host import BarSlices, HostMemory, MappingUnsupported, vfio_slice_alignment

BDF = "0000:00:10.0"
M, G = 1 << 20, 1 << 30


def test_ioctl_numbers_are_the_kernels() -> None:
    """``_IO(';', 100 + n)`` of include/uapi/linux/vfio.h."""
    assert (vfio.VFIO_GET_API_VERSION, vfio.VFIO_CHECK_EXTENSION, vfio.VFIO_SET_IOMMU) == (
        0x3B64, 0x3B65, 0x3B66)
    assert (vfio.VFIO_GROUP_GET_STATUS, vfio.VFIO_GROUP_SET_CONTAINER,
            vfio.VFIO_GROUP_UNSET_CONTAINER, vfio.VFIO_GROUP_GET_DEVICE_FD) == (
        0x3B67, 0x3B68, 0x3B69, 0x3B6A)
    assert (vfio.VFIO_DEVICE_GET_INFO, vfio.VFIO_DEVICE_GET_REGION_INFO) == (0x3B6B, 0x3B6C)
    assert (vfio.VFIO_TYPE1_IOMMU, vfio.VFIO_TYPE1v2_IOMMU, vfio.VFIO_NOIOMMU_IOMMU) == (1, 3, 8)


def test_structures_have_the_kernels_layout() -> None:
    assert ctypes.sizeof(vfio.vfio_group_status) == 8
    assert ctypes.sizeof(vfio.vfio_device_info) == 24
    assert ctypes.sizeof(vfio.vfio_region_info) == 32
    assert vfio.vfio_region_info.size.offset == 16
    assert vfio.vfio_region_info.offset.offset == 24
    assert vfio.vfio_region_info.index.offset == 8


# --- sysfs: binding --------------------------------------------------------------------

@pytest.fixture
def sysfs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake /sys/bus/pci with device ``BDF`` (no driver, no IOMMU group) and a
    loaded vfio-pci driver; /dev/vfio under it too."""
    devices = tmp_path / "devices"
    (devices / BDF).mkdir(parents=True)
    (devices / BDF / "driver_override").write_text("\n")
    drivers = tmp_path / "drivers"
    (drivers / "vfio-pci").mkdir(parents=True)
    (drivers / "ivshmem").mkdir()
    (tmp_path / "drivers_probe").write_text("")
    (tmp_path / "dev").mkdir()
    monkeypatch.setattr(vfio, "PCI_DEVICES", str(devices))
    monkeypatch.setattr(vfio, "VFIO_PCI_DRIVER", str(drivers / "vfio-pci"))
    monkeypatch.setattr(vfio, "PCI_DRIVERS_PROBE", str(tmp_path / "drivers_probe"))
    monkeypatch.setattr(vfio, "VFIO_DEV_DIR", str(tmp_path / "dev"))
    return tmp_path


def _group(sysfs: Path, number: int) -> None:
    groups = sysfs / "iommu_groups" / str(number)
    groups.mkdir(parents=True)
    (sysfs / "devices" / BDF / "iommu_group").symlink_to(groups)


def test_a_device_without_iommu_group_and_no_noiommu_is_refused(sysfs: Path) -> None:
    """Debian's kernels: no CONFIG_VFIO_NOIOMMU, so vfio_pci_probe answers EINVAL for a
    device no IOMMU translates (seen on riscv 6.12 and 7.2)."""
    with pytest.raises(vfio.VfioUnavailable) as info:
        vfio.bind_vfio_pci(BDF, noiommu_parameter=str(sysfs / "absent"))
    message = str(info.value)
    assert "has no IOMMU group" in message and "CONFIG_VFIO_NOIOMMU" in message
    assert "EINVAL" in message
    assert (sysfs / "devices" / BDF / "driver_override").read_text() == "\n"  # untouched


def test_noiommu_mode_is_switched_on_where_the_kernel_has_it(sysfs: Path) -> None:
    parameter = sysfs / "enable_unsafe_noiommu_mode"
    parameter.write_text("N\n")
    with pytest.raises(vfio.VfioUnavailable, match="bound to None, not vfio-pci"):
        vfio.bind_vfio_pci(BDF, noiommu_parameter=str(parameter))  # nothing binds here
    assert parameter.read_text() == "Y"
    assert (sysfs / "devices" / BDF / "driver_override").read_text() == "vfio-pci"
    assert (sysfs / "drivers_probe").read_text() == BDF


def test_bind_unbinds_another_driver_first(sysfs: Path) -> None:
    _group(sysfs, 6)
    (sysfs / "drivers/ivshmem/unbind").write_text("")
    (sysfs / "devices" / BDF / "driver").symlink_to(sysfs / "drivers/ivshmem")
    with pytest.raises(vfio.VfioUnavailable, match="bound to ivshmem"):
        vfio.bind_vfio_pci(BDF)
    assert (sysfs / "drivers/ivshmem/unbind").read_text() == BDF
    assert (sysfs / "drivers_probe").read_text() == BDF


def test_bind_is_a_noop_when_bound(sysfs: Path) -> None:
    (sysfs / "devices" / BDF / "driver").symlink_to(sysfs / "drivers/vfio-pci")
    vfio.bind_vfio_pci(BDF)
    assert (sysfs / "drivers_probe").read_text() == ""


def test_missing_device_or_driver(sysfs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(vfio.VfioUnavailable, match=r"no PCI device 0000:00:11\.0"):
        vfio.bind_vfio_pci("0000:00:11.0")
    monkeypatch.setattr(vfio, "VFIO_PCI_DRIVER", str(sysfs / "drivers/none"))
    with pytest.raises(vfio.VfioUnavailable, match="vfio-pci driver is not loaded"):
        vfio.bind_vfio_pci(BDF)


def test_group_path(sysfs: Path) -> None:
    with pytest.raises(vfio.VfioUnavailable, match="has no IOMMU group"):
        vfio.iommu_group_path(BDF)
    _group(sysfs, 6)
    with pytest.raises(vfio.VfioUnavailable, match="is it bound to vfio-pci"):
        vfio.iommu_group_path(BDF)
    (sysfs / "dev/noiommu-6").write_text("")
    assert vfio.iommu_group_path(BDF) == str(sysfs / "dev/noiommu-6")
    (sysfs / "dev/6").write_text("")
    assert vfio.iommu_group_path(BDF) == str(sysfs / "dev/6")


def test_modules_load_in_order_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    moddir, loaded = tmp_path / "vfio", tmp_path / "module"
    moddir.mkdir()
    (moddir / "load").write_text("vfio\nirqbypass\nvfio_pci_core\nvfio_pci\n")
    (loaded / "irqbypass").mkdir(parents=True)  # kvm's dependency, loaded at boot
    calls: list[list[str]] = []

    class Done:
        returncode, stdout, stderr = 0, "", ""

    def run(args: list[str], **_: Any) -> Done:
        calls.append(args)
        return Done()

    monkeypatch.setattr(vfio.subprocess, "run", run)
    assert vfio.load_vfio_modules(str(moddir), str(loaded)) == ["vfio", "vfio_pci_core",
                                                                "vfio_pci"]
    assert calls == [["insmod", str(moddir / f"{m}.ko")]
                     for m in ("vfio", "vfio_pci_core", "vfio_pci")]

    class Refused(Done):
        returncode, stderr = 1, "insmod: can't insert 'vfio.ko': invalid module format\n"

    monkeypatch.setattr(vfio.subprocess, "run", lambda args, **_: Refused())
    with pytest.raises(vfio.VfioUnavailable, match=r"vfio\.ko failed: insmod: can't insert"):
        vfio.load_vfio_modules(str(moddir), str(loaded))
    with pytest.raises(vfio.VfioUnavailable, match="ENOENT"):
        vfio.load_vfio_modules(str(tmp_path / "absent"))


# --- the container, group and device fds ------------------------------------------------

class FakeVfio:
    """The kernel's side of the VFIO ioctls, recording each call."""

    def __init__(self, dev: Path, viable: bool = True, extensions: tuple[int, ...] = (1, 3),
                 region: tuple[int, int, int] = (7, 1 << 30, 2 << 40)) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.viable = viable
        self.extensions = extensions
        self.region = region
        self.device_fd = os.open(dev / "device", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC)
        self.mmaps: list[tuple[int, int, int, int, int, int]] = []

    def ioctl(self, fd: int, request: int, arg: int) -> int:
        names = {vfio.VFIO_GET_API_VERSION: "GET_API_VERSION",
                 vfio.VFIO_CHECK_EXTENSION: "CHECK_EXTENSION",
                 vfio.VFIO_SET_IOMMU: "SET_IOMMU"}
        self.calls.append((names[request], arg))
        if request == vfio.VFIO_CHECK_EXTENSION:
            return int(arg in self.extensions)
        return 0

    def ioctl_ptr(self, fd: int, request: int, address: int) -> int:
        if request == vfio.VFIO_GROUP_GET_STATUS:
            status = vfio.vfio_group_status.from_address(address)
            assert status.argsz == 8
            status.flags = vfio.VFIO_GROUP_FLAGS_VIABLE if self.viable else 0
            self.calls.append(("GROUP_GET_STATUS", None))
        elif request == vfio.VFIO_GROUP_SET_CONTAINER:
            self.calls.append(("GROUP_SET_CONTAINER", ctypes.c_int32.from_address(address).value))
        elif request == vfio.VFIO_GROUP_GET_DEVICE_FD:
            self.calls.append(("GROUP_GET_DEVICE_FD", ctypes.string_at(address).decode()))
            return self.device_fd
        elif request == vfio.VFIO_DEVICE_GET_REGION_INFO:
            info = vfio.vfio_region_info.from_address(address)
            assert info.argsz == 32
            info.flags, info.size, info.offset = self.region
            self.calls.append(("DEVICE_GET_REGION_INFO", info.index))
        else:  # pragma: no cover - an ioctl the code should not issue
            raise AssertionError(hex(request))
        return 0

    def mmap(self, addr: int, length: int, prot: int, flags: int, fd: int = -1,
             offset: int = 0) -> tuple[int, int]:
        self.mmaps.append((addr, length, prot, flags, fd, offset))
        return addr, 0


@pytest.fixture
def fake(sysfs: Path, monkeypatch: pytest.MonkeyPatch) -> FakeVfio:
    _group(sysfs, 6)
    (sysfs / "dev/vfio").write_text("")
    (sysfs / "dev/6").write_text("")
    kernel = FakeVfio(sysfs / "dev")
    monkeypatch.setattr(vfio.fcntl, "ioctl", kernel.ioctl)
    monkeypatch.setattr(vfio.libc, "ioctl_ptr", kernel.ioctl_ptr)
    monkeypatch.setattr(vfio.libc, "mmap", kernel.mmap)
    return kernel


def test_the_sequence_a_vmm_follows(fake: FakeVfio) -> None:
    """Documentation/driver-api/vfio.rst's order; Type1v2 preferred; the BAR is mmapped
    from the device fd at the region's offset plus the slice's."""
    with vfio.VfioPciDevice(BDF) as device:
        container = device.container
        assert device.iommu == "Type1v2" and device.device == fake.device_fd
        assert device.mmap_bar(2, 4 * M, 2 * M, 0x1000_0040_0000, libc.PROT_READ) == 0
    assert fake.calls == [
        ("GET_API_VERSION", 0), ("GROUP_GET_STATUS", None),
        ("GROUP_SET_CONTAINER", container), ("CHECK_EXTENSION", vfio.VFIO_TYPE1v2_IOMMU),
        ("SET_IOMMU", vfio.VFIO_TYPE1v2_IOMMU), ("GROUP_GET_DEVICE_FD", BDF),
        ("DEVICE_GET_REGION_INFO", 2)]
    assert fake.mmaps == [(0x1000_0040_0000, 2 * M, libc.PROT_READ,
                           libc.MAP_SHARED | libc.MAP_FIXED, fake.device_fd, (2 << 40) + 4 * M)]
    assert (device.container, device.group, device.device) == (-1, -1, -1)


def test_a_group_not_viable_is_refused_and_everything_closed(fake: FakeVfio) -> None:
    fake.viable = False
    with pytest.raises(vfio.VfioUnavailable, match="not viable"):
        vfio.VfioPciDevice(BDF)


def test_a_container_without_backend_is_refused(fake: FakeVfio) -> None:
    fake.extensions = ()
    with pytest.raises(vfio.VfioUnavailable, match=r"no IOMMU backend .*Type1v2, Type1"):
        vfio.VfioPciDevice(BDF)


def test_a_noiommu_group_takes_the_noiommu_backend(fake: FakeVfio, sysfs: Path) -> None:
    (sysfs / "dev/6").rename(sysfs / "dev/noiommu-6")
    fake.extensions = (1, 3, 8)
    with vfio.VfioPciDevice(BDF) as device:
        assert device.iommu == "No-IOMMU"
    assert ("SET_IOMMU", vfio.VFIO_NOIOMMU_IOMMU) in fake.calls


# --- slices of the BAR --------------------------------------------------------------------

@pytest.mark.parametrize(("size", "align"), [
    (4096, 2 * M), (2 * M, 2 * M), (3 * M, 4 * M), (4 * M, 4 * M), (64 * M, 64 * M),
    (G, G), (2 * G, G)])
def test_slice_alignment(size: int, align: int) -> None:
    assert vfio_slice_alignment(size) == align


def test_slices_wrap_and_zero_only_what_was_used() -> None:
    bar = BarSlices(64 * M)
    assert bar.take(4 * M, []) == (0, 0)
    assert bar.take(2 * M, []) == (4 * M, 0)
    assert bar.take(32 * M, []) == (32 * M, 0)  # aligned to its size
    assert bar.take(4 * M, []) == (0, 4 * M)  # wrapped: used before, zeroed
    assert bar.take(8 * M, []) == (8 * M, 8 * M)  # below the high-water mark: zeroed
    bar = BarSlices(G)
    assert bar.take(4 * M, []) == (0, 0)
    assert bar.take(G, []) == (0, 4 * M)  # a GiB after a small run zeroes the small part
    with pytest.raises(ValueError, match="beside the 4096 KiB this run maps"):
        BarSlices(8 * M).take(8 * M, [(0, 4 * M)])
    with pytest.raises(ValueError, match="does not fit the 8 MiB BAR"):
        BarSlices(8 * M).take(16 * M, [])


@given(st.lists(st.lists(st.sampled_from([4096, 2 * M, 3 * M, 4 * M, 16 * M]), max_size=4),
                max_size=12))
def test_every_slice_reads_zero(runs: list[list[int]]) -> None:
    """Whatever earlier runs wrote, a slice handed out is zero once its ``dirty`` prefix
    is zeroed; slices of one run never overlap; each is aligned and inside the BAR."""
    size = 32 * M
    bar = BarSlices(size)
    written: list[tuple[int, int]] = []
    for run in runs:
        held: list[tuple[int, int]] = []
        for want in run:
            try:
                offset, dirty = bar.take(want, held)
            except ValueError:
                continue
            assert offset % vfio_slice_alignment(want) == 0 and offset + want <= size
            assert all(o + n <= offset or offset + want <= o for o, n in held)
            for o, n in written:
                lo, hi = max(o, offset), min(o + n, offset + want)
                assert hi <= lo or hi <= offset + dirty, (o, n, offset, dirty)
            held.append((offset, want))
        written += held


# --- HostMemory's answers without a device ------------------------------------------------

def test_no_vfio_device_is_unsupported() -> None:
    with HostMemory(arena_size=1 << 32) as host, \
            pytest.raises(MappingUnsupported, match="no PCI device here may be bound"):
        host.mmap("bar", 2 * M, "vfio-bar", libc.PROT_READ)


def test_a_missing_device_says_which(tmp_path: Path) -> None:
    with HostMemory(arena_size=1 << 32, vfio_bar="0000:7f:1f.7") as host, \
            pytest.raises(MappingUnsupported) as info:
        host.mmap("bar", 2 * M, "vfio-bar", libc.PROT_READ)
    assert str(info.value).startswith("vfio-bar: no PCI device 0000:7f:1f.7")
    assert "kvmmem machine fetch" in str(info.value)


def test_the_agent_reads_the_device_from_the_command_line(tmp_path: Path) -> None:
    cmdline = tmp_path / "cmdline"
    cmdline.write_text("console=ttyS0 rdinit=/init kvmmem.vfio=0000:00:10.0 quiet\n")
    assert agent.vfio_device(str(cmdline)) == BDF
    cmdline.write_text("console=ttyS0\n")
    assert agent.vfio_device(str(cmdline)) is None
    assert agent.vfio_device(str(tmp_path / "absent")) is None
