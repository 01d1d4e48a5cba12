"""Errors of the machine layer: one line each, naming what is missing and the fix."""

from __future__ import annotations


class MachineError(Exception):
    """A machine could not be fetched, booted or talked to.  ``str()`` is one line
    for the user (the CLI prints it after ``kvmmem: error:`` and exits 2)."""

    exit_status = 2


class MachineUnavailable(MachineError):
    """The machine cannot run on this host as it is: not fetched, or a tool (QEMU,
    apt-get, ...) is missing.  The CLI exits 4 (skipped)."""

    exit_status = 4


class UnknownMachine(MachineError):
    """An architecture or version not in the catalog; the message lists the known ones."""


class AgentError(MachineError):
    """The agent answered a request with ``ok: false``; the machine keeps running.
    ``detail`` holds the agent's traceback excerpt when it sent one."""

    def __init__(self, message: str, detail: str | None = None) -> None:
        super().__init__(message)
        self.detail = detail
