"""Forward the audit trail to a separate repository: syslog over TCP or TLS (RFC 5424 messages,
octet-counted frames as RFC 5425 / RFC 6587 describe), and lock the table down on PostgreSQL.

The audit table itself is the durable spool: ``forward`` seals what waits, then sends every
sealed record after the last one the repository acknowledged (by TCP delivery), in chain
order (``seq``: the order of sealing, portal/audit.py), and moves that mark only after a
batch is sent, so a repository that is down loses nothing: the next run sends what waited,
once, in order. Only sealed records are sent: a record's place and hash are final then.

Every message carries the record's id (its sequence number) and hash, and forwarding ends
with the newest signed checkpoint: what the repository holds anchors the end of the trail,
and ``read_repository`` reads it back (one message a line, as syslog receivers write their
log) for ``audit verify --repository``.
"""

from __future__ import annotations

import json
import re
import socket
import ssl
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from urllib.parse import urlsplit

from sqlalchemy import select, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from portal import failures
from portal.access.models import AuditEvent, AuditForward
from portal.audit import Checkpoint, Checkpoints, seal
from portal.db import Database, utcnow

FACILITY_SECURITY, SEVERITY_NOTICE = 10, 5  # RFC 5424: authpriv, notice (as IHE ATNA uses)
ENTERPRISE = "portal@32473"  # structured-data id (32473: the documentation enterprise number)


class ForwardFailed(failures.Unavailable):
    """The audit repository could not be reached; nothing was marked as sent."""


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _sd_value(value: object) -> str:
    """An RFC 5424 PARAM-VALUE: backslash, quote and bracket escaped; control characters
    (a line break would split the message in the repository's log) shown as \\xNN."""
    text = str(value).replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _header(stamp: str, hostname: str, msgid: str) -> str:
    priority = FACILITY_SECURITY * 8 + SEVERITY_NOTICE
    return f"<{priority}>1 {stamp} {hostname[:255] or '-'} referrer-portal - {msgid}"


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
    header = _header(stamp, hostname, "AUDIT")
    return f"{header} [{ENTERPRISE} {data}] ".encode() + b"\xef\xbb\xbf" + body.encode()


def format_checkpoint(checkpoint: Checkpoint, hostname: str) -> bytes:
    """A signed checkpoint as an RFC 5424 message (MSGID CHECKPOINT, no body)."""
    params = {"count": checkpoint.count, "id": checkpoint.record_id,
              "hash": checkpoint.record_hash, "at": checkpoint.at, "mac": checkpoint.mac}
    data = " ".join(f'{key}="{_sd_value(value)}"' for key, value in params.items())
    stamp = checkpoint.at.replace("Z", ".000000Z")
    return f"{_header(stamp, hostname, 'CHECKPOINT')} [{ENTERPRISE} {data}]".encode()


_ELEMENT = re.compile(r"\[" + re.escape(ENTERPRISE) + r'((?: [A-Za-z]+="(?:[^"\\\]]|\\.)*")*)\]')
_PARAM = re.compile(r'([A-Za-z]+)="((?:[^"\\\]]|\\.)*)"')


def read_repository(path: Path) -> tuple[list[tuple[int, str]], list[Checkpoint]]:
    """What the audit repository received, from its log file (one message a line, any
    prefix the receiver adds): the (id, hash) of every record, and the checkpoints."""
    records: list[tuple[int, str]] = []
    checkpoints: list[Checkpoint] = []
    with path.open("r", encoding="utf-8", errors="replace") as fh:
        for line in fh:
            element = _ELEMENT.search(line)
            if element is None:
                continue
            params = {key: re.sub(r"\\(.)", r"\1", value)
                      for key, value in _PARAM.findall(element.group(1))}
            try:
                if "mac" in params:
                    checkpoints.append(Checkpoint.from_fields(params))
                elif "id" in params and "hash" in params:
                    records.append((int(params["id"]), params["hash"]))
            except ValueError:
                continue  # not one of ours
    return records, checkpoints


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
    # Locked until the batch's transaction ends: a second forwarder (which the cluster lock
    # of portal/jobs.py keeps out anyway) waits, then reads the mark this one moved, so no
    # record is sent twice by two forwarders at once.
    mark = session.get(AuditForward, 1, with_for_update=True)
    if mark is None:
        mark = AuditForward(id=1, last_id=0, last_seq=0)
        session.add(mark)
        session.flush()
    return mark


def _frame(message: bytes) -> bytes:
    return f"{len(message)} ".encode() + message


def forward(database: Database, url: str, *, ca_file: str | None = None,
            batch: int = 500, timeout: float = 10.0,
            checkpoints: Checkpoints | None = None) -> int:
    """Send every record not yet forwarded, then (when any was) the newest signed
    checkpoint; return how many records were sent (ForwardFailed when the repository cannot
    be reached: what was not sent stays waiting)."""
    hostname = socket.gethostname()
    sent = 0
    # Another sealer slow past lock_timeout, or the database busy: send what is sealed.
    with suppress(OperationalError):
        seal(database, wait=True)
    with _connection(url, ca_file, timeout) as sock:
        while True:
            with database.write_transaction() as session:
                mark = _mark(session)
                rows = list(session.scalars(select(AuditEvent)
                                            .where(AuditEvent.seq > mark.last_seq)
                                            .order_by(AuditEvent.seq).limit(batch)))
                if not rows:
                    break
                for row in rows:
                    sock.sendall(_frame(format_record(row, hostname)))
                mark.last_id, mark.last_seq = rows[-1].id, rows[-1].seq or 0
                mark.forwarded_at = utcnow()
                sent += len(rows)
        newest = checkpoints.newest() if checkpoints is not None and sent else None
        if newest is not None:
            sock.sendall(_frame(format_checkpoint(newest, hostname)))
    return sent


def send_checkpoint(url: str, checkpoint: Checkpoint, *, ca_file: str | None = None,
                    timeout: float = 10.0) -> None:
    """Send one checkpoint to the repository (ForwardFailed when it cannot be reached)."""
    with _connection(url, ca_file, timeout) as sock:
        sock.sendall(_frame(format_checkpoint(checkpoint, socket.gethostname())))


# The sealer (portal/audit.py) writes a record's place and hashes once: only those columns may
# change; what a record says never can.
PROTECT_SQL = ("REVOKE UPDATE, DELETE, TRUNCATE ON audit_event FROM {role}",
               "GRANT SELECT, INSERT ON audit_event TO {role}",
               "GRANT UPDATE (seq, previous_hash, record_hash) ON audit_event TO {role}")


def protect_table(database: Database, role: str) -> None:
    """PostgreSQL: the application's role may only add and read audit records and seal them
    (docs/security.md 41); run as the table's owner. The owner must not be the role the
    portal runs as."""
    if database.engine is None or database.engine.dialect.name != "postgresql":
        raise ValueError("audit lock-down is for PostgreSQL (SQLite has no roles)")
    if not role.replace("_", "").isalnum():
        raise ValueError("a role name is letters, digits and underscores")
    with database.engine.begin() as connection:
        for statement in PROTECT_SQL:
            connection.execute(text(statement.format(role=f'"{role}"')))
