"""The real-KVM backend: plain ioctls on ``/dev/kvm`` from Python.

* :mod:`~kvmmem.realkvm.ioctls` - the ioctl table (number, capability needed);
* :mod:`~kvmmem.realkvm.structs` - uapi structures, sizes checked at import;
* :mod:`~kvmmem.realkvm.kvm` - :class:`Kvm`, :class:`VmFd`, :class:`VcpuFd`;
* :mod:`~kvmmem.realkvm.stats` - binary stats (``KVM_GET_STATS_FD``) by name;
* :mod:`~kvmmem.realkvm.guest` - the x86 guest's page tables and registers;
  :mod:`~kvmmem.realkvm.x86_code` its routines (iced-x86, host side only);
* :mod:`~kvmmem.realkvm.harness` - :class:`~kvmmem.realkvm.harness.HarnessVm`, one
  method per scenario step, and its run loop; :mod:`~kvmmem.realkvm.x86` -
  :class:`RealVm`, the x86 harness (:mod:`~kvmmem.realkvm.archvm` for arm64, riscv);
* :mod:`~kvmmem.realkvm.host` - :class:`HostMemory`, real host mappings;
* :mod:`~kvmmem.realkvm.program` - a scenario as plain JSON data and
  :func:`~kvmmem.realkvm.program.run_program`, which performs it;
* :mod:`~kvmmem.realkvm.runner` - :func:`run_scenario` for ``kvmmem conform``;
* :mod:`~kvmmem.realkvm.agent` - the same backend inside an emulated machine,
  answering JSON lines over virtio-serial.

Everything but ``x86_code`` and ``runner`` is standard library only: the agent
runs it on an emulated machine's bare Python.  The names below are imported on
first use, so ``import kvmmem.realkvm.agent`` pulls in nothing else.

:func:`probe_kvm` says in one line why ``/dev/kvm`` cannot be used (``None``
when it can); commands print it and exit with status 4 (SCENARIOS.md).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvmmem.realkvm.harness import HarnessConflict
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
    from kvmmem.realkvm.program import RealRun
    from kvmmem.realkvm.runner import run_scenario, scenario_footprint
    from kvmmem.realkvm.x86 import RealVm

EXIT_UNAVAILABLE = 4
"""Exit status of a command that needs /dev/kvm on a host without a usable one."""

_HOMES = {
    "HarnessConflict": "harness", "RealVm": "x86",
    "HostMemory": "host", "MappingUnsupported": "host",
    "Kvm": "kvm", "KvmIoctlError": "kvm", "KvmUnavailable": "kvm",
    "KvmUnsupported": "kvm", "VcpuFd": "kvm", "VmFd": "kvm", "probe_kvm": "kvm",
    "RealRun": "program",
    "run_scenario": "runner", "scenario_footprint": "runner",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'kvmmem.realkvm' has no attribute {name!r}")
    return getattr(importlib.import_module(f"kvmmem.realkvm.{home}"), name)


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
