"""A PCI BAR mapped through VFIO, as a VMM maps a passed-through device: the source of
real ``vfio-bar`` mappings (stdlib only: it runs inside the emulated machines).

The sequence is the one ``Documentation/driver-api/vfio.rst`` gives and every VMM
follows, with the uapi of ``include/uapi/linux/vfio.h``:

1. the device is bound to ``vfio-pci`` (:func:`bind_vfio_pci`: ``driver_override``,
   unbind from any other driver, ``drivers_probe``), after the modules are loaded
   (:func:`load_vfio_modules`);
2. ``/dev/vfio/vfio`` is opened (the container; ``VFIO_GET_API_VERSION`` must answer
   :data:`VFIO_API_VERSION`), then the device's group ``/dev/vfio/N`` (or
   ``/dev/vfio/noiommu-N`` for a group made by ``enable_unsafe_noiommu_mode``), whose
   ``VFIO_GROUP_GET_STATUS`` must say viable;
3. ``VFIO_GROUP_SET_CONTAINER``, then ``VFIO_SET_IOMMU`` with the first IOMMU type the
   container offers (``VFIO_CHECK_EXTENSION``: Type1v2, Type1, or No-IOMMU);
4. ``VFIO_GROUP_GET_DEVICE_FD`` with the device's name, ``VFIO_DEVICE_GET_REGION_INFO``
   of the BAR's region (``VFIO_PCI_BAR0_REGION_INDEX`` + N), and ``mmap`` of the device
   fd at the region's ``offset`` (:meth:`VfioPciDevice.mmap_bar`).

What ``vfio_pci_core_mmap`` then makes is the mapping the ``vfio-bar`` kind describes:
``VM_IO|VM_PFNMAP`` (and ``VM_ALLOW_ANY_UNCACHED`` since v6.9), non-cacheable, nothing
mapped at mmap time; the fault handler inserts the BAR's frames (PMD/PUD leaves
through ``huge_fault`` since v6.12 where the pfn and the address are aligned).  Until
v6.9 ``vm_pgoff`` is rewritten to the BAR's pfn; since v6.10 it keeps the region-offset
encoding of the mmap offset (``index << (40 - PAGE_SHIFT)`` plus the page offset).

Every failure raises :class:`VfioUnavailable` with the step, the file and the errno, so
the harness can say exactly why a machine has no ``vfio-bar`` source.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import subprocess

from kvmmem.realkvm import libc

# --- include/uapi/linux/vfio.h --------------------------------------------------------

VFIO_API_VERSION = 0
VFIO_TYPE = ord(";")
VFIO_BASE = 100


def _vfio_io(nr: int) -> int:
    """``_IO(VFIO_TYPE, VFIO_BASE + nr)``: every VFIO ioctl is ``_IO`` (argsz-sized
    structures carry their own length)."""
    return (VFIO_TYPE << 8) | (VFIO_BASE + nr)


VFIO_GET_API_VERSION = _vfio_io(0)
VFIO_CHECK_EXTENSION = _vfio_io(1)
VFIO_SET_IOMMU = _vfio_io(2)
VFIO_GROUP_GET_STATUS = _vfio_io(3)
VFIO_GROUP_SET_CONTAINER = _vfio_io(4)
VFIO_GROUP_UNSET_CONTAINER = _vfio_io(5)
VFIO_GROUP_GET_DEVICE_FD = _vfio_io(6)
VFIO_DEVICE_GET_INFO = _vfio_io(7)
VFIO_DEVICE_GET_REGION_INFO = _vfio_io(8)

VFIO_TYPE1_IOMMU = 1
VFIO_TYPE1v2_IOMMU = 3
VFIO_NOIOMMU_IOMMU = 8
IOMMU_TYPES = (("Type1v2", VFIO_TYPE1v2_IOMMU), ("Type1", VFIO_TYPE1_IOMMU),
               ("No-IOMMU", VFIO_NOIOMMU_IOMMU))
"""The IOMMU backends tried in order (``VFIO_CHECK_EXTENSION`` then ``VFIO_SET_IOMMU``)."""

VFIO_GROUP_FLAGS_VIABLE = 1 << 0
VFIO_GROUP_FLAGS_CONTAINER_SET = 1 << 1

VFIO_DEVICE_FLAGS_PCI = 1 << 1

VFIO_REGION_INFO_FLAG_READ = 1 << 0
VFIO_REGION_INFO_FLAG_WRITE = 1 << 1
VFIO_REGION_INFO_FLAG_MMAP = 1 << 2
VFIO_REGION_INFO_FLAG_CAPS = 1 << 3

VFIO_PCI_BAR0_REGION_INDEX = 0
VFIO_PCI_NUM_REGIONS = 9
"""BAR0-5, ROM, config, VGA (``enum`` in vfio.h)."""

VFIO_PCI_OFFSET_SHIFT = 40
"""``drivers/vfio/pci/vfio_pci_priv.h``: the mmap offset of region ``index`` is
``index << VFIO_PCI_OFFSET_SHIFT`` (what ``VFIO_DEVICE_GET_REGION_INFO`` reports as
``offset``)."""

u32 = ctypes.c_uint32
u64 = ctypes.c_uint64


class vfio_group_status(ctypes.Structure):
    """``VFIO_GROUP_GET_STATUS``'s argument."""

    _fields_ = [("argsz", u32), ("flags", u32)]


class vfio_device_info(ctypes.Structure):
    """``VFIO_DEVICE_GET_INFO``'s argument (``cap_offset`` since v4.15; older kernels
    read the first 16 bytes)."""

    _fields_ = [("argsz", u32), ("flags", u32), ("num_regions", u32), ("num_irqs", u32),
                ("cap_offset", u32), ("pad", u32)]


class vfio_region_info(ctypes.Structure):
    """``VFIO_DEVICE_GET_REGION_INFO``'s argument: the caller sets ``argsz`` and
    ``index``; the kernel fills ``flags``, ``size`` and the mmap ``offset``."""

    _fields_ = [("argsz", u32), ("flags", u32), ("index", u32), ("cap_offset", u32),
                ("size", u64), ("offset", u64)]


KERNEL_SIZES = {vfio_group_status: 8, vfio_device_info: 24, vfio_region_info: 32}
"""``sizeof`` of each structure in the kernel's header (checked at import)."""
for _struct, _size in KERNEL_SIZES.items():
    if ctypes.sizeof(_struct) != _size:  # pragma: no cover - a layout mistake
        raise ImportError(f"{_struct.__name__} is {ctypes.sizeof(_struct)} bytes, "
                          f"the kernel's is {_size}")

NOIOMMU_PARAMETER = "/sys/module/vfio/parameters/enable_unsafe_noiommu_mode"
"""vfio's no-IOMMU switch: present only in a kernel built with ``CONFIG_VFIO_NOIOMMU``."""
PCI_DEVICES = "/sys/bus/pci/devices"
PCI_DRIVERS_PROBE = "/sys/bus/pci/drivers_probe"
VFIO_PCI_DRIVER = "/sys/bus/pci/drivers/vfio-pci"
VFIO_DEV_DIR = "/dev/vfio"
"""The container ``vfio`` and the group files live here."""


class VfioUnavailable(RuntimeError):
    """No VFIO BAR can be mapped here; ``str()`` says which step failed and why."""


def _fail(step: str, exc: OSError) -> VfioUnavailable:
    code = exc.errno or 0
    return VfioUnavailable(f"{step}: {libc.errno_name(code)} ({os.strerror(code)})")


def load_vfio_modules(moddir: str, loaded: str = "/sys/module") -> list[str]:
    """``insmod`` each module of ``moddir/load`` (one name a line, dependencies first)
    not yet in ``loaded``; returns the names loaded now.  Modules built into the kernel
    are in ``loaded`` already.  Raises :class:`VfioUnavailable` naming the module and
    insmod's message."""
    order_file = os.path.join(moddir, "load")
    try:
        with open(order_file) as f:
            names = f.read().split()
    except OSError as exc:
        raise _fail(f"the vfio modules' list {order_file}", exc) from None
    done = []
    for name in names:
        if os.path.isdir(os.path.join(loaded, name)):
            continue
        path = os.path.join(moddir, f"{name}.ko")
        proc = subprocess.run(["insmod", path], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise VfioUnavailable(f"insmod {path} failed: "
                                  f"{(proc.stderr or proc.stdout).strip()}")
        done.append(name)
    return done


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def current_driver(bdf: str) -> str | None:
    """The name of the driver bound to PCI device ``bdf`` (None when unbound)."""
    link = os.path.join(PCI_DEVICES, bdf, "driver")
    return os.path.basename(os.readlink(link)) if os.path.islink(link) else None


def bind_vfio_pci(bdf: str, noiommu_parameter: str = NOIOMMU_PARAMETER) -> None:
    """Bind PCI device ``bdf`` (``DDDD:BB:SS.F``) to ``vfio-pci``: ``driver_override``,
    unbind from another driver, ``drivers_probe``.  A no-op when it is bound already.
    A device no IOMMU translates needs vfio's ``enable_unsafe_noiommu_mode`` (set here
    when the kernel has it: ``vfio_pci_core_register_device`` then makes a no-IOMMU
    group); without it ``vfio_pci_probe`` fails with EINVAL.  Raises
    :class:`VfioUnavailable` saying which of these stopped it."""
    if current_driver(bdf) == "vfio-pci":
        return
    dev = os.path.join(PCI_DEVICES, bdf)
    if not os.path.exists(dev):
        raise VfioUnavailable(f"no PCI device {bdf} ({dev} is missing)")
    if not os.path.isdir(VFIO_PCI_DRIVER):
        raise VfioUnavailable(f"the vfio-pci driver is not loaded ({VFIO_PCI_DRIVER} is "
                              "missing)")
    if not os.path.islink(os.path.join(dev, "iommu_group")):
        if not os.path.exists(noiommu_parameter):
            raise VfioUnavailable(
                f"{bdf} has no IOMMU group (no IOMMU translates it) and vfio has no "
                f"no-IOMMU mode ({noiommu_parameter} is missing: a kernel built without "
                "CONFIG_VFIO_NOIOMMU), so vfio-pci's probe refuses it (EINVAL)")
        try:
            _write(noiommu_parameter, "Y")
        except OSError as exc:
            raise _fail(f"setting {noiommu_parameter}", exc) from None
    try:
        _write(os.path.join(dev, "driver_override"), "vfio-pci")
        if current_driver(bdf) is not None:
            _write(os.path.join(dev, "driver", "unbind"), bdf)
    except OSError as exc:
        raise _fail(f"preparing {bdf} for vfio-pci", exc) from None
    try:
        _write(PCI_DRIVERS_PROBE, bdf)
    except OSError as exc:
        # drivers_probe answers the probe's error (EINVAL when vfio-pci finds no group).
        raise _fail(f"binding {bdf} to vfio-pci (drivers_probe)", exc) from None
    if current_driver(bdf) != "vfio-pci":
        raise VfioUnavailable(f"{bdf} is bound to {current_driver(bdf)}, not vfio-pci, "
                              "after drivers_probe")


def iommu_group_path(bdf: str) -> str:
    """The VFIO group file of ``bdf``: ``/dev/vfio/N`` for IOMMU group N, or
    ``/dev/vfio/noiommu-N`` where vfio made the group without an IOMMU.  Raises
    :class:`VfioUnavailable` when the device has no IOMMU group."""
    link = os.path.join(PCI_DEVICES, bdf, "iommu_group")
    if not os.path.islink(link):
        raise VfioUnavailable(f"{bdf} has no IOMMU group ({link} is missing): no IOMMU "
                              "translates it and vfio's no-IOMMU mode made none")
    group = os.path.basename(os.readlink(link))
    for name in (group, f"noiommu-{group}"):
        path = f"{VFIO_DEV_DIR}/{name}"
        if os.path.exists(path):
            return path
    raise VfioUnavailable(f"{bdf} is in IOMMU group {group} but neither {VFIO_DEV_DIR}/{group} "
                          f"nor {VFIO_DEV_DIR}/noiommu-{group} exists (is it bound to vfio-pci?)")


def _ioctl_int(fd: int, request: int, arg: int, step: str) -> int:
    try:
        return fcntl.ioctl(fd, request, arg)
    except OSError as exc:
        raise _fail(step, exc) from None


def _ioctl_struct(fd: int, request: int, arg: ctypes.Structure | ctypes.c_int32, step: str) -> int:
    ret = libc.ioctl_ptr(fd, request, ctypes.addressof(arg))
    if ret < 0:
        raise _fail(step, OSError(-ret, os.strerror(-ret)))
    return ret


class VfioPciDevice:
    """One vfio-pci device opened through a container and its group: the fds a VMM
    holds.  :meth:`close` (or ``with``) releases them; mappings made by
    :meth:`mmap_bar` stay valid after it (they hold the device file), but the group
    can be opened again only when every fd is closed and every mapping unmapped."""

    def __init__(self, bdf: str) -> None:
        self.bdf = bdf
        self.container = self.group = self.device = -1
        self.iommu = ""
        """The backend ``VFIO_SET_IOMMU`` took (``Type1v2``, ``Type1``, ``No-IOMMU``)."""
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:
        group_path = iommu_group_path(self.bdf)
        container_path = f"{VFIO_DEV_DIR}/vfio"
        try:
            self.container = os.open(container_path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise _fail(f"open {container_path}", exc) from None
        version = _ioctl_int(self.container, VFIO_GET_API_VERSION, 0, "VFIO_GET_API_VERSION")
        if version != VFIO_API_VERSION:
            raise VfioUnavailable(f"VFIO_GET_API_VERSION is {version}, not {VFIO_API_VERSION}")
        try:
            self.group = os.open(group_path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise _fail(f"open {group_path}", exc) from None
        status = vfio_group_status(argsz=ctypes.sizeof(vfio_group_status))
        _ioctl_struct(self.group, VFIO_GROUP_GET_STATUS, status, "VFIO_GROUP_GET_STATUS")
        if not status.flags & VFIO_GROUP_FLAGS_VIABLE:
            raise VfioUnavailable(f"{group_path} is not viable (a device of the group is "
                                  "bound to a host driver)")
        container = ctypes.c_int32(self.container)
        _ioctl_struct(self.group, VFIO_GROUP_SET_CONTAINER, container,
                      "VFIO_GROUP_SET_CONTAINER")
        # A no-IOMMU group takes only the No-IOMMU backend; a real group a Type1 one.
        noiommu = os.path.basename(group_path).startswith("noiommu-")
        types = [t for t in IOMMU_TYPES if (t[1] == VFIO_NOIOMMU_IOMMU) == noiommu]
        for name, kind in types:
            if _ioctl_int(self.container, VFIO_CHECK_EXTENSION, kind, "VFIO_CHECK_EXTENSION"):
                _ioctl_int(self.container, VFIO_SET_IOMMU, kind, f"VFIO_SET_IOMMU({name})")
                self.iommu = name
                break
        else:
            names = ", ".join(t[0] for t in types)
            raise VfioUnavailable(f"the VFIO container offers no IOMMU backend for "
                                  f"{group_path} ({names}: VFIO_CHECK_EXTENSION 0)")
        device_name = ctypes.create_string_buffer(self.bdf.encode())
        ret = libc.ioctl_ptr(self.group, VFIO_GROUP_GET_DEVICE_FD,
                             ctypes.addressof(device_name))
        if ret < 0:
            raise _fail(f"VFIO_GROUP_GET_DEVICE_FD({self.bdf})", OSError(-ret, ""))
        self.device = ret

    def region_info(self, index: int) -> vfio_region_info:
        """``VFIO_DEVICE_GET_REGION_INFO`` of region ``index`` (a BAR is its number)."""
        info = vfio_region_info(argsz=ctypes.sizeof(vfio_region_info), index=index)
        _ioctl_struct(self.device, VFIO_DEVICE_GET_REGION_INFO, info,
                      f"VFIO_DEVICE_GET_REGION_INFO({index})")
        return info

    def mmap_bar(self, bar: int, offset: int, size: int, hva: int, prot: int) -> int:
        """``mmap(hva, size, prot, MAP_SHARED | MAP_FIXED, device, region offset +
        offset)`` of BAR ``bar``: 0 or the errno (``vfio_pci_core_mmap``'s answer)."""
        info = self.region_info(VFIO_PCI_BAR0_REGION_INDEX + bar)
        _, err = libc.mmap(hva, size, prot, libc.MAP_SHARED | libc.MAP_FIXED, self.device,
                           info.offset + offset)
        return err

    def zero_bar(self, bar: int, offset: int, size: int) -> None:
        """Write zeros to ``[offset, offset + size)`` of BAR ``bar`` through the device
        fd (``vfio_pci_bar_rw``), touching no user mapping.  Raises
        :class:`VfioUnavailable` when the region refuses the write."""
        info = self.region_info(VFIO_PCI_BAR0_REGION_INDEX + bar)
        chunk = bytes(min(size, 1 << 20))
        done = 0
        while done < size:
            n = min(len(chunk), size - done)
            try:
                wrote = os.pwrite(self.device, chunk[:n], info.offset + offset + done)
            except OSError as exc:
                raise _fail(f"zeroing BAR {bar} of {self.bdf}", exc) from None
            if wrote <= 0:
                raise VfioUnavailable(f"zeroing BAR {bar} of {self.bdf}: wrote {wrote}")
            done += wrote

    def close(self) -> None:
        """Close the device, group and container fds (idempotent)."""
        for attr in ("device", "group", "container"):
            fd = getattr(self, attr)
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError as exc:  # pragma: no cover - a closed fd is a bug here
                    if exc.errno != errno.EBADF:
                        raise
                setattr(self, attr, -1)

    def __enter__(self) -> VfioPciDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
