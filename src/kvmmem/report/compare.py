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
"""The counters a comparison shows, in this order (``kvmmem.kvm.stats``); after
``pages_1g`` come the leaf counters of a 16 KiB or 64 KiB host (``pages_16k``,
``pages_32m``, ``pages_64k``, ``pages_512m``) when a column has that page size."""
PAGE_SIZE_COUNTERS: tuple[str, ...] = ("pages_16k", "pages_32m", "pages_64k", "pages_512m")


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
            **({"divergences": divergences(self)} if any(
                c.result.explanations for c in self.columns) else {}),
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
    present: set[str] = set()
    for c in columns:
        if c.applicable and c.result.vm is not None:
            present |= set(c.result.vm.stats_dict())
    extra = tuple(n for n in PAGE_SIZE_COUNTERS if n in present)
    at = COUNTERS.index("pages_1g") + 1
    for name in COUNTERS[:at] + extra + COUNTERS[at:]:
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


def compare_runs(scenario: Scenario, arches: list[str], variants: list[str], *,
                 explain: bool = False) -> Comparison:
    """Run ``scenario`` on every (arch, variant) pair, arch-major, and compare.
    ``explain``: record each step's explanation too (:func:`divergences`).

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
                if explain:
                    from kvmmem.report.explain import run_explained

                    result = run_explained(scenario, arch, variant)
                else:
                    result = run_scenario(scenario, arch, variant)
            except InputError as err:
                # the run's setup cannot be made there (a guest_memfd the release's KVM
                # cannot create): the column says why
                columns.append(Column(arch, variant, RunResult(scenario.name, arch, variant),
                                      claimed, str(err)))
                continue
            columns.append(Column(arch, result.variant, result, claimed))
    return build_comparison(scenario, columns)


def _flatten(tree: dict[str, Any], depth: int = 0) -> list[tuple[int, dict[str, Any]]]:
    out = [(depth, tree)]
    for child in tree["children"]:
        out.extend(_flatten(child, depth + 1))
    return out


def _brief(node: dict[str, Any] | None) -> dict[str, Any] | None:
    if node is None:
        return None
    return {"function": node["function"], "source": node["source"], "result": node["result"],
            "facts": node["facts"]}


def divergences(cmp: Comparison) -> list[dict[str, Any]]:
    """``compare --explain``: for each step (and top-level memslot, ``"setup": true``)
    whose outcome differs between the first column and another, where their explained
    paths part (the first node, in call order, whose function differs; with the same
    calls, the last whose result differs; None on the side whose path had ended) and
    the node that decided each outcome::

        {"step", "op", "columns": [A, B], "path": [common functions...],
         "diverge": [node A, node B], "decided": [node A, node B]}

    A node is ``{"function", "source", "result", "facts"}``.  Runs made without
    explanations give nothing."""
    out: list[dict[str, Any]] = []
    first = cmp.columns[0] if cmp.columns else None
    for row in cmp.rows:
        if row.kind not in ("step", "setup") or first is None or row.step is None:
            continue
        setup = row.kind == "setup"
        base = (first.result.setup_explanations if setup
                else first.result.explanations).get(row.step)
        for col, differs in zip(cmp.columns, row.differs, strict=True):
            other = (col.result.setup_explanations if setup
                     else col.result.explanations).get(row.step)
            if not differs or base is None or other is None:
                continue
            a, b = _flatten(base), _flatten(other)
            i = 0
            while i < min(len(a), len(b)) and a[i][0] == b[i][0] \
                    and a[i][1]["function"] == b[i][1]["function"]:
                i += 1
            if i == len(a) == len(b):
                # the same calls: the last one whose result differs
                i = max(k for k in range(len(a))
                        if k == 0 or a[k][1]["result"] != b[k][1]["result"])
            depth = a[i][0] if i < len(a) else b[i][0]
            path: list[str] = []
            want = depth - 1
            for d, n in reversed(a[:i]):
                if d == want:
                    path.insert(0, n["function"])
                    want -= 1
            out.append({
                "step": row.step, "op": "set_memslot" if setup else row.label.split(" ", 1)[-1],
                **({"setup": True} if setup else {}),
                "columns": [first.label, col.label], "path": path,
                "diverge": [_brief(a[i][1]) if i < len(a) else None,
                            _brief(b[i][1]) if i < len(b) else None],
                "decided": [_brief(next((n for _, n in a if n.get("decisive")), None)),
                            _brief(next((n for _, n in b if n.get("decisive")), None))]})
    return out


def divergences_text(found: list[dict[str, Any]]) -> str:
    """:func:`divergences` as text, one block per differing step and column."""
    def node(n: dict[str, Any] | None) -> str:
        if n is None:
            return "(its path had ended)"
        result = f" -> {n['result']}" if n["result"] else ""
        facts = " ".join(f"{k}={v}" for k, v in n["facts"].items())
        return f"{n['function']} [{n['source']}]{result}" + (f"  {facts}" if facts else "")

    lines: list[str] = []
    for d in found:
        a, b = d["columns"]
        width = max(len(a), len(b))
        where = f"setup memslot s{d['step']}" if d.get("setup") else f"step {d['step']}"
        lines.append(f"{where} {d['op']}: {a} and {b} part in "
                     + (" -> ".join(d["path"]) or "the step itself"))
        for label, n in zip((a, b), d["diverge"], strict=True):
            lines.append(f"  {label:<{width}}  {node(n)}")
        lines.append("  decided by:")
        for label, n in zip((a, b), d["decided"], strict=True):
            lines.append(f"  {label:<{width}}  {node(n)}")
    return "\n".join(lines)


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
