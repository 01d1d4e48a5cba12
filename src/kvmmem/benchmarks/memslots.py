"""Memslot update cost in the model: one KVM_SET_USER_MEMORY_REGION with N slots present.

* ``memslot_create_us`` / ``memslot_delete_us`` - one create / one delete of a
  4 KiB slot with 32,000 slots present (median of repeats), the layout
  :func:`kvmmem.benchmarks.realkvm.memslot_ops` uses on the real /dev/kvm (slot
  i at gpa i*4K, hva consecutive; an x86 VM, no hooks: the memslot layer alone);
* ``memslot_{create,delete,move,flags}_us_<N>`` - the same (plus a MOVE and a
  LOG_DIRTY_PAGES toggle) with N = 0, 1000, 10000, 32000 slots present: the
  figures must be flat in N, as the kernel's since the active/inactive memslot
  sets (v5.17);
* ``memslot_flatness`` - the largest create/delete median over N divided by
  the smallest.

Real KVM on this host: create 5.2-8.5 us, delete 6.2-8.5 us, move 8-18 us,
dirty-log toggle 3.6 us, flat in N (kvm-on-this-host.md §3.8).
"""

from __future__ import annotations

import statistics
import time

from kvmmem.benchmarks.common import Tick, no_tick
from kvmmem.kvm.memslot import KVM_MEM_LOG_DIRTY_PAGES, VmMemslots, region, validate_memslots

PAGE = 4096
HVA = 0x7F00_0000_0000
PRESENT = (0, 1000, 10000, 32000)
SLOTS = 32000
"""Slots present for ``memslot_create_us`` / ``memslot_delete_us``."""


def ticks(quick: bool = False) -> int:
    """How many times :func:`run` calls its ``tick``."""
    return len(PRESENT)


def memslot_ops(present: int, repeats: int, arch: str = "x86") -> dict[str, float]:
    """Median µs of one create, delete, move and LOG_DIRTY toggle of a 4 KiB
    slot with ``present`` other 4 KiB slots in an ``arch`` model VM."""
    kvm = VmMemslots(arch)
    for slot in range(present):
        kvm.set_user_memory_region(region(slot, slot * PAGE, PAGE, HVA + slot * PAGE))
    extra, gpa, hva = present, present * PAGE, HVA + present * PAGE
    create = region(extra, gpa, PAGE, hva)
    delete = region(extra, gpa, 0, hva)
    moved = region(extra, gpa + PAGE, PAGE, hva)
    logged = region(extra, gpa + PAGE, PAGE, hva, KVM_MEM_LOG_DIRTY_PAGES)
    ioctl = kvm.set_user_memory_region
    clock = time.perf_counter
    times: dict[str, list[float]] = {"create": [], "delete": [], "move": [], "flags": []}
    for _ in range(repeats):
        t0 = clock()
        ioctl(create)
        t1 = clock()
        ioctl(delete)
        t2 = clock()
        times["create"].append(t1 - t0)
        times["delete"].append(t2 - t1)
    for _ in range(max(1, repeats // 4)):
        ioctl(create)
        t0 = clock()
        ioctl(moved)
        t1 = clock()
        ioctl(logged)
        t2 = clock()
        times["move"].append(t1 - t0)
        times["flags"].append(t2 - t1)
        ioctl(delete)
    validate_memslots(kvm)
    if len(kvm.memslots()) != present:
        raise RuntimeError("bench left slots behind")
    return {name: statistics.median(values) * 1e6 for name, values in times.items()}


def run(quick: bool = False, tick: Tick = no_tick) -> dict[str, float]:
    """Measure every figure; ``quick`` uses fewer repeats (same slot counts)."""
    repeats = 1000 if quick else 4000
    out: dict[str, float] = {}
    for present in PRESENT:
        for name, value in memslot_ops(present, repeats).items():
            out[f"memslot_{name}_us_{present}"] = value
        tick(f"{present} slots")
    out["memslot_create_us"] = out[f"memslot_create_us_{SLOTS}"]
    out["memslot_delete_us"] = out[f"memslot_delete_us_{SLOTS}"]
    out["memslots_present"] = float(SLOTS)
    out["memslot_flatness"] = max(
        max(out[f"memslot_{op}_us_{n}"] for n in PRESENT)
        / min(out[f"memslot_{op}_us_{n}"] for n in PRESENT) for op in ("create", "delete"))
    return out
