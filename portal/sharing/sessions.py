"""Share sessions: the ``__Host-share`` cookie of a visitor who exchanged a link.

The cookie holds 256 random bits; the server keeps their SHA-256. Each request checks the
session's idle and absolute limits and the link's state (revoked, locked, expired), read from
the database or from this process's cache for at most ``SHARE_STATE_CACHE_SECONDS``
(docs/security.md 15: a revocation reaches every open viewer within ten seconds). A revocation
in this process empties the cache at once.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from flask import Flask, current_app, g, request
from sqlalchemy import delete, select, update
from werkzeug.wrappers import Response as BaseResponse

from portal.access.principal import Principal
from portal.db import Database, utcnow
from portal.sharing.models import ShareLink, ShareLinkStudy, ShareSession, link_state
from portal.sharing.tokens import token_digest

_TOUCH_EVERY = timedelta(seconds=60)


@dataclass(frozen=True)
class ShareVisit:
    """A live share session and what its link opens."""

    session_id: int
    link_id: int
    public_id: str
    purpose: str
    studies: frozenset[str]
    series: frozenset[str]  # empty: every series of the studies
    can_download: bool
    audience: str  # "patient" or "physician": whom the sender made the link for
    last_seen_at: datetime
    expires_at: datetime
    link_expires_at: datetime
    language: str = ""  # the link's language: its visitor's pages open in it (docs/i18n.md)


class _VisitCache:
    """digest -> (monotonic deadline, visit); small, per process, short-lived."""

    def __init__(self) -> None:
        self._items: dict[str, tuple[float, ShareVisit]] = {}
        self._lock = threading.Lock()

    def get(self, key: str) -> ShareVisit | None:
        item = self._items.get(key)
        if item is None or item[0] <= time.monotonic():
            return None
        return item[1]

    def put(self, key: str, visit: ShareVisit, seconds: float) -> None:
        with self._lock:
            if len(self._items) > 10_000:
                self._items.clear()
            self._items[key] = (time.monotonic() + seconds, visit)

    def drop(self, key: str) -> None:
        with self._lock:
            self._items.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


_cache = _VisitCache()


def forget_cached_visits() -> None:
    """Drop every cached visit of this process (after a revocation)."""
    _cache.clear()


def cookie_name(app: Flask) -> str:
    """``__Host-share`` when cookies are Secure; ``share`` on plain-HTTP development."""
    return "__Host-share" if app.config["SESSION_COOKIE_SECURE"] else "share"


def set_share_cookie(response: BaseResponse, token: str, lifetime: timedelta) -> None:
    """HttpOnly, SameSite=Strict, host-only, Secure where the portal is served over TLS."""
    app = current_app
    response.set_cookie(cookie_name(app), token, max_age=int(lifetime.total_seconds()),
                        path="/", secure=bool(app.config["SESSION_COOKIE_SECURE"]),
                        httponly=True, samesite="Strict")


def clear_share_cookie(response: BaseResponse) -> None:
    """Remove the share cookie from the browser."""
    app = current_app
    response.delete_cookie(cookie_name(app), path="/",
                           secure=bool(app.config["SESSION_COOKIE_SECURE"]), httponly=True,
                           samesite="Strict")


def _load(database: Database, digest: str) -> ShareVisit | None:
    # The request's session (portal/db.py): loading the principal opens no other.
    with database.reading() as session:
        found = session.execute(
            select(ShareSession, ShareLink).join(ShareLink, ShareSession.share_fk == ShareLink.id)
            .where(ShareSession.token_sha256 == digest)).first()
        if found is None:
            return None
        row, link = found
        if link_state(link) != "active":
            return None
        scope = session.execute(select(ShareLinkStudy.study_instance_uid,
                                       ShareLinkStudy.series_uids).where(
            ShareLinkStudy.share_fk == link.id)).all()
        studies = frozenset(uid for uid, _series in scope)
        series = frozenset(uid for _study, uids in scope for uid in (uids or []))
        return ShareVisit(session_id=row.id, link_id=link.id, public_id=link.public_id,
                          purpose=row.purpose, studies=studies, series=series,
                          can_download=link.can_download, audience=link.audience,
                          last_seen_at=row.last_seen_at,
                          expires_at=row.expires_at, link_expires_at=link.expires_at,
                          language=link.language)


def _end(database: Database, visit: ShareVisit) -> None:
    with database.write_transaction() as session:
        session.execute(delete(ShareSession).where(ShareSession.id == visit.session_id))


def _touch(database: Database, visit: ShareVisit, now: datetime) -> ShareVisit:
    with database.write_transaction() as session:
        session.execute(update(ShareSession).where(ShareSession.id == visit.session_id)
                        .values(last_seen_at=now))
    return replace(visit, last_seen_at=now)


def current_visit(purpose: str = "view") -> ShareVisit | None:
    """The live share session of this request with this purpose, or None."""
    app = current_app
    token = request.cookies.get(cookie_name(app), "")
    if not token or len(token) > 100:
        return None
    cached = g.get("share_visit")
    if cached is not None:
        return cached if cached.purpose == purpose else None
    settings = app.config["PORTAL"]
    database: Database = app.extensions["db"]
    digest = token_digest(token)
    visit = _cache.get(digest)
    if visit is None:
        visit = _load(database, digest)
        if visit is None:
            return None
        _cache.put(digest, visit, settings["SHARE_STATE_CACHE_SECONDS"])
    now = utcnow()
    idle = timedelta(minutes=settings["SHARE_SESSION_IDLE_MINUTES"])
    if visit.expires_at <= now or visit.link_expires_at <= now \
            or visit.last_seen_at + idle <= now:
        _cache.drop(digest)
        _end(database, visit)
        return None
    if now - visit.last_seen_at >= _TOUCH_EVERY:
        visit = _touch(database, visit, now)
        _cache.put(digest, visit, settings["SHARE_STATE_CACHE_SECONDS"])
    g.share_visit = visit
    if visit.language:
        g.link_language = visit.language  # portal/i18n.py select_locale
    return visit if visit.purpose == purpose else None


def share_principal() -> Principal | None:
    """The principal of a share-link visitor, or None (no cookie, ended, revoked, expired)."""
    visit = current_visit("view")
    if visit is None:
        return None
    return Principal("share", visit.link_id, "share link", share_id=visit.public_id,
                     share_studies=visit.studies, share_series=visit.series,
                     can_download=visit.can_download, share_audience=visit.audience,
                     via="share")
