"""Syscall argument checking shared by the host operations.

A wrong Python type raises :class:`~kvmmem.errors.ArgumentError` (EINVAL, also
an InputError); a negative int is read as the ``unsigned long`` the syscall
would receive."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from kvmmem.errors import ArgumentError
from kvmmem.types import PAGE_SIZE

ULONG_MAX = (1 << 64) - 1


def ulong_arg(value: object, what: str) -> int:
    """An ``unsigned long`` syscall argument: ints only, negatives wrap like C."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise ArgumentError(what, f"expected an int, got {type(value).__name__} {value!r}")
    return value & ULONG_MAX


def bool_arg(value: object, what: str) -> bool:
    """A flag argument: a bool only."""
    if not isinstance(value, bool):
        raise ArgumentError(what, f"expected a bool, got {value!r}")
    return value


def page_align(n: int, page_size: int = PAGE_SIZE) -> int:
    """``PAGE_ALIGN`` on an unsigned long (wraps to 0 on overflow), for pages of
    ``page_size`` bytes (the host's: ``mm.page_size``)."""
    return (n + page_size - 1) & ~(page_size - 1) & ULONG_MAX


def concat_pfns(parts: list[npt.NDArray[np.int64]]) -> npt.NDArray[np.int64]:
    """One array of the pfn arrays a zap collected."""
    if not parts:
        return np.zeros(0, dtype=np.int64)
    if len(parts) == 1:
        return parts[0]
    return np.concatenate(parts)
