"""``kvmmem run --plot``: the guest physical map drawn with matplotlib (Agg)."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from kvmmem.cli import app
from kvmmem.report.plot import _backing_spans, plot_guest_map
from kvmmem.scenario.loader import load_scenario, load_scenario_text
from kvmmem.scenario.runner import run_scenario

SCENARIOS = Path(__file__).resolve().parents[2] / "scenarios"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_plot_several_runs_and_slots(tmp_path: Path) -> None:
    """Huge and 4K leaves, two slots, two architectures: one PNG."""
    scn = load_scenario(SCENARIOS / "row-huge-hugetlb.yaml")
    results = [run_scenario(scn, "x86"), run_scenario(scn, "arm64")]
    out = tmp_path / "map.png"
    plot_guest_map(results, out)
    data = out.read_bytes()
    assert data.startswith(PNG_MAGIC)
    assert len(data) > 5000


def test_plot_without_memslots(tmp_path: Path) -> None:
    scn = load_scenario_text("kvmmem: 1\nname: empty\nsteps:\n"
                             "  - guest_read: {gpa: 0x1000, size: 4}\n")
    out = tmp_path / "empty.png"
    plot_guest_map([run_scenario(scn, "x86")], out)
    assert out.read_bytes().startswith(PNG_MAGIC)


def test_backing_spans_show_holes() -> None:
    """A slot whose middle was munmapped: VMA, hole, VMA (what the backing lane draws)."""
    text = """\
kvmmem: 1
name: holes
memory: {m: {size: 64K, kind: memfd, prot: rw}}
memslots: [{slot: 0, gpa: 0x100000, size: 64K, memory: m}]
steps:
  - host_munmap: {memory: m, offset: 0x4000, size: 0x2000}
"""
    result = run_scenario(load_scenario_text(text), "riscv")
    vm = result.vm
    assert vm is not None
    slot = vm.memslots.all_slots()[0]
    assert _backing_spans(vm, slot.userspace_addr, 0x10000) == [
        (0, 0x4000, "memfd"), (0x4000, 0x2000, ""), (0x6000, 0xa000, "memfd")]


def test_cli_run_plot(tmp_path: Path) -> None:
    out = tmp_path / "q.png"
    res = CliRunner().invoke(app, ["run", str(SCENARIOS / "pfnmap-faulted.yaml"), "--arch",
                                   "arm64", "--plot", str(out)])
    assert res.exit_code == 0, res.output
    assert out.read_bytes().startswith(PNG_MAGIC)
