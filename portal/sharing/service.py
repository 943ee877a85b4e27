"""Share links: create, exchange for a share session, revoke, and tell who used them.

Services take plain arguments and never read ``request``. Creating and revoking only flush
(the handler commits); exchanging a link runs its own short write transactions, because the
count of wrong PINs must be committed even when the request then fails (docs/security.md 20).
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal, NamedTuple

from flask_babel import lazy_gettext as _l
from sqlalchemy import ColumnElement, Select, delete, func, or_, select, true, update
from sqlalchemy.orm import Session, selectinload

from portal import audit, failures
from portal.access.grants import create_grant
from portal.access.models import PatientLink, User
from portal.access.policy import (
    allowed,
    is_patient_user,
    share_audiences,
    shareable_studies,
    study_filter,
)
from portal.access.principal import Principal
from portal.access.users import managed_practice
from portal.db import Database, utcnow
from portal.i18n import SUPPORTED
from portal.index.models import Series, Study
from portal.sharing.models import ShareLink, ShareLinkStudy, ShareSession, link_state
from portal.sharing.tokens import (
    hash_pin,
    looks_like_token,
    new_pin,
    new_token,
    pepper_from_secret,
    token_digest,
    verify_pin,
)

Audience = Literal["patient", "physician"]


class ShareError(failures.Invalid):
    """A share cannot be made or changed as asked; the message says why (HTTP 400)."""


class NoSuchLink(ShareError):
    """No link of that id that the actor may manage: a missing link and another person's
    answer alike, 404 with the words of any unknown address (docs/security.md 16)."""

    status = 404
    public = False
    default_reason = ("The requested URL was not found on the server. If you entered the URL "
                      "manually please check your spelling and try again.")


class LinkUnavailable(failures.NotFound):
    """Unknown, expired, not yet valid, revoked or locked: one answer for all
    (docs/security.md 16)."""


class PinRequired(failures.PortalError):
    """The link has a PIN and none was sent (not counted as a failed attempt)."""

    status = 401
    default_reason = "enter the PIN you were given"


class WrongPin(failures.PortalError):
    """The PIN did not match; ``remaining`` attempts are left before the link locks."""

    status = 401

    def __init__(self, remaining: int) -> None:
        super().__init__("wrong PIN")
        self.remaining = remaining


class LinkLocked(failures.PortalError):
    """This wrong PIN was the last one allowed: the link is locked from now on."""

    status = 403
    default_reason = "this link is locked"


@dataclass(frozen=True)
class SharePolicy:
    """The limits of share links, from configuration (docs/security.md policies)."""

    default_days: int = 7
    max_days: int = 30
    pin_digits: int = 6
    max_failed_pins: int = 10
    session_idle: timedelta = timedelta(minutes=15)
    session_absolute: timedelta = timedelta(hours=1)
    pepper: bytes = field(default=b"", repr=False)

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any], secret_key: str) -> SharePolicy:
        """The policy of a configured app."""
        pepper_text = settings["SHARE_PIN_PEPPER"]
        return cls(default_days=settings["SHARE_DEFAULT_DAYS"],
                   max_days=settings["SHARE_MAX_DAYS"],
                   pin_digits=settings["SHARE_PIN_DIGITS"],
                   max_failed_pins=settings["SHARE_MAX_FAILED_PINS"],
                   session_idle=timedelta(minutes=settings["SHARE_SESSION_IDLE_MINUTES"]),
                   session_absolute=timedelta(
                       minutes=settings["SHARE_SESSION_ABSOLUTE_MINUTES"]),
                   pepper=pepper_text.encode("utf-8") if pepper_text
                   else pepper_from_secret(secret_key))


@dataclass(frozen=True)
class NewShare:
    """A link just made: its token and PIN exist only here and are shown once."""

    link: ShareLink
    token: str
    pin: str | None


@dataclass(frozen=True)
class Exchanged:
    """A link exchanged for a share session (the cookie value is ``session_token``)."""

    session_token: str
    public_id: str
    study_uids: tuple[str, ...]
    purpose: Literal["view", "claim"]
    first_use: bool
    notify_sender: bool
    created_by_fk: int | None


def share_who(public_id: str) -> str:
    """How the audit trail names the visitor of a link."""
    return f"share:{public_id}"


def _active_conditions(now: datetime) -> list[Any]:
    return [ShareLink.revoked_at.is_(None), ShareLink.locked_at.is_(None),
            ShareLink.expires_at > now, ShareLink.not_before <= now]


# -- creating --------------------------------------------------------------------------------

def _check_sender(actor: Principal, audience: str, requires_sign_in: bool) -> None:
    """Who may share with whom is the access policy's answer (a patient: with a doctor)."""
    audiences = share_audiences(actor)
    if not audiences:
        raise ShareError("only physicians, office managers and patients share studies")
    if audience not in ("patient", "physician"):
        raise ShareError("the audience is a patient or a physician")
    if audience not in audiences:
        raise ShareError("you can share your images with a doctor")
    if requires_sign_in and is_patient_user(actor):
        # The doctor a patient chooses opens the link without an account: a patient's link
        # never turns into a lasting grant inside the portal.
        raise ShareError("a link you make is opened without signing in")


def _expiry(policy: SharePolicy, now: datetime, days: int | None,
            expires_at: datetime | None) -> datetime:
    if expires_at is None:
        days = policy.default_days if days is None else days
        if not 1 <= days <= policy.max_days:
            raise ShareError("a link lasts 1 to %(days)d days", days=policy.max_days)
        return now + timedelta(days=days)
    if expires_at.tzinfo is None:
        raise ShareError("the expiry must carry a time zone")
    if expires_at <= now + timedelta(minutes=5):
        raise ShareError("the expiry must be at least 5 minutes ahead")
    if expires_at > now + timedelta(days=policy.max_days, minutes=1):
        raise ShareError("a link lasts at most %(days)d days", days=policy.max_days)
    return expires_at


class KnownLanguage(NamedTuple):
    """The language of the person a link is made for, and where the portal learnt it:
    ``account`` (his own choice in the portal) or ``records`` (the RIS); ('', '') unknown."""

    language: str
    source: str


def recipient_language(session: Session, study: Study, audience: str) -> KnownLanguage:
    """The language of the person a link is made for, when the portal knows it.

    Known, for a link for the patient: the language chosen by the patient account linked to
    his record (by an office manager); several accounts that disagree leave it unknown. Else
    the patient's language the RIS gave (HL7 PID-15) with the report or order of this study
    updated last among those that gave one, when the portal offers it. A colleague's link
    names nobody in particular, so his language is never known."""
    if audience != "patient":
        return KnownLanguage("", "")
    chosen = set(session.scalars(
        select(User.language).join(PatientLink, PatientLink.user_fk == User.id)
        .where(PatientLink.patient_fk == study.patient_fk, User.active.is_(True))))
    known = chosen & set(SUPPORTED)
    if len(known) == 1 and len(chosen - {""}) == 1:
        return KnownLanguage(known.pop(), "account")
    recorded = recorded_language(session, study)
    return KnownLanguage(recorded, "records") if recorded in SUPPORTED else KnownLanguage("", "")


def recorded_language(session: Session, study: Study) -> str:
    """The patient's language (ISO 639-1) as the RIS gave it with the report or order of this
    study updated last among those that gave one, else ''. An order is the study's when it
    names the study's Patient ID and its Study Instance UID or accession number; a report by
    ``reports_of``'s rule."""
    from portal.reports.service import given_languages

    return given_languages(session, Study.id == study.id).get(study.patient_fk, "")


def message_language(language: str) -> str:
    """A language chosen for a link's messages: a code of SUPPORTED, or ShareError."""
    if language not in SUPPORTED:
        raise ShareError("that language is not offered for the message")
    return language


def create_share(session: Session, actor: Principal, policy: SharePolicy, *, study_uid: str,
                 whole_patient: bool = False, audience: Audience = "patient",
                 requires_sign_in: bool = False, can_download: bool = False,
                 with_pin: bool = True, days: int | None = None,
                 expires_at: datetime | None = None, not_before: datetime | None = None,
                 note: str = "", notify_sender: bool = False,
                 series_uids: Sequence[str] = (), message: str = "",
                 language: str = "") -> NewShare:
    """Make a link to one study (or to selected series of it), or to every study of its
    patient the sender may see (a patient: his own studies, for a doctor).

    The caller has already checked that ``actor`` may see ``study_uid`` (``require_study``);
    who may share what with whom, and the scope, are read from the policy here, so a link
    never opens more than its sender sees. Audited as 110113 / 110135 in the same transaction.
    ``language``: what every message about the link and its visitor's pages are in (a code of
    SUPPORTED); '' takes the recipient's language when it is known (``recipient_language``),
    else leaves it to the sender's language at the time of each message.
    """
    _check_sender(actor, audience, requires_sign_in)
    if requires_sign_in and audience != "physician":
        raise ShareError("only a link for a colleague can ask him to sign in")
    now = utcnow()
    expiry = _expiry(policy, now, days, expires_at)
    start = now if not_before is None else not_before
    if start.tzinfo is None or start >= expiry:
        raise ShareError("the link must start (with a time zone) before it ends")
    study = session.scalars(shareable_studies(actor).where(
        Study.study_instance_uid == study_uid)).first()
    if study is None:
        raise ShareError("no such study")
    language = message_language(language) if language \
        else recipient_language(session, study, audience).language
    series = sorted(set(series_uids))
    if series:
        if whole_patient or requires_sign_in:
            raise ShareError("selected series can be shared with one study's view link only")
        known = set(session.scalars(select(Series.series_instance_uid).where(
            Series.study_fk == study.id, Series.series_instance_uid.in_(series))))
        if known != set(series) or len(series) > 500:
            raise ShareError("a selected series is not part of this study")
    studies = [study]
    if whole_patient:
        studies = list(session.scalars(shareable_studies(actor).where(
            Study.patient_fk == study.patient_fk).order_by(Study.study_date, Study.id)))
    token = new_token()
    pin = new_pin(policy.pin_digits) if with_pin else None
    link = ShareLink(public_id=str(uuid.uuid4()), token_sha256=token_digest(token),
                     audience=audience, requires_sign_in=requires_sign_in,
                     can_download=can_download, note=note.strip()[:500],
                     message=message.strip()[:1000], language=language,
                     patient_fk=study.patient_fk if whole_patient else None,
                     created_by=actor.audit_name, created_by_fk=actor.id, created_at=now,
                     not_before=start, expires_at=expiry,
                     pin_hash=hash_pin(pin, policy.pepper) if pin else "",
                     notify_sender=notify_sender, deliveries=[],
                     studies=[ShareLinkStudy(study_instance_uid=s.study_instance_uid,
                                             series_uids=series)
                              for s in studies])
    session.add(link)
    session.flush()
    audit.append(session, audit.SECURITY_ALERT, action="C", outcome=audit.OUTCOME_SUCCESS,
                 who=actor.audit_name, study_instance_uid=study.study_instance_uid,
                 patient_id=study.patient.patient_id,
                 details={"type": audit.OBJECT_SECURITY_CHANGED, "share": link.public_id,
                          "studies": [s.study_instance_uid for s in studies],
                          "series": series,
                          "audience": audience, "pin": bool(pin),
                          "download": can_download, "sign_in": requires_sign_in,
                          "expires": expiry.isoformat()})
    return NewShare(link, token, pin)


def check_own_secret(link: ShareLink, token: str, pin: str | None,
                     policy: SharePolicy) -> None:
    """The sender sends a link (or PIN) after creating it: prove he holds the real one."""
    if not secrets.compare_digest(token_digest(token), link.token_sha256):
        raise ShareError("this is not the link that was made; make a new one")
    if pin is not None and not (link.pin_hash and verify_pin(pin, link.pin_hash,
                                                             policy.pepper)):
        raise ShareError("this is not the PIN that was made; make a new link")


# -- who may manage which links -----------------------------------------------------------------

def manageable_links(actor: Principal) -> Select[ShareLink]:
    """Links the actor may see and revoke (``manageable_condition``), with their studies."""
    return select(ShareLink).options(selectinload(ShareLink.studies)).where(
        manageable_condition(actor))


def manageable_condition(actor: Principal) -> ColumnElement[bool]:
    """SQL on ``ShareLink``: the links the actor may see and revoke: his own; for office
    managers, every link whose studies their practice may all see (another practice's links
    stay out of sight); the installation's manager (of no practice), every link."""
    if allowed(actor, "all_links"):
        if managed_practice(actor) is None:
            return true()
        visible = select(Study.study_instance_uid).where(study_filter(actor))
        hidden = select(ShareLinkStudy.id).where(
            ShareLinkStudy.share_fk == ShareLink.id,
            ShareLinkStudy.study_instance_uid.not_in(visible))
        return ~hidden.exists()
    if not allowed(actor, "account"):
        return ShareLink.id.is_(None)
    return ShareLink.created_by_fk == actor.id


def get_link(session: Session, actor: Principal, public_id: str) -> ShareLink:
    """One link the actor may manage, or NoSuchLink (a ShareError, 404)."""
    link = session.scalars(manageable_links(actor).where(
        ShareLink.public_id == public_id)).first()
    if link is None:
        raise NoSuchLink("no such link")
    return link


def list_links(session: Session, actor: Principal, *, study_uid: str = "",
               limit: int = 500) -> list[ShareLink]:
    """Manageable links, newest first, optionally of one study."""
    stmt = manageable_links(actor)
    if study_uid:
        stmt = stmt.where(ShareLink.id.in_(select(ShareLinkStudy.share_fk).where(
            ShareLinkStudy.study_instance_uid == study_uid)))
    return list(session.scalars(stmt.order_by(ShareLink.id.desc()).limit(limit)))


# -- revoking --------------------------------------------------------------------------------

def _revoke(session: Session, actor: Principal, links: Iterable[ShareLink], why: str) -> int:
    now, count = utcnow(), 0
    for link in links:
        if link.revoked_at is not None:
            continue
        link.revoked_at, link.revoked_by = now, actor.audit_name
        session.execute(delete(ShareSession).where(ShareSession.share_fk == link.id))
        audit.append(session, audit.SECURITY_ALERT, action="U", outcome=audit.OUTCOME_SUCCESS,
                     who=actor.audit_name,
                     study_instance_uid=link.studies[0].study_instance_uid
                     if link.studies else "",
                     details={"type": audit.OBJECT_SECURITY_CHANGED, "share": link.public_id,
                              "revoked": True, "why": why})
        count += 1
    session.flush()
    from portal.sharing.sessions import forget_cached_visits

    forget_cached_visits()
    return count


def revoke_link(session: Session, actor: Principal, public_id: str) -> ShareLink:
    """Revoke one link; its open share sessions end at once."""
    link = get_link(session, actor, public_id)
    _revoke(session, actor, [link], "one link")
    return link


def revoke_links_of_study(session: Session, actor: Principal, study_uid: str) -> int:
    """Revoke every manageable link that opens this study."""
    return _revoke(session, actor, list_links(session, actor, study_uid=study_uid,
                                              limit=100_000), "every link of a study")


def revoke_links_of_patient(session: Session, actor: Principal, study_uid: str) -> int:
    """Revoke every manageable link that opens any study of this study's patient."""
    patient_fk = session.scalar(select(Study.patient_fk).where(
        Study.study_instance_uid == study_uid))
    if patient_fk is None:
        raise ShareError("no such study")
    uids = select(Study.study_instance_uid).where(Study.patient_fk == patient_fk)
    stmt = manageable_links(actor).where(or_(
        ShareLink.patient_fk == patient_fk,
        ShareLink.id.in_(select(ShareLinkStudy.share_fk).where(
            ShareLinkStudy.study_instance_uid.in_(uids)))))
    return _revoke(session, actor, list(session.scalars(stmt)), "every link of a patient")


# -- exchanging ------------------------------------------------------------------------------

def _record_failure(database: Database, who: str, address: str, reason: str,
                    device: str) -> None:
    audit.record(database, audit.USER_AUTHENTICATION, action="E",
                 outcome=audit.OUTCOME_MINOR_FAILURE, who=who, source_address=address,
                 details={"type": audit.LOGIN, "share_exchange": True, "reason": reason,
                          "device": device})


def _reserve_attempt(database: Database, link: ShareLink,
                     policy: SharePolicy) -> int | None:
    """Count one PIN attempt *before* the PIN is checked: one atomic UPDATE that never goes
    past the limit. None if the link is locked or its last allowed attempts are being checked
    right now, so however many guesses arrive at once, at most ``max_failed_pins`` of them
    are ever compared with the PIN (docs/security.md 20, (b) 6). A right PIN resets the count."""
    with database.write_transaction() as session:
        row = session.execute(
            update(ShareLink).where(ShareLink.id == link.id, ShareLink.locked_at.is_(None),
                                    ShareLink.failed_attempts < policy.max_failed_pins)
            .values(failed_attempts=ShareLink.failed_attempts + 1)
            .returning(ShareLink.failed_attempts)).first()
    return int(row[0]) if row is not None else None


def _count_wrong_pin(database: Database, link: ShareLink, policy: SharePolicy, failed: int,
                     address: str, device: str) -> bool:
    """Record the wrong PIN of attempt number ``failed`` (already counted); lock the link when
    the count has reached the limit. True when this attempt locked it."""
    now = utcnow()
    with database.write_transaction() as session:
        locked = session.execute(
            update(ShareLink).where(ShareLink.id == link.id, ShareLink.locked_at.is_(None),
                                    ShareLink.failed_attempts >= policy.max_failed_pins)
            .values(locked_at=now).returning(ShareLink.id)).first() is not None
        who = share_who(link.public_id)
        audit.append(session, audit.USER_AUTHENTICATION, action="E",
                     outcome=audit.OUTCOME_MINOR_FAILURE, who=who, source_address=address,
                     details={"type": audit.LOGIN, "share_exchange": True,
                              "reason": "wrong PIN", "failed": failed, "device": device})
        if locked:
            audit.append(session, audit.SECURITY_ALERT, action="E",
                         outcome=audit.OUTCOME_SERIOUS_FAILURE, who=who,
                         source_address=address,
                         study_instance_uid=link.studies[0].study_instance_uid
                         if link.studies else "",
                         details={"type": audit.OBJECT_SECURITY_CHANGED,
                                  "share": link.public_id,
                                  "reason": f"link locked after {failed} wrong PINs"})
    return locked


def link_note(session: Session, public_id: str) -> tuple[str, str] | None:
    """The note a link carries for the person it was made for, and its sender's name as he
    writes it; None without a note (issue 20 item 5)."""
    row = session.execute(
        select(ShareLink.message, User.display_name)
        .outerjoin(User, User.id == ShareLink.created_by_fk)
        .where(ShareLink.public_id == public_id)).first()
    if row is None or not row[0]:
        return None
    return str(row[0]), str(row[1] or "")


def find_link(database: Database, token: str) -> ShareLink | None:
    """The link with this token (studies loaded), or None; reads only."""
    if not looks_like_token(token):
        return None
    with database.new_session() as session:
        return session.scalars(select(ShareLink).options(selectinload(ShareLink.studies))
                               .where(ShareLink.token_sha256 == token_digest(token))).first()


def exchange(database: Database, policy: SharePolicy, *, token: str, pin: str,
             address: str, device: str, record_unavailable: bool = True) -> Exchanged:
    """Exchange a link (and its PIN) for a share session.

    Raises LinkUnavailable (unknown, expired, pending, revoked, locked: one answer),
    PinRequired, WrongPin or LinkLocked. ``record_unavailable`` False: an unknown or ended
    link is not audited (while guessing is refused wholesale, the alert already says so).
    Each attempt is counted by an atomic UPDATE before
    the PIN is checked (outside any transaction: scrypt is slow), so parallel guesses never
    get more checks than the limit; the success is a second atomic UPDATE that resets the
    count and fails if the link locked meanwhile.
    """
    link = find_link(database, token)
    now = utcnow()
    if link is None or link_state(link, now) != "active":
        if record_unavailable:
            who = share_who(link.public_id) if link is not None else "share:unknown"
            _record_failure(database, who, address,
                            link_state(link, now) if link is not None else "unknown link",
                            device)
        raise LinkUnavailable
    if link.pin_hash:
        if not pin.strip():
            raise PinRequired
        failed = _reserve_attempt(database, link, policy)
        if failed is None:
            _record_failure(database, share_who(link.public_id), address,
                            "no attempt left", device)
            raise LinkUnavailable
        if not verify_pin(pin.strip(), link.pin_hash, policy.pepper):
            if _count_wrong_pin(database, link, policy, failed, address, device):
                raise LinkLocked
            raise WrongPin(max(1, policy.max_failed_pins - failed))
    purpose: Literal["view", "claim"] = "claim" if link.requires_sign_in else "view"
    session_token = secrets.token_urlsafe(32)
    with database.write_transaction() as session:
        row = session.execute(
            update(ShareLink).where(ShareLink.id == link.id, *_active_conditions(now))
            .values(failed_attempts=0, use_count=ShareLink.use_count + 1, last_used_at=now,
                    first_used_at=func.coalesce(ShareLink.first_used_at, now))
            .returning(ShareLink.use_count)).first()
        if row is None:
            raise LinkUnavailable  # locked, revoked or expired since it was read
        session.add(ShareSession(token_sha256=token_digest(session_token), share_fk=link.id,
                                 purpose=purpose, created_at=now, last_seen_at=now,
                                 expires_at=min(now + policy.session_absolute,
                                                link.expires_at),
                                 source_address=address[:64], device_class=device[:16]))
        audit.append(session, audit.USER_AUTHENTICATION, action="E",
                     outcome=audit.OUTCOME_SUCCESS, who=share_who(link.public_id),
                     source_address=address,
                     study_instance_uid=link.studies[0].study_instance_uid
                     if link.studies else "",
                     details={"type": audit.LOGIN, "share_exchange": True,
                              "share": link.public_id, "device": device,
                              "purpose": purpose})
    return Exchanged(session_token=session_token, public_id=link.public_id,
                     study_uids=tuple(s.study_instance_uid for s in link.studies),
                     purpose=purpose, first_use=int(row[0]) == 1,
                     notify_sender=link.notify_sender, created_by_fk=link.created_by_fk)


def end_share_session(database: Database, session_token: str) -> None:
    """Forget a share session (the visitor closed it)."""
    with database.write_transaction() as session:
        session.execute(delete(ShareSession).where(
            ShareSession.token_sha256 == token_digest(session_token)))
    from portal.sharing.sessions import forget_cached_visits

    forget_cached_visits()


def claim_for_colleague(session: Session, user: Principal, link_id: int) -> list[str]:
    """A colleague who signed in through a sign-in link gets a grant on its studies, until
    the link's own expiry.

    The link works once: it is revoked by the claim. Each grant is audited (110135) by
    ``create_grant`` with the link as the actor.
    """
    link = session.scalars(select(ShareLink).options(selectinload(ShareLink.studies))
                           .where(ShareLink.id == link_id).with_for_update()).first()
    if link is None or link_state(link) != "active" or not link.requires_sign_in:
        raise LinkUnavailable
    if not allowed(user, "account"):
        raise ShareError("sign in to accept this link")
    actor = Principal("share", link.id, "share link", share_id=link.public_id, via="share")
    uids = [s.study_instance_uid for s in link.studies]
    for uid in uids:
        # The grant lasts as long as the sender meant the link to (docs/security.md 15).
        create_grant(session, actor, user_id=user.id, study_uid=uid,
                     expires_at=link.expires_at,
                     reason=f"colleague share link {link.public_id}")
    link.revoked_at, link.revoked_by = utcnow(), f"claimed by {user.audit_name}"
    session.execute(delete(ShareSession).where(ShareSession.share_fk == link.id))
    return uids


def record_delivery(link: ShareLink, what: str, channel: str, to_digest: str) -> None:
    """Remember that the link or its PIN went out by a channel (no address is stored)."""
    link.deliveries = [*link.deliveries, {"what": what, "channel": channel,
                                          "to_sha256": to_digest,
                                          "at": utcnow().isoformat(timespec="seconds")}]


def sender_language(session: Session, link: ShareLink) -> str:
    """The language the person who made the link chose for his account ('' if none)."""
    if link.created_by_fk is None:
        return ""
    user = session.get(User, link.created_by_fk)
    return user.language if user is not None and user.language in SUPPORTED else ""


def sender_email(session: Session, link: ShareLink) -> str:
    """The e-mail address of the person who made the link ("" if unknown)."""
    if link.created_by_fk is None:
        return ""
    user = session.get(User, link.created_by_fk)
    return user.email if user is not None else ""


# -- who opened the images -------------------------------------------------------------------

@dataclass(frozen=True)
class Access:
    """One access to a shared study, as the audit trail recorded it."""

    at: datetime
    what: str
    who: str
    address: str
    device: str
    outcome: int


# Shown to people (translated when a page renders them: portal/i18n.py).
_EVENT_WORDS = {audit.INSTANCES_ACCESSED[0]: _l("looked at the images"),
                audit.INSTANCES_TRANSFERRED[0]: _l("downloaded the images"),
                audit.EXPORT[0]: _l("downloaded the images"),
                audit.USER_AUTHENTICATION[0]: _l("opened the link")}


def _who_label(who: str, own: str, names: Mapping[str, str]) -> str:
    if who == own:
        return str(_l("You (with this link)"))
    if who.startswith("share:"):
        return str(_l("Someone with another share link"))
    if who.startswith("machine:"):
        return str(_l("An imaging system"))
    if who.startswith("user:"):
        return names.get(who) or str(_l("A portal user"))
    return str(_l("Someone"))


def accesses(session: Session, link: ShareLink, limit: int = 200, *,
             others_addresses: bool = True) -> list[Access]:
    """Each view and download of the link's studies and each opening of the link, newest
    first (from the audit trail; the patient's "Who opened my images").

    ``others_addresses=False`` (the visitor's own page) keeps the network address only of
    this link's own uses: staff and other link holders are named, not located.
    """
    own = share_who(link.public_id)
    rows: dict[int, Any] = {}
    for event in (audit.INSTANCES_ACCESSED[0], audit.INSTANCES_TRANSFERRED[0],
                  audit.EXPORT[0]):
        for shared in link.studies:
            for row in audit.iter_events(session, study=shared.study_instance_uid,
                                         event_id=event, limit=limit):
                rows[row.id] = row
    for row in audit.iter_events(session, who=own, event_id=audit.USER_AUTHENTICATION[0],
                                 limit=limit):
        if row.who == own:
            rows[row.id] = row
    user_keys = {r.who for r in rows.values() if r.who.startswith("user:")}
    subjects = sorted({key.partition("|")[2] for key in user_keys})
    people: dict[str, str] = {}
    for user in session.scalars(select(User).where(User.subject.in_(subjects))):
        key = f"user:{user.issuer}|{user.subject}"
        if key in user_keys:
            people[key] = user.display_name or user.email or "A portal user"
    out = []
    for row in sorted(rows.values(), key=lambda r: r.id, reverse=True)[:limit]:
        what = str(_EVENT_WORDS.get(row.event_id, _l("used")))
        out.append(Access(at=row.occurred_at, what=what,
                          who=_who_label(row.who, own, people),
                          address=row.source_address
                          if others_addresses or row.who == own else "",
                          device=str((row.details or {}).get("device", "")),
                          outcome=row.outcome))
    return out
