"""Real-KVM figures the model reports too, measured on this host's /dev/kvm.

The measurements live in :mod:`kvmmem.benchmarks.realkvm` (which ``kvmmem bench``
uses too); this script prints them.  ``run(quick)`` returns ``{name: value}``; run as a
script (``python bench/bench_realkvm.py [--quick]``) it prints a table (a rich progress
bar only when stdout is a terminal), or one line and exit status 4 without /dev/kvm.

* ``fault_4k_fresh_us`` - first-touch guest 4 KiB write on fresh anonymous memory,
  host page allocation included, per page over N pages (one native guest loop);
* ``fault_4k_present_us`` - the same with the host pages populated first;
* ``memslot_create_us`` / ``memslot_delete_us`` - one KVM_SET_USER_MEMORY_REGION
  create / delete with N slots present (median of repeats);
* ``mmio_exit_us`` / ``mmio_exit_emulated_us`` - one guest MMIO write exit and
  re-entry, native (CPL3) and emulated (CPL0) paths;
* ``scenario_run_ms`` - one whole real scenario run (VM, harness, mappings, steps,
  teardown), and over the consecutive runs the change of the open-fd count
  (``cycles_fd_delta``) and of RSS (``cycles_rss_delta_kib``), which must stay flat.

kvm-on-this-host.md §3.8 has the figures measured by hand on this host.
"""

from __future__ import annotations

import sys

from kvmmem.benchmarks import realkvm
from kvmmem.benchmarks.common import progress
from kvmmem.benchmarks.realkvm import fault_4k, memslot_ops, mmio_exit, scenario_cycles
from kvmmem.realkvm import KvmUnavailable

__all__ = ["fault_4k", "main", "memslot_ops", "mmio_exit", "run", "scenario_cycles"]


def run(quick: bool = False) -> dict[str, float]:
    """Measure every figure; ``quick`` uses smaller counts.  Raises
    :class:`~kvmmem.realkvm.kvm.KvmUnavailable` without a usable /dev/kvm."""
    with progress("real KVM", realkvm.ticks(quick)) as tick:
        return realkvm.run(quick, tick)


def main() -> None:
    """Print the figures as a table; one line and exit status 4 without /dev/kvm."""
    quick = "--quick" in sys.argv[1:]
    try:
        figures = run(quick)
    except KvmUnavailable as exc:
        print(f"bench_realkvm: skipped: {exc}")
        sys.exit(4)
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"real KVM on this host{' (quick)' if quick else ''}")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for name, value in figures.items():
        table.add_row(name, f"{value:.2f}" if value != int(value) else f"{int(value)}")
    Console().print(table)


if __name__ == "__main__":
    main()
