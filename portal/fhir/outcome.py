"""OperationOutcome: the body of every error answer under ``/fhir`` (FHIR R4 http.html)."""

from __future__ import annotations

import json
from typing import Any

FHIR_JSON = "application/fhir+json"

# HTTP status -> IssueType (http://hl7.org/fhir/R4/valueset-issue-type.html).
ISSUE_CODES = {400: "invalid", 401: "login", 403: "forbidden", 404: "not-found",
               405: "not-supported", 406: "not-supported", 410: "deleted",
               413: "too-costly", 415: "not-supported", 422: "processing", 429: "throttled",
               500: "exception", 503: "transient"}


def is_fhir_path(path: str) -> bool:
    """True for ``/fhir`` and everything under it."""
    return path == "/fhir" or path.startswith("/fhir/")


def issue(text: str, *, severity: str = "error", code: str = "invalid") -> dict[str, Any]:
    """One OperationOutcome issue with a human-readable ``diagnostics``."""
    return {"severity": severity, "code": code, "diagnostics": text[:500]}


def outcome(*issues: dict[str, Any]) -> dict[str, Any]:
    """An OperationOutcome resource."""
    return {"resourceType": "OperationOutcome", "issue": list(issues)}


def error_body(status: int, text: str) -> str:
    """The JSON text of an OperationOutcome for an error answer of this status."""
    code = ISSUE_CODES.get(status, "processing" if status < 500 else "exception")
    return json.dumps(outcome(issue(text, code=code)))
