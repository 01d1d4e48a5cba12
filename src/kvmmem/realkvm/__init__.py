"""The real-KVM backend: plain ioctls on ``/dev/kvm`` from Python.

* :mod:`~kvmmem.realkvm.ioctls` - the ioctl table (number, capability needed);
* :mod:`~kvmmem.realkvm.structs` - uapi structures, sizes checked at import;
* :mod:`~kvmmem.realkvm.kvm` - :class:`Kvm`, :class:`VmFd`, :class:`VcpuFd`;
* :mod:`~kvmmem.realkvm.stats` - binary stats (``KVM_GET_STATS_FD``) by name;
* :mod:`~kvmmem.realkvm.guest` - guest code (iced-x86) and page tables;
* :mod:`~kvmmem.realkvm.harness` - :class:`RealVm`, one method per scenario step;
* :mod:`~kvmmem.realkvm.host` - :class:`HostMemory`, real host mappings;
* :mod:`~kvmmem.realkvm.runner` - :func:`run_scenario` for ``kvmmem conform``.

:func:`probe_kvm` says in one line why ``/dev/kvm`` cannot be used (``None``
when it can); commands print it and exit with status 4 (SCENARIOS.md).
"""

from kvmmem.realkvm.harness import HarnessConflict, RealVm
from kvmmem.realkvm.host import HostMemory, MappingUnsupported
from kvmmem.realkvm.kvm import (
    Kvm,
    KvmIoctlError,
    KvmUnavailable,
    KvmUnsupported,
    VcpuFd,
    VmFd,
    probe_kvm,
)
from kvmmem.realkvm.runner import RealRun, run_scenario, scenario_footprint

EXIT_UNAVAILABLE = 4
"""Exit status of a command that needs /dev/kvm on a host without a usable one."""

__all__ = [
    "EXIT_UNAVAILABLE",
    "HarnessConflict",
    "HostMemory",
    "Kvm",
    "KvmIoctlError",
    "KvmUnavailable",
    "KvmUnsupported",
    "MappingUnsupported",
    "RealRun",
    "RealVm",
    "VcpuFd",
    "VmFd",
    "probe_kvm",
    "run_scenario",
    "scenario_footprint",
]
