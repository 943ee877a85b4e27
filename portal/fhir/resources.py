"""FHIR R4 mapping: DiagnosticReport in and out; ImagingStudy, Patient, ServiceRequest and
Appointment out. Every resource made here is valid R4 (tests/fhir/test_fhir_conformance.py
parses each with the ``fhir.resources`` models).

In: ``status``; ``identifier`` (the report's id at the sender; an identifier whose type is
ACSN is the accession number); ``imagingStudy`` references (``ImagingStudy/<Study UID>`` or
a contained/identified study with ``urn:oid:`` + UID); ``subject`` with a Patient identifier
(required: its ``value``, its ``assigner.display`` as the issuer, and ``subject.display`` as
the name are checked against the study's patient; a contained Patient it references gives
the patient's language); ``conclusion`` (impression);
``presentedForm`` attachments (text/plain, text/html as text, application/pdf);
``resultsInterpreter`` display (author); ``issued`` (signing time; a version issued before
the stored one is not applied); ``effectiveDateTime`` or ``effectivePeriod.start`` (the time
of the examination, answered as ``effectiveDateTime``).

Out: a cancelled report stays visible with its status: ``entered-in-error`` once it had been
released as final (withdrawn), else ``cancelled``.
"""

from __future__ import annotations

import base64
import binascii
import html
import re
from datetime import UTC, datetime, tzinfo
from typing import Any

from babel import Locale, UnknownLocaleError

from portal.fhir.search import fhir_date
from portal.i18n import spoken_language
from portal.index.models import Order, Patient, Study
from portal.index.names import name_language, person_name
from portal.reports.models import Report
from portal.reports.service import IncomingReport, ReportError

STATUS_IN = {"final": "final", "amended": "amended", "corrected": "amended",
             "appended": "amended", "preliminary": "preliminary", "partial": "preliminary",
             "registered": "preliminary", "cancelled": "cancelled",
             "entered-in-error": "cancelled"}
STATUS_OUT = {"final": "final", "amended": "amended", "preliminary": "preliminary",
              "cancelled": "cancelled"}
_TAGS = re.compile(r"<[^>]*>")


def _text_of_html(markup: str) -> str:
    """Markup from a sender shown as plain text: tags removed, entities decoded."""
    markup = re.sub(r"(?i)<\s*(br|/p|/div|/li)\b[^>]*>", "\n", markup)
    markup = re.sub(r"(?is)<(script|style)\b.*?</\1\s*>", "", markup)
    return html.unescape(_TAGS.sub("", markup)).strip()


def _object(value: Any) -> dict[str, Any]:
    """A JSON object from the resource, or an empty one when the sender put anything else
    there (a wrong type is missing data, not a server error)."""
    return value if isinstance(value, dict) else {}


def _array(value: Any) -> list[Any]:
    """A JSON array from the resource, or an empty one for anything else."""
    return value if isinstance(value, list) else []


def _uid_of(reference: dict[str, Any]) -> str:
    text = str(reference.get("reference", ""))
    if text.startswith("ImagingStudy/"):
        return text.removeprefix("ImagingStudy/")[:64]
    identifier = _object(reference.get("identifier"))
    value = str(identifier.get("value", ""))
    return value.removeprefix("urn:oid:")[:64]


def _accession(identifiers: list[dict[str, Any]]) -> str:
    for identifier in identifiers:
        codings = _array(_object(identifier.get("type")).get("coding"))
        if any(c.get("code") == "ACSN" for c in codings if isinstance(c, dict)):
            return str(identifier.get("value", ""))[:64]
    return ""


def _issued(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


# Patient.communication.language: a BCP 47 tag (FHIR R4, "AllLanguages").
BCP47 = "urn:ietf:bcp:47"


def _patient_language(resource: dict[str, Any], subject: dict[str, Any]) -> str:
    """The language of the Patient the report's ``subject`` references as a contained
    resource (``#id``): the ``communication`` marked preferred, else the next that names a
    language, read as ``spoken_language`` reads HL7 PID-15; '' when none names one."""
    reference = subject.get("reference")
    if not isinstance(reference, str) or not reference.startswith("#"):
        return ""
    patient = next((c for c in _array(resource.get("contained")) if isinstance(c, dict)
                    and c.get("resourceType") == "Patient"
                    and f"#{c.get('id', '')}" == reference), {})
    spoken = [c for c in _array(patient.get("communication")) if isinstance(c, dict)]
    for entry in sorted(spoken, key=lambda c: c.get("preferred") is not True):
        language = _object(entry.get("language"))
        for coding in _array(language.get("coding")):
            code = _object(coding).get("code")
            if isinstance(code, str) and spoken_language(code):
                return spoken_language(code)
    return ""


def report_from_resource(resource: Any, zone: tzinfo = UTC) -> IncomingReport:
    """An IncomingReport from a DiagnosticReport; ValueError naming what is wrong. ``zone``:
    the practice's, for an ``effective[x]`` given as a date alone."""
    if not isinstance(resource, dict) or resource.get("resourceType") != "DiagnosticReport":
        raise ValueError("the body is not a FHIR DiagnosticReport")
    status = STATUS_IN.get(str(resource.get("status", "")))
    if status is None:
        raise ValueError(f"status must be one of {', '.join(STATUS_IN)}")
    identifiers = [i for i in _array(resource.get("identifier")) if isinstance(i, dict)]
    accession = _accession(identifiers)
    own = [i for i in identifiers if i.get("value") and str(i.get("value")) != accession]
    source_id = str((own[0].get("value") if own else "") or resource.get("id") or accession)
    studies = [_uid_of(r) for r in _array(resource.get("imagingStudy")) if isinstance(r, dict)]
    subject = _object(resource.get("subject"))
    identifier = _object(subject.get("identifier"))
    patient_id = str(identifier.get("value", "")).strip()
    if not patient_id:
        raise ReportError("subject.identifier.value must name the patient: a report is "
                          "accepted only for an identified patient")
    issuer = str(_object(identifier.get("assigner")).get("display", "")).strip()
    findings: list[str] = []
    pdf = None
    for form in _array(resource.get("presentedForm")):
        if not isinstance(form, dict):
            continue
        kind = str(form.get("contentType", "")).split(";")[0].strip().lower()
        try:
            data = base64.b64decode(str(form.get("data", "")), validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("presentedForm data is not valid Base64") from None
        if kind == "application/pdf":
            pdf = data
        elif kind in ("text/plain", "text/html"):
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                raise ValueError("presentedForm text is not UTF-8") from None
            findings.append(_text_of_html(text) if kind == "text/html" else text)
        else:
            raise ValueError(f"presentedForm of type {kind[:40]!r} is not supported "
                             "(text/plain, text/html, application/pdf)")
    interpreters = [str(r.get("display", "")) for r in _array(resource.get("resultsInterpreter"))
                    if isinstance(r, dict)]
    code = resource.get("code") or {}
    return IncomingReport(
        source="fhir", source_id=source_id[:128], status=status,
        study_instance_uid=next((s for s in studies if s), ""), accession_number=accession,
        patient_id=patient_id[:64], title=str(code.get("text", ""))[:128]
        if isinstance(code, dict) else "",
        findings="\n\n".join(findings), impression=str(resource.get("conclusion", "")),
        author=", ".join(i for i in interpreters if i)[:324],
        signed_at=_issued(resource.get("issued")), pdf=pdf,
        patient_ids=[(patient_id[:64], issuer[:64])],
        patient_name=str(subject.get("display", ""))[:324],
        patient_language=_patient_language(resource, subject),
        observed_at=_issued(resource.get("issued"))
        or _issued(_object(resource.get("meta")).get("lastUpdated")),
        clinical_at=_effective_in(resource, zone), keeps_clinical_at=False)


def _effective_in(resource: dict[str, Any], zone: tzinfo) -> datetime | None:
    """The report's clinically relevant time: ``effectiveDateTime``, else the start of
    ``effectivePeriod``; a date without a time (FHIR allows it; a time needs its offset) is
    that day's start in the practice's ``zone``, a partial date (year, month) is not kept."""
    moment = _issued(resource.get("effectiveDateTime")) or _issued(
        _object(resource.get("effectivePeriod")).get("start"))
    if moment is not None and moment.tzinfo is None:
        moment = moment.replace(tzinfo=zone).astimezone(UTC)
    return moment


ACSN = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}]}
MRN = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}]}
# LOINC "Diagnostic imaging study": what every radiology report of the portal is.
REPORT_CODE = {"system": "http://loinc.org", "code": "18748-4",
               "display": "Diagnostic imaging study"}
DCM = "http://dicom.nema.org/resources/ontology/DCM"
DICOM_UID = "urn:dicom:uid"


def _status_out(report: Report) -> str:
    """The FHIR status: a cancelled report that had been final was withdrawn after release
    (entered-in-error); one never final was cancelled before it was done."""
    if report.status == "cancelled":
        return "entered-in-error" if report.final_at is not None else "cancelled"
    return STATUS_OUT.get(report.status, "unknown")


def report_source_system(source: str) -> str:
    """The identifier system of a report's id at its sender."""
    return f"urn:portal:{source}"


def effective_time(report: Report) -> datetime:
    """When the report is clinically effective: the time its sender names (HL7 OBR-7, FHIR
    ``effective[x]``), else signed, else made, else received (the ``date`` search parameter
    compares the same value)."""
    return report.clinical_at or report.signed_at or report.observed_at or report.received_at


def patient_reference(patient: Patient | None, patient_id: str = "",
                      name: str = "") -> dict[str, Any]:
    """A Reference to the indexed Patient, with its identifier and name; an identifier
    alone when the portal holds no such patient."""
    if patient is not None:
        patient_id, name = patient.patient_id, patient.patient_name
    reference: dict[str, Any] = {}
    if patient is not None:
        reference["reference"] = f"Patient/{patient.id}"
    if patient_id:
        reference["identifier"] = {"type": MRN, "value": patient_id}
        if patient is not None and patient.issuer_of_patient_id:
            reference["identifier"]["assigner"] = {"display": patient.issuer_of_patient_id}
    if name:
        reference["display"] = person_name(name) or name
    return reference or {"display": "unknown patient"}


def report_resource(report: Report, location: str, study: Study | None = None
                    ) -> dict[str, Any]:
    """A stored report as a DiagnosticReport."""
    resource: dict[str, Any] = {
        "resourceType": "DiagnosticReport", "id": str(report.id),
        "meta": {"versionId": str(report.version),
                 "lastUpdated": report.updated_at.isoformat()},
        "status": _status_out(report),
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074",
                                  "code": "RAD", "display": "Radiology"}]}],
        "code": {"coding": [REPORT_CODE], "text": report.title or "Radiology report"},
        "identifier": [{"system": report_source_system(report.source),
                        "value": report.source_id}],
        "effectiveDateTime": effective_time(report).isoformat(),
    }
    if report.accession_number:
        resource["identifier"].append({"type": ACSN, "value": report.accession_number})
    uid = study.study_instance_uid if study is not None else report.study_instance_uid
    if uid:
        resource["imagingStudy"] = [{"reference": f"ImagingStudy/{uid}"}]
    if study is not None:
        resource["subject"] = patient_reference(study.patient)
    elif report.patient_id:
        resource["subject"] = patient_reference(None, report.patient_id)
    if report.signed_at:
        resource["issued"] = report.signed_at.isoformat()
    if report.author:
        resource["resultsInterpreter"] = [{"display": report.author}]
    if report.impression:
        resource["conclusion"] = report.impression
    forms = []
    if report.findings:
        forms.append({"contentType": "text/plain; charset=utf-8", "title": "Findings",
                      "data": base64.b64encode(report.findings.encode()).decode()})
    if uid and report.status != "cancelled":  # a withdrawn report has no PDF to offer
        base = location.split("/fhir/", 1)[0]
        forms.append({"contentType": "application/pdf", "title": "Report",
                      "url": f"{base}/studies/{uid}/reports/{report.id}.pdf"})
    if forms:
        resource["presentedForm"] = forms
    return resource


def imaging_study(study: Study, dicomweb_base: str) -> dict[str, Any]:
    """An indexed study as an ImagingStudy (id = Study Instance UID), its DICOMweb service as
    a contained Endpoint."""
    resource: dict[str, Any] = {
        "resourceType": "ImagingStudy", "id": study.study_instance_uid, "status": "available",
        "contained": [{"resourceType": "Endpoint", "id": "dicomweb", "status": "active",
                       "connectionType": {
                           "system": "http://terminology.hl7.org/CodeSystem/"
                                     "endpoint-connection-type", "code": "dicom-wado-rs"},
                       "payloadType": [{"text": "DICOM"}], "address": dicomweb_base}],
        "identifier": [{"system": DICOM_UID, "value": f"urn:oid:{study.study_instance_uid}"}],
        "subject": patient_reference(study.patient),
        "numberOfSeries": study.number_of_series,
        "numberOfInstances": study.number_of_instances,
        "endpoint": [{"reference": "#dicomweb"}],
    }
    if study.accession_number:
        resource["identifier"].append({"type": ACSN, "value": study.accession_number})
    if study.study_description:
        resource["description"] = study.study_description
    started = fhir_date(study.study_date)
    if started:
        resource["started"] = started
    modalities = [m for m in study.modalities_in_study.split("\\") if m.strip()]
    if modalities:
        resource["modality"] = [{"system": DCM, "code": m.strip()} for m in modalities]
    return resource


GENDER = {"M": "male", "F": "female", "O": "other"}
# Which form of a name a HumanName holds (FHIR extension iso21090-EN-representation, codes of
# v3 EntityNameUse): the DICOM PN component groups alphabetic, ideographic, phonetic.
REPRESENTATION = "http://hl7.org/fhir/StructureDefinition/iso21090-EN-representation"
_GROUP_CODES = ("ABC", "IDE", "SYL")


def _human_name(group: str, code: str, language: str) -> dict[str, Any] | None:
    """One PN component group (``family^given^middle^prefix^suffix``) as a HumanName."""
    parts = [" ".join(p.split()) for p in group.split("^")]
    parts += [""] * (5 - len(parts))
    family, given, middle, prefix = parts[:4]
    suffix = " ".join(p for p in parts[4:] if p)
    if not any((family, given, middle, prefix, suffix)):
        return None
    name: dict[str, Any] = {
        "extension": [{"url": REPRESENTATION, "valueCode": code}], "use": "official"}
    # The text as people write this form (as person_name does): a Japanese, Korean or
    # Chinese name family name first in every group, romaji too ("Yamada Tarou"), and in its
    # own script without a space unless Japanese ("王小东", "山田 太郎"); else given name first.
    if language:
        joiner = "" if language != "ja" and name_language(group) else " "
        text = " ".join(p for p in (prefix, joiner.join(p for p in (family, given, middle) if p))
                        if p)
    else:
        text = " ".join(p for p in (prefix, given, middle, family) if p)
    name["text"] = f"{text}, {suffix}" if text and suffix else text or suffix
    if family:
        name["family"] = family
    if given or middle:
        name["given"] = [p for p in (given, middle) if p]
    if prefix:
        name["prefix"] = [prefix]
    if suffix:
        name["suffix"] = [suffix]
    return name


def human_names(value: str) -> list[dict[str, Any]]:
    """A DICOM PN as Patient.name: one official HumanName per component group present, each
    marked with its representation (ABC alphabetic, IDE ideographic, SYL phonetic), in the
    order of the groups; only the first value of a multi-valued PN (docs/i18n.md, "Person
    names")."""
    first = (value or "").split("\\")[0]
    language = name_language(first)
    groups = first.split("=")[:3]
    found = (_human_name(g, code, language) for g, code in zip(groups, _GROUP_CODES, strict=False))
    return [n for n in found if n is not None]


def patient_resource(patient: Patient, language: str = "") -> dict[str, Any]:
    """An indexed patient (Patient ID within its issuer) as a Patient; ``language``: his
    language as the RIS gave it (``given_languages``), as his preferred ``communication``."""
    resource: dict[str, Any] = {"resourceType": "Patient", "id": str(patient.id)}
    if patient.patient_id:
        identifier: dict[str, Any] = {"type": MRN, "value": patient.patient_id}
        if patient.issuer_of_patient_id:
            identifier["assigner"] = {"display": patient.issuer_of_patient_id}
        resource["identifier"] = [identifier]
    names = human_names(patient.patient_name)
    if names:
        resource["name"] = names
    resource["gender"] = GENDER.get(patient.patient_sex.strip().upper(), "unknown")
    born = fhir_date(patient.patient_birth_date)
    if born and len(born) == 10:
        resource["birthDate"] = born
    if language:
        resource["communication"] = [{"language": {
            "coding": [{"system": BCP47, "code": language}], "text": _language_name(language)},
            "preferred": True}]
    return resource


def _language_name(code: str) -> str:
    """A language's English name, or its code when Babel does not know it (a row written
    before an upgrade of Babel's data, or by hand)."""
    try:
        return str(Locale.parse(code).get_display_name("en") or code)
    except (ValueError, TypeError, UnknownLocaleError):
        return code


# Order status as the portal derives it (reports.service.effective_status) -> FHIR.
REQUEST_STATUS = {"ordered": "active", "scheduled": "active", "performed": "completed",
                  "reported": "completed", "cancelled": "revoked"}
APPOINTMENT_STATUS = {"ordered": "booked", "scheduled": "booked", "performed": "fulfilled",
                      "reported": "fulfilled", "cancelled": "cancelled"}


def _order_identifiers(order: Order) -> list[dict[str, Any]]:
    found = []
    for code, value in (("PLAC", order.placer_order_number), ("FILL", order.filler_order_number),
                        ("ACSN", order.accession_number)):
        if value:
            found.append({"type": {"coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": code}]},
                "value": value})
    return found


def service_request(order: Order, status: str, patient: Patient | None) -> dict[str, Any]:
    """An imaging order as a ServiceRequest; ``status`` is its effective status."""
    resource: dict[str, Any] = {
        "resourceType": "ServiceRequest", "id": str(order.id),
        "meta": {"lastUpdated": order.updated_at.isoformat()},
        "status": REQUEST_STATUS.get(status, "unknown"), "intent": "order",
        "category": [{"coding": [{"system": "http://snomed.info/sct", "code": "363679005",
                                  "display": "Imaging"}]}],
        "subject": patient_reference(patient, order.patient_id, order.patient_name),
    }
    identifiers = _order_identifiers(order)
    if identifiers:
        resource["identifier"] = identifiers
    if order.procedure or order.modality:
        code: dict[str, Any] = {"text": order.procedure or order.modality}
        if order.modality:
            code["coding"] = [{"system": DCM, "code": order.modality}]
        resource["code"] = code
    if order.scheduled_at is not None:
        resource["occurrenceDateTime"] = order.scheduled_at.isoformat()
    if order.ordering_provider:
        resource["requester"] = {"display": person_name(order.ordering_provider)
                                 or order.ordering_provider}
    if order.location:
        resource["locationCode"] = [{"text": order.location}]
    return resource


def appointment(order: Order, status: str, patient: Patient | None) -> dict[str, Any]:
    """A scheduled order (SIU^S12-S14, or an order with a time) as an Appointment. The RIS
    sends the start only: ``end`` repeats it (R4 app-2 wants both or neither)."""
    assert order.scheduled_at is not None
    when = order.scheduled_at.isoformat()
    participants: list[dict[str, Any]] = [
        {"actor": patient_reference(patient, order.patient_id, order.patient_name),
         "status": "accepted"}]
    if order.location:
        participants.append({"actor": {"display": order.location}, "status": "accepted"})
    resource: dict[str, Any] = {
        "resourceType": "Appointment", "id": str(order.id),
        "meta": {"lastUpdated": order.updated_at.isoformat()},
        "status": APPOINTMENT_STATUS.get(status, "booked"),
        "start": when, "end": when,
        "comment": "the end time is not known to the portal",
        "basedOn": [{"reference": f"ServiceRequest/{order.id}"}],
        "participant": participants,
    }
    if order.procedure:
        resource["description"] = order.procedure
    if order.modality:
        resource["serviceType"] = [{"coding": [{"system": DCM, "code": order.modality}]}]
    return resource
