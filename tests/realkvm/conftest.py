"""Fixtures for the real-KVM tests: skipped, with the reason, where /dev/kvm is unusable.

``kvm`` opens /dev/kvm once per module after :func:`~kvmmem.realkvm.kvm.probe_kvm` has
created a VM with a vCPU on it; on a host without a usable /dev/kvm every test that
asks for it is skipped with the probe's one-line reason.  ``host`` and ``vm`` are
released after each test, so the process (and the machine) is left as it was.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kvmmem.realkvm import HostMemory, Kvm, RealVm, probe_kvm

from .helpers import G, M


@pytest.fixture(scope="module")
def kvm() -> Iterator[Kvm]:
    """An open /dev/kvm, or a skip with the reason it cannot run a VM."""
    reason = probe_kvm()
    if reason is not None:
        pytest.skip(f"no usable /dev/kvm: {reason}")
    with Kvm() as k:
        yield k


@pytest.fixture
def host() -> Iterator[HostMemory]:
    """Real host mappings for one test."""
    with HostMemory() as h:
        yield h


@pytest.fixture
def vm(kvm: Kvm) -> Iterator[RealVm]:
    """A real VM whose harness keeps clear of [G, G + 64 MiB) and slot ids 0..15."""
    with RealVm([(G, 32 * M)], range(16), kvm=kvm) as v:
        yield v

