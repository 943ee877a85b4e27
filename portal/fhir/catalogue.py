"""The one table of what the FHIR face offers: per resource type its interactions, its search
parameters (``search.Param``), what the caller may see of it, and how rows become resources.
The handlers (``portal.fhir.routes``) search with it and the CapabilityStatement
(``portal.fhir.capability``) is generated from it.

Access (docs/security.md 3, docs/architecture.md "access"): studies, reports and patients
through ``access.policy.study_filter`` (a physician sees his patients' studies, a patient his
own); orders and appointments are those the physician (or his practice) placed, a patient's
own (``access.policy.own_orders_condition``), and every one for a machine with the read
right.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, Select, and_, exists, false, func, or_, select, true
from sqlalchemy.orm import Session

from portal.access.models import ReferrerIdentifier
from portal.access.policy import is_patient, order_placers, own_orders_condition, study_filter
from portal.access.principal import Principal
from portal.fhir import resources
from portal.fhir.search import (
    Param,
    SearchError,
    day_condition,
    instant_condition,
    nothing,
    number_id,
    reference_id,
    row_id,
    token,
)
from portal.index.models import Order, Patient, Series, Study
from portal.index.names import search_words
from portal.reports.models import Report
from portal.reports.service import (
    _report_of_study,
    effective_statuses,
    given_languages,
    readable_reports,
    study_of_report,
)

Emit = Callable[[Session, Principal, Sequence[Any], "Links"], list[dict[str, Any]]]


@dataclass(frozen=True)
class Links:
    """Absolute URLs the resources point to."""

    fhir_base: str  # .../fhir
    dicomweb_base: str  # .../dicomweb


@dataclass(frozen=True)
class Kind:
    """One resource type of the FHIR face."""

    name: str
    documentation: str
    interactions: tuple[str, ...]
    params: dict[str, Param]
    base: Callable[[Principal], Select[Any]]  # the rows this caller may see, ordered
    by_id: Callable[[str], ColumnElement[bool]]
    emit: Emit  # rows -> resources (may leave out what this caller may not read yet)
    # True when ``emit`` may leave rows out for this caller: paging is then done on the
    # emitted resources, not in SQL.
    drops_rows: Callable[[Principal], bool] = lambda _principal: False


def _declared(*params: Param) -> dict[str, Param]:
    return {p.name: p for p in params}


def _int_id(column: Any, resource_type: str) -> Callable[[str, str], ColumnElement[bool]]:
    def where(_modifier: str, value: str) -> ColumnElement[bool]:
        number = number_id(value, resource_type)
        return column == number if number is not None else nothing()
    return where


def _id_is(column: Any, text: str) -> ColumnElement[bool]:
    number = row_id(text)
    return column == number if number is not None else nothing()


def _like_escaped(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


# -- patients ---------------------------------------------------------------------------------

def visible_patients(principal: Principal) -> Select[Any]:
    """Ids of the patients of the studies this caller may see."""
    return select(Study.patient_fk).where(study_filter(principal))


def _patient_identifier(value: str) -> ColumnElement[bool]:
    """SQL on Patient: the token names its Patient ID (the portal's identifiers carry no
    system, so ``|value`` or ``value``; another system matches nothing)."""
    system, code = token(value)
    if system or not code:
        return nothing()
    return Patient.patient_id == code[:64]


def _patient_name(_modifier: str, value: str) -> ColumnElement[bool]:
    """Every word of the value starts a word of the name (as the study search matches)."""
    words = search_words(value)
    if not words:
        raise SearchError("name needs at least one letter or digit")
    return and_(*(Patient.name_search.like(f"% {_like_escaped(w)}%", escape="\\")
                  for w in words[:8]))


def _patient_refers(column: Any) -> Callable[[str, str], ColumnElement[bool]]:
    """A ``patient`` parameter on rows that hold the patient row's id: ``Patient/<id>`` or,
    with ``:identifier``, the patient's Patient ID."""
    def where(modifier: str, value: str) -> ColumnElement[bool]:
        if modifier == "identifier":
            found: ColumnElement[bool] = column.in_(
                select(Patient.id).where(_patient_identifier(value)))
            return found
        number = number_id(value, "Patient")
        return column == number if number is not None else nothing()
    return where


def _emit_patients(session: Session, principal: Principal, rows: Sequence[Any],
                   _links: Links) -> list[dict[str, Any]]:
    # The language from the reports and orders of the studies the caller may see.
    spoken = given_languages(session, and_(Study.patient_fk.in_([p.id for p in rows]),
                                           study_filter(principal)))
    return [resources.patient_resource(p, spoken.get(p.id, "")) for p in rows]


PATIENT = Kind(
    name="Patient",
    documentation="The patients of the studies the caller may see (id: the portal's own "
                  "number; identifier: Patient ID, its issuer as assigner).",
    interactions=("read", "search-type"),
    params=_declared(
        Param("_id", "token", "The portal's patient number.", _int_id(Patient.id, "Patient")),
        Param("identifier", "token", "Patient ID (exact; the portal's identifiers have no "
              "system).", lambda _m, v: _patient_identifier(v)),
        Param("name", "string", "Starts of words of the name, any order, case and accents "
              "ignored.", _patient_name),
        Param("birthdate", "date", "Date of birth; prefixes eq, ne, gt, lt, ge, le.",
              lambda _m, v: day_condition(Patient.patient_birth_date, v)),
    ),
    base=lambda principal: select(Patient).where(Patient.id.in_(visible_patients(principal)))
    .order_by(Patient.id),
    by_id=lambda text: _id_is(Patient.id, text),
    emit=_emit_patients,
)


# -- studies ----------------------------------------------------------------------------------

def _study_identifier(value: str) -> ColumnElement[bool]:
    """``urn:dicom:uid|urn:oid:<UID>`` names the study UID, ``|<accession>`` the accession
    number, a bare value either."""
    system, code = token(value)
    uid = code.removeprefix("urn:oid:")[:64]
    if system is None:
        return or_(Study.study_instance_uid == uid, Study.accession_number == code[:64])
    if system == resources.DICOM_UID:
        return Study.study_instance_uid == uid
    if system == "":
        return Study.accession_number == code[:64]
    return nothing()


def _modality(_modifier: str, value: str) -> ColumnElement[bool]:
    system, code = token(value)
    if system not in (None, "", resources.DCM) or not code:
        return nothing()
    return exists(select(Series.id).where(Series.study_fk == Study.id,
                                          Series.modality == code[:16]))


def _emit_studies(_session: Session, _principal: Principal, rows: Sequence[Any],
                  links: Links) -> list[dict[str, Any]]:
    return [resources.imaging_study(s, links.dicomweb_base) for s in rows]


IMAGING_STUDY = Kind(
    name="ImagingStudy",
    documentation="The studies the caller may see (id: Study Instance UID); the DICOMweb "
                  "service is a contained Endpoint.",
    interactions=("read", "search-type"),
    params=_declared(
        Param("_id", "token", "Study Instance UID.",
              lambda _m, v: Study.study_instance_uid == reference_id(v, "ImagingStudy")[:64]),
        Param("patient", "reference", "Patient/<id>; with :identifier, the Patient ID.",
              _patient_refers(Study.patient_fk), modifiers=("identifier",)),
        Param("identifier", "token", "urn:dicom:uid|urn:oid:<Study Instance UID>, or the "
              "accession number (|<accession> or the bare value).",
              lambda _m, v: _study_identifier(v)),
        Param("started", "date", "Study date; prefixes eq, ne, gt, lt, ge, le.",
              lambda _m, v: day_condition(Study.study_date, v)),
        Param("modality", "token", "A modality of one of its series "
              f"({resources.DCM}|<code> or the code).", _modality),
    ),
    base=lambda principal: select(Study).where(study_filter(principal))
    .order_by(Study.study_date.desc(), Study.id.desc()),
    by_id=lambda text: Study.study_instance_uid == text[:64],
    emit=_emit_studies,
)


# -- reports ----------------------------------------------------------------------------------

def _report_study(*conditions: ColumnElement[bool]) -> ColumnElement[bool]:
    """SQL on Report: it belongs to a study that meets these conditions."""
    return exists(select(Study.id).where(_report_of_study(), *conditions))


# FHIR status -> stored status and whether it had been final.
def _report_status(_modifier: str, value: str) -> ColumnElement[bool]:
    system, code = token(value)
    if system:
        return nothing()
    stored = {"final": Report.status == "final", "amended": Report.status == "amended",
              "preliminary": Report.status == "preliminary",
              "cancelled": (Report.status == "cancelled") & Report.final_at.is_(None),
              "entered-in-error": (Report.status == "cancelled") & Report.final_at.is_not(None)}
    return stored.get(code, nothing())


def _report_code(modifier: str, value: str) -> ColumnElement[bool]:
    if modifier == "text":
        return func.lower(Report.title).like(f"{_like_escaped(value.lower())}%", escape="\\")
    system, code = token(value)
    known = system in (None, resources.REPORT_CODE["system"]) \
        and code == resources.REPORT_CODE["code"]
    return true() if known else nothing()


def _report_identifier(_modifier: str, value: str) -> ColumnElement[bool]:
    system, code = token(value)
    if system is None:
        return or_(Report.source_id == code[:128], Report.accession_number == code[:64])
    if system == "":
        return Report.accession_number == code[:64]
    if system.startswith("urn:portal:"):
        return (Report.source == system.removeprefix("urn:portal:")[:8]) \
            & (Report.source_id == code[:128])
    return nothing()


def _report_patient(modifier: str, value: str) -> ColumnElement[bool]:
    if modifier == "identifier":
        return _report_study(Study.patient_fk.in_(select(Patient.id).where(
            _patient_identifier(value))))
    number = number_id(value, "Patient")
    return _report_study(Study.patient_fk == number) if number is not None else nothing()


def _effective() -> ColumnElement[Any]:
    return func.coalesce(Report.clinical_at, Report.signed_at, Report.observed_at,
                         Report.received_at)


def _emit_reports(session: Session, principal: Principal, rows: Sequence[Any],
                  links: Links) -> list[dict[str, Any]]:
    """Reports as released to this caller (patients: final ones after the release delay)."""
    out = []
    readable: dict[int, set[int]] = {}
    for report in rows:
        study = study_of_report(session, report)
        if study is None:
            continue
        if is_patient(principal):
            if study.id not in readable:
                readable[study.id] = {v.report.id for v in readable_reports(
                    session, principal, study, include_cancelled=True)}
            if report.id not in readable[study.id]:
                continue
        out.append(resources.report_resource(
            report, f"{links.fhir_base}/DiagnosticReport/{report.id}", study))
    return out


DIAGNOSTIC_REPORT = Kind(
    name="DiagnosticReport",
    documentation="Radiology reports of the studies the caller may see, as released to him; "
                  "a withdrawn report stays with status entered-in-error (or cancelled). "
                  "create: from a RIS (the store right or the report_sender role).",
    interactions=("create", "read", "search-type"),
    params=_declared(
        Param("_id", "token", "The portal's report number.",
              _int_id(Report.id, "DiagnosticReport")),
        Param("patient", "reference", "Patient/<id>; with :identifier, the Patient ID.",
              _report_patient, modifiers=("identifier",)),
        Param("subject", "reference", "As patient (the subject is always a Patient).",
              _report_patient, modifiers=("identifier",)),
        Param("status", "token", "final, amended, preliminary, cancelled, entered-in-error.",
              _report_status),
        Param("date", "date", "effectiveDateTime (the sender's, else signed, else made, else "
              "received); prefixes eq, ne, gt, lt, ge, le.", lambda _m, v: instant_condition(
                  _effective(), v)),
        Param("code", "token", f"{resources.REPORT_CODE['system']}|"
              f"{resources.REPORT_CODE['code']} (every report); :text matches the start of "
              "the report's title.", _report_code, modifiers=("text",)),
        Param("identifier", "token", "urn:portal:<source>|<id at the sender>, or the "
              "accession number (|<accession> or the bare value).", _report_identifier),
        Param("study", "reference", "Portal extension: ImagingStudy/<Study Instance UID> "
              "the report belongs to.", lambda _m, v: _report_study(
                  Study.study_instance_uid == reference_id(v, "ImagingStudy")[:64])),
    ),
    base=lambda principal: select(Report).where(_report_study(study_filter(principal)))
    .order_by(Report.updated_at.desc(), Report.id.desc()),
    by_id=lambda text: _id_is(Report.id, text),
    emit=_emit_reports,
    drops_rows=is_patient,
)


# -- orders and appointments ------------------------------------------------------------------

def order_filter(principal: Principal) -> ColumnElement[bool]:
    """SQL on Order: what this caller may see: the orders his placers (``policy.
    order_placers``, as the orders page lists them) placed, a patient's own, and everything
    for a machine with the read right."""
    if principal.kind == "machine":
        return true() if principal.can_read_all else false()
    if principal.kind != "user":
        return false()
    conditions = [own_orders_condition(principal)]
    people = order_placers(principal)
    if people is not None:
        keys = select(ReferrerIdentifier.key).where(ReferrerIdentifier.user_fk.in_(people))
        conditions.append((Order.ordering_provider_key != "")
                          & Order.ordering_provider_key.in_(keys))
    return or_(*conditions)


def _order_patient(modifier: str, value: str) -> ColumnElement[bool]:
    if modifier == "identifier":
        system, code = token(value)
        return Order.patient_id == code[:64] if not system and code else nothing()
    number = number_id(value, "Patient")
    if number is None:
        return nothing()
    return Order.patient_id.in_(select(Patient.patient_id).where(Patient.id == number))


def _order_identifier(_modifier: str, value: str) -> ColumnElement[bool]:
    system, code = token(value)
    if system or not code:
        return nothing()
    return or_(Order.placer_order_number == code[:64], Order.filler_order_number == code[:64],
               Order.accession_number == code[:64])


def _status_is(value: str) -> Callable[[dict[str, Any]], bool]:
    system, code = token(value)
    return lambda resource: not system and resource.get("status") == code


def _order_patients(session: Session, principal: Principal,
                    rows: Sequence[Order]) -> dict[str, Patient]:
    """The indexed patient of each order's Patient ID, among those the caller may see, when
    exactly one is."""
    ids = {o.patient_id for o in rows if o.patient_id}
    found: dict[str, list[Patient]] = {}
    if ids:
        for patient in session.scalars(select(Patient).where(
                Patient.patient_id.in_(sorted(ids)),
                Patient.id.in_(visible_patients(principal)))):
            found.setdefault(patient.patient_id, []).append(patient)
    return {key: rows_[0] for key, rows_ in found.items() if len(rows_) == 1}


def _emitter(make: Callable[[Order, str, Patient | None], dict[str, Any]]) -> Emit:
    def emit(session: Session, principal: Principal, rows: Sequence[Any],
             _links: Links) -> list[dict[str, Any]]:
        orders = list(rows)
        patients = _order_patients(session, principal, orders)
        return [make(order, status, patients.get(order.patient_id))
                for order, status in zip(orders, effective_statuses(session, orders),
                                         strict=True)]
    return emit


def _order_by_id(text: str) -> ColumnElement[bool]:
    return _id_is(Order.id, text)


SERVICE_REQUEST = Kind(
    name="ServiceRequest",
    documentation="Imaging orders from the RIS (HL7 ORM^O01 / OMI^O23, SIU); status from "
                  "the order and whether its study and a final report arrived.",
    interactions=("read", "search-type"),
    params=_declared(
        Param("_id", "token", "The portal's order number.",
              _int_id(Order.id, "ServiceRequest")),
        Param("patient", "reference", "Patient/<id>; with :identifier, the Patient ID.",
              _order_patient, modifiers=("identifier",)),
        Param("identifier", "token", "Placer or filler order number or accession number.",
              _order_identifier),
        Param("status", "token", "active, completed, revoked.", keep=_status_is),
    ),
    base=lambda principal: select(Order).where(order_filter(principal))
    .order_by(Order.updated_at.desc(), Order.id.desc()),
    by_id=_order_by_id,
    emit=_emitter(resources.service_request),
)

APPOINTMENT = Kind(
    name="Appointment",
    documentation="Scheduled orders (HL7 SIU^S12-S14, or an order with a time); basedOn "
                  "names the ServiceRequest.",
    interactions=("read", "search-type"),
    params=_declared(
        Param("_id", "token", "The portal's order number.", _int_id(Order.id, "Appointment")),
        Param("patient", "reference", "Patient/<id>; with :identifier, the Patient ID.",
              _order_patient, modifiers=("identifier",)),
        Param("date", "date", "Start time; prefixes eq, ne, gt, lt, ge, le.",
              lambda _m, v: instant_condition(Order.scheduled_at, v)),
        Param("status", "token", "booked, fulfilled, cancelled.", keep=_status_is),
    ),
    base=lambda principal: select(Order).where(order_filter(principal),
                                               Order.scheduled_at.is_not(None))
    .order_by(Order.scheduled_at.desc(), Order.id.desc()),
    by_id=_order_by_id,
    emit=_emitter(resources.appointment),
)

KINDS: dict[str, Kind] = {k.name: k for k in (
    DIAGNOSTIC_REPORT, IMAGING_STUDY, PATIENT, SERVICE_REQUEST, APPOINTMENT)}
