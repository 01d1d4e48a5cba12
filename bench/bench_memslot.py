"""Memslot update cost in the model: one KVM_SET_USER_MEMORY_REGION with N slots present.

The measurements live in :mod:`kvmmem.benchmarks.memslots` (which ``kvmmem bench``
uses too); this script prints them.  ``run(quick)`` returns ``{name: value}``; run as a
script (``python bench/bench_memslot.py [--quick] [--compare-real]``) it prints a table
(a rich progress bar only when stdout is a terminal).

* ``memslot_create_us`` / ``memslot_delete_us`` - one create / one delete of a
  4 KiB slot with 32,000 slots present (median of repeats; an x86 VM, no hooks:
  the memslot layer alone);
* ``memslot_{create,delete,move,flags}_us_<N>`` - the same (plus a MOVE and a
  LOG_DIRTY_PAGES toggle) with N = 0, 1000, 10000, 32000 slots present: the
  figures must be flat in N, as the kernel's since the active/inactive memslot
  sets (v5.17);
* ``memslot_flatness`` - the largest create/delete median over N divided by
  the smallest.

Real KVM on this host: create 5.2-8.5 us, delete 6.2-8.5 us, move 8-18 us,
dirty-log toggle 3.6 us, flat in N (kvm-on-this-host.md §3.8).  With
``--compare-real`` the script also measures the real /dev/kvm in the same run
(same load) using :func:`kvmmem.benchmarks.realkvm.memslot_ops`.
"""

from __future__ import annotations

import sys

from kvmmem.benchmarks import memslots
from kvmmem.benchmarks.common import progress
from kvmmem.benchmarks.memslots import PRESENT, memslot_ops

__all__ = ["PRESENT", "main", "memslot_ops", "run"]


def run(quick: bool = False) -> dict[str, float]:
    """Measure every figure; ``quick`` uses fewer repeats (same slot counts)."""
    with progress("memslots", memslots.ticks(quick)) as tick:
        return memslots.run(quick, tick)


def _real_figures(present: int) -> tuple[float, float] | None:
    """Real /dev/kvm create/delete medians, or None where it is unusable."""
    from kvmmem.benchmarks.realkvm import memslot_ops as real_memslot_ops
    from kvmmem.realkvm import Kvm, probe_kvm

    if probe_kvm() is not None:
        return None
    with Kvm() as kvm:
        return real_memslot_ops(kvm, present, 200)


def main() -> None:
    """Print the figures as a table (``--quick``: fewer repeats;
    ``--compare-real``: also the real /dev/kvm create/delete)."""
    quick = "--quick" in sys.argv[1:]
    figures = run(quick)
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"model memslot update, µs (median){' (quick)' if quick else ''}")
    for column in ("slots present", "create", "delete", "move", "LOG_DIRTY toggle"):
        table.add_column(column, justify="right")
    for n in PRESENT:
        table.add_row(str(n), *(f"{figures[f'memslot_{op}_us_{n}']:.2f}"
                                for op in ("create", "delete", "move", "flags")))
    console = Console()
    console.print(table)
    console.print(f"memslot_create_us {figures['memslot_create_us']:.2f}  "
                  f"memslot_delete_us {figures['memslot_delete_us']:.2f}  "
                  f"flatness (max/min over N) {figures['memslot_flatness']:.2f}")
    if "--compare-real" in sys.argv[1:]:
        real = _real_figures(32000)
        if real is None:
            console.print("real KVM: skipped (no usable /dev/kvm)")
        else:
            console.print(f"real KVM, 32000 slots, same run: create {real[0]:.2f}  "
                          f"delete {real[1]:.2f}")


if __name__ == "__main__":
    main()
