"""Explain an outcome: the kernel functions a step went through, and which one decided.

``kvmmem run FILE --explain`` records, while a step runs, every call into a model
function that mirrors a kernel function (the table in :mod:`kvmmem.report.sources`),
as a tree: each node is the kernel function with the file to read it in at the
modelled release, the facts it decided on (its listed local variables as they were
when it returned) and what it returned or raised.  The node that decided the outcome
is marked.

The tree comes from the one code path that computes the outcome: a trace function
(:func:`sys.settrace`) watches the model run; nothing here restates the model's
logic.  With no explanation asked for, no trace function is installed, so a normal
run costs nothing more.  The model's operations are generators the drivers resume
(the explorer interleaves them), so a node stays open across its pauses: it is
keyed by its frame and closed when the frame really returns.

Which node decided: for an outcome that is not a plain success, follow from the top
the last child whose own result was adverse (an exception, an error pfn, a fault
decision other than resume, a missing value) down to the node none of whose children
was: the reason was found there (``hva_to_pfn_remapped`` returning
``KVM_PFN_ERR_RO_FAULT``; ``get_user_pages_unlocked`` failing ``check_vma_flags``;
``kvm_arch_prepare_memory_region`` refusing a VMA).  For a success, the node that
installed the mapping, if any.
"""

from __future__ import annotations

import dis
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from types import CodeType, FrameType, GeneratorType
from typing import Any

from kvmmem.arch.pgtable_types import Leaf
from kvmmem.errors import InputError, KernelError
from kvmmem.host import HostSignal
from kvmmem.kvm.fault import AccessResult, Fault, FaultResult
from kvmmem.kvm.faultin import PFN_ERROR_NAMES, Faultin, is_error_noslot_pfn
from kvmmem.kvm.vcpu import TlbEntry
from kvmmem.report.sources import Release, Source, code_table
from kvmmem.report.text import outcome_text
from kvmmem.report.trace import StepEventLog
from kvmmem.scenario.model import Scenario, Step
from kvmmem.scenario.runner import Runner, RunResult, StepWrapper
from kvmmem.variants import get_variant

_RETURNS = frozenset(dis.opmap[name] for name in ("RETURN_VALUE", "RETURN_CONST")
                     if name in dis.opmap)
_YIELDS = frozenset(dis.opmap[name] for name in ("YIELD_VALUE",) if name in dis.opmap)
_RESUME = dis.opmap.get("RESUME", -1)


def _how_left(frame: FrameType) -> int:
    """How a ``return`` trace event left ``frame``: 1 returned, 0 paused at a yield,
    -1 an exception unwound it (read from the instruction it stopped at; on Python
    3.13 a paused generator stands at the RESUME after its YIELD_VALUE)."""
    code = frame.f_code.co_code
    at = frame.f_lasti
    op = code[at] if at >= 0 else -1
    if op in _RETURNS:
        return 1
    if op in _YIELDS or (op == _RESUME and at >= 2 and code[at - 2] in _YIELDS):
        return 0
    return -1
_INSTALLS = frozenset({"kvm_pgtable_stage2_map", "kvm_tdp_mmu_map", "kvm_riscv_mmu_map",
                       "kvm_arch_vcpu_pre_fault_memory"})
"""Kernel functions whose success is the installed mapping a successful access names."""


@dataclass(slots=True)
class Node:
    """One call of a kernel function (or the step itself at the root)."""

    function: str
    source: str
    facts: dict[str, str] = field(default_factory=dict)
    result: str = ""
    adverse: bool = False
    decisive: bool = False
    children: list[Node] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The ``explain`` object of SCENARIOS.md (docs/scenarios.md, Explanations)."""
        out: dict[str, Any] = {"function": self.function, "source": self.source,
                               "facts": dict(self.facts), "result": self.result}
        if self.decisive:
            out["decisive"] = True
        out["children"] = [c.to_json() for c in self.children]
        return out

    def walk(self) -> Iterator[Node]:
        """This node and every node below it, depth first, in call order."""
        yield self
        for child in self.children:
            yield from child.walk()

    def decisive_node(self) -> Node | None:
        """The node marked decisive in this tree, or None."""
        return next((n for n in self.walk() if n.decisive), None)


class Explainer:
    """Records the kernel-function tree of each step run inside :meth:`step`."""

    def __init__(self, arch: str, release: Release) -> None:
        self.arch = arch
        self.release = release
        self.table: dict[CodeType, Source] = code_table()
        self._open: dict[FrameType, Node] = {}
        self._stack: list[Node] = []
        self._forwarded: dict[FrameType, Node] = {}
        """Generator frames a node returned unstarted (``return hva_to_pfn(...)``: the
        caller runs it): their node becomes the forwarding node's child, and its
        result the forwarding node's."""
        self._forwarder: dict[int, Node] = {}
        self._roots: list[tuple[Step, Node]] = []
        self._root_code: CodeType | None = None

    @contextmanager
    def step(self, root: Node) -> Iterator[Node]:
        """Record the calls made inside the ``with`` block under ``root``."""
        with self._recording(root, None):
            yield root

    @contextmanager
    def steps(self) -> Iterator[list[tuple[Step, Node]]]:
        """Record every step the runner runs inside the ``with`` block, each under its
        own root, however their pauses interleave (``explore --replay``): yields the
        list of ``(step, root)`` it fills, in the order the steps started."""
        found: list[tuple[Step, Node]] = []
        self._roots = found
        with self._recording(Node("", ""), Runner.step_op.__code__):
            yield found

    @contextmanager
    def _recording(self, base: Node, root_code: CodeType | None) -> Iterator[None]:
        """The trace function installed, calls recorded below ``base`` (and below a
        new root for each frame of ``root_code``), then everything put back."""
        self._stack = [base]
        self._open = {}
        self._forwarded = {}
        self._forwarder = {}
        self._root_code = root_code
        previous = sys.gettrace()
        sys.settrace(self._global)
        try:
            yield
        finally:
            sys.settrace(previous)
            self._close_unfinished()
            self._stack = []
            self._open = {}
            self._forwarded = {}
            self._forwarder = {}
            self._root_code = None

    def _close_unfinished(self) -> None:
        """Nodes whose function had not returned when recording stopped (an explored
        execution stops at its violation): their facts as they stand."""
        for frame, node in self._open.items():
            node.result = node.result or "(not finished)"
            source = self.table.get(frame.f_code)
            if source is not None:
                local = frame.f_locals
                node.facts = {n: _show(local[n]) for n in source.facts if n in local}

    # --- the trace functions ------------------------------------------------------

    def _global(self, frame: FrameType, event: str, arg: Any) -> Any:
        if event != "call":
            return None
        if frame.f_code is self._root_code:
            return self._step_root(frame)
        source = self.table.get(frame.f_code)
        if source is None:
            return None
        node = self._open.get(frame)
        if node is None:  # a first call, not a generator resumed
            node = Node(source.name_at(self.release, self.arch),
                        source.file_at(self.release, self.arch))
            forwarder = self._forwarded.pop(frame, None)
            parent = forwarder if forwarder is not None else self._stack[-1]
            parent.children.append(node)
            if forwarder is not None:
                self._forwarder[id(node)] = forwarder
            self._open[frame] = node
        self._stack.append(node)
        frame.f_trace_lines = False
        return self._local

    def _step_root(self, frame: FrameType) -> Any:
        """A step starting (or resumed) under :meth:`steps`: its root is the base of
        what it calls."""
        node = self._open.get(frame)
        if node is None:
            step = frame.f_locals["step"]
            node = Node(ROOT_CALLS.get(step.op, step.op), "")
            self._roots.append((step, node))
            self._open[frame] = node
        self._stack.append(node)
        frame.f_trace_lines = False
        return self._root_local

    def _root_local(self, frame: FrameType, event: str, arg: Any) -> Any:
        if event != "return":
            return self._root_local
        node = self._open.get(frame)
        if node is not None and self._stack and self._stack[-1] is node:
            self._stack.pop()
        if node is not None and _how_left(frame) != 0:
            del self._open[frame]
            if isinstance(arg, dict):
                node.result = outcome_text(arg)
                mark_decisive(node, arg)
        return self._root_local

    def _local(self, frame: FrameType, event: str, arg: Any) -> Any:
        node = self._open.get(frame)
        if node is None:
            return None
        if event == "exception":
            exc = arg[1]
            if not isinstance(exc, StopIteration | GeneratorExit):
                node.result = _show(exc)
                node.adverse = True
            return self._local
        if event != "return":
            return self._local
        if self._stack and self._stack[-1] is node:
            self._stack.pop()
        how = _how_left(frame)
        if how == 0:
            return self._local  # paused: the node stays open
        del self._open[frame]
        if how == 1:
            if isinstance(arg, GeneratorType) and arg.gi_frame is not None:
                self._forwarded[arg.gi_frame] = node
                node.result = ""
            else:
                node.result = "" if arg is None else _show(arg)
                node.adverse = _adverse(arg)
        forwarder = self._forwarder.pop(id(node), None)
        while forwarder is not None:
            forwarder.result, forwarder.adverse = node.result, node.adverse
            forwarder = self._forwarder.pop(id(forwarder), None)
        source = self.table[frame.f_code]
        local = frame.f_locals
        node.facts = {name: _show(local[name]) for name in source.facts if name in local}
        return self._local


def mark_decisive(root: Node, outcome: dict[str, Any]) -> None:
    """Mark the node that decided ``outcome`` (the module docstring says which)."""
    if outcome.get("result") == "ok":
        installs = [n for n in root.walk() if n.function in _INSTALLS and not n.adverse]
        if installs:
            installs[-1].decisive = True
        return
    node = root
    while True:
        adverse = [c for c in node.children if c.adverse]
        if not adverse:
            break
        node = adverse[-1]
    if node is not root:
        node.decisive = True


# --- showing values -------------------------------------------------------------------


def _adverse(value: object) -> bool:
    """A returned value that ends the path short of success."""
    if isinstance(value, FaultResult):
        return value.kind is not Fault.RESUME
    if isinstance(value, Faultin):
        return is_error_noslot_pfn(value.pfn)
    if isinstance(value, AccessResult):
        return value.result != "ok"
    return isinstance(value, int) and not isinstance(value, bool) and value in PFN_ERROR_NAMES


def _show(value: object) -> str:
    """A value as a fact: short, in the kernel's terms."""
    if isinstance(value, KernelError):
        return f"-{value.errno} ({value.reason})" if value.reason else f"-{value.errno}"
    if isinstance(value, HostSignal):
        return value.signal
    if isinstance(value, BaseException):
        return type(value).__name__
    if isinstance(value, FaultResult):
        return _show_fault(value)
    if isinstance(value, AccessResult):
        return value.result if value.result == "mmio" and not value.length \
            else outcome_text(value.to_outcome())
    if isinstance(value, Leaf):
        perm = ("r" if value.perm.read else "-") + ("w" if value.perm.write else "-") \
            + ("x" if value.perm.execute else "-")
        return f"{value.size >> 10}K leaf pfn {value.pfn:#x} {perm} {value.attr.name}"
    if isinstance(value, Faultin):
        pfn = PFN_ERROR_NAMES.get(value.pfn, f"pfn {value.pfn:#x}")
        return f"{pfn}, writable={'yes' if value.map_writable else 'no'}"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, Enum):
        return value.name
    if isinstance(value, int):
        return PFN_ERROR_NAMES.get(value, hex(value) if value > 9 or value < 0 else str(value))
    if value is None:
        return "none"
    if isinstance(value, TlbEntry):
        return f"pfn {value.pfn:#x}"
    if isinstance(value, tuple):
        return "(" + ", ".join(_show(v) for v in value) + ")"
    if isinstance(value, list):
        return "[" + ", ".join(_show(v) for v in value[:8]) + (", ..." if len(value) > 8 else "") \
            + "]"
    text = repr(value)
    return text if len(text) <= 160 else text[:157] + "..."


def _show_fault(result: FaultResult) -> str:
    kind = result.kind
    if kind is Fault.RESUME:
        return "resume (mapped)"
    if kind is Fault.RETRY:
        return "retry (RET_PF_RETRY / resume without mapping)"
    if kind is Fault.MMIO:
        return "MMIO exit"
    if kind is Fault.EMULATE:
        return "RET_PF_EMULATE"
    if kind is Fault.EFAULT:
        return "-EFAULT"
    if kind is Fault.ABORT:
        return f"inject {result.abort}"
    if kind is Fault.MEMORY_FAULT:
        return f"-{result.errno} with KVM_EXIT_MEMORY_FAULT (flags {result.flags:#x})"
    return f"-{result.errno}"


# --- running a scenario with explanations --------------------------------------------

ROOT_CALLS = {
    "guest_read": "KVM_RUN", "guest_write": "KVM_RUN", "guest_exec": "KVM_RUN",
    "prefault": "KVM_PRE_FAULT_MEMORY", "set_memslot": "KVM_SET_USER_MEMORY_REGION",
    "get_dirty_log": "KVM_GET_DIRTY_LOG", "clear_dirty_log": "KVM_CLEAR_DIRTY_LOG",
    "enable_cap": "KVM_ENABLE_CAP", "set_memory_attributes": "KVM_SET_MEMORY_ATTRIBUTES",
    "reset_dirty_rings": "KVM_RESET_DIRTY_RINGS", "harvest_dirty_ring": "dirty ring read",
    "host_mmap": "mmap", "host_munmap": "munmap", "host_mprotect": "mprotect",
    "host_madvise": "madvise", "host_mremap": "mremap", "host_read": "load",
    "host_write": "store", "punch_hole": "fallocate",
}
"""The system call or ioctl each step kind is (the root of its tree)."""


def run_explained(scenario: Scenario, arch: str, variant: str | None = None,
                  steps: frozenset[int] | None = None, *, events: bool = False) -> RunResult:
    """Run ``scenario`` as :func:`kvmmem.scenario.runner.run_scenario` does, recording
    the ``explain`` tree of each step of ``steps`` (default: every one) in
    ``result.explanations`` (``events``: with the event log of
    :func:`kvmmem.report.trace.run_traced` too).

    Raises InputError as ``run_scenario`` does (threads, bad arch/variant)."""
    if scenario.steps is None:
        raise InputError(f"{scenario.source}: {scenario.name} has threads, not steps: "
                         "run it with `kvmmem explore`")
    runner = Runner(scenario, arch, variant)
    if events:
        runner.vm.log = StepEventLog()
    trees: dict[int, dict[str, Any]] = {}
    setup: dict[int, dict[str, Any]] = {}
    runner.explain = step_explainer(Explainer(arch, runner.vm.variant.release), trees,
                                    setup, steps)
    result = runner.run()
    result.explanations = trees
    result.setup_explanations = setup
    return result


def step_explainer(explainer: Explainer, trees: dict[int, dict[str, Any]],
                   setup_trees: dict[int, dict[str, Any]],
                   steps: frozenset[int] | None = None) -> StepWrapper:
    """The :data:`~kvmmem.scenario.runner.StepWrapper` putting ``explainer``'s tree of
    each step of ``steps`` (all when None) in ``trees`` and of every top-level memslot
    (when all steps are explained) in ``setup_trees``, by index."""
    def wrap(step: Step, setup: bool, do: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        if (steps is not None and step.index not in steps) if not setup else steps is not None:
            return do()
        root = Node(ROOT_CALLS.get(step.op, step.op), "")
        with explainer.step(root):
            outcome = do()
        root.result = outcome_text(outcome)
        mark_decisive(root, outcome)
        (setup_trees if setup else trees)[step.index] = root.to_json()
        return outcome
    return wrap


def explain_text(step: dict[str, Any], tree: dict[str, Any], setup: bool = False) -> str:
    """The ``explain`` tree of one step outcome (``setup``: of a top-level memslot) as
    indented text."""
    label = f"setup memslot s{step['step']}" if setup else f"step {step['step']}"
    lines = [f"{label} {step['op']}: {tree['function']} -> {tree['result']}"]

    def walk(node: dict[str, Any], depth: int) -> None:
        pad = "  " * depth
        mark = "   <== decided here" if node.get("decisive") else ""
        result = f" -> {node['result']}" if node["result"] else ""
        lines.append(f"{pad}{node['function']}  [{node['source']}]{result}{mark}")
        if node["facts"]:
            facts = " ".join(f"{k}={v}" for k, v in node["facts"].items())
            lines.append(f"{pad}    {facts}")
        for child in node["children"]:
            walk(child, depth + 1)

    for child in tree["children"]:
        walk(child, 1)
    if not tree["children"]:
        lines.append("  (no kernel function of the table ran: "
                     + ("the vCPU's translation was present, no exit)" if tree["function"] ==
                        "KVM_RUN" else "nothing to explain)"))
    return "\n".join(lines)


def replay_explained(scenario: Scenario, token: Any) -> tuple[Any, list[dict[str, Any]]]:
    """``kvmmem explore --replay TOKEN --explain``: the replay
    (:func:`kvmmem.explore.replay`) and, for every thread step it ran, in the order the
    steps started, ``{"thread", "step", "op", "explain"}``."""
    from kvmmem.explore import replay
    from kvmmem.explore.token import Token

    tok = Token.decode(token) if isinstance(token, str) else token
    explainer = Explainer(tok.arch, get_variant(tok.variant).release)
    with explainer.steps() as found:
        replayed = replay(scenario, tok)
    out = [{"thread": step.thread, "step": step.index, "op": step.op,
            "explain": root.to_json()} for step, root in found if step.thread is not None]
    return replayed, out
