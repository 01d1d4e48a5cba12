"""Integration: boot the CI machines that are fetched (skipped otherwise), ping the
agent, and leave no QEMU behind, also after an exception or a lost reference (the
session's shared machines, ``machines`` in tests/conftest.py, stay until the session
ends and are closed then)."""

from __future__ import annotations

import gc
import os
import signal
from typing import Any

import pytest

from kvmmem.machine import AgentError, MachineError

from .conftest import CI_MACHINES, BootMachine, qemu_children, require_machine


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.parametrize(("arch", "version"), CI_MACHINES, ids=["-".join(m) for m in CI_MACHINES])
def test_boot_ping_close(boot_machine: BootMachine, arch: str, version: str,
                         machines: Any) -> None:
    machine = boot_machine(arch, version)
    assert machine.ready is not None
    assert machine.ready["release"] == machine.manifest.kernel_release
    assert machine.release == machine.manifest.kernel_release
    assert machine.request("ping") == "pong"
    assert machine.ping() >= 0
    with pytest.raises(AgentError, match="unknown command 'no-such-command'"):
        machine.request("no-such-command")
    assert machine.request("ping") == "pong"  # still serving
    if arch == "x86":
        assert machine.ready["kvm"] is None  # SVM with nested paging under TCG
    pid = machine.pid
    workdir = machine.workdir
    assert pid is not None and workdir is not None and workdir.exists()
    assert machine.close() == 0  # the guest powered off
    assert _gone(pid) and not workdir.exists() and not machine.running
    assert "kvmmem: modules loaded" in machine.console_output
    if arch == "x86":
        assert "kvmmem: kvm_amd npt=Y" in machine.console_output
    assert machine.close() is None
    assert set(qemu_children()) <= machines.pids()  # only the session's shared machines


def _first_ci_machine() -> tuple[str, str]:
    for arch, version in CI_MACHINES:
        try:
            require_machine(arch, version)
        except pytest.skip.Exception:
            continue
        return arch, version
    pytest.skip("no CI machine fetched: run kvmmem machine fetch arm64 7.3")


def test_exception_inside_with_kills_qemu(machines: Any) -> None:
    machine = require_machine(*_first_ci_machine())
    with pytest.raises(RuntimeError, match="boom"), machine:
        pid = machine.pid
        raise RuntimeError("boom")
    assert pid is not None and _gone(pid) and machine.workdir is None
    assert set(qemu_children()) <= machines.pids()  # only the session's shared machines


def test_hung_guest_is_killed_with_console_in_the_error(machines: Any) -> None:
    machine = require_machine(*_first_ci_machine())
    with machine:
        pid = machine.pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)  # the guest stops answering
        with pytest.raises(MachineError, match=r"guest did not answer ping within 1 s; "
                                               r"console: .*kvmmem: "):
            machine.request("ping", timeout=1)
        assert _gone(pid) and not machine.running
    assert set(qemu_children()) <= machines.pids()  # only the session's shared machines


def test_lost_reference_kills_qemu(machines: Any) -> None:
    machine = require_machine(*_first_ci_machine())
    machine.start()
    pid = machine.pid
    assert pid is not None
    del machine
    gc.collect()
    assert _gone(pid)
    assert set(qemu_children()) <= machines.pids()  # only the session's shared machines
