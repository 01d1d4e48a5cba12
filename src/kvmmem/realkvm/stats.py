"""KVM's binary statistics (``KVM_GET_STATS_FD``) read into named counters.

The fd holds a ``kvm_stats_header``, an id string, ``num_desc`` descriptors
(each a ``kvm_stats_desc`` followed by ``name_size`` bytes of name) and a data
block of u64 values; the values can be re-read at any time with ``pread`` at
``data_offset`` (Documentation/virt/kvm/api.rst, "The binary statistics").
:class:`StatsFd` parses the header and descriptors once, then
:meth:`StatsFd.read` returns ``{name: value}``.  The same names are used by the
model (:mod:`kvmmem.kvm.stats`), so real and modelled counters line up.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

from kvmmem.realkvm.structs import (
    KVM_STATS_BASE_MASK,
    KVM_STATS_BASE_SHIFT,
    KVM_STATS_TYPE_MASK,
    KVM_STATS_UNIT_MASK,
    KVM_STATS_UNIT_SHIFT,
    STATS_TYPES,
    STATS_UNITS,
    kvm_stats_desc,
    kvm_stats_header,
)


@dataclass(frozen=True, slots=True)
class StatDescriptor:
    """One statistic: its name, ``type`` (cumulative, instant, peak, linear_hist,
    log_hist), unit, exponent, the number of u64 values and their index in the data
    block."""

    name: str
    type: str
    unit: str
    base: int
    exponent: int
    size: int
    index: int
    bucket_size: int


class StatsFd:
    """An open stats fd (VM or vCPU): ``read()`` -> ``{name: value}``.

    The object owns the fd: ``close()`` (or the ``with`` block) releases it.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        try:
            header = kvm_stats_header.from_buffer_copy(
                os.pread(fd, ctypes.sizeof(kvm_stats_header), 0))
            self.flags = header.flags
            self.id = os.pread(fd, header.name_size, header.id_offset).split(b"\0")[0].decode()
            desc_size = ctypes.sizeof(kvm_stats_desc) + header.name_size
            raw = os.pread(fd, desc_size * header.num_desc, header.desc_offset)
            descriptors: list[StatDescriptor] = []
            words = 0
            for i in range(header.num_desc):
                chunk = raw[i * desc_size:(i + 1) * desc_size]
                desc = kvm_stats_desc.from_buffer_copy(chunk)
                name = chunk[ctypes.sizeof(kvm_stats_desc):].split(b"\0")[0].decode()
                kind = desc.flags & KVM_STATS_TYPE_MASK
                unit = (desc.flags & KVM_STATS_UNIT_MASK) >> KVM_STATS_UNIT_SHIFT
                descriptors.append(StatDescriptor(
                    name=name,
                    type=STATS_TYPES[kind] if kind < len(STATS_TYPES) else str(kind),
                    unit=STATS_UNITS[unit] if unit < len(STATS_UNITS) else str(unit),
                    base=10 if (desc.flags & KVM_STATS_BASE_MASK) >> KVM_STATS_BASE_SHIFT == 0
                    else 2,
                    exponent=desc.exponent,
                    size=desc.size,
                    index=desc.offset // 8,
                    bucket_size=desc.bucket_size,
                ))
                words = max(words, desc.offset // 8 + desc.size)
            self.descriptors: tuple[StatDescriptor, ...] = tuple(descriptors)
            self._data_offset = header.data_offset
            self._data_len = words * 8
        except BaseException:
            os.close(fd)
            raise

    def _values(self) -> memoryview:
        return memoryview(os.pread(self.fd, self._data_len, self._data_offset)).cast("Q")

    def read(self) -> dict[str, int]:
        """Every statistic's current value by name; a histogram gives the sum of its
        buckets (see :meth:`read_histograms` for the buckets)."""
        values = self._values()
        out: dict[str, int] = {}
        for d in self.descriptors:
            if d.size == 1:
                out[d.name] = values[d.index]
            else:
                out[d.name] = sum(values[d.index:d.index + d.size])
        return out

    def read_histograms(self) -> dict[str, tuple[int, ...]]:
        """The bucket values of every histogram statistic, by name."""
        values = self._values()
        return {d.name: tuple(values[d.index:d.index + d.size])
                for d in self.descriptors if d.size > 1}

    def close(self) -> None:
        """Close the fd (idempotent)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> StatsFd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def stats_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """``after - before`` for every counter that changed (instant counters too)."""
    return {name: after[name] - before.get(name, 0)
            for name in after if after[name] != before.get(name, 0)}
