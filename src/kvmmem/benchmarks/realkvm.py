"""Real-KVM figures the model reports too, measured on this host's /dev/kvm.

* ``fault_4k_fresh_us`` - first-touch guest 4 KiB write on fresh anonymous memory,
  host page allocation included, per page over N pages (one native guest loop);
* ``fault_4k_present_us`` - the same with the host pages populated first;
* ``memslot_create_us`` / ``memslot_delete_us`` - one KVM_SET_USER_MEMORY_REGION
  create / delete with 32,000 slots present (median of repeats);
* ``mmio_exit_us`` / ``mmio_exit_emulated_us`` - one guest MMIO write exit and
  re-entry, native (CPL3) and emulated (CPL0) paths;
* ``scenario_run_ms`` - one whole real scenario run (VM, harness, mappings, steps,
  teardown), and over the consecutive runs the change of the open-fd count
  (``cycles_fd_delta``) and of RSS (``cycles_rss_delta_kib``), which must stay flat.

kvm-on-this-host.md §3.8 has the figures measured by hand on this host.
"""

from __future__ import annotations

import os
import statistics
import time

from kvmmem.benchmarks.common import Tick, no_tick
from kvmmem.realkvm import HostMemory, Kvm, KvmUnavailable, RealVm, libc, probe_kvm
from kvmmem.realkvm.runner import run_scenario
from kvmmem.scenario import load_scenario_text

PAGE = 4096
G = 0x4000_0000

SCENARIO = """
kvmmem: 1
name: bench-cycle
memory:
  ram: {size: 2M, kind: anon, prot: rw}
memslots:
  - {slot: 0, gpa: 0x40000000, size: 2M, memory: ram}
steps:
  - guest_write: {gpa: 0x40000010, size: 8, value: 0x1122334455667788}
  - host_read: {memory: ram, offset: 0x10, size: 8}
  - host_mprotect: {memory: ram, offset: 0, size: 2M, prot: r}
  - guest_write: {gpa: 0x40000010, size: 8, value: 1}
  - guest_read: {gpa: 0x80000000, size: 4}
"""


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def ticks(quick: bool = False) -> int:
    """How many times :func:`run` calls its ``tick`` (at most)."""
    return 26


def fault_4k(kvm: Kvm, pages: int, populate: bool) -> float:
    """µs per page of a native guest write loop over ``pages`` fresh 4 KiB pages."""
    size = pages * PAGE
    with HostMemory() as host, RealVm([(G, size)], [0], kvm=kvm) as vm:
        host.mmap("ram", size, "anon", libc.PROT_READ | libc.PROT_WRITE,
                  fill=0 if populate else None)
        vm.set_memslot(0, G, size, host.hva("ram"))
        out, seconds = vm.touch(G, pages, PAGE, write=True)
        if out["result"] != "ok":
            raise RuntimeError(f"touch loop: {out}")
    return float(seconds) / pages * 1e6


def memslot_ops(kvm: Kvm, present: int, repeats: int) -> tuple[float, float]:
    """Median µs of one memslot create and one delete with ``present`` 4 KiB slots in
    the VM (a VM without vCPUs, as kvm-on-this-host.md §3.8)."""
    size = (present + 1) * PAGE
    addr, err = libc.mmap(0, size, libc.PROT_READ | libc.PROT_WRITE,
                          libc.MAP_PRIVATE | libc.MAP_ANONYMOUS | libc.MAP_NORESERVE)
    if err:
        raise OSError(err, "memslot bench mapping")
    try:
        with kvm.create_vm() as vm:
            for slot in range(present):
                vm.set_user_memory_region(slot, 0, slot * PAGE, PAGE, addr + slot * PAGE)
            creates, deletes = [], []
            extra = present
            gpa, hva = present * PAGE, addr + present * PAGE
            for _ in range(repeats):
                t0 = time.perf_counter()
                vm.set_user_memory_region(extra, 0, gpa, PAGE, hva)
                t1 = time.perf_counter()
                vm.set_user_memory_region(extra, 0, gpa, 0, hva)
                t2 = time.perf_counter()
                creates.append(t1 - t0)
                deletes.append(t2 - t1)
    finally:
        libc.munmap(addr, size)
    return statistics.median(creates) * 1e6, statistics.median(deletes) * 1e6


def mmio_exit(kvm: Kvm, count: int, path: str) -> float:
    """µs per MMIO write exit + re-entry of a guest loop."""
    with RealVm([], [], path=path, kvm=kvm) as vm:
        vm.mmio_round_trips(8)
        seen, seconds = vm.mmio_round_trips(count)
    if seen != count:
        raise RuntimeError(f"mmio loop: {seen} of {count} exits")
    return float(seconds) / count * 1e6


def scenario_cycles(kvm: Kvm, runs: int, tick: Tick = no_tick) -> dict[str, float]:
    """``runs`` consecutive real scenario runs: time per run, fd and RSS change."""
    scenario = load_scenario_text(SCENARIO)
    for _ in range(10):
        run_scenario(scenario, kvm=kvm)
    fds, rss = _fds(), _rss()
    start = time.perf_counter()
    for i in range(runs):
        result = run_scenario(scenario, kvm=kvm)
        if not result.supported or result.steps[3]["result"] != "fault":
            raise RuntimeError(f"scenario run {i}: {result.as_dict()}")
        if i % max(1, runs // 20) == 0:
            tick(f"scenario runs {i}/{runs}")
    elapsed = time.perf_counter() - start
    return {
        "scenario_run_ms": elapsed / runs * 1e3,
        "cycles": float(runs),
        "cycles_fds_before": float(fds),
        "cycles_fds_after": float(_fds()),
        "cycles_fd_delta": float(_fds() - fds),
        "cycles_rss_before_kib": rss / 1024,
        "cycles_rss_after_kib": _rss() / 1024,
        "cycles_rss_delta_kib": (_rss() - rss) / 1024,
    }


def require_kvm() -> None:
    """Raise :class:`~kvmmem.realkvm.kvm.KvmUnavailable` (one line saying why) unless
    this host has a usable /dev/kvm."""
    reason = probe_kvm()
    if reason is not None:
        raise KvmUnavailable(reason)


def run(quick: bool = False, tick: Tick = no_tick) -> dict[str, float]:
    """Measure every figure; ``quick`` uses smaller counts.  Raises
    :class:`~kvmmem.realkvm.kvm.KvmUnavailable` without a usable /dev/kvm."""
    require_kvm()
    pages = 1000 if quick else 10000
    slots = 2000 if quick else 32000
    exits = 200 if quick else 2000
    runs = 100 if quick else 1000
    out: dict[str, float] = {}
    with Kvm() as kvm:
        out["fault_4k_fresh_us"] = fault_4k(kvm, pages, populate=False)
        tick("fault_4k_fresh")
        out["fault_4k_present_us"] = fault_4k(kvm, pages, populate=True)
        tick("fault_4k_present")
        out["fault_pages"] = float(pages)
        create, delete = memslot_ops(kvm, slots, 200)
        out.update(memslot_create_us=create, memslot_delete_us=delete,
                   memslots_present=float(slots))
        tick("memslots")
        out["mmio_exit_us"] = mmio_exit(kvm, exits, "native")
        out["mmio_exit_emulated_us"] = mmio_exit(kvm, exits, "emulated")
        tick("mmio")
        out.update(scenario_cycles(kvm, runs, tick))
    return out
