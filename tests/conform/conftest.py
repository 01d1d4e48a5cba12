"""Fixtures for the conformance tests: one /dev/kvm per module, skipped with the reason
where it is unusable; ``--long`` (or ``KVMMEM_LONG=1``) runs the differential test with
1000 sequences instead of 100.

``--long`` is registered here, so pass it with this directory on the command line
(``pytest tests/conform --long``); pytest only reads options from the conftest files
of the paths it is given.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from kvmmem.realkvm import Kvm, probe_kvm


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--long", action="store_true", default=False,
                     help="conformance: 1000 differential sequences instead of 100")


def long_run(config: pytest.Config) -> bool:
    """Whether the long differential run was asked for (``--long`` or KVMMEM_LONG=1)."""
    try:
        flag = bool(config.getoption("--long"))
    except ValueError:  # the option was not registered (conftest not initial)
        flag = False
    return flag or os.environ.get("KVMMEM_LONG", "") not in ("", "0")


@pytest.fixture(scope="module")
def kvm() -> Iterator[Kvm]:
    """An open /dev/kvm, or a skip with the reason it cannot run a VM."""
    reason = probe_kvm()
    if reason is not None:
        pytest.skip(f"no usable /dev/kvm: {reason}")
    with Kvm() as k:
        yield k
