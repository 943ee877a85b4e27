"""FHIR R4 routes under ``/fhir``: the CapabilityStatement, ``POST /fhir/DiagnosticReport`` from
a RIS, and read and search of every resource in ``catalogue.KINDS`` for what the caller may
see. Every error answer is an OperationOutcome (``portal.errors`` for those raised before a
view runs). Access is decided by ``portal.access.policy`` (docs/security.md 3)."""

from __future__ import annotations

import json
import uuid
from typing import Any
from urllib.parse import urlencode
from zoneinfo import ZoneInfo

from flask import Blueprint, Response, current_app, request, url_for
from pydantic import ValidationError
from sqlalchemy import func, select
from werkzeug.exceptions import NotAcceptable, RequestEntityTooLarge

from portal import audit
from portal.access import policy
from portal.access.principal import Principal, current_principal
from portal.db import db
from portal.fhir import resources
from portal.fhir.capability import capability_statement
from portal.fhir.catalogue import KINDS, Kind, Links
from portal.fhir.outcome import FHIR_JSON, issue, outcome
from portal.fhir.search import COUNT, OFFSET, Query, SearchError, parse
from portal.reports.notify import notifier
from portal.reports.service import (
    IdentityMismatch,
    receive_report,
    record_identity_alert,
)
from portal.security import read_body

bp = Blueprint("fhir", __name__, url_prefix="/fhir")

MAX_FHIR_BYTES = 30 << 20
# How the audit trail names a refused read (a report is a "report" wherever it was asked).
REFUSED_AS = {"DiagnosticReport": "report"}


def _principal() -> Principal:
    principal = current_principal()
    assert principal is not None
    return principal


def _json(body: dict[str, Any], status: int = 200, **headers: str) -> Response:
    return Response(json.dumps(body), status=status, mimetype=FHIR_JSON, headers=headers)


def _error(status: int, text: str, code: str = "invalid") -> Response:
    return _json(outcome(issue(text, code=code)), status)


def _links() -> Links:
    return Links(fhir_base=url_for("fhir.metadata", _external=True).rsplit("/", 1)[0],
                 dicomweb_base=url_for("dicomweb.search_studies", _external=True)
                 .rsplit("/", 1)[0])


@bp.before_request
def _speaks_json() -> None:
    """406 for a client that accepts no JSON (this server has no XML)."""
    if request.headers.get("Accept", "").strip() and \
            request.accept_mimetypes.best_match([FHIR_JSON, "application/json"]) is None:
        raise NotAcceptable("this server answers application/fhir+json only")


def _audit_query(principal: Principal, details: dict[str, Any]) -> None:
    """A 110112 query record for a search of patient data."""
    audit.record(db, audit.QUERY, action="E", outcome=audit.OUTCOME_SUCCESS,
                 who=principal.audit_name, source_address=request.remote_addr or "",
                 details=details)


@bp.get("/metadata")
@policy.public
def metadata() -> Response:
    """The CapabilityStatement, generated from the table the handlers search with."""
    return _json(capability_statement(_links().fhir_base))


@bp.post("/DiagnosticReport")
def create_report() -> Response:
    """Receive a DiagnosticReport (JSON) from a RIS: machine clients with the store right or
    people and services with the report_sender role. It must be a valid R4 resource
    (``fhir.resources``): else 422 and nothing is stored."""
    from fhir.resources.R4B.diagnosticreport import DiagnosticReport  # heavy: on first use

    principal = _principal()
    if not (principal.can_store or principal.has_role("report_sender")):
        return _error(403, "this caller may not send reports", "forbidden")
    if (request.mimetype or "").lower() not in (FHIR_JSON, "application/json"):
        return _error(415, "send application/fhir+json", "not-supported")
    try:
        raw = read_body(MAX_FHIR_BYTES)
    except RequestEntityTooLarge:
        return _error(413, "the resource is larger than 30 MB", "too-costly")
    try:
        resource = current_app.json.loads(bytes(raw))
    except (ValueError, RecursionError):
        return _error(400, "the body is not JSON", "structure")
    if not isinstance(resource, dict) or resource.get("resourceType") != "DiagnosticReport":
        return _error(400, "the body is not a FHIR DiagnosticReport", "structure")
    try:
        DiagnosticReport.model_validate(resource)
    except (ValidationError, ValueError, TypeError) as exc:
        return _error(422, f"not a valid R4 DiagnosticReport: {_validation_text(exc)}",
                      "processing")
    try:
        incoming = resources.report_from_resource(
            resource, ZoneInfo(current_app.config["PORTAL"]["TIMEZONE"]))
        # In the request's unit of work (portal/db.py), with its audit record.
        report, newly_final = receive_report(db.session, incoming)
        report_id = report.id
        location = url_for("fhir.read", resource_type="DiagnosticReport",
                           resource_id=str(report_id), _external=True)
        answer = resources.report_resource(report, location)
    except ValueError as exc:  # ReportError too: a resource the portal cannot take as sent
        db.session.rollback()
        if isinstance(exc, IdentityMismatch):  # the alert has its own transaction
            record_identity_alert(db, exc, who=principal.audit_name, via="fhir",
                                  source_address=request.remote_addr or "")
        return _error(422, str(exc)[:500], "processing")
    audit.append(db.session, audit.INSTANCES_TRANSFERRED, action="C",
                 outcome=audit.OUTCOME_SUCCESS,
                 who=principal.audit_name, source_address=request.remote_addr or "",
                 study_instance_uid=incoming.study_instance_uid,
                 patient_id=incoming.patient_id, details={"report": report_id, "via": "fhir"})
    if newly_final:  # the notice reads the report: once it is committed
        notify = notifier(current_app._get_current_object())  # type: ignore[attr-defined]
        db.after_commit(lambda: notify(report_id))
    return _json(answer, 201, Location=location)


def _validation_text(exc: Exception) -> str:
    """What pydantic found, as "field: message; ..." (no input values echoed)."""
    if isinstance(exc, ValidationError):
        return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'resource'}: {e['msg']}"
                         for e in exc.errors(include_input=False)[:5])[:400]
    return str(exc)[:400]


def _kind(resource_type: str) -> Kind:
    return KINDS[resource_type]


def search(resource_type: str) -> Response:
    """A search (GET with parameters): a searchset Bundle, paged with self/next/previous."""
    principal = _principal()
    kind = _kind(resource_type)
    lenient = "handling=lenient" in request.headers.get("Prefer", "").replace(" ", "").lower()
    try:
        query = parse(kind.params, list(request.args.items(multi=True)), lenient=lenient)
    except SearchError as exc:
        return _error(400, str(exc), "not-supported" if "unknown" in str(exc)
                      or "not supported" in str(exc) else "invalid")
    links = _links()
    stmt = kind.base(principal).where(*query.conditions)
    if query.keeps or kind.drops_rows(principal):  # filter what is emitted, then page
        found = [r for r in kind.emit(db.session, principal, db.session.scalars(stmt).all(),
                                      links) if all(keep(r) for keep in query.keeps)]
        total = len(found)
        page = found[query.offset:query.offset + query.count]
    else:
        total = db.session.scalar(select(func.count()).select_from(stmt.subquery())) or 0
        rows = db.session.scalars(stmt.offset(query.offset).limit(query.count)).all() \
            if query.count else []
        page = kind.emit(db.session, principal, rows, links)
    _audit_query(principal, {"resource": kind.name, "results": len(page)})
    return _json(_bundle(kind, query, page, total, links))


def _page_url(kind: Kind, query: Query, offset: int) -> str:
    pairs = [*query.used, (COUNT, str(query.count)), (OFFSET, str(offset))]
    return f"{url_for('fhir.search', resource_type=kind.name, _external=True)}?" \
           f"{urlencode(pairs)}"


def _bundle(kind: Kind, query: Query, page: list[dict[str, Any]], total: int,
            links: Links) -> dict[str, Any]:
    """A searchset Bundle: total, self/first/next/previous links, each entry with its
    fullUrl and search mode; ignored parameters (lenient handling) in an outcome entry."""
    link = [{"relation": "self", "url": _page_url(kind, query, query.offset)},
            {"relation": "first", "url": _page_url(kind, query, 0)}]
    if query.count and query.offset + query.count < total:
        link.append({"relation": "next", "url": _page_url(kind, query,
                                                          query.offset + query.count)})
    if query.offset > 0 and query.count:
        link.append({"relation": "previous",
                     "url": _page_url(kind, query, max(0, query.offset - query.count))})
    entries: list[dict[str, Any]] = [
        {"fullUrl": f"{links.fhir_base}/{kind.name}/{r['id']}", "resource": r,
         "search": {"mode": "match"}} for r in page]
    if query.ignored:
        entries.append({"fullUrl": f"urn:uuid:{uuid.uuid4()}",
                        "resource": outcome(*(issue(f"ignored: {text}", severity="warning",
                                                    code="not-supported")
                                              for text in query.ignored)),
                        "search": {"mode": "outcome"}})
    return {"resourceType": "Bundle", "type": "searchset", "total": total, "link": link,
            "entry": entries}


def read(resource_type: str, resource_id: str) -> Response:
    """One resource, when the caller may see it (404 otherwise, as for a missing one)."""
    principal = _principal()
    kind = _kind(resource_type)
    try:  # a read takes no search parameters; _format must still ask for JSON
        parse({}, list(request.args.items(multi=True)), lenient=False)
    except SearchError as exc:
        return _error(400, f"a read takes no search parameters: {exc}")
    rows = db.session.scalars(kind.base(principal).where(kind.by_id(resource_id))
                              .limit(1)).all()
    found = kind.emit(db.session, principal, rows, _links()) if rows else []
    if not found:
        policy.record_refusal(principal, REFUSED_AS.get(kind.name, kind.name.lower()))
        return _error(404, f"no such {kind.name}", "not-found")
    resource = found[0]
    study = resource_id if kind.name == "ImagingStudy" else str(
        resource.get("imagingStudy", [{}])[0].get("reference", "")).removeprefix(
            "ImagingStudy/")
    audit.record(db, audit.INSTANCES_ACCESSED, action="R", outcome=audit.OUTCOME_SUCCESS,
                 who=principal.audit_name, source_address=request.remote_addr or "",
                 study_instance_uid=study,
                 details={"resource": f"{kind.name}/{resource_id}"[:80], "via": "fhir"})
    return _json(resource)


# One rule per resource type (so every URL is written out in the URL map), two endpoints.
for _name in KINDS:
    bp.add_url_rule(f"/{_name}", "search", search, methods=["GET"],
                    defaults={"resource_type": _name})
    bp.add_url_rule(f"/{_name}/<resource_id>", "read", read, methods=["GET"],
                    defaults={"resource_type": _name})
