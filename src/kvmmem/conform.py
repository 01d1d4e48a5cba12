"""Conformance: the same scenario on the model and on a real KVM.

:func:`conform_scenario` runs a sequential scenario twice - on the model
(:func:`kvmmem.scenario.runner.Runner`, the target's architecture, the
scenario's variant or else the target's release) and on a real kernel's KVM,
the *target* - and compares the outcomes step by step.  A target is this host's ``/dev/kvm``
(:class:`HostTarget`, x86) or a machine: a Debian kernel of any architecture
booted under QEMU, whose agent runs the same driver
(:class:`MachineTarget`, :mod:`kvmmem.machine`).  Both perform the scenario as
a program (:mod:`kvmmem.realkvm.program`).  The verdict is ``agree``, ``differ`` or
``unsupported`` (SCENARIOS.md, ``kvmmem conform``); :func:`tap_lines` renders a
list of verdicts as a kselftest-style TAP report and :func:`exit_status` gives
the command's exit status.

What is compared (:func:`compare_outcomes`) and why:

* ``result`` always.
* Every other key of the outcome that *both* sides report (``value``,
  ``dirty``, ``errno``, ``gpa``, ``len``, ``is_write``, ``data``, ``signal``,
  ``abort``, ``exit_reason``, ...).  A key only one side reports is not a
  difference: the real harness adds the guest's syndrome to an injected
  exception (arm64 ``esr``/``far``, riscv ``scause``/``stval``, x86 ``vector``)
  and lists the later exits of an access that needed more than one under
  ``more_mmio``; a watchdog ``timeout`` carries ``seconds``.
* One normalisation makes a missing key comparable: an MMIO read whose every
  byte exited has no ``value`` in the model's outcome, while the real guest
  loaded the zero bytes the read was answered with; the model's outcome then
  counts as ``value: 0``.
* ``step`` and ``op`` are the same on both sides by construction.

What makes a scenario ``unsupported`` (with the reason): it does not name the
target's architecture, it names a variant other than the real kernel's release
(a machine stands for its version, ``kvmmem conform --kernel 6.12`` runs the model
as 6.12; this host's kernel stands for ``upstream``; a scenario that names no
variant runs as the target's), it is concurrent (real runs are sequential), or
the real run found something the target cannot do (a mapping kind without a source there, a
hugetlb pool that is too small, a gpa the harness cannot reach).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from kvmmem.errors import InputError
from kvmmem.scenario.model import Scenario
from kvmmem.scenario.runner import Runner, RunResult

if TYPE_CHECKING:
    from kvmmem.machine import Machine
    from kvmmem.realkvm import Kvm, RealRun
    from kvmmem.realkvm.program import Program

Outcome = dict[str, Any]

HOST_ARCH = "x86"
"""The architecture of this host's KVM (kvm-on-this-host.md §0)."""
REAL_VARIANT = "upstream"
"""The behaviour set this host's kernel stands for (a PVM kernel, not a mainline release:
held against ``upstream``).  A machine stands for its own release
(:func:`machine_variant`)."""


def machine_variant(version: str) -> str:
    """The variant of a machine's catalog version: its release ``X.Y``, or the Debian
    kernel's own variant where its backports differ from that release (``5.10`` ->
    ``debian-5.10``: :data:`kvmmem.variants.DISTRIBUTIONS`), with the kernel's page size
    as a suffix when it is not 4 KiB (``7.3-16k`` -> ``7.3-16k``, Debian's
    linux-image-arm64-16k: the model runs with 16 KiB host pages)."""
    from kvmmem.variants import DISTRIBUTIONS, page_size_suffix, split_page_size
    base, page_size = split_page_size(version)
    release = base.split("-", 1)[0]
    name = f"debian-{release}" if f"debian-{release}" in DISTRIBUTIONS else release
    return name + page_size_suffix(page_size) if page_size is not None else name


PATHS = ("native", "emulated")
VERDICTS = ("agree", "differ", "unsupported")

EXIT_AGREE = 0
EXIT_DIFFER = 1
EXIT_BAD_INPUT = 2
EXIT_VIOLATION = 3
EXIT_SKIPPED = 4

_IDENTITY_KEYS = ("step", "op")


def _body(outcome: Outcome | None) -> Outcome:
    """``outcome`` without its ``step``/``op`` keys (``{}`` for a missing one)."""
    if outcome is None:
        return {}
    return {k: v for k, v in outcome.items() if k not in _IDENTITY_KEYS}


def normalise_model(outcome: Outcome) -> Outcome:
    """The model's outcome with the one normalisation of the module docstring: an MMIO
    read without ``value`` gets ``value`` 0.  Returns a new dict."""
    out = dict(outcome)
    if out.get("result") == "mmio" and out.get("is_write") is False and "value" not in out:
        out["value"] = 0
    return out


def outcome_differences(model: Outcome | None, kvm: Outcome | None) -> list[str]:
    """The keys on which ``model`` and ``kvm`` disagree (``result`` first, then every key
    both report, in the model's order); ``["result"]`` when either is missing (a run
    that stopped early).  Empty when they agree."""
    if model is None or kvm is None:
        return ["result"]
    m, k = normalise_model(_body(model)), _body(kvm)
    if m.get("result") != k.get("result"):
        return ["result"]
    return [key for key in m if key != "result" and key in k and m[key] != k[key]]


def compare_outcomes(model: Outcome | None, kvm: Outcome | None) -> bool:
    """Whether two outcomes of the same step agree (module docstring)."""
    return not outcome_differences(model, kvm)


@dataclass(slots=True)
class StepComparison:
    """One step on both sides: ``model`` and ``kvm`` outcomes (``None`` where that side
    stopped before the step), ``agree``."""

    step: int
    op: str
    model: Outcome | None
    kvm: Outcome | None
    agree: bool
    where: str = ""
    """How reports name it: ``step I``, ``memslots[I]``, ``memory.NAME``."""

    def to_json(self) -> dict[str, Any]:
        """``{"step": I, "model": OUTCOME, "kvm": OUTCOME, "op": NAME, "agree": B}``."""
        return {"step": self.step, "model": _body(self.model) if self.model else None,
                "kvm": _body(self.kvm) if self.kvm else None, "op": self.op,
                "agree": self.agree}


@dataclass(slots=True)
class Conformance:
    """The verdict on one scenario: ``verdict`` (``agree``/``differ``/``unsupported``),
    ``reason`` (why unsupported, or a one-line summary of what differed), the step
    comparisons (``steps``), the setup comparisons (``setup``: one per top-level
    memslot, plus any host mapping the real host refused), the model's invariant
    violations."""

    scenario: str
    source: str
    path: str
    verdict: str
    reason: str = ""
    steps: list[StepComparison] = field(default_factory=list)
    setup: list[StepComparison] = field(default_factory=list)
    violations: list[dict[str, Any]] = field(default_factory=list)
    arch: str = HOST_ARCH
    machine: str = "host"
    """``host`` (this host's /dev/kvm) or the machine's name, ``ARCH-VERSION``."""
    kernel: str = ""
    """The real kernel's release (``uname -r``)."""

    @property
    def differences(self) -> list[StepComparison]:
        """The setup entries and steps that disagree, in order."""
        return [c for c in (*self.setup, *self.steps) if not c.agree]

    def to_json(self) -> dict[str, Any]:
        """The ``kvmmem conform --json`` entry (SCENARIOS.md keys first; ``source``,
        ``path``, ``setup``, ``violations`` are extensions)."""
        return {"scenario": self.scenario, "verdict": self.verdict,
                "steps": [s.to_json() for s in self.steps], "reason": self.reason,
                "source": self.source, "path": self.path, "arch": self.arch,
                "machine": self.machine, "kernel": self.kernel,
                "setup": [s.to_json() for s in self.setup], "violations": self.violations}


class Target(Protocol):
    """A real KVM to hold the model against: its ``arch``, its ``name`` in reports
    (``host`` or ``ARCH-VERSION``), its kernel ``release``, the ``variant`` the model
    runs as against it, and :meth:`run`."""

    arch: str
    name: str
    release: str
    variant: str
    emulated_path: bool
    """Whether guest accesses can take the ``emulated`` path there (this host's PVM)."""

    def program(self, scenario: Scenario, path: str, timeout: float | None) -> Program:
        """``scenario`` as a program this target can run."""
        ...

    def run(self, program: Program) -> RealRun:
        """Perform ``program`` on the target's KVM."""
        ...


class HostTarget:
    """This host's ``/dev/kvm`` (x86): ``kvm`` an open :class:`~kvmmem.realkvm.Kvm`."""

    arch = HOST_ARCH
    name = "host"
    variant = REAL_VARIANT
    emulated_path = True

    def __init__(self, kvm: Kvm) -> None:
        import os
        self.kvm = kvm
        self.release = os.uname().release

    def program(self, scenario: Scenario, path: str, timeout: float | None) -> Program:
        from kvmmem.realkvm.harness import DEFAULT_TIMEOUT
        from kvmmem.realkvm.runner import scenario_program
        return scenario_program(scenario, self.arch, path, timeout or DEFAULT_TIMEOUT)

    def run(self, program: Program) -> RealRun:
        from kvmmem.realkvm.program import run_program
        return run_program(program, kvm=self.kvm)


MACHINE_TIMEOUT = 20.0
"""Seconds one guest step may run inside an emulated machine (TCG is 10-100x slower
than this host's KVM, and a machine's first fault of a page costs up to a millisecond)."""


class MachineTarget:
    """A booted :class:`~kvmmem.machine.Machine`: its agent runs the program."""

    emulated_path = False

    def __init__(self, machine: Machine) -> None:
        self.machine = machine
        self.arch = machine.arch
        self.name = machine.name
        self.release = machine.release
        self.variant = machine_variant(machine.version)
        """The model runs as the machine's release (``6.12`` for arm64-6.12)."""

    def program(self, scenario: Scenario, path: str, timeout: float | None) -> Program:
        from kvmmem.realkvm.runner import scenario_program
        return scenario_program(scenario, self.arch, path, timeout or MACHINE_TIMEOUT,
                                x86_code=True)

    def run(self, program: Program) -> RealRun:
        from kvmmem.realkvm.program import RealRun
        # Every step may run into its own watchdog; a VM and its mappings take seconds.
        steps = len(program.get("steps", ())) + len(program.get("memslots", ())) + 1
        timeout = 30.0 + steps * float(program.get("timeout", MACHINE_TIMEOUT))
        result = self.machine.request("run", program=program, timeout=timeout)
        return RealRun.from_dict(result)


def model_variant(scenario: Scenario, real: str = REAL_VARIANT) -> str:
    """The variant the model runs ``scenario`` as against a kernel standing for ``real``:
    the file's own when it names one (with ``real``'s page-size suffix when the file's
    names none: the page size is the target kernel's build), else ``real``."""
    from kvmmem.variants import get_variant, page_size_suffix, split_page_size
    if not scenario.variant_given:
        return real
    base, plus, mutation = scenario.variant.partition("+")
    page_size = get_variant(real).page_size
    if page_size is not None and split_page_size(base)[1] is None:
        base += page_size_suffix(page_size)
    return base + plus + mutation


def unsupported_reason(scenario: Scenario, arch: str = HOST_ARCH,
                       where: str = "this host", real: str = REAL_VARIANT) -> str | None:
    """Why the scenario cannot be compared on ``arch`` KVM (``where``: how reports name
    the target; ``real``: the variant the real kernel stands for) before anything runs,
    or ``None``: another architecture, a variant the file names that is not the real
    kernel's release (or is a mutation), threads."""
    from kvmmem.variants import get_variant

    if arch not in scenario.arches:
        return f"arch {', '.join(scenario.arches)} only: {where} is {arch}"
    have = get_variant(real)
    if scenario.variant_given:
        want = get_variant(scenario.variant)
        if want.mutation is not None or want.release != have.release:
            return f"variant {scenario.variant}: the real kernel is {real}"
    pinned = scenario.page_size or (get_variant(scenario.variant).page_size
                                    if scenario.variant_given else None)
    real_pages = have.page_size or 4096
    if pinned is not None and pinned != real_pages:
        return (f"page_size {pinned >> 10}K: {where} runs a kernel built with "
                f"{real_pages >> 10}K pages")
    if scenario.is_concurrent:
        return "the scenario has threads; real-KVM runs are sequential (use kvmmem explore)"
    return None


def run_model(scenario: Scenario, path: str = "native", arch: str = HOST_ARCH,
              variant: str | None = None) -> RunResult:
    """The model side: ``scenario`` on ``arch`` as ``variant`` (default: the scenario's
    own), every vCPU's default path set to ``path`` (a step's own ``path`` wins, as on
    the real side).  After an invariant violation the remaining steps still run
    (unchecked), as the kernel goes on, so they are compared too.

    Raises :class:`~kvmmem.errors.InputError` where the model refuses the scenario's
    setup (e.g. a host mapping it cannot make)."""
    runner = Runner(scenario, arch, variant or scenario.variant, keep_going=True)
    for vcpu in runner.vm.vcpus:
        vcpu.path = path
    return runner.run()


def _compare_setup(model: RunResult, real: RealRun) -> list[StepComparison]:
    out: list[StepComparison] = []
    real_slots = [s for s in real.setup if "memslot" in s]
    for entry in real.setup:
        if "memory" in entry and entry.get("result") != "ok":
            # The model made every mapping (it raises otherwise); the real host refused.
            out.append(StepComparison(-1, "host_mmap", {"result": "ok"},
                                      {k: v for k, v in entry.items() if k != "memory"},
                                      False, f"memory.{entry['memory']}"))
    for i, m in enumerate(model.setup):
        k = real_slots[i] if i < len(real_slots) else None
        kb = {key: v for key, v in k.items() if key != "memslot"} if k is not None else None
        out.append(StepComparison(m["step"], "set_memslot", m, kb, compare_outcomes(m, kb),
                                  f"memslots[{m['step']}]"))
    return out


def _violation_site(violation: dict[str, Any]) -> str:
    """Where a model violation was seen: ``memslots[I]`` (setup) or ``step I``."""
    if violation.get("setup"):
        return f"memslots[{violation['step']}]"
    return f"step {violation['step']}"


def compare_runs(scenario: Scenario, model: RunResult, real: RealRun) -> Conformance:
    """The verdict from a finished model run and real run of ``scenario``."""
    result = Conformance(scenario.name, scenario.source, real.path, "agree",
                         violations=list(model.violations), arch=model.arch)
    if not real.supported:
        result.verdict, result.reason = "unsupported", real.reason
        return result
    result.setup = _compare_setup(model, real)
    by_index_m = {s["step"]: s for s in model.steps}
    by_index_k = {s["step"]: s for s in real.steps}
    for step in scenario.steps or ():
        m, k = by_index_m.get(step.index), by_index_k.get(step.index)
        if m is None and k is None:
            continue
        result.steps.append(StepComparison(step.index, step.op, m, k, compare_outcomes(m, k),
                                           f"step {step.index}"))
    diffs = result.differences
    if diffs:
        result.verdict = "differ"
        first = diffs[0]
        keys = ", ".join(outcome_differences(first.model, first.kvm))
        result.reason = (f"{len(diffs)} difference{'s' if len(diffs) > 1 else ''}; first: "
                         f"{first.where} ({first.op}) differs in {keys}")
    if model.violations:
        v = model.violations[0]
        note = f"model invariant {v['invariant']} violated at {_violation_site(v)}"
        result.reason = f"{result.reason}; {note}" if result.reason else note
    return result


def conform_scenario(scenario: Scenario, path: str = "native", kvm: Kvm | None = None,
                     timeout: float | None = None,
                     target: Target | None = None) -> Conformance:
    """Run ``scenario`` on the model and on real KVM (guest accesses on ``path``) and
    compare them step by step.  The real side is ``target`` (a machine, or this host);
    without one, this host's KVM through ``kvm`` (an open
    :class:`~kvmmem.realkvm.Kvm` to share; one is opened when absent).

    Raises :class:`~kvmmem.errors.InputError` where the model refuses the scenario,
    :class:`~kvmmem.realkvm.KvmUnavailable` without a usable /dev/kvm,
    :class:`~kvmmem.machine.MachineError` when a machine fails, ``ValueError`` for an
    unknown ``path``."""
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, not {path!r}")
    facts: Any = target if target is not None else HostTarget  # its class attributes
    arch, name, stands_for = facts.arch, facts.name, facts.variant
    release = target.release if target is not None else ""
    where = "this host" if name == "host" else f"machine {name}"
    reason = unsupported_reason(scenario, arch, where, stands_for)
    if reason is None:
        from kvmmem.variants import get_variant
        reason = get_variant(model_variant(scenario, stands_for)).arch_unsupported(arch)
    if reason is None and not facts.emulated_path and (path != "native" or any(
            getattr(step, "path", None) == "emulated" for step in scenario.all_steps())):
        reason = (f"the emulated access path exists only on this host (its PVM guest's "
                  f"CPL0 runs in KVM's instruction emulator); machine {name} runs every "
                  f"access natively")
    if reason is not None:
        return Conformance(scenario.name, scenario.source, path, "unsupported", reason,
                           arch=arch, machine=name, kernel=release)
    if target is None:
        from kvmmem.realkvm import Kvm
        if kvm is None:
            with Kvm() as own:
                return conform_scenario(scenario, path, own, timeout, HostTarget(own))
        target = HostTarget(kvm)
    variant = model_variant(scenario, target.variant)
    try:
        model = run_model(scenario, path, target.arch, variant)
    except InputError as refused:
        # the model cannot set the scenario up at this release (a guest_memfd its KVM
        # cannot create): the kernel decides whether that is a difference
        real = target.run(target.program(scenario, path, timeout))
        verdict, why = ("unsupported", real.reason) if not real.supported else (
            "differ", f"the model at {variant} refuses the setup ({refused}); the kernel "
                      "ran it")
        return Conformance(scenario.name, scenario.source, path, verdict, why, arch=arch,
                           machine=target.name, kernel=target.release)
    real = target.run(target.program(scenario, path, timeout))
    result = compare_runs(scenario, model, real)
    result.machine, result.kernel = target.name, target.release
    return result


# --- reports ---------------------------------------------------------------------------


_HEX_KEYS = ("gpa", "data", "value")


def _compact(outcome: Outcome | None) -> str:
    """One outcome on one line, JSON-like, addresses and data in hex."""
    if outcome is None:
        return "(not run)"
    parts = []
    for key, value in _body(outcome).items():
        if key in _HEX_KEYS and isinstance(value, int) and not isinstance(value, bool):
            text = hex(value)
        else:
            text = json.dumps(value)
        parts.append(f'"{key}": {text}')
    return "{" + ", ".join(parts) + "}"


def tap_header(count: int) -> list[str]:
    """The TAP 13 header and plan for ``count`` scenarios."""
    return ["TAP version 13", f"1..{count}"]


def tap_result(number: int, result: Conformance) -> list[str]:
    """The TAP lines of one scenario: ``ok N - name`` (``# SKIP reason`` when
    unsupported) or ``not ok N - name`` followed by one ``# step I: model {...} kvm
    {...}`` line per difference and a line per model invariant violation."""
    if result.verdict == "unsupported":
        return [f"ok {number} - {result.scenario} # SKIP {result.reason}"]
    lines = [f"{'ok' if result.verdict == 'agree' else 'not ok'} {number} - {result.scenario}"]
    for c in result.differences:
        lines.append(f"# {c.where}: model {_compact(c.model)} kvm {_compact(c.kvm)}")
    for v in result.violations:
        lines.append(f"# model invariant {v['invariant']} violated at {_violation_site(v)}: "
                     f"{v['detail']}")
    return lines


def tap_totals(results: Iterable[Conformance]) -> str:
    """The closing kselftest ``# Totals`` line (agree = pass, differ = fail,
    unsupported = skip)."""
    counts = verdict_counts(results)
    return (f"# Totals: pass:{counts['agree']} fail:{counts['differ']} xfail:0 xpass:0 "
            f"skip:{counts['unsupported']} error:0")


def tap_lines(results: Sequence[Conformance]) -> list[str]:
    """A whole kselftest-style TAP 13 report: :func:`tap_header`, :func:`tap_result`
    per scenario, :func:`tap_totals`."""
    lines = tap_header(len(results))
    for n, r in enumerate(results, 1):
        lines.extend(tap_result(n, r))
    lines.append(tap_totals(results))
    return lines


def verdict_counts(results: Iterable[Conformance]) -> dict[str, int]:
    """How many results have each verdict."""
    counts = dict.fromkeys(VERDICTS, 0)
    for r in results:
        counts[r.verdict] += 1
    return counts


def exit_status(results: Sequence[Conformance]) -> int:
    """SCENARIOS.md: 3 when the model violated an invariant, 1 when a scenario differs,
    4 when nothing could be compared (every scenario unsupported), else 0."""
    if any(r.violations for r in results):
        return EXIT_VIOLATION
    if any(r.verdict == "differ" for r in results):
        return EXIT_DIFFER
    if results and all(r.verdict == "unsupported" for r in results):
        return EXIT_SKIPPED
    return EXIT_AGREE


def to_json(results: Sequence[Conformance]) -> dict[str, Any]:
    """The ``kvmmem conform --json`` object: ``{"results": [...]}``."""
    return {"results": [r.to_json() for r in results]}


def matrix_table(scenarios: Sequence[Scenario],
                 columns: Sequence[tuple[str, str, Sequence[Conformance]]]) -> Any:
    """``kvmmem conform --matrix``: a rich table, one row per scenario, one column per
    machine (``name``, kernel release, its results in scenario order).  A cell is
    ``ok`` (agree), ``DIFF`` (red), ``skip`` (unsupported: the reason is in the JSON and
    the TAP report) or ``·`` when the scenario does not name the machine's
    architecture; the last row counts agree / differ / unsupported."""
    from rich.table import Table

    table = Table(title="kvmmem conform --matrix",
                  caption="ok agree · DIFF differ · skip unsupported · \u00b7 other arch")
    table.add_column("scenario", no_wrap=True)
    for name, release, _ in columns:
        short = release.split("+")[0].split("-")[0]
        table.add_column(f"{name}\n{short}", justify="center", no_wrap=True)
    for i, scenario in enumerate(scenarios):
        cells = []
        for _, _, results in columns:
            r = results[i]
            if r.verdict == "unsupported" and r.reason.startswith("arch "):
                cells.append("[dim]\u00b7[/dim]")
            elif r.verdict == "unsupported":
                cells.append("[dim]skip[/dim]")
            elif r.verdict == "differ":
                cells.append("[bold red]DIFF[/bold red]")
            else:
                cells.append("[green]ok[/green]")
        table.add_row(scenario.name, *cells)
    counts = [verdict_counts(rs) for _, _, rs in columns]
    table.add_row("[b]agree/differ/skip[/b]",
                  *(f"{c['agree']}/{c['differ']}/{c['unsupported']}" for c in counts))
    return table
