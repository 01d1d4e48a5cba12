"""``kvmmem explore`` on the command line: verdict lines, the counterexample,
the replay token (printed and written), ``--replay``, JSON as SCENARIOS.md
("Exploration output") and exit status 0 / 1 / 2 / 3."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kvmmem.cli import app

SCENARIOS = Path(__file__).resolve().parents[2] / "scenarios"
MUNMAP = str(SCENARIOS / "race-fault-vs-munmap.yaml")


def _explore(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(app, ["explore", *args])
    return res.exit_code, res.output


def test_upstream_exhausts_on_every_arch_of_the_file() -> None:
    code, out = _explore(MUNMAP)
    assert code == 0, out
    lines = [ln for ln in out.splitlines() if "EXHAUSTED" in ln]
    assert [ln.split()[1] for ln in lines] == ["x86", "arm64", "riscv"]
    assert "executions" in lines[0] and "distinct states" in lines[0]


def test_violation_prints_trace_token_and_writes_the_file() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        code, out = _explore(MUNMAP, "--arch", "arm64", "--variant", "no-invalidate-retry",
                             "--replay-dir", tmp)
        assert code == 3, out
        assert "VIOLATION" in out and "violation: no-stale-translation" in out
        assert "vcpu" in out and "host" in out and "kvm_unmap_hva_range" in out
        token = next(ln.split("--replay ")[1] for ln in out.splitlines()
                     if ln.startswith("replay: kvmmem explore"))
        path = Path(tmp) / "race-fault-vs-munmap.arm64.no-invalidate-retry.replay"
        assert path.read_text().strip() == token
        # replay by token and by file: the same counterexample
        code, again = _explore(MUNMAP, "--replay", token)
        assert code == 3 and "violation: no-stale-translation" in again
        code, from_file = _explore(MUNMAP, "--replay", str(path))
        assert code == 3 and from_file == again


def test_json_output() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        code, out = _explore(MUNMAP, "--arch", "x86,riscv", "--variant",
                             "upstream,no-tlb-flush", "--json", "--replay-dir", tmp)
    assert code == 3
    runs = [json.loads(line) for line in out.splitlines()]
    assert [(r["arch"], r["variant"], r["verdict"]) for r in runs] == [
        ("x86", "upstream", "exhausted"), ("x86", "no-tlb-flush", "violation"),
        ("riscv", "upstream", "exhausted"), ("riscv", "no-tlb-flush", "violation")]
    for r in runs:
        assert r["scenario"] == "race-fault-vs-munmap"
        assert isinstance(r["executions"], int) and r["executions"] > 0
        if r["verdict"] == "violation":
            assert r["violations"][0]["invariant"] == "no-stale-translation"
            assert set(r["violations"][0]) == {"invariant", "step", "detail"}
            assert r["schedule"].startswith("kx1.")
            assert r["trace"] and r["state"]
        else:
            assert r["violations"] == [] and "schedule" not in r
    code, out = _explore(MUNMAP, "--replay", runs[1]["schedule"], "--json")
    replayed = json.loads(out)
    assert code == 3 and replayed["verdict"] == "violation" and replayed["replay"] is True
    assert replayed["violations"] == runs[1]["violations"]
    assert set(replayed["outcomes"]) == {"vcpu", "host"}
    assert all(o["op"] in ("guest_read", "host_munmap") for outs in replayed["outcomes"].values()
               for o in outs)


def test_failed_expectation_exits_1() -> None:
    text = (SCENARIOS / "race-fault-vs-munmap.yaml").read_text()
    bad = text.replace("expect: {result: ok}", "expect: {result: error, errno: EINVAL}")
    assert bad != text
    with tempfile.TemporaryDirectory() as tmp:
        scn = Path(tmp) / "bad-expect.yaml"
        scn.write_text(bad)
        code, out = _explore(str(scn), "--arch", "x86", "--replay-dir", tmp)
    assert code == 1, out
    assert "violation: expectation" in out and "host_munmap" in out


@pytest.mark.parametrize("args,message", [
    (["--strategy", "bfs"], "--strategy: unknown strategy 'bfs'"),
    (["--preemptions", "-1"], "--preemptions: must be >= 0"),
    (["--max-executions", "0"], "--max-executions: must be >= 1"),
    (["--workers", "0"], "--workers: must be >= 1"),
    (["--arch", "mips"], "--arch: unknown arch 'mips'"),
    (["--variant", "linux-2.6"], "--variant: unknown variant 'linux-2.6'"),
    (["--replay", "nonsense"], "--replay: 'nonsense' is neither a replay token"),
    (["--replay", "kx1.AAAA"], "--replay: damaged replay token"),
    (["--dask", "tcp://127.0.0.1:9", "--workers", "2"], "--dask and --workers"),
    (["--dask", "nonsense"], "--dask: 'nonsense' is not a scheduler address"),
])
def test_bad_arguments_get_one_line(args: list[str], message: str) -> None:
    """Through the console entry point: one error line naming the option, exit 2."""
    proc = subprocess.run([sys.executable, "-m", "kvmmem.cli", "explore", MUNMAP, *args],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_sequential_scenario_and_missing_file() -> None:
    for path, message in ((SCENARIOS / "quickstart.yaml", "has steps, not threads"),
                          (SCENARIOS / "no-such-file.yaml", "no-such-file.yaml")):
        proc = subprocess.run([sys.executable, "-m", "kvmmem.cli", "explore", str(path)],
                              capture_output=True, text=True, timeout=120, check=False)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr


def test_run_refuses_a_threads_scenario() -> None:
    res = CliRunner().invoke(app, ["run", MUNMAP])
    assert res.exit_code == 2
