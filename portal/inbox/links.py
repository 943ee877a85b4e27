"""Upload links: made by a physician or office manager for a patient, exchanged (token and
PIN) for a short upload session. Tokens, PINs, expiry limits and the PIN lock follow share
links' rules and code (``portal.sharing.tokens``, ``SharePolicy``; docs/security.md 16, 20)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from portal import audit, failures
from portal.access.principal import Principal
from portal.db import Database, utcnow
from portal.inbox.models import UploadLink, UploadSession

# The PIN answers are share links' own: the same rules, the same words (docs/security.md 16).
from portal.sharing.service import LinkLocked as LinkLocked
from portal.sharing.service import PinRequired as PinRequired
from portal.sharing.service import SharePolicy
from portal.sharing.service import WrongPin as WrongPin
from portal.sharing.tokens import (
    hash_pin,
    looks_like_token,
    new_pin,
    new_token,
    token_digest,
    verify_pin,
)

SESSION_LIFETIME = timedelta(hours=4)  # long enough for a CD over a slow phone connection


class UploadLinkError(failures.Invalid):
    """An upload link cannot be made or changed as asked (400)."""


class LinkUnavailable(failures.NotFound):
    """Unknown, expired, revoked or locked: one answer for all (docs/security.md 16)."""

    default_reason = "this upload link is not valid (any more)"


@dataclass(frozen=True)
class NewUploadLink:
    """A link just made: token and PIN exist only here and are shown once."""

    link: UploadLink
    token: str
    pin: str


def link_state(link: UploadLink, now: datetime | None = None) -> str:
    """active, expired, revoked or locked."""
    now = now or utcnow()
    if link.revoked_at is not None:
        return "revoked"
    if link.locked_at is not None:
        return "locked"
    if link.expires_at <= now:
        return "expired"
    return "active"


def may_make_links(actor: Principal) -> bool:
    """Physicians and office managers of a practice."""
    return (actor.kind == "user" and actor.practice_id is not None
            and (actor.has_role("physician") or actor.has_role("office_manager")))


def create_link(session: Session, actor: Principal, policy: SharePolicy, *, for_whom: str,
                days: int | None = None) -> NewUploadLink:
    """A link into the actor's practice's inbox, always with a PIN; audited (110113)."""
    if not may_make_links(actor) or actor.practice_id is None:
        raise UploadLinkError("only physicians and office managers of a practice make "
                              "upload links")
    days = policy.default_days if days is None else days
    if not 1 <= days <= policy.max_days:
        raise UploadLinkError("a link lasts 1 to %(days)d days", days=policy.max_days)
    for_whom = " ".join(for_whom.split())[:200]
    if not for_whom:
        raise UploadLinkError("say whom the link is for (the patient's name)")
    now = utcnow()
    token, pin = new_token(), new_pin(policy.pin_digits)
    link = UploadLink(public_id=str(uuid.uuid4()), token_sha256=token_digest(token),
                      practice_fk=actor.practice_id, for_whom=for_whom,
                      created_by=actor.audit_name, created_by_fk=actor.id, created_at=now,
                      expires_at=now + timedelta(days=days),
                      pin_hash=hash_pin(pin, policy.pepper), failed_attempts=0, use_count=0)
    session.add(link)
    session.flush()
    audit.append(session, audit.SECURITY_ALERT, action="C", outcome=audit.OUTCOME_SUCCESS,
                 who=actor.audit_name,
                 details={"type": audit.OBJECT_SECURITY_CHANGED, "upload_link": link.public_id,
                          "expires": link.expires_at.isoformat()})
    return NewUploadLink(link, token, pin)


def practice_links(session: Session, actor: Principal, limit: int = 200) -> list[UploadLink]:
    """The upload links of the actor's practice (office managers) or his own (physicians)."""
    stmt = select(UploadLink).where(UploadLink.practice_fk == actor.practice_id)
    if not actor.has_role("office_manager"):
        stmt = stmt.where(UploadLink.created_by_fk == actor.id)
    return list(session.scalars(stmt.order_by(UploadLink.id.desc()).limit(limit)))


def revoke_link(session: Session, actor: Principal, public_id: str) -> UploadLink:
    """Revoke a link of the practice; its upload sessions end at once."""
    link = next((x for x in practice_links(session, actor, limit=100_000)
                 if x.public_id == public_id), None)
    if link is None:
        raise LinkUnavailable("no such link")
    if link.revoked_at is None:
        link.revoked_at, link.revoked_by = utcnow(), actor.audit_name
        session.execute(delete(UploadSession).where(UploadSession.link_fk == link.id))
        audit.append(session, audit.SECURITY_ALERT, action="U", outcome=audit.OUTCOME_SUCCESS,
                     who=actor.audit_name,
                     details={"type": audit.OBJECT_SECURITY_CHANGED,
                              "upload_link": link.public_id, "revoked": True})
    return link


def link_who(link: UploadLink) -> str:
    """How the audit trail names the visitor of an upload link."""
    return f"upload:{link.public_id}"


def exchange(database: Database, policy: SharePolicy, *, token: str, pin: str,
             address: str) -> tuple[str, UploadLink]:
    """Exchange token and PIN for an upload session: (cookie value, link).

    Each attempt is counted by one atomic UPDATE before the PIN is checked and the link locks
    at the share links' limit, as share links do (docs/security.md 20)."""
    link = None
    if looks_like_token(token):
        with database.new_session() as session:
            link = session.scalars(select(UploadLink).where(
                UploadLink.token_sha256 == token_digest(token))).first()
    if link is None or link_state(link) != "active":
        audit.record(database, audit.USER_AUTHENTICATION, action="E",
                     outcome=audit.OUTCOME_MINOR_FAILURE,
                     who=link_who(link) if link else "upload:unknown", source_address=address,
                     details={"type": audit.LOGIN, "upload_link": True,
                              "reason": "unknown or ended link"})
        raise LinkUnavailable()
    if not pin:
        raise PinRequired()
    with database.write_transaction() as session:
        row = session.execute(
            update(UploadLink).where(UploadLink.id == link.id, UploadLink.locked_at.is_(None),
                                     UploadLink.failed_attempts < policy.max_failed_pins)
            .values(failed_attempts=UploadLink.failed_attempts + 1)
            .returning(UploadLink.failed_attempts)).first()
    if row is None:
        raise LinkUnavailable()
    failed = int(row[0])
    if not verify_pin(pin[:32], link.pin_hash, policy.pepper):
        with database.write_transaction() as session:
            locked = session.execute(
                update(UploadLink).where(UploadLink.id == link.id,
                                         UploadLink.locked_at.is_(None),
                                         UploadLink.failed_attempts >= policy.max_failed_pins)
                .values(locked_at=utcnow()).returning(UploadLink.id)).first() is not None
            audit.append(session, audit.USER_AUTHENTICATION, action="E",
                         outcome=audit.OUTCOME_MINOR_FAILURE, who=link_who(link),
                         source_address=address,
                         details={"type": audit.LOGIN, "upload_link": True,
                                  "reason": "wrong PIN", "failed": failed})
            if locked:
                audit.append(session, audit.SECURITY_ALERT, action="E",
                             outcome=audit.OUTCOME_SERIOUS_FAILURE, who=link_who(link),
                             source_address=address,
                             details={"type": audit.OBJECT_SECURITY_CHANGED,
                                      "upload_link": link.public_id,
                                      "reason": f"link locked after {failed} wrong PINs"})
        if locked:
            raise LinkLocked()
        raise WrongPin(policy.max_failed_pins - failed)
    cookie, now = new_token(), utcnow()
    with database.write_transaction() as session:
        done = session.execute(
            update(UploadLink).where(UploadLink.id == link.id, UploadLink.locked_at.is_(None),
                                     UploadLink.revoked_at.is_(None))
            .values(failed_attempts=0, use_count=UploadLink.use_count + 1)
            .returning(UploadLink.id)).first()
        if done is None:
            raise LinkUnavailable()
        session.add(UploadSession(token_sha256=token_digest(cookie), link_fk=link.id,
                                  created_at=now,
                                  expires_at=min(now + SESSION_LIFETIME, link.expires_at)))
        audit.append(session, audit.USER_AUTHENTICATION, action="E",
                     outcome=audit.OUTCOME_SUCCESS, who=link_who(link), source_address=address,
                     details={"type": audit.LOGIN, "upload_link": True})
    return cookie, link


def session_link(session: Session, cookie: str) -> UploadLink | None:
    """The active link behind an upload-session cookie, or None (ended, revoked, unknown)."""
    if not looks_like_token(cookie):
        return None
    now = utcnow()
    found = session.execute(
        select(UploadSession, UploadLink).join(UploadLink, UploadSession.link_fk == UploadLink.id)
        .where(UploadSession.token_sha256 == token_digest(cookie))).first()
    if found is None:
        return None
    upload_session, link = found
    if upload_session.expires_at <= now or link_state(link, now) != "active":
        return None
    return link
