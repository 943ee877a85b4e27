"""The index at scale: QIDO-RS and the study list for each kind of reader, at 1,000,000 studies
in PostgreSQL, through the whole Flask stack (authentication, access rules, audit, JSON/HTML).

Starts a throwaway PostgreSQL on 127.0.0.1 (initdb/pg_ctl, as the tests do), creates the
schema with the real migrations, fills it with ``benchmarks/synthetic.py`` and times each
request ``--runs`` times after one warm-up:

- a physician who is the referrer of 1 study in 500 (2,000 of 1,000,000) and of some orders,
- an office manager whose practice has two such physicians (about 4,000),
- a patient with his own three or four studies,
- a machine client that may read everything.

    .venv/bin/python benchmarks/index_scale.py [--studies 1000000] [--runs 20] [--explain]
        [--keep FOLDER] [--only TEXT]

``--explain`` prints EXPLAIN (ANALYZE, BUFFERS) of the slowest SELECT of each case. The last
column is the median time of a request's own SQL statements (round trips included): the rest
of a request is Python (authentication, the audit record, JSON or HTML). ``--keep FOLDER``
keeps the filled database there and reuses it on the next run with the same ``--studies``
(the fill takes minutes at 1,000,000); ``--only`` times only the matching cases.
"""

from __future__ import annotations

import argparse
import hashlib
import html
import re
import secrets
import statistics
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

QIDO_CASES = {
    "QIDO first page": "limit=50",
    "QIDO name prefix": "PatientName=Smi*&limit=50",
    "QIDO exact name": "PatientName=Smith^John&limit=50",
    "QIDO no match": "PatientName=Zzq*&limit=50",
    "QIDO modality": "ModalitiesInStudy=MR&limit=50",
    "QIDO offset 1,900": "offset=1900&limit=50",
}
MACHINE_CASES = {"QIDO offset 100,000": "offset=100000&limit=50",
                 "QIDO offset 900,000": "offset=900000&limit=50"}
LIST_CASES = {"list first page": "", "list modality": "modality=MR",
              "list page 39 by offset": "page=39"}
LIST_SEARCHES = {"list search name": "smith jo", "list search no match": "zzq"}


def _people(app: Any) -> dict[str, int]:
    """The readers: their user ids (the machine client: 0)."""
    from sqlalchemy import select

    from portal.access.grants import link_identifier
    from portal.access.models import PatientLink, User
    from portal.access.principal import Principal
    from portal.access.users import get_or_create_practice

    system = Principal("user", 0, "benchmark", roles=frozenset({"office_manager"}),
                       issuer="b", subject="b")
    with app.extensions["db"].write_transaction() as session:
        made = dict(session.execute(select(User.subject, User.id).where(User.issuer == "b")
                                    .where(User.subject.in_(["doc11", "om", "patient42"]))).all())
        if len(made) == 3:  # a kept database (--keep) has them from its first run
            return {"physician": made["doc11"], "office manager": made["om"],
                    "patient": made["patient42"]}
        practice = get_or_create_practice(session, "Synthetic Practice")
        doctor = User(issuer="b", subject="doc11", display_name="Doc Eleven",
                      roles=["physician"], practice_fk=practice.id, active=True)
        colleague = User(issuer="b", subject="doc12", display_name="Doc Twelve",
                         roles=["physician"], practice_fk=practice.id, active=True)
        manager = User(issuer="b", subject="om", display_name="Office Manager",
                       roles=["office_manager"], practice_fk=practice.id, active=True)
        patient = User(issuer="b", subject="patient42", display_name="Patient",
                       roles=["patient"], active=True)
        session.add_all([doctor, colleague, manager, patient])
        session.flush()
        link_identifier(session, system, doctor.id, "Doc^11")
        link_identifier(session, system, colleague.id, "Doc^12")
        session.add(PatientLink(user_fk=patient.id, patient_fk=42))
        return {"physician": doctor.id, "office manager": manager.id, "patient": patient.id}


# The form token of the benchmark's sessions (the search form posts it, docs/security.md 25).
CSRF_TOKEN = secrets.token_urlsafe(32)


def _session_cookie(app: Any, user_id: int) -> str:
    """A signed-in browser session for the user, as sign-in would have stored it."""
    from portal.auth.models import UserSession

    token = secrets.token_urlsafe(32)
    now = datetime.now(UTC)
    with app.extensions["db"].write_transaction() as session:
        session.add(UserSession(token_sha256=hashlib.sha256(token.encode()).hexdigest(),
                                data={"csrf": CSRF_TOKEN}, user_fk=user_id, security_epoch=0,
                                created_at=now, last_seen_at=now,
                                expires_at=now + timedelta(hours=8), auth_time=now))
    return token


def _older(client: Any, path: str, times: int) -> str:
    """The list's URL ``times`` "Older" links after ``path``."""
    for _ in range(times):
        found = re.search(r'rel="next" href="([^"]*)"', client.get(path).get_data(as_text=True))
        if found is None:
            return path
        path = "/studies" + html.unescape(found.group(1))
    return path


class Statements:
    """The SQL of the requests (this thread's statements only: the audit sealer runs beside
    them in the same process): the time spent in it, and the slowest SELECT of the current
    case (for --explain)."""

    def __init__(self, engine: Any) -> None:
        from sqlalchemy import event

        self.slowest: tuple[float, str, Any] = (0.0, "", None)
        self.total = 0.0
        self._thread = threading.get_ident()
        self._started = 0.0
        event.listen(engine, "before_cursor_execute", self._before)
        event.listen(engine, "after_cursor_execute", self._after)

    def _before(self, *_args: Any) -> None:
        if threading.get_ident() == self._thread:
            self._started = time.perf_counter()

    def _after(self, _conn: Any, _cursor: Any, statement: str, parameters: Any,
               *_args: Any) -> None:
        if threading.get_ident() != self._thread:
            return
        took = time.perf_counter() - self._started
        self.total += took
        if took > self.slowest[0] and isinstance(parameters, dict) \
                and statement.lstrip().upper().startswith("SELECT"):
            self.slowest = (took, statement, parameters)


def _time(request: Callable[[], Any], runs: int,
          statements: Statements) -> tuple[float, float, float, int]:
    """p50 and p95 of the whole request, the p50 of its time in SQL, and its status."""
    answer = request()  # warm-up (and the status to report)
    times, in_sql = [], []
    for _ in range(runs):
        statements.total = 0.0
        started = time.perf_counter()
        request()
        times.append((time.perf_counter() - started) * 1000)
        in_sql.append(statements.total * 1000)
    times.sort()
    return statistics.median(times), times[max(0, int(len(times) * 0.95) - 1)], \
        statistics.median(in_sql), answer.status_code


def main() -> int:
    """Fill, then time each case for each reader."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--explain", action="store_true")
    parser.add_argument("--keep", type=Path, metavar="FOLDER",
                        help="keep the filled database in FOLDER and reuse it next time")
    parser.add_argument("--only", default="", metavar="TEXT",
                        help="only the cases whose reader and case contain TEXT "
                             "('machine', 'list page')")
    options = parser.parse_args()

    import psycopg

    from benchmarks.synthetic import filled_portal
    from tests.conftest import basic_auth, make_client

    with filled_portal(options.studies, keep=options.keep) as (app, dsn):
        people = _people(app)
        # A new client each run: a kept database (--keep) has those of earlier runs.
        machine = basic_auth(*make_client(app, f"bench-reader-{secrets.token_hex(4)}"))
        statements = Statements(app.extensions["db"].engine)
        print(f"{'reader':<15} {'case':<22} {'status':>6} {'p50 ms':>8} {'p95 ms':>8} "
              f"{'SQL p50':>8}")
        readers: list[tuple[str, dict[str, str], str]] = [
            (name, {}, _session_cookie(app, user)) for name, user in people.items()]
        readers.append(("machine", machine, ""))
        explained = []
        for name, headers, cookie in readers:
            client = app.test_client()
            if cookie:
                client.set_cookie("portal", cookie)
            cases: dict[str, str] = {
                label: f"/dicomweb/studies?{query}" for label, query in QIDO_CASES.items()}
            if name == "machine":
                cases.update({label: f"/dicomweb/studies?{query}"
                              for label, query in MACHINE_CASES.items()})
            elif name != "patient":
                cases.update({label: f"/studies?{query}" for label, query in LIST_CASES.items()})
                # Page 39 as the list reaches it: its "Older" links, each naming the last
                # row's study (keyset paging).
                cases["list page 39"] = _older(client, "/studies", 38)
                for label, text in LIST_SEARCHES.items():
                    found = client.post("/studies", data={"q": text}, headers={
                        "Origin": "http://localhost", "Sec-Fetch-Site": "same-origin",
                        "X-CSRF-Token": CSRF_TOKEN})
                    cases[label] = found.headers.get("Location", "/studies?s=missing")
            else:
                cases["my scans"] = "/studies"
            first = client.get("/dicomweb/studies?limit=1", headers=headers)
            if first.status_code == 200:  # one study this reader may see, opened by its UID
                uid = first.get_json()[0]["0020000D"]["Value"][0]
                cases["QIDO series of a study"] = f"/dicomweb/studies/{uid}/series"
            for label, path in cases.items():
                if options.only not in f"{name} {label}":
                    continue
                statements.slowest = (0.0, "", None)
                p50, p95, sql, status = _time(partial(client.get, path, headers=headers),
                                              options.runs, statements)
                print(f"{name:<15} {label:<22} {status:>6} {p50:>8.1f} {p95:>8.1f} {sql:>8.1f}",
                      flush=True)
                if options.explain and statements.slowest[1]:
                    explained.append((name, label, statements.slowest))
        if explained:
            with psycopg.connect(dsn, autocommit=True) as connection:
                for name, label, (took, statement, parameters) in explained:
                    print(f"\n-- {name}, {label}: slowest statement {took * 1000:.1f} ms")
                    try:
                        plan = connection.execute(
                            "EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) " + statement, parameters)
                    except psycopg.Error as error:  # e.g. a literal % in the statement
                        print(f"(no plan: {error})")
                        continue
                    print("\n".join(row[0] for row in plan))
    return 0


if __name__ == "__main__":
    sys.exit(main())
