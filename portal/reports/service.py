"""Reports and orders: store what arrives (keeping every version), match it to studies, and
decide what each reader may see (release rules).

Every way in (HL7 ORU over MLLP, FHIR DiagnosticReport, DICOM SR, encapsulated PDF) builds
an ``IncomingReport`` and calls ``receive_report``; HL7 ORM/OMI/SIU build an ``IncomingOrder``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from flask import current_app
from sqlalchemy import and_, exists, false, or_, select
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from portal.access.models import ReferrerIdentifier, User
from portal.access.principal import Principal
from portal.db import utcnow
from portal.index.models import Patient, Study, StudyReferrer
from portal.reports.models import (
    ORDER_STATUSES,
    Order,
    ReleaseRule,
    Report,
    ReportRead,
    ReportVersion,
)

MAX_TEXT = 200_000  # characters of one report section
MAX_PDF_BYTES = 20 << 20


class ReportError(ValueError):
    """A report or order that cannot be accepted (the reason is for the sender)."""


@dataclass
class IncomingReport:
    """One received report version, whatever protocol it came by."""

    source: str
    source_id: str
    status: str  # preliminary | final | amended | cancelled
    study_instance_uid: str = ""
    accession_number: str = ""
    patient_id: str = ""
    title: str = ""
    findings: str = ""
    impression: str = ""
    author: str = ""
    signed_at: datetime | None = None
    pdf: bytes | None = None


@dataclass
class IncomingOrder:
    """An order or appointment update from the RIS."""

    placer_order_number: str = ""
    filler_order_number: str = ""
    accession_number: str = ""
    study_instance_uid: str = ""
    patient_id: str = ""
    patient_name: str = ""
    procedure: str = ""
    modality: str = ""
    ordering_provider: str = ""
    ordering_provider_key: str = ""
    status: str | None = None
    scheduled_at: datetime | None = None
    clear_schedule: bool = False
    location: str = ""


def _check(incoming: IncomingReport) -> None:
    if incoming.status not in ("preliminary", "final", "amended", "cancelled"):
        raise ReportError(f"unknown report status {incoming.status!r}")
    if not incoming.source_id:
        raise ReportError("the report has no identifier (order number, accession or id)")
    if not (incoming.study_instance_uid or incoming.accession_number):
        raise ReportError("the report names neither a study instance UID nor an accession "
                          "number")
    if max(len(incoming.findings), len(incoming.impression)) > MAX_TEXT:
        raise ReportError(f"report text is longer than {MAX_TEXT} characters")
    if incoming.pdf is not None and (len(incoming.pdf) > MAX_PDF_BYTES
                                     or not incoming.pdf.startswith(b"%PDF-")):
        raise ReportError("the attachment is not a PDF of at most 20 MB")


def receive_report(session: Session, incoming: IncomingReport) -> tuple[Report, bool]:
    """Store a report version; returns the report and whether it just became readable as
    final (for "report ready" notifications). A repeat of the current version changes nothing.
    """
    _check(incoming)
    report = session.scalars(select(Report).where(
        Report.source == incoming.source, Report.source_id == incoming.source_id[:128])
        .with_for_update()).first()
    now = utcnow()
    status = incoming.status
    if report is None:
        report = Report(source=incoming.source, source_id=incoming.source_id[:128],
                        version=0, status=status, received_at=now)
        session.add(report)
    else:
        same = (report.status == status and report.findings == incoming.findings
                and report.impression == incoming.impression
                and report.author == incoming.author[:324] and report.pdf == incoming.pdf)
        if same:
            return report, False
        if report.final_at is not None and status == "final":
            status = "amended"  # a final report sent again with other content is an amendment
    was_final = report.final_at is not None
    report.status = status
    report.study_instance_uid = incoming.study_instance_uid[:64] or report.study_instance_uid
    report.accession_number = incoming.accession_number[:64] or report.accession_number
    report.patient_id = incoming.patient_id[:64] or report.patient_id
    report.title = incoming.title[:128] or report.title
    report.findings, report.impression = incoming.findings, incoming.impression
    report.author = incoming.author[:324]
    report.signed_at = incoming.signed_at
    if incoming.pdf is not None:
        report.pdf = incoming.pdf
    if status in ("final", "amended") and report.final_at is None:
        report.final_at = now
    report.version += 1
    report.updated_at = now
    session.flush()
    session.add(ReportVersion(report_fk=report.id, version=report.version, status=status,
                              findings=incoming.findings, impression=incoming.impression,
                              author=incoming.author[:324], signed_at=incoming.signed_at,
                              received_at=now))
    session.flush()
    return report, (not was_final and report.final_at is not None) or status == "amended"


def receive_order(session: Session, incoming: IncomingOrder) -> Order:
    """Create or update an order (matched by filler, then placer order number, then
    accession number)."""
    keys = [(Order.filler_order_number, incoming.filler_order_number),
            (Order.placer_order_number, incoming.placer_order_number),
            (Order.accession_number, incoming.accession_number)]
    order = None
    for column, value in keys:
        if value:
            order = session.scalars(select(Order).where(column == value[:64])).first()
            if order is not None:
                break
    if order is None:
        if not any(value for _, value in keys):
            raise ReportError("the order has no order number or accession number")
        order = Order()
        session.add(order)
    for name in ("placer_order_number", "filler_order_number", "accession_number",
                 "study_instance_uid", "patient_id", "patient_name", "procedure", "modality",
                 "ordering_provider", "ordering_provider_key", "location"):
        value = getattr(incoming, name)
        if value:
            limit = Order.__table__.c[name].type.length or 64
            setattr(order, name, value[:limit])
    if incoming.status is not None:
        if incoming.status not in ORDER_STATUSES:
            raise ReportError(f"unknown order status {incoming.status!r}")
        order.status = incoming.status
    if incoming.scheduled_at is not None:
        order.scheduled_at = incoming.scheduled_at
    if incoming.clear_schedule:
        order.scheduled_at = None
    order.updated_at = utcnow()
    session.flush()
    return order


# -- reading --------------------------------------------------------------------------------

def _report_of_study() -> ColumnElement[bool]:
    """SQL: the Report row belongs to the Study row: the same Study Instance UID, or the same
    accession number and patient (and no other study UID). The one rule for matching."""
    # correlate_except: the outer Study row, even two subqueries deep.
    patient_id = select(Patient.patient_id).where(Patient.id == Study.patient_fk) \
        .correlate_except(Patient).scalar_subquery()
    return or_(Report.study_instance_uid == Study.study_instance_uid,
               and_(Study.accession_number != "",
                    Report.accession_number == Study.accession_number,
                    or_(Report.patient_id == "", Report.patient_id == patient_id),
                    or_(Report.study_instance_uid == "",
                        Report.study_instance_uid == Study.study_instance_uid)))


def reports_of(session: Session, study: Study) -> list[Report]:
    """Every report of a study, newest first (a report that came first is found as soon as
    its study is indexed)."""
    return list(session.scalars(select(Report).join(Study, _report_of_study())
                                .where(Study.id == study.id)
                                .order_by(Report.updated_at.desc(), Report.id.desc())))


def study_of_report(session: Session, report: Report) -> Study | None:
    """The indexed study a report belongs to, or None while it waits for its images."""
    return session.scalars(select(Study).join(Report, _report_of_study())
                           .where(Report.id == report.id).order_by(Study.id)).first()


def effective_status(session: Session, order: Order) -> str:
    """ordered -> scheduled -> performed (its study arrived) -> reported (a final report)."""
    return effective_statuses(session, [order])[0]


def effective_statuses(session: Session, orders: Sequence[Order]) -> list[str]:
    """:func:`effective_status` of each order, in two queries however many orders there are."""
    uids = {o.study_instance_uid for o in orders if o.study_instance_uid}
    accessions = {o.accession_number for o in orders if o.accession_number}
    by_uid: dict[str, int] = {}
    by_accession: dict[str, int] = {}
    if uids or accessions:
        for study_id, uid, accession in session.execute(
                select(Study.id, Study.study_instance_uid, Study.accession_number)
                .where(or_(Study.study_instance_uid.in_(uids),
                           Study.accession_number.in_(accessions)))
                .order_by(Study.id)):
            by_uid.setdefault(uid, study_id)
            if accession:
                by_accession.setdefault(accession, study_id)
    found = set(by_uid.values()) | set(by_accession.values())
    reported = set(session.scalars(
        select(Study.id).join(Report, _report_of_study())
        .where(Study.id.in_(found), Report.final_at.is_not(None)))) if found else set()
    statuses = []
    for order in orders:
        study = by_uid.get(order.study_instance_uid or "")
        if study is None and order.accession_number:
            study = by_accession.get(order.accession_number)
        if order.status == "cancelled":
            statuses.append("cancelled")
        elif study is not None:
            statuses.append("reported" if study in reported else "performed")
        elif order.status in ("reported", "performed"):
            statuses.append(order.status)
        else:
            statuses.append("scheduled" if order.scheduled_at is not None else order.status)
    return statuses


def _patient_delay(session: Session, study: Study) -> timedelta:
    """The longest release rule matching the study's modalities and referrers' practices."""
    default = timedelta(hours=current_app.config["PORTAL"]["REPORT_PATIENT_DELAY_HOURS"])
    modalities = [m for m in study.modalities_in_study.split("\\") if m]
    practices = (select(User.practice_fk)
                 .join(ReferrerIdentifier, ReferrerIdentifier.user_fk == User.id)
                 .join(StudyReferrer, StudyReferrer.key == ReferrerIdentifier.key)
                 .where(StudyReferrer.study_fk == study.id, User.practice_fk.is_not(None)))
    rules = session.scalars(select(ReleaseRule).where(
        or_(ReleaseRule.practice_fk.is_(None), ReleaseRule.practice_fk.in_(practices)),
        or_(ReleaseRule.modality == "", ReleaseRule.modality.in_(modalities)))).all()
    hours = [r.delay_hours for r in rules]
    return max([default, *(timedelta(hours=h) for h in hours)])


def is_patient(principal: Principal) -> bool:
    """Patients (signed in as such, or any share-link visitor not known as a physician)
    read under the release rules; everyone else who may see the study reads at once."""
    clinical = any(principal.has_role(r) for r in ("physician", "office_manager", "staff"))
    if principal.kind == "user":
        return principal.has_role("patient") and not clinical
    return principal.kind == "share" and not clinical


@dataclass(frozen=True)
class ReportView:
    """What one reader is shown of a report."""

    report: Report
    preliminary: bool
    amended: bool
    changes: list[ReportVersion]


def readable_reports(session: Session, principal: Principal, study: Study) -> list[ReportView]:
    """The reports of a study this principal may read now (access to the study itself is
    the caller's check): patients only final ones after the release delay."""
    views = []
    patient = is_patient(principal)
    delay = _patient_delay(session, study) if patient else timedelta(0)
    now = utcnow()
    for report in reports_of(session, study):
        if report.status == "cancelled":
            continue
        if patient and (report.status not in ("final", "amended") or report.final_at is None
                        or report.final_at + delay > now):
            continue  # a report reopened after its release is a draft again: not for patients
        # Patients see the versions they could have read (final ones); others every one.
        history = [v for v in report.versions
                   if not patient or v.status in ("final", "amended")]
        views.append(ReportView(report, preliminary=report.status == "preliminary",
                                amended=report.status == "amended",
                                changes=history[:-1] if report.status == "amended" else []))
    return views


def orders_for(session: Session, principal: Principal, limit: int = 200) -> list[Order]:
    """Orders this person placed (their identifiers as ordering provider), or, for office
    managers and staff, that their practice's physicians placed; newest first."""
    if principal.kind != "user":
        return []
    people = select(User.id).where(User.id == principal.id)
    if (principal.has_role("office_manager") or principal.has_role("staff")) \
            and principal.practice_id is not None:
        people = select(User.id).where(or_(User.id == principal.id,
                                           User.practice_fk == principal.practice_id))
    elif not principal.has_role("physician"):
        return []
    keys = select(ReferrerIdentifier.key).where(ReferrerIdentifier.user_fk.in_(people))
    return list(session.scalars(select(Order).where(Order.ordering_provider_key.in_(keys))
                                .order_by(Order.updated_at.desc(), Order.id.desc())
                                .limit(limit)))


def unread_report_condition(principal: Principal) -> ColumnElement[bool]:
    """SQL on Study: it has a final or amended report this person has not read in that
    version (clinicians only; patients read under release rules and get no badge)."""
    if principal.kind != "user" or is_patient(principal):
        return false()
    read = select(ReportRead.id).where(ReportRead.user_fk == principal.id,
                                       ReportRead.report_fk == Report.id,
                                       ReportRead.version >= Report.version)
    return exists(select(Report.id).where(_report_of_study(),
                                          Report.status.in_(("final", "amended")),
                                          ~exists(read)))


def unread_studies(session: Session, principal: Principal, study_ids: list[int]) -> set[int]:
    """Which of these studies have a report the person has not read yet."""
    if not study_ids:
        return set()
    return set(session.scalars(select(Study.id).where(
        Study.id.in_(study_ids), unread_report_condition(principal))))


def unread_views(session: Session, principal: Principal,
                 views: list[ReportView]) -> list[ReportView]:
    """The views whose current version this person has not read yet (a read, no write)."""
    if principal.kind != "user" or not views:
        return []
    seen = dict(session.execute(select(ReportRead.report_fk, ReportRead.version).where(
        ReportRead.user_fk == principal.id,
        ReportRead.report_fk.in_([v.report.id for v in views]))).all())
    return [v for v in views if seen.get(v.report.id, 0) < v.report.version]


def mark_read(session: Session, principal: Principal, views: list[ReportView]) -> None:
    """Remember that a person has seen these reports in their current versions."""
    if principal.kind != "user":
        return
    for view in views:
        row = session.scalars(select(ReportRead).where(
            ReportRead.user_fk == principal.id,
            ReportRead.report_fk == view.report.id)).first()
        if row is None:
            session.add(ReportRead(user_fk=principal.id, report_fk=view.report.id,
                                   version=view.report.version, read_at=utcnow()))
        elif row.version < view.report.version:
            row.version, row.read_at = view.report.version, utcnow()
