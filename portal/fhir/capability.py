"""The CapabilityStatement (``GET /fhir/metadata``), generated from ``catalogue.KINDS``: the
resources, interactions and search parameters it lists are those the handlers implement."""

from __future__ import annotations

from typing import Any

from portal.fhir.catalogue import KINDS
from portal.fhir.outcome import FHIR_JSON
from portal.fhir.search import COUNT, FORMAT, OFFSET

FHIR_VERSION = "4.0.1"
PUBLISHED = "2026-12-06"  # when this statement's content last changed


def capability_statement(fhir_base: str) -> dict[str, Any]:
    """What this server does, as a FHIR R4 CapabilityStatement (kind ``instance``)."""
    return {
        "resourceType": "CapabilityStatement", "status": "active", "date": PUBLISHED,
        "publisher": "referrer-portal", "kind": "instance", "fhirVersion": FHIR_VERSION,
        "format": [FHIR_JSON, "json"],
        "software": {"name": "referrer-portal"},
        "implementation": {"description": "Cloud PACS referrer portal", "url": fhir_base},
        "rest": [{
            "mode": "server",
            "documentation": (
                f"Searches page with {COUNT} (at most 200, default 50; 0 gives the total "
                f"only) and {OFFSET}; {FORMAT} accepts JSON only. A parameter not listed "
                "for a resource is refused with 400 and an OperationOutcome, or ignored "
                "(and said so in the Bundle) with Prefer: handling=lenient."),
            "security": {
                "service": [{"coding": [{
                    "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                    "code": code}]} for code in ("Basic", "OAuth")],
                "description": "A registered client's credentials (HTTP Basic), a bearer "
                               "token, or the portal's signed-in session; each caller sees "
                               "only what the portal's access rules let it see."},
            "resource": [{
                "type": kind.name, "documentation": kind.documentation,
                "interaction": [{"code": code} for code in kind.interactions],
                "searchParam": [{"name": p.name, "type": p.type,
                                 "documentation": p.documentation}
                                for p in kind.params.values()],
            } for kind in KINDS.values()],
        }],
    }
