"""The agent: its import closure is the standard library, and its JSON-line
protocol (ready line, ping, errors, run) as a machine's host side sees it."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

import kvmmem
from kvmmem.realkvm import agent
from kvmmem.realkvm.kvm import probe_kvm
from kvmmem.realkvm.runner import run_scenario, scenario_program
from kvmmem.scenario import load_scenario

SRC = str(Path(kvmmem.__file__).parent.parent)
SCENARIOS = Path(__file__).parents[2] / "scenarios"

GUEST_MODULES = ("kvmmem.realkvm.agent", "kvmmem.realkvm.program", "kvmmem.realkvm.harness",
                 "kvmmem.realkvm.host", "kvmmem.realkvm.kvm", "kvmmem.realkvm.stats",
                 "kvmmem.realkvm.archvm", "kvmmem.realkvm.arm64", "kvmmem.realkvm.riscv",
                 "kvmmem.realkvm.arm64_code", "kvmmem.realkvm.riscv_code",
                 "kvmmem.realkvm.code_page")


def test_agent_imports_only_the_standard_library() -> None:
    """An emulated machine's Python has no pip packages: what the agent loads, directly
    or not, must be stdlib or kvmmem's own stdlib-only modules (not numpy, pydantic,
    iced-x86, ...)."""
    code = (
        "import sys\n"
        f"sys.path.insert(0, {SRC!r})\n"
        f"for m in {GUEST_MODULES!r}: __import__(m)\n"
        "import kvmmem.realkvm.agent as a; a._probe({})\n"
        "bad = sorted(n for n in sys.modules if n.split('.')[0] not in sys.stdlib_module_names"
        " and n.split('.')[0] not in ('kvmmem', '__main__'))\n"
        "own = sorted(n for n in sys.modules if n.startswith('kvmmem.') and n not in "
        "('kvmmem.realkvm', 'kvmmem.types', 'kvmmem.errors') and "
        "not n.startswith('kvmmem.realkvm.'))\n"
        "print(bad, own)\n"
    )
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[] []"


def _serve(lines: list[dict[str, object] | str]) -> list[dict[str, object]]:
    text = "".join((line if isinstance(line, str) else json.dumps(line)) + "\n"
                   for line in lines)
    out = io.StringIO()
    agent.serve(io.StringIO(text), out)
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_ready_line_ping_and_errors() -> None:
    """The ready line names the kernel and machine; a bad line, an unknown command and
    a failing request each get one error answer and the agent keeps serving; shutdown
    ends the loop before later lines."""
    answers = _serve(["not json", {"id": 1, "cmd": "ping"}, {"id": 2, "cmd": "nope"},
                      {"id": 3, "cmd": "run", "program": {}}, {"id": 4, "cmd": "ping"},
                      {"id": 5, "cmd": "shutdown"}, {"id": 6, "cmd": "ping"}])
    ready = answers[0]
    assert ready["event"] == "ready"
    assert ready["machine"] == subprocess.run(["uname", "-m"], capture_output=True,
                                              text=True).stdout.strip()
    assert answers[1]["ok"] is False and "bad request line" in str(answers[1]["error"])
    assert answers[2] == {"id": 1, "ok": True, "result": "pong"}
    assert answers[3] == {"id": 2, "ok": False, "error": "unknown command 'nope'"}
    assert answers[4]["id"] == 3 and answers[4]["ok"] is False
    assert "KeyError" in str(answers[4]["error"])
    assert answers[5] == {"id": 4, "ok": True, "result": "pong"}
    assert answers[6] == {"id": 5, "ok": True}
    assert len(answers) == 7


def test_program_is_json_and_names_every_step() -> None:
    """A program survives JSON unchanged and carries every step with its index and op."""
    scenario = load_scenario(SCENARIOS / "quickstart.yaml")
    program = scenario_program(scenario, "arm64", x86_code=True)
    assert json.loads(json.dumps(program)) == program
    assert program["x86_code"] is None  # only x86 programs carry x86 code
    assert [s["op"] for s in program["steps"]] == [s.op for s in scenario.steps or ()]
    assert program["memslots"][0]["flags"] == 0


@pytest.mark.skipif(probe_kvm() is not None, reason=f"/dev/kvm: {probe_kvm()}")
def test_run_through_the_agent_equals_the_direct_run() -> None:
    """The agent's ``run`` is the direct driver: same outcomes for the quickstart."""
    scenario = load_scenario(SCENARIOS / "quickstart.yaml")
    program = scenario_program(scenario, "x86", x86_code=True)
    answers = _serve([{"id": 1, "cmd": "run", "program": program}])
    assert answers[1]["ok"] is True
    direct = run_scenario(scenario).as_dict()
    assert answers[1]["result"] == direct
