"""The study search stays fast at scale without changing what it finds: its "contains" and
word-start matches can use trigram indexes on PostgreSQL, and the two ways it combines a text
match with the access rules (a few matches by id, many while walking the date order) give the
same page on SQLite and PostgreSQL. The timing itself is benchmarks/console_search.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from pydicom.uid import generate_uid
from sqlalchemy import event, text

from portal.access.grants import link_identifier
from portal.access.models import User
from portal.access.principal import Principal, user_principal
from portal.archive import current_archive
from portal.studies import service
from portal.studies.service import StudySearch, search_studies
from tests.conftest import PostgresCluster, close_app, make_app
from tests.factories import make_instance

READER = Principal("machine", 1, "reader", can_read_all=True)
SYSTEM = Principal("user", 0, "t", roles=frozenset({"office_manager"}), issuer="t", subject="t")
NAMES = ("Smith^John", "Smithers^Ann", "Doe^Jane", "Goldsmith^Peter")
TRIGRAM_INDEXES = {"ix_patient_patient_id_trgm", "ix_patient_name_search_trgm",
                   "ix_study_accession_number_trgm"}


@pytest.fixture
def pg_app(postgres: PostgresCluster, tmp_path: Path) -> Iterator[Flask]:
    """The app on a fresh PostgreSQL database."""
    application = make_app(tmp_path / "instance", postgres.new_database())
    yield application
    close_app(application)


def _plans(app: Flask, search: StudySearch) -> str:
    """EXPLAIN of every statement the search runs, with sequential scans made unattractive
    so the plans show whichever index can answer each condition."""
    database = app.extensions["db"]
    statements: list[tuple[str, Any]] = []

    def record(_conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any,
               _many: bool) -> None:
        """Keep what the search sends, to explain it afterwards on the same connection."""
        if statement.lstrip().upper().startswith("SELECT"):
            statements.append((statement, parameters))

    with app.app_context(), database.new_session() as session:
        connection = session.connection()
        connection.exec_driver_sql("SET enable_seqscan = off")
        event.listen(connection, "before_cursor_execute", record)
        try:
            search_studies(session, READER, search)
        finally:
            event.remove(connection, "before_cursor_execute", record)
        cursor = connection.connection.driver_connection.cursor()
        lines = []
        for statement, parameters in statements:
            cursor.execute(f"EXPLAIN {statement}", parameters)
            lines += [row[0] for row in cursor.fetchall()]
        session.rollback()
    return "\n".join(lines)


def test_contains_searches_can_use_trigram_indexes_on_postgresql(pg_app: Flask) -> None:
    with pg_app.app_context():
        current_archive().ingest(make_instance(study=generate_uid(), patient_id="PX-123",
                                               patient_name="Smith^John",
                                               AccessionNumber="AC-77"), who="test")
    with pg_app.app_context(), pg_app.extensions["db"].new_session() as session:
        indexes = dict(session.execute(text(
            "SELECT indexname, indexdef FROM pg_indexes WHERE indexname LIKE '%trgm'")).all())
    # ... and QIDO's and C-FIND's PatientName, on each component group (migration 0027).
    assert set(indexes) == TRIGRAM_INDEXES | {"ix_patient_name_match_trgm"}
    assert all("USING gin" in d and "gin_trgm_ops" in d and "fastupdate=off" in d
               for d in indexes.values()), indexes  # no unsorted backlog to scan

    plans = _plans(pg_app, StudySearch(text="x-12"))
    for index in TRIGRAM_INDEXES:  # patient ID, accession number and name words
        assert index in plans, plans
    # Only the study that matched is checked for access, looked up by its id (the primary
    # key, or the covering index of studies by id, date, time and patient: migration 0020).
    assert "pk_study" in plans or "ix_study_id_date_time_patient" in plans, plans


def _fill(app: Flask) -> tuple[Principal, list[dict[str, str]]]:
    """Twelve patients with three studies each; the doctor is the referrer of half."""
    studies = []
    with app.app_context():
        for p in range(12):
            for k in range(3):
                study = {"uid": generate_uid(), "patient_id": f"PX-{p:03d}",
                         "name": NAMES[p % len(NAMES)], "accession": f"AC{p:03d}{k}",
                         "date": f"202601{(p * 3 + k) % 28 + 1:02d}", "time": f"1{k}0000",
                         "referrer": "House^Gregory" if (p + k) % 2 == 0 else "Other^Doc"}
                studies.append(study)
                current_archive().ingest(make_instance(
                    study=study["uid"], patient_id=study["patient_id"],
                    patient_name=study["name"], AccessionNumber=study["accession"],
                    StudyDate=study["date"], StudyTime=study["time"],
                    ReferringPhysicianName=study["referrer"],
                    modality="MR" if k == 1 else "CT"), who="test")
    database = app.extensions["db"]
    with database.write_transaction() as session:
        doctor = User(issuer="t", subject="house", display_name="Gregory House",
                      roles=["physician"], active=True)
        session.add(doctor)
        session.flush()
        link_identifier(session, SYSTEM, doctor.id, "House^Gregory")
        doctor_id = doctor.id
    with database.new_session() as session:
        principal = user_principal(session.get(User, doctor_id), "session")
    return principal, studies


def _expected(studies: list[dict[str, str]], text: str, *, oldest_first: bool = False,
              modality: str = "") -> list[str]:
    """The doctor's studies matching the text, in the list's order, worked out by hand."""
    words = text.lower().split()

    def matches(study: dict[str, str]) -> bool:
        name_words = study["name"].lower().replace("^", " ").split()
        return (text.lower() in study["patient_id"].lower()
                or text.lower() in study["accession"].lower()
                or all(any(n.startswith(w) for n in name_words) for w in words))

    found = [s for s in studies if s["referrer"] == "House^Gregory" and matches(s)
             and (not modality or s["accession"].endswith("1") == (modality == "MR"))]
    found.sort(key=lambda s: (s["date"], s["time"]), reverse=not oldest_first)
    return [s["uid"] for s in found]


def test_few_or_many_matches_give_the_same_pages(any_db_app: Flask,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    principal, studies = _fill(any_db_app)
    monkeypatch.setattr(service, "PAGE_SIZE", 4)
    database = any_db_app.extensions["db"]

    def pages(search: StudySearch) -> list[str]:
        """Every page of the search, one after the other."""
        found: list[str] = []
        with any_db_app.app_context(), database.new_session() as session:
            for page in range(1, 20):
                rows, more = search_studies(session, principal,
                                            StudySearch(**{**search.__dict__, "page": page}))
                found += [study.study_instance_uid for study, _patient in rows]
                if not more:
                    return found
        raise AssertionError("more than 19 pages")

    cases = [("smith", {}), ("john smith", {}), ("smi", {"oldest_first": True}),
             ("px-00", {}), ("PX-011", {}), ("ac0110", {}), ("ac01", {"modality": "MR"}),
             ("1", {}), ("doe", {}), ("zz", {}), ("%", {}), ("x-0", {"oldest_first": True})]
    for query, options in cases:
        expected = _expected(studies, query, **options)
        search = StudySearch(text=query, **options)
        for few, few_visible in ((1000, 10), (3, 10), (0, 10), (3, 0), (0, 0), (3, 100),
                                 (0, 100)):
            # all by id; some by id, some walked (more visible studies than few_visible);
            # all walked; and some or all tested on the 18 visible ids
            monkeypatch.setattr(service, "FEW_MATCHES", few)
            monkeypatch.setattr(service, "FEW_VISIBLE", few_visible)
            assert pages(search) == expected, (query, options, few, few_visible)
    assert _expected(studies, "smith")  # the cases find something
    assert len(_expected(studies, "1")) > 4  # and more than a page
