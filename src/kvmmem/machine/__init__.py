"""Machines: real arm64, riscv and x86 KVM of Debian kernels under QEMU (TCG).

* :mod:`~kvmmem.machine.catalog` - the machines (arch + version) and how to boot them;
* :func:`fetch` - download a machine's kernel and userland, build its initramfs;
* :class:`Machine` - boot one, talk to its agent over virtio-serial, shut it down;
* :func:`cache_root`, :func:`load_manifest` - what is fetched and where.
"""

from kvmmem.machine.cache import (
    Manifest,
    cache_root,
    fetched_machines,
    load_manifest,
    machine_dir,
)
from kvmmem.machine.catalog import MachineSpec, get_machine, known_machines_text, machines
from kvmmem.machine.errors import AgentError, MachineError, MachineUnavailable, UnknownMachine
from kvmmem.machine.fetch import fetch
from kvmmem.machine.qemu import Machine, boot, default_share

__all__ = [
    "AgentError",
    "Machine",
    "MachineError",
    "MachineSpec",
    "MachineUnavailable",
    "Manifest",
    "UnknownMachine",
    "boot",
    "cache_root",
    "default_share",
    "fetch",
    "fetched_machines",
    "get_machine",
    "known_machines_text",
    "load_manifest",
    "machine_dir",
    "machines",
]
