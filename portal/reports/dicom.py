"""Reports that arrive as DICOM objects in the archive: Structured Reports (Basic, Enhanced and
Comprehensive Text SR, PS3.3 A.35) and Encapsulated PDF (PS3.3 A.45.1).

An SR's content tree is walked from the document root: each CONTAINER whose concept name says
"Impression" or "Conclusion" feeds the impression, the others the findings (with their names
as headings); TEXT, CODE, NUM, PNAME, DATE and the like give their values as text. Markup in
a TEXT value stays text: the page escapes it like everything else.

Such objects become reports as they arrive (``after_ingest``, a step every way into the
archive runs), with the report-ready notice; opening a study still turns any that were
stored before that step existed.
"""

from __future__ import annotations

import io
import logging
from datetime import UTC, datetime
from typing import TYPE_CHECKING, TypedDict

import pydicom
from flask import current_app
from pydicom.dataset import Dataset
from sqlalchemy.exc import IntegrityError

from portal.archive.store import ArchiveUnavailable
from portal.dicom_classes import ENCAPSULATED_PDF, REPORT_CLASSES, SR_CLASSES
from portal.reports.notify import notifier, waiting_notices
from portal.reports.service import IncomingReport, ReportError, receive_report

if TYPE_CHECKING:
    from portal.archive.after import Arrival

log = logging.getLogger(__name__)

MAX_ITEMS = 10_000  # content items walked in one SR


def _meaning(item: Dataset) -> str:
    names = item.get("ConceptNameCodeSequence") or []
    return str(names[0].get("CodeMeaning", "")).strip() if names else ""


def _value(item: Dataset) -> str:
    kind = str(item.get("ValueType", "")).upper()
    if kind == "TEXT":
        return str(item.get("TextValue", ""))
    if kind == "CODE":
        codes = item.get("ConceptCodeSequence") or []
        return str(codes[0].get("CodeMeaning", "")) if codes else ""
    if kind == "NUM":
        measured = item.get("MeasuredValueSequence") or []
        if not measured:
            return ""
        units = measured[0].get("MeasurementUnitsCodeSequence") or []
        unit = str(units[0].get("CodeValue", "")) if units else ""
        return f"{measured[0].get('NumericValue', '')} {unit}".strip()
    if kind == "PNAME":
        return str(item.get("PersonName", "")).replace("^", " ").strip()
    if kind in ("DATE", "TIME", "DATETIME", "UIDREF"):
        key = {"DATE": "Date", "TIME": "Time", "DATETIME": "DateTime", "UIDREF": "UID"}[kind]
        return str(item.get(key, ""))
    return ""


def _walk(items: list[Dataset], section: str, out: dict[str, list[str]],
          budget: list[int]) -> None:
    for item in items:
        budget[0] -= 1
        if budget[0] < 0:
            return
        kind = str(item.get("ValueType", "")).upper()
        name = _meaning(item)
        if kind == "CONTAINER":
            lowered = name.lower()
            child = ("impression" if "impression" in lowered or "conclusion" in lowered
                     else "findings")
            if child == "findings" and name and name.lower() not in ("findings", "finding"):
                out.setdefault("findings", []).append(f"{name}:")
            _walk(list(item.get("ContentSequence") or []), child, out, budget)
            continue
        value = _value(item).strip()
        if value:
            label = f"{name}: " if name and kind != "TEXT" else ""
            out.setdefault(section, []).append(label + value)
        if item.get("ContentSequence"):
            _walk(list(item.ContentSequence), section, out, budget)


def _verified(ds: Dataset) -> tuple[str, str, datetime | None]:
    """Status, verifying observer and time (PS3.3 C.17.2)."""
    final = str(ds.get("VerificationFlag", "")).upper() == "VERIFIED" and str(
        ds.get("CompletionFlag", "COMPLETE")).upper() == "COMPLETE"
    observers = ds.get("VerifyingObserverSequence") or []
    author = str(observers[0].get("VerifyingObserverName", "")) if observers else ""
    when = None
    stamp = str(observers[0].get("VerificationDateTime", "")) if observers else ""
    if len(stamp) >= 8:
        try:
            when = datetime.strptime(stamp[:14].ljust(14, "0"), "%Y%m%d%H%M%S").replace(
                tzinfo=UTC)
        except ValueError:
            when = None
    return ("final" if final else "preliminary"), author, when


class _ReportKeys(TypedDict):
    """What identifies a report and its study, the same for an SR and a PDF."""

    source_id: str
    study_instance_uid: str
    accession_number: str
    patient_id: str


def report_from_dataset(ds: Dataset) -> IncomingReport:
    """An IncomingReport from an SR or an Encapsulated PDF; ReportError otherwise."""
    sop_class = str(ds.get("SOPClassUID", ""))
    common: _ReportKeys = {"source_id": str(ds.get("SOPInstanceUID", "")),
                           "study_instance_uid": str(ds.get("StudyInstanceUID", "")),
                           "accession_number": str(ds.get("AccessionNumber", "")),
                           "patient_id": str(ds.get("PatientID", ""))}
    if sop_class == ENCAPSULATED_PDF:
        if str(ds.get("MIMETypeOfEncapsulatedDocument", "")).lower() != "application/pdf":
            raise ReportError("the encapsulated document is not a PDF")
        data = bytes(ds.get("EncapsulatedDocument", b""))
        length = int(ds.get("EncapsulatedDocumentLength") or 0)
        data = data[:length] if 0 < length <= len(data) else data.rstrip(b"\0")
        status = "preliminary" if str(ds.get("VerificationFlag", "")).upper() == \
            "UNVERIFIED" else "final"
        return IncomingReport(source="pdf", status=status, pdf=data,
                              title=str(ds.get("DocumentTitle", "")) or "Report (PDF)",
                              **common)
    if sop_class not in SR_CLASSES:
        raise ReportError("not a text structured report or an encapsulated PDF")
    sections: dict[str, list[str]] = {}
    _walk(list(ds.get("ContentSequence") or []), "findings", sections, [MAX_ITEMS])
    status, author, when = _verified(ds)
    return IncomingReport(source="sr", status=status, title=_meaning(ds) or "Structured report",
                          findings="\n".join(sections.get("findings", [])),
                          impression="\n".join(sections.get("impression", [])),
                          author=author, signed_at=when, **common)


def after_ingest(arrival: Arrival) -> None:
    """The after-ingest step (``portal.archive.after``): the SR and PDF objects that just
    arrived become reports at once, and the referrers of each that became final get the
    report-ready notice (so the unread badge and the e-mail do not wait for anyone to open
    the study), as do those of final reports that came before their study. One object that
    cannot be read or understood is logged and skipped."""
    uids = [s.sop_instance_uid for s in arrival.instances if s.sop_class_uid in REPORT_CLASSES]
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    archive = app.extensions["archive"]
    ready: list[int] = []
    for uid in uids:
        try:
            # Read before the write transaction: a synced object is fetched from the
            # external archive first, which writes on its own.
            incoming = report_from_dataset(pydicom.dcmread(io.BytesIO(archive.read(uid))))
            with archive.database.write_transaction() as session:
                report, newly_final = receive_report(session, incoming)
                if newly_final:
                    ready.append(report.id)
        except IntegrityError:
            continue  # the same object, arriving twice at once, became the report
        except (ReportError, ArchiveUnavailable, KeyError, OSError, ValueError,
                AttributeError) as exc:
            log.warning("report object %s not read: %s", uid, str(exc)[:200])
    settings = app.config["PORTAL"]
    if settings["SMTP_URL"] or settings["SMS_WEBHOOK_URL"]:
        # Reports that came before their study (HL7, FHIR) are announced now it is here.
        with archive.database.new_session() as session:
            ready += [i for i in waiting_notices(session, list(arrival.per_study()))
                      if i not in ready]
    notify = notifier(app)
    for report_id in ready:
        try:
            notify(report_id)
        except Exception:  # the report is stored; a failed notice is logged, not lost data
            log.exception("report-ready notification failed")
