"""A signed-in patient's own pages: his scans, his final reports, his appointments (from the
RIS's SIU messages), who opened his images, and the links he shared with a doctor.

What he may see is decided by ``portal.access.policy`` (his linked patient records); these
pages only choose plain words for it: no modality codes, accession numbers or DICOM terms.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from flask import Blueprint, abort, redirect, render_template, request, url_for
from flask_babel import lazy_gettext as _l
from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload
from werkzeug.wrappers import Response as BaseResponse

from portal import audit
from portal.access.models import AuditEvent, User
from portal.access.policy import (
    is_patient_user,
    own_orders_condition,
    readable_audit_condition,
    visible_studies,
)
from portal.access.principal import Principal, current_principal
from portal.db import db, utcnow
from portal.index.models import Order, Study
from portal.reports.service import effective_statuses, mark_shown_read
from portal.sharing import service as sharing
from portal.sharing.models import ShareLink, link_state

bp = Blueprint("patients", __name__)

# Modality codes (PS3.3 C.7.3.1.1.1) in the words a patient uses; the first known code of a
# study names it. Report and annotation objects (SR, KO, PR, DOC) name nothing.
SCAN_WORDS = {"CT": _l("CT scan"), "MR": _l("MRI scan"), "CR": _l("X-ray"),
              "DX": _l("X-ray"), "DR": _l("X-ray"), "US": _l("Ultrasound"),
              "MG": _l("Mammogram"), "PT": _l("PET scan"), "NM": _l("Nuclear scan"),
              "XA": _l("Angiogram"), "RF": _l("Fluoroscopy"), "IO": _l("Dental X-ray"),
              "PX": _l("Dental X-ray"), "OP": _l("Eye scan"), "OPT": _l("Eye scan"),
              "ES": _l("Endoscopy"), "SM": _l("Microscope slide"),
              "BMD": _l("Bone density scan"), "ECG": _l("Heart tracing")}


@bp.app_template_filter("plain_scan")
def plain_scan(modalities: str | None) -> str:
    """"CT\\SR" -> "CT scan": what kind of scan, in plain words ("Scan" when unknown)."""
    for code in (modalities or "").upper().replace("/", "\\").split("\\"):
        if code.strip() in SCAN_WORDS:
            return str(SCAN_WORDS[code.strip()])
    return str(_l("Scan"))


@bp.app_template_global("patient_pages")
def patient_pages() -> bool:
    """True when the reader is a signed-in patient (templates then use plain words)."""
    return is_patient_user(current_principal())


def _patient() -> Principal:
    """The signed-in patient; these pages do not exist for anyone else."""
    principal = current_principal()
    if not is_patient_user(principal):
        abort(404)
    assert principal is not None
    return principal


# -- queries -------------------------------------------------------------------------------

def own_studies(session: Session, principal: Principal, limit: int = 200) -> list[Study]:
    """The studies this patient may see, newest first."""
    return list(session.scalars(
        visible_studies(principal).options(selectinload(Study.patient))
        .order_by(Study.study_date.desc(), Study.study_time.desc(), Study.id.desc())
        .limit(limit)))


@dataclass(frozen=True)
class Appointment:
    """An order or appointment of the patient's, as he is told it."""

    what: str
    when: datetime | None
    where: str
    status: str
    upcoming: bool


def appointments(session: Session, principal: Principal, limit: int = 100) -> list[Appointment]:
    """The patient's appointments and orders: upcoming ones first (soonest first), then the
    rest, newest first."""
    orders = list(session.scalars(select(Order).where(own_orders_condition(principal))
                                  .order_by(Order.updated_at.desc(), Order.id.desc())
                                  .limit(limit)))
    now = utcnow()
    rows = [Appointment(what=order.procedure or plain_scan(order.modality),
                        when=order.scheduled_at, where=order.location, status=status,
                        upcoming=status == "scheduled" and order.scheduled_at is not None
                        and order.scheduled_at >= now)
            for order, status in zip(orders, effective_statuses(session, orders), strict=True)]
    upcoming = sorted((r for r in rows if r.upcoming), key=lambda r: r.when or now)
    return upcoming + [r for r in rows if not r.upcoming]


@dataclass(frozen=True)
class Opening:
    """One time someone opened (or tried to open) the patient's images."""

    at: datetime
    who: str
    what: str
    scan: str
    refused: bool


def _what(event: AuditEvent) -> str:
    if event.event_id == audit.USER_AUTHENTICATION[0]:
        return str(_l("opened a link to your images"))
    if event.event_id == audit.INSTANCES_TRANSFERRED[0] and event.action == "C":
        return str(_l("added images"))
    if event.event_id in (audit.INSTANCES_TRANSFERRED[0], audit.EXPORT[0]):
        return str(_l("downloaded your images or report"))
    return str(_l("looked at your images"))


def image_openings(session: Session, principal: Principal,
                   limit: int = 200) -> list[Opening]:
    """Who opened this patient's images, newest first, from the audit trail (the policy lets
    him read only records about his own studies). His own visits are left out; people are
    named, never located."""
    events = list(session.scalars(
        select(AuditEvent).where(readable_audit_condition(principal),
                                 AuditEvent.who != principal.audit_name,
                                 AuditEvent.event_id.in_((audit.INSTANCES_ACCESSED[0],
                                                          audit.INSTANCES_TRANSFERRED[0],
                                                          audit.EXPORT[0],
                                                          audit.USER_AUTHENTICATION[0])))
        .order_by(AuditEvent.id.desc()).limit(limit)))
    people = _people(session, {e.who for e in events if e.who.startswith("user:")})
    own_links = set(session.scalars(select(ShareLink.public_id).where(
        ShareLink.created_by_fk == principal.id)))
    scans = dict(session.execute(select(Study.study_instance_uid, Study.modalities_in_study)
                                 .where(Study.study_instance_uid.in_(
                                     {e.study_instance_uid for e in events}))).all())
    return [Opening(at=e.occurred_at, who=_who(e.who, people, own_links), what=_what(e),
                    scan=plain_scan(scans.get(e.study_instance_uid, "")),
                    refused=e.outcome != audit.OUTCOME_SUCCESS) for e in events]


def _people(session: Session, keys: set[str]) -> dict[str, str]:
    """Display names of the portal users these audit names stand for."""
    subjects = sorted({key.partition("|")[2] for key in keys})
    names: dict[str, str] = {}
    for user in session.scalars(select(User).where(User.subject.in_(subjects))):
        key = f"user:{user.issuer}|{user.subject}"
        if key in keys:
            names[key] = user.display_name or "Someone at the hospital"
    return names


def _who(who: str, people: dict[str, str], own_links: set[str]) -> str:
    if who.startswith("user:"):
        return people.get(who, "Someone at the hospital")
    if who.startswith("share:"):
        if who.removeprefix("share:") in own_links:
            return "The doctor you shared your images with"
        return "Someone with a link your doctor shared"
    if who.startswith("machine:"):
        return "The hospital's imaging system"
    return "Someone"


def own_links(session: Session, principal: Principal) -> list[ShareLink]:
    """The links this patient made, newest first."""
    return sharing.list_links(session, principal, limit=200)


# -- pages -----------------------------------------------------------------------------------

def _audit_query(principal: Principal, what: str, results: int) -> None:
    audit.record(db, audit.QUERY, action="E", outcome=audit.OUTCOME_SUCCESS,
                 who=principal.audit_name, source_address=request.remote_addr or "",
                 details={"page": what, "results": results})


def scans_page(principal: Principal) -> str:
    """The patient's scans (what /studies shows him instead of the search)."""
    studies = own_studies(db.session, principal)
    _audit_query(principal, "my scans", len(studies))
    return render_template("patients/studies.html", studies=studies)


@bp.get("/my/reports")
def reports() -> str:
    """The patient's reports that have been released to him (final ones only)."""
    principal = _patient()
    studies = own_studies(db.session, principal)
    _audit_query(principal, "my reports", len(studies))
    mark_shown_read(db.session, principal, studies)
    return render_template("patients/reports.html", studies=studies)


@bp.get("/my/appointments")
def appointment_list() -> str:
    """The patient's appointments (from the RIS's SIU messages) and orders."""
    principal = _patient()
    rows = appointments(db.session, principal)
    _audit_query(principal, "my appointments", len(rows))
    return render_template("patients/appointments.html", rows=rows)


@bp.get("/my/openings")
def openings() -> str:
    """Who opened my images: every view and download of them by someone else."""
    principal = _patient()
    rows = image_openings(db.session, principal)
    audit.record(db, audit.AUDIT_LOG_USED, action="R", outcome=audit.OUTCOME_SUCCESS,
                 who=principal.audit_name, source_address=request.remote_addr or "",
                 details={"page": "who opened my images", "results": len(rows)})
    return render_template("patients/openings.html", rows=rows)


@bp.get("/my/links")
def links() -> str:
    """The links I made for a doctor: their state, and a button to end each."""
    principal = _patient()
    return render_template("patients/links.html", links=own_links(db.session, principal),
                           now=utcnow(), state=link_state)


@bp.get("/my")
def my_home() -> BaseResponse:
    """The patient's start: his scans."""
    _patient()
    return redirect(url_for("studies.study_list"))

