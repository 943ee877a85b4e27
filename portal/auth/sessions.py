"""Flask sessions kept in the database (OWASP Session Management; docs/security.md 4-6).

The cookie holds 256 random bits and nothing else; the server keeps the SHA-256 of it, the
data, the idle and absolute deadlines. A new id is issued at sign-in (``regenerate``), and
sign-out deletes the row, so a copied cookie is worthless afterwards.
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import timedelta
from typing import Any

from flask import Flask, Request, Response
from flask.sessions import SessionInterface, SessionMixin
from sqlalchemy import delete, select
from sqlalchemy.exc import OperationalError
from werkzeug.datastructures import CallbackDict

from portal.auth.models import UserSession
from portal.db import Database, utcnow

_TOUCH_EVERY = timedelta(seconds=30)


class ServerSession(CallbackDict[str, Any], SessionMixin):
    """Session data plus what the interface needs to save it."""

    def __init__(self, data: dict[str, Any] | None = None, token: str | None = None) -> None:
        def on_update(_self: Any) -> None:
            self.modified = True

        super().__init__(data or {}, on_update)
        self.token = token
        self.modified = False
        self.regenerate_requested = False
        self.destroy_requested = False
        self.row_id: int | None = None
        self.user_fk: int | None = None
        self.security_epoch = 0
        self.auth_time: Any = None
        self.created_at: Any = None
        self.last_seen_at: Any = None
        # The cookie named a session but the database could not be asked: the request is
        # answered 503 (``refuse_without_database``), never served as an anonymous visitor.
        self.unavailable = False

    def regenerate(self) -> None:
        """Issue a new id at the next save (sign-in, privilege change)."""
        self.regenerate_requested = True
        self.modified = True

    def destroy(self) -> None:
        """Forget the session on the server and in the browser."""
        self.clear()
        self.destroy_requested = True


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("ascii", "replace")).hexdigest()


class DatabaseSessionInterface(SessionInterface):
    """Sessions stored in the portal database (Redis can take this role later)."""

    def __init__(self, idle: timedelta, absolute: timedelta) -> None:
        self.idle = idle
        self.absolute = absolute

    def _database(self, app: Flask) -> Database:
        database: Database = app.extensions["db"]
        return database

    def cookie_name(self, app: Flask) -> str:
        """``__Host-`` needs Secure; plain-HTTP localhost development uses a plain name."""
        return "__Host-portal" if app.config["SESSION_COOKIE_SECURE"] else "portal"

    def open_session(self, app: Flask, request: Request) -> ServerSession:
        token = request.cookies.get(self.cookie_name(app), "")
        session = ServerSession()
        if not token or len(token) > 100:
            return session
        now = utcnow()
        try:
            # The request's session (portal/db.py): the request opens no other to read it.
            with self._database(app).reading() as db:
                row = db.scalars(select(UserSession).where(
                    UserSession.token_sha256 == _digest(token))).first()
        except OperationalError:
            self._database(app).session.rollback()
            # Fail closed (nobody is signed in without the database) and say so: a 503 with
            # Retry-After, not a trip to a sign-in page that cannot work either.
            session.unavailable = True
            return session
        if row is None or row.expires_at <= now or row.last_seen_at + self.idle <= now:
            return session
        session = ServerSession(dict(row.data), token)
        session.row_id, session.user_fk = row.id, row.user_fk
        session.security_epoch, session.auth_time = row.security_epoch, row.auth_time
        session.created_at, session.last_seen_at = row.created_at, row.last_seen_at
        return session

    def save_session(self, app: Flask, session: SessionMixin, response: Response) -> None:
        assert isinstance(session, ServerSession)
        if session.unavailable:
            return
        try:
            self._save(app, session, response)
        except OperationalError:
            # The database went away during the request (or was never there for a new
            # visitor's sign-in): the answer must not claim a session that was not kept.
            _answer_unavailable(response)

    def _save(self, app: Flask, session: ServerSession, response: Response) -> None:
        name = self.cookie_name(app)
        database = self._database(app)
        secure = bool(app.config["SESSION_COOKIE_SECURE"])
        if session.destroy_requested or (not session and session.row_id is not None
                                         and session.user_fk is None):
            if session.row_id is not None:
                with database.write_transaction() as db:
                    db.execute(delete(UserSession).where(UserSession.id == session.row_id))
            response.delete_cookie(name, path="/", secure=secure, httponly=True,
                                   samesite="Lax")
            return
        if not session and session.row_id is None:
            return  # an anonymous visitor with nothing to keep gets no cookie
        now = utcnow()
        if session.row_id is None or session.regenerate_requested:
            token = secrets.token_urlsafe(32)
            with database.write_transaction() as db:
                if session.row_id is not None:
                    db.execute(delete(UserSession).where(UserSession.id == session.row_id))
                row = UserSession(token_sha256=_digest(token), data=dict(session),
                                  user_fk=session.user_fk, security_epoch=session.security_epoch,
                                  created_at=now, last_seen_at=now,
                                  expires_at=now + self.absolute, auth_time=session.auth_time)
                db.add(row)
            response.set_cookie(name, token, path="/", secure=secure, httponly=True,
                                samesite="Lax")
            return
        if session.modified or now - session.last_seen_at >= _TOUCH_EVERY:
            with database.write_transaction() as db:
                stored = db.get(UserSession, session.row_id)
                if stored is None:
                    return
                stored.last_seen_at = now
                if session.modified:
                    stored.data = dict(session)

    def should_set_cookie(self, app: Flask, session: SessionMixin) -> bool:
        """Cookies are set explicitly in ``save_session``."""
        return False


DATABASE_DOWN = "the database is unavailable; try again shortly"


def refuse_without_database(app: Flask) -> None:
    """Answer 503 (Retry-After) to a request whose session could not be loaded, before any
    other hook can treat its sender as signed out (docs/security.md (c) 3)."""
    from flask import session

    from portal.failures import Unavailable

    @app.before_request
    def _refuse() -> None:
        if getattr(session, "unavailable", False):
            raise Unavailable(DATABASE_DOWN)


def _answer_unavailable(response: Response) -> None:
    """Turn an answer whose session could not be saved into the 503 of a database outage,
    keeping the security headers already set on it."""
    from portal.errors import error_response

    failed = error_response(503, DATABASE_DOWN, {"Retry-After": "5"})
    for name in ("Location", "ETag", "Last-Modified", "Content-Disposition",
                 "Content-Encoding", "Content-Length", "Set-Cookie"):
        response.headers.pop(name, None)
    response.status_code = 503
    response.direct_passthrough = False
    response.set_data(failed.get_data())
    response.content_type = failed.content_type
    response.headers["Retry-After"] = "5"
    response.headers["Cache-Control"] = "no-store"


def end_user_sessions(database: Database, user_fk: int) -> int:
    """End every session of a user at once (deactivation, revocation by an office manager)."""
    with database.write_transaction() as db:
        result = db.execute(delete(UserSession).where(UserSession.user_fk == user_fk))
    return int(getattr(result, "rowcount", 0) or 0)
