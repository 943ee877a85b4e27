"""People: created at first sign-in by (issuer, subject), given roles by office managers."""

from __future__ import annotations

from contextlib import suppress

from sqlalchemy import ColumnElement, or_, select, true
from sqlalchemy.orm import Session

from portal import failures
from portal.access.models import Practice, User
from portal.access.principal import Principal
from portal.db import utcnow
from portal.notify import DeliveryFailed, clean_phone

# report_sender: a RIS or reporting system that may post reports (FHIR DiagnosticReport).
ROLES = ("office_manager", "physician", "staff", "patient", "report_sender")


class UserError(failures.Invalid, ValueError):
    """The change cannot be made as asked; the message says why."""


def check_role(role: str) -> str:
    """A known role name, or UserError."""
    if role not in ROLES:
        raise UserError("unknown role %(role)s; roles are %(roles)s", role=repr(role[:40]),
                        roles=", ".join(ROLES))
    return role


def sign_in_user(session: Session, *, issuer: str, subject: str, email: str, name: str,
                 idp_roles: tuple[str, ...] | None, phone_number: str = "") -> User:
    """Find or create the user for (issuer, subject); refresh the profile from the token.

    ``idp_roles`` are the roles the provider asserts in the configured claim (None when no
    claim is configured, or for a bearer token, which asserts none). They are added; a role the
    provider asserted at an earlier sign-in and no longer asserts is taken away (the hospital
    removed it), with a 110137 record; roles given in the portal stay. The e-mail is kept for
    display only and never used to match an account. ``phone_number`` is a number the provider
    marked verified: it replaces the mobile number for notices when it is one (international
    form); without one, the number an office manager set stays.
    """
    from portal import audit

    user = session.scalars(select(User).where(User.issuer == issuer,
                                              User.subject == subject)).first()
    if user is None:
        user = User(issuer=issuer, subject=subject, roles=[], idp_roles=[], active=True,
                    security_epoch=0)
        session.add(user)
    user.email = email
    user.display_name = name
    if phone_number:
        # Without a country code, or not a phone number: not one a text message can reach.
        with suppress(DeliveryFailed):
            user.phone_number = clean_phone(phone_number)
    if idp_roles is not None:
        asserted = {r for r in idp_roles if r in ROLES}
        withdrawn = set(user.idp_roles or ()) - asserted
        roles = (set(user.roles) - withdrawn) | asserted
        if roles != set(user.roles):
            before, user.roles = user.roles, sorted(roles)
            if withdrawn & set(before):
                user.security_epoch += 1  # the person's other sessions end
            if user.id is not None:
                audit.append(session, audit.SECURITY_ALERT, action="U",
                             outcome=audit.OUTCOME_SUCCESS, who=f"idp:{issuer}",
                             details={"type": audit.USER_SECURITY_CHANGED,
                                      "user": f"{issuer}|{subject}", "roles": user.roles,
                                      "by": "identity provider"})
        if sorted(asserted) != sorted(user.idp_roles or ()):
            user.idp_roles = sorted(asserted)
    user.last_login_at = utcnow()
    session.flush()
    return user


def find_users(session: Session, who: str) -> list[User]:
    """Users whose subject or e-mail is ``who`` (for the CLI, where a person types it)."""
    return list(session.scalars(select(User).where(or_(User.subject == who,
                                                       User.email == who))))


def set_roles(session: Session, user: User, roles: list[str]) -> None:
    """Replace a user's roles; existing sessions must re-check (security epoch moves on)."""
    user.roles = sorted({check_role(r) for r in roles})
    # A role an office manager takes away is no longer the provider's to take away again.
    user.idp_roles = [r for r in user.idp_roles or () if r in user.roles]
    user.security_epoch += 1


def set_active(session: Session, user: User, active: bool) -> None:
    """Activate or deactivate a user; deactivation ends every session at once."""
    user.active = active
    user.security_epoch += 1


def managed_practice(actor: Principal) -> int | None:
    """The practice a person acting as its manager is bound to; None for a manager of no
    practice (the installation's), a machine or the command line, which are not."""
    return actor.practice_id if actor.kind == "user" else None


def people_condition(actor: Principal) -> ColumnElement[bool]:
    """SQL on ``User``: the accounts a manager lists, finds and changes. A manager of a
    practice: those of his practice and of none (a newcomer he may put into it), not
    another practice's people (names, e-mail addresses, mobile numbers); the installation's
    manager: everybody."""
    ours = managed_practice(actor)
    if ours is None:
        return true()
    return or_(User.practice_fk == ours, User.practice_fk.is_(None))


def practice_for(session: Session, actor: Principal, name: str) -> Practice | None:
    """The practice ``actor`` puts someone into (an account, an invitation): None for ""
    (none). An office manager of a practice names only his own: another practice's studies
    would open to it through the person."""
    practice = get_or_create_practice(session, name) if name.strip() else None
    ours = managed_practice(actor)
    if ours is not None and practice is not None and practice.id != ours:
        raise UserError("you can only add people to your own practice")
    return practice


def check_manager_practice(actor: Principal, roles: list[str], practice_id: int | None) -> None:
    """A practice's manager makes or changes office managers of his practice only: one of no
    practice is the installation's, who grants any study (``grants.grant_one``)."""
    ours = managed_practice(actor)
    if ours is not None and "office_manager" in roles and practice_id != ours:
        raise UserError("the office managers you make or change belong to your practice")


def get_or_create_practice(session: Session, name: str) -> Practice:
    """The practice with this name, made if new."""
    name = name.strip()[:128]
    if not name:
        raise UserError("a practice needs a name")
    practice = session.scalars(select(Practice).where(Practice.name == name)).first()
    if practice is None:
        practice = Practice(name=name)
        session.add(practice)
        session.flush()
    return practice
