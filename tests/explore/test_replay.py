"""Counterexamples, replay tokens and determinism (issue 7; STYLE.md, loom/shuttle:
a schedule is data, replaying it reproduces the run exactly)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from kvmmem.errors import InputError
from kvmmem.explore import (
    SearchParams,
    Token,
    check_determinism,
    explore,
    read_token,
    replay,
    write_token,
)
from kvmmem.explore.execution import Execution
from kvmmem.scenario.loader import load_scenario, load_scenario_text

SCENARIOS = Path(__file__).resolve().parents[2] / "scenarios"
MUNMAP = load_scenario(SCENARIOS / "race-fault-vs-munmap.yaml")


def test_violation_trace_shows_the_race() -> None:
    """no-invalidate-retry on arm64: the fault samples mmu_invalidate_seq and
    resolves the pfn, the whole munmap (notifier start, PTE cleared, notifier
    end) runs, then the fault installs the page it resolved (user_mem_abort
    without mmu_invalidate_retry): a stage-2 leaf over a host address that
    maps nothing."""
    result = explore(MUNMAP, "arm64", "no-invalidate-retry")
    v = result.violation
    assert v is not None and v.invariant == "no-stale-translation"
    assert "maps hva" in v.detail and "to nothing" in v.detail
    text = ["\n".join(e.lines) for e in result.trace]
    threads = [result.threads[e.thread] for e in result.trace]
    # the fault starts first and installs last; the munmap runs whole in between
    assert threads[0] == "vcpu" and threads[-1] == "vcpu"
    host = [t for t, name in zip(text, threads, strict=True) if name == "host"]
    assert any("kvm_unmap_hva_range" in t for t in host)
    assert any("= host_munmap: ok" in t for t in host)
    # arm64 logs its own tracepoint when the fault starts (kvm_handle_guest_abort:
    # kvm_guest_fault), none of x86's kvmmmu ones
    vcpu = [t for t, name in zip(text, threads, strict=True) if name == "vcpu"]
    assert any("kvm_guest_fault" in t for t in vcpu)
    assert not any("kvm_mmu_" in t for t in text)
    assert [e.number for e in result.trace] == list(range(1, len(result.trace) + 1))
    assert any("stage-2: gpa 0x0" in line for line in v.state)


def test_token_replays_exactly() -> None:
    result = explore(MUNMAP, "x86", "no-tlb-flush")
    assert result.token is not None and result.violation is not None
    token = Token.decode(result.token)
    assert (token.scenario, token.arch, token.variant) == (MUNMAP.name, "x86", "no-tlb-flush")
    first = replay(MUNMAP, result.token)
    second = replay(MUNMAP, token)
    assert first.signature() == second.signature()
    assert first.violation is not None
    assert (first.violation.invariant, first.violation.detail) == \
        (result.violation.invariant, result.violation.detail)
    assert [(e.number, e.thread, e.lines) for e in first.trace] == \
        [(e.number, e.thread, e.lines) for e in result.trace]
    assert first.exit_status == 3


def test_replay_file_round_trip() -> None:
    result = explore(MUNMAP, "riscv", "no-invalidate-retry")
    assert result.token is not None
    with tempfile.TemporaryDirectory() as tmp:
        path = write_token(Path(tmp), Token.decode(result.token))
        assert path.name == "race-fault-vs-munmap.riscv.no-invalidate-retry.replay"
        assert read_token(str(path)).encode() == result.token
    assert read_token(result.token).encode() == result.token


def test_replay_of_a_passing_schedule() -> None:
    """A token for upstream replays a schedule that keeps every invariant."""
    broken = explore(MUNMAP, "x86", "no-invalidate-retry")
    assert broken.token is not None
    token = Token.decode(broken.token)
    fine = Token(token.scenario, token.digest, "x86", "upstream", token.choices)
    # the same choices may run out earlier or later on upstream (the fault retries):
    # either it replays without a violation or it says the token does not fit
    try:
        result = replay(MUNMAP, fine)
    except InputError as err:
        assert "--replay" in str(err)
    else:
        assert result.violation is None and result.exit_status == 0


@pytest.mark.parametrize("text,message", [
    ("nonsense", "not a kvmmem replay token"),
    ("kx1.!!!!", "damaged replay token"),
    ("kx1.eNqrVkpUslJKLMo1", "damaged replay token"),
])
def test_bad_tokens(text: str, message: str) -> None:
    with pytest.raises(InputError, match=message):
        Token.decode(text)


def test_token_for_other_content_is_refused() -> None:
    result = explore(MUNMAP, "x86", "no-tlb-flush")
    assert result.token is not None
    other = load_scenario(SCENARIOS / "race-fault-vs-mprotect.yaml")
    with pytest.raises(InputError, match="other content"):
        replay(other, result.token)
    edited = load_scenario_text((SCENARIOS / "race-fault-vs-munmap.yaml").read_text()
                                .replace("size: 4}", "size: 8}"))
    with pytest.raises(InputError, match="other content"):
        replay(edited, result.token)


def test_token_picking_a_blocked_thread_is_refused() -> None:
    result = explore(MUNMAP, "x86", "no-tlb-flush")
    assert result.token is not None
    token = Token.decode(result.token)
    bad = Token(token.scenario, token.digest, token.arch, token.variant,
                tuple(7 for _ in token.choices) or (7,))
    with pytest.raises(InputError, match="--replay"):
        replay(MUNMAP, bad)


@pytest.mark.parametrize("name", ["race-fault-vs-mprotect.yaml", "race-premap-vs-munmap.yaml",
                                  "race-dirty-log-vs-write.yaml"])
@pytest.mark.parametrize("arch", ["x86", "arm64", "riscv"])
def test_determinism(name: str, arch: str) -> None:
    """Random schedules run twice give the same state fingerprint after every
    transition (no hidden state, no iteration over unordered objects)."""
    scenario = load_scenario(SCENARIOS / name)
    assert check_determinism(scenario, arch, "upstream", samples=8, seed=3).schedules == 8


def test_fingerprints_tell_states_apart() -> None:
    """Two executions at the same point share a fingerprint; one transition
    later (a lock taken, a thread moved) they do not."""
    a = Execution(MUNMAP, "x86", "upstream")
    b = Execution(MUNMAP, "x86", "upstream")
    assert a.fingerprint() == b.fingerprint()
    a.step(0)
    assert a.fingerprint()[1] != b.fingerprint()[1]
    b.step(0)
    assert a.fingerprint() == b.fingerprint()
    b.step(1)
    assert a.fingerprint()[1] != b.fingerprint()[1]


def test_steps_scenario_is_refused() -> None:
    with pytest.raises(InputError, match="has steps, not threads"):
        explore(load_scenario(SCENARIOS / "quickstart.yaml"), "x86")


def test_bad_parameters() -> None:
    for params, message in ((SearchParams(strategy="bfs"), "--strategy"),
                            (SearchParams(preemptions=-1), "--preemptions"),
                            (SearchParams(max_executions=0), "--max-executions")):
        with pytest.raises(InputError, match=message):
            explore(MUNMAP, "x86", params=params)
    with pytest.raises(InputError, match="--arch"):
        explore(MUNMAP, "mips")
    with pytest.raises(InputError, match="unknown variant"):
        explore(MUNMAP, "x86", "linux-2.6")
    with pytest.raises(InputError, match="--workers"):
        explore(MUNMAP, "x86", workers=0)
