"""docs/security.md 41: the audit trail goes to a separate repository (syslog over TCP, RFC 5424
messages in octet-counted frames), waits in the database while that repository is down and is
then delivered once, in order; on PostgreSQL the portal's role may only add and read records."""

from __future__ import annotations

import json
import re
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from flask import Flask
from sqlalchemy import select

from portal import audit
from portal.access.models import AuditEvent
from tests.conftest import PostgresCluster, close_app, free_port, make_app


class SyslogReceiver:
    """A TCP syslog server on 127.0.0.1 that keeps every octet-counted message (and, given a
    ``log`` path, writes each one as a line, as a syslog daemon writes its file)."""

    def __init__(self, port: int, log: Path | None = None) -> None:
        self.messages: list[str] = []
        self.log = log
        self.server = socket.create_server(("127.0.0.1", port))
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with conn:
                buffer = b""
                while chunk := conn.recv(65536):
                    buffer += chunk
                    while b" " in buffer:
                        length, _, rest = buffer.partition(b" ")
                        if len(rest) < int(length):
                            break
                        message = rest[:int(length)].decode("utf-8")
                        self.messages.append(message)
                        if self.log is not None:
                            with self.log.open("a", encoding="utf-8") as fh:
                                fh.write(f"{message}\n")
                        buffer = rest[int(length):]

    def wait_for(self, count: int) -> None:
        """Wait (up to 5 s) until at least ``count`` messages arrived."""
        for _ in range(100):
            if len(self.messages) >= count:
                return
            threading.Event().wait(0.05)

    def close(self) -> None:
        self.server.close()


def record(app: Flask, count: int, start: int = 0) -> None:
    """Append ``count`` records, then seal them (as the background sealer does a moment
    later), so what follows sees them chained."""
    for number in range(start, start + count):
        audit.record(app.extensions["db"], audit.QUERY, action="E",
                     outcome=audit.OUTCOME_SUCCESS, who=f"user:test|n{number}",
                     details={"n": number})
    audit.seal(app.extensions["db"], wait=True)


def forward_cli(app: Flask) -> tuple[int, str]:
    result = app.test_cli_runner().invoke(args=["audit", "forward"])
    return result.exit_code, result.output


@pytest.fixture
def audited(tmp_path: Path) -> Iterator[tuple[Flask, int]]:
    port = free_port()
    app = make_app(tmp_path / "instance", AUDIT_SYSLOG_URL=f"tcp://127.0.0.1:{port}")
    yield app, port
    close_app(app)


def test_records_wait_while_the_repository_is_down_then_arrive_once_in_order(
        audited: tuple[Flask, int]) -> None:
    app, port = audited
    record(app, 3)
    code, output = forward_cli(app)  # nobody listens yet
    assert code == 1 and "wait for the next run" in output
    receiver = SyslogReceiver(port)
    try:
        code, output = forward_cli(app)
        assert code == 0 and "forwarded 3" in output
        record(app, 2, start=3)
        assert forward_cli(app) == (0, "forwarded 2 audit record(s)\n")
        assert forward_cli(app) == (0, "forwarded 0 audit record(s)\n")
        for _ in range(50):
            if len(receiver.messages) >= 5:
                break
            threading.Event().wait(0.05)
    finally:
        receiver.close()
    numbers = [int(re.search(r'"n":(\d+)', m).group(1)) for m in receiver.messages]  # type: ignore[union-attr]
    assert numbers == [0, 1, 2, 3, 4]
    first = receiver.messages[0]
    # RFC 5424: <PRI>1 TIMESTAMP HOST APP PROCID MSGID [SD] MSG; authpriv.notice is 85.
    assert re.match(r"<85>1 \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z \S+ referrer-portal - AUDIT "
                    r"\[portal@32473 id=\"\d+\" event=\"110112\"", first), first
    assert 'hash="' in first and "\ufeff{" in first


def test_the_portal_role_may_only_add_and_read_audit_records(
        postgres: PostgresCluster, tmp_path: Path) -> None:
    url = postgres.new_database()
    app = make_app(tmp_path / "instance", url)
    try:
        record(app, 1)
        admin = f"host=127.0.0.1 port={postgres.port} user=portal dbname={url.rsplit('/', 1)[1]}"
        role = f"portal_app_{free_port()}"
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'CREATE ROLE "{role}" LOGIN')
            conn.execute(f'GRANT ALL ON ALL TABLES IN SCHEMA public TO "{role}"')
            conn.execute(f'GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO "{role}"')
        result = app.test_cli_runner().invoke(args=["audit", "protect", role])
        assert result.exit_code == 0, result.output
        as_app = admin.replace("user=portal", f"user={role}")
        with psycopg.connect(as_app, autocommit=True) as conn:
            assert conn.execute("SELECT count(*) FROM audit_event").fetchone()[0] == 1
            for statement in ("UPDATE audit_event SET who = 'x'", "DELETE FROM audit_event",
                              "TRUNCATE audit_event"):
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    conn.execute(statement)
        # The portal, connected as that role, still appends (and chains) records.
        app_as_role = make_app(tmp_path / "as-role", url.replace("portal@", f"{role}@"))
        try:
            record(app_as_role, 1, start=1)
            result = app_as_role.test_cli_runner().invoke(args=["audit", "verify"])
            assert result.exit_code == 0 and "intact: 2 records" in result.output
        finally:
            close_app(app_as_role)
    finally:
        close_app(app)


def test_the_repository_receives_each_records_id_and_hash_and_the_signed_checkpoint(
        tmp_path: Path) -> None:
    from portal.audit_forward import read_repository

    port = free_port()
    app = make_app(tmp_path / "instance", AUDIT_SYSLOG_URL=f"tcp://127.0.0.1:{port}",
                   AUDIT_CHECKPOINT_KEY="k" * 40, AUDIT_CHECKPOINT_EVERY=2)
    receiver = SyslogReceiver(port, log=tmp_path / "repository.log")
    try:
        record(app, 3)
        audit.record(app.extensions["db"], audit.QUERY, action="E",
                     outcome=audit.OUTCOME_SUCCESS, who="user:a\nforged line]")
        assert forward_cli(app) == (0, "forwarded 4 audit record(s)\n")
        receiver.wait_for(5)
    finally:
        receiver.close()
        close_app(app)
    assert len(receiver.messages) == 5
    # A line break in a field cannot split a message in the repository's log.
    assert 'who="user:a\\x0aforged line\\]"' in receiver.messages[3]
    assert re.match(r'<85>1 \S+ \S+ referrer-portal - CHECKPOINT \[portal@32473 count="4" '
                    r'id="4" hash="[0-9a-f]{64}" at="\S+Z" mac="[0-9a-f]{64}"\]$',
                    receiver.messages[4]), receiver.messages[4]
    records, checkpoints = read_repository(tmp_path / "repository.log")
    with app.extensions["db"].new_session() as session:
        expected = [(row.id, row.record_hash) for row in session.scalars(
            select(AuditEvent).order_by(AuditEvent.id))]
    assert records == expected and len(records) == 4
    assert [(c.count, c.record_id, c.record_hash) for c in checkpoints] == [(4, *expected[3])]
    # The same checkpoint is in the file outside the database, with the one for 2 records.
    lines = (tmp_path / "instance" / "audit-checkpoints.log").read_text().splitlines()
    assert [json.loads(line)["count"] for line in lines] == [2, 4]
