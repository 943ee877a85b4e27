"""Synthetic index rows at scale, inserted with set-based SQL into a migrated PostgreSQL
database (seconds for 100,000 studies, about two minutes for 1,000,000 on this machine).

The shape follows a hospital group's index: ``studies`` studies of ``studies * 0.3``
patients (names from a small list, so name searches match many), three series each, one
referring physician per study out of ``referrers`` (``name:DOC^<n>``), RIS orders for a
tenth of them, and grants to other people; no instance rows (the study-level queries do not
read them) unless ``instances_per_series`` is given.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

SURNAMES = ["Smith", "Miller", "Müller", "Doe", "Nguyen", "Garcia", "O'Brien", "Kowalski"]
GIVEN = ["John", "Jane", "Hans", "Maria", "Joanna", "Peter", "Ana", "Li"]
MODALITIES = ["CT", "MR", "CR", "US", "MG"]


def referrer_name(number: int) -> str:
    """The DICOM name under which studies name referrer ``number``."""
    return f"Doc^{number}"


def fill(connection: Any, studies: int, *, referrers: int = 500,
         instances_per_series: int = 0) -> dict[str, int]:
    """Insert the rows; return the counts. ``connection``: a psycopg autocommit connection."""
    from portal.index.names import name_match_text, name_search_text

    names = [(f"{s}^{g}", name_search_text(f"{s}^{g}"), name_match_text(f"{s}^{g}"))
             for s in SURNAMES for g in GIVEN]
    patients = max(1, studies * 3 // 10)
    cur = connection.cursor()
    cur.execute("CREATE TEMP TABLE names (n int, name text, search text, match text)")
    cur.executemany("INSERT INTO names VALUES (%s, %s, %s, %s)",
                    [(i, n, s, m) for i, (n, s, m) in enumerate(names)])
    # The name's search words and PN match text, as the Patient model keeps them.
    cur.execute(f"""INSERT INTO patient (id, patient_id, issuer_of_patient_id, patient_name,
        patient_birth_date, patient_sex, name_search, name_match)
        SELECT g, 'P' || lpad(g::text, 7, '0'), '', names.name,
          to_char(date '1930-01-01' + (g * 37 % 30000), 'YYYYMMDD'),
          CASE WHEN g % 2 = 0 THEN 'F' ELSE 'M' END, names.search, names.match
        FROM generate_series(1, {patients}) g JOIN names ON names.n = g % {len(names)}""")
    modality = f"(ARRAY{MODALITIES!r})[1 + g % {len(MODALITIES)}]".replace('"', "'")
    cur.execute(f"""INSERT INTO study (id, study_instance_uid, patient_fk, study_date,
        study_time, study_id, study_description, accession_number, modalities_in_study,
        referring_physician_name, institution_name, number_of_series, number_of_instances,
        created_at, updated_at)
        SELECT g, '1.2.826.0.1.3680043.10.' || g, 1 + (g::bigint * 7919) % {patients},
          to_char(date '2007-01-01' + (g % 7300), 'YYYYMMDD'),
          lpad(((g * 13) % 24)::text, 2, '0') || '1500', '1', 'Synthetic study',
          'A' || lpad(g::text, 8, '0'), {modality}, 'Doc^' || (g % {referrers}),
          'Synthetic Hospital', 3, {3 * instances_per_series}, now(), now()
        FROM generate_series(1, {studies}) g""")
    cur.execute(f"""INSERT INTO series (id, series_instance_uid, study_fk, modality,
        series_number, series_description, body_part_examined, series_date,
        number_of_instances)
        SELECT g, '1.2.826.0.1.3680043.11.' || g, 1 + (g - 1) / 3, {modality}, 1 + g % 3, '',
          '', '', {instances_per_series}
        FROM generate_series(1, {3 * studies}) g""")
    # Each key with its study's date and time, as the index keeps them (migration 0028).
    cur.execute(f"""INSERT INTO study_referrer (study_fk, key, study_date, study_time)
        SELECT id, 'name:DOC^' || (id % {referrers}), study_date, study_time FROM study""")
    orders = studies // 10
    cur.execute(f"""INSERT INTO imaging_order (placer_order_number, filler_order_number,
        accession_number, study_instance_uid, patient_id, patient_name, procedure, modality,
        ordering_provider, ordering_provider_key, status, location, updated_at)
        SELECT 'PL' || g, 'F' || g, 'A' || lpad((g * 10)::text, 8, '0'), '',
          'P' || lpad((1 + ((g * 10)::bigint * 7919) % {patients})::text, 7, '0'), '', '', '',
          '', 'name:DOC^' || ((g * 10 + 1) % {referrers}), 'reported', '', now()
        FROM generate_series(1, {orders}) g""")
    # Each order's study, as the portal resolves it when an order or a study arrives
    # (portal.index.service.resolve_order): same accession number, same Patient ID.
    cur.execute("""INSERT INTO order_study (order_fk, study_fk, key, study_date, study_time)
        SELECT o.id, s.id, o.ordering_provider_key, s.study_date, s.study_time
        FROM imaging_order o
        JOIN study s ON s.accession_number = o.accession_number
        JOIN patient p ON p.id = s.patient_fk AND p.patient_id = o.patient_id
        WHERE o.accession_number != '' AND o.ordering_provider_key != ''
          AND o.status != 'cancelled'""")
    # Other people with grants (a study each, or a patient's every study), so the grant
    # table is not empty for the access rules.
    cur.execute("""INSERT INTO portal_user (issuer, subject, email, display_name, roles,
        idp_roles, phone_number, notify_by_sms, active, security_epoch, created_at)
        SELECT 'synthetic', 'grantee-' || g, '', 'Grantee ' || g, '["physician"]', '[]', '',
          false, true, 0, now() FROM generate_series(1, 1000) g""")
    grants = studies // 50
    cur.execute(f"""INSERT INTO access_grant (user_fk, study_instance_uid, patient_fk, reason,
        break_glass, granted_by, created_at, revoked_by)
        SELECT (SELECT min(id) FROM portal_user WHERE issuer = 'synthetic') + g % 1000,
          CASE WHEN g % 4 = 0 THEN NULL ELSE '1.2.826.0.1.3680043.10.' || (g * 49) END,
          CASE WHEN g % 4 = 0 THEN 1 + g % {patients} ELSE NULL END, 'synthetic', false,
          'synthetic', now(), ''
        FROM generate_series(1, {grants}) g""")
    instances = 0
    if instances_per_series:
        instances = 3 * studies * instances_per_series
        cur.execute(f"""INSERT INTO instance (sop_instance_uid, series_fk, sop_class_uid,
            transfer_syntax_uid, instance_number, number_of_frames, rows, columns,
            photometric_interpretation, created_at)
            SELECT '1.2.826.0.1.3680043.12.' || g, 1 + (g - 1) / {instances_per_series},
              '1.2.840.10008.5.1.4.1.1.2', '1.2.840.10008.1.2.1', 1 + g % {instances_per_series},
              1, 512, 512, 'MONOCHROME2', now()
            FROM generate_series(1, {instances}) g""")
    for table in ("patient", "study", "series"):
        cur.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                    f"(SELECT max(id) FROM {table}))")
    cur.execute("VACUUM ANALYZE")
    return {"patients": patients, "studies": studies, "series": 3 * studies,
            "orders": orders, "grants": grants, "instances": instances}


@contextmanager
def filled_portal(studies: int, filler: Callable[[Any, int], Any] | None = None,
                  keep: Path | None = None) -> Iterator[tuple[Any, str]]:
    """A throwaway PostgreSQL on 127.0.0.1 (initdb/pg_ctl, as the tests do), the schema by the
    real migrations, ``filler(connection, studies)`` (default: ``fill``); yields the app and
    the database's psycopg DSN, and removes everything afterwards.

    With ``keep`` (a folder), the cluster is kept there when it stops and started again from
    there next time instead of being filled again (minutes at 1,000,000 studies); the newest
    migrations still run on it. Only a folder filled with the same number of studies is
    reused (its ``studies`` file says how many)."""
    import psycopg

    from tests.conftest import PostgresCluster, close_app, make_app

    marker = keep / "studies" if keep else None
    reuse = marker is not None and marker.exists()
    if reuse and marker is not None and int(marker.read_text()) != studies:
        raise SystemExit(f"{keep} holds {marker.read_text().strip()} studies, not {studies}")
    root = keep or Path(tempfile.mkdtemp(prefix="portal-bench-pg-"))
    cluster = PostgresCluster(root)
    if reuse:
        cluster.start_again()
    else:
        cluster.start()
    try:
        url = f"postgresql+psycopg://portal@127.0.0.1:{cluster.port}/portal_test_1" if reuse \
            else cluster.new_database()
        app = make_app(root / "instance", url)
        dsn = url.replace("postgresql+psycopg", "postgresql")
        if not reuse:
            with psycopg.connect(dsn, autocommit=True) as connection:
                started = time.perf_counter()
                counts = (filler or fill)(connection, studies)
                print(f"filled {counts or studies} in {time.perf_counter() - started:.0f} s")
            if marker is not None:
                marker.write_text(str(studies))
        try:
            yield app, dsn
        finally:
            close_app(app)
    finally:
        try:
            cluster.stop()
        finally:  # the cluster's files (hundreds of MB) are of no use once it stopped
            if keep is None:
                shutil.rmtree(root, ignore_errors=True)
