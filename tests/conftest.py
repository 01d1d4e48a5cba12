"""Suite-wide settings and the session's machines: hypothesis keeps no example
database (tests leave no files behind) and never times a single example (the machine
is shared); :class:`MachinePool` boots each machine once per session."""

from __future__ import annotations

import atexit
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from hypothesis import HealthCheck, settings
from hypothesis.configuration import set_hypothesis_home_dir

if TYPE_CHECKING:
    from kvmmem.machine import Machine

# Hypothesis keeps caches (e.g. .hypothesis/constants) under its home directory even
# without an example database: point it at a directory removed when the tests end.
_HYPOTHESIS_HOME = tempfile.TemporaryDirectory(prefix="kvmmem-hypothesis-")
set_hypothesis_home_dir(_HYPOTHESIS_HOME.name)
atexit.register(_HYPOTHESIS_HOME.cleanup)

settings.register_profile(
    "kvmmem",
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("kvmmem")


@pytest.fixture
def tmp_path() -> Iterator[Path]:
    """A fresh directory, removed after the test (pytest's own ``tmp_path``
    keeps the last runs' directories under /tmp: tests leave no files)."""
    with tempfile.TemporaryDirectory(prefix="kvmmem-test-") as directory:
        yield Path(directory)


class MachinePool:
    """Machines booted at most once per test session (a boot costs 8-13 s), closed when
    the session ends: no QEMU outlives it.  :meth:`get` skips the calling test with the
    reason when the machine is not fetched or its QEMU is missing."""

    def __init__(self) -> None:
        self._booted: dict[tuple[str, str], object] = {}
        self._failed: dict[tuple[str, str], str] = {}

    def get(self, arch: str, version: str) -> Machine:
        from kvmmem.machine import Machine, MachineError, MachineUnavailable

        key = (arch, version)
        if key in self._failed:
            pytest.skip(self._failed[key])
        machine = self._booted.get(key)
        if machine is None or not machine.running:  # type: ignore[attr-defined]
            try:
                machine = Machine(arch, version)
            except MachineUnavailable as exc:
                self._failed[key] = str(exc)
                pytest.skip(str(exc))
            try:
                machine.start()
            except MachineError:
                machine.close()
                raise
            self._booted[key] = machine
        return machine  # type: ignore[return-value]

    def pids(self) -> set[int]:
        """The QEMU pids of the machines booted so far (kept for the session)."""
        return {m.pid for m in self._booted.values() if m.pid is not None}  # type: ignore[attr-defined]

    def close(self) -> None:
        for machine in self._booted.values():
            machine.close()  # type: ignore[attr-defined]
        self._booted.clear()


@pytest.fixture(scope="session")
def machines() -> Iterator[MachinePool]:
    """The session's :class:`MachinePool`."""
    pool = MachinePool()
    yield pool
    pool.close()
