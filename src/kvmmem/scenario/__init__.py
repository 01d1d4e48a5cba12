"""Scenario files (SCENARIOS.md, format version 1): typed model and loader.

``load_scenario(path)`` / ``load_scenario_text(text)`` return a validated
:class:`Scenario` or raise one :class:`~kvmmem.errors.InputError` naming the
file, line and field of the first mistake.
"""

from kvmmem.scenario.loader import load_scenario, load_scenario_text
from kvmmem.scenario.model import (
    STEP_TYPES,
    ClearDirtyLog,
    EnableCap,
    GetDirtyLog,
    GuestExec,
    GuestRead,
    GuestWrite,
    HarvestDirtyRing,
    HostMadvise,
    HostMmap,
    HostMprotect,
    HostMunmap,
    HostRead,
    HostWrite,
    HvaRef,
    Mapping,
    Prefault,
    PunchHole,
    ResetDirtyRings,
    Scenario,
    SetMemoryAttributes,
    SetMemslot,
    Step,
)

__all__ = [
    "STEP_TYPES",
    "ClearDirtyLog",
    "EnableCap",
    "GetDirtyLog",
    "GuestExec",
    "GuestRead",
    "GuestWrite",
    "HarvestDirtyRing",
    "HostMadvise",
    "HostMmap",
    "HostMprotect",
    "HostMunmap",
    "HostRead",
    "HostWrite",
    "HvaRef",
    "Mapping",
    "Prefault",
    "PunchHole",
    "ResetDirtyRings",
    "Scenario",
    "SetMemoryAttributes",
    "SetMemslot",
    "Step",
    "load_scenario",
    "load_scenario_text",
]
