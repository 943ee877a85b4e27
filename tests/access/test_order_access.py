"""An RIS order opens its study to the physician who placed it: the study is found once, when
the order or the study arrives (``index.service``: ``OrderStudy``), never per request; a
cancelled or re-pointed order takes it away again. On SQLite and PostgreSQL; the orders are
real HL7 v2 messages through ``reports.inbound.handle`` (what ``flask hl7 serve`` calls for
each message it receives); on PostgreSQL also an order and its study in two transactions at
once."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from flask import Flask
from pydicom.uid import generate_uid
from sqlalchemy import select

from portal.access.grants import link_identifier
from portal.access.models import User
from portal.access.policy import study_filter
from portal.access.principal import Principal
from portal.archive import current_archive
from portal.index.models import OrderStudy, Study
from portal.index.service import add_instance
from portal.reports import inbound
from portal.reports.service import IncomingOrder, receive_order
from tests.conftest import PostgresCluster, close_app, make_app
from tests.factories import make_dataset, to_bytes

ADMIN = Principal("user", 0, "test", roles=frozenset({"office_manager"}), issuer="test",
                  subject="setup")
CR = "\r"
PROVIDER = "1999999999^Foreman^Eric^^^^^^NPI^^^^NPI"
SENDERS = inbound.parse_senders(["RIS@127.0.0.1"])


def _physicians(app: Flask) -> tuple[Principal, Principal]:
    """The ordering physician (NPI 1999999999) and a colleague with no order."""
    people = []
    with app.extensions["db"].write_transaction() as session:
        for subject, key in (("foreman", "npi:1999999999"), ("cuddy", "Cuddy^Lisa")):
            user = User(issuer="test", subject=subject, display_name=subject,
                        roles=["physician"], active=True)
            session.add(user)
            session.flush()
            link_identifier(session, ADMIN, user.id, key)
            people.append(Principal("user", user.id, subject, roles=frozenset({"physician"}),
                                    issuer="test", subject=subject))
    return people[0], people[1]


def _orm(control: str, accession: str, patient: str = "P-R", filler: str = "FI-1",
         status: str = "") -> bytes:
    """An ORM^O01 naming the ordering provider (ORC-12, OBR-16) and accession (OBR-18)."""
    def segment(name: str, fields: dict[int, str]) -> str:
        values = [""] * max(fields)
        for number, value in fields.items():
            values[number - 1] = value
        return "|".join([name, *values])

    return (CR.join([
        f"MSH|^~\\&|RIS|HOSP|PORTAL|HOSP|20260301090000||ORM^O01|{generate_uid()[-10:]}|P|2.3.1",
        f"PID|||{patient}^^^HOSP^MR||Roe^Richard||19600101|M",
        segment("ORC", {1: control, 2: "PL-1", 3: filler, 5: status, 12: PROVIDER}),
        segment("OBR", {1: "1", 2: "PL-1", 3: filler, 4: "CTCHEST^CT chest^L", 16: PROVIDER,
                        18: accession, 24: "CT"})]) + CR).encode()


def _send(app: Flask, message: bytes) -> None:
    with app.app_context():
        ack = inbound.handle(message, app.extensions["db"], peer_address="127.0.0.1",
                             allowed=SENDERS, max_bytes=1 << 20)
    assert b"MSA|AA" in ack, ack


def _store(app: Flask, accession: str, patient: str = "P-R") -> str:
    """A study of ``patient`` with ``accession`` whose images name another referrer."""
    study = generate_uid()
    ds = make_dataset(study=study, patient_id=patient, patient_name="Roe^Richard",
                      AccessionNumber=accession, ReferringPhysicianName="Somebody^Else")
    with app.app_context():
        current_archive().ingest(to_bytes(ds), who="test")
    return study


def _sees(app: Flask, principal: Principal) -> set[str]:
    with app.extensions["db"].new_session() as session:
        return set(session.scalars(select(Study.study_instance_uid)
                                   .where(study_filter(principal))))


def test_an_order_before_its_study_opens_exactly_that_study(any_db_app: Flask) -> None:
    app = any_db_app
    foreman, cuddy = _physicians(app)
    _send(app, _orm("NW", "ACC-1"))
    assert _sees(app, foreman) == set()
    study = _store(app, "ACC-1")
    # The same accession number at another patient, and another study of the same patient.
    _store(app, "ACC-1", patient="P-OTHER")
    _store(app, "ACC-2")
    assert _sees(app, foreman) == {study}
    assert _sees(app, cuddy) == set()


def test_an_order_after_its_study_opens_exactly_that_study(any_db_app: Flask) -> None:
    app = any_db_app
    foreman, cuddy = _physicians(app)
    study = _store(app, "ACC-1")
    _store(app, "ACC-1", patient="P-OTHER")
    _store(app, "ACC-2")
    assert _sees(app, foreman) == set()
    _send(app, _orm("NW", "ACC-1"))
    assert _sees(app, foreman) == {study}
    assert _sees(app, cuddy) == set()


def test_a_cancelled_order_takes_its_study_away(any_db_app: Flask) -> None:
    app = any_db_app
    foreman, _ = _physicians(app)
    study = _store(app, "ACC-1")
    _send(app, _orm("NW", "ACC-1"))
    assert _sees(app, foreman) == {study}
    _send(app, _orm("CA", "ACC-1"))
    assert _sees(app, foreman) == set()
    # A cancelled order opens nothing to a study that arrives afterwards either.
    _store(app, "ACC-1")
    assert _sees(app, foreman) == set()


def test_a_re_pointed_order_opens_its_new_study_and_no_longer_the_old(
        any_db_app: Flask) -> None:
    app = any_db_app
    foreman, _ = _physicians(app)
    first, second = _store(app, "ACC-1"), _store(app, "ACC-2")
    _send(app, _orm("NW", "ACC-1"))
    assert _sees(app, foreman) == {first}
    _send(app, _orm("XO", "ACC-2"))  # the same order (filler number), another accession
    assert _sees(app, foreman) == {second}
    _send(app, _orm("XO", "ACC-2", patient="P-OTHER"))  # ... now naming another patient
    assert _sees(app, foreman) == set()
    with app.extensions["db"].new_session() as session:
        assert session.scalars(select(OrderStudy)).all() == []


@pytest.mark.postgres
def test_an_order_and_its_study_in_two_transactions_at_once_still_meet(
        tmp_path: Path, postgres: PostgresCluster) -> None:
    """Neither transaction sees the other's uncommitted row: without the advisory lock on the
    accession number each would match nothing and the order would open nothing."""
    app = make_app(tmp_path / "instance", postgres.new_database())
    try:
        foreman, _ = _physicians(app)
        database = app.extensions["db"]
        uid = generate_uid()
        ds = make_dataset(study=uid, patient_id="P-R", patient_name="Roe^Richard",
                          AccessionNumber="ACC-9", ReferringPhysicianName="Somebody^Else")
        order = IncomingOrder(filler_order_number="FI-9", accession_number="ACC-9",
                              patient_id="P-R", ordering_provider_key="npi:1999999999",
                              status="ordered")
        errors: list[BaseException] = []

        def send_order() -> None:
            try:
                with database.write_transaction() as session:
                    receive_order(session, order)
            except BaseException as error:  # reported by the main thread
                errors.append(error)

        with database.write_transaction() as session:  # the study's transaction, open
            add_instance(session, ds, sop_class_uid=str(ds.SOPClassUID),
                         sop_instance_uid=str(ds.SOPInstanceUID), study_uid=uid,
                         series_uid=str(ds.SeriesInstanceUID),
                         transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID))
            other = threading.Thread(target=send_order)
            other.start()
            time.sleep(1.0)  # the order's transaction is waiting for this one by now
            assert other.is_alive()
        other.join(30)
        assert not other.is_alive() and errors == []
        assert _sees(app, foreman) == {uid}
    finally:
        close_app(app)


@pytest.mark.postgres
def test_a_study_arriving_while_its_order_is_being_stored_still_meets_it(
        tmp_path: Path, postgres: PostgresCluster) -> None:
    """The other way round: the order's transaction is open when the images arrive (stored
    through the archive, as C-STORE and STOW-RS store them)."""
    app = make_app(tmp_path / "instance", postgres.new_database())
    try:
        foreman, _ = _physicians(app)
        database = app.extensions["db"]
        found: list[str] = []
        errors: list[BaseException] = []

        def store() -> None:
            try:
                found.append(_store(app, "ACC-8"))
            except BaseException as error:  # reported by the main thread
                errors.append(error)

        with database.write_transaction() as session:  # the order's transaction, open
            receive_order(session, IncomingOrder(
                filler_order_number="FI-8", accession_number="ACC-8", patient_id="P-R",
                ordering_provider_key="npi:1999999999", status="ordered"))
            other = threading.Thread(target=store)
            other.start()
            time.sleep(1.0)  # the study's transaction is waiting for this one by now
            assert other.is_alive()
        other.join(30)
        assert not other.is_alive() and errors == []
        assert _sees(app, foreman) == set(found) and len(found) == 1
    finally:
        close_app(app)
