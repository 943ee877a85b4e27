"""Machine clients (modalities, scripts, other archives) with HTTP Basic credentials."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from typing import NamedTuple

from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session

from portal import failures
from portal.access.models import MachineClient

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class ClientError(failures.Invalid, ValueError):
    """The client cannot be created as asked."""


def _digest(secret: str) -> str:
    # The secret is 256 random bits, so a fast hash is enough: there is nothing to guess.
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def create_client(session: Session, name: str, *, can_read: bool, can_store: bool) -> str:
    """Register a client and return its secret; only a hash of it is kept."""
    if not _NAME.match(name):
        raise ClientError("client names are 1-64 letters, digits, '.', '_' or '-'")
    if session.scalars(select(MachineClient).where(MachineClient.name == name)).first():
        raise ClientError(f"a client named {name!r} already exists")
    secret = secrets.token_urlsafe(32)
    session.add(MachineClient(name=name, secret_sha256=_digest(secret), can_read=can_read,
                              can_store=can_store, active=True))
    session.flush()
    return secret


class Client(NamedTuple):
    """What a request needs of the client it authenticated."""

    id: int
    name: str
    can_read: bool
    can_store: bool


# Every request of a modality or script reads this row (STOW-RS one instance a request: 150
# a series): columns through Core, 114 us a request here against 261 us for the ORM object
# (benchmarks/README.md, "One instance per request: where the rest goes").
_CLIENT = select(MachineClient.id, MachineClient.name, MachineClient.can_read,
                 MachineClient.can_store, MachineClient.secret_sha256, MachineClient.active
                 ).where(MachineClient.name == bindparam("name"))


def authenticate(session: Session, name: str, secret: str) -> Client | None:
    """The active client with these credentials, or None (constant-time comparison); read
    at every request, so a client turned off is refused at once."""
    if not _NAME.match(name) or len(secret) > 256:
        return None
    row = session.connection().execute(_CLIENT, {"name": name}).first()
    expected = row.secret_sha256 if row is not None else "0" * 64
    ok = hmac.compare_digest(expected, _digest(secret))
    return Client(*row[:4]) if ok and row is not None and row.active else None


def deactivate_client(session: Session, name: str) -> bool:
    """Turn a client off at once; return False when there is no such client."""
    client = session.scalars(select(MachineClient).where(MachineClient.name == name)).first()
    if client is None:
        return False
    client.active = False
    return True
