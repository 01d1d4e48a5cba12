"""Memslot update cost in the model: one KVM_SET_USER_MEMORY_REGION with N slots present.

``run(quick)`` returns ``{name: value}`` for ``kvmmem bench``; run as a script it
prints a table (a rich progress bar only when stdout is a terminal).

* ``memslot_create_us`` / ``memslot_delete_us`` - one create / one delete of a
  4 KiB slot with 32,000 slots present (median of repeats), the layout
  ``bench_realkvm.py`` uses on the real /dev/kvm (slot i at gpa i*4K, hva
  consecutive; an x86 VM, no hooks: the memslot layer alone);
* ``memslot_{create,delete,move,flags}_us_<N>`` - the same (plus a MOVE and a
  LOG_DIRTY_PAGES toggle) with N = 0, 1000, 10000, 32000 slots present: the
  figures must be flat in N, as the kernel's since the active/inactive memslot
  sets (v5.17);
* ``memslot_flatness`` - the largest create/delete median over N divided by
  the smallest.

Real KVM on this host: create 5.2-8.5 us, delete 6.2-8.5 us, move 8-18 us,
dirty-log toggle 3.6 us, flat in N (kvm-on-this-host.md §3.8).  With
``--compare-real`` the script also measures the real /dev/kvm in the same run
(same load) using ``bench_realkvm.memslot_ops``.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from kvmmem.kvm.memslot import KVM_MEM_LOG_DIRTY_PAGES, VmMemslots, region, validate_memslots

PAGE = 4096
HVA = 0x7F00_0000_0000
PRESENT = (0, 1000, 10000, 32000)


@contextmanager
def _progress(total: int) -> Iterator[Callable[[str], None]]:
    """A rich progress bar on a terminal; silent when piped."""
    if not sys.stdout.isatty():
        yield lambda _label: None
        return
    from rich.progress import Progress

    with Progress(transient=True) as bar:
        task = bar.add_task("memslots", total=total)

        def step(label: str) -> None:
            bar.update(task, advance=1, description=label)

        yield step


def memslot_ops(present: int, repeats: int) -> dict[str, float]:
    """Median µs of one create, delete, move and LOG_DIRTY toggle of a 4 KiB
    slot with ``present`` other 4 KiB slots in an x86 model VM."""
    kvm = VmMemslots("x86")
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


def run(quick: bool = False) -> dict[str, float]:
    """Measure every figure; ``quick`` uses fewer repeats (same slot counts)."""
    repeats = 1000 if quick else 4000
    out: dict[str, float] = {}
    with _progress(len(PRESENT)) as tick:
        for present in PRESENT:
            for name, value in memslot_ops(present, repeats).items():
                out[f"memslot_{name}_us_{present}"] = value
            tick(f"{present} slots")
    out["memslot_create_us"] = out["memslot_create_us_32000"]
    out["memslot_delete_us"] = out["memslot_delete_us_32000"]
    out["memslots_present"] = 32000.0
    out["memslot_flatness"] = max(
        max(out[f"memslot_{op}_us_{n}"] for n in PRESENT)
        / min(out[f"memslot_{op}_us_{n}"] for n in PRESENT) for op in ("create", "delete"))
    return out


def _real_figures(present: int) -> tuple[float, float] | None:
    """``bench_realkvm.memslot_ops`` on /dev/kvm, or None where it is unusable."""
    import importlib.util
    from pathlib import Path

    from kvmmem.realkvm import Kvm, probe_kvm

    if probe_kvm() is not None:
        return None
    spec = importlib.util.spec_from_file_location(
        "bench_realkvm", Path(__file__).with_name("bench_realkvm.py"))
    if spec is None or spec.loader is None:
        return None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with Kvm() as kvm:
        create, delete = module.memslot_ops(kvm, present, 200)
    return float(create), float(delete)


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
