"""What the office-manager console and /api look up: people, studies, patients, who saw what,
open links, and what needs attention.

Finding only: the access rules stay in ``portal.access.policy`` (which studies a manager's
practice may see) and changes go through ``portal.access.grants`` and the sharing service.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from flask_babel import gettext
from sqlalchemy import ColumnElement, and_, func, or_, select
from sqlalchemy.orm import Session

from portal import audit
from portal.access.grants import unmatched_referrers, visible_grant_condition
from portal.access.models import AuditEvent, Grant, ReferrerIdentifier, User
from portal.access.policy import manager_audit_condition, study_filter
from portal.access.principal import Principal
from portal.access.users import people_condition
from portal.db import utcnow
from portal.i18n import N_
from portal.index.models import Patient, Study, StudyReferrer
from portal.index.names import name_language, person_name
from portal.studies.service import StudySearch, search_studies

PAGE_SIZE = 25
PEOPLE_LIMIT = 20
SOON = timedelta(days=7)


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


# -- people ----------------------------------------------------------------------------------

def find_people(session: Session, reader: Principal, text: str, *, role: str = "",
                limit: int = PEOPLE_LIMIT) -> list[User]:
    """Active people ``reader`` may list (``people_condition``) whose name or e-mail holds
    every typed word (case ignored); nobody for an empty query, so that a person is always
    chosen, never defaulted."""
    words = [w for w in text.lower().split() if w][:6]
    if not words:
        return []
    conditions = [or_(func.lower(User.display_name).like(f"%{_escape(w)}%", escape="\\"),
                      func.lower(User.email).like(f"%{_escape(w)}%", escape="\\"))
                  for w in words]
    rows = session.scalars(select(User).where(User.active.is_(True), people_condition(reader),
                                              *conditions)
                           .order_by(User.display_name, User.id).limit(limit * 3))
    return [u for u in rows if not role or role in u.roles][:limit]


def visible_person(session: Session, reader: Principal, user_id: int) -> User | None:
    """A person ``reader`` may list, or one holding a grant his practice may see (whose
    page shows those grants and takes them away); None for anybody else."""
    return session.scalars(select(User).where(User.id == user_id, or_(
        people_condition(reader), User.id.in_(select(Grant.user_fk).where(
            visible_grant_condition(reader)))))).first()


def person_label(user: User) -> str:
    """How the console names a person."""
    return user.display_name or user.email or user.subject


def user_json(user: User) -> dict[str, Any]:
    """A person as the search answers him."""
    return {"id": user.id, "name": person_label(user), "email": user.email,
            "roles": user.roles}


# -- studies and patients ----------------------------------------------------------------------

def find_studies(session: Session, principal: Principal,
                 search: StudySearch) -> tuple[list[Any], bool]:
    """One page of the studies the manager's practice may see (the study list's search)."""
    return search_studies(session, principal, search)


def study_json(study: Study, patient: Patient) -> dict[str, Any]:
    """A study as the console's lists show it (the UID for picking, never for reading)."""
    return {"study_uid": study.study_instance_uid, "patient_record": patient.id,
            "patient_name": person_name(patient.patient_name), "patient_id": patient.patient_id,
            "description": study.study_description, "date": study.study_date,
            "modalities": study.modalities_in_study, "accession": study.accession_number}


def patients_in(rows: list[Any]) -> list[Patient]:
    """The distinct patients of study rows, in order of first appearance."""
    seen: dict[int, Patient] = {}
    for _study, patient in rows:
        seen.setdefault(patient.id, patient)
    return list(seen.values())


def visible_patient(session: Session, principal: Principal, record: int) -> Patient | None:
    """The patient record if the manager's practice may see at least one of its studies."""
    found = session.scalar(select(Study.id).where(Study.patient_fk == record,
                                                  study_filter(principal)).limit(1))
    return session.get(Patient, record) if found is not None else None


def patient_studies(session: Session, principal: Principal, patient: Patient) -> list[Study]:
    """The patient's studies the manager's practice may see, newest first."""
    return list(session.scalars(select(Study).where(
        Study.patient_fk == patient.id, study_filter(principal))
        .order_by(Study.study_date.desc(), Study.id.desc())))


# -- grants ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class GrantRow:
    """A grant as a person reads it: who, which patient and study, state."""

    grant: Grant
    user: User
    patient_name: str
    description: str
    study_date: str
    whole_patient: bool
    patient_lang: str = ""  # the name's language when not Latin order (docs/i18n.md)


def grant_rows(session: Session, grants: Sequence[tuple[Grant, User]]) -> list[GrantRow]:
    """Name the patient and study of each grant (two queries for the whole page)."""
    uids = {g.study_instance_uid for g, _ in grants if g.study_instance_uid}
    studies = {s.study_instance_uid: (s, p) for s, p in session.execute(
        select(Study, Patient).join(Patient, Study.patient_fk == Patient.id)
        .where(Study.study_instance_uid.in_(sorted(uids))))} if uids else {}
    records = {g.patient_fk for g, _ in grants if g.patient_fk}
    patients = {p.id: p for p in session.scalars(select(Patient).where(
        Patient.id.in_(sorted(records))))} if records else {}
    out = []
    for grant, user in grants:
        if grant.study_instance_uid and grant.study_instance_uid in studies:
            study, patient = studies[grant.study_instance_uid]
            out.append(GrantRow(grant, user, person_name(patient.patient_name) or "no name",
                                study.study_description, study.study_date, False,
                                name_language(patient.patient_name)))
        elif grant.patient_fk and grant.patient_fk in patients:
            patient = patients[grant.patient_fk]
            out.append(GrantRow(grant, user, person_name(patient.patient_name) or "no name",
                                "", "", True, name_language(patient.patient_name)))
        else:
            out.append(GrantRow(grant, user, "a study no longer stored", "", "", False))
    return out


def grant_list(session: Session, principal: Principal, *, user_id: int | None = None,
               state: str = "", page: int = 1,
               oldest_first: bool = False) -> tuple[list[GrantRow], bool]:
    """One page of the grants the principal's practice may see, newest (or oldest) first:
    ``state`` live, expiring (within 7 days) or "" for all."""
    now = utcnow()
    stmt = select(Grant, User).join(User, Grant.user_fk == User.id).where(
        visible_grant_condition(principal))
    if user_id is not None:
        stmt = stmt.where(Grant.user_fk == user_id)
    if state in ("live", "expiring"):
        stmt = stmt.where(Grant.revoked_at.is_(None),
                          or_(Grant.expires_at.is_(None), Grant.expires_at > now))
    if state == "expiring":
        stmt = stmt.where(Grant.expires_at.is_not(None), Grant.expires_at <= now + SOON)
    order = Grant.id.asc() if oldest_first else Grant.id.desc()
    rows = list(session.execute(stmt.order_by(order).limit(PAGE_SIZE + 1)
                                .offset((max(page, 1) - 1) * PAGE_SIZE)))
    return grant_rows(session, rows[:PAGE_SIZE]), len(rows) > PAGE_SIZE


# -- who saw a patient's studies ---------------------------------------------------------------

def month_start(today: date) -> date:
    """The first day of this month."""
    return today.replace(day=1)


def _day_start(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


def audit_condition(session: Session, reader: Principal, *, patient: Patient | None = None,
                    date_from: date | None = None, date_to: date | None = None,
                    who: str = "", event_id: str = "", failed: bool = False,
                    failed_notices: bool = False) -> ColumnElement[bool]:
    """SQL on ``AuditEvent`` for the console's filters (dates inclusive, UTC days), within
    what ``reader`` may read (``manager_audit_condition``); ``failed_notices`` keeps only
    report-ready notices that could not be delivered."""
    conditions: list[ColumnElement[bool]] = [manager_audit_condition(reader)]
    if failed_notices:
        conditions.append(failed_notice_condition())
    if patient is not None:
        # By his studies only: a Patient ID alone may be another issuer's patient.
        uids = select(Study.study_instance_uid).where(Study.patient_fk == patient.id)
        conditions.append(AuditEvent.study_instance_uid.in_(uids))
    if date_from is not None:
        conditions.append(AuditEvent.occurred_at >= _day_start(date_from))
    if date_to is not None:
        conditions.append(AuditEvent.occurred_at < _day_start(date_to) + timedelta(days=1))
    if who:
        conditions.append(AuditEvent.who.contains(who))
    if event_id:
        conditions.append(AuditEvent.event_id == event_id)
    if failed:
        conditions.append(AuditEvent.outcome != audit.OUTCOME_SUCCESS)
    return and_(*conditions)


def audit_page(session: Session, condition: ColumnElement[bool], page: int = 1,
               oldest_first: bool = False) -> tuple[list[AuditEvent], bool]:
    """One page of audit records, newest (or oldest) first."""
    order = AuditEvent.id.asc() if oldest_first else AuditEvent.id.desc()
    rows = list(session.scalars(select(AuditEvent).where(condition).order_by(order)
                                .limit(PAGE_SIZE + 1).offset((max(page, 1) - 1) * PAGE_SIZE)))
    return rows[:PAGE_SIZE], len(rows) > PAGE_SIZE


def failed_notice_condition() -> ColumnElement[bool]:
    """The audit records of report-ready notices that could not be delivered."""
    from portal.reports.notify import NOTICE_WHO

    return and_(AuditEvent.event_id == audit.APPLICATION_ACTIVITY[0],
                AuditEvent.who == NOTICE_WHO, AuditEvent.outcome != audit.OUTCOME_SUCCESS)


EVENT_WORDS = {audit.INSTANCES_ACCESSED[0]: N_("Opened the images"),
               audit.INSTANCES_TRANSFERRED[0]: N_("Downloaded the images"),
               audit.EXPORT[0]: N_("Downloaded the images"),
               audit.IMPORT[0]: N_("Images arrived"),
               audit.QUERY[0]: N_("Searched"),
               audit.SECURITY_ALERT[0]: N_("Access changed"),
               audit.USER_AUTHENTICATION[0]: N_("Signed in or out"),
               audit.AUDIT_LOG_USED[0]: N_("Read the audit trail"),
               audit.EMERGENCY_OVERRIDE[0]: N_("Emergency access opened"),
               audit.EMERGENCY_OVERRIDE_STOPPED[0]: N_("Emergency access ended"),
               audit.APPLICATION_ACTIVITY[0]: N_("Portal started or stopped")}


@dataclass(frozen=True)
class AuditRow:
    """An audit record as a person reads it."""

    event: AuditEvent
    what: str
    who: str
    patient_name: str
    description: str
    patient_lang: str = ""  # the name's language when not Latin order (docs/i18n.md)


def audit_rows(session: Session, events: list[AuditEvent]) -> list[AuditRow]:
    """Name who acted and which patient and study each record is about."""
    uids = {e.study_instance_uid for e in events if e.study_instance_uid}
    studies = {s.study_instance_uid: (s, p) for s, p in session.execute(
        select(Study, Patient).join(Patient, Study.patient_fk == Patient.id)
        .where(Study.study_instance_uid.in_(sorted(uids))))} if uids else {}
    users = list(session.scalars(select(User))) if events else []
    people = {f"user:{u.issuer}|{u.subject}": person_label(u) for u in users}
    by_id = {u.id: person_label(u) for u in users}
    out = []
    for event in events:
        study, patient = studies.get(event.study_instance_uid, (None, None))
        who = event.who
        if who.startswith("user:"):
            who = people.get(who) or gettext("a former user")
        elif who.startswith("share:"):
            who = gettext("someone with a share link")
        elif who.startswith("machine:"):
            who = gettext("imaging system %(name)s", name=who[8:])
        what = (gettext(EVENT_WORDS[event.event_id]) if event.event_id in EVENT_WORDS
                else event.event_name)
        if event.outcome != audit.OUTCOME_SUCCESS:
            what += " " + gettext("(refused or failed)")
        if who.startswith("portal:report-notice"):
            # A report-ready notice that did not go: say to whom and how, in plain words.
            to = by_id.get(event.details.get("user", 0)) or gettext("a former user")
            what = (gettext("Text message “report ready” to %(who)s not delivered", who=to)
                    if event.details.get("notice") == "text" else
                    gettext("E-mail “report ready” to %(who)s not delivered", who=to))
            who = gettext("the portal")
        out.append(AuditRow(event, what, who or gettext("unknown"),
                            person_name(patient.patient_name) if patient else "",
                            study.study_description if study else "",
                            name_language(patient.patient_name) if patient else ""))
    return out


# -- share links -----------------------------------------------------------------------------

def open_links_of_patient(session: Session, principal: Principal, patient: Patient) -> list[Any]:
    """Links the manager may manage that still open (or will open, or are locked) any study
    of this patient, newest first."""
    from portal.sharing.models import ShareLink, ShareLinkStudy
    from portal.sharing.service import manageable_links

    uids = select(Study.study_instance_uid).where(Study.patient_fk == patient.id)
    stmt = manageable_links(principal).where(
        or_(ShareLink.patient_fk == patient.id,
            ShareLink.id.in_(select(ShareLinkStudy.share_fk).where(
                ShareLinkStudy.study_instance_uid.in_(uids)))),
        ShareLink.revoked_at.is_(None), ShareLink.expires_at > utcnow())
    return list(session.scalars(stmt.order_by(ShareLink.id.desc())))


@dataclass(frozen=True)
class LinkRow:
    """A share link as a person reads it: whose studies, which, and its state."""

    link: Any
    patient_name: str
    description: str
    study_date: str
    count: int
    made_by: str = ""
    patient_lang: str = ""  # the name's language when not Latin order (docs/i18n.md)


def link_rows(session: Session, links: Sequence[Any]) -> list[LinkRow]:
    """Name the patient and the (first) study each link opens, and who made it (two queries
    for the page)."""
    uids = {s.study_instance_uid for link in links for s in link.studies}
    makers = {link.created_by_fk for link in links if link.created_by_fk}
    names = {u.id: person_label(u) for u in session.scalars(
        select(User).where(User.id.in_(sorted(makers))))} if makers else {}
    studies = {s.study_instance_uid: (s, p) for s, p in session.execute(
        select(Study, Patient).join(Patient, Study.patient_fk == Patient.id)
        .where(Study.study_instance_uid.in_(sorted(uids))))} if uids else {}
    out = []
    for link in links:
        known = [studies[s.study_instance_uid] for s in link.studies
                 if s.study_instance_uid in studies]
        made_by = names.get(link.created_by_fk, "") if link.created_by_fk else ""
        if not known:
            out.append(LinkRow(link, "a patient no longer stored", "", "", len(link.studies),
                               made_by))
            continue
        study, patient = known[0]
        out.append(LinkRow(link, person_name(patient.patient_name) or "no name",
                           study.study_description or "study", study.study_date or "",
                           len(link.studies), made_by, name_language(patient.patient_name)))
    return out


def revoke_links(session: Session, principal: Principal, public_ids: list[str]) -> int:
    """Revoke several links in one step (one audit record each); if one is unknown, none."""
    from portal.access.users import UserError
    from portal.sharing.service import ShareError, get_link, revoke_link

    ids = list(dict.fromkeys(public_ids))
    if not ids:
        raise UserError("choose at least one link")
    try:
        for public_id in ids:
            get_link(session, principal, public_id)
    except ShareError as exc:
        raise UserError("unknown link in the request; nothing was revoked") from exc
    for public_id in ids:
        revoke_link(session, principal, public_id)
    return len(ids)


# -- what needs attention --------------------------------------------------------------------

@dataclass(frozen=True)
class Attention:
    """Counts on the console's front page; each links to its list."""

    unmatched_referrers: int
    grants_expiring: int
    links_expiring: int
    links_locked: int
    security_alerts: int
    failed_deliveries: int


def attention(session: Session, principal: Principal) -> Attention:
    """What an office manager should look at today: each count is of the list it links to,
    so a manager of a practice counts only what his practice may see (the referrers linked
    to nobody are the installation's: a manager links them to his practice's people)."""
    from portal.sharing.models import ShareLink
    from portal.sharing.service import manageable_condition

    now = utcnow()
    linked = select(ReferrerIdentifier.key)
    unmatched = session.scalar(select(func.count(func.distinct(StudyReferrer.key)))
                               .where(StudyReferrer.key.not_in(linked))) or 0
    grants = session.scalar(select(func.count(Grant.id)).where(
        Grant.revoked_at.is_(None), Grant.expires_at > now, Grant.expires_at <= now + SOON,
        visible_grant_condition(principal))) or 0
    in_sight = manageable_condition(principal)
    links = session.scalar(select(func.count(ShareLink.id)).where(
        ShareLink.revoked_at.is_(None), ShareLink.locked_at.is_(None),
        ShareLink.expires_at > now, ShareLink.expires_at <= now + SOON, in_sight)) or 0
    locked = session.scalar(select(func.count(ShareLink.id)).where(
        ShareLink.revoked_at.is_(None), ShareLink.locked_at.is_not(None),
        ShareLink.expires_at > now, in_sight)) or 0
    records = manager_audit_condition(principal)
    alerts = session.scalar(select(func.count(AuditEvent.id)).where(
        AuditEvent.event_id == audit.SECURITY_ALERT[0],
        AuditEvent.outcome != audit.OUTCOME_SUCCESS,
        AuditEvent.occurred_at >= now - SOON, records)) or 0
    failed = session.scalar(select(func.count(AuditEvent.id)).where(
        failed_notice_condition(), AuditEvent.occurred_at >= now - SOON, records)) or 0
    return Attention(unmatched, grants, links, locked, alerts, failed)


def suggestions(session: Session) -> list[tuple[str, int]]:
    """Referrer keys seen in studies and linked to nobody, most frequent first."""
    return unmatched_referrers(session)
