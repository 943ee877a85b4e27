"""Write side of the index: turn a validated instance into patient, study, series, instance rows."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

from pydicom.dataset import Dataset
from sqlalchemy import (
    Integer,
    String,
    Table,
    bindparam,
    delete,
    func,
    insert,
    literal,
    select,
    text,
    update,
)
from sqlalchemy.orm import Session

from portal import failures
from portal.db import write_connection
from portal.index.models import (
    Instance,
    Order,
    OrderStudy,
    Patient,
    Series,
    Study,
    StudyReferrer,
)
from portal.index.referrers import referrer_keys

log = logging.getLogger(__name__)

# Elements never kept in the header JSON: pixel data is served from the file itself.
_PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009, 0xFFFAFFFA, 0xFFFCFFFC})
BULK_THRESHOLD = 4096


class IndexConflict(failures.Conflict):
    """The instance contradicts what the index already holds (e.g. another patient's study)."""


def _text(ds: Dataset, keyword: str, limit: int) -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    text = str(value).strip()
    return text[:limit]


def _date(ds: Dataset, keyword: str) -> str:
    """A DA value for the index: a legacy ``1997.04.24`` (ACR-NEMA, PS3.5 6.2) as
    ``19970424``, so it matches and sorts like any other; the header keeps it as stored."""
    text = _text(ds, keyword, 10)
    if len(text) == 10 and text[4] == text[7] == "." and text.replace(".", "").isdigit():
        return text.replace(".", "")
    return text[:8]


# The index's integer columns are 32-bit on PostgreSQL: a number past them (an Instance
# Number of 20 digits) is not indexed, and the file keeps it.
_INT_RANGE = range(-(1 << 31), 1 << 31)


def _int(ds: Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        number = None if value in (None, "") else int(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return number if number is None or number in _INT_RANGE else None


def _floats(ds: Dataset, keyword: str) -> list[float] | None:
    """The numbers of a DS or FD value; None when one of them is not a finite number (``nan``
    or ``inf`` written as a decimal string has no place in geometry or in JSON)."""
    try:
        value = ds.get(keyword)
        if value in (None, ""):
            return None
        if isinstance(value, str | bytes) or not hasattr(value, "__iter__"):
            numbers = [float(value)]
        else:
            numbers = [float(v) for v in value]
    except (TypeError, ValueError, OverflowError):
        return None
    return numbers if all(math.isfinite(n) for n in numbers) else None


def header_json(ds: Dataset) -> dict[str, Any]:
    """The data set as DICOM JSON (PS3.18 F.2) without pixel data or large binary values.

    Values are read as pydicom reads files, leniently: a decimal string one digit too long
    or a frame number written ``1.0`` (as scanners write them) is kept as it is. Only a
    value that cannot be converted at all is left out, with the top-level element that holds
    it (the whole sequence, when it is inside one). Not pydicom's
    ``suppress_invalid_tags``: it reads strictly, and one such value deep inside a sequence
    (a pixel spacing in the functional groups) dropped the whole sequence.
    """
    result: dict[str, Any] = {}
    # (pydicom's warnings of each value its VR would refuse: portal.quiet, for all threads)
    for tag in sorted(ds.keys()):
        if tag in _PIXEL_TAGS:
            continue
        try:
            # Large binary values are not kept; their presence is noted with an empty
            # BulkDataURI, which /metadata leaves out.
            result[f"{tag:08X}"] = ds[tag].to_json_dict(
                bulk_data_element_handler=lambda _e: "", bulk_data_threshold=BULK_THRESHOLD)
        except Exception as exc:  # any value that cannot be converted: leave it out
            log.warning("header: element %08X left out (%s)", tag, exc.__class__.__name__)
    finite: dict[str, Any] = _finite(result)
    return finite


def _finite(value: Any) -> Any:
    """``value`` with every ``nan`` or ``inf`` number (a decimal string may say so) made
    ``null``, as DICOM JSON writes an empty value (PS3.18 F.2.5): JSON has no such numbers,
    and a browser's JSON.parse refuses the whole answer over one of them."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite(item) for item in value]
    return value


def _get_patient(session: Session, ds: Dataset, study_uid: str) -> Patient:
    patient_id = _text(ds, "PatientID", 64)
    issuer = _text(ds, "IssuerOfPatientID", 64)
    if not patient_id:
        # No Patient ID: never merge such studies into one patient; key it by the study.
        issuer = f"~{study_uid}"
    patient = session.scalars(select(Patient).where(
        Patient.patient_id == patient_id, Patient.issuer_of_patient_id == issuer)).first()
    if patient is None:
        patient = Patient(patient_id=patient_id, issuer_of_patient_id=issuer,
                          patient_name=_text(ds, "PatientName", 324),
                          patient_birth_date=_date(ds, "PatientBirthDate"),
                          patient_sex=_text(ds, "PatientSex", 16))
        session.add(patient)
        session.flush()
    return patient


def _get_study(session: Session, ds: Dataset, study_uid: str) -> Study:
    study = session.scalars(select(Study).where(Study.study_instance_uid == study_uid)
                            .with_for_update()).first()
    patient = _get_patient(session, ds, study_uid)
    if study is None:
        study = Study(
            study_instance_uid=study_uid, patient_fk=patient.id,
            study_date=_date(ds, "StudyDate"), study_time=_text(ds, "StudyTime", 16),
            study_id=_text(ds, "StudyID", 16),
            study_description=_text(ds, "StudyDescription", 64),
            accession_number=_text(ds, "AccessionNumber", 64),
            referring_physician_name=_text(ds, "ReferringPhysicianName", 324),
            institution_name=_text(ds, "InstitutionName", 64),
            modalities_in_study="", number_of_series=0, number_of_instances=0)
        session.add(study)
        session.flush()
        for key in referrer_keys(ds):
            session.add(StudyReferrer(study_fk=study.id, key=key, study_date=study.study_date,
                                      study_time=study.study_time))
        _link_orders(session, study, patient)
    elif study.patient_fk != patient.id:
        raise IndexConflict("study already belongs to a different patient")
    return study


# The first key of pg_advisory_xact_lock(int, int) for matching orders and studies ("ordr").
ORDER_LOCK_SPACE = 0x6F726472


def _lock_accessions(session: Session, accessions: Iterable[str]) -> None:
    """Match orders and studies of one accession number one transaction at a time: an order
    and its study arriving together in two transactions would otherwise each miss the other
    (neither sees the other's uncommitted row). PostgreSQL: a transaction advisory lock per
    accession number, taken in sorted order; SQLite has one writer at a time anyway."""
    connection = session.connection()
    if connection.dialect.name != "postgresql":
        return
    for accession in sorted({a for a in accessions if a}):
        connection.execute(text("SELECT pg_advisory_xact_lock(:space, hashtext(:accession))"),
                           {"space": ORDER_LOCK_SPACE, "accession": accession})


def _link_orders(session: Session, study: Study, patient: Patient) -> None:
    """A new study: the orders that name it (its accession number and its patient's Patient
    ID) become referrer keys of it (``OrderStudy``), an order that came before its images."""
    if not study.accession_number:
        return
    _lock_accessions(session, [study.accession_number])
    session.execute(insert(OrderStudy).from_select(
        ["order_fk", "study_fk", "key", "study_date", "study_time"],
        select(Order.id, literal(study.id, Integer), Order.ordering_provider_key,
               literal(study.study_date, String), literal(study.study_time, String))
        .where(Order.accession_number == study.accession_number,
               Order.patient_id == patient.patient_id, Order.status != "cancelled",
               Order.ordering_provider_key != "")))


def resolve_order(session: Session, order: Order, *, was: Iterable[str] = ()) -> None:
    """After an order arrived or changed (flushed): the studies it names (same accession
    number, same Patient ID) are found once, here, and kept with its ordering provider's key
    (``OrderStudy``); a cancelled order, or one re-pointed to another accession number or
    patient, keeps none of its old ones. ``was``: the accession numbers it had before."""
    accession = order.accession_number or ""
    _lock_accessions(session, [accession, *was])
    session.execute(delete(OrderStudy).where(OrderStudy.order_fk == order.id))
    key = order.ordering_provider_key or ""
    if not accession or not key or order.status == "cancelled":
        return
    session.execute(insert(OrderStudy).from_select(
        ["order_fk", "study_fk", "key", "study_date", "study_time"],
        select(literal(order.id, Integer), Study.id, literal(key, String), Study.study_date,
               Study.study_time)
        .join(Patient, Patient.id == Study.patient_fk)
        .where(Study.accession_number == accession,
               Patient.patient_id == (order.patient_id or ""))))


def _get_series(session: Session, ds: Dataset, study: Study, series_uid: str) -> Series:
    series = session.scalars(select(Series).where(
        Series.series_instance_uid == series_uid)).first()
    if series is None:
        series = Series(series_instance_uid=series_uid, study_fk=study.id,
                        modality=_text(ds, "Modality", 16),
                        series_number=_int(ds, "SeriesNumber"),
                        series_description=_text(ds, "SeriesDescription", 64),
                        body_part_examined=_text(ds, "BodyPartExamined", 16),
                        series_date=_date(ds, "SeriesDate"), number_of_instances=0)
        session.add(series)
        session.flush()
        modalities = set(filter(None, study.modalities_in_study.split("\\")))
        if series.modality:
            modalities.add(series.modality)
        study.modalities_in_study = "\\".join(sorted(modalities))[:128]
        study.number_of_series += 1
    elif series.study_fk != study.id:
        raise IndexConflict("series already belongs to a different study")
    return series


# The statements of ingest's hot path, built once: an instance of a known series costs four
# statements, run with Core on the transaction's connection (``write_connection``). Built
# per call and run through the ORM they cost 2.1 ms per instance, ten times their SQL
# (benchmarks/README.md, "Ingest, one instance per request").
_SERIES, _STUDY = cast(Table, Series.__table__), cast(Table, Study.__table__)
_PATIENT = cast(Table, Patient.__table__)
_KNOWN_SERIES = (
    select(_SERIES.c.id, _STUDY.c.id, _STUDY.c.study_instance_uid,
           _PATIENT.c.patient_id, _PATIENT.c.issuer_of_patient_id)
    .join(_STUDY, _SERIES.c.study_fk == _STUDY.c.id)
    .join(_PATIENT, _STUDY.c.patient_fk == _PATIENT.c.id)
    .where(_SERIES.c.series_instance_uid == bindparam("series_uid")))
_ADD_INSTANCES = insert(cast(Table, Instance.__table__))
# Counters move with SQL increments so concurrent writers never lose one.
_COUNT_SERIES = (update(_SERIES).where(_SERIES.c.id == bindparam("b_id"))
                 .values(number_of_instances=_SERIES.c.number_of_instances + bindparam("b_n")))
_COUNT_STUDY = (update(_STUDY).where(_STUDY.c.id == bindparam("b_id"))
                .values(number_of_instances=_STUDY.c.number_of_instances + bindparam("b_n"),
                        updated_at=func.now()))


def _known_series(session: Session, ds: Dataset, study_uid: str,
                  series_uid: str) -> tuple[int, int] | None:
    """(series id, study id) when the series exists already, checking it fits (one query)."""
    row = session.connection().execute(_KNOWN_SERIES, {"series_uid": series_uid}).first()
    if row is None:
        return None
    series_id, study_id, known_study_uid, patient_id, issuer = row
    if known_study_uid != study_uid:
        raise IndexConflict("series already belongs to a different study")
    wanted_id = _text(ds, "PatientID", 64)
    wanted_issuer = _text(ds, "IssuerOfPatientID", 64) if wanted_id else f"~{study_uid}"
    if (patient_id, issuer) != (wanted_id, wanted_issuer):
        raise IndexConflict("study already belongs to a different patient")
    return series_id, study_id


@dataclass(frozen=True)
class NewInstance:
    """One validated instance to index: its parsed header, its UIDs and its instance row's
    values (``instance_values``: made where the file was parsed, e.g. on an ingest thread)."""

    dataset: Dataset
    study_uid: str
    series_uid: str
    values: dict[str, Any]


def add_instance(session: Session, ds: Dataset, *, sop_class_uid: str, sop_instance_uid: str,
                 study_uid: str, series_uid: str, transfer_syntax_uid: str) -> None:
    """Add one instance and the rows above it; the caller commits."""
    add_instances(session, [NewInstance(ds, study_uid, series_uid, instance_values(
        ds, sop_class_uid=sop_class_uid, sop_instance_uid=sop_instance_uid,
        transfer_syntax_uid=transfer_syntax_uid))])


def _patient_key(ds: Dataset, study_uid: str) -> tuple[str, str]:
    patient_id = _text(ds, "PatientID", 64)
    return patient_id, _text(ds, "IssuerOfPatientID", 64) if patient_id else f"~{study_uid}"


def instance_values(ds: Dataset, *, sop_class_uid: str, sop_instance_uid: str,
                    transfer_syntax_uid: str) -> dict[str, Any]:
    """The values of an instance's index row but its series."""
    return {
        "sop_instance_uid": sop_instance_uid, "sop_class_uid": sop_class_uid,
        "transfer_syntax_uid": transfer_syntax_uid,
        "instance_number": _int(ds, "InstanceNumber"),
        "number_of_frames": _int(ds, "NumberOfFrames") or 1,
        "rows": _int(ds, "Rows"), "columns": _int(ds, "Columns"),
        "samples_per_pixel": _int(ds, "SamplesPerPixel"),
        "bits_allocated": _int(ds, "BitsAllocated"),
        "photometric_interpretation": _text(ds, "PhotometricInterpretation", 16),
        "image_position_patient": _floats(ds, "ImagePositionPatient"),
        "image_orientation_patient": _floats(ds, "ImageOrientationPatient"),
        "pixel_spacing": _floats(ds, "PixelSpacing"),
        "slice_thickness": next(iter(_floats(ds, "SliceThickness") or []), None),
        "header": None}


def add_instances(session: Session, items: Sequence[NewInstance]) -> None:
    """Add instances and the rows above them with a few statements per series (one INSERT
    of all its instance rows, one increment of each counter); the caller commits.

    Every instance of a series must name the series' patient: one that names another raises
    ``IndexConflict`` (the caller then settles the instances one by one)."""
    by_series: dict[tuple[str, str], list[NewInstance]] = {}
    for item in items:
        by_series.setdefault((item.study_uid, item.series_uid), []).append(item)
    for (study_uid, series_uid), group in by_series.items():
        first = group[0].dataset
        wanted = _patient_key(first, study_uid)
        if any(_patient_key(item.dataset, study_uid) != wanted for item in group[1:]):
            raise IndexConflict("instances of one series name different patients")
        known = _known_series(session, first, study_uid, series_uid)
        if known is None:
            study = _get_study(session, first, study_uid)
            series = _get_series(session, first, study, series_uid)
            series_id, study_id = series.id, study.id
            # The increments below are Core: the loaded objects read them afresh when asked.
            session.expire(study, ["number_of_instances", "updated_at"])
            session.expire(series, ["number_of_instances"])
        else:
            series_id, study_id = known
        connection = write_connection(session)
        connection.execute(_ADD_INSTANCES, [{**item.values, "series_fk": series_id}
                                            for item in group])
        connection.execute(_COUNT_SERIES, {"b_id": series_id, "b_n": len(group)})
        connection.execute(_COUNT_STUDY, {"b_id": study_id, "b_n": len(group)})


def middle_image(session: Session, series_id: int) -> str | None:
    """The SOP Instance UID of a series' middle image (by instance number), or None.

    The series thumbnail, the pre-rendered image and the series' default window all use it.
    """
    uids = list(session.scalars(
        select(Instance.sop_instance_uid)
        .where(Instance.series_fk == series_id, Instance.rows.is_not(None))
        .order_by(Instance.instance_number, Instance.id)))
    return uids[len(uids) // 2] if uids else None
