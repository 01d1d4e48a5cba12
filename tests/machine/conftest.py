"""Fixtures for tests that boot machines.

``boot_machine`` is a factory: ``boot_machine(arch, version, **options)`` returns a
started :class:`~kvmmem.machine.Machine` (closed when the test ends), or skips the
test with the reason when the machine is not fetched or its QEMU is missing.
:func:`require_machine` does the skip check alone.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from kvmmem.machine import Machine, MachineUnavailable

BootMachine = Callable[..., Machine]

CI_MACHINES = (("arm64", "7.3"), ("riscv", "7.2"), ("x86", "7.3"))
"""The machines CI fetches; the integration tests run on each one fetched."""


def require_machine(arch: str, version: str, **options: Any) -> Machine:
    """Returns an unstarted Machine, or skips the test saying why it cannot run."""
    try:
        return Machine(arch, version, **options)
    except MachineUnavailable as exc:
        pytest.skip(str(exc))


def qemu_children() -> list[int]:
    """Returns the pids of this process's children whose command is a QEMU."""
    found = []
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        if ppid == me and comm.startswith("qemu-system"):
            found.append(int(entry))
    return found


@pytest.fixture
def boot_machine() -> Iterator[BootMachine]:
    """Factory of booted machines; every machine it made is closed at teardown."""
    made: list[Machine] = []

    def boot(arch: str, version: str, **options: Any) -> Machine:
        machine = require_machine(arch, version, **options)
        made.append(machine)
        machine.start()
        return machine

    yield boot
    for machine in made:
        machine.close()
