"""Reports and orders: store what arrives (keeping every version), match it to studies, and
decide what each reader may see (release rules).

Every way in (HL7 ORU over MLLP, FHIR DiagnosticReport, DICOM SR, encapsulated PDF) builds
an ``IncomingReport`` and calls ``receive_report``; HL7 ORM/OMI/SIU build an ``IncomingOrder``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from flask import current_app
from sqlalchemy import String, and_, exists, false, or_, select
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from portal import audit, failures
from portal.access.models import ReferrerIdentifier, User
from portal.access.policy import allowed, is_patient, order_placers
from portal.access.principal import Principal
from portal.db import Database, utcnow
from portal.index.models import Order, Patient, Study, StudyReferrer
from portal.index.names import search_words
from portal.index.service import resolve_order
from portal.reports.models import (
    ORDER_STATUSES,
    ReleaseRule,
    Report,
    ReportRead,
    ReportVersion,
)

MAX_TEXT = 200_000  # characters of one report section
MAX_PDF_BYTES = 20 << 20


class ReportError(failures.Unprocessable, ValueError):
    """A report or order that cannot be accepted (the reason is for the sender)."""


class IdentityMismatch(ReportError):
    """The report names a study of another patient, or continues a report received for
    another patient or study: refused whole, and recorded as a security alert."""

    def __init__(self, reason: str, study_instance_uid: str = "", patient_id: str = "") -> None:
        super().__init__(reason)
        # Whose record the report would have landed on (for the alert, never for the sender).
        self.study_instance_uid = study_instance_uid
        self.patient_id = patient_id


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
    # Every identifier the sender gives for the patient, as (value, issuer); HL7 PID-3 may
    # repeat. Empty: ``patient_id`` alone, issuer unknown.
    patient_ids: list[tuple[str, str]] = field(default_factory=list)
    patient_name: str = ""  # as the sender wrote it (HL7 PID-5, FHIR subject.display)
    observed_at: datetime | None = None  # when the sender made this version
    clinical_at: datetime | None = None  # the time of the examination (HL7 OBR-7, FHIR effective)
    # Whether a version without ``clinical_at`` keeps the stored one: an HL7 field left empty
    # says nothing (HL7 v2.5 2.5.3: only "" deletes); a FHIR resource is the whole report, so
    # one without effective[x] has none.
    keeps_clinical_at: bool = True
    message_id: str = ""  # HL7 MSH-10 of the message that brought it
    patient_language: str = ""  # ISO 639-1 (HL7 PID-15), '' when the sender gives none


@dataclass(frozen=True)
class Received:
    """What ``store_report`` did with one incoming version."""

    report: Report
    newly_final: bool  # it just became readable as final (or was amended): notify
    stored: bool  # a new version was stored
    note: str = ""  # why nothing was stored, for the sender


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
    patient_language: str = ""  # ISO 639-1 (HL7 PID-15), '' when the sender gives none


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


def names_agree(sent: str, known: str) -> bool:
    """Two spellings of one person's name: the folded words of one contain the other's (a
    missing middle name or a different order does not count); an empty name says nothing."""
    a, b = set(search_words(sent)), set(search_words(known))
    return not a or not b or a <= b or b <= a


def _identifiers(incoming: IncomingReport) -> list[tuple[str, str]]:
    """The (value, issuer) pairs naming the report's patient, without empty values."""
    pairs = incoming.patient_ids or [(incoming.patient_id, "")]
    return [(value[:64], issuer) for value, issuer in pairs if value]


def _is_patient(identifiers: list[tuple[str, str]], name: str, patient: Patient) -> str | None:
    """The identifier by which these name this patient (None: another person). An issuer is
    compared only when both sides give one; the name only when both have one."""
    if not names_agree(name, patient.patient_name):
        return None
    if not identifiers:
        return patient.patient_id
    for value, issuer in identifiers:
        known = patient.issuer_of_patient_id
        if value == patient.patient_id and (
                not issuer or not known or issuer.casefold() == known.casefold()):
            return value
    return None


def _check_identity(session: Session, incoming: IncomingReport, report: Report | None) -> None:
    """Refuse a report that would land on another patient: the study it names (by UID, else
    every study with its accession number) must be of the patient it names, and a new version
    must keep the patient and study of the versions before it."""
    identifiers = _identifiers(incoming)
    uid = incoming.study_instance_uid[:64]
    if report is not None:
        moved = ""
        if report.patient_id and identifiers and report.patient_id not in {
                value for value, _ in identifiers}:
            moved = "patient"
        elif report.study_instance_uid and uid and uid != report.study_instance_uid:
            moved = "study"
        if moved:
            study = study_of_report(session, report)
            raise IdentityMismatch(
                f"report {incoming.source_id[:64]!r} was received for another {moved}; a report "
                f"cannot move to another {moved} (cancel it and send a new one)",
                study.study_instance_uid if study is not None else report.study_instance_uid,
                report.patient_id)
    if not identifiers and not incoming.patient_name:
        return  # nothing to compare (the ways in that need a patient check for one)
    if uid:
        studies = list(session.scalars(select(Study).where(Study.study_instance_uid == uid)))
    elif incoming.accession_number:
        studies = list(session.scalars(select(Study).where(
            Study.accession_number == incoming.accession_number[:64]).order_by(Study.id)))
    else:
        studies = []
    if not studies:
        return  # its images have not arrived: matched (on study and patient) when they do
    for study in studies:
        matched = _is_patient(identifiers, incoming.patient_name, study.patient)
        if matched is not None:
            if uid and incoming.accession_number and study.accession_number \
                    and incoming.accession_number[:64] != study.accession_number:
                raise IdentityMismatch(
                    "the accession number does not match that of the study the report names",
                    study.study_instance_uid, study.patient.patient_id)
            incoming.patient_id = matched  # the identifier the archive knows the patient by
            return
    named = f"accession {incoming.accession_number[:64]}" if not uid else f"study {uid}"
    raise IdentityMismatch(
        f"the report names (by identifier or name) another patient than the one of {named}; "
        "nothing was stored", studies[0].study_instance_uid, studies[0].patient.patient_id)


def record_identity_alert(database: Database, exc: IdentityMismatch, *, who: str,
                          source_address: str, via: str, message: str = "") -> None:
    """A refused report that named another patient's study is a security alert (110113), in
    its own transaction because the report's own was rolled back."""
    details = {"type": "report for another patient", "reason": str(exc)[:300], "via": via}
    if message:
        details["message"] = message[:64]
    audit.record(database, audit.SECURITY_ALERT, action="C",
                 outcome=audit.OUTCOME_SERIOUS_FAILURE, who=who, source_address=source_address,
                 study_instance_uid=exc.study_instance_uid, patient_id=exc.patient_id,
                 details=details)


def receive_report(session: Session, incoming: IncomingReport) -> tuple[Report, bool]:
    """Store a report version; returns the report and whether it just became readable as
    final (for "report ready" notifications). See ``store_report``."""
    received = store_report(session, incoming)
    return received.report, received.newly_final


def store_report(session: Session, incoming: IncomingReport) -> Received:
    """Store a report version after checking it names its study's patient (else
    ``IdentityMismatch``, nothing written). A repeat of the current version, or a version the
    sender made before the current one (a late or replayed message), changes nothing.
    """
    _check(incoming)
    report = session.scalars(select(Report).where(
        Report.source == incoming.source, Report.source_id == incoming.source_id[:128])
        .with_for_update()).first()
    _check_identity(session, incoming, report)
    now = utcnow()
    status = incoming.status
    if report is None:
        report = Report(source=incoming.source, source_id=incoming.source_id[:128],
                        version=0, status=status, received_at=now)
        session.add(report)
    else:
        same = (report.status == status and report.findings == incoming.findings
                and report.impression == incoming.impression
                and report.author == incoming.author[:324] and report.pdf == incoming.pdf
                and _clinical_time(incoming, report) == report.clinical_at)
        if same:
            return Received(report, False, False, "this version is already stored")
        if report.observed_at is not None and incoming.observed_at is not None \
                and incoming.observed_at < report.observed_at:
            return Received(report, False, False, "a newer version of this report is already "
                            "stored; this older one was not applied")
        if report.final_at is not None and status == "final":
            status = "amended"  # a final report sent again with other content is an amendment
    was_final = report.final_at is not None
    report.status = status
    report.study_instance_uid = incoming.study_instance_uid[:64] or report.study_instance_uid
    report.accession_number = incoming.accession_number[:64] or report.accession_number
    report.patient_id = incoming.patient_id[:64] or report.patient_id
    report.patient_language = incoming.patient_language[:16] or report.patient_language
    report.title = incoming.title[:128] or report.title
    report.findings, report.impression = incoming.findings, incoming.impression
    report.author = incoming.author[:324]
    report.signed_at = incoming.signed_at
    report.observed_at = incoming.observed_at or report.observed_at
    report.clinical_at = _clinical_time(incoming, report)
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
                              observed_at=incoming.observed_at,
                              clinical_at=report.clinical_at,
                              message_id=incoming.message_id[:64], received_at=now))
    session.flush()
    return Received(report, (not was_final and report.final_at is not None)
                    or status == "amended", True)


def _clinical_time(incoming: IncomingReport, report: Report) -> datetime | None:
    """The report's time of the examination once ``incoming`` is stored."""
    if incoming.clinical_at is None and incoming.keeps_clinical_at:
        return report.clinical_at
    return incoming.clinical_at


def order_column_length(name: str) -> int:
    """The length of an Order text column (64 when it has none), what a value is cut to."""
    kind = Order.__table__.c[name].type
    return (kind.length if isinstance(kind, String) else None) or 64


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
    was = order.accession_number or ""
    if incoming.patient_id and incoming.patient_id[:64] != order.patient_id:
        order.patient_language = ""  # another patient now: the old one's language is not his
    for name in ("placer_order_number", "filler_order_number", "accession_number",
                 "study_instance_uid", "patient_id", "patient_name", "procedure", "modality",
                 "ordering_provider", "ordering_provider_key", "location",
                 "patient_language"):
        value = getattr(incoming, name)
        if value:
            setattr(order, name, value[:order_column_length(name)])
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
    resolve_order(session, order, was=[was])  # the studies it opens, found once, here
    return order


# -- reading --------------------------------------------------------------------------------

def _report_of_study() -> ColumnElement[bool]:
    """SQL: the Report row belongs to the Study row: the same patient (when the report names
    one), and the same Study Instance UID or the same accession number (and no other study
    UID). The one rule for matching: a report that arrived before its images never lands on
    another patient's study."""
    # correlate_except: the outer Study row, even two subqueries deep.
    patient_id = select(Patient.patient_id).where(Patient.id == Study.patient_fk) \
        .correlate_except(Patient).scalar_subquery()
    return and_(or_(Report.patient_id == "", Report.patient_id == patient_id),
                or_(Report.study_instance_uid == Study.study_instance_uid,
                    and_(Study.accession_number != "",
                         Report.accession_number == Study.accession_number,
                         Report.study_instance_uid == "")))


def _order_of_study() -> ColumnElement[bool]:
    """SQL: the Order row is the Study row's: it names the study's Patient ID, and its Study
    Instance UID or (when the study has one) its accession number."""
    patient_id = select(Patient.patient_id).where(Patient.id == Study.patient_fk) \
        .correlate_except(Patient).scalar_subquery()
    return and_(Order.patient_id == patient_id,
                or_(Order.study_instance_uid == Study.study_instance_uid,
                    and_(Study.accession_number != "",
                         Order.accession_number == Study.accession_number)))


def given_languages(session: Session, studies: ColumnElement[bool]) -> dict[int, str]:
    """The patient's language (ISO 639-1) the RIS gave last (HL7 PID-15, a FHIR report's
    Patient ``communication``) with a report or an order of the studies ``studies`` selects,
    by the studies' patient row; a patient for whom none gave one is left out. Two columns
    of each, not the reports (their PDFs)."""
    latest: dict[int, tuple[datetime, int, str]] = {}
    for statement in (  # the last given wins; of two given at once, the one made last
            select(Study.patient_fk, Report.updated_at, Report.id, Report.patient_language)
            .join(Report, _report_of_study()).where(studies, Report.patient_language != ""),
            select(Study.patient_fk, Order.updated_at, Order.id, Order.patient_language)
            .join(Order, _order_of_study()).where(studies, Order.patient_language != "")):
        for patient, when, number, code in session.execute(statement):
            if patient not in latest or (when, number) > latest[patient][:2]:
                latest[patient] = (when, number, code)
    return {patient: code for patient, (_when, _number, code) in latest.items()}


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


@dataclass(frozen=True)
class ReportView:
    """What one reader is shown of a report."""

    report: Report
    preliminary: bool
    amended: bool
    changes: list[ReportVersion]


def readable_reports(session: Session, principal: Principal, study: Study,
                     include_cancelled: bool = False) -> list[ReportView]:
    """The reports of a study this principal may read now (access to the study itself is
    the caller's check): patients only final ones after the release delay. Cancelled ones
    only with ``include_cancelled`` and never for patients (FHIR shows them with their
    status, so a system that kept the report learns it was withdrawn)."""
    views = []
    patient = is_patient(principal)
    delay = _patient_delay(session, study) if patient else timedelta(0)
    now = utcnow()
    for report in reports_of(session, study):
        if report.status == "cancelled" and (patient or not include_cancelled):
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
    people = order_placers(principal)  # whose orders: the access policy's answer
    if people is None:
        return []
    keys = select(ReferrerIdentifier.key).where(ReferrerIdentifier.user_fk.in_(people))
    return list(session.scalars(select(Order).where(Order.ordering_provider_key.in_(keys))
                                .order_by(Order.updated_at.desc(), Order.id.desc())
                                .limit(limit)))


def unread_report_condition(principal: Principal) -> ColumnElement[bool]:
    """SQL on Study: it has a final or amended report this person has not read in that
    version (clinicians only; patients read under release rules and get no badge)."""
    if not allowed(principal, "unread_badges"):
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
    if not allowed(principal, "account") or not views:
        return []
    seen = dict(session.execute(select(ReportRead.report_fk, ReportRead.version).where(
        ReportRead.user_fk == principal.id,
        ReportRead.report_fk.in_([v.report.id for v in views]))).all())
    return [v for v in views if seen.get(v.report.id, 0) < v.report.version]


def mark_shown_read(session: Session, principal: Principal, studies: list[Study]) -> None:
    """The final reports of ``studies`` this person may read are read once the page showing
    them is answered: called by its handler, in the request's unit of work (portal/db.py),
    never by a template."""
    if not allowed(principal, "account"):
        return
    for study in studies:
        final = [v for v in readable_reports(session, principal, study)
                 if v.report.status in ("final", "amended")]
        mark_read(session, principal, unread_views(session, principal, final))


def mark_read(session: Session, principal: Principal, views: list[ReportView]) -> None:
    """Remember that a person has seen these reports in their current versions."""
    if not allowed(principal, "account"):
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
