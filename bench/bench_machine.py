"""What a machine costs a user: boot to a ready agent, and a scenario on it.

``python bench/bench_machine.py [ARCH VERSION ...] [--runs N]`` boots each machine
given (default: the CI machines that are fetched: arm64 7.3, riscv 7.2, x86 7.3) and
prints one table:

* ``boot_s`` - ``Machine.start()``: QEMU start to the agent's ready line;
* ``real_ms`` / ``real_min_ms`` - the real side of one 10-step scenario (a fresh VM,
  its mappings and memslot, 10 guest and host steps, teardown) through the agent:
  median and best of N runs, JSON over virtio-serial included;
* ``conform_ms`` - the whole ``conform_scenario`` of it (model + real + compare);
* ``bundled_s`` - every bundled scenario naming the arch through conform, one boot.

Timings under TCG vary 2-3x between runs; the tests assert outcomes, never times.
Quiet progress: one line per machine on stderr when it is a terminal.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

from kvmmem.conform import MachineTarget, conform_scenario
from kvmmem.machine import Machine, MachineError, MachineUnavailable
from kvmmem.scenario import load_scenario, load_scenario_text

SCENARIOS = Path(__file__).resolve().parents[1] / "scenarios"
CI_MACHINES = (("arm64", "7.3"), ("riscv", "7.2"), ("x86", "7.3"))

TEN_STEPS = """
kvmmem: 1
name: ten-steps
arch: {arch}
memory:
  ram: {{size: 64K, kind: anon, prot: rw}}
memslots:
  - {{slot: 0, gpa: 0x40000000, size: 64K, memory: ram}}
steps:
  - guest_write: {{gpa: 0x40000000, size: 8, value: 0x1122334455667788}}
  - guest_read: {{gpa: 0x40000000, size: 8}}
  - host_read: {{memory: ram, offset: 0, size: 8}}
  - guest_write: {{gpa: 0x40001000, size: 4, value: 7}}
  - guest_read: {{gpa: 0x40002000, size: 4}}
  - host_write: {{memory: ram, offset: 0x3000, size: 4, value: 9}}
  - guest_read: {{gpa: 0x40003000, size: 4}}
  - host_mprotect: {{memory: ram, offset: 0, size: 64K, prot: r}}
  - guest_write: {{gpa: 0x40004000, size: 4, value: 1}}
  - guest_read: {{gpa: 0x50000000, size: 4}}
"""


def measure(arch: str, version: str, runs: int) -> dict[str, float]:
    """Boot ``arch``-``version`` and time it (module docstring).  Raises
    :class:`~kvmmem.machine.MachineError`."""
    scenario = load_scenario_text(TEN_STEPS.format(arch=arch), "ten-steps.yaml")
    machine = Machine(arch, version)
    start = time.perf_counter()
    with machine:
        boot = time.perf_counter() - start
        target = MachineTarget(machine)
        program = target.program(scenario, "native", None)
        real = []
        for _ in range(runs):
            t = time.perf_counter()
            target.run(program)
            real.append(time.perf_counter() - t)
        whole = []
        for _ in range(runs):
            t = time.perf_counter()
            conform_scenario(scenario, target=target)
            whole.append(time.perf_counter() - t)
        files = [load_scenario(p) for p in sorted(SCENARIOS.glob("*.yaml"))]
        t = time.perf_counter()
        for s in files:
            if arch in s.arches:
                conform_scenario(s, target=target)
        bundled = time.perf_counter() - t
    return {"boot_s": boot, "real_ms": statistics.median(real) * 1e3,
            "real_min_ms": min(real) * 1e3, "conform_ms": statistics.median(whole) * 1e3,
            "bundled_s": bundled}


def main() -> None:
    """Print the table; one line and exit status 4 when no machine can be had."""
    args = sys.argv[1:]
    runs = 20
    if "--runs" in args:
        i = args.index("--runs")
        runs = int(args[i + 1])
        del args[i:i + 2]
    pairs = list(zip(args[::2], args[1::2], strict=False)) or list(CI_MACHINES)
    rows = []
    for arch, version in pairs:
        if sys.stderr.isatty():
            print(f"bench_machine: {arch}-{version} ...", file=sys.stderr)
        try:
            rows.append((f"{arch}-{version}", measure(arch, version, runs)))
        except MachineUnavailable as exc:
            print(f"bench_machine: skipped {arch}-{version}: {exc}")
        except MachineError as exc:
            print(f"bench_machine: {arch}-{version} failed: {exc}")
    if not rows:
        raise SystemExit(4)
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"machines: boot and a 10-step scenario ({runs} runs)")
    table.add_column("machine")
    for key in rows[0][1]:
        table.add_column(key, justify="right")
    for name, figures in rows:
        table.add_row(name, *(f"{v:.2f}" if k.endswith("_s") else f"{v:.0f}"
                              for k, v in figures.items()))
    Console(highlight=False).print(table)


if __name__ == "__main__":
    main()
