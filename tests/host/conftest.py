"""Shared fixtures for the host-model tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kvmmem.host import Mm, PhysMem, RecordingNotifier
from kvmmem.host.validate import validate_mm

P = 4096
M = 2 << 20


@pytest.fixture
def mm() -> Iterator[Mm]:
    """A fresh address space; its consistency is validated after the test."""
    m = Mm(PhysMem())
    yield m
    if not m.closed:
        validate_mm(m, exact=False)


@pytest.fixture
def rec(mm: Mm) -> RecordingNotifier:
    """A recording MMU-notifier subscriber registered on ``mm``."""
    r = RecordingNotifier()
    mm.mmu_notifier_register(r)
    return r
