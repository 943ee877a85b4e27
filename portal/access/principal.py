"""Who is asking: ``current_principal()`` is the one answer for every route.

A principal comes from exactly one of: HTTP Basic credentials of a machine client, an
``Authorization: Bearer`` access token from the configured issuer, a share session (a patient
or colleague who opened a share link), or the browser session.

Access imports no domain (docs/architecture.md "What may import what"): the packages that
know bearer tokens (``auth.bearer``) and share sessions (``sharing.sessions``) register their
loaders here when the app is built (``register_bearer``, ``register_visitor``).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from flask import Flask, current_app, g, request, session
from werkzeug.datastructures import WWWAuthenticate

from portal.access import clients
from portal.access.models import User
from portal.db import db


@dataclass(frozen=True)
class Principal:
    """An authenticated caller and the rights the portal itself gave it."""

    kind: Literal["machine", "user", "share"]
    id: int
    name: str
    can_read_all: bool = False
    can_store: bool = False
    roles: frozenset[str] = field(default_factory=frozenset)
    practice_id: int | None = None
    issuer: str = ""
    subject: str = ""
    via: Literal["basic", "bearer", "session", "share"] = "session"
    # A share-link visitor: the link's public id, the studies it opens, whether to download.
    share_id: str = ""
    share_studies: frozenset[str] = field(default_factory=frozenset)
    # Series the link is limited to (empty: every series of its studies).
    share_series: frozenset[str] = field(default_factory=frozenset)
    can_download: bool = True
    # Whom the link was made for ("patient" or "physician"): a patient reads plain words.
    share_audience: str = ""

    @property
    def audit_name(self) -> str:
        """How the audit trail names this caller: (issuer, subject) for people."""
        if self.kind == "machine":
            return f"machine:{self.name}"
        if self.kind == "share":
            return f"share:{self.share_id}"
        return f"user:{self.issuer}|{self.subject}"

    def has_role(self, role: str) -> bool:
        """True when the principal holds this role."""
        return role in self.roles


@dataclass
class Loaders:
    """How principals other than machine clients and browser sessions are found: registered
    at start-up by the packages that know them."""

    # The active user a bearer token belongs to (None: refused), and the challenge of a 401.
    bearer: Callable[[str], User | None] | None = None
    challenge: Callable[[], WWWAuthenticate] | None = None
    # Visitors without an account (a share session), asked in order before the session.
    visitors: list[Callable[[], Principal | None]] = field(default_factory=list)


def loaders(app: Flask | None = None) -> Loaders:
    """The loaders registered with this app (none yet: an empty set)."""
    target = app if app is not None else current_app
    found: Loaders = target.extensions.setdefault("access.loaders", Loaders())
    return found


def register_bearer(app: Flask, user_for_token: Callable[[str], User | None],
                    challenge: Callable[[], WWWAuthenticate]) -> None:
    """Bearer tokens are understood by ``user_for_token``; a refused one is answered with
    ``challenge`` (RFC 6750)."""
    found = loaders(app)
    found.bearer, found.challenge = user_for_token, challenge


def register_visitor(app: Flask, loader: Callable[[], Principal | None]) -> None:
    """A kind of visitor without an account (a share session), asked before the session."""
    loaders(app).visitors.append(loader)


def user_principal(user: User, via: Literal["bearer", "session"]) -> Principal:
    """The principal of a signed-in person."""
    return Principal("user", user.id, user.display_name or user.email or user.subject,
                     roles=frozenset(user.roles), practice_id=user.practice_fk,
                     issuer=user.issuer, subject=user.subject, via=via)


def _authorization() -> tuple[str, str]:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    return scheme.lower(), value.strip()


def _basic_credentials(value: str) -> tuple[str, str] | None:
    if not value or len(value) > 1024:
        return None
    try:
        decoded = base64.b64decode(value, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    name, sep, secret = decoded.partition(":")
    return (name, secret) if sep and "\x00" not in decoded else None


def _from_session() -> Principal | None:
    user_fk = getattr(session, "user_fk", None)
    if user_fk is None:
        return None
    user = db.session.get(User, user_fk)
    # Flask types the session as its SessionMixin base; ours (auth.sessions) has the epoch.
    epoch = getattr(session, "security_epoch", None)
    if user is None or not user.active or user.security_epoch != epoch:
        # Deactivated or changed since this session began: it ends now.
        session.destroy()  # type: ignore[attr-defined]
        return None
    return user_principal(user, "session")


def load_principal() -> Principal | None:
    """Authenticate the request (Basic, Bearer or session cookie)."""
    scheme, value = _authorization()
    if scheme == "basic":
        credentials = _basic_credentials(value)
        client = clients.authenticate(db.session, *credentials) if credentials else None
        if client is None:
            return None
        return Principal("machine", client.id, client.name, can_read_all=client.can_read,
                         can_store=client.can_store, via="basic")
    found = loaders()
    if scheme == "bearer":
        user = found.bearer(value) if found.bearer is not None else None
        return user_principal(user, "bearer") if user is not None else None
    for visitor in found.visitors:
        principal = visitor()
        if principal is not None:
            return principal
    return _from_session()


def current_principal() -> Principal | None:
    """The principal of this request, or None for an anonymous one."""
    if "principal" not in g:
        g.principal = load_principal()
    principal: Principal | None = g.principal
    return principal
