"""Office-manager operations on access: grants, break-glass, referrer identifiers, people.

Every change is audited (PS3.15: 110113 Security Alert with 110135/110137, 110127 for
emergency access) in the same transaction as the change itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, and_, func, or_, select, true
from sqlalchemy.orm import Session

from portal import audit
from portal.access.models import Grant, PatientLink, ReferrerIdentifier, User
from portal.access.principal import Principal
from portal.access.users import (
    UserError,
    check_manager_practice,
    managed_practice,
    people_condition,
    practice_for,
    set_active,
    set_roles,
)
from portal.db import utcnow
from portal.index.models import Patient, Study, StudyReferrer
from portal.index.referrers import parse_key
from portal.notify import DeliveryFailed, clean_phone

BREAK_GLASS_MAX = timedelta(hours=24)
BREAK_GLASS_DEFAULT = timedelta(hours=4)


def _audit_change(session: Session, actor: Principal, kind: str, details: dict[str, Any],
                  study: str = "", patient: str = "") -> None:
    audit.append(session, audit.SECURITY_ALERT, action="U", outcome=audit.OUTCOME_SUCCESS,
                 who=actor.audit_name, study_instance_uid=study, patient_id=patient,
                 details={"type": kind, **details})


def _user(session: Session, user_id: int, actor: Principal | None = None) -> User:
    """The user, or "no such user"; with ``actor``, also for a person that actor may not
    list (``people_condition``: another practice's people are unknown to its manager)."""
    query = select(User).where(User.id == user_id)
    if actor is not None:
        query = query.where(people_condition(actor))
    user = session.scalars(query).first()
    if user is None:
        raise UserError("no such user")
    return user


def create_grant(session: Session, actor: Principal, *, user_id: int,
                 study_uid: str | None = None, patient_id: str | None = None,
                 expires_at: datetime | None = None, reason: str = "",
                 break_glass: bool = False, patient_record: int | None = None) -> Grant:
    """Give a user access to one study or to every study of one patient (by Patient ID, or
    by the patient's record id when IDs repeat across issuers). A practice's manager gives
    only to the people he may list (his practice's and those of no practice)."""
    user = _user(session, user_id, actor)
    if sum(map(bool, (study_uid, patient_id, patient_record))) != 1:
        raise UserError("a grant covers either one study or one patient")
    reason = reason.strip()[:1000]
    now = utcnow()
    if expires_at is not None and expires_at <= now:
        raise UserError("the expiry must be in the future")
    if break_glass:
        if len(reason) < 10:
            raise UserError("emergency access needs a written reason (at least 10 characters)")
        expires_at = min(expires_at or now + BREAK_GLASS_DEFAULT, now + BREAK_GLASS_MAX)
    patient_fk, study_text, patient_text = None, "", ""
    if study_uid:
        study = session.scalars(select(Study).where(Study.study_instance_uid == study_uid)).first()
        if study is None:
            raise UserError("no such study")
        study_text, patient_text = study.study_instance_uid, study.patient.patient_id
    elif patient_record:
        record = session.get(Patient, patient_record)
        if record is None:
            raise UserError("no such patient")
        patient_fk, patient_text = record.id, record.patient_id
    else:
        patients = list(session.scalars(select(Patient).where(Patient.patient_id == patient_id)))
        if not patients:
            raise UserError("no such patient")
        if len(patients) > 1:
            raise UserError("several patients have this ID; grant a study instead")
        patient_fk, patient_text = patients[0].id, patients[0].patient_id
    # Every study of a patient, given by a practice's manager: that practice's studies of
    # the patient (policy._granted); emergency access reaches past the practice on purpose.
    practice = managed_practice(actor) if patient_fk is not None and not break_glass else None
    grant = Grant(user_fk=user.id, study_instance_uid=study_uid or None, patient_fk=patient_fk,
                  reason=reason, break_glass=break_glass, granted_by=actor.audit_name,
                  practice_fk=practice, created_at=now, expires_at=expires_at)
    session.add(grant)
    session.flush()
    details = {"grant": grant.id, "to": f"{user.issuer}|{user.subject}",
               "expires": expires_at.isoformat() if expires_at else None, "reason": reason}
    if break_glass:
        audit.append(session, audit.EMERGENCY_OVERRIDE, action="E",
                     outcome=audit.OUTCOME_SUCCESS, who=actor.audit_name,
                     study_instance_uid=study_text, patient_id=patient_text, details=details)
    else:
        _audit_change(session, actor, audit.OBJECT_SECURITY_CHANGED, details, study_text,
                      patient_text)
    return grant


def visible_grant_condition(principal: Principal) -> ColumnElement[bool]:
    """SQL on ``Grant``: grants of a study, or of a patient with a study, the principal's
    practice may see, and those he gave himself (emergency access past the practice);
    another practice's grants, and the patients they name, stay out. The installation's
    manager (of no practice) sees every grant."""
    from portal.access.policy import study_filter

    if managed_practice(principal) is None:
        return true()
    seen = select(Study.study_instance_uid).where(study_filter(principal))
    seen_patients = select(Study.patient_fk).where(study_filter(principal))
    return or_(Grant.study_instance_uid.in_(seen),
               and_(or_(Grant.study_instance_uid.is_(None), Grant.study_instance_uid == ""),
                    Grant.patient_fk.in_(seen_patients)),
               Grant.granted_by == principal.audit_name)


def revoke_grants(session: Session, actor: Principal, grant_ids: Sequence[int]) -> int:
    """Revoke several grants at once; if any id is unknown nothing changes. A manager of a
    practice revokes only grants ``visible_grant_condition`` shows him: another practice's
    grant is unknown to him (its id, easily guessed, changes nothing)."""
    grants = list(session.scalars(select(Grant).where(
        Grant.id.in_(list(grant_ids)), visible_grant_condition(actor))))
    if len(grants) != len(set(grant_ids)):
        raise UserError("unknown grant in the request; nothing was revoked")
    now = utcnow()
    for grant in grants:
        if grant.revoked_at is None:
            running = grant_state(grant, now) == "active"
            grant.revoked_at, grant.revoked_by = now, actor.audit_name
            if grant.break_glass and running:
                audit.append(session, audit.EMERGENCY_OVERRIDE_STOPPED, action="E",
                             outcome=audit.OUTCOME_SUCCESS, who=actor.audit_name,
                             study_instance_uid=grant.study_instance_uid or "",
                             details={"grant": grant.id, "revoked": True})
            else:
                _audit_change(session, actor, audit.OBJECT_SECURITY_CHANGED,
                              {"grant": grant.id, "revoked": True},
                              grant.study_instance_uid or "")
    return len(grants)


def grant_state(grant: Grant, now: datetime | None = None) -> str:
    """active, expired or revoked."""
    now = now or utcnow()
    if grant.revoked_at is not None:
        return "revoked"
    if grant.expires_at is not None and grant.expires_at <= now:
        return "expired"
    return "active"


def link_identifier(session: Session, actor: Principal, user_id: int,
                    text: str) -> ReferrerIdentifier:
    """Link a physician to an identifier studies use for him (NPI, ID or name); a practice's
    manager links only the people he may list. (Which unlinked key is whose is his word, and
    audited: the key's studies open to the physician and his practice.)"""
    user = _user(session, user_id, actor)
    try:
        key = parse_key(text)
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    existing = session.scalars(select(ReferrerIdentifier).where(
        ReferrerIdentifier.key == key)).first()
    if existing is not None:
        raise UserError("this identifier is already linked to someone")
    row = ReferrerIdentifier(user_fk=user.id, key=key, created_by=actor.audit_name,
                             created_at=utcnow())
    session.add(row)
    session.flush()
    _audit_change(session, actor, audit.USER_SECURITY_CHANGED,
                  {"user": f"{user.issuer}|{user.subject}", "identifier": key})
    return row


def unlink_identifier(session: Session, actor: Principal, identifier_id: int) -> None:
    """Remove an identifier link (a practice's manager: of the people he may list only)."""
    row = session.scalars(select(ReferrerIdentifier).join(
        User, User.id == ReferrerIdentifier.user_fk).where(
        ReferrerIdentifier.id == identifier_id, people_condition(actor))).first()
    if row is None:
        raise UserError("no such identifier")
    _audit_change(session, actor, audit.USER_SECURITY_CHANGED,
                  {"identifier": row.key, "removed": True, "user_id": row.user_fk})
    session.delete(row)


def unmatched_referrers(session: Session, limit: int = 50) -> list[tuple[str, int]]:
    """Referrer keys found in studies that nobody is linked to, most frequent first."""
    linked = select(ReferrerIdentifier.key)
    rows = session.execute(
        select(StudyReferrer.key, func.count(StudyReferrer.id))
        .where(StudyReferrer.key.not_in(linked)).group_by(StudyReferrer.key)
        .order_by(func.count(StudyReferrer.id).desc(), StudyReferrer.key).limit(limit))
    return [(key, count) for key, count in rows]


def _masked(phone: str) -> str:
    """What the audit trail keeps of a mobile number: its last three digits."""
    return f"…{phone[-3:]}" if phone else ""


def update_user(session: Session, actor: Principal, user_id: int, *,
                roles: list[str] | None = None, practice: str | None = None,
                active: bool | None = None, phone_number: str | None = None,
                notify_by_sms: bool | None = None) -> User:
    """Change roles, practice or activation of a user (sessions end on any of these), or the
    mobile number and whether report-ready notices also go there by text message ("" clears
    the number; neither ends a session).

    An office manager of a practice changes only the people of his practice and those of
    none, puts them only into his practice (or out of it), never moves himself, and makes or
    changes office managers of his practice only: the practice decides which studies its
    managers see (``policy.study_filter``), and a manager of no practice is the
    installation's."""
    user = _user(session, user_id)
    ours = managed_practice(actor)
    if ours is not None and user.practice_fk not in (ours, None):
        raise UserError("this person belongs to another practice; its office manager "
                        "changes their account")
    if ours is not None and user.practice_fk is None and "office_manager" in user.roles:
        raise UserError("this is a manager of the installation; only such a manager "
                        "changes his account")
    changes: dict[str, Any] = {}
    if phone_number is not None:
        try:
            phone = clean_phone(phone_number) if phone_number.strip() else ""
        except DeliveryFailed as exc:
            raise UserError(str(exc)) from exc
        if phone != user.phone_number:
            user.phone_number = phone
            changes["phone_number"] = _masked(phone)
    if notify_by_sms is not None and notify_by_sms != user.notify_by_sms:
        user.notify_by_sms = notify_by_sms
        changes["notify_by_sms"] = notify_by_sms
    if user.notify_by_sms and not user.phone_number:
        raise UserError("text-message notices need a mobile number")
    if roles is not None and sorted(set(roles)) != sorted(user.roles):
        set_roles(session, user, roles)
        changes["roles"] = user.roles
    if practice is not None:
        new_practice = practice_for(session, actor, practice)
        new_id = new_practice.id if new_practice else None
        if new_id != user.practice_fk and ours is not None and actor.id == user.id:
            raise UserError("you cannot move yourself to another practice")
        if new_id != user.practice_fk:
            user.practice_fk = new_id
            user.security_epoch += 1
            changes["practice"] = practice.strip()
    if active is not None and active != user.active:
        if not active and actor.kind == "user" and actor.id == user.id:
            raise UserError("you cannot deactivate yourself")
        set_active(session, user, active)
        changes["active"] = active
    check_manager_practice(actor, user.roles, user.practice_fk)
    if changes:
        _audit_change(session, actor, audit.USER_SECURITY_CHANGED,
                      {"user": f"{user.issuer}|{user.subject}", **changes})
    return user


def link_patient(session: Session, actor: Principal, user_id: int, patient_id: str) -> None:
    """Let a patient account see the studies of one patient record; a practice's manager
    links only the people he may list to a patient his practice may see."""
    user = _user(session, user_id, actor)
    patients = list(session.scalars(select(Patient).where(Patient.patient_id == patient_id)))
    if not patients:
        raise UserError("no such patient")
    if len(patients) > 1:
        raise UserError("several patients have this ID")
    if managed_practice(actor) is not None:
        _visible_targets(session, actor, [], [patients[0].id])
    session.add(PatientLink(user_fk=user.id, patient_fk=patients[0].id))
    _audit_change(session, actor, audit.USER_SECURITY_CHANGED,
                  {"user": f"{user.issuer}|{user.subject}", "patient_link": True},
                  patient=patient_id)


# -- several at once (the console and /api) ------------------------------------------------

MAX_BULK = 200


def _visible_targets(session: Session, actor: Principal, study_uids: Sequence[str],
                     patient_records: Sequence[int]) -> None:
    """Refuse studies or patients the actor's practice may not see (the policy decides)."""
    from portal.access.policy import study_filter

    if study_uids:
        seen = set(session.scalars(select(Study.study_instance_uid).where(
            Study.study_instance_uid.in_(list(study_uids)), study_filter(actor))))
        if seen != set(study_uids):
            raise UserError("no such study (or not one your practice may see); "
                            "nothing was granted")
    if patient_records:
        seen_patients = set(session.scalars(select(Study.patient_fk).where(
            Study.patient_fk.in_(list(patient_records)), study_filter(actor))))
        if seen_patients != set(patient_records):
            raise UserError("no such patient (or not one your practice may see); "
                            "nothing was granted")


def grant_one(session: Session, actor: Principal, *, user_id: int,
              study_uid: str | None = None, patient_id: str | None = None,
              expires_at: datetime | None = None, reason: str = "",
              break_glass: bool = False) -> Grant:
    """A manager's single grant (the console's form, ``POST /api/grants``): like
    ``grant_many``, only of a study or patient his practice may see. Emergency access
    (``break_glass``: a written reason, a few hours, audited as 110127) is the way past that,
    on purpose: the patient in front of someone whose images another practice holds. A
    manager of no practice (the first one, made with ``flask users grant-role``) is the
    installation's and grants any study, as the command line does."""
    if not break_glass and managed_practice(actor) is not None:
        records = list(session.scalars(select(Patient.id).where(
            Patient.patient_id == patient_id))) if patient_id else []
        _visible_targets(session, actor, [study_uid] if study_uid else [], records)
    return create_grant(session, actor, user_id=user_id, study_uid=study_uid,
                        patient_id=patient_id, expires_at=expires_at, reason=reason,
                        break_glass=break_glass)


def grant_many(session: Session, actor: Principal, *, user_ids: Sequence[int],
               study_uids: Sequence[str] = (), patient_records: Sequence[int] = (),
               expires_at: datetime | None = None, reason: str = "") -> list[Grant]:
    """Give each person access to each study and each patient's studies: one grant and one
    audit record per pair; all or nothing. Emergency access is never given in bulk."""
    user_ids = list(dict.fromkeys(user_ids))
    study_uids = list(dict.fromkeys(u for u in study_uids if u))
    patient_records = list(dict.fromkeys(patient_records))
    if not user_ids:
        raise UserError("choose at least one person")
    if not study_uids and not patient_records:
        raise UserError("choose at least one study or patient")
    if len(user_ids) * (len(study_uids) + len(patient_records)) > MAX_BULK:
        raise UserError("at most %(most)d grants at once", most=MAX_BULK)
    _visible_targets(session, actor, study_uids, patient_records)
    made = [create_grant(session, actor, user_id=user_id, study_uid=uid,
                         expires_at=expires_at, reason=reason)
            for user_id in user_ids for uid in study_uids]
    made += [create_grant(session, actor, user_id=user_id, patient_record=record,
                          expires_at=expires_at, reason=reason)
             for user_id in user_ids for record in patient_records]
    return made


def live_grants_of(session: Session, user_id: int,
                   actor: Principal | None = None) -> list[Grant]:
    """A person's grants that still give access (not revoked, not expired), newest first;
    with ``actor`` a manager of a practice, only those his practice may see."""
    now = utcnow()
    query = select(Grant).where(
        Grant.user_fk == user_id, Grant.revoked_at.is_(None),
        (Grant.expires_at.is_(None)) | (Grant.expires_at > now))
    if actor is not None:
        query = query.where(visible_grant_condition(actor))
    return list(session.scalars(query.order_by(Grant.id.desc())))


def revoke_everything_of(session: Session, actor: Principal, user_id: int) -> list[int]:
    """Take away every live grant a person was given (by a manager of a practice: every one
    his practice may see; what other practices gave stays theirs); the revoked grant ids
    (one audit record each)."""
    _user(session, user_id, actor)
    ids = [g.id for g in live_grants_of(session, user_id, actor)]
    if ids:
        revoke_grants(session, actor, ids)
    return ids


def regrant(session: Session, actor: Principal, grant_ids: Sequence[int]) -> list[Grant]:
    """Undo a revocation: a new grant like each revoked one (same person, target, expiry and
    reason). Only what this person revoked himself, on studies or patients his practice may
    still see, comes back; emergency access is not reopened this way (it needs a new written
    reason)."""
    grants = list(session.scalars(select(Grant).where(
        Grant.id.in_(list(grant_ids)), Grant.revoked_by == actor.audit_name)))
    if len(grants) != len(set(grant_ids)) or not grants:
        raise UserError("unknown grant in the request; nothing was given back")
    _visible_targets(session, actor,
                     [g.study_instance_uid for g in grants if g.study_instance_uid],
                     [g.patient_fk for g in grants
                      if not g.study_instance_uid and g.patient_fk is not None])
    now, made = utcnow(), []
    for grant in grants:
        if grant.revoked_at is None:
            continue
        if grant.break_glass:
            raise UserError("emergency access is not given back with undo; open it again "
                            "with a new reason")
        expires = grant.expires_at if grant.expires_at and grant.expires_at > now else None
        if grant.expires_at is not None and expires is None:
            continue  # it would have ended by now anyway
        made.append(create_grant(session, actor, user_id=grant.user_fk,
                                 study_uid=grant.study_instance_uid or None,
                                 patient_record=grant.patient_fk if not
                                 grant.study_instance_uid else None,
                                 expires_at=expires, reason=grant.reason))
    return made
