"""Report pages: the report PDF of a study, the physician's orders, and ``reports_of`` for
the study page (FHIR R4 is ``portal.fhir``). Access is decided by ``portal.access.policy``;
release by ``service``."""

from __future__ import annotations

import re
from typing import Any

from flask import (
    Blueprint,
    Flask,
    Response,
    abort,
    render_template,
    request,
)

from portal import audit
from portal.access import policy
from portal.access.principal import Principal, current_principal
from portal.db import db
from portal.index.models import Study
from portal.reports.models import Report
from portal.reports.pdf import report_pdf
from portal.reports.service import (
    effective_statuses,
    orders_for,
    readable_reports,
)

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
@policy.share_visible
@policy.download
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
    """Templates get ``reports_of(study)``: the reports the current viewer may read. It only
    reads: the handler of a page that shows reports marks them read
    (``service.mark_shown_read``) in its unit of work, and SR and PDF objects became reports
    at ingest (``reports.dicom.after_ingest``)."""

    @app.template_global("reports_of")
    def _reports_of(study: Study) -> list[Any]:
        principal = current_principal()
        if principal is None:
            return []
        return _readable(principal, study)


def _readable(principal: Principal, study: Study, include_cancelled: bool = False) -> list[Any]:
    """The reports this principal may read."""
    return readable_reports(db.session, principal, study, include_cancelled)


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
