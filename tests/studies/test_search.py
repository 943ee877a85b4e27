"""The study search forgives: case, accents and word order do not matter, on SQLite and on
PostgreSQL; patients indexed before the search column existed are found too."""

from __future__ import annotations

from flask import Flask
from pydicom.uid import generate_uid
from sqlalchemy import create_engine, text

from portal.access.principal import Principal
from portal.archive import current_archive
from portal.studies.service import StudySearch, search_studies
from tests.factories import make_instance

READER = Principal("machine", 1, "reader", can_read_all=True)
NAMES = ("Doe^John", "Müller^Hans", "House^Gregory^^Dr", "Doerr^Anna", "O'Brien^Seán",
         "Smith-Jones^Mary")


def _found(app: Flask, query: str) -> list[str]:
    """The patient names a search finds, sorted."""
    with app.app_context():
        database = app.extensions["db"]
        with database.new_session() as session:
            rows, _more = search_studies(session, READER, StudySearch(text=query))
            return sorted(patient.patient_name for _study, patient in rows)


def test_names_are_found_whatever_the_case_accents_and_order(any_db_app: Flask) -> None:
    with any_db_app.app_context():
        for n, name in enumerate(NAMES):
            current_archive().ingest(make_instance(study=generate_uid(), patient_id=f"P-{n}",
                                                   patient_name=name,
                                                   AccessionNumber=f"ACC-{n}"), who="test")
    assert _found(any_db_app, "john doe") == ["Doe^John"]
    assert _found(any_db_app, "Doe John") == ["Doe^John"]
    assert _found(any_db_app, "DOE, JOHN") == ["Doe^John"]
    assert _found(any_db_app, "jo do") == ["Doe^John"]  # the start of each word is enough
    assert _found(any_db_app, "doe") == ["Doe^John", "Doerr^Anna"]
    assert _found(any_db_app, "anna doe") == ["Doerr^Anna"]
    assert _found(any_db_app, "muller") == ["Müller^Hans"]
    assert _found(any_db_app, "Mueller") == ["Müller^Hans"]
    assert _found(any_db_app, "MÜLLER hans") == ["Müller^Hans"]
    assert _found(any_db_app, "gregory house") == ["House^Gregory^^Dr"]
    assert _found(any_db_app, "dr house") == ["House^Gregory^^Dr"]
    assert _found(any_db_app, "sean o'brien") == ["O'Brien^Seán"]
    assert _found(any_db_app, "obrien") == ["O'Brien^Seán"]
    assert _found(any_db_app, "jones mary") == ["Smith-Jones^Mary"]
    assert _found(any_db_app, "john smith") == []  # every word must match
    assert _found(any_db_app, "ohn") == []  # inside a word: no
    assert _found(any_db_app, "%") == [] and _found(any_db_app, "_") == []
    # Patient IDs and accession numbers still match anywhere, without case.
    assert _found(any_db_app, "p-1") == ["Müller^Hans"]
    assert _found(any_db_app, "acc-3") == ["Doerr^Anna"]


def test_patients_from_before_the_column_are_filled_by_the_migration(database_url: str) -> None:
    from alembic import command
    from alembic.script import ScriptDirectory

    from portal.migrate import alembic_config

    config = alembic_config(database_url)
    before = ScriptDirectory.from_config(config).get_revision("20261206_0012").down_revision
    assert isinstance(before, str)
    command.upgrade(config, before)
    engine = create_engine(database_url)
    with engine.begin() as connection:
        for n, name in enumerate(("Müller^Hans", "Doe^John", "")):
            connection.execute(text(
                "INSERT INTO patient (patient_id, issuer_of_patient_id, patient_name, "
                "patient_birth_date, patient_sex) VALUES (:id, '', :name, '', '')"),
                {"id": f"OLD-{n}", "name": name})
    command.upgrade(config, "head")
    with engine.connect() as connection:
        rows = dict(connection.execute(text(
            "SELECT patient_id, name_search FROM patient ORDER BY patient_id")).all())
    engine.dispose()
    assert rows == {"OLD-0": " muller hans mueller", "OLD-1": " doe john", "OLD-2": ""}


def test_qido_fuzzy_patient_names_ignore_accents(any_db_app: Flask) -> None:
    """QIDO-RS ``fuzzymatching=true`` matches PatientName through the same folded words."""
    from tests.conftest import basic_auth, make_client

    with any_db_app.app_context():
        for n, name in enumerate(("Müller^Hans", "Doe^John")):
            current_archive().ingest(make_instance(study=generate_uid(), patient_id=f"Q-{n}",
                                                   patient_name=name), who="test")
    client = any_db_app.test_client()
    headers = basic_auth(*make_client(any_db_app, "qido-reader"))

    def names(**query: str) -> list[str]:
        response = client.get("/dicomweb/studies", query_string=query, headers=headers)
        assert response.status_code in (200, 204), response.get_data(as_text=True)
        return sorted(s["00100010"]["Value"][0]["Alphabetic"]
                      for s in (response.get_json() if response.status_code == 200 else []))

    assert names(PatientName="muller", fuzzymatching="true") == ["Müller^Hans"]
    assert names(PatientName="HANS MÜL*", fuzzymatching="true") == ["Müller^Hans"]
    assert names(PatientName="john doe", fuzzymatching="true") == ["Doe^John"]
    assert names(PatientName="muller") == []  # without fuzzy matching: the exact name
    assert names(PatientName="müller^hans") == ["Müller^Hans"]
