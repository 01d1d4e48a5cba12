"""``kvmmem compare``: one scenario across architectures and variants, side by side.

:func:`compare_runs` runs a scenario once per (architecture, variant) pair
and builds a :class:`Comparison`: one column per run, one row per setup
memslot, per step (the outcome in a few words) and per counter (the VM's
counters named like KVM's binary stats).  A cell that differs from the
first column's is *marked*; the table shows it highlighted with a ``*``,
the JSON carries ``"differs": true``.

Which expectations count: a scenario's ``expect`` keys describe the
behaviour on the architectures it names under the variant it names.  A
failed expectation in such a *claimed* run is reported and makes ``compare``
exit 1; in any other run (another architecture or another variant, where
different behaviour is usually the point of comparing) the cell is shown as
not matching the file's expectation but the exit status is unaffected.  An
invariant violation in any run makes it exit 3 (a violation wins over a
failed expectation), as ``kvmmem run`` does.

A run that cannot be made (the scenario has a step the architecture does not
have, such as x86's ``path: emulated`` on arm64, or a setup the release refuses,
such as a guest_memfd before v6.18's flags) is a *not applicable* column: its
cells read ``n/a``, the reason is in the caption and in the JSON
(``"applicable": false, "reason"``), and it counts for nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rich.table import Table
from rich.text import Text

from kvmmem.errors import InputError
from kvmmem.scenario.model import Scenario
from kvmmem.scenario.runner import RunResult, arch_unsupported, run_scenario
from kvmmem.variants import get_variant

COUNTERS: tuple[str, ...] = (
    "pf_taken",
    "pf_fixed",
    "pf_emulate",
    "pf_retry",
    "pf_efault",
    "mmio_exits",
    "pages_4k",
    "pages_2m",
    "pages_1g",
    "premapped_pages",
    "prefault_pages",
    "notifier_invalidations",
    "remote_tlb_flush_requests",
    "remote_tlb_flush",
    "mmu_shadow_zapped",
)
"""The counters a comparison shows, in this order (``kvmmem.kvm.stats``)."""


def summarize(outcome: dict[str, Any]) -> str:
    """An outcome in a few words: ``ok 0x5a5a``, ``mmio W 0x200000/4 =0x1``,
    ``fault 0x1000``, ``error EPERM``, ``abort prefetch abort``, ``ok dirty[0x1,0x2]``;
    `` faults=N`` after it when the step counted its stage-2 faults."""
    text = _summarize(outcome)
    if "faults" in outcome:
        text += f" faults={outcome['faults']}"
    return text


def _summarize(outcome: dict[str, Any]) -> str:
    result = str(outcome.get("result", "?"))
    if result == "ok":
        parts = ["ok"]
        if "value" in outcome:
            parts.append(f"{outcome['value']:#x}")
        if "dirty" in outcome:
            parts.append("dirty[" + ",".join(hex(g) for g in outcome["dirty"]) + "]")
        if outcome.get("remaining"):
            parts.append(f"left {outcome['remaining']:#x}")
        return " ".join(parts)
    if result == "mmio":
        text = f"mmio {'W' if outcome.get('is_write') else 'R'} {outcome.get('gpa', 0):#x}" \
               f"/{outcome.get('len', 0)}"
        if outcome.get("is_write"):
            text += f" ={outcome.get('data', 0):#x}"
        return text
    if result == "fault":
        return f"fault {outcome.get('gpa', 0):#x}" if "gpa" in outcome else "fault"
    if result == "error":
        return f"error {outcome.get('errno', '?')}"
    if result == "signal":
        return f"signal {outcome.get('signal', '?')}"
    if result == "abort":
        return f"abort {outcome.get('abort', '?')}"
    return result


@dataclass
class Column:
    """One run of the comparison: its architecture, variant and result.
    ``claimed``: the scenario names this architecture and variant, so its
    expectations apply.  ``reason``: why the run could not be made (then
    ``result`` is an empty :class:`RunResult` and the column is not applicable)."""

    arch: str
    variant: str
    result: RunResult
    claimed: bool
    reason: str | None = None

    @property
    def applicable(self) -> bool:
        """The run was made (``reason`` is None)."""
        return self.reason is None

    @property
    def label(self) -> str:
        """``x86 upstream``."""
        return f"{self.arch} {self.variant}"


@dataclass
class Row:
    """One row: ``kind`` is ``setup``, ``step`` or ``counter``; ``cells`` one
    text per column; ``differs[i]`` says column i differs from column 0;
    ``failed[i]`` that column i did not meet the step's expectation."""

    kind: str
    label: str
    cells: list[str]
    differs: list[bool] = field(default_factory=list)
    failed: list[bool] = field(default_factory=list)
    step: int | None = None


@dataclass
class Comparison:
    """A scenario's runs side by side."""

    scenario: Scenario
    columns: list[Column]
    rows: list[Row]

    @property
    def exit_status(self) -> int:
        """3 if any run violated an invariant; 1 if a claimed run failed an
        expectation; else 0."""
        if any(c.result.violations for c in self.columns):
            return 3
        if any(c.claimed and c.applicable and c.result.mismatches for c in self.columns):
            return 1
        return 0

    @property
    def differences(self) -> int:
        """How many cells differ from the first column."""
        return sum(sum(r.differs) for r in self.rows)

    def to_json(self) -> dict[str, Any]:
        """The ``kvmmem compare --json`` object (see the README)."""
        return {
            "scenario": self.scenario.name,
            "columns": [{"arch": c.arch, "variant": c.variant, "claimed": c.claimed,
                         "applicable": c.applicable, "reason": c.reason,
                         "mismatches": [m.step for m in c.result.mismatches],
                         "violations": c.result.violations} for c in self.columns],
            "rows": [{"kind": r.kind, "label": r.label, "step": r.step, "cells": r.cells,
                      "differs": r.differs, "failed": r.failed} for r in self.rows],
            "runs": [c.result.to_json() for c in self.columns if c.applicable],
            "differences": self.differences,
            "status": self.exit_status,
        }


NA = "n/a"
"""The cell of a column whose run could not be made."""


def _mark(row: Row) -> Row:
    row.differs = [cell != row.cells[0] and NA not in (cell, row.cells[0])
                   for cell in row.cells]
    if not row.failed:
        row.failed = [False] * len(row.cells)
    return row


def build_comparison(scenario: Scenario, columns: list[Column]) -> Comparison:
    """The rows for runs already made (``columns``)."""
    rows: list[Row] = []
    n_setup = max((len(c.result.setup) for c in columns), default=0)
    for i in range(n_setup):
        slot = scenario.memslots[i] if i < len(scenario.memslots) else None
        label = f"setup slot {slot.slot}" if slot is not None else f"setup {i}"
        cells = [summarize(c.result.setup[i]) if i < len(c.result.setup)
                 else "-" if c.applicable else NA for c in columns]
        failed = [i < len(c.result.setup)
                  and any(m.actual is c.result.setup[i] for m in c.result.mismatches)
                  for c in columns]
        rows.append(_mark(Row("setup", label, cells, failed=failed, step=i)))
    for step in scenario.steps or ():
        cells = []
        failed = []
        for c in columns:
            outcome = next((o for o in c.result.steps if o["step"] == step.index), None)
            if not c.applicable:
                cells.append(NA)
                failed.append(False)
                continue
            if outcome is None:
                cells.append("-")  # the run stopped before this step (a violation)
                failed.append(False)
                continue
            cells.append(summarize(outcome))
            failed.append(any(m.actual is outcome for m in c.result.mismatches))
        rows.append(_mark(Row("step", f"{step.index} {step.op}", cells, failed=failed,
                              step=step.index)))
    for name in COUNTERS:
        cells = []
        for c in columns:
            vm = c.result.vm
            stats = vm.stats_dict() if vm is not None else {}
            cells.append(str(stats.get(name, "-")) if c.applicable else NA)
        rows.append(_mark(Row("counter", name, cells)))
    rows.append(_mark(Row("result", "invariants", [
        NA if not c.applicable
        else "violated: " + ", ".join(v["invariant"] for v in c.result.violations)
        if c.result.violations else "held" for c in columns])))
    return Comparison(scenario, columns, rows)


def compare_runs(scenario: Scenario, arches: list[str], variants: list[str]) -> Comparison:
    """Run ``scenario`` on every (arch, variant) pair, arch-major, and compare.

    Raises InputError for an unknown architecture or variant, or a scenario
    with threads."""
    columns = []
    for arch in arches:
        arch_reason = arch_unsupported(scenario, arch)
        for variant in variants:
            claimed = arch in scenario.arches and variant == scenario.variant
            # an architecture that did not exist at the variant's release (riscv < v5.16)
            reason = arch_reason or get_variant(variant).arch_unsupported(arch)
            if reason is not None:
                columns.append(Column(arch, variant, RunResult(scenario.name, arch, variant),
                                      claimed, reason))
                continue
            try:
                result = run_scenario(scenario, arch, variant)
            except InputError as err:
                # the run's setup cannot be made there (a guest_memfd the release's KVM
                # cannot create): the column says why
                columns.append(Column(arch, variant, RunResult(scenario.name, arch, variant),
                                      claimed, str(err)))
                continue
            columns.append(Column(arch, result.variant, result, claimed))
    return build_comparison(scenario, columns)


def comparison_table(cmp: Comparison) -> Table:
    """The rich table: a column per run, differing cells highlighted and
    starred, cells that miss the file's expectation struck in red."""
    caption = "*: differs from the first column; ✗: misses the file's expectation"
    if not all(c.claimed for c in cmp.columns):
        caption += ("; (unclaimed): an arch/variant the file does not name, whose "
                    "expectations do not set the exit status")
    for c in cmp.columns:
        if c.reason is not None:
            caption += f"\n{c.label}: not applicable: {c.reason}"
    table = Table(title=f"{cmp.scenario.name}: {len(cmp.columns)} runs, "
                        f"{cmp.differences} cells differ from the first column",
                  title_justify="left", caption=caption, caption_justify="left")
    table.add_column("", no_wrap=True)
    for c in cmp.columns:
        header = f"{c.arch}\n{c.variant}" + ("" if c.claimed else "\n(unclaimed)") \
            + ("" if c.applicable else "\n(n/a)")
        table.add_column(header)
    last_kind = ""
    for row in cmp.rows:
        if last_kind and row.kind != last_kind:
            table.add_section()
        last_kind = row.kind
        cells: list[Text] = []
        for i, text in enumerate(row.cells):
            style = ""
            if row.differs[i]:
                style = "bold yellow"
                text = text + " *"
            if row.failed[i]:
                style = "bold red" if cmp.columns[i].claimed else "red"
                text = text + " ✗"
            if row.kind == "result" and text.startswith("violated"):
                style = "bold red"
            cells.append(Text(text, style=style))
        table.add_row(Text(row.label, style="dim" if row.kind == "counter" else ""), *cells)
    return table
