"""What an HL7 v2 message means to the portal: ORU^R01 reports, ORM^O01 / OMI^O23 orders,
SIU^S12-S15 appointments. ``handle`` returns the ACK to send; it never raises.

Fields read (HL7 v2.5.1 with IHE Radiology conventions): PID-3 patient identifiers (CX, every
repetition: ID, assigning authority in component 4, type in 5), PID-5 name, PID-15 primary
language (CWE, the code in component 1: "es", "SPA" of table 0296 or ISO 639-2 "ger", read
by Babel; kept as ISO 639-1, ignored when it names no language);
ORC-1 order control, ORC-5 order status, ORC-2/3 and OBR-2/3 placer and filler order
numbers; OBR-4 procedure, OBR-7 observation date/time (the report's clinical time), OBR-16
ordering provider (XCN: id, family, given, ..., id type in component 13), OBR-18 or IPC-1
accession number, OBR-24 modality, OBR-25 result status,
OBR-32 principal result interpreter; ZDS-1 or IPC-3 Study Instance UID; OBX-2 value type
(TX, FT, ST, ED for a PDF), OBX-3 what the text is (impression or findings), OBX-5 value,
OBX-11 status; SCH-11/TQ1-7/AIS-4 appointment start, SCH-26/27 order numbers.

Report identity: an ORU must name its patient in PID-3 (a name alone is not an identifier),
and one of its identifiers (with the same assigning authority, when both sides give one) and
PID-5 (folded words) must be those of the study it names, else AE and a security alert. A
message already stored (same MSH-3, MSH-10 and content) is acknowledged again but not
applied twice, and a version made (OBR-22, else MSH-7) before the stored one never replaces it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
from collections.abc import Callable
from datetime import UTC, tzinfo

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from portal import audit
from portal.access.models import ReferrerIdentifier, User
from portal.config import name_at_address
from portal.db import Database
from portal.i18n import spoken_language
from portal.index.models import Order, Patient, Study
from portal.index.referrers import identifier_key, name_key
from portal.reports import hl7
from portal.reports.models import ReceivedMessage
from portal.reports.service import (
    IdentityMismatch,
    IncomingOrder,
    IncomingReport,
    ReportError,
    order_column_length,
    receive_order,
    record_identity_alert,
    store_report,
)

log = logging.getLogger(__name__)

# OBR-25 / OBX-11 result status (HL7 table 0123 / 0085) -> ours.
RESULT_STATUS = {"F": "final", "C": "amended", "A": "preliminary", "P": "preliminary",
                 "R": "preliminary", "S": "preliminary", "I": "preliminary",
                 "X": "cancelled", "D": "cancelled", "W": "cancelled"}
# ORC-5 order status (table 0038) -> ours.
ORDER_STATUS = {"SC": "scheduled", "IP": "performed", "CM": "performed", "CA": "cancelled",
                "DC": "cancelled", "A": "performed", "HD": "ordered"}
IMPRESSION_CODES = {"IMP", "&IMP", "19005-8", "IMPRESSION"}


def _accession(message: hl7.Message, obr: list[str] | None) -> str:
    ipc = message.first("IPC")
    return (message.text(obr, 18) or message.text(ipc, 1) or "")[:64]


def _study_uid(message: hl7.Message) -> str:
    zds, ipc = message.first("ZDS"), message.first("IPC")
    return (message.text(zds, 1) or message.text(ipc, 3))[:64]


def _person(parts: list[str]) -> str:
    """An XCN as a DICOM-style name, FAMILY^GIVEN."""
    family, given = ([*parts, "", "", ""])[1:3]
    return "^".join(p for p in (family, given) if p)


def _provider_key(parts: list[str]) -> str:
    """The referrer-matching key of an XCN: NPI or id with its assigning authority, else name."""
    identifier = parts[0] if parts else ""
    id_type = parts[12] if len(parts) > 12 else ""
    authority = parts[8] if len(parts) > 8 else ""
    if identifier:
        scheme = "NPI" if id_type.upper() == "NPI" or authority.upper() in ("NPI", "US-NPI") \
            else (authority.split("&")[0] or id_type)
        key = identifier_key(scheme, identifier)
        if key:
            return key
    return name_key(_person(parts)) or ""


# PID-3.5 identifier types (HL7 table 0203) that name the patient's record at the sender.
RECORD_NUMBER_TYPES = ("MR", "PI", "PT", "")


def patient_identifiers(message: hl7.Message, pid: list[str] | None) -> list[tuple[str, str]]:
    """Every PID-3 repetition as (ID, assigning authority), record numbers first."""
    found: list[tuple[int, str, str]] = []
    value = message.raw(pid, 3)
    for number in range(len(value.split(message.delimiters.repetition)) if value else 0):
        parts = [*message.components(pid, 3, number), "", "", "", "", ""]
        identifier = parts[0].split(message.delimiters.subcomponent)[0].strip()
        authority = parts[3].split(message.delimiters.subcomponent)[0].strip()
        kind = parts[4].strip().upper()
        if identifier:
            rank = RECORD_NUMBER_TYPES.index(kind) if kind in RECORD_NUMBER_TYPES else 9
            found.append((rank, identifier[:64], authority[:64]))
    return [(identifier, authority) for _, identifier, authority in sorted(
        found, key=lambda item: item[0])]


def report_from_oru(message: hl7.Message) -> list[IncomingReport]:
    """One report per OBR of an ORU^R01, with the text of its OBX segments."""
    pid = message.first("PID")
    identifiers = patient_identifiers(message, pid)
    if not identifiers:
        raise ReportError("PID-3 names no patient identifier: a report is accepted only for "
                          "an identified patient (a name alone is not enough)")
    patient_id = identifiers[0][0]
    patient_name = "^".join(message.components(pid, 5)[:3]).strip("^")
    language = spoken_language(message.text(pid, 15))
    sent_at = hl7.parse_timestamp(message.text(message.msh, 7), message.zone)
    reports: list[IncomingReport] = []
    current: IncomingReport | None = None
    sections: dict[str, list[str]] = {}

    def close() -> None:
        if current is not None:
            current.impression = "\n".join(sections.get("impression", []))
            current.findings = "\n".join(sections.get("findings", []))
            reports.append(current)

    for segment in message.segments:
        if segment[0] == "OBR":
            close()
            sections = {}
            status = RESULT_STATUS.get(message.text(segment, 25).upper(), "")
            filler = message.text(segment, 3) or message.text(message.first("ORC"), 3)
            accession = _accession(message, segment)
            current = IncomingReport(
                source="hl7", source_id=(filler or accession)[:128], status=status,
                study_instance_uid=_study_uid(message), accession_number=accession,
                patient_id=patient_id, title=message.text(segment, 4, 2)
                or message.text(segment, 4, 1),
                author=_person(message.components(segment, 32)[0].split(
                    message.delimiters.subcomponent)) if message.raw(segment, 32) else "",
                signed_at=hl7.parse_timestamp(message.text(segment, 22), message.zone),
                patient_ids=identifiers, patient_name=patient_name,
                patient_language=language,
                observed_at=hl7.parse_timestamp(message.text(segment, 22), message.zone)
                or sent_at,
                clinical_at=hl7.parse_timestamp(message.text(segment, 7), message.zone),
                keeps_clinical_at=message.raw(segment, 7) != '""',
                message_id=message.control_id)
        elif segment[0] == "OBX" and current is not None:
            kind = message.text(segment, 2).upper()
            what = {c.upper() for c in message.components(segment, 3)[:1]}
            if kind == "ED":
                current.pdf = _pdf(message, segment)
                continue
            lines = message.repetitions(segment, 5)
            section = "impression" if what & IMPRESSION_CODES else "findings"
            sections.setdefault(section, []).extend(lines)
            if not current.status:
                current.status = RESULT_STATUS.get(message.text(segment, 11).upper(), "")
    close()
    for report in reports:
        if not report.status:
            raise ReportError("the result status (OBR-25 or OBX-11) is missing or unknown")
    return reports


def _pdf(message: hl7.Message, obx: list[str]) -> bytes:
    """An ED value ^application^pdf^Base64^data as PDF bytes."""
    parts = message.components(obx, 5)
    if len(parts) < 5 or parts[3].upper() != "BASE64" or parts[2].upper() not in ("PDF",):
        raise ReportError("OBX-5 of type ED must be ^application^pdf^Base64^<data>")
    try:
        return base64.b64decode(parts[4], validate=False)
    except (binascii.Error, ValueError):
        raise ReportError("the Base64 data in OBX-5 cannot be decoded") from None


def order_from_message(message: hl7.Message) -> IncomingOrder:
    """An order update from ORM^O01 / OMI^O23, or an appointment from SIU^S12-S15."""
    kind, trigger = message.message_type
    pid, orc, obr = message.first("PID"), message.first("ORC"), message.first("OBR")
    order = IncomingOrder(
        patient_id=message.text(pid, 3)[:64], patient_name=_person(
            ["", *message.components(pid, 5)]),
        accession_number=_accession(message, obr), study_instance_uid=_study_uid(message),
        patient_language=spoken_language(message.text(pid, 15)))
    if kind == "SIU":
        sch = message.first("SCH")
        ais = message.first("AIS")
        order.placer_order_number = message.text(sch, 26) or message.text(sch, 1)
        order.filler_order_number = message.text(sch, 27) or message.text(sch, 2)
        order.procedure = message.text(ais, 3, 2) or message.text(ais, 3, 1)
        start = (message.text(sch, 11, 4) or message.text(message.first("TQ1"), 7)
                 or message.text(ais, 4))
        when = hl7.parse_timestamp(start, message.zone)
        if trigger == "S15":
            order.status, order.clear_schedule = "ordered", True
        else:
            if when is None:
                raise ReportError("the appointment has no start time (SCH-11.4, TQ1-7 or "
                                  "AIS-4)")
            order.status, order.scheduled_at = "scheduled", when
        order.location = message.text(message.first("AIL"), 3)
        return order
    control = message.text(orc, 1).upper()
    order.placer_order_number = message.text(orc, 2) or message.text(obr, 2)
    order.filler_order_number = message.text(orc, 3) or message.text(obr, 3)
    order.procedure = message.text(obr, 4, 2) or message.text(obr, 4, 1)
    order.modality = message.text(obr, 24)[:16]
    provider = (message.components(obr, 16) if message.raw(obr, 16)
                else message.components(orc, 12))
    if any(provider):
        order.ordering_provider = _person(provider)
        order.ordering_provider_key = _provider_key(provider)
    when = hl7.parse_timestamp(message.text(message.first("TQ1"), 7)
                               or message.text(obr, 27, 4) or message.text(obr, 36),
                               message.zone)
    if control in ("CA", "OC", "DC"):
        order.status = "cancelled"
    else:
        order.status = ORDER_STATUS.get(message.text(orc, 5).upper()) or (
            "scheduled" if when else "ordered" if control == "NW" else None)
    order.scheduled_at = when
    return order


Notify = Callable[[int], None]


def _audit_received(session: Session, message: hl7.Message, peer_address: str,
                    study_uid: str, patient_id: str, what: dict[str, int]) -> None:
    """One 110104 (create) record per stored report or order, in the same transaction."""
    kind, trigger = message.message_type
    audit.append(session, audit.INSTANCES_TRANSFERRED, action="C",
                 outcome=audit.OUTCOME_SUCCESS,
                 who=f"hl7:{message.sending_application[:64]}", source_address=peer_address,
                 study_instance_uid=study_uid, patient_id=patient_id,
                 details={**what, "via": f"hl7 {kind}^{trigger}",
                          "message": message.control_id})


def _limited(column: str, value: str) -> str:
    """``value`` cut to the length of an Order column, as ``receive_order`` stores it."""
    return value[:order_column_length(column)]


def _order_audience(session: Session, incoming: IncomingOrder) -> tuple[list[User], list[int]]:
    """Who may come to see which studies through this order message: the people linked to
    its ordering provider or to that of any order it may update, and the studies matching
    any of their accession numbers and patients (a superset, checked before and after)."""
    numbers = [(getattr(Order, name), _limited(name, getattr(incoming, name)))
               for name in ("filler_order_number", "placer_order_number", "accession_number")]
    matching = [column == value for column, value in numbers if value]
    updated = list(session.scalars(select(Order).where(or_(*matching)))) if matching else []
    keys = {o.ordering_provider_key for o in updated}
    keys.add(_limited("ordering_provider_key", incoming.ordering_provider_key))
    accessions = {o.accession_number for o in updated}
    accessions.add(_limited("accession_number", incoming.accession_number))
    patients = {o.patient_id for o in updated} | {_limited("patient_id", incoming.patient_id)}
    keys.discard("")
    accessions.discard("")
    if not keys or not accessions:
        return [], []
    users = list(session.scalars(
        select(User).join(ReferrerIdentifier, ReferrerIdentifier.user_fk == User.id)
        .where(ReferrerIdentifier.key.in_(sorted(keys)), User.active.is_(True))
        .order_by(User.id)).unique())
    studies = list(session.scalars(
        select(Study.id).join(Patient, Patient.id == Study.patient_fk)
        .where(Study.accession_number.in_(sorted(accessions)),
               Patient.patient_id.in_(sorted(patients))))) if users else []
    return users, studies


def _visible(session: Session, users: list[User], studies: list[int]) -> set[tuple[int, int]]:
    """(user id, study id) pairs among these that the access policy lets the user see now."""
    from portal.access.policy import study_filter  # the policy imports this package's models
    from portal.access.principal import user_principal

    if not studies:
        return set()
    seen: set[tuple[int, int]] = set()
    for user in users:
        principal = user_principal(user, "session")
        seen.update((user.id, study_id) for study_id in session.scalars(
            select(Study.id).where(Study.id.in_(studies), study_filter(principal))))
    return seen


def _audit_order_grants(session: Session, message: hl7.Message, peer_address: str,
                        order: Order, users: list[User], gained: set[tuple[int, int]]) -> None:
    """An order that lets a physician see a study he could not see before is a grant, made by
    the sending system: audited as the console audits grants (110113 with 110135)."""
    kind, trigger = message.message_type
    people = {user.id: user for user in users}
    for user_id, study_id in sorted(gained):
        study = session.get(Study, study_id)
        if study is None:
            continue
        user = people[user_id]
        audit.append(session, audit.SECURITY_ALERT, action="U", outcome=audit.OUTCOME_SUCCESS,
                     who=f"hl7:{message.sending_application[:64]}",
                     source_address=peer_address, study_instance_uid=study.study_instance_uid,
                     patient_id=study.patient.patient_id,
                     details={"type": audit.OBJECT_SECURITY_CHANGED,
                              "to": f"{user.issuer}|{user.subject}", "order": order.id,
                              "reason": "named as ordering provider of the study's order",
                              "via": f"hl7 {kind}^{trigger}", "message": message.control_id})


def _receive_order(session: Session, message: hl7.Message, peer_address: str) -> Order:
    """Store an order or appointment; audit it, and audit as a grant any study it opens."""
    incoming = order_from_message(message)
    users, studies = _order_audience(session, incoming)
    before = _visible(session, users, studies)
    order = receive_order(session, incoming)
    _audit_received(session, message, peer_address, order.study_instance_uid,
                    order.patient_id, {"order": order.id})
    gained = _visible(session, users, studies) - before
    if gained:
        _audit_order_grants(session, message, peer_address, order, users, gained)
    return order


NOT_ALLOWED = "sender not allowed"
# The messages the portal accepts (any other is AR, HL7 table 0357 code 200), and what each
# becomes; docs/conformance/hl7.md lists the same (tests/reports/test_hl7_conformance.py).
SUPPORTED = {("ORU", "R01"): "report", ("ORM", "O01"): "order", ("OMI", "O23"): "order",
             ("SIU", "S12"): "appointment booked", ("SIU", "S13"): "appointment rescheduled",
             ("SIU", "S14"): "appointment modified", ("SIU", "S15"): "appointment cancelled"}


def _refuse_sender(database: Database, message: hl7.Message | None, raw: bytes,
                   peer_address: str) -> bytes:
    """AR for a sender HL7_ALLOWED_SENDERS does not list, recorded as a security alert."""
    header = _header_fields(raw)
    sender = message.sending_application if message is not None else (
        header[2].split(header[1][:1] or "^")[0] if len(header) > 2 else "")
    control_id = message.control_id if message is not None else _control_id_of(raw)
    log.warning("HL7 message from %r at %s refused: not an allowed sender", sender[:32],
                peer_address)
    try:
        audit.record(database, audit.SECURITY_ALERT, action="E",
                     outcome=audit.OUTCOME_MINOR_FAILURE, who=f"hl7:{sender[:64]}",
                     source_address=peer_address,
                     details={"type": "hl7 sender refused", "reason": NOT_ALLOWED,
                              "message": control_id})
    except Exception:  # the message is refused either way; the missing record is logged
        log.exception("could not record a refused HL7 sender")
    return hl7.acknowledgement(message, "AR", NOT_ALLOWED, control_id, "207", raw)


def _digest(message: hl7.Message) -> str:
    """SHA-256 of the message's segments with MSH-7 (the send time) left out."""
    header = list(message.msh)
    if len(header) > 7:
        header[7] = ""
    segments = [header, *message.segments[1:]]
    text = "\r".join(message.delimiters.field.join(s) for s in segments)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _already_received(session: Session, message: hl7.Message, digest: str) -> bool:
    """This message (sender, MSH-10 and content) was stored before: a retransmission."""
    return session.scalars(select(ReceivedMessage.id).where(
        ReceivedMessage.sender == message.sending_application.upper()[:64],
        ReceivedMessage.control_id == message.control_id,
        ReceivedMessage.digest == digest)).first() is not None


def handle(raw: bytes, database: Database, *, peer_address: str, allowed: set[tuple[str, str]],
           max_bytes: int, oversized: bool = False, notify: Notify | None = None,
           zone: tzinfo = UTC) -> bytes:
    """Process one framed message and return its acknowledgement (AA, AE or AR). ``zone``:
    where its times without an offset are (the practice's, PORTAL_TIMEZONE).

    Closed by default: with no allowed senders every message is refused, and a peer whose
    address no entry names is refused before its message is even parsed.
    """
    if not any(address == peer_address for _, address in allowed):
        return _refuse_sender(database, None, raw, peer_address)
    if oversized or len(raw) > max_bytes:
        return hl7.acknowledgement(None, "AR", f"the message is larger than {max_bytes} bytes",
                                   _control_id_of(raw), "100", raw)
    try:
        message = hl7.parse(raw, zone)
    except hl7.MessageRejected as exc:
        return hl7.acknowledgement(None, "AR", exc.reason, exc.control_id, "102", raw)
    if (message.sending_application.upper(), peer_address) not in allowed:
        return _refuse_sender(database, message, raw, peer_address)
    kind, trigger = message.message_type
    digest = _digest(message)
    note = ""
    try:
        with database.write_transaction() as session:
            if (kind, trigger) not in SUPPORTED:
                return hl7.acknowledgement(
                    message, "AR", f"message type {kind}^{trigger} is not supported",
                    error_code="200")
            if message.control_id and _already_received(session, message, digest):
                # A retransmission (the sender missed our ACK): acknowledge it again, but a
                # replayed older report must not come back over a later correction.
                log.info("HL7 message %s received again; not applied twice",
                         message.control_id)
                return hl7.acknowledgement(message, "AA", "already received")
            if (kind, trigger) == ("ORU", "R01"):
                reports = report_from_oru(message)
                if not reports:
                    raise ReportError("the ORU^R01 has no OBR segment")
                ready, notes = [], []
                for incoming in reports:
                    received = store_report(session, incoming)
                    report = received.report
                    if not received.stored:
                        notes.append(received.note)
                        continue
                    _audit_received(session, message, peer_address, report.study_instance_uid,
                                    report.patient_id, {"report": report.id})
                    if received.newly_final:
                        ready.append(report.id)
                if len(notes) == len(reports):  # nothing changed: say why
                    note = "; ".join(dict.fromkeys(notes))
            else:
                _receive_order(session, message, peer_address)
                ready = []
            if message.control_id:
                session.add(ReceivedMessage(sender=message.sending_application.upper()[:64],
                                            control_id=message.control_id, digest=digest))
    except IdentityMismatch as exc:
        log.warning("HL7 message %s refused: %s", message.control_id, exc)
        try:
            record_identity_alert(database, exc, who=f"hl7:{message.sending_application[:64]}",
                                  source_address=peer_address, via=f"hl7 {kind}^{trigger}",
                                  message=message.control_id)
        except Exception:  # refused either way; the missing record is logged
            log.exception("could not record a report refused for another patient")
        return hl7.acknowledgement(message, "AE", str(exc), error_code="207")
    except ReportError as exc:
        return hl7.acknowledgement(message, "AE", str(exc), error_code="207")
    except Exception:
        log.exception("HL7 message %s could not be stored", message.control_id)
        return hl7.acknowledgement(message, "AE", "the message could not be stored; resend it",
                                   error_code="207")
    for report_id in ready:
        if notify is not None:
            try:
                notify(report_id)
            except Exception:  # the report is stored; a failed notice is logged, not lost data
                log.exception("report-ready notification failed")
    return hl7.acknowledgement(message, "AA", note)


def _header_fields(raw: bytes) -> list[str]:
    """The MSH fields of an unparsed message, read leniently (["MSH", MSH-2, MSH-3, ...])."""
    head = raw[:4096].lstrip().split(b"\r", 1)[0].decode("ascii", errors="replace")
    if not head.startswith("MSH") or len(head) < 4:
        return []
    return head.split(head[3])


def _control_id_of(raw: bytes) -> str:
    fields = _header_fields(raw)
    return fields[9][:64] if len(fields) > 9 else ""


def parse_senders(senders: list[str]) -> set[tuple[str, str]]:
    """``APPLICATION@address`` entries (MSH-3, compared without case, and the peer's IP)."""
    return {(name.upper(), address) for name, address in name_at_address(senders)}

