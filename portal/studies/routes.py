"""The start page, the study list and a plain study page (the viewer issue makes them rich)."""

from __future__ import annotations

import re

from flask import Blueprint, abort, current_app, render_template, request

from portal.access import audit
from portal.access.policy import public, require_study
from portal.access.principal import Principal, current_principal
from portal.db import db
from portal.studies.service import StudySearch, search_studies, study_series

bp = Blueprint("studies", __name__)

_DATE = re.compile(r"^\d{4}-?\d{2}-?\d{2}$")


def _principal() -> Principal:
    principal = current_principal()
    assert principal is not None
    return principal


@bp.get("/")
@public
def home() -> str:
    """Front page: sign in, or go to the studies when signed in. Shows no patient data."""
    principal = current_principal()
    signed_in = principal is not None and principal.kind == "user"
    return render_template("studies/home.html", signed_in=signed_in,
                           sign_in_configured=bool(current_app.config["PORTAL"]["OIDC_ISSUER"]))


@bp.get("/studies")
def study_list() -> str:
    """The studies this person may see, newest first, with search."""
    principal = _principal()
    args = request.args
    dates = [args.get("from", ""), args.get("to", "")]
    if any(d and not _DATE.match(d) for d in dates):
        abort(400, "dates are written YYYY-MM-DD")
    try:
        page = max(1, min(int(args.get("page", "1")), 10_000))
    except ValueError:
        abort(400, "page must be a number")
    search = StudySearch(text=args.get("q", "")[:64], date_from=dates[0], date_to=dates[1],
                         modality=args.get("modality", "")[:16], page=page)
    rows, more = search_studies(db.session, principal, search)
    audit.record(db, audit.QUERY, action="E", outcome=audit.OUTCOME_SUCCESS,
                 who=principal.audit_name, source_address=request.remote_addr or "",
                 details={"results": len(rows), "page": page})
    return render_template("studies/list.html", rows=rows, search=search, more=more,
                           principal=principal)


@bp.get("/studies/<study_uid>")
def study_page(study_uid: str) -> str:
    """One study: patient, study details and series."""
    principal = _principal()
    study = require_study(db.session, principal, study_uid)
    audit.record(db, audit.INSTANCES_ACCESSED, action="R", outcome=audit.OUTCOME_SUCCESS,
                 who=principal.audit_name, source_address=request.remote_addr or "",
                 study_instance_uid=study.study_instance_uid,
                 patient_id=study.patient.patient_id, details={"view": "study page"})
    return render_template("studies/study.html", study=study,
                           series=study_series(db.session, study), principal=principal)
