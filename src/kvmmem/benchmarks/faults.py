"""Guest fault and exit cost in the model: the figures real KVM is measured on too.

* ``fault_4k_fresh_us`` - one first-touch guest 4 KiB write on never-touched
  anonymous memory, per page over N pages: the vCPU's TLB and stage-2 walk
  miss, the fault handler, the resolver's GUP with the host write fault (frame
  allocation, host PTE) and the 4K stage-2 install;
* ``fault_4k_present_us`` - the same after userspace stored to every page
  (``mmap(..., fill=0)``): the host pages are present, the guest fault only
  looks them up and installs the stage-2 entry;
* ``mmio_exit_us`` - one guest 4-byte write to a gpa no memslot covers: the
  stage-2 fault ending as an MMIO exit.

Each figure uses a fresh model VM (:class:`~kvmmem.kvm.vm.Vm`) of the chosen
architecture, memslot 0 at 1 GiB; :func:`fault_4k` checks that every access
took exactly one 4K fault so a model change that silently maps huge pages or
prefaults cannot pass as a faster fault path.
"""

from __future__ import annotations

import time

from kvmmem.benchmarks.common import Tick, no_tick
from kvmmem.host import PROT_READ, PROT_WRITE
from kvmmem.kvm.vcpu import Access
from kvmmem.kvm.vm import Vm

PAGE = 4096
G = 0x4000_0000
MMIO_GPA = 0x1000_0000
"""Below the slot at 1 GiB and covered by none: every access to it exits."""


def ticks(quick: bool = False) -> int:
    """How many times :func:`run` calls its ``tick``."""
    return 3


def fault_4k(arch: str, pages: int, populate: bool) -> float:
    """µs per page of a guest write to each of ``pages`` 4 KiB pages of a fresh
    anonymous mapping (host pages populated first when ``populate``)."""
    vm = Vm(arch)
    try:
        size = pages * PAGE
        hva = vm.mm.mmap(size, PROT_READ | PROT_WRITE, "anon", fill=0 if populate else None)
        vm.set_user_memory_region(0, G, size, hva)
        access = vm.guest_access
        write = Access.WRITE
        t0 = time.perf_counter()
        for i in range(pages):
            access(G + i * PAGE, 8, write, i)
        seconds = time.perf_counter() - t0
        stats = vm.stats_dict()
        if stats["pf_fixed"] != pages or stats["pages_4k"] != pages:
            raise RuntimeError(
                f"model fault bench on {arch}: expected {pages} 4K faults, got "
                f"pf_fixed {stats['pf_fixed']}, pages_4k {stats['pages_4k']}")
        last = access(G + (pages - 1) * PAGE, 8, Access.READ).to_outcome()
        if last != {"result": "ok", "value": pages - 1}:
            raise RuntimeError(f"model fault bench on {arch}: read back {last}")
    finally:
        vm.close()
    return seconds / pages * 1e6


def mmio_exit(arch: str, count: int) -> float:
    """µs per guest MMIO write (a gpa without memslot) in a fresh model VM."""
    vm = Vm(arch)
    try:
        access = vm.guest_access
        write = Access.WRITE
        t0 = time.perf_counter()
        for i in range(count):
            access(MMIO_GPA, 4, write, i)
        seconds = time.perf_counter() - t0
        exits = vm.stats_dict()["mmio_exits"]
        if exits != count:
            raise RuntimeError(f"model mmio bench on {arch}: {exits} of {count} exits")
    finally:
        vm.close()
    return seconds / count * 1e6


def run(quick: bool = False, tick: Tick = no_tick, arch: str = "x86",
        pages: int | None = None) -> dict[str, float]:
    """``fault_4k_fresh_us``, ``fault_4k_present_us`` (over ``pages`` pages: 10,000,
    1,000 when ``quick``), ``fault_pages`` and ``mmio_exit_us`` on ``arch``."""
    n = pages if pages is not None else (1000 if quick else 10000)
    exits = 200 if quick else 2000
    out: dict[str, float] = {}
    out["fault_4k_fresh_us"] = fault_4k(arch, n, populate=False)
    tick("model fault_4k_fresh")
    out["fault_4k_present_us"] = fault_4k(arch, n, populate=True)
    tick("model fault_4k_present")
    out["fault_pages"] = float(n)
    out["mmio_exit_us"] = mmio_exit(arch, exits)
    tick("model mmio_exit")
    return out
