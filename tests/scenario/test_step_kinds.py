"""Issue 12, one step dispatch: every step class carries what the drivers need
(``op``, ``actor``, ``reports``, its own keys), :data:`AnyStep` lists every kind,
and :func:`as_step` turns a :class:`Step` into that union for a ``match`` ending
in ``assert_never``."""

from __future__ import annotations

import typing

import pytest

from kvmmem.realkvm.runner import scenario_footprint
from kvmmem.report.trace import step_actor
from kvmmem.scenario.loader import load_scenario_text
from kvmmem.scenario.model import (
    GUEST_STEPS,
    RESULT_KEYS,
    STEP_TYPES,
    AnyStep,
    GuestAccess,
    GuestExec,
    GuestRead,
    Prefault,
    SetMemslot,
    Step,
    as_step,
)
from kvmmem.types import EXEC_FETCH_SIZE


def test_every_step_class_is_a_kind_of_the_union() -> None:
    kinds = typing.get_args(AnyStep)
    assert tuple(STEP_TYPES.values()) == kinds
    assert set(GUEST_STEPS) == {cls.op for cls in typing.get_args(GuestAccess)}
    # (by name: a slots dataclass leaves its pre-slots class among the subclasses)
    assert {cls.__name__ for cls in Step.__subclasses__()} == {cls.__name__ for cls in kinds}


@pytest.mark.parametrize("cls", typing.get_args(AnyStep), ids=lambda c: c.op)
def test_each_kind_says_who_runs_it_and_what_it_reports(cls: type[Step]) -> None:
    # punch_hole is fallocate(2) on a file the host process holds
    assert cls.actor == ("host" if cls.op.startswith("host_") or cls.op == "punch_hole" else
                         "vcpu" if cls.op in (*GUEST_STEPS, "prefault") else "kvm")
    assert set(cls.reports) <= set(RESULT_KEYS["ok"])


def test_as_step_refuses_the_bare_base() -> None:
    read = GuestRead(index=0, line=1, size=4)
    assert as_step(read) is read
    with pytest.raises(TypeError, match="not a scenario step kind"):
        as_step(Step(index=0, line=1))


def test_args_are_the_steps_own_keys() -> None:
    slot = SetMemslot(index=0, line=1, slot=3, gpa=0x1000, size=0x2000, flags=("readonly",))
    assert slot.args() == {"slot": 3, "gpa": 0x1000, "size": 0x2000, "memory": None,
                           "offset": 0, "hva": None, "flags": ("readonly",),
                           "guest_memfd": None, "guest_memfd_offset": 0}
    assert GuestExec(index=0, line=1, gpa=8).access_size == EXEC_FETCH_SIZE


def test_actor_and_footprint_of_a_scenario() -> None:
    scn = load_scenario_text("""
kvmmem: 1
name: t
vcpus: 2
memory:
  ram: {size: 64K, kind: anon, prot: rw}
memslots:
  - {slot: 1, gpa: 0x10000, size: 64K, memory: ram}
steps:
  - guest_read: {gpa: 0x10000, size: 4, vcpu: 1}
  - guest_exec: {gpa: 0x10008}
  - prefault: {gpa: 0x12000, size: 4K}
  - host_read: {memory: ram, size: 1}
  - get_dirty_log: {slot: 5}
""")
    assert scn.steps is not None
    assert [step_actor(s, s.op) for s in scn.steps] == ["vcpu1", "vcpu0", "vcpu0", "host",
                                                        "kvm"]
    assert step_actor(None, "set_memslot") == "kvm"
    assert isinstance(scn.steps[2], Prefault)
    assert scenario_footprint(scn) == ([(0x10000, 0x10000), (0x10000, 4), (0x10008, 16),
                                        (0x12000, 0x1000)], [1, 5])
