"""``kvmmem bench``: the JSON shape, the side-by-side table, the real-KVM side (or its
one-line reason) and bad arguments.  No assertion is on a time: benchmarks report,
they never pass or fail on speed (DESIGN.md, bench/)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from kvmmem.benchmarks.suite import NAMES, PARAMETERS
from kvmmem.cli import app
from kvmmem.realkvm import probe_kvm

ROOT = Path(__file__).resolve().parents[2]
REQUIRED = ("fault_4k_fresh_us", "fault_4k_present_us", "memslot_create_us",
            "memslot_delete_us", "stage2_bytes_per_4k")


def _positive(value: Any) -> bool:
    return (isinstance(value, float | int) and not isinstance(value, bool)
            and math.isfinite(value) and value > 0)


@pytest.fixture(scope="module")
def quick_json() -> tuple[dict[str, Any], str]:
    """One ``kvmmem bench --quick --json`` run: (parsed stdout, stderr)."""
    res = CliRunner().invoke(app, ["bench", "--quick", "--json"])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout), res.stderr


def test_json_shape(quick_json: tuple[dict[str, Any], str]) -> None:
    data, stderr = quick_json
    assert set(data) == {"model", "kvm"}
    model, kvm = data["model"], data["kvm"]
    assert set(REQUIRED) <= set(NAMES)
    assert list(model) == [*NAMES, *PARAMETERS]
    for name in NAMES:
        assert _positive(model[name]), (name, model[name])
    assert model["fault_pages"] == 1000 and model["memslots_present"] == 32000
    # the target: hardware 8 B per 4K leaf, the model at most 16 B
    assert model["stage2_bytes_per_4k"] <= 16
    if kvm is None:
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("kvmmem bench: real KVM ")
    else:
        assert list(kvm) == list(model)
        assert stderr == ""


def test_kvm_side_measured_in_the_same_run(quick_json: tuple[dict[str, Any], str]) -> None:
    reason = probe_kvm()
    if reason is not None:
        pytest.skip(f"no usable /dev/kvm: {reason}")
    kvm = quick_json[0]["kvm"]
    assert kvm is not None, quick_json[1]
    for name in NAMES:
        assert _positive(kvm[name]), (name, kvm[name])
    assert kvm["stage2_bytes_per_4k"] == 8.0  # the hardware's 8-byte leaf, not measured
    assert kvm["fault_pages"] == 1000 and kvm["memslots_present"] == 32000


def test_unusable_kvm_is_null_with_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("kvmmem.benchmarks.realkvm.probe_kvm",
                        lambda: "/dev/kvm: cannot open /dev/kvm: No such file or directory")
    res = CliRunner().invoke(app, ["bench", "--quick", "--json", "--pages", "50"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["kvm"] is None
    assert all(_positive(data["model"][name]) for name in NAMES)
    assert res.stderr == ("kvmmem bench: real KVM skipped: no usable /dev/kvm: "
                          "/dev/kvm: cannot open /dev/kvm: No such file or directory\n")


def test_table_side_by_side() -> None:
    res = CliRunner().invoke(app, ["bench", "--quick", "--no-kvm", "--pages", "50",
                                   "--arch", "arm64"])
    assert res.exit_code == 0, res.output
    assert res.stderr == "kvmmem bench: real KVM skipped (--no-kvm)\n"
    out = res.stdout
    assert "model (arm64)" in out
    for column in ("measurement", "unit", "model", "real KVM", "model/KVM"):
        assert column in out
    rows = [line for line in out.splitlines() if any(n in line for n in NAMES)]
    assert [next(n for n in NAMES if n in row) for row in rows] == list(NAMES)
    assert "faults over 50 pages" in out


@pytest.mark.parametrize(("args", "message"), [
    (["--arch", "sparc"], "--arch: unknown architecture 'sparc' (known: x86, arm64, riscv)"),
    (["--pages", "0"], "--pages: must be 1..100000, got 0"),
    (["--pages", "many"], "Invalid value for '--pages'"),
    (["--pages"], "Option '--pages' requires an argument."),
    (["--bogus"], "No such option: --bogus"),
    (["extra"], "unexpected extra argument"),
])
def test_bad_arguments_are_one_line(args: list[str], message: str) -> None:
    res = CliRunner().invoke(app, ["bench", *args])
    assert res.exit_code == 2
    assert res.stdout == ""
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("kvmmem: error: ") and message in lines[0]
    assert res.exception is None or isinstance(res.exception, SystemExit)


def test_console_script_piped_is_plain_json() -> None:
    """Through the installed entry point, piped: JSON on stdout, no progress bar."""
    proc = subprocess.run([sys.executable, "-m", "kvmmem.cli", "bench", "--quick", "--json",
                           "--no-kvm", "--pages", "20"],
                          capture_output=True, text=True, check=False, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["kvm"] is None
    assert proc.stderr == "kvmmem bench: real KVM skipped (--no-kvm)\n"


def test_bench_scripts_wrap_the_package() -> None:
    """bench/bench_stage2.py still prints its table, from kvmmem.benchmarks."""
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_stage2.py"), "--quick"],
                          capture_output=True, text=True, check=False, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["arch", "leaf", "map/s", "unmap/s", "µs/map"]
    assert "model bytes per mapped 4K page (hardware: 8 B; target: at most 16 B)" in lines
    for arch in ("x86", "arm64", "riscv"):
        assert any(line.startswith(arch) and line.endswith(" B") for line in lines)
