"""``host_munmap`` with an ``offset`` and no ``size`` unmaps the rest of the named
range, not past it: the mapping placed right after it stays (seen on real arm64
6.1/6.12 and riscv 6.12, where the model used to unmap a whole range's size from
the offset)."""

from __future__ import annotations

import pytest

from kvmmem.scenario.loader import load_scenario_text
from kvmmem.scenario.runner import Runner

TEXT = """
kvmmem: 1
name: munmap-rest
arch: [x86, arm64, riscv]
memory:
  a: {size: 64K, kind: anon, prot: rw, fill: 0x11}
  b: {size: 64K, kind: anon, prot: rw, fill: 0x22, at: {memory: a, offset: 64K}}
steps:
  - host_munmap: {memory: a, offset: 32K}
  - host_read: {memory: a, offset: 0, size: 1}
    expect: {result: ok, value: 0x11}
  - host_read: {memory: a, offset: 32K, size: 1}
    expect: {result: signal}
  - host_read: {memory: b, offset: 0, size: 1}
    expect: {result: ok, value: 0x22}
"""


@pytest.mark.parametrize("arch", ["x86", "arm64", "riscv"])
def test_munmap_without_size_stops_at_the_named_range(arch: str) -> None:
    result = Runner(load_scenario_text(TEXT), arch).run()
    assert [s["result"] for s in result.steps] == ["ok", "ok", "signal", "ok"]
    assert result.steps[3]["value"] == 0x22
