"""``kvmmem conform`` at scale: the bundled scenarios and many random sequences on the
model and on this host's /dev/kvm, with the time each side takes.

``run(quick)`` returns ``{name: value}`` for ``kvmmem bench``; run as a script
(``python bench/bench_conform.py [--quick] [--sequences N]``) it prints two tables (a
rich progress bar only when stdout is a terminal).

* ``bundled_*`` - every scenarios/*.yaml on both guest paths: how many agree, differ,
  are unsupported, and ms per scenario on the model and on real KVM;
* ``differential_*`` - N random sequences from tests/conform/strategies.py (the
  differential test's generator; 100 per CI run there, 300 quick / 2000 here): how many
  agree, how many differ in the exact shape of an open KVM_FINDINGS entry
  (``explained``), how many differ otherwise (``unexplained``: a new finding), and ms
  per sequence on each side.  The first unexplained sequence is printed as YAML.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from kvmmem.conform import compare_runs, run_model, tap_lines, unsupported_reason
from kvmmem.realkvm import Kvm, KvmUnavailable, probe_kvm
from kvmmem.realkvm.runner import run_scenario as run_real
from kvmmem.scenario import load_scenario, load_scenario_text
from kvmmem.scenario.model import Scenario

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = ROOT / "scenarios"


@contextmanager
def _progress(total: int) -> Iterator[Callable[[str], None]]:
    """A rich progress bar on a terminal; silent when piped."""
    if not sys.stdout.isatty():
        yield lambda _label: None
        return
    from rich.progress import Progress

    with Progress(transient=True) as bar:
        task = bar.add_task("conform", total=total)

        def step(label: str) -> None:
            bar.update(task, advance=1, description=label)

        yield step


class _Tally:
    """Verdict counts and time per side over a set of conform runs."""

    def __init__(self) -> None:
        self.counts = {"agree": 0, "differ": 0, "unsupported": 0, "explained": 0}
        self.model_s = 0.0
        self.kvm_s = 0.0
        self.compared = 0
        self.first_unexplained = ""

    def conform(self, scenario: Scenario, path: str, kvm: Kvm,
                explain: Callable[[object], bool] | None = None, text: str = "") -> None:
        if unsupported_reason(scenario) is not None:
            self.counts["unsupported"] += 1
            return
        start = time.perf_counter()
        model = run_model(scenario, path)
        middle = time.perf_counter()
        real = run_real(scenario, path, kvm=kvm)
        end = time.perf_counter()
        result = compare_runs(scenario, model, real)
        if result.verdict == "unsupported":
            self.counts["unsupported"] += 1
            return
        self.model_s += middle - start
        self.kvm_s += end - middle
        self.compared += 1
        if result.verdict == "differ" and explain is not None and explain(result):
            self.counts["explained"] += 1
            return
        self.counts[result.verdict] += 1
        if result.verdict == "differ" and not self.first_unexplained:
            self.first_unexplained = text + "\n".join(tap_lines([result]))

    def figures(self, prefix: str) -> dict[str, float]:
        n = max(self.compared, 1)
        out = {f"{prefix}_{k}": float(v) for k, v in self.counts.items()}
        out[f"{prefix}_model_ms"] = self.model_s / n * 1e3
        out[f"{prefix}_kvm_ms"] = self.kvm_s / n * 1e3
        return out


def bundled(kvm: Kvm, tick: Callable[[str], None]) -> dict[str, float]:
    """Every bundled scenario on both paths."""
    tally = _Tally()
    for file in sorted(SCENARIOS.glob("*.yaml")):
        scenario = load_scenario(file)
        for path in ("native", "emulated"):
            tally.conform(scenario, path, kvm)
        tick(file.stem)
    figures = tally.figures("bundled")
    del figures["bundled_explained"]
    return figures


def differential(kvm: Kvm, sequences: int, tick: Callable[[str], None]) -> tuple[
        dict[str, float], str]:
    """``sequences`` random scenarios (the differential test's generator), native path:
    figures and the first unexplained difference (empty when none)."""
    sys.path.insert(0, str(ROOT))
    try:
        from hypothesis import HealthCheck, Phase, given, settings
        from tests.conform.findings import unexplained
        from tests.conform.strategies import scenarios
    finally:
        sys.path.remove(str(ROOT))
    tally = _Tally()

    def explain(result: object) -> bool:
        return not unexplained(result)  # type: ignore[arg-type]

    @settings(max_examples=sequences, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(scenarios())
    def one(text: str) -> None:
        tally.conform(load_scenario_text(text, "differential.yaml"), "native", kvm, explain,
                      text)
        tick("differential")

    start = time.perf_counter()
    one()
    elapsed = time.perf_counter() - start
    figures = tally.figures("differential")
    figures["differential_sequences"] = float(tally.compared)
    figures["differential_per_s"] = tally.compared / elapsed if elapsed else 0.0
    return figures, tally.first_unexplained


def run(quick: bool = False, sequences: int | None = None) -> dict[str, float]:
    """Measure every figure; ``quick`` runs 300 random sequences instead of 2000.
    Raises :class:`~kvmmem.realkvm.kvm.KvmUnavailable` without a usable /dev/kvm."""
    reason = probe_kvm()
    if reason is not None:
        raise KvmUnavailable(reason)
    count = sequences if sequences is not None else (300 if quick else 2000)
    files = len(list(SCENARIOS.glob("*.yaml")))
    out: dict[str, float] = {}
    with Kvm() as kvm, _progress(files + count) as tick:
        out.update(bundled(kvm, tick))
        figures, first = differential(kvm, count, tick)
        out.update(figures)
    if first:
        print(f"bench_conform: first unexplained difference:\n{first}", file=sys.stderr)
    return out


def main() -> None:
    """Print the figures as two tables; one line and exit status 4 without /dev/kvm."""
    args = sys.argv[1:]
    quick = "--quick" in args
    sequences = int(args[args.index("--sequences") + 1]) if "--sequences" in args else None
    try:
        figures = run(quick, sequences)
    except KvmUnavailable as exc:
        print(f"bench_conform: skipped: no usable /dev/kvm: {exc}")
        sys.exit(4)
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for prefix, title in (("bundled", "bundled, 2 paths"),
                          ("differential", "random, native")):
        table = Table(title=f"conform: {title}{' (quick)' if quick else ''}")
        table.add_column("figure")
        table.add_column("value", justify="right")
        for name, value in figures.items():
            if name.startswith(prefix + "_"):
                text = f"{int(value)}" if value == int(value) else f"{value:.2f}"
                table.add_row(name.removeprefix(prefix + "_"), text)
        console.print(table)


if __name__ == "__main__":
    main()
