"""The audit hot path on PostgreSQL (issue 16 item 3, docs/security.md 40, 42): ``audit.record``
is one autocommit INSERT on a connection kept for audit appends. Committed when it returns
(another connection sees it at once), one statement on the server and no transaction
statements of its own, a lost connection is replaced without failing the read, a statement
error fails closed as SQLAlchemy's error, and the kept connections close with the engine."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest
from flask import Flask
from sqlalchemy.exc import OperationalError

from portal import audit
from tests.access.test_audit_sealing import dsn
from tests.access.test_audit_sealing import pg_app as pg_app  # a fresh PostgreSQL database
from tests.conftest import PostgresCluster, close_app, make_app

pytestmark = pytest.mark.postgres


def read(app: Flask, n: int) -> None:
    audit.record(app.extensions["db"], audit.INSTANCES_ACCESSED, action="R",
                 outcome=audit.OUTCOME_SUCCESS, who=f"user:t|{n}",
                 study_instance_uid=f"1.2.3.{n}", details={"what": "study"})


def stored(app: Flask, n: int) -> int:
    """Records of read ``n``, seen from a connection of its own."""
    with psycopg.connect(dsn(app)) as other:
        row = other.execute("SELECT count(*) FROM audit_event WHERE who = %s",
                            (f"user:t|{n}",)).fetchone()
        return int(row[0]) if row else 0


def appender_backends(app: Flask) -> list[int]:
    """Server processes of the appender's connections (the last statement they ran)."""
    with psycopg.connect(dsn(app)) as other:
        return [pid for (pid,) in other.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            "AND query LIKE 'INSERT INTO audit_event%%' AND pid <> pg_backend_pid()")]


def test_a_record_is_committed_when_record_returns_in_one_statement(pg_app: Flask) -> None:
    read(pg_app, 1)
    assert stored(pg_app, 1) == 1
    with psycopg.connect(dsn(pg_app)) as other:
        # The appender's connection: idle (not idle in transaction) and its last statement
        # the INSERT itself, not a COMMIT.
        states = other.execute(
            "SELECT state, query FROM pg_stat_activity WHERE datname = current_database() "
            "AND query LIKE 'INSERT INTO audit_event%%'").fetchall()
    assert states and all(state == "idle" for state, _query in states), states


def test_a_lost_connection_is_replaced_and_the_read_is_recorded(pg_app: Flask) -> None:
    read(pg_app, 1)
    backends = appender_backends(pg_app)
    assert backends
    with psycopg.connect(dsn(pg_app), autocommit=True) as other:
        for pid in backends:  # as a restart or an idle timeout would
            other.execute("SELECT pg_terminate_backend(%s)", (pid,))
    read(pg_app, 2)  # no error: the append went through on a new connection
    assert stored(pg_app, 2) == 1
    assert set(appender_backends(pg_app)).isdisjoint(backends)


def test_a_statement_that_fails_is_not_retried_and_fails_closed(pg_app: Flask) -> None:
    with psycopg.connect(dsn(pg_app)) as holder:
        holder.execute("SET lock_timeout = '10s'")
        holder.execute("LOCK TABLE audit_event IN SHARE MODE")  # no insert passes
        with pytest.raises(OperationalError):  # after the portal's lock_timeout, once
            read(pg_app, 3)
        holder.rollback()
    assert stored(pg_app, 3) == 0
    read(pg_app, 4)  # the lock gone, appends work again
    assert stored(pg_app, 4) == 1


def test_the_kept_connections_close_with_the_engine(tmp_path: Path,
                                                    postgres: PostgresCluster) -> None:
    app = make_app(tmp_path / "instance", postgres.new_database())
    try:
        read(app, 1)
        assert appender_backends(app)
    finally:
        close_app(app)
    assert appender_backends(app) == []
