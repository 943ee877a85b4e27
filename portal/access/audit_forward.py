"""Forward the audit trail to a separate repository: syslog over TCP or TLS (RFC 5424 messages,
octet-counted frames as RFC 5425 / RFC 6587 describe), and lock the table down on PostgreSQL.

The audit table itself is the durable spool: ``forward`` sends every record after the last one
the repository acknowledged (by TCP delivery) and moves that mark only after a batch is sent,
so a repository that is down loses nothing: the next run sends what waited, once, in order.
"""

from __future__ import annotations

import json
import socket
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from portal.access.models import AuditEvent, AuditForward
from portal.db import Database, utcnow

FACILITY_SECURITY, SEVERITY_NOTICE = 10, 5  # RFC 5424: authpriv, notice (as IHE ATNA uses)
ENTERPRISE = "portal@32473"  # structured-data id (32473: the documentation enterprise number)


class ForwardFailed(Exception):
    """The audit repository could not be reached; nothing was marked as sent."""


def _sd_value(value: object) -> str:
    """An RFC 5424 PARAM-VALUE: backslash, quote and bracket escaped."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def format_record(row: AuditEvent, hostname: str) -> bytes:
    """One audit record as an RFC 5424 message (structured data plus a JSON body)."""
    stamp = row.occurred_at.strftime("%Y-%m-%dT%H:%M:%S.000000Z")
    params = {"id": row.id, "event": row.event_id, "action": row.action,
              "outcome": row.outcome, "who": row.who, "from": row.source_address,
              "study": row.study_instance_uid, "hash": row.record_hash}
    data = " ".join(f'{key}="{_sd_value(value)}"' for key, value in params.items())
    body = json.dumps({"event": [row.event_id, row.event_name], "details": row.details,
                       "patient": row.patient_id, "previous": row.previous_hash},
                      separators=(",", ":"), sort_keys=True, default=str)
    priority = FACILITY_SECURITY * 8 + SEVERITY_NOTICE
    header = f"<{priority}>1 {stamp} {hostname[:255] or '-'} referrer-portal - AUDIT"
    return f"{header} [{ENTERPRISE} {data}] ".encode() + b"\xef\xbb\xbf" + body.encode()


@contextmanager
def _connection(url: str, ca_file: str | None, timeout: float) -> Iterator[socket.socket]:
    parts = urlsplit(url)
    if parts.scheme not in ("tcp", "tls") or not parts.hostname or not parts.port:
        raise ForwardFailed("AUDIT_SYSLOG_URL must be tcp://host:port or tls://host:port")
    try:
        sock = socket.create_connection((parts.hostname, parts.port), timeout=timeout)
    except OSError as exc:
        raise ForwardFailed(f"the audit repository is unreachable: {exc.strerror or exc}"
                            ) from exc
    try:
        if parts.scheme == "tls":
            context = ssl.create_default_context(cafile=ca_file)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            sock = context.wrap_socket(sock, server_hostname=parts.hostname)
        yield sock
    except (OSError, ssl.SSLError) as exc:
        raise ForwardFailed(f"sending to the audit repository failed: {exc}") from exc
    finally:
        sock.close()


def _mark(session: Session) -> AuditForward:
    mark = session.get(AuditForward, 1)
    if mark is None:
        mark = AuditForward(id=1, last_id=0)
        session.add(mark)
        session.flush()
    return mark


def forward(database: Database, url: str, *, ca_file: str | None = None,
            batch: int = 500, timeout: float = 10.0) -> int:
    """Send every record not yet forwarded; return how many were sent (ForwardFailed when
    the repository cannot be reached: what was not sent stays waiting)."""
    hostname = socket.gethostname()
    sent = 0
    with _connection(url, ca_file, timeout) as sock:
        while True:
            with database.write_transaction() as session:
                mark = _mark(session)
                rows = list(session.scalars(select(AuditEvent)
                                            .where(AuditEvent.id > mark.last_id)
                                            .order_by(AuditEvent.id).limit(batch)))
                if not rows:
                    return sent
                for row in rows:
                    message = format_record(row, hostname)
                    sock.sendall(f"{len(message)} ".encode() + message)
                mark.last_id, mark.forwarded_at = rows[-1].id, utcnow()
                sent += len(rows)


PROTECT_SQL = ("REVOKE UPDATE, DELETE, TRUNCATE ON audit_event FROM {role}",
               "GRANT SELECT, INSERT ON audit_event TO {role}")


def protect_table(database: Database, role: str) -> None:
    """PostgreSQL: the application's role may only add and read audit records (SECURITY.md
    41); run as the table's owner. The owner must not be the role the portal runs as."""
    if database.engine is None or database.engine.dialect.name != "postgresql":
        raise ValueError("audit lock-down is for PostgreSQL (SQLite has no roles)")
    if not role.replace("_", "").isalnum():
        raise ValueError("a role name is letters, digits and underscores")
    with database.engine.begin() as connection:
        for statement in PROTECT_SQL:
            connection.execute(text(statement.format(role=f'"{role}"')))
