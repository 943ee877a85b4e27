"""Database engine, sessions, the request's unit of work and the few transactions of their own.

**One unit of work per request.** A request uses one session, the request-scoped
``db.session``; handlers and services never commit it. ``Database.install_unit_of_work``
(called once by ``create_app``, after every other ``after_request`` hook is registered, so it
runs first among the app's hooks) commits it in one place: when the answer is below 400, and
then runs what the handler asked to run after the commit (``db.after_commit``: notices,
forgetting cached share states); any other answer, an exception, or a commit that fails
rolls it back (a handler that rolled back itself leaves nothing to commit). The session is
removed at teardown.

**Services take the session as a parameter** (``def grant(session, ...)``), and only flush:
the same function then serves a request (``db.session``), a CLI command and a background job
(their own session) alike, and a test can hand it any session. The archive is the one
service that serves requests, C-STORE threads and the CLI without being handed a session: it
reads through ``Database.reading()``, which is the request's session inside a request of this
app and a short session of its own outside one.

**Transactions of their own are named and few**, each for a reason the request's outcome must
not decide (the allowed callers are listed, with these reasons, in
``tests/test_unit_of_work.py``, which fails when a new one appears):

- ``audit_transaction()``: the audit record of a read is durable before any byte of what was
  read leaves, even when the request fails later (docs/security.md 12, 40).
- ``write_transaction()``: ingest (every stored instance is durable before it is
  acknowledged), the share-link exchange, PIN and rate-limit counters (a failed PIN counts
  although the answer is a 4xx), share and browser sessions (saved after the response is
  made), external copies and sync, and work outside any request (listeners, background
  threads, CLI).
- ``new_session()``: reads outside any request (threads, listeners, CLI, the readiness probe).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from datetime import UTC, datetime
from typing import Any, cast

from flask import Flask, Response, current_app, g, has_request_context
from sqlalchemy import Connection, DateTime, Engine, MetaData, create_engine, event, make_url
from sqlalchemy.orm import (
    DeclarativeBase,
    ORMExecuteState,
    Session,
    scoped_session,
    sessionmaker,
)
from sqlalchemy.types import TypeDecorator
from werkzeug.local import LocalProxy

from portal.wildcard import register_sqlite

log = logging.getLogger(__name__)

# Longest a PostgreSQL statement waits for a lock before it fails (then 503 with Retry-After).
PG_LOCK_TIMEOUT = "5s"

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp that is always timezone-aware UTC in Python, on SQLite as on PostgreSQL."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetimes are not stored; use UTC")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


class Base(DeclarativeBase):
    """Base of every model; constraint names follow one convention so migrations are stable."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # Autocommit at the driver level; SQLAlchemy's "begin" event below issues BEGIN itself so
    # a write transaction can take the lock up front (BEGIN IMMEDIATE) and wait for it instead
    # of failing with "database is locked" when it upgrades from a read lock.
    dbapi_conn.isolation_level = None
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.close()
    # DICOM wildcard matching without a backtracking regular expression (portal/wildcard.py).
    register_sqlite(dbapi_conn)


def _sqlite_begin(conn: Any) -> None:
    immediate = conn.get_execution_options().get("write", False)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def make_engine(url: str) -> Engine:
    """Create the engine with the pragmas and pool our database needs."""
    if url.startswith("sqlite"):
        # A small pool: opening a connection costs the pragmas, and closing the last one
        # checkpoints the WAL, both far more than the statements of one ingest.
        engine = create_engine(url, pool_size=5, max_overflow=20, pool_pre_ping=False,
                               connect_args={"timeout": 30, "check_same_thread": False},
                               hide_parameters=True)
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    # hide_parameters: an error message (and so a logged traceback) never carries the values
    # of a statement: patient names, birth dates, token digests (docs/security.md 43).
    # A lock held by a stuck transaction (the audit chain's head, a share link's row) makes
    # a waiting request fail after PG_LOCK_TIMEOUT with 503 (OperationalError), instead of
    # wedging a worker without bound (docs/security.md (c) "DB locked / slow"). Options given in
    # the URL are left as they are.
    connect_args: dict[str, Any] = {} if "options" in make_url(url).query else {
        "options": f"-c lock_timeout={PG_LOCK_TIMEOUT}"}
    # No server-side prepared statements (psycopg prepares a statement run 5 times on one
    # connection): behind PgBouncer in transaction pooling mode the next transaction may run
    # on another server connection, which lacks it, or has another one of that name
    # (docs/cluster.md, "PgBouncer").
    connect_args["prepare_threshold"] = None
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=10,
                         pool_timeout=10, hide_parameters=True, connect_args=connect_args)


def _settled(session: Session) -> None:
    if not session.in_nested_transaction():  # a savepoint's end keeps the outer write lock
        session.info.pop("wrote", None)


class Database:
    """The app's database: an engine and a request-scoped session factory."""

    def __init__(self) -> None:
        self.engine: Engine | None = None
        self._write_lock: threading.Lock | None = None
        # Bound to the engine by init_app; a session made before that has no engine to use.
        self._factory: sessionmaker[Session] = sessionmaker(expire_on_commit=False)
        # The registry stays private: callers see a Session (the scoped_session proxies every
        # Session method to the current one), so type checks see what they really call.
        self._scoped: scoped_session[Session] = scoped_session(self._factory)
        self.session: Session = cast(Session, self._scoped)
        event.listen(self._factory, "before_flush", self._before_flush)
        event.listen(self._factory, "do_orm_execute", self._before_statement)
        event.listen(self._factory, "after_commit", _settled)
        event.listen(self._factory, "after_rollback", _settled)

    def _make_session(self, purpose: str) -> Session:
        if self.engine is None:
            raise RuntimeError("database not initialised")
        # The purpose names the session's reason to exist (tests count sessions by it).
        return self._factory(info={"purpose": purpose})

    def init_app(self, app: Flask, url: str) -> None:
        """Bind to the app: one engine, sessions removed when the app context ends."""
        self.engine = make_engine(url)
        # SQLite has one writer at a time; queueing this process's writers on a lock is far
        # faster than letting them poll the busy handler (which sleeps up to 100 ms a try).
        self._write_lock = threading.Lock() if url.startswith("sqlite") else None
        self._factory.configure(bind=self.engine)
        app.extensions["db"] = self

        @app.teardown_appcontext
        def _remove(_exc: BaseException | None) -> None:
            self._scoped.remove()

    def install_unit_of_work(self, app: Flask) -> None:
        """Commit the request's session once per request (see the module docstring).

        Register it after every other ``after_request`` hook of the app, so it runs first
        among them (after the blueprints' own hooks, which may still turn the answer into an
        error) and before the browser session is saved.
        """

        @app.after_request
        def _unit_of_work(response: Response) -> Response:
            callbacks: list[Callable[[], None]] = g.pop("_after_commit", [])
            if not self._scoped.registry.has():
                return response  # the request touched no database
            session = self._scoped()
            if response.status_code >= 400:
                session.rollback()
                return response
            try:
                session.commit()
            except Exception as exc:  # mapped as if the handler had raised it (e.g. 503)
                session.rollback()
                response.close()
                return app.make_response(app.handle_user_exception(exc))
            for callback in callbacks:
                try:
                    callback()
                except Exception:  # what is committed stays; a failed follow-up is logged
                    log.exception("after-commit step failed")
            return response

    def after_commit(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` once the request's unit of work has committed (never when it rolls
        back); outside a request at once (the caller has committed already)."""
        if has_request_context():
            g.setdefault("_after_commit", []).append(callback)
        else:
            callback()

    @contextmanager
    def reading(self) -> Iterator[Session]:
        """The request's session inside a request of this app, else a short own session
        (closed afterwards): for the archive, which serves both."""
        if has_request_context() and current_app.extensions.get("db") is self:
            yield self.session
            return
        with self._make_session("read") as session:
            yield session

    @contextmanager
    def write_transaction(self) -> Iterator[Session]:
        """A short write transaction in its own session, committed on success: only for the
        reasons the module docstring lists."""
        with self._transaction("own") as session:
            yield session

    @contextmanager
    def audit_transaction(self) -> Iterator[Session]:
        """The transaction of an audit record committed on its own: the record of a read is
        durable before anything read leaves, even when the request fails later
        (docs/security.md 12, 40)."""
        with self._transaction("audit") as session:
            yield session

    @contextmanager
    def _transaction(self, purpose: str) -> Iterator[Session]:
        with self._write_lock or nullcontext(), self._make_session(purpose) as session:
            session.connection(execution_options={"write": True})
            session.info["wrote"] = True  # began as a write: nothing to take later
            try:
                yield session
                session.commit()
            except BaseException:
                session.rollback()
                raise
        if has_request_context():
            self._fresh_snapshot()

    def _sqlite(self) -> bool:
        return self.engine is not None and self.engine.dialect.name == "sqlite"

    def _fresh_snapshot(self) -> None:
        """After a transaction of its own committed in a request, the request's session (on
        SQLite, while it has written nothing) ends its read snapshot, so that its next read
        sees the new rows (an ingest's, for the after-ingest steps) as PostgreSQL's READ
        COMMITTED would. Nothing is written; loaded objects stay (expire_on_commit=False)."""
        if not self._sqlite() or not self._scoped.registry.has():
            return
        session = self._scoped()
        if session.in_transaction() and not session.info.get("wrote") and \
                not (session.new or session.dirty or session.deleted):
            session.commit()

    def _before_flush(self, session: Session, _context: Any, _instances: Any) -> None:
        self._take_write_lock(session)

    def _before_statement(self, state: ORMExecuteState) -> None:
        if state.is_insert or state.is_update or state.is_delete:
            self._take_write_lock(state.session)

    def _take_write_lock(self, session: Session) -> None:
        if self._sqlite():
            write_connection(session)

    def new_session(self) -> Session:
        """A session outside the request scope (close it, e.g. with ``with``)."""
        return self._make_session("outside")

    def dispose(self) -> None:
        """Close pooled connections (after fork, or at shutdown)."""
        if self.engine is not None:
            self.engine.dispose()


def write_connection(session: Session) -> Connection:
    """The session's connection, ready for Core writes (the hot paths write without the ORM).

    On SQLite, a session's first write ends its read snapshot and takes the write lock with a
    fresh one (BEGIN IMMEDIATE, waiting its turn): an older snapshot cannot become a write
    once anyone (a background thread, another request) committed since, and would fail at
    once with "database is locked". The reads before it are as READ COMMITTED would have
    given them on PostgreSQL; nothing changes there. An ORM write takes it the same way
    (``Database._take_write_lock``)."""
    connection = session.connection()
    if not session.info.get("wrote") and connection.dialect.name == "sqlite":
        session.info["wrote"] = True
        connection.exec_driver_sql("COMMIT")  # the read transaction: it wrote nothing
        connection.exec_driver_sql("BEGIN IMMEDIATE")
    return connection


def _current_database() -> Database:
    database: Database = current_app.extensions["db"]
    return database


# The database of the app in context; each app owns its own Database (tests run several).
db: Database = LocalProxy(_current_database)  # type: ignore[assignment]
