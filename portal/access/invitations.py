"""Invitations: a one-time link that gives roles to whoever signs in through it.

The e-mail address only labels the invitation for the office manager; the account that
redeems it is still the (issuer, subject) the identity provider proves. Only the SHA-256 of
the token is stored; it works once and for seven days.
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from portal import audit
from portal.access.models import Invitation, ReferrerIdentifier, User
from portal.access.principal import Principal
from portal.access.users import UserError, check_manager_practice, check_role, practice_for
from portal.db import utcnow
from portal.index.referrers import parse_key

LIFETIME = timedelta(days=7)


def invitation_digest(token: str) -> str:
    """What is stored (and kept in the browser's session until sign-in) instead of the token."""
    return hashlib.sha256(token.encode("ascii", "replace")).hexdigest()


def create_invitation(session: Session, actor: Principal, *, email: str, roles: list[str],
                      practice: str = "", referrer_keys: list[str] | None = None) -> str:
    """Make an invitation and return its token (shown once, never stored); ``referrer_keys``
    (identifiers studies name a new physician by) are linked to whoever redeems it."""
    if not roles:
        raise UserError("an invitation gives at least one role")
    keys = _referrer_keys(session, referrer_keys or [])
    chosen = practice_for(session, actor, practice)
    check_manager_practice(actor, roles, chosen.id if chosen else None)
    token = secrets.token_urlsafe(32)
    now = utcnow()
    invitation = Invitation(
        token_sha256=invitation_digest(token), email=email.strip()[:256],
        roles=sorted({check_role(r) for r in roles}),
        practice_fk=chosen.id if chosen else None,
        referrer_keys=keys, created_by=actor.audit_name, created_at=now,
        expires_at=now + LIFETIME)
    session.add(invitation)
    session.flush()
    audit.append(session, audit.SECURITY_ALERT, action="C", outcome=audit.OUTCOME_SUCCESS,
                 who=actor.audit_name, details={"type": audit.USER_SECURITY_CHANGED,
                                                "invitation": invitation.id,
                                                "roles": invitation.roles,
                                                "identifiers": keys})
    return token


def _referrer_keys(session: Session, texts: list[str]) -> list[str]:
    """Normalised keys, none already linked to someone (UserError naming the first)."""
    keys = []
    for text in texts[:20]:
        try:
            key = parse_key(text)
        except ValueError as exc:
            raise UserError(str(exc)) from exc
        if session.scalar(select(ReferrerIdentifier.id).where(ReferrerIdentifier.key == key)):
            raise UserError("%(key)s is already linked to someone", key=text)
        keys.append(key)
    return list(dict.fromkeys(keys))


def redeem_invitation(session: Session, digest: str, user: User) -> bool:
    """Give the roles and practice of the invitation whose token has this
    :func:`invitation_digest` to ``user``; False if unusable."""
    if len(digest) != 64:
        return False
    invitation = session.scalars(select(Invitation).where(
        Invitation.token_sha256 == digest).with_for_update()).first()
    if invitation is None or invitation.used_at is not None or invitation.expires_at <= utcnow():
        return False
    invitation.used_at, invitation.used_by_fk = utcnow(), user.id
    user.roles = sorted(set(user.roles) | set(invitation.roles))
    if invitation.practice_fk is not None:
        user.practice_fk = invitation.practice_fk
    for key in invitation.referrer_keys or []:
        # A key linked to someone else since the invitation was made stays theirs.
        if session.scalar(select(ReferrerIdentifier.id).where(ReferrerIdentifier.key == key)):
            continue
        session.add(ReferrerIdentifier(user_fk=user.id, key=key, created_by=invitation.created_by,
                                       created_at=utcnow()))
    audit.append(session, audit.SECURITY_ALERT, action="U", outcome=audit.OUTCOME_SUCCESS,
                 who=f"user:{user.issuer}|{user.subject}",
                 details={"type": audit.USER_SECURITY_CHANGED, "invitation": invitation.id,
                          "roles": user.roles, "identifiers": invitation.referrer_keys or []})
    return True
