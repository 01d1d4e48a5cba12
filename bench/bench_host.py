"""Host-model speed and size: mmap/munmap/mprotect rates, first-touch faults, bytes per page.

For each size N (10^3 .. 10^6 pages of 4 KiB) one fresh address space measures:

* ``populate`` - ``mmap(N pages, fill=...)``: the mapping plus a userspace store to
  every byte (bulk first touch), in pages per second;
* ``first_touch`` - one ``host_write`` of 0 per untouched page (a write fault each:
  page allocation, PTE install; the page stays uniform), in faults per second;
* ``first_touch_data`` - the same with a distinct value per page, which also makes
  the page's 4 KiB content buffer (measured on min(N, 10^4) pages);
* ``mprotect`` - ``mprotect`` of the N populated pages to read-only (PTE
  write-protect under an MMU-notifier range, one subscriber registered), pages/s;
* ``munmap`` - ``munmap`` of the N populated pages (zap, notifier, frames freed),
  pages/s;
* ``mmap_calls`` - small ``mmap`` + ``munmap`` pairs per second while N/16 pages sit
  in separate VMAs (how the VMA tree and top-down placement scale);
* ``bytes_per_page`` - model memory (tracemalloc: page tables, struct-page columns,
  VMA tree) per mapped and touched page.

Run ``python bench/bench_host.py [--quick]``; ``run(quick)`` returns the numbers as a
flat dict (``"first_touch_per_s@1000"`` ...) for ``kvmmem bench``.  Progress is shown
with rich only when stdout is a terminal.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from kvmmem.host import PROT_NONE, PROT_READ, PROT_WRITE, Mm, PhysMem, RecordingNotifier
from kvmmem.host.notifier import MmuNotifierRange
from kvmmem.sync import Op

PAGE = 4096
RW = PROT_READ | PROT_WRITE
SIZES = (10**3, 10**4, 10**5, 10**6)
QUICK_SIZES = (10**3, 10**4)
METRICS = ("populate", "first_touch", "first_touch_data", "mprotect", "munmap", "mmap_calls",
           "bytes_per_page")
UNITS = {
    "populate": "pages/s",
    "first_touch": "faults/s",
    "first_touch_data": "faults/s",
    "mprotect": "pages/s",
    "munmap": "pages/s",
    "mmap_calls": "calls/s",
    "bytes_per_page": "B/page",
}


class _QuietNotifier(RecordingNotifier):
    """A subscriber that does nothing, so the notifier chain cost is included."""

    def invalidate_range_start(self, rng: MmuNotifierRange) -> Op[None]:
        return
        yield  # pragma: no cover

    def invalidate_range_end(self, rng: MmuNotifierRange) -> Op[None]:
        return
        yield  # pragma: no cover


def _rate(count: int, fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    dt = time.perf_counter() - t0
    return count / dt if dt > 0 else float("inf")


def _populate(n: int) -> float:
    mm = Mm(PhysMem())
    return _rate(n, lambda: mm.mmap(n * PAGE, RW, "anon", fill=0x5A))


def _first_touch(n: int, data: bool) -> float:
    mm = Mm(PhysMem())
    a = mm.mmap(n * PAGE, RW, "anon")
    write = mm.host_write

    def touch() -> None:
        for i in range(n):
            write(a + i * PAGE, 8, i if data else 0)

    return _rate(n, touch)


def _mprotect_munmap(n: int) -> tuple[float, float]:
    mm = Mm(PhysMem())
    mm.mmu_notifier_register(_QuietNotifier())
    a = mm.mmap(n * PAGE, RW, "anon", fill=1)
    mp = _rate(n, lambda: mm.mprotect(a, n * PAGE, PROT_READ))
    mu = _rate(n, lambda: mm.munmap(a, n * PAGE))
    return mp, mu


def _mmap_calls(n: int) -> float:
    mm = Mm(PhysMem())
    vmas = max(1, n // 16)
    for i in range(vmas):  # alternate protections so nothing merges
        mm.mmap(PAGE, PROT_READ if i % 2 else PROT_NONE, "anon")
    calls = 2000

    def churn() -> None:
        for _ in range(calls // 2):
            a = mm.mmap(4 * PAGE, RW, "anon")
            mm.munmap(a, 4 * PAGE)

    return _rate(calls, churn)


def _bytes_per_page(n: int) -> float:
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    mm = Mm(PhysMem())
    a = mm.mmap(n * PAGE, RW, "anon", fill=1)
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    del a, mm
    return used / n


def measure(n: int) -> dict[str, float]:
    """Every metric at ``n`` pages."""
    out = {"populate": _populate(n), "first_touch": _first_touch(n, False),
           "first_touch_data": _first_touch(min(n, 10**4), True)}
    out["mprotect"], out["munmap"] = _mprotect_munmap(n)
    out["mmap_calls"] = _mmap_calls(n)
    out["bytes_per_page"] = _bytes_per_page(n)
    return out


@contextmanager
def _progress(total: int) -> Iterator[Callable[[str], None]]:
    if not sys.stdout.isatty():
        yield lambda _label: None
        return
    from rich.progress import Progress

    with Progress(transient=True) as prog:
        task = prog.add_task("bench_host", total=total)

        def step(label: str) -> None:
            prog.update(task, advance=1, description=label)

        yield step


def run(quick: bool = False) -> dict[str, float]:
    """Measure every metric at 10^3..10^6 pages (10^3, 10^4 when ``quick``).

    Returns ``{"<metric>_per_s@<pages>": value, "bytes_per_page@<pages>": value}``."""
    sizes = QUICK_SIZES if quick else SIZES
    results: dict[str, float] = {}
    with _progress(len(sizes)) as step:
        for n in sizes:
            for name, value in measure(n).items():
                key = f"{name}@{n}" if name == "bytes_per_page" else f"{name}_per_s@{n}"
                results[key] = value
            step(f"{n} pages")
    return results


def _table(results: dict[str, float]) -> str:
    sizes = sorted({int(k.split("@")[1]) for k in results})
    head = f"{'pages':>9}" + "".join(f"{m:>17}" for m in METRICS)
    units = f"{'':>9}" + "".join(f"{UNITS[m]:>17}" for m in METRICS)
    lines = [head, units]
    for n in sizes:
        row = f"{n:>9}"
        for m in METRICS:
            key = f"{m}@{n}" if m == "bytes_per_page" else f"{m}_per_s@{n}"
            v = results[key]
            row += f"{v:>17.1f}" if m == "bytes_per_page" else f"{v:>17,.0f}"
        lines.append(row)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="only 10^3 and 10^4 pages")
    args = ap.parse_args(argv)
    print(_table(run(quick=args.quick)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
