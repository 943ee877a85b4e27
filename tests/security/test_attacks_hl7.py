"""Attacks on the HL7 v2 MLLP listener (docs/security.md 47; issue 12 item 1), against the real
``flask --app app hl7 serve`` process on 127.0.0.1 and the real TLS stack.

- With no HL7_ALLOWED_SENDERS an anonymous ORU^R01 (status C) rewrote another patient's
  report, and an anonymous ORM^O01 naming a linked physician's NPI (OBR-16) gave him another
  patient's study. Now every message is refused (AR, "sender not allowed"), nothing is stored
  and each refusal is a security alert.
- MLLP over TLS 1.2+ with client certificates: plain TCP, no certificate, a certificate the
  CA did not sign and TLS 1.1 are refused; the hospital's certificate is answered.
- An order from a listed RIS that lets a physician see a study he could not see before is
  audited as a grant (110113 with 110135, as the console's grants), naming the sender.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient
from pydicom.uid import generate_uid
from sqlalchemy import select

from portal.access.grants import link_identifier
from portal.access.models import AuditEvent
from portal.archive import current_archive
from portal.index.models import Order
from portal.reports import inbound
from portal.reports.models import Report
from tests.archive import test_dimse_tls
from tests.conftest import REPO, IdentityProvider, add_person, free_port, signed_in, wait_for
from tests.factories import make_dataset, to_bytes
from tests.reports import test_hl7
from tests.reports.test_hl7 import ADMIN, CR, Ris, msa, oru, segment, send

pki = test_dimse_tls.pki  # a throwaway CA, the listener's and a RIS's certificates
ris = test_hl7.ris  # the in-process listener with RIS@127.0.0.1 listed
NPI = "1888888888"
PROVIDER = f"{NPI}^House^Gregory^^^^^^NPI^^^^NPI"


@dataclass
class Listener:
    """A running ``flask --app app hl7 serve`` and what it wrote to stderr."""

    port: int
    process: subprocess.Popen[str]
    stderr: list[str] = field(default_factory=list)


@contextmanager
def hl7_serve(instance: Path, **settings: str) -> Iterator[Listener]:
    """Run the listener as an operator would, on the app's instance folder and database."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PORTAL_")}
    env.update(PORTAL_INSTANCE_PATH=str(instance), PORTAL_ENV="test",
               PORTAL_HL7_HOST="127.0.0.1", PORTAL_HL7_PORT=str(port),
               **{f"PORTAL_{key}": value for key, value in settings.items()})
    process = subprocess.Popen([sys.executable, "-m", "flask", "--app", "app", "hl7", "serve"],
                               cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    listener = Listener(port, process)

    def listening() -> bool:
        assert process.poll() is None, process.communicate()[1]
        with socket.socket() as probe:
            return probe.connect_ex(("127.0.0.1", port)) == 0

    try:
        assert wait_for(listening, timeout=60)
        yield listener
    finally:
        process.send_signal(signal.SIGINT)  # the command stops cleanly on Ctrl-C
        try:
            listener.stderr.append(process.communicate(timeout=30)[1])
        except subprocess.TimeoutExpired:
            process.kill()
            listener.stderr.append(process.communicate()[1])


def exchange(port: int, payload: bytes, tls: ssl.SSLContext | None = None) -> bytes | None:
    """One MLLP frame to the listener; its answer, or None when the connection was refused
    (handshake failure, reset or closed without an answer)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=20) as plain:
            sock = tls.wrap_socket(plain, server_hostname="localhost") if tls else plain
            sock.sendall(b"\x0b" + payload + b"\x1c\r")
            answer = b""
            while not answer.endswith(b"\x1c\r"):
                chunk = sock.recv(65536)
                if not chunk:
                    return None
                answer += chunk
            return answer
    except (ssl.SSLError, ConnectionError):
        return None


def orm(accession: str, patient: str, provider: str, number: str = "") -> str:
    """A new-order ORM^O01 from application RIS; ``number`` the placer/filler order number."""
    number = number or accession
    return CR.join([
        f"MSH|^~\\&|RIS|HOSP|PORTAL|HOSP|20260301090000||ORM^O01|{generate_uid()[-10:]}|P|2.3.1",
        f"PID|||{patient}^^^HOSP^MR||Doe^Jane",
        segment("ORC", {1: "NW", 2: f"PL{number}", 3: f"FI{number}", 12: provider}),
        segment("OBR", {1: "1", 2: f"PL{number}", 3: f"FI{number}", 4: "CTCHEST^CT chest^L",
                        16: provider, 18: accession, 24: "CT"})]) + CR


@dataclass(frozen=True)
class Victim:
    """Another physician's patient's study, with its one image and a final report."""

    study: str
    series: str
    sop: str
    accession: str
    patient: str


def victim_study(app: Flask) -> Victim:
    """A study referred by somebody else, with a final report a listed RIS sent."""
    accession, patient = "V" + generate_uid()[-8:], "P-VICTIM-" + generate_uid()[-6:]
    # Roe^Richard: the PID-5 of test_hl7.oru (a report must name its study's patient).
    ds = make_dataset(patient_id=patient, patient_name="Roe^Richard", AccessionNumber=accession,
                      ReferringPhysicianName="Somebody^Else")
    with app.app_context():
        current_archive().ingest(to_bytes(ds), who="test")
    # The hospital's RIS (listed) sends the real report, in this process.
    answer = inbound.handle(oru(accession, "F", "IMP:The true impression.", patient=patient,
                                study_uid=ds.StudyInstanceUID).encode(),
                            app.extensions["db"], peer_address="127.0.0.1",
                            allowed={("RIS", "127.0.0.1")}, max_bytes=1 << 20)
    assert msa(answer.decode())[0] == "AA"
    return Victim(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, accession,
                  patient)


def physician(app: Flask, idp: IdentityProvider, npi: str = NPI) -> tuple[str, FlaskClient]:
    """A signed-in physician linked to his NPI, and his browser."""
    subject = f"house-{generate_uid()[-8:]}"
    user_id = add_person(app, idp, subject, ["physician"])
    with app.extensions["db"].write_transaction() as session:
        link_identifier(session, ADMIN, user_id, f"npi:{npi}")
    return subject, signed_in(app, idp, subject)


def sees(browser: FlaskClient, victim: Victim) -> tuple[int, int]:
    """(QIDO status for the study, rendered-image status) as the physician."""
    qido = browser.get(f"/dicomweb/studies?StudyInstanceUID={victim.study}").status_code
    image = browser.get(f"/dicomweb/studies/{victim.study}/series/{victim.series}/instances/"
                        f"{victim.sop}/rendered").status_code
    return qido, image


def alerts(app: Flask, event_id: str = "110113") -> list[AuditEvent]:
    """Audit records of one event id, oldest first."""
    with app.extensions["db"].new_session() as session:
        return list(session.scalars(select(AuditEvent).where(AuditEvent.event_id == event_id)
                                    .order_by(AuditEvent.id)))


def report_of(app: Flask, accession: str) -> Report:
    """The one report of an accession number."""
    with app.extensions["db"].new_session() as session:
        return session.scalars(select(Report).where(Report.accession_number == accession)).one()


def test_without_allowed_senders_anonymous_reports_and_orders_are_refused(
        oidc_app: Flask, idp: IdentityProvider) -> None:
    """The listener as `flask --app app hl7 serve` runs it, with HL7_ALLOWED_SENDERS unset:
    the forged amendment and the forged order both get AR and change nothing."""
    app = oidc_app
    victim = victim_study(app)
    _subject, browser = physician(app, idp)
    assert sees(browser, victim) == (204, 404)
    before = report_of(app, victim.accession)
    instance = Path(app.config["PORTAL"]["INSTANCE_PATH"])
    with hl7_serve(instance) as listener:
        forged = oru(victim.accession, "C", "IMP:Forged impression.", patient=victim.patient,
                     study_uid=victim.study)
        answer = exchange(listener.port, forged.encode())
        assert answer is not None
        code, reason = msa(answer.decode())
        assert (code, reason) == ("AR", "sender not allowed"), answer
        assert "ERR|||207^sender not allowed" in answer.decode()
        order = exchange(listener.port, orm(victim.accession, victim.patient, PROVIDER).encode())
        assert order is not None and msa(order.decode()) == ("AR", "sender not allowed")
        garbage = exchange(listener.port, b"not HL7 at all")  # refused before it is read
        assert garbage is not None and msa(garbage.decode())[0] == "AR"
    assert "HL7_ALLOWED_SENDERS is empty" in listener.stderr[0]
    # Nothing changed: the report keeps its text and version, no order exists, the
    # physician still sees neither the study nor its image.
    after = report_of(app, victim.accession)
    assert (after.impression, after.version, after.status) == (
        "The true impression.", before.version, "final")
    with app.extensions["db"].new_session() as session:
        assert session.scalars(select(Order)).first() is None
    assert sees(browser, victim) == (204, 404)
    refused = [r for r in alerts(app) if r.details.get("reason") == "sender not allowed"]
    assert [r.who for r in refused] == ["hl7:RIS", "hl7:RIS", "hl7:"]
    assert {r.source_address for r in refused} == {"127.0.0.1"}
    assert all(r.patient_id == "" and r.study_instance_uid == "" for r in refused)
    received = [r for r in alerts(app, "110104") if r.who.startswith("hl7:")]
    assert len(received) == 1  # only the listed RIS's true report


def test_a_listed_name_from_another_address_or_another_name_is_refused(
        oidc_app: Flask, idp: IdentityProvider) -> None:
    """Listing RIS@127.0.0.2 does not let RIS@127.0.0.1 in, nor another application name from
    a listed address; each refusal is a security alert."""
    app = oidc_app
    victim = victim_study(app)
    instance = Path(app.config["PORTAL"]["INSTANCE_PATH"])
    with hl7_serve(instance, HL7_ALLOWED_SENDERS="RIS@127.0.0.2,OTHER@127.0.0.1") as listener:
        forged = oru(victim.accession, "C", "IMP:Forged.", patient=victim.patient)
        answer = exchange(listener.port, forged.encode())
        assert answer is not None and msa(answer.decode()) == ("AR", "sender not allowed")
        wrong_name = exchange(listener.port, forged.replace("|RIS|", "|PACS|", 1).encode())
        assert wrong_name is not None and msa(wrong_name.decode())[0] == "AR"
    assert "HL7_ALLOWED_SENDERS is empty" not in listener.stderr[0]
    refused = [(r.who, r.source_address, r.details["reason"]) for r in alerts(app)]
    assert refused == [("hl7:RIS", "127.0.0.1", "sender not allowed"),
                       ("hl7:PACS", "127.0.0.1", "sender not allowed")]
    assert report_of(app, victim.accession).impression == "The true impression."


def _client_context(pki: Path, certificate: str | None) -> ssl.SSLContext:
    """A RIS's TLS client trusting the test CA, with the named certificate (or none)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(pki / "ca.crt")
    if certificate:
        context.load_cert_chain(pki / f"{certificate}.crt", pki / f"{certificate}.key")
    return context


def test_mllp_over_tls_requires_a_certificate_the_ca_signed(
        oidc_app: Flask, pki: Path) -> None:
    app = oidc_app
    victim = victim_study(app)
    instance = Path(app.config["PORTAL"]["INSTANCE_PATH"])
    settings = {"HL7_ALLOWED_SENDERS": "RIS@127.0.0.1", "HL7_TLS_CERT": str(pki / "scp.crt"),
                "HL7_TLS_KEY": str(pki / "scp.key"), "HL7_TLS_CA": str(pki / "ca.crt")}

    def amendment(text: str) -> bytes:
        return oru(victim.accession, "C", f"IMP:{text}", patient=victim.patient,
                   study_uid=victim.study).encode()

    with hl7_serve(instance, **settings) as listener:
        # Plain MLLP on the TLS port, TLS without a certificate, and a certificate the
        # hospital's CA did not sign: no answer, nothing stored.
        assert exchange(listener.port, amendment("Plain.")) is None
        assert exchange(listener.port, amendment("Anonymous."),
                        _client_context(pki, None)) is None
        assert exchange(listener.port, amendment("Stranger."),
                        _client_context(pki, "stranger")) is None
        # TLS 1.1 is refused by the listener.
        old = _client_context(pki, "modality")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            old.minimum_version = ssl.TLSVersion.TLSv1
            old.maximum_version = ssl.TLSVersion.TLSv1_1
        old.set_ciphers("DEFAULT:@SECLEVEL=0")  # let this client offer TLS 1.1 at all
        with socket.create_connection(("127.0.0.1", listener.port), timeout=10) as raw, \
                pytest.raises(ssl.SSLError) as refused:
            old.wrap_socket(raw, server_hostname="localhost").do_handshake()
        assert "version" in str(refused.value).lower() or "protocol" in str(refused.value).lower()
        assert report_of(app, victim.accession).impression == "The true impression."
        # The hospital's RIS with its certificate is answered and its amendment stored.
        answer = exchange(listener.port, amendment("Amended over TLS."),
                          _client_context(pki, "modality"))
        assert answer is not None and msa(answer.decode()) == ("AA", ""), answer
    assert "(TLS 1.2+, client certificates required)" in listener.stderr[0]
    assert report_of(app, victim.accession).impression == "Amended over TLS."


def test_an_order_that_opens_a_study_to_a_physician_is_audited_as_a_grant(
        ris: Ris, idp: IdentityProvider) -> None:
    """The listed RIS names a physician as ordering provider of another patient's study: he
    may now see it (the RIS is trusted to say so), and the trail shows who gave him access."""
    app = ris.app
    victim = victim_study(app)
    subject, browser = physician(app, idp)
    assert sees(browser, victim) == (204, 404)
    (ack,) = send(ris.port, orm(victim.accession, victim.patient, PROVIDER))
    assert msa(ack)[0] == "AA"
    assert sees(browser, victim) == (200, 200)
    grants = [r for r in alerts(app) if r.details.get("type") == "110135"]
    assert len(grants) == 1
    grant = grants[0]
    assert (grant.who, grant.source_address, grant.action) == ("hl7:RIS", "127.0.0.1", "U")
    assert (grant.study_instance_uid, grant.patient_id) == (victim.study, victim.patient)
    assert grant.details["to"] == f"{idp.issuer}|{subject}"
    assert grant.details["via"] == "hl7 ORM^O01" and grant.details["order"]
    # The same order again opens nothing new: no second grant.
    (again,) = send(ris.port, orm(victim.accession, victim.patient, PROVIDER))
    assert msa(again)[0] == "AA"
    assert len([r for r in alerts(app) if r.details.get("type") == "110135"]) == 1
    # Nor is an order by the physician the study already names as its referrer.
    _order_by_the_referrer_is_no_grant(ris, idp)


def test_an_order_moved_onto_another_study_is_audited_as_a_grant(
        ris: Ris, idp: IdentityProvider) -> None:
    """An update that names no physician but moves a physician's order onto another
    patient's accession opens that study to him: audited too."""
    app = ris.app
    victim = victim_study(app)
    subject, browser = physician(app, idp, "1666666666")
    number = "ORD" + generate_uid()[-8:]
    (first,) = send(ris.port, orm("ELSEWHERE" + number[-4:], "P-NOBODY",
                                  "1666666666^Chase^Robert^^^^^^NPI^^^^NPI", number))
    assert msa(first)[0] == "AA"
    assert not [r for r in alerts(app) if r.details.get("type") == "110135"]  # no study yet
    (moved,) = send(ris.port, orm(victim.accession, victim.patient, "", number))
    assert msa(moved)[0] == "AA"
    assert sees(browser, victim) == (200, 200)
    grants = [r for r in alerts(app) if r.details.get("type") == "110135"]
    assert [(g.study_instance_uid, g.details["to"]) for g in grants] == [
        (victim.study, f"{idp.issuer}|{subject}")]


def _order_by_the_referrer_is_no_grant(ris: Ris, idp: IdentityProvider) -> None:
    """The referrer named in the study ordered it: the order gives nothing new, so no grant."""
    from portal.access.models import User

    app = ris.app
    subject, browser = physician(app, idp, "1555555555")
    with app.extensions["db"].write_transaction() as session:
        user_id = session.scalars(select(User.id).where(User.subject == subject)).one()
        link_identifier(session, ADMIN, user_id, "Own^Doctor")
    accession, patient = "R" + generate_uid()[-8:], "P-OWN"
    ds = make_dataset(patient_id=patient, AccessionNumber=accession,
                      ReferringPhysicianName="Own^Doctor")
    with app.app_context():
        current_archive().ingest(to_bytes(ds), who="test")
    assert browser.get(f"/studies/{ds.StudyInstanceUID}").status_code == 200
    (ack,) = send(ris.port, orm(accession, patient, "1555555555^Own^Doctor^^^^^^NPI^^^^NPI"))
    assert msa(ack)[0] == "AA"
    assert not [r for r in alerts(app) if r.details.get("type") == "110135"
                and r.study_instance_uid == ds.StudyInstanceUID]
