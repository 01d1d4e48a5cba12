"""Stage-2 page-table engine speed and memory, per architecture.

* ``stage2_<arch>_map_<leaf>_per_s`` / ``stage2_<arch>_unmap_<leaf>_per_s`` -
  leaves mapped / unmapped per second, one ``map`` / ``unmap_range`` call per
  leaf (as the fault path and the MMU-notifier zaps call them), for 4K, 2M
  and 1G leaves on consecutive addresses of a fresh table (tables are
  allocated by the maps and, on arm64, freed by the unmaps);
* ``stage2_<arch>_map_4k_us`` - microseconds per 4K ``map``;
* ``stage2_<arch>_bytes_per_4k`` - bytes of model memory (numpy arrays with
  their headers, bookkeeping lists) per mapped 4K page with 256 MiB mapped in
  4K pages; the hardware needs 8 B (one entry) plus the upper levels;
  target: at most 16 B;
* ``stage2_bytes_per_4k`` - the largest of the three; ``stage2_map_4k_us`` -
  the slowest 4K map.

The real KVM on this host takes 21-26 µs per first-touch 4K fault and 3.1 µs
when the host page exists (kvm-on-this-host.md §3.8): the model's map is a
small part of the fault path it stands for.
"""

from __future__ import annotations

import time

from kvmmem.arch import PERM_RW, PERM_RWX, make_stage2
from kvmmem.benchmarks.common import Tick, no_tick

ARCHES = ("x86", "arm64", "riscv")
LEAVES = (("4K", 1 << 12), ("2M", 1 << 21), ("1G", 1 << 30))
HARDWARE_BYTES_PER_4K = 8.0
"""One 8-byte leaf entry per 4K page, on every architecture modelled."""


def ticks(quick: bool = False) -> int:
    """How many times :func:`run` calls its ``tick``."""
    return len(ARCHES) * (len(LEAVES) + 1)


def map_unmap_rates(arch: str, size: int, n: int) -> tuple[float, float]:
    """(maps per second, unmaps per second) for ``n`` leaves of ``size`` at
    consecutive addresses of a fresh ``arch`` table."""
    s2 = make_stage2(arch)
    limit = (1 << s2.ipa_bits) // size
    n = min(n, limit - 1)
    gpas = [(i + 1) * size for i in range(n)]
    prot = PERM_RWX if size > 4096 else PERM_RW
    t0 = time.perf_counter()
    for g in gpas:
        s2.map(g, g >> 12, size, prot)
    t1 = time.perf_counter()
    for g in gpas:
        s2.unmap_range(g, size)
    t2 = time.perf_counter()
    return n / (t1 - t0), n / (t2 - t1)


def bytes_per_4k(arch: str, pages: int) -> float:
    """Model bytes per mapped 4K page with ``pages`` consecutive 4K leaves."""
    s2 = make_stage2(arch)
    for i in range(pages):
        s2.map(i << 12, 0x100000 + i, 4096, PERM_RW)
    return s2.model_bytes() / pages


def bytes_pages(quick: bool = False) -> int:
    """4K pages mapped for :func:`bytes_per_4k`: 256 MiB, 64 MiB when ``quick``."""
    return 16384 if quick else 65536


def run(quick: bool = False, tick: Tick = no_tick) -> dict[str, float]:
    """Map/unmap rates for 4K, 2M, 1G leaves and model bytes per 4K page."""
    counts = {"4K": 5000 if quick else 50000, "2M": 2000 if quick else 20000,
              "1G": 200 if quick else 500}
    pages = bytes_pages(quick)
    out: dict[str, float] = {}
    for arch in ARCHES:
        for label, size in LEAVES:
            m, u = map_unmap_rates(arch, size, counts[label])
            out[f"stage2_{arch}_map_{label.lower()}_per_s"] = m
            out[f"stage2_{arch}_unmap_{label.lower()}_per_s"] = u
            tick(f"{arch} {label}")
        out[f"stage2_{arch}_map_4k_us"] = 1e6 / out[f"stage2_{arch}_map_4k_per_s"]
        out[f"stage2_{arch}_bytes_per_4k"] = bytes_per_4k(arch, pages)
        tick(f"{arch} memory")
    out["stage2_bytes_per_4k"] = max(out[f"stage2_{a}_bytes_per_4k"] for a in ARCHES)
    out["stage2_map_4k_us"] = max(out[f"stage2_{a}_map_4k_us"] for a in ARCHES)
    return out
