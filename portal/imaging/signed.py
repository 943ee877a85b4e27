"""Signed rendition URLs: the viewer's tickets to cached images (issue 17, docs/architecture.md
"The path of an image" ⑤ and ⑥).

The viewer page, once access has allowed the series, hands the viewer one token per image:
``exp.sha256.mac``, where ``mac`` is an HMAC over study, series, instance, the stored
content's SHA-256 and the expiry, under a key derived from the application secret and the
browser's session cookies (the portal session and the share session). A token is therefore
worthless without the cookies it was given to, and says which content (hence which cache key)
the image is, so the front of the stack (``portal/dicomweb/signed.py``) can answer a cached
rendition without the database. It never replaces the session: whether that session is
still alive is asked of the full path every few seconds (docs/security.md 28: keys name
content, never a person; access is decided before the cache is asked).

Pure: no Flask, no database query except ``content_digests`` (one SELECT, no fetching).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Iterable, Mapping

from sqlalchemy import select
from sqlalchemy.orm import Session

from portal.archive.models import StoredObject

QUERY_PARAM = "t"  # the query parameter carrying the token
_HOUR = 3600
_SHA256_HEX = frozenset("0123456789abcdef")


class BadToken(Exception):
    """A token that does not open this image for these cookies; the message says why."""


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


class Signer:
    """Makes and checks rendition tokens bound to a browser's session cookies."""

    def __init__(self, secret: str | bytes, cookie_names: Iterable[str]) -> None:
        raw = secret.encode() if isinstance(secret, str) else secret
        # A key of its own, so no other use of the application secret can forge a token.
        self._root = hmac.new(raw, b"portal signed renditions v1", hashlib.sha256).digest()
        self.cookie_names = tuple(cookie_names)

    def identity(self, cookies: Mapping[str, str]) -> str | None:
        """What a token is bound to: the session cookies' values (None without any)."""
        values = [cookies.get(name, "")[:200] for name in self.cookie_names]
        return "\0".join(values) if any(values) else None

    def _mac(self, identity: str, study: str, series: str, instance: str, sha256: str,
             expires: int) -> str:
        key = hmac.new(self._root, identity.encode("utf-8", "replace"),
                       hashlib.sha256).digest()
        message = f"{study}/{series}/{instance}/{sha256}/{expires}".encode("utf-8", "replace")
        return _b64(hmac.new(key, message, hashlib.sha256).digest()[:18])

    def sign(self, identity: str, study: str, series: str, instance: str, sha256: str,
             now: float) -> str:
        """A token valid one to two hours: the expiry is a whole hour, so every page of the
        same hour hands out the same URLs and the browser's own cache keeps serving them."""
        expires = (int(now) // _HOUR + 2) * _HOUR
        return f"{expires}.{sha256}.{self._mac(identity, study, series, instance, sha256, expires)}"

    def verify(self, identity: str, study: str, series: str, instance: str, token: str,
               now: float) -> str:
        """The content SHA-256 the token names; BadToken when it is malformed, expired or
        made for other cookies or another image."""
        expires_text, _, rest = token.partition(".")
        sha256, _, mac = rest.partition(".")
        if not (expires_text.isdigit() and len(expires_text) < 12 and len(sha256) == 64
                and set(sha256) <= _SHA256_HEX and mac):
            raise BadToken("the rendition token is malformed")
        expires = int(expires_text)
        expected = self._mac(identity, study, series, instance, sha256, expires)
        if not hmac.compare_digest(expected.encode(), mac.encode("ascii", "replace")):
            raise BadToken("the rendition token was not given to this session for this image")
        if expires <= now:
            raise BadToken("the rendition token has expired; reload the page")
        return sha256


def content_digests(session: Session, instance_uids: list[str]) -> dict[str, str]:
    """The stored content SHA-256 of each instance held here (one query; instances only an
    external archive holds yet are left out: their images take the full path)."""
    found: dict[str, str] = {}
    for start in range(0, len(instance_uids), 1000):
        chunk = instance_uids[start:start + 1000]
        found.update((uid, sha256) for uid, sha256 in session.execute(
            select(StoredObject.sop_instance_uid, StoredObject.sha256)
            .where(StoredObject.sop_instance_uid.in_(chunk))))
    return found


def sign_series(signer: Signer | None, cookies: Mapping[str, str], session: Session,
                study: str, series: str, instance_uids: list[str], now: float
                ) -> dict[str, str]:
    """A token for each image of a series the caller was just allowed to see (by the page
    that asks), bound to the caller's session cookies; none without a cookie session."""
    identity = signer.identity(cookies) if signer is not None else None
    if signer is None or identity is None:
        return {}
    return {uid: signer.sign(identity, study, series, uid, sha256, now)
            for uid, sha256 in content_digests(session, instance_uids).items()}
