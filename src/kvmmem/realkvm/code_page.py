"""The guest code page of the fixed-width architectures (arm64, riscv): routines laid
out at a fixed stride, a trap entry, a filler instruction everywhere else.

Stdlib only: the agent inside an emulated machine builds its page with it.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class GuestProgram:
    """A code page: ``code`` and each entry's byte offset in it (the routines by name,
    plus the trap entry: ``vectors`` on arm64, ``trap`` on riscv)."""

    code: bytes
    entries: dict[str, int]


def words(instructions: Iterable[int]) -> bytes:
    """32-bit instruction words, little-endian."""
    return b"".join(struct.pack("<I", w) for w in instructions)


def lay_out(routines: Mapping[str, list[int]], *, size: int, stride: int, filler: int,
            trap_name: str, trap_offset: int, trap: list[int], trap_copies: int = 1,
            trap_stride: int = 0) -> GuestProgram:
    """The page of ``size`` bytes: each routine at the next multiple of ``stride`` from 0,
    ``trap_copies`` copies of ``trap`` from ``trap_offset`` every ``trap_stride`` bytes,
    ``filler`` in every other word.  Raises ``ValueError`` when a routine outgrows its
    stride, the routines reach the trap entry, or a trap copy outgrows its stride."""
    page = bytearray(words([filler] * (size // 4)))
    entries: dict[str, int] = {}
    offset = 0
    for name, instructions in routines.items():
        code = words(instructions)
        if len(code) > stride:
            raise ValueError(f"guest routine {name} is {len(code)} bytes (stride {stride})")
        page[offset:offset + len(code)] = code
        entries[name] = offset
        offset += stride
    if offset > trap_offset:
        raise ValueError(f"the routines end at {offset:#x}, past the trap entry "
                         f"{trap_offset:#x}")
    handler = words(trap)
    if trap_copies > 1 and len(handler) > trap_stride:
        raise ValueError(f"the trap handler is {len(handler)} bytes (stride {trap_stride})")
    for i in range(trap_copies):
        start = trap_offset + i * trap_stride
        page[start:start + len(handler)] = handler
    entries[trap_name] = trap_offset
    return GuestProgram(bytes(page), entries)


def routine_table(access: Callable[[int, bool], list[int]], touch: Callable[[bool], list[int]],
                  spin: list[int]) -> dict[str, list[int]]:
    """Every routine's instruction words by name, in page order: ``read1`` .. ``read8``
    and ``write1`` .. ``write8`` from ``access(size, is_write)``, ``touch_read`` and
    ``touch_write`` from ``touch(is_write)``, then ``spin``."""
    out: dict[str, list[int]] = {}
    for size in (1, 2, 4, 8):
        out[f"read{size}"] = access(size, False)
        out[f"write{size}"] = access(size, True)
    out["touch_read"] = touch(False)
    out["touch_write"] = touch(True)
    out["spin"] = spin
    return out
