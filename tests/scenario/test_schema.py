"""The JSON Schema of scenario files (issue 17): generated from the one declaration
the loader checks files with (kvmmem.scenario.schema), shipped as
docs/scenario.schema.json, equal to what ``kvmmem schema`` prints, and every bundled
scenario validates against it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from typer.testing import CliRunner

from kvmmem.cli import app
from kvmmem.scenario import schema
from kvmmem.scenario.model import EXPECT_KEYS, STEP_TYPES

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "docs" / "scenario.schema.json"
FILES = sorted((ROOT / "scenarios").glob("*.yaml"))


def validator() -> jsonschema.Draft202012Validator:
    doc = json.loads(SHIPPED.read_text())
    jsonschema.Draft202012Validator.check_schema(doc)
    return jsonschema.Draft202012Validator(doc)


def test_shipped_schema_is_the_generated_one() -> None:
    assert SHIPPED.read_text() == schema.json_schema_text(), (
        "docs/scenario.schema.json is stale: regenerate it with "
        "`kvmmem schema --output docs/scenario.schema.json`")


def test_schema_command_prints_it_and_writes_it(tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["schema"])
    assert res.exit_code == 0
    assert res.stdout == schema.json_schema_text()
    out = tmp_path / "s.json"
    res = CliRunner().invoke(app, ["schema", "--output", str(out)])
    assert res.exit_code == 0 and out.read_text() == schema.json_schema_text()
    res = CliRunner().invoke(app, ["schema", "--output", str(tmp_path / "no" / "s.json")])
    assert res.exit_code == 2
    assert res.stderr.startswith("kvmmem: error: --output ")


def test_the_declaration_covers_the_model() -> None:
    """Every step kind and outcome key the model knows is declared (and no other)."""
    assert [k.op for k in schema.STEP_KINDS] == list(STEP_TYPES)
    assert tuple(k.name for k in schema.EXPECT_KEYS) == EXPECT_KEYS
    used = {k.type for keys in (schema.TOP_KEYS, schema.MAPPING_KEYS, schema.MEMSLOT_KEYS,
                                schema.HVA_REF_KEYS, schema.EXPECT_KEYS,
                                *(s.keys for s in schema.STEP_KINDS)) for k in keys}
    assert used <= set(schema.TYPES)


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_bundled_scenario_validates(path: Path) -> None:
    errors = list(validator().iter_errors(yaml.safe_load(path.read_text())))
    assert not errors, [e.message for e in errors]


GOOD: dict[str, Any] = {
    "kvmmem": 1, "name": "x", "memory": {"ram": {"size": "2M", "kind": "anon", "prot": "rw"}},
    "memslots": [{"slot": 0, "gpa": 0, "size": "2M", "memory": "ram"}],
    "steps": [{"guest_read": {"gpa": 0x1000, "size": 8}, "expect": {"result": "ok"}}],
}


@pytest.mark.parametrize(("change", "why"), [
    ({"kvmmem": 2}, "format version"),
    ({"arch": "sparc"}, "architecture"),
    ({"steps": [{"guest_read": {"gpa": 0, "size": 3}}]}, "access size"),
    ({"steps": [{"guest_read": {"size": 4}, "guest_write": {"size": 4, "value": 1}}]},
     "two step kinds"),
    ({"steps": [{"guest_raed": {"size": 4}}]}, "unknown step"),
    ({"steps": [{"host_munmap": {}}]}, "required key"),
    ({"steps": [{"guest_read": {"size": 4}, "expect": {"reslut": "ok"}}]}, "unknown outcome key"),
    ({"memory": {"ram": {"size": "2M", "kind": "anon", "prot": "rwr"}}}, "protection"),
    ({"threads": {"a": [{"guest_read": {"size": 4}}]}}, "steps and threads"),
])
def test_schema_rejects_what_the_loader_rejects(change: dict[str, Any], why: str) -> None:
    v = validator()
    assert not list(v.iter_errors(GOOD))
    assert list(v.iter_errors({**GOOD, **change})), why
