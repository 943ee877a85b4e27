"""docs/conformance/fhir.md against the code: its resource and search parameter tables are
exactly what ``GET /fhir/metadata`` (generated from the handlers' own table) declares."""

from __future__ import annotations

from pathlib import Path

from fhir.resources.R4B.capabilitystatement import CapabilityStatement
from flask.testing import FlaskClient

DOC = Path(__file__).resolve().parents[2] / "docs" / "conformance" / "fhir.md"


def _table(heading: str) -> list[list[str]]:
    """The rows (cells) of the first table after a ``## heading``."""
    text = DOC.read_text(encoding="utf-8")
    section = text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[2:]]


def test_the_documented_tables_are_the_capability_statement(client: FlaskClient) -> None:
    answer = client.get("/fhir/metadata")
    assert answer.status_code == 200
    statement = CapabilityStatement.model_validate(answer.get_json())
    assert statement.fhirVersion == "4.0.1"
    resources = statement.rest[0].resource
    declared = {r.type: ", ".join(i.code for i in r.interaction) for r in resources}
    assert dict((row[0], row[1]) for row in _table("Resources and interactions")) == declared
    params = [(r.type, p.name, p.type) for r in resources for p in r.searchParam]
    assert [tuple(row) for row in _table("Search parameters")] == params
