"""The scenario's ``page_size`` key and the variants' page-size suffix (``7.3-16k``):
which host page size a run gets, and the refusals that name what conflicts."""

from __future__ import annotations

import pytest

from kvmmem.errors import InputError
from kvmmem.report.compare import compare_runs
from kvmmem.scenario.loader import load_scenario_text
from kvmmem.scenario.model import host_page_size
from kvmmem.scenario.runner import run_scenario
from kvmmem.variants import get_variant

SLOTS = """kvmmem: 1
name: slots
arch: {arch}
{extra}
memory:
  ram: {{size: 64K, kind: anon, prot: rw}}
steps:
  - set_memslot: {{slot: 0, gpa: 0x40000000, size: 4K, memory: ram}}
  - set_memslot: {{slot: 1, gpa: 0x40010000, size: 16K, memory: ram}}
  - set_memslot: {{slot: 2, gpa: 0x40020000, size: 64K, memory: ram, flags: [log_dirty]}}
  - guest_write: {{gpa: 0x40020008, size: 8, value: 7}}
  - get_dirty_log: {{slot: 2}}
"""


def load(arch: str = "arm64", extra: str = "") -> object:
    return load_scenario_text(SLOTS.format(arch=arch, extra=extra), "t.yaml")


def results(arch: str, variant: str | None = None, extra: str = "") -> list[str]:
    run = run_scenario(load(arch, extra), arch, variant)  # type: ignore[arg-type]
    return [o.get("errno", o["result"]) for o in run.steps[:3]]


def test_the_variant_suffix_sets_the_host_page_size() -> None:
    """Unpinned, the variant decides: 4K accepts every slot, 16K refuses the 4 KiB one,
    64K refuses 4 KiB and 16 KiB (kvm_set_memory_region: EINVAL)."""
    assert results("arm64") == ["ok", "ok", "ok"]
    assert results("arm64", "7.3-16k") == ["EINVAL", "ok", "ok"]
    assert results("arm64", "upstream-64k") == ["EINVAL", "EINVAL", "ok"]
    run = run_scenario(load(), "arm64", "7.3-16k")  # type: ignore[arg-type]
    assert run.to_json()["page_size"] == "16K" and run.variant == "7.3-16k"
    assert run.steps[4]["dirty"] == [0x40020000 >> 14]  # gfns count 16 KiB pages
    run4 = run_scenario(load(), "arm64", "7.3")  # type: ignore[arg-type]
    assert run4.steps[4]["dirty"] == [0x40020000 >> 12] and run4.to_json()["page_size"] == "4K"
    assert get_variant("7.3-16k").release == get_variant("7.3").release


def test_the_file_pins_its_page_size() -> None:
    assert results("arm64", None, "page_size: 16K") == ["EINVAL", "ok", "ok"]
    assert results("arm64", "7.3", "page_size: 64K") == ["EINVAL", "EINVAL", "ok"]
    assert results("arm64", "7.3-16k", "page_size: 16K") == ["EINVAL", "ok", "ok"]
    with pytest.raises(InputError) as err:
        run_scenario(load("arm64", "page_size: 16K"), "arm64", "7.3-64k")  # type: ignore[arg-type]
    assert "pins 16K host pages; variant 7.3-64k is a kernel built with 64K pages" in \
        str(err.value)
    assert host_page_size(load(), "upstream") == 4096  # type: ignore[arg-type]


@pytest.mark.parametrize(("arch", "extra", "message"), [
    ("x86", "page_size: 16K", "t.yaml:4: page_size: 16K host pages are arm64's"),
    ("[arm64, riscv]", "page_size: 64K", "riscv hosts have 4K pages"),
    ("arm64", "page_size: 16K\ngranule: 4K", "t.yaml:5: granule: 4K differs from page_size 16K"),
    ("arm64", "page_size: 16K\nvariant: 7.3-64k",
     "page_size: 16K differs from variant 7.3-64k, a kernel built with 64K pages"),
    ("arm64", "page_size: 8K", "'8K' is not a host page size (4K, 16K, 64K)"),
])
def test_conflicts_are_refused_naming_the_keys(arch: str, extra: str, message: str) -> None:
    with pytest.raises(InputError) as err:
        load(arch, extra)
    assert message in str(err.value)


def test_granule_follows_the_page_size() -> None:
    """A file naming granule 16K runs where the page size is 16K, and is refused (naming
    both) where it is not: the stage-2 granule is the host's PAGE_SIZE."""
    scenario = load("arm64", "granule: 16K")
    assert results("arm64", "7.3-16k", "granule: 16K") == ["EINVAL", "ok", "ok"]
    with pytest.raises(InputError, match="granule: 16K differs from page_size 4K"):
        run_scenario(scenario, "arm64")  # type: ignore[arg-type]


def test_compare_shows_page_sizes_side_by_side() -> None:
    """``compare --variant 7.3,7.3-16k``: one column per page size; an x86 column at 16K
    is n/a with the reason; the 16K column counts 16K leaves."""
    cmp = compare_runs(load("[x86, arm64]"), ["x86", "arm64"],  # type: ignore[arg-type]
                       ["7.3", "7.3-16k"])
    reasons = {(c.arch, c.variant): c.reason for c in cmp.columns}
    assert reasons[("x86", "7.3-16k")] is not None and "arm64's" in str(
        reasons[("x86", "7.3-16k")])
    arm16 = next(c for c in cmp.columns if (c.arch, c.variant) == ("arm64", "7.3-16k"))
    assert [o.get("errno", o["result"]) for o in arm16.result.steps[:3]] == \
        ["EINVAL", "ok", "ok"]
    counters = {r.label: r.cells for r in cmp.rows if r.kind == "counter"}
    assert counters["pages_16k"][-1] == "1"
