"""Audited appends per second and their p95 at 1, 4 and 16 writer threads on PostgreSQL,
before and after the audit trail was taken off the request path (issue 16 item 3).

Starts a throwaway PostgreSQL on 127.0.0.1 (initdb/pg_ctl, as the tests do: fsync off, so
the numbers are the portal's and the lock's, not the disk's), creates the schema with the
real migrations, then, for each writer count, lets the writers append read records
(``audit.record``, one committed transaction each, as a PHI read does) for ``--seconds``:

- ``before``: the old algorithm, kept here to compare: every append locks the one head row
  (``SELECT ... FOR UPDATE``), chains its record to the head's hash and moves the head, in
  the writer's transaction, so writers queue on that row;
- ``after``: ``portal.audit.record`` as it is now: a plain insert; the process's background
  sealer chains the records in batches meanwhile, and the run ends only once all of them are
  sealed (``seal lag``: how long that took after the last append).

Each mode and writer count gets a fresh database. The chain is verified at the end of every
``after`` run.

    .venv/bin/python benchmarks/audit_append.py [--seconds 5] [--writers 1 4 16]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))


def _legacy_append(database: Any, n: int) -> None:
    """The old ``audit.record``: lock the head row, chain, insert, move the head."""
    from sqlalchemy import select

    from portal import audit
    from portal.access.models import AuditEvent, AuditHead
    from portal.db import utcnow

    with database.audit_transaction() as session:
        head = session.scalars(select(AuditHead).where(AuditHead.id == 1)
                               .with_for_update()).one()
        row = AuditEvent(occurred_at=utcnow().replace(microsecond=0),
                         event_id=audit.INSTANCES_ACCESSED[0],
                         event_name=audit.INSTANCES_ACCESSED[1], action="R", outcome=0,
                         who=f"user:bench|{n}", source_address="127.0.0.1",
                         study_instance_uid=f"1.2.3.{n}", patient_id="P1",
                         details={"what": "study"}, previous_hash=head.last_hash)
        row.record_hash = audit._digest(row, head.last_hash)
        session.add(row)
        head.last_hash = row.record_hash
        head.count += 1


def _append(database: Any, n: int) -> None:
    from portal import audit

    audit.record(database, audit.INSTANCES_ACCESSED, action="R", outcome=0,
                 who=f"user:bench|{n}", source_address="127.0.0.1",
                 study_instance_uid=f"1.2.3.{n}", patient_id="P1", details={"what": "study"})


def _run(database: Any, writers: int, seconds: float, mode: str) -> tuple[int, list[float]]:
    append = _legacy_append if mode == "before" else _append
    latencies: list[list[float]] = [[] for _ in range(writers)]
    start = threading.Barrier(writers + 1)
    stop_at = [0.0]

    def writer(index: int) -> None:
        mine = latencies[index]
        start.wait()
        n = index * 10_000_000
        while time.perf_counter() < stop_at[0]:
            began = time.perf_counter()
            append(database, n)
            mine.append(time.perf_counter() - began)
            n += 1

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(writers)]
    for thread in threads:
        thread.start()
    stop_at[0] = time.perf_counter() + seconds
    start.wait()
    for thread in threads:
        thread.join()
    merged = sorted(x for mine in latencies for x in mine)
    return len(merged), merged


def main() -> int:
    """One database per mode and writer count; print appends/s, p50 and p95."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--writers", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--modes", nargs="+", choices=("before", "after"),
                        default=["before", "after"])
    options = parser.parse_args()

    from sqlalchemy import func, select

    from portal import audit
    from portal.access.models import AuditEvent, AuditHead
    from tests.conftest import PostgresCluster, close_app, make_app

    root = Path(tempfile.mkdtemp(prefix="portal-bench-pg-"))
    cluster = PostgresCluster(root)
    cluster.start()
    try:
        print(f"{'mode':<7} {'writers':>7} {'appends':>8} {'per s':>7} {'p50 ms':>7} "
              f"{'p95 ms':>7} {'seal lag s':>10}")
        for mode in options.modes:
            for writers in options.writers:
                app = make_app(root / f"instance-{mode}-{writers}", cluster.new_database())
                database = app.extensions["db"]
                if mode == "before":
                    with database.write_transaction() as session:
                        session.add(AuditHead(id=1, last_hash="", count=0))
                count, latencies = _run(database, writers, options.seconds, mode)
                lag = ""
                if mode == "after":
                    ended = time.perf_counter()
                    while True:  # the background sealer catches up on its own
                        with database.new_session() as session:
                            waiting = session.scalar(select(func.count(AuditEvent.id))
                                                     .where(AuditEvent.seq.is_(None)))
                        if not waiting:
                            break
                        time.sleep(0.01)
                    lag = f"{time.perf_counter() - ended:.2f}"
                    with database.new_session() as session:
                        checked, bad = audit.verify_chain(session)
                    assert bad is None and checked == count, (checked, bad, count)
                p95 = latencies[max(0, int(len(latencies) * 0.95) - 1)] * 1000
                print(f"{mode:<7} {writers:>7} {count:>8} {count / options.seconds:>7.0f} "
                      f"{statistics.median(latencies) * 1000:>7.2f} {p95:>7.2f} {lag:>10}",
                      flush=True)
                close_app(app)
    finally:
        try:
            cluster.stop()
        finally:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
