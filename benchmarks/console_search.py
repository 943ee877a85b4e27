"""The console's study search with 100,000 studies in PostgreSQL: p50 and p95 per query.

Starts a throwaway PostgreSQL on 127.0.0.1 (initdb/pg_ctl, as the tests do), creates the
schema with the real migrations, bulk-inserts synthetic patients, studies and referrer keys
with SQL, then runs the console's search (``portal.admin.console.find_studies``) as an office
manager whose practice sees the studies that name its physician (a fifth of them).

    .venv/bin/python benchmarks/console_search.py [--studies 100000] [--runs 50]
    .venv/bin/python benchmarks/console_search.py --as physician   # sees 1 study in 500
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

QUERIES = {"name": "mill jo", "surname": "smith", "patient id": "P0012",
           "accession": "A00077", "date range": "", "modality": "",
           # the extremes of a text search: nothing matches, or almost everything does
           "no match": "zzq", "digit 1": "1"}


def _fill(connection: object, studies: int) -> None:
    """Synthetic rows, inserted with set-based SQL (seconds, not minutes)."""
    from portal.index.names import name_search_text

    surnames = ["Smith", "Miller", "Müller", "Doe", "Nguyen", "Garcia", "O'Brien", "Kowalski"]
    given = ["John", "Jane", "Hans", "Maria", "Joanna", "Peter", "Ana", "Li"]
    names = [(f"{s}^{g}", name_search_text(f"{s}^{g}")) for s in surnames for g in given]
    cur = connection.cursor()  # type: ignore[attr-defined]
    cur.execute("CREATE TEMP TABLE names (n int, name text, search text)")
    cur.executemany("INSERT INTO names VALUES (%s, %s, %s)",
                    [(i, n, s) for i, (n, s) in enumerate(names)])
    patients = studies // 4
    cur.execute(f"""INSERT INTO patient (id, patient_id, issuer_of_patient_id, patient_name,
        patient_birth_date, patient_sex, name_search)
        SELECT g, 'P' || lpad(g::text, 7, '0'), '', names.name, '19700101', 'F', names.search
        FROM generate_series(1, {patients}) g JOIN names ON names.n = g % {len(names)}""")
    cur.execute(f"""INSERT INTO study (id, study_instance_uid, patient_fk, study_date,
        study_time, study_id, study_description, accession_number, modalities_in_study,
        referring_physician_name, institution_name, number_of_series, number_of_instances,
        created_at, updated_at)
        SELECT g, '1.2.826.0.1.3680043.10.' || g, 1 + g % {patients},
          to_char(date '2015-01-01' + (g % 3650), 'YYYYMMDD'), '101500', '1', 'CT chest',
          'A' || lpad(g::text, 7, '0'), CASE WHEN g % 3 = 0 THEN 'MR' ELSE 'CT' END,
          CASE WHEN g % 5 = 0 THEN 'House^Gregory' ELSE 'Other^Doc' || (g % 500) END, '', 1, 1,
          now(), now() FROM generate_series(1, {studies}) g""")
    cur.execute(f"""INSERT INTO series (id, series_instance_uid, study_fk, modality,
        series_number, series_description, body_part_examined, series_date,
        number_of_instances)
        SELECT g, '1.2.826.0.1.3680043.11.' || g, g,
          CASE WHEN g % 3 = 0 THEN 'MR' ELSE 'CT' END, 1, '', '', '', 1
        FROM generate_series(1, {studies}) g""")
    # Each key with its study's date and time, as the index keeps them.
    cur.execute(f"""INSERT INTO study_referrer (study_fk, key, study_date, study_time)
        SELECT g, CASE WHEN g % 5 = 0 THEN 'name:HOUSE^GREGORY'
                       ELSE 'name:OTHER^DOC' || (g % 500) END,
          to_char(date '2015-01-01' + (g % 3650), 'YYYYMMDD'), '101500'
        FROM generate_series(1, {studies}) g""")
    for table in ("patient", "study", "series"):
        cur.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                    f"(SELECT max(id) FROM {table}))")
    cur.execute("ANALYZE")


def main() -> int:
    """Fill, then time each query ``--runs`` times (after one warm-up)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--as", dest="viewer", choices=("manager", "physician"),
                        default="manager", help="search as the office manager (a fifth of "
                        "the studies) or as a physician without a practice (1 in 500)")
    options = parser.parse_args()

    from benchmarks.synthetic import filled_portal
    from portal.access.grants import link_identifier
    from portal.access.models import User
    from portal.access.principal import Principal, user_principal
    from portal.access.users import get_or_create_practice
    from portal.admin.console import find_studies
    from portal.studies.service import StudySearch

    with filled_portal(options.studies, _fill) as (app, _dsn):
        system = Principal("user", 0, "t", roles=frozenset({"office_manager"}), issuer="t",
                           subject="t")
        database = app.extensions["db"]
        with database.write_transaction() as session:
            practice = get_or_create_practice(session, "Clinic")
            house = User(issuer="b", subject="house", display_name="Gregory House",
                         roles=["physician"], practice_fk=practice.id, active=True)
            manager = User(issuer="b", subject="om", roles=["office_manager"],
                           practice_fk=practice.id, active=True)
            loner = User(issuer="b", subject="doc7", display_name="Doc Seven",
                         roles=["physician"], active=True)
            session.add_all([house, manager, loner])
            session.flush()
            link_identifier(session, system, house.id, "House^Gregory")
            link_identifier(session, system, loner.id, "Other^Doc7")
            viewer_id = manager.id if options.viewer == "manager" else loner.id
        searches = {**{k: StudySearch(text=v) for k, v in QUERIES.items() if v},
                    "date range": StudySearch(date_from="2020-03-01", date_to="2020-03-31"),
                    "modality": StudySearch(modality="MR"),
                    "name, page 3": StudySearch(text="smith", page=3),
                    "name + dates": StudySearch(text="smith", date_from="2020-03-01",
                                                date_to="2020-03-31")}
        with app.app_context(), database.new_session() as session:
            principal = user_principal(session.get(User, viewer_id), "session")
            print(f"{'query':<14} {'rows':>4} {'p50 ms':>7} {'p95 ms':>7}")
            for label, search in searches.items():
                find_studies(session, principal, search)
                times = []
                for _ in range(options.runs):
                    started = time.perf_counter()
                    rows, _more = find_studies(session, principal, search)
                    times.append((time.perf_counter() - started) * 1000)
                    session.rollback()
                times.sort()
                p95 = times[max(0, int(len(times) * 0.95) - 1)]
                print(f"{label:<14} {len(rows):>4} {statistics.median(times):>7.1f} {p95:>7.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
