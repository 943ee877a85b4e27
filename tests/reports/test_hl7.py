"""Reports and orders from a RIS over HL7 v2 MLLP, sent by a separate process with the PyPI
``hl7`` package's MLLP client, against ``flask --app app hl7 serve``-style listening.

The listener runs in this process (the same ``MllpServer`` and ``inbound.handle`` the CLI
wires), on 127.0.0.1; every message goes through a real TCP connection.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from flask import Flask
from pydicom.uid import generate_uid
from sqlalchemy import select

from portal.access.grants import link_identifier, link_patient
from portal.access.models import User
from portal.access.principal import Principal
from portal.archive import current_archive
from portal.index.models import Order
from portal.reports import hl7, inbound
from portal.reports.mllp import MllpServer
from portal.reports.models import Report, ReportVersion
from portal.reports.notify import notifier
from portal.sharing.models import ShareLink
from tests.conftest import IdentityProvider, add_person, csrf_of, signed_in
from tests.factories import make_dataset, to_bytes
from tests.sharing import test_delivery
from tests.sharing.test_delivery import Mailbox

ADMIN = Principal("user", 0, "test", roles=frozenset({"office_manager"}), issuer="test",
                  subject="setup")
CR = "\r"
mailbox = test_delivery.mailbox  # the real SMTP server fixture (aiosmtpd on 127.0.0.1)


@dataclass
class Ris:
    app: Flask
    port: int
    server: MllpServer


@pytest.fixture
def ris(oidc_app: Flask) -> Iterator[Ris]:
    database = oidc_app.extensions["db"]
    allowed = inbound.parse_senders(["RIS@127.0.0.1"])

    notify = notifier(oidc_app)  # as `flask hl7 serve` wires it

    def on_message(raw: bytes, peer: str, oversized: bool) -> bytes:
        with oidc_app.app_context():
            return inbound.handle(raw, database, peer_address=peer, allowed=allowed,
                                  max_bytes=1 << 20, oversized=oversized, notify=notify)

    server = MllpServer(("127.0.0.1", 0), on_message, 1 << 20)
    server.start()
    try:
        yield Ris(oidc_app, server.server_address[1], server)
    finally:
        server.shutdown()
        server.server_close()


def send(port: int, *messages: str) -> list[str]:
    """Send messages from another process with hl7.client.MLLPClient; return the ACKs."""
    script = textwrap.dedent("""
        import json, sys
        import hl7.client
        messages = json.load(sys.stdin)
        answers = []
        with hl7.client.MLLPClient("127.0.0.1", int(sys.argv[1])) as client:
            for message in messages:
                answers.append(str(client.send_message(message.encode("utf-8")), "utf-8"))
        json.dump(answers, sys.stdout)
    """)
    import json

    done = subprocess.run([sys.executable, "-c", script, str(port)],
                          input=json.dumps(list(messages)), capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    return list(json.loads(done.stdout))


def msa(ack: str) -> tuple[str, str]:
    segment = next(s for s in ack.strip("\x0b\x1c\r").split("\r") if s.startswith("MSA"))
    fields = segment.split("|")
    return fields[1], fields[3] if len(fields) > 3 else ""


def oru(accession: str, status: str, *lines: str, control: str = "", patient: str = "P-R",
        study_uid: str = "", charset: str = "", language: str = "") -> str:
    control = control or generate_uid()[-12:]
    segments = [f"MSH|^~\\&|RIS|HOSP|PORTAL|HOSP|20260301101500||ORU^R01|{control}|P|2.5.1"
                f"||||||{charset}",
                f"PID|||{patient}^^^HOSP^MR||Roe^Richard||19600101|M" + (
                    f"|||||||{language}" if language else ""),  # PID-15
                f"OBR|1|PL{accession}|FI{accession}|CTCHEST^CT chest^L|||20260301100000|||||"
                f"||||^House^Gregory||{accession}|||20260301101000||CT|{status}|||||||"
                "1234^Chase^Robert"]
    if study_uid:
        segments.append(f"ZDS|{study_uid}^HOSP^Application^DICOM")
    for number, line in enumerate(lines, start=1):
        kind = "&IMP" if line.startswith("IMP:") else "&GDT"
        segments.append(f"OBX|{number}|TX|{kind}||{line.removeprefix('IMP:')}||||||{status}")
    return CR.join(segments) + CR


def store_study(app: Flask, accession: str, patient: str = "P-R",
                referrer: str = "Wilson^James") -> str:
    study = generate_uid()
    ds = make_dataset(study=study, patient_id=patient, patient_name="Roe^Richard",
                      AccessionNumber=accession, ReferringPhysicianName=referrer)
    with app.app_context():
        current_archive().ingest(to_bytes(ds), who="test")
    return study


def people(app: Flask, idp: IdentityProvider) -> dict[str, str]:
    prefix = generate_uid()[-8:]
    subjects = {"doctor": f"wilson-{prefix}", "patient": f"roe-{prefix}",
                "other": f"cuddy-{prefix}"}
    ids = {"doctor": add_person(app, idp, subjects["doctor"], ["physician"]),
           "patient": add_person(app, idp, subjects["patient"], ["patient"]),
           "other": add_person(app, idp, subjects["other"], ["physician"])}
    with app.extensions["db"].write_transaction() as session:
        link_identifier(session, ADMIN, ids["doctor"], "Wilson^James")
        link_identifier(session, ADMIN, ids["other"], "Cuddy^Lisa")
    return subjects


def test_oru_report_appears_first_for_the_physician_and_later_for_the_patient(
        ris: Ris, idp: IdentityProvider) -> None:
    app = ris.app
    subjects = people(app, idp)
    accession = "A" + generate_uid()[-8:]
    study = store_study(app, accession)
    with app.extensions["db"].write_transaction() as session:
        user_id = session.scalars(select(User.id).where(
            User.subject == subjects["patient"])).one()
        link_patient(session, ADMIN, user_id, "P-R")
    app.config["PORTAL"]["REPORT_PATIENT_DELAY_HOURS"] = 48

    (ack,) = send(ris.port, oru(accession, "F", "Lungs are clear.", "IMP:No acute disease."))
    assert msa(ack) == ("AA", "")
    with app.extensions["db"].new_session() as session:
        [report] = session.scalars(select(Report).where(
            Report.accession_number == accession)).all()
        # OBR-7 is the time of the examination: FHIR's effectiveDateTime.
        assert report.clinical_at == hl7.parse_timestamp("20260301100000") is not None
    doctor = signed_in(app, idp, subjects["doctor"])
    page = doctor.get(f"/studies/{study}").get_data(as_text=True)
    assert "No acute disease." in page and "Lungs are clear." in page
    assert page.index("No acute disease.") < page.index('id="series-heading"')  # report first
    patient = signed_in(app, idp, subjects["patient"])
    assert patient.get(f"/studies/{study}").status_code == 200
    assert "No acute disease." not in patient.get(f"/studies/{study}").get_data(as_text=True)
    # Two days later the patient may read it.
    with app.extensions["db"].write_transaction() as session:
        for report in session.scalars(select(Report)):
            report.final_at = report.final_at - timedelta(hours=49)
    assert "No acute disease." in patient.get(f"/studies/{study}").get_data(as_text=True)
    # A physician who did not refer the patient sees neither study nor report.
    other = signed_in(app, idp, subjects["other"])
    assert other.get(f"/studies/{study}").status_code == 404


def test_preliminary_then_amended_keeps_history_and_marks_the_status(
        ris: Ris, idp: IdentityProvider) -> None:
    app = ris.app
    subjects = people(app, idp)
    accession = "B" + generate_uid()[-8:]
    study = store_study(app, accession)
    acks = send(ris.port, oru(accession, "P", "IMP:Probable nodule."),
                oru(accession, "F", "IMP:Nodule 6 mm."),
                oru(accession, "C", "IMP:Nodule 8 mm (corrected)."),
                oru(accession, "C", "IMP:Nodule 8 mm (corrected)."))  # a resend: no new version
    assert [msa(a)[0] for a in acks] == ["AA"] * 4
    with app.extensions["db"].new_session() as session:
        report = session.scalars(select(Report).where(
            Report.accession_number == accession)).one()
        versions = session.scalars(select(ReportVersion).where(
            ReportVersion.report_fk == report.id).order_by(ReportVersion.version)).all()
    assert report.status == "amended" and report.version == 3
    assert [v.status for v in versions] == ["preliminary", "final", "amended"]
    assert [v.impression for v in versions][:2] == ["Probable nodule.", "Nodule 6 mm."]
    page = signed_in(app, idp, subjects["doctor"]).get(f"/studies/{study}").get_data(
        as_text=True)
    assert "Amended" in page and "Nodule 8 mm (corrected)." in page
    assert "Nodule 6 mm." in page  # the earlier final version, under "Earlier versions"


def test_unmatched_report_is_kept_and_found_when_the_study_arrives(
        ris: Ris, idp: IdentityProvider) -> None:
    app = ris.app
    subjects = people(app, idp)
    accession = "C" + generate_uid()[-8:]
    (ack,) = send(ris.port, oru(accession, "F", "IMP:Report before images."))
    assert msa(ack)[0] == "AA"
    study = store_study(app, accession)
    page = signed_in(app, idp, subjects["doctor"]).get(f"/studies/{study}").get_data(
        as_text=True)
    assert "Report before images." in page


def test_markup_and_escapes_in_report_text_are_shown_as_text(
        ris: Ris, idp: IdentityProvider) -> None:
    app = ris.app
    subjects = people(app, idp)
    accession = "D" + generate_uid()[-8:]
    study = store_study(app, accession)
    (ack,) = send(ris.port, oru(accession, "F", "<script>alert(1)</script><b>bold</b>",
                                "IMP:Left \\F\\ right\\.br\\second line \\T\\ more"))
    assert msa(ack)[0] == "AA"
    page = signed_in(app, idp, subjects["doctor"]).get(f"/studies/{study}").get_data(
        as_text=True)
    assert "<script>alert(1)</script>" not in page and "<b>bold</b>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "Left | right\nsecond line &amp; more" in page


def raw_exchange(port: int, payload: bytes) -> bytes:
    """Send bytes exactly as given inside one MLLP frame; return the answer frame."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"\x0b" + payload + b"\x1c\r")
        answer = b""
        while not answer.endswith(b"\x1c\r"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    return answer


@pytest.mark.parametrize(("payload", "reason"), [
    (b"PID|||P1\r", "does not start with an MSH"),
    (b"MSH|^^\\&|RIS|HOSP|PORTAL|HOSP|2026||ORU^R01|9|P|2.5\r", "delimiters"),
    (b"MSH|^~\\&|RIS|HOSP|PORTAL|HOSP|2026||ORU^R01|77|P|2.5\rOBX|1|TX|||caf\xe9 au lait\r",
     "not valid UTF-8"),
    (b"MSH|^~\\&|RIS|HOSP|PORTAL|HOSP|2026||ADT^A01|78|P|2.5\rPID|||P1\r",
     "ADT\\S\\A01 is not supported"),
    (b"MSH|^~\\&|OTHER|HOSP|PORTAL|HOSP|2026||ORU^R01|79|P|2.5\rPID|||P1\r",
     "not allowed"),
    (b"MSH|^~\\&|RIS|HOSP|PORTAL|HOSP|2026||ORU^R01|80|P|2.5\rOBX|1|TX|GDT||"
     + b"x" * (10 << 20) + b"\r", "larger than"),
])
def test_bad_messages_are_refused_with_a_reason_and_nothing_is_stored(
        ris: Ris, payload: bytes, reason: str) -> None:
    answer = raw_exchange(ris.port, payload).decode("utf-8")
    code, text = msa(answer)
    assert code == "AR" and reason in text, answer
    with ris.app.extensions["db"].new_session() as session:
        assert session.scalars(select(Report)).first() is None
    # The listener keeps working after each refusal.
    (ack,) = send(ris.port, oru("OK" + generate_uid()[-6:], "F", "IMP:fine"))
    assert msa(ack)[0] == "AA"


def ack_segments(answer: bytes) -> list[list[str]]:
    """The segments of one ACK frame, split into fields (MSH-n is ``segments[0][n - 1]``)."""
    text = answer.decode("utf-8")
    assert text.startswith("\x0b") and text.endswith("\x1c\r"), text
    body = text[1:-2]
    assert "\x0b" not in body and "\x1c" not in body and "\n" not in body, text
    return [s.split("|") for s in body.split("\r") if s]


def unreadable(msh: bytes) -> bytes:
    """A message with this MSH and a body that is not UTF-8 (the default of an empty MSH-18)."""
    return msh + b"\rPID|||P1^^^HOSP^MR\rOBX|1|TX|||caf\xe9 au lait\r"


@pytest.mark.parametrize("msh", [
    b"MSH|^~\\&|RIS|HOSP|PORTAL|RAD|20260301101500||ORU^R01|C-81|P|2.3.1",
    b"MSH|^~\\&|RIS|HOSP|PORTAL|RAD|20260301101500||ORU^R01|C-81|P|2.3.1||||||ISO IR87",
    b"MSH|^^\\&|RIS|HOSP|PORTAL|RAD|20260301101500||ORU^R01|C-81|P|2.3.1",
], ids=["bad UTF-8 in a later segment", "unsupported MSH-18", "MSH-2 repeats a delimiter"])
def test_an_unreadable_message_is_refused_to_its_sender_with_its_control_id(
        ris: Ris, msh: bytes) -> None:
    """The AR of a message parse() refused answers whoever its MSH names (HL7 v2.5 2.14.9)."""
    header, ack, error = ack_segments(raw_exchange(ris.port, unreadable(msh)))
    assert header[:2] == ["MSH", "^~\\&"] and len(header) == 12
    assert header[2:6] == ["PORTAL", "RAD", "RIS", "HOSP"]  # MSH-3 to MSH-6
    assert header[8] == "ACK^R01^ACK" and header[11] == "2.3.1"
    assert ack[:3] == ["MSA", "AR", "C-81"] and error[0] == "ERR"


@pytest.mark.parametrize(("msh", "sender", "control"), [
    # A CR ends the MSH segment: what follows it is another segment of theirs, not of ours.
    (b"MSH|^~\\&|RIS\rMSA|AA|FORGED|HOSP|PORTAL|RAD|||ORU^R01|C-82|P|2.5", ["RIS", ""], ""),
    # An escaped CR or LF becomes a space; MLLP framing bytes are dropped.
    (b"MSH|^~\\&|RIS\\X0D\\MSA\\X0A\\\x0bX\x1cY|HOSP|PORTAL|RAD|||ORU^R01|C-82\\X0D\\ERR|P|2.5",
     ["RIS MSA XY", "HOSP"], "C-82 ERR"),
    # Their own delimiters: our field separator in their values is escaped, their component
    # separator becomes ours.
    (b"MSH#@~\\&#RIS|AA|FORGED@NS#HOSP^1#PORTAL#RAD###ORU@R01#C-82|MSA#P#2.5",
     ["RIS\\F\\AA\\F\\FORGED^NS", "HOSP\\S\\1"], "C-82\\F\\MSA"),
], ids=["CR in MSH-3", "escaped CR and framing bytes", "another field separator"])
def test_an_echoed_sender_cannot_add_fields_or_segments_to_the_refusal(
        ris: Ris, msh: bytes, sender: list[str], control: str) -> None:
    """What the AR echoes stays inside its own fields of MSH and MSA, in one frame."""
    segments = ack_segments(raw_exchange(ris.port, unreadable(msh)))
    assert [s[0] for s in segments] == ["MSH", "MSA", "ERR"]
    header, ack = segments[0], segments[1]
    assert len(header) == 12 and header[4:6] == sender
    assert len(ack) == 4 and ack[1:3] == ["AR", control]


def test_echoed_values_are_cut_to_their_hl7_length(ris: Ris) -> None:
    """MSH-3 to MSH-6 at most 227 characters (whole escape sequences), MSH-10 64."""
    msh = (b"MSH#^~\\&#" + b"A" * 1000 + b"#" + b"|" * 300 + b"#PORTAL#RAD###ORU^R01#"
           + b"9" * 500 + b"#P#2.5")
    header, ack, _ = ack_segments(raw_exchange(ris.port, unreadable(msh)))
    assert header[4] == "A" * 227 and header[5] == "\\F\\" * 75
    assert ack[1:3] == ["AR", "9" * 64]


def test_a_readable_messages_echo_cannot_add_frames_fields_or_segments(ris: Ris) -> None:
    """The ACK of a message that parses (here refused: a type the portal does not take)
    echoes MSH-3 to MSH-6 and MSH-12 without control bytes and the trigger only as a code:
    escaped framing bytes and a forged MSH in MSH-9 stay out of the answer."""
    msh = (b"MSH|^~\\&|RIS\x1c\x0b|HOSP|PORTAL|RAD|20260301101500||"
           b"ZZZ^R01\\X1C0D0B\\MSH\\F\\\\S\\|C-83|P|2.5.1\x07")
    answer = raw_exchange(ris.port, msh + b"\rPID|||P1^^^HOSP^MR\r")
    segments = ack_segments(answer)
    assert [s[0] for s in segments] == ["MSH", "MSA", "ERR"], segments
    header = segments[0]
    assert len(header) == 12 and header[4:6] == ["RIS", "HOSP"], header
    assert header[8] == "ACK^^ACK" and header[11] == "2.5.1"
    assert segments[1][2] == "C-83"


def test_times_without_an_offset_are_the_practices(ris: Ris) -> None:
    """HL7 v2.5 2.A.22: a time without an offset is the sender's local time, the practice's
    zone (PORTAL_TIMEZONE); one that cannot be a moment is no time, not a failure."""
    berlin = ZoneInfo("Europe/Berlin")
    assert hl7.parse_timestamp("20240501003000", berlin) == datetime(2024, 4, 30, 22, 30,
                                                                     tzinfo=UTC)
    assert hl7.parse_timestamp("20240501003000+0000", berlin) == datetime(2024, 5, 1, 0, 30,
                                                                          tzinfo=UTC)
    assert hl7.parse_timestamp("20240101120000") == datetime(2024, 1, 1, 12, tzinfo=UTC)
    for impossible in ("00010101+0100", "99991231235959-1400", "00010101"):
        assert hl7.parse_timestamp(impossible, ZoneInfo("Asia/Tokyo")) is None, impossible
    accession = "T" + generate_uid()[-8:]
    store_study(ris.app, accession)
    message = oru(accession, "F", "IMP:Timed.").replace("|||20260301100000|", "|||00010101+0100|")
    answer = inbound.handle(oru(accession, "F", "IMP:Timed.").encode(), ris.app.extensions["db"],
                            peer_address="127.0.0.1", allowed={("RIS", "127.0.0.1")},
                            max_bytes=1 << 20, zone=berlin)
    assert msa(answer.decode())[0] == "AA"
    with ris.app.extensions["db"].new_session() as session:
        report = session.scalars(select(Report).where(Report.accession_number == accession)).one()
        assert report.clinical_at == datetime(2026, 3, 1, 9, tzinfo=UTC)  # 10:00 in Berlin
    impossible = inbound.handle(message.encode(), ris.app.extensions["db"],
                                peer_address="127.0.0.1", allowed={("RIS", "127.0.0.1")},
                                max_bytes=1 << 20, zone=berlin)
    assert msa(impossible.decode())[0] == "AA"  # stored, its clinical time unknown

    def clinical_time_after(obr7: str) -> datetime | None:
        sent = oru(accession, "F", "IMP:Timed.").replace("|||20260301100000|", f"|||{obr7}|")
        answer = inbound.handle(sent.encode(), ris.app.extensions["db"],
                                peer_address="127.0.0.1", allowed={("RIS", "127.0.0.1")},
                                max_bytes=1 << 20, zone=berlin)
        assert msa(answer.decode())[0] == "AA", answer
        with ris.app.extensions["db"].new_session() as session:
            return session.scalars(select(Report.clinical_at).where(
                Report.accession_number == accession)).one()

    # HL7 v2.5 2.5.3: an empty field says nothing (the time stays); only "" deletes it.
    assert clinical_time_after("") == datetime(2026, 3, 1, 9, tzinfo=UTC)
    assert clinical_time_after('""') is None


def test_latin1_declared_in_msh18_is_decoded(ris: Ris) -> None:
    accession = "E" + generate_uid()[-8:]
    message = oru(accession, "F", "IMP:Caf\u00e9 normal", charset="8859/1")
    answer = raw_exchange(ris.port, message.encode("latin-1"))
    assert msa(answer.decode("latin-1"))[0] == "AA"
    with ris.app.extensions["db"].new_session() as session:
        report = session.scalars(select(Report).where(
            Report.accession_number == accession)).one()
    assert report.impression == "Caf\u00e9 normal"


def test_a_report_without_status_gets_an_application_error(ris: Ris) -> None:
    (ack,) = send(ris.port, oru("F" + generate_uid()[-8:], "", "IMP:no status"))
    assert msa(ack) == ("AE", "the result status (OBR-25 or OBX-11) is missing or unknown")


def segment(name: str, fields: dict[int, str]) -> str:
    """A segment with the given fields (1-based, as numbered in the standard)."""
    values = [""] * max(fields)
    for number, value in fields.items():
        values[number - 1] = value
    return "|".join([name, *values])


def orm(accession: str, control: str, status: str, provider: str, when: str = "",
        language: str = "", patient: str = "P-R") -> str:
    return CR.join([
        f"MSH|^~\\&|RIS|HOSP|PORTAL|HOSP|20260301090000||ORM^O01|{generate_uid()[-10:]}|P|2.3.1",
        segment("PID", {3: f"{patient}^^^HOSP^MR", 5: "Roe^Richard", 7: "19600101", 8: "M",
                        15: language}),
        segment("ORC", {1: control, 2: f"PL{accession}", 3: f"FI{accession}", 5: status,
                        12: provider}),
        segment("OBR", {1: "1", 2: f"PL{accession}", 3: f"FI{accession}",
                        4: "CTCHEST^CT chest^L", 16: provider, 18: accession, 24: "CT",
                        27: f"^^^{when}"})]) + CR


def test_the_patients_language_from_pid_15_is_what_a_share_link_for_him_is_written_in(
        ris: Ris, idp: IdentityProvider) -> None:
    """PID-15 (primary language) of a report or an order of the study, in any form a RIS
    writes it (ISO 639-1, HL7 table 0296, ISO 639-2), chooses the language of a link for
    the patient, the newest message first; a code that names no language changes nothing;
    the patient's own choice in the portal wins over the records."""
    from tests.i18n.test_share_language import _selected_language

    app = ris.app
    subjects = people(app, idp)
    accession = "L" + generate_uid()[-8:]
    study = store_study(app, accession)
    doctor = signed_in(app, idp, subjects["doctor"])

    def form() -> tuple[str, str]:
        page = doctor.get(f"/studies/{study}/share")
        assert page.status_code == 200
        html = page.get_data(as_text=True)
        hint = html.split('id="language-hint">', 1)[1].split("</p>", 1)[0]
        return _selected_language(html), hint

    assert form() == ("en", "The text message or e-mail with the link, and the pages it "
                            "opens, are in this language.")
    (ack,) = send(ris.port, oru(accession, "F", "IMP:Normal.", language="SPA^Spanish^HL70296"))
    assert msa(ack) == ("AA", "")
    language, hint = form()
    assert language == "es"
    assert hint.startswith("Español is the patient's language in the hospital's records.")
    provider = "1999999999^Foreman^Eric^^^^^^NPI^^^^NPI"
    acks = send(ris.port, orm(accession, "XO", "CM", provider, language="ger^German^ISO639-2"),
                orm(accession, "XO", "CM", provider, language="und"),
                orm(accession, "XO", "CM", provider, language="zz^Unknown^L"))
    assert [msa(a)[0] for a in acks] == ["AA", "AA", "AA"]
    assert form()[0] == "de"
    with app.extensions["db"].new_session() as session:
        assert session.scalars(select(Order.patient_language).where(
            Order.accession_number == accession)).one() == "de"
        assert session.scalars(select(Report.patient_language)).one() == "es"
    # The order moves to another patient (no PID-15): his order's German is not this
    # patient's; the report's Spanish is what is known again.
    (moved,) = send(ris.port, orm(accession, "XO", "CM", provider, patient="P-OTHER"))
    assert msa(moved)[0] == "AA"
    with app.extensions["db"].new_session() as session:
        assert session.scalars(select(Order.patient_language).where(
            Order.accession_number == accession)).one() == ""
    assert form()[0] == "es"
    (back,) = send(ris.port, orm(accession, "XO", "CM", provider, language="de"))
    assert msa(back)[0] == "AA" and form()[0] == "de"
    made = doctor.post("/api/shares", json={"study_uid": study},  # no language named
                       headers={"X-CSRF-Token": csrf_of(doctor)})
    assert made.status_code == 201, made.get_data(as_text=True)
    with app.extensions["db"].new_session() as session:
        assert session.scalars(select(ShareLink.language)).one() == "de"
    # The patient's own choice in the portal comes first.
    with app.extensions["db"].write_transaction() as session:
        patient = session.scalars(select(User).where(User.subject == subjects["patient"])).one()
        patient.language = "fr"
        link_patient(session, ADMIN, patient.id, "P-R")
    language, hint = form()
    assert language == "fr" and hint.startswith("The patient chose Français in the portal.")


def siu(accession: str, trigger: str, start: str) -> str:
    return CR.join([
        f"MSH|^~\\&|RIS|HOSP|PORTAL|HOSP|20260301090000||SIU^{trigger}|{generate_uid()[-10:]}"
        "|P|2.5.1",
        segment("SCH", {1: f"APT{accession}", 2: f"FAPT{accession}", 11: f"^^^{start}",
                        26: f"PL{accession}", 27: f"FI{accession}"}),
        "PID|||P-R^^^HOSP^MR||Roe^Richard", "AIS|1||CTCHEST^CT chest"]) + CR


def test_orders_and_appointments_follow_the_study_and_match_the_ordering_physician(
        ris: Ris, idp: IdentityProvider) -> None:
    from portal.reports.service import effective_status

    app = ris.app
    prefix = generate_uid()[-8:]
    foreman_sub = f"foreman-{prefix}"
    foreman = add_person(app, idp, foreman_sub, ["physician"])
    with app.extensions["db"].write_transaction() as session:
        link_identifier(session, ADMIN, foreman, "npi:1999999999")
    accession = "G" + generate_uid()[-8:]
    provider = "1999999999^Foreman^Eric^^^^^^NPI^^^^NPI"
    acks = send(ris.port, orm(accession, "NW", "", provider),
                siu(accession, "S12", "202603051030"))
    assert [msa(a)[0] for a in acks] == ["AA", "AA"]

    def status() -> tuple[str, object]:
        with app.extensions["db"].new_session() as session:
            order = session.scalars(select(Order).where(
                Order.accession_number == accession)).one()
            return effective_status(session, order), order.scheduled_at

    state, when = status()
    assert state == "scheduled" and when is not None and when.hour == 10
    # The study arrives naming another referrer: the ordering physician still sees it.
    study = store_study(app, accession, referrer="Somebody^Else")
    assert status()[0] == "performed"
    browser = signed_in(app, idp, foreman_sub)
    assert browser.get(f"/studies/{study}").status_code == 200
    orders = browser.get("/orders").get_data(as_text=True)
    assert accession in orders and "performed" in orders and "CT chest" in orders
    send(ris.port, oru(accession, "F", "IMP:Done."))
    assert status()[0] == "reported"
    (cancel,) = send(ris.port, siu(accession, "S15", "202603051030"))
    assert msa(cancel)[0] == "AA"


def test_the_orders_page_asks_the_database_a_fixed_number_of_times(ris: Ris,
                                                                   idp: IdentityProvider) -> None:
    """Many orders (scheduled, performed, reported, cancelled) cost no more queries than a
    few, and each still shows its own status."""
    from sqlalchemy import event

    from portal.reports.service import effective_statuses

    app = ris.app
    sub = f"busy-{generate_uid()[-8:]}"
    doctor = add_person(app, idp, sub, ["physician"])
    with app.extensions["db"].write_transaction() as session:
        key = link_identifier(session, ADMIN, doctor, "npi:1777777777").key
    browser = signed_in(app, idp, sub)

    def add_orders(count: int) -> list[str]:
        accessions = []
        for _ in range(count):
            accession = "Q" + generate_uid()[-9:]
            accessions.append(accession)
            with app.extensions["db"].write_transaction() as session:
                session.add(Order(accession_number=accession, procedure="CT chest",
                                  ordering_provider_key=key, status="ordered"))
        return accessions

    def queries_of_the_page() -> int:
        engine = app.extensions["db"].engine
        seen: list[str] = []

        def count(*args: object) -> None:
            seen.append(str(args[2]))

        event.listen(engine, "before_cursor_execute", count)
        try:
            assert browser.get("/orders").status_code == 200
        finally:
            event.remove(engine, "before_cursor_execute", count)
        return len(seen)

    first = add_orders(4)
    store_study(app, first[1])
    store_study(app, first[2])
    send(ris.port, oru(first[2], "F", "IMP:Done."))
    queries_of_the_page()  # (the first visit also refreshes the session)
    few = queries_of_the_page()
    add_orders(40)
    assert queries_of_the_page() == few
    with app.extensions["db"].new_session() as session:
        orders = {o.accession_number: o for o in session.scalars(
            select(Order).where(Order.accession_number.in_(first)))}
        assert effective_statuses(session, [orders[a] for a in first]) == [
            "ordered", "performed", "reported", "ordered"]


def test_report_ready_mail_goes_to_the_referrer_without_patient_data(
        ris: Ris, idp: IdentityProvider, mailbox: tuple[Mailbox, int]) -> None:
    box, port = mailbox
    app = ris.app
    app.config["PORTAL"]["SMTP_URL"] = f"smtp://127.0.0.1:{port}"
    subjects = people(app, idp)
    accession = "M" + generate_uid()[-8:]
    store_study(app, accession)
    send(ris.port, oru(accession, "P", "IMP:Preliminary read."))
    assert box.messages == []  # preliminary: no notice
    send(ris.port, oru(accession, "F", "IMP:Final read."))
    assert len(box.messages) == 1
    mail = box.messages[0]
    assert mail["To"] == f"{subjects['doctor']}@demo.example"
    assert mail["Subject"] == "A report is ready"
    body = mail.get_payload()
    assert "Roe" not in body and accession not in body and "Final read" not in body
    send(ris.port, oru(accession, "F", "IMP:Final read."))  # a resend: no second notice
    assert len(box.messages) == 1


def test_new_reports_are_badged_and_filtered_until_read(ris: Ris, idp: IdentityProvider) -> None:
    app = ris.app
    subjects = people(app, idp)
    store_study(app, "O" + generate_uid()[-8:], patient="P-OTHER")  # another patient first
    accession = "N" + generate_uid()[-8:]
    study = store_study(app, accession)
    quiet = store_study(app, "Q" + generate_uid()[-8:])
    doctor = signed_in(app, idp, subjects["doctor"])
    assert study not in doctor.get("/studies?report=new").get_data(as_text=True)
    send(ris.port, oru(accession, "F", "IMP:Read me."))
    listing = doctor.get("/studies?report=new").get_data(as_text=True)
    assert study in listing and quiet not in listing and "New report" in listing
    assert "Read me." in doctor.get(f"/studies/{study}").get_data(as_text=True)
    assert study not in doctor.get("/studies?report=new").get_data(as_text=True)
    send(ris.port, oru(accession, "C", "IMP:Read me again."))  # an amendment is new again
    assert study in doctor.get("/studies?report=new").get_data(as_text=True)


def test_daily_digest_counts_unread_reports_per_physician(
        ris: Ris, idp: IdentityProvider, mailbox: tuple[Mailbox, int]) -> None:
    box, port = mailbox
    app = ris.app
    subjects = people(app, idp)
    first, second = "DA" + generate_uid()[-6:], "DB" + generate_uid()[-6:]
    study = store_study(app, first)
    store_study(app, second)
    send(ris.port, oru(first, "F", "IMP:One."), oru(second, "F", "IMP:Two."))
    runner = app.test_cli_runner()
    assert runner.invoke(args=["reports", "digest"]).exit_code == 1  # no SMTP configured
    app.config["PORTAL"]["SMTP_URL"] = f"smtp://127.0.0.1:{port}"
    result = runner.invoke(args=["reports", "digest"])
    assert result.exit_code == 0 and "sent 1 digest" in result.output, result.output
    mail = box.messages[-1]
    assert mail["To"] == f"{subjects['doctor']}@demo.example"
    assert "2 studies have a new report" in mail.get_payload()
    assert first not in mail.get_payload() and "Roe" not in mail.get_payload()
    signed_in(app, idp, subjects["doctor"]).get(f"/studies/{study}")  # reads one
    runner.invoke(args=["reports", "digest"])
    assert "1 study has a new report" in box.messages[-1].get_payload()


def test_received_reports_orders_and_reads_are_audited(ris: Ris, idp: IdentityProvider) -> None:
    from portal.access.models import AuditEvent

    app = ris.app
    subjects = people(app, idp)
    accession = "AU" + generate_uid()[-7:]
    study = store_study(app, accession)
    send(ris.port, oru(accession, "F", "IMP:Audited."), orm(accession, "NW", "", "^Wilson^James"))
    doctor = signed_in(app, idp, subjects["doctor"])
    assert doctor.get("/orders").status_code == 200
    bundle = doctor.get("/fhir/DiagnosticReport").get_json()
    report_id = bundle["entry"][0]["resource"]["id"]
    assert doctor.get(f"/fhir/DiagnosticReport/{report_id}").status_code == 200
    with app.extensions["db"].new_session() as session:
        rows = list(session.scalars(select(AuditEvent).order_by(AuditEvent.id)))
    received = [r for r in rows if r.who == "hl7:RIS" and r.event_id == "110104"]
    assert [sorted(r.details) for r in received] == [["message", "report", "via"],
                                                     ["message", "order", "via"]]
    assert received[0].patient_id == "P-R" and received[1].patient_id == "P-R"
    doctor_rows = [r for r in rows if r.who.endswith(subjects["doctor"])]
    queries = [r.details for r in doctor_rows if r.event_id == "110112"]
    assert {"orders": 1} in queries
    assert {"resource": "DiagnosticReport", "results": 1} in queries
    reads = [r for r in doctor_rows if r.event_id == "110103"
             and r.details.get("via") == "fhir"]
    assert reads and reads[0].study_instance_uid == study


def test_an_empty_allow_list_refuses_every_message(ris: Ris) -> None:
    """``handle`` with nobody listed (the default) refuses even a well-formed report from the
    address the RIS normally uses, and stores nothing."""
    accession = "Z" + generate_uid()[-8:]
    answer = inbound.handle(oru(accession, "F", "IMP:Unlisted.").encode(),
                            ris.app.extensions["db"], peer_address="127.0.0.1", allowed=set(),
                            max_bytes=1 << 20)
    assert msa(answer.decode()) == ("AR", "sender not allowed")
    with ris.app.extensions["db"].new_session() as session:
        assert session.scalars(select(Report).where(
            Report.accession_number == accession)).first() is None


def test_the_demo_lists_its_own_ris_and_its_reports_get_in(ris: Ris, tmp_path: Path) -> None:
    """`flask --app app demo` writes HL7_ALLOWED_SENDERS for its RIS into config.toml (also
    into a config.toml an earlier demo wrote), and its seeded reports pass the closed
    listener's check."""
    from demo.people import demo_config
    from demo.reports import DEMO_SENDER, seed_reports
    from portal.config import load_config

    fresh, older = tmp_path / "fresh", tmp_path / "older"
    fresh.mkdir()
    older.mkdir()
    (older / "config.toml").write_text(
        "# Written by `flask --app app demo`: sign-in through the local demo provider.\n"
        "[oidc]\nroles_claim = \"portal_roles\"\n")
    assert demo_config(fresh) and not demo_config(older)
    for instance in (fresh, older):
        settings = load_config({"INSTANCE_PATH": str(instance)}, environ={})
        assert settings["HL7_ALLOWED_SENDERS"] == [DEMO_SENDER] == ["DEMO-RIS@127.0.0.1"]
    study = store_study(ris.app, "DEMO25DX0042", patient="DEMO-P")
    assert seed_reports(ris.app.extensions["db"]) == 1
    with ris.app.extensions["db"].new_session() as session:
        report = session.scalars(select(Report).where(
            Report.accession_number == "DEMO25DX0042")).one()
    assert report.impression == "No acute disease." and report.study_instance_uid in ("", study)


def test_hl7_tls_settings_must_come_in_pairs(tmp_path: Path) -> None:
    from portal.config import ConfigError, load_config

    cert = tmp_path / "listener.crt"
    cert.write_text("not read at load time")
    for environ, named in (({"PORTAL_HL7_TLS_CERT": str(cert)}, "HL7_TLS_CERT"),
                           ({"PORTAL_HL7_TLS_CERT": str(cert),
                             "PORTAL_HL7_TLS_KEY": str(tmp_path / "missing.key")},
                            "HL7_TLS_KEY")):
        with pytest.raises(ConfigError) as info:
            load_config({"INSTANCE_PATH": str(tmp_path)}, environ=environ)
        assert str(info.value).startswith(named)
