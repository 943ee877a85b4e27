"""docs/security.md 41, 52 with the audit trail off the request path (issue 16 item 3): writers
append without a lock, one sealer chains in batches (portal/audit.py). On PostgreSQL, where
writers really run at once: concurrent writers then sealing verify; a tampered sealed record
and an unsealed one are reported; sealers running at once never fork the chain."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from flask import Flask
from sqlalchemy import func, select, text

from portal import audit
from portal.access.models import AuditEvent, AuditHead
from tests.conftest import PostgresCluster, close_app, make_app, wait_for

pytestmark = pytest.mark.postgres


@pytest.fixture
def pg_app(tmp_path: Path, postgres: PostgresCluster) -> Iterator[Flask]:
    app = make_app(tmp_path / "instance", postgres.new_database())
    yield app
    close_app(app)


def dsn(app: Flask) -> str:
    return app.config["PORTAL"]["DATABASE_URL"].replace("postgresql+psycopg://",
                                                        "postgresql://")


def read(app: Flask, n: int) -> None:
    audit.record(app.extensions["db"], audit.INSTANCES_ACCESSED, action="R",
                 outcome=audit.OUTCOME_SUCCESS, who=f"user:t|w{n}",
                 study_instance_uid=f"1.2.3.{n}", details={"what": "study"})


def write_concurrently(app: Flask, writers: int, each: int) -> None:
    errors: list[BaseException] = []

    def writer(index: int) -> None:
        try:
            for k in range(each):
                read(app, index * 1000 + k)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


def verify(app: Flask) -> tuple[int, str]:
    result = app.test_cli_runner().invoke(args=["audit", "verify"])
    return result.exit_code, result.output


def places(app: Flask) -> list[int | None]:
    with app.extensions["db"].new_session() as session:
        return list(session.scalars(select(AuditEvent.seq).order_by(AuditEvent.seq)))


def test_concurrent_writers_then_sealing_verify(pg_app: Flask) -> None:
    write_concurrently(pg_app, writers=16, each=25)
    audit.seal(pg_app.extensions["db"], wait=True)
    assert places(pg_app) == list(range(1, 401))  # every record has one place, none twice
    code, output = verify(pg_app)
    assert code == 0 and "audit trail intact: 400 records" in output, output
    assert "not sealed" not in output
    with pg_app.extensions["db"].new_session() as session:
        head = session.get(AuditHead, 1)
        last = session.scalars(select(AuditEvent).where(AuditEvent.seq == 400)).one()
        assert head is not None and (head.count, head.last_hash) == (400, last.record_hash)


def test_a_tampered_sealed_record_is_detected(pg_app: Flask) -> None:
    for n in range(6):
        read(pg_app, n)
    audit.seal(pg_app.extensions["db"], wait=True)
    assert verify(pg_app)[0] == 0
    with psycopg.connect(dsn(pg_app), autocommit=True) as conn:
        third = conn.execute("SELECT id FROM audit_event WHERE seq = 3").fetchone()[0]
        conn.execute("UPDATE audit_event SET who = 'user:someone-else' WHERE seq = 3")
    code, output = verify(pg_app)
    assert code == 1 and f"record {third} was altered" in output, output
    # Taking a record out of the chain (its place removed) is as visible.
    with psycopg.connect(dsn(pg_app), autocommit=True) as conn:
        conn.execute("UPDATE audit_event SET who = 'user:t|w2' WHERE seq = 3")
        assert verify(pg_app)[0] == 0
        conn.execute("UPDATE audit_event SET seq = NULL WHERE seq = 5")
    code, output = verify(pg_app)
    assert code == 1 and "1 record(s) carry a chain hash but no place in the chain" in output
    assert "was altered (or one before it removed)" in output, output
    # A sealer (this process's, woken by any record) never chains it again at the end, which
    # would bury the removal: it stays out, and verify keeps saying so.
    read(pg_app, 99)
    audit.seal(pg_app.extensions["db"], wait=True)
    assert places(pg_app).count(None) == 1
    assert "1 record(s) carry a chain hash but no place in the chain" in verify(pg_app)[1]


def test_an_unsealed_record_is_reported_then_sealed(pg_app: Flask) -> None:
    read(pg_app, 1)
    audit.seal(pg_app.extensions["db"], wait=True)
    runner = pg_app.test_cli_runner()
    # Another sealer (another node) holds the lock and never gets to this record.
    with psycopg.connect(dsn(pg_app), autocommit=True) as other:
        other.execute("SELECT pg_advisory_lock(%s)", (audit.SEAL_LOCK,))
        read(pg_app, 2)  # committed: the read may be served
        busy = runner.invoke(args=["audit", "seal"])
        assert busy.exit_code == 0 and "another sealer holds the lock" in busy.output
        code, output = verify(pg_app)
        assert code == 0, output  # what is sealed is intact ...
        assert "1 record(s) not sealed yet, the oldest written" in output  # ... and this shows
        assert "audit trail intact: 1 records" in output
        other.execute("SELECT pg_advisory_unlock(%s)", (audit.SEAL_LOCK,))
    # Once the lock is free, the process's own background sealer (which looks again while
    # another holds the lock) chains it; the command then finds nothing left.
    assert wait_for(lambda: places(pg_app) == [1, 2], timeout=15)
    sealed = runner.invoke(args=["audit", "seal"])
    assert (sealed.exit_code, sealed.output) == (0, "sealed 0 audit record(s)\n")
    code, output = verify(pg_app)
    assert code == 0 and "intact: 2 records" in output and "not sealed" not in output, output


def test_sealers_at_once_never_fork_the_chain(pg_app: Flask) -> None:
    """Sealers on their own connections (as on several nodes), in small batches, sealing
    while writers write; one of them without the advisory lock's try (it waits)."""
    engine = pg_app.extensions["db"].engine
    stop = threading.Event()
    outcomes: list[int | None] = []
    errors: list[BaseException] = []

    def sealer(wait: bool) -> None:
        try:
            while not stop.is_set():
                outcomes.append(audit._seal(engine, 7, wait))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=sealer, args=(i == 0,)) for i in range(4)]
    for thread in threads:
        thread.start()
    try:
        write_concurrently(pg_app, writers=8, each=30)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert errors == []
    assert None in outcomes  # they did meet: a try found the lock taken
    audit.seal(pg_app.extensions["db"], wait=True)
    assert places(pg_app) == list(range(1, 241))
    with pg_app.extensions["db"].new_session() as session:
        # One chain: every previous_hash is the record_hash of exactly the place before.
        pairs = session.execute(text(
            "SELECT count(*) FROM audit_event a JOIN audit_event b ON b.seq = a.seq + 1 "
            "WHERE b.previous_hash = a.record_hash")).scalar_one()
        assert pairs == 239
        assert session.scalar(select(func.count()).where(AuditEvent.seq.is_(None))) == 0
    code, output = verify(pg_app)
    assert code == 0 and "intact: 240 records" in output, output
