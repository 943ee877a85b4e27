"""FHIR R4 mapping: DiagnosticReport in and out, ImagingStudy out, searchset Bundles.

In: ``status``; ``identifier`` (the report's id at the sender; an identifier whose type is
ACSN is the accession number); ``imagingStudy`` references (``ImagingStudy/<Study UID>`` or
a contained/identified study with ``urn:oid:`` + UID); ``subject`` with a Patient identifier
(required: its ``value``, its ``assigner.display`` as the issuer, and ``subject.display`` as
the name are checked against the study's patient); ``conclusion`` (impression);
``presentedForm`` attachments (text/plain, text/html as text, application/pdf);
``resultsInterpreter`` display (author); ``issued`` (signing time; a version issued before
the stored one is not applied).

Out: a cancelled report stays visible with its status: ``entered-in-error`` once it had been
released as final (withdrawn), else ``cancelled``.
"""

from __future__ import annotations

import base64
import binascii
import html
import re
from datetime import datetime
from typing import Any

from portal.index.models import Study
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


def report_from_resource(resource: Any) -> IncomingReport:
    """An IncomingReport from a DiagnosticReport; ValueError naming what is wrong."""
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
        observed_at=_issued(resource.get("issued"))
        or _issued(_object(resource.get("meta")).get("lastUpdated")))


def _status_out(report: Report) -> str:
    """The FHIR status: a cancelled report that had been final was withdrawn after release
    (entered-in-error); one never final was cancelled before it was done."""
    if report.status == "cancelled":
        return "entered-in-error" if report.final_at is not None else "cancelled"
    return STATUS_OUT.get(report.status, "unknown")


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
        "code": {"text": report.title or "Radiology report"},
        "identifier": [{"system": f"urn:portal:{report.source}", "value": report.source_id}],
    }
    if report.accession_number:
        resource["identifier"].append({
            "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                                 "code": "ACSN"}]}, "value": report.accession_number})
    uid = study.study_instance_uid if study is not None else report.study_instance_uid
    if uid:
        resource["imagingStudy"] = [{"reference": f"ImagingStudy/{uid}"}]
    if report.patient_id:
        resource["subject"] = {"identifier": {"value": report.patient_id}}
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
    resource["presentedForm"] = forms
    return resource


def imaging_study(study: Study, dicomweb_base: str) -> dict[str, Any]:
    """An indexed study as an ImagingStudy (id = Study Instance UID)."""
    resource: dict[str, Any] = {
        "resourceType": "ImagingStudy", "id": study.study_instance_uid, "status": "available",
        "identifier": [{"system": "urn:dicom:uid",
                        "value": f"urn:oid:{study.study_instance_uid}"}],
        "subject": {"identifier": {"value": study.patient.patient_id},
                    "display": study.patient.patient_name},
        "numberOfSeries": study.number_of_series,
        "numberOfInstances": study.number_of_instances,
        "endpoint": [{"display": "DICOMweb", "reference": dicomweb_base}],
    }
    if study.accession_number:
        resource["identifier"].append({
            "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                                 "code": "ACSN"}]}, "value": study.accession_number})
    if study.study_description:
        resource["description"] = study.study_description
    if len(study.study_date) == 8:
        d = study.study_date
        resource["started"] = f"{d[:4]}-{d[4:6]}-{d[6:]}"
    modalities = [m for m in study.modalities_in_study.split("\\") if m]
    if modalities:
        resource["modality"] = [{"system": "http://dicom.nema.org/resources/ontology/DCM",
                                 "code": m} for m in modalities]
    return resource


def bundle(resources: list[dict[str, Any]]) -> dict[str, Any]:
    """A searchset Bundle."""
    return {"resourceType": "Bundle", "type": "searchset", "total": len(resources),
            "entry": [{"resource": r, "search": {"mode": "match"}} for r in resources]}
