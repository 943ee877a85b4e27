"""IHE Invoke Image Display (IHE RAD TF-2 RAD-106): the request's parameters and the studies
they name, among those the asking principal may see (docs/conformance/launch.md).

Every parameter is checked before anything is looked up; a bad one is a ``LaunchError`` whose
message says which and why (the route answers 400 with it). What the profile leaves to the
display (``viewerType``, ``diagnosticQuality``, ``keyImagesOnly``) is checked for form and
otherwise ignored: the portal has one viewer, and it always shows the stored pixels.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session, joinedload

from portal import failures
from portal.access.policy import visible_studies
from portal.access.principal import Principal
from portal.index.models import Patient, Series, Study

MAX_LIST = 100  # UIDs or accession numbers in one request
MAX_RESULTS = 200  # studies one PATIENT request lists
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
_MODALITY = re.compile(r"[A-Z0-9]{1,16}")


class LaunchError(failures.Invalid, ValueError):
    """A parameter of the request is missing or malformed; the message says which."""


@dataclass(frozen=True)
class PatientKey:
    """A Patient ID within its assigning authority (``issuers``: the HD's namespace and
    universal id, either of which a stored Issuer of Patient ID may carry; none: the
    patient was recorded without an issuer)."""

    patient_id: str
    issuers: tuple[str, ...] = ()


@dataclass(frozen=True)
class DisplayRequest:
    """A checked IID request."""

    request_type: str  # STUDY or PATIENT
    study_uids: tuple[str, ...] = ()
    accession_numbers: tuple[str, ...] = ()
    patient: PatientKey | None = None
    most_recent: int | None = None
    lower: datetime | None = None
    upper: datetime | None = None
    modalities: tuple[str, ...] = ()
    ignored: dict[str, str] = field(default_factory=dict)


def parse_patient_id(value: str) -> PatientKey:
    """``ID^^^&ISSUER`` (or ``ID^^^NS&UID&TYPE``, or a bare ``ID``) as a PatientKey.

    The profile sends an HL7 v2 CX: the ID, then the assigning authority (an HD:
    namespace ``&`` universal id ``&`` its type) as the fourth component.
    """
    text = value.strip()
    if not text or len(text) > 250:
        raise LaunchError("patientID: give the patient's ID, as ID^^^&ISSUER")
    parts = text.split("^")
    patient_id = parts[0].strip()
    if not patient_id or len(patient_id) > 64:
        raise LaunchError("patientID: the ID before ^^^ must be 1 to 64 characters")
    if len(parts) > 1 and (len(parts) != 4 or any(p.strip() for p in parts[1:3])):
        raise LaunchError("patientID: write the assigning authority as ID^^^&ISSUER")
    issuers: tuple[str, ...] = ()
    if len(parts) == 4:
        pieces = [p.strip() for p in parts[3].split("&")]
        if len(pieces) > 3 or any(len(p) > 64 for p in pieces):
            raise LaunchError("patientID: the assigning authority is NAMESPACE&UID&TYPE")
        issuers = tuple(dict.fromkeys(p for p in pieces[:2] if p))
    return PatientKey(patient_id, issuers)


def _listed(args: Any, name: str) -> tuple[str, ...]:
    values = [v.strip() for raw in args.getlist(name) for v in raw.split(",") if v.strip()]
    if len(values) > MAX_LIST:
        raise LaunchError("%(name)s: at most %(count)d values", name=name, count=MAX_LIST)
    return tuple(dict.fromkeys(values))


def _when(args: Any, name: str) -> datetime | None:
    raw = args.get(name, "").strip()
    if not raw:
        return None
    try:
        when = datetime.fromisoformat(raw)
    except ValueError:
        raise LaunchError("%(name)s: not an ISO 8601 date and time "
                          "(e.g. 2024-01-31T08:00:00Z)", name=name) from None
    return when.replace(tzinfo=None)  # compared with the study's recorded wall-clock time


def _flag(args: Any, name: str, ignored: dict[str, str]) -> None:
    raw = args.get(name)
    if raw is None:
        return
    if raw.strip().lower() not in ("true", "false"):
        raise LaunchError("%(name)s: true or false", name=name)
    ignored[name] = raw.strip().lower()


def parse_request(args: Any) -> DisplayRequest:
    """Check the query parameters of an IID request; LaunchError names the first bad one."""
    request_type = args.get("requestType", "").strip().upper()
    if request_type not in ("STUDY", "PATIENT"):
        raise LaunchError("requestType: STUDY or PATIENT")
    ignored: dict[str, str] = {}
    viewer_type = args.get("viewerType")
    if viewer_type is not None:
        if len(viewer_type) > 64:
            raise LaunchError("viewerType: at most 64 characters")
        ignored["viewerType"] = viewer_type.strip()
    _flag(args, "diagnosticQuality", ignored)
    _flag(args, "keyImagesOnly", ignored)
    raw_patient = args.get("patientID")
    patient = parse_patient_id(raw_patient) if raw_patient is not None else None
    if request_type == "STUDY":
        uids = _listed(args, "studyUID")
        accessions = _listed(args, "accessionNumber")
        if bool(uids) == bool(accessions):
            raise LaunchError("a STUDY request names studies by studyUID or by "
                              "accessionNumber (one of them, comma-separated)")
        for uid in uids:
            if len(uid) > 64 or not _UID.fullmatch(uid):
                raise LaunchError("studyUID: %(uid)s is not a DICOM UID", uid=repr(uid[:70]))
        for accession in accessions:
            if len(accession) > 64:
                raise LaunchError("accessionNumber: at most 64 characters each")
        return DisplayRequest("STUDY", study_uids=uids, accession_numbers=accessions,
                              patient=patient, ignored=ignored)
    if patient is None:
        raise LaunchError("patientID: required for a PATIENT request (ID^^^&ISSUER)")
    most_recent = None
    raw = args.get("mostRecentResults", "").strip()
    if raw:
        if not raw.isdigit() or not 1 <= int(raw) <= MAX_RESULTS:
            raise LaunchError("mostRecentResults: a whole number from 1 to %(most)d",
                              most=MAX_RESULTS)
        most_recent = int(raw)
    lower, upper = _when(args, "lowerDateTime"), _when(args, "upperDateTime")
    if lower and upper and lower > upper:
        raise LaunchError("lowerDateTime: later than upperDateTime")
    modalities = tuple(m.upper() for m in _listed(args, "modalitiesInStudy"))
    for code in modalities:
        if not _MODALITY.fullmatch(code):
            raise LaunchError("modalitiesInStudy: %(code)s is not a modality code",
                              code=repr(code[:20]))
    return DisplayRequest("PATIENT", patient=patient, most_recent=most_recent, lower=lower,
                          upper=upper, modalities=modalities, ignored=ignored)


def patient_condition(keys: list[PatientKey]) -> Any:
    """Patients named by any of ``keys``: the ID and, when an authority is given, an issuer
    equal to one of its names; without one, only patients recorded without an issuer (the
    same ID of another issuer is another patient)."""
    return or_(*(and_(Patient.patient_id == key.patient_id,
                      Patient.issuer_of_patient_id.in_(key.issuers) if key.issuers
                      else Patient.issuer_of_patient_id == "")
                 for key in keys))


def _at(when: datetime) -> tuple[str, str]:
    return when.strftime("%Y%m%d"), when.strftime("%H%M%S")


def find_studies(session: Session, principal: Principal,
                 wanted: DisplayRequest) -> list[Study]:
    """The requested studies this principal may see, newest first (with their patient)."""
    stmt = visible_studies(principal).options(joinedload(Study.patient))
    if wanted.patient is not None:
        stmt = stmt.where(Study.patient_fk.in_(select(Patient.id).where(
            patient_condition([wanted.patient]))))
    if wanted.request_type == "STUDY":
        stmt = stmt.where(Study.study_instance_uid.in_(wanted.study_uids)
                          if wanted.study_uids
                          else Study.accession_number.in_(wanted.accession_numbers))
    if wanted.lower is not None:
        day, time = _at(wanted.lower)
        stmt = stmt.where(or_(Study.study_date > day,
                              and_(Study.study_date == day, Study.study_time >= time)))
    if wanted.upper is not None:
        day, time = _at(wanted.upper)
        stmt = stmt.where(Study.study_date != "", or_(
            Study.study_date < day, and_(Study.study_date == day, Study.study_time <= time)))
    if wanted.modalities:
        stmt = stmt.where(Study.id.in_(select(Series.study_fk).where(
            Series.modality.in_(wanted.modalities))))
    return _newest(session, stmt, wanted.most_recent or MAX_RESULTS)


def patient_studies(session: Session, principal: Principal,
                    keys: list[PatientKey]) -> list[Study]:
    """The studies of these patients this principal may see, newest first."""
    stmt = visible_studies(principal).options(joinedload(Study.patient)).where(
        Study.patient_fk.in_(select(Patient.id).where(patient_condition(keys))))
    return _newest(session, stmt, MAX_RESULTS)


def _newest(session: Session, stmt: Any, limit: int) -> list[Study]:
    return list(session.scalars(stmt.order_by(Study.study_date.desc(), Study.study_time.desc(),
                                              Study.id.desc()).limit(limit)).unique())
