"""Stage-2 page-table engine speed and memory, per architecture.

The measurements live in :mod:`kvmmem.benchmarks.stage2` (which ``kvmmem bench``
uses too); this script prints them.  ``run(quick)`` returns ``{name: value}``; run as
a script (``python bench/bench_stage2.py [--quick]``) it prints a table (a rich
progress bar only when stdout is a terminal, plain text when piped).

* ``stage2_<arch>_map_<leaf>_per_s`` / ``stage2_<arch>_unmap_<leaf>_per_s`` -
  leaves mapped / unmapped per second, one call per leaf, 4K, 2M and 1G leaves;
* ``stage2_<arch>_map_4k_us`` - microseconds per 4K ``map``;
* ``stage2_<arch>_bytes_per_4k`` - model bytes per mapped 4K page with 256 MiB
  mapped in 4K pages (hardware: 8 B; target: at most 16 B);
* ``stage2_bytes_per_4k`` - the largest of the three; ``stage2_map_4k_us`` -
  the slowest 4K map.
"""

from __future__ import annotations

import sys

from kvmmem.benchmarks import stage2
from kvmmem.benchmarks.common import progress
from kvmmem.benchmarks.stage2 import ARCHES, LEAVES, bytes_per_4k, map_unmap_rates

__all__ = ["ARCHES", "LEAVES", "bytes_per_4k", "format_table", "main", "map_unmap_rates",
           "run"]


def run(quick: bool = False) -> dict[str, float]:
    """Map/unmap rates for 4K, 2M, 1G leaves and model bytes per 4K page."""
    with progress("stage-2", stage2.ticks(quick)) as tick:
        return stage2.run(quick, tick)


def format_table(figures: dict[str, float]) -> list[str]:
    """The figures as plain-text lines."""
    head = f"{'arch':6} {'leaf':4} {'map/s':>10} {'unmap/s':>10} {'µs/map':>8}"
    lines = [head, "-" * len(head)]
    for arch in ARCHES:
        for label, _size in LEAVES:
            m = figures[f"stage2_{arch}_map_{label.lower()}_per_s"]
            u = figures[f"stage2_{arch}_unmap_{label.lower()}_per_s"]
            lines.append(f"{arch:6} {label:4} {m:10.0f} {u:10.0f} {1e6 / m:8.2f}")
    lines.append("")
    lines.append("model bytes per mapped 4K page (hardware: 8 B; target: at most 16 B)")
    for arch in ARCHES:
        lines.append(f"{arch:6} {figures[f'stage2_{arch}_bytes_per_4k']:.2f} B")
    return lines


def main() -> None:
    """Print the figures (``--quick``: fewer operations)."""
    quick = "--quick" in sys.argv[1:]
    figures = run(quick)
    if not sys.stdout.isatty():
        print("\n".join(format_table(figures)))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"stage-2 engine{' (quick)' if quick else ''}")
    for column in ("arch", "leaf", "map/s", "unmap/s", "µs/map"):
        table.add_column(column, justify="right")
    for arch in ARCHES:
        for label, _size in LEAVES:
            m = figures[f"stage2_{arch}_map_{label.lower()}_per_s"]
            u = figures[f"stage2_{arch}_unmap_{label.lower()}_per_s"]
            table.add_row(arch, label, f"{m:.0f}", f"{u:.0f}", f"{1e6 / m:.2f}")
    console = Console()
    console.print(table)
    console.print("model bytes per mapped 4K page (hardware: 8 B; target: at most 16 B): "
                  + ", ".join(f"{a} {figures[f'stage2_{a}_bytes_per_4k']:.2f} B"
                              for a in ARCHES))


if __name__ == "__main__":
    main()
