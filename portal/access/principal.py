"""Who is asking: ``current_principal()`` is the one answer for every route."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Literal

from flask import g, request

from portal.access import clients
from portal.db import db


@dataclass(frozen=True)
class Principal:
    """An authenticated caller and the rights the portal itself gave it."""

    kind: Literal["machine"]
    id: int
    name: str
    can_read_all: bool
    can_store: bool

    @property
    def audit_name(self) -> str:
        """How the audit trail names this caller."""
        return f"{self.kind}:{self.name}"


def _basic_credentials() -> tuple[str, str] | None:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic" or not value or len(value) > 1024:
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    name, sep, secret = decoded.partition(":")
    return (name, secret) if sep else None


def load_principal() -> Principal | None:
    """Authenticate the request from its credentials (HTTP Basic for machine clients)."""
    credentials = _basic_credentials()
    if credentials is None:
        return None
    client = clients.authenticate(db.session, *credentials)
    if client is None:
        return None
    return Principal("machine", client.id, client.name, client.can_read, client.can_store)


def current_principal() -> Principal | None:
    """The principal of this request, or None for an anonymous one."""
    if "principal" not in g:
        g.principal = load_principal()
    principal: Principal | None = g.principal
    return principal
