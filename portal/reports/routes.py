"""Report pages and FHIR R4: the report PDF of a study, ``POST /fhir/DiagnosticReport`` from a
RIS, and read-only ``GET /fhir/DiagnosticReport`` and ``GET /fhir/ImagingStudy`` for what the
caller may see. Access is decided by ``portal.access.policy``; release by ``service``."""

from __future__ import annotations

import json
import re
from typing import Any

from flask import (
    Blueprint,
    Flask,
    Response,
    abort,
    current_app,
    render_template,
    request,
    url_for,
)
from werkzeug.exceptions import RequestEntityTooLarge

from portal import audit
from portal.access import policy
from portal.access.principal import Principal, current_principal
from portal.archive import current_archive
from portal.db import db
from portal.index.models import Patient, Study
from portal.reports import dicom, fhir
from portal.reports.models import Report
from portal.reports.notify import notifier
from portal.reports.pdf import report_pdf
from portal.reports.service import (
    IdentityMismatch,
    ReportError,
    effective_statuses,
    mark_read,
    orders_for,
    readable_reports,
    receive_report,
    record_identity_alert,
    study_of_report,
    unread_views,
)
from portal.security import read_body

bp = Blueprint("reports", __name__)

FHIR_JSON = "application/fhir+json"
MAX_FHIR_BYTES = 30 << 20


def _principal() -> Principal:
    principal = current_principal()
    assert principal is not None
    return principal


def _download_name(report: Report) -> str:
    """A server-made file name: letters, digits and dashes only (RFC 6266 safe)."""
    label = re.sub(r"[^A-Za-z0-9-]+", "-", report.accession_number or str(report.id))
    return f"report-{label.strip('-')[:40] or report.id}.pdf"


@bp.get("/studies/<study_uid>/reports/<int:report_id>.pdf")
def report_pdf_view(study_uid: str, report_id: int) -> Response:
    """The report as PDF: the original when the RIS sent one, else one made from the text."""
    principal = _principal()
    study = policy.require_study(db.session, principal, study_uid)
    views = [v for v in _readable(principal, study)
             if v.report.id == report_id]
    if not views:
        policy.deny(principal, "report", study_uid, reason="no such report")
    report = views[0].report
    audit.record(db, audit.EXPORT, action="R", outcome=audit.OUTCOME_SUCCESS,
                 who=principal.audit_name, source_address=request.remote_addr or "",
                 study_instance_uid=study.study_instance_uid,
                 patient_id=study.patient.patient_id, details={"report": report.id})
    body = report.pdf or report_pdf(report, study)
    # Inline: a phone opens it in its PDF viewer instead of a download (issue 13 item 6).
    # Never HTML, and sandboxed, so a PDF's own scripts or links reach nothing of the portal.
    return Response(body, mimetype="application/pdf", headers={
        "Content-Disposition": f'inline; filename="{_download_name(report)}"',
        "X-Content-Type-Options": "nosniff", "Content-Security-Policy": "sandbox",
        "Cache-Control": "private, no-store"})


def init_app(app: Flask) -> None:
    """Templates get ``reports_of(study)``: the reports the current viewer may read."""

    @app.template_global("reports_of")
    def _reports_of(study: Study) -> list[Any]:
        principal = current_principal()
        if principal is None:
            return []
        views = _readable(principal, study)
        final = [v for v in views if v.report.status in ("final", "amended")]
        fresh = unread_views(db.session, principal, final)  # write only when news were read
        if fresh:
            with db.write_transaction() as session:
                mark_read(session, principal, fresh)
        return views


def _readable(principal: Principal, study: Study, include_cancelled: bool = False) -> list[Any]:
    """The reports this principal may read, after turning any new SR or PDF objects of the
    study into reports."""
    pending = dicom.pending_report_objects(db.session, study)
    if not pending:
        return readable_reports(db.session, principal, study, include_cancelled)
    with db.write_transaction() as session:
        dicom.import_report_objects(session, pending, current_archive().read)
    # The request's own transaction may predate the import (SQLite snapshots): read afresh.
    with db.new_session() as session:
        return readable_reports(session, principal, session.merge(study, load=False),
                                include_cancelled)


@bp.get("/orders")
def order_list() -> str:
    """The physician's (or practice's) imaging orders with appointment and status."""
    principal = _principal()
    if principal.kind != "user":
        abort(404)
    orders = orders_for(db.session, principal)
    rows = list(zip(orders, effective_statuses(db.session, orders), strict=True))
    _audit_query(principal, {"orders": len(rows)})
    return render_template("reports/orders.html", rows=rows)


def _audit_query(principal: Principal, details: dict[str, Any]) -> None:
    """A 110112 query record for a list of patient data (orders, FHIR searches)."""
    audit.record(db, audit.QUERY, action="E", outcome=audit.OUTCOME_SUCCESS,
                 who=principal.audit_name, source_address=request.remote_addr or "",
                 details=details)


# -- FHIR R4 ---------------------------------------------------------------------------------

def _outcome(status: int, text: str, code: str = "invalid") -> Response:
    body = {"resourceType": "OperationOutcome",
            "issue": [{"severity": "error", "code": code, "diagnostics": text}]}
    return Response(json.dumps(body), status=status, mimetype=FHIR_JSON)


@bp.post("/fhir/DiagnosticReport")
def fhir_create_report() -> Response:
    """Receive a DiagnosticReport (JSON) from a RIS: machine clients with the store right or
    people and services with the report_sender role."""
    principal = _principal()
    if not (principal.can_store or principal.has_role("report_sender")):
        return _outcome(403, "this caller may not send reports", "forbidden")
    mimetype = (request.mimetype or "").lower()
    if mimetype not in (FHIR_JSON, "application/json"):
        return _outcome(415, "send application/fhir+json")
    try:
        raw = read_body(MAX_FHIR_BYTES)
    except RequestEntityTooLarge:
        return _outcome(413, "the resource is larger than 30 MB", "too-costly")
    try:
        resource = current_app.json.loads(raw)
        incoming = fhir.report_from_resource(resource)
        with db.write_transaction() as session:
            report, newly_final = receive_report(session, incoming)
            report_id = report.id
            location = url_for("reports.fhir_read_report", report_id=report_id,
                               _external=True)
            answer = fhir.report_resource(report, location)
    except (ValueError, ReportError) as exc:
        if isinstance(exc, IdentityMismatch):  # rolled back; the alert has its own transaction
            record_identity_alert(db, exc, who=principal.audit_name, via="fhir",
                                  source_address=request.remote_addr or "")
        return _outcome(422 if isinstance(exc, ReportError) else 400, str(exc)[:500])
    audit.record(db, audit.INSTANCES_TRANSFERRED, action="C", outcome=audit.OUTCOME_SUCCESS,
                 who=principal.audit_name, source_address=request.remote_addr or "",
                 study_instance_uid=incoming.study_instance_uid,
                 patient_id=incoming.patient_id, details={"report": report_id, "via": "fhir"})
    if newly_final:
        notifier(current_app._get_current_object())(report_id)  # type: ignore[attr-defined]
    return Response(json.dumps(answer), status=201, mimetype=FHIR_JSON,
                    headers={"Location": location})


def _visible_studies(principal: Principal) -> Any:
    stmt = policy.visible_studies(principal).join(Study.patient)
    patient = request.args.get("patient", "") or request.args.get("subject", "")
    if patient:
        stmt = stmt.where(Patient.patient_id == patient.removeprefix("Patient/")[:64])
    uid = request.args.get("study", "") or request.args.get("_id", "")
    if uid:
        stmt = stmt.where(Study.study_instance_uid == uid.removeprefix("ImagingStudy/")[:64])
    try:
        count = max(1, min(int(request.args.get("_count", "50")), 200))
    except ValueError:
        abort(400, "_count is a number")
    return stmt.order_by(Study.study_date.desc(), Study.id.desc()).limit(count)


@bp.get("/fhir/DiagnosticReport")
def fhir_search_reports() -> Response:
    """Reports of the studies the caller may see, as released to this caller."""
    principal = _principal()
    entries = []
    for study in db.session.scalars(_visible_studies(principal)):
        for view in _readable(principal, study, include_cancelled=True):
            location = url_for("reports.fhir_read_report", report_id=view.report.id,
                               _external=True)
            entries.append(fhir.report_resource(view.report, location, study))
    _audit_query(principal, {"resource": "DiagnosticReport", "results": len(entries)})
    return Response(json.dumps(fhir.bundle(entries)), mimetype=FHIR_JSON)


@bp.get("/fhir/DiagnosticReport/<int:report_id>")
def fhir_read_report(report_id: int) -> Response:
    """One report, when the caller may read it (404 otherwise, as for a missing one)."""
    principal = _principal()
    report = db.session.get(Report, report_id)
    study = study_of_report(db.session, report) if report is not None else None
    if study is not None and db.session.scalars(policy.visible_studies(principal).where(
            Study.id == study.id)).first() is not None:
        for view in _readable(principal, study, include_cancelled=True):
            if view.report.id == report_id:
                location = url_for("reports.fhir_read_report", report_id=report_id,
                                   _external=True)
                audit.record(db, audit.INSTANCES_ACCESSED, action="R",
                             outcome=audit.OUTCOME_SUCCESS, who=principal.audit_name,
                             source_address=request.remote_addr or "",
                             study_instance_uid=study.study_instance_uid,
                             patient_id=study.patient.patient_id,
                             details={"report": report_id, "via": "fhir"})
                return Response(json.dumps(fhir.report_resource(view.report, location, study)),
                                mimetype=FHIR_JSON)
    policy.record_refusal(principal, "report")
    return _outcome(404, "no such DiagnosticReport", "not-found")


@bp.get("/fhir/ImagingStudy")
def fhir_search_studies() -> Response:
    """The studies the caller may see, as FHIR ImagingStudy resources."""
    principal = _principal()
    entries = [fhir.imaging_study(study, url_for("dicomweb.search_studies", _external=True))
               for study in db.session.scalars(_visible_studies(principal))]
    _audit_query(principal, {"resource": "ImagingStudy", "results": len(entries)})
    return Response(json.dumps(fhir.bundle(entries)), mimetype=FHIR_JSON)
