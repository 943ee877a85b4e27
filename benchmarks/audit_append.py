"""Audited appends per second and their p95 at 1, 4 and 16 writer threads on PostgreSQL,
before and after the audit trail was taken off the request path (issue 16 item 3).

Starts a throwaway PostgreSQL on 127.0.0.1 (initdb/pg_ctl, as the tests do: fsync off, so
the numbers are the portal's and the lock's, not the disk's), creates the schema with the
real migrations, then, for each writer count, lets the writers append read records
(``audit.record``, one committed transaction each, as a PHI read does) for ``--seconds``:

- ``before``: the old algorithm, kept here to compare: every append locks the one head row
  (``SELECT ... FOR UPDATE``), chains its record to the head's hash and moves the head, in
  the writer's transaction, so writers queue on that row;
- ``session``: the first lock-free version, kept here to compare: a plain insert through
  the engine's pool in a transaction of its own (``Database.audit_transaction``: pool
  pre-ping, BEGIN, INSERT, COMMIT, four round trips, and a Session around them);
- ``after``: ``portal.audit.record`` as it is now: one autocommit INSERT (one round trip) on
  a connection kept for audit appends, no ORM; the process's background sealer chains the
  records in batches meanwhile, and the run ends only once all of them are sealed (``seal
  lag``: how long that took after the last append; with ``--processes`` this process seals
  what the writer processes' sealers left when they ended).

``cpu us``: CPU time of the writer processes (all their threads, the sealer's included)
per append, in microseconds: unlike appends/s it barely depends on what else the machine
runs, and one core divided by it bounds what one process can append.

All writer threads share one process (its GIL) unless ``--processes`` spreads them over
several, as gunicorn's workers would be. Each mode and writer count gets a fresh database.
The chain is verified at the end of every ``after`` run.

    .venv/bin/python benchmarks/audit_append.py [--seconds 5] [--writers 1 4 16]
    .venv/bin/python benchmarks/audit_append.py --processes 4   # 16 writers as 4 x 4 threads
"""

from __future__ import annotations

import argparse
import os
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


def _session_append(database: Any, n: int) -> None:
    """The first lock-free ``audit.record``: a Core insert in ``audit_transaction``."""
    from sqlalchemy import insert

    from portal import audit

    values = audit._values(audit.INSTANCES_ACCESSED, action="R", outcome=0,
                           who=f"user:bench|{n}", source_address="127.0.0.1",
                           study_instance_uid=f"1.2.3.{n}", patient_id="P1",
                           details={"what": "study"})
    with database.audit_transaction() as session:
        session.connection().execute(insert(audit._EVENTS), values)
        audit._appended_in(session)


def _append(database: Any, n: int) -> None:
    from portal import audit

    audit.record(database, audit.INSTANCES_ACCESSED, action="R", outcome=0,
                 who=f"user:bench|{n}", source_address="127.0.0.1",
                 study_instance_uid=f"1.2.3.{n}", patient_id="P1", details={"what": "study"})


def _threads(database: Any, writers: int, start_at: float, stop_at: float,
             mode: str) -> list[float]:
    """``writers`` threads appending from ``start_at`` to ``stop_at`` (time.time());
    every append's latency in seconds."""
    append = {"before": _legacy_append, "session": _session_append, "after": _append}[mode]
    latencies: list[list[float]] = [[] for _ in range(writers)]

    def writer(index: int) -> None:
        mine = latencies[index]
        n = index * 10_000_000
        time.sleep(max(0.0, start_at - time.time()))
        while time.time() < stop_at:
            began = time.perf_counter()
            try:
                append(database, n)
            except Exception as exc:  # e.g. lock_timeout in the old lock's queue
                print(f"append failed: {exc.__class__.__name__}", file=sys.stderr)
                continue
            mine.append(time.perf_counter() - began)
            n += 1

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [x for mine in latencies for x in mine]


def _process(url: str, instance: str, writers: int, seconds: float, mode: str,
             ready: Any, go: Any, results: Any) -> None:
    """One writer process (as one gunicorn worker): its own app and engine."""
    from portal import create_app

    app = create_app({"INSTANCE_PATH": instance, "ENV": "test", "DATABASE_URL": url,
                      "SECRET_KEY": "benchmark-secret-key-that-is-long-enough"})
    database = app.extensions["db"]
    ready.put(True)
    go.wait()
    start_at = time.time()
    try:
        cpu = time.process_time()
        latencies = _threads(database, writers, start_at, start_at + seconds, mode)
        results.put((latencies, time.process_time() - cpu))
    finally:
        database.dispose()


def _run(database: Any, url: str, instance: Path, writers: int, processes: int,
         seconds: float, mode: str) -> tuple[int, list[float], float]:
    """Appends made, their latencies (sorted), and the writers' CPU seconds."""
    if processes == 1:
        start_at = time.time() + 0.2
        cpu = time.process_time()
        merged = _threads(database, writers, start_at, start_at + seconds, mode)
        cpu = time.process_time() - cpu
    else:
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        ready, results, go = context.Queue(), context.Queue(), context.Event()
        shares = [writers // processes + (1 if i < writers % processes else 0)
                  for i in range(processes)]
        workers = [context.Process(target=_process, args=(url, str(instance), share, seconds,
                                                          mode, ready, go, results))
                   for share in shares if share]
        for worker in workers:
            worker.start()
        try:
            for _ in workers:  # every process has started its app: all begin together
                ready.get(timeout=300)
            go.set()
            merged, cpu = [], 0.0
            for _ in workers:
                latencies, used = results.get(timeout=seconds + 120)
                merged += latencies
                cpu += used
        finally:
            for worker in workers:
                worker.join(timeout=30)
                if worker.is_alive():
                    worker.kill()
    merged.sort()
    return len(merged), merged, cpu


def main() -> int:
    """One database per mode and writer count; print appends/s, p50 and p95."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--writers", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--modes", nargs="+", choices=("before", "session", "after"),
                        default=["before", "session", "after"])
    parser.add_argument("--processes", type=int, default=1,
                        help="spread the writer threads over this many processes, as over "
                             "gunicorn workers (1: all threads in this process)")
    options = parser.parse_args()

    from sqlalchemy import func, select

    from portal import audit
    from portal.access.models import AuditEvent, AuditHead
    from tests.conftest import PostgresCluster, close_app, make_app

    root = Path(tempfile.mkdtemp(prefix="portal-bench-pg-"))
    cluster = PostgresCluster(root)
    cluster.start()
    try:
        print(f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}, "
              f"{options.processes} process(es)")
        print(f"{'mode':<7} {'writers':>7} {'appends':>8} {'per s':>7} {'p50 ms':>7} "
              f"{'p95 ms':>7} {'cpu us':>7} {'seal lag s':>10}")
        for mode in options.modes:
            for writers in options.writers:
                url = cluster.new_database()
                instance = root / f"instance-{mode}-{writers}"
                app = make_app(instance, url)
                database = app.extensions["db"]
                if mode == "before":
                    with database.write_transaction() as session:
                        session.add(AuditHead(id=1, last_hash="", count=0))
                count, latencies, cpu = _run(database, url, instance, writers,
                                        min(options.processes, writers), options.seconds, mode)
                lag = ""
                if mode != "before":
                    ended = time.perf_counter()
                    while True:  # the background sealer catches up on its own
                        if options.processes > 1:  # its writers' sealers ended with them:
                            audit.seal(database)  # as flask audit seal --watch would
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
                      f"{statistics.median(latencies) * 1000:>7.2f} {p95:>7.2f} "
                      f"{cpu / max(count, 1) * 1e6:>7.0f} {lag:>10}",
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
