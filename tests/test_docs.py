"""The user documentation under docs/ (issue 17): it covers every key the loader
knows, its links resolve, every finding a scenario or the code cites has an entry,
and the example scenarios in docs/scenarios.md load and meet their expectations on
every architecture they name (a new user can start from them)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from kvmmem.scenario import schema
from kvmmem.scenario.loader import load_scenario_text
from kvmmem.scenario.model import MAPPING_KINDS, RESULTS
from kvmmem.scenario.runner import run_scenario
from kvmmem.variants import VARIANTS

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SCENARIOS_MD = (DOCS / "scenarios.md").read_text()
EXAMPLES = [b for b in re.findall(r"```yaml\n(.*?)```", SCENARIOS_MD, re.S)
            if b.startswith("kvmmem: 1")]


def test_scenarios_md_names_every_key_kind_step_and_result() -> None:
    names = {k.name for keys in (schema.TOP_KEYS, schema.MAPPING_KEYS, schema.MEMSLOT_KEYS,
                                 schema.EXPECT_KEYS, *(s.keys for s in schema.STEP_KINDS))
             for k in keys}
    names |= {s.op for s in schema.STEP_KINDS} | set(MAPPING_KINDS) | set(RESULTS)
    missing = sorted(n for n in names if f"`{n}`" not in SCENARIOS_MD)
    assert not missing, f"docs/scenarios.md does not name {missing}"
    for step in schema.STEP_KINDS:
        assert f"### `{step.op}`" in SCENARIOS_MD
    for extension in ("abort", "remaining", "notes", "setup", "more_mmio", "exit_reason",
                      "signal", "dirty", "value_hex", "data_hex"):
        assert f"`{extension}`" in SCENARIOS_MD


def test_variants_md_names_every_variant() -> None:
    text = (DOCS / "variants.md").read_text()
    assert all(f"`{v}`" in text for v in VARIANTS)


def test_every_cited_finding_has_an_entry() -> None:
    findings = (DOCS / "findings.md").read_text()
    cited: set[str] = set()
    for path in [*ROOT.glob("scenarios/*.yaml"), *ROOT.glob("src/kvmmem/**/*.py")]:
        cited |= set(re.findall(r"docs/findings\.md#(finding-[0-9a-z]+)", path.read_text()))
        assert "KVM_FINDINGS" not in path.read_text(), f"{path}: cite docs/findings.md"
    assert cited
    for anchor in cited:
        assert f'<a id="{anchor}"></a>' in findings, anchor


@pytest.mark.parametrize("page", [*sorted(p for p in DOCS.glob("*.md")
                                           if p.name != "conformance.md"),
                                  ROOT / "README.md"],
                         ids=lambda p: p.name)
def test_relative_links_resolve(page: Path) -> None:
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", page.read_text()):
        if "://" in target or target.endswith("conformance.md"):
            continue  # conformance.md comes with the machines (kvmmem.machine)
        assert (page.parent / target).exists(), f"{page.name}: broken link {target}"


@pytest.mark.parametrize("text", EXAMPLES, ids=lambda t: t.split("name: ")[1].split()[0])
def test_doc_examples_run_and_meet_their_expectations(text: str) -> None:
    scenario = load_scenario_text(text, "docs/scenarios.md")
    for arch in scenario.arches:
        result = run_scenario(scenario, arch)
        assert result.exit_status == 0, (arch, result.mismatches, result.violations)


def test_there_are_the_three_question_scenarios() -> None:
    names = [t.split("name: ")[1].split()[0] for t in EXAMPLES]
    assert {"ram-then-readonly", "slot-over-readonly", "io-mapping"} <= set(names)


IMPORT_NAMES = {"PyYAML": "yaml", "iced-x86": "iced_x86"}
"""Distribution name -> module name where the two differ."""


def test_every_declared_dependency_is_imported() -> None:
    """Issue 12: pyproject.toml declares what the package imports, nothing more (pydantic
    was declared and never imported; the scenario schema is kvmmem.scenario.schema, whose
    loader gives YAML line numbers and whose JSON Schema editors use)."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    source = "\n".join(p.read_text() for p in (ROOT / "src" / "kvmmem").rglob("*.py"))
    for requirement in project["dependencies"]:
        dist = re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0]
        module = IMPORT_NAMES.get(dist, dist.replace("-", "_"))
        assert re.search(rf"^\s*(import|from) {module}\b", source, re.M), \
            f"{dist} is declared in pyproject.toml but src/kvmmem never imports {module}"
