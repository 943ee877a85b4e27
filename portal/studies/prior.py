"""The prior beside the current (issue 20 item 3): which earlier study of the same patient to
compare with, which series of each to show, and where each slice lies so that scrolling one
moves the other to the same place in the patient.

A prior is an earlier study of the same patient that this person may see (the access rules of
``patient_history``), of the same modality, and of the same body part when both studies name
one. The series shown is the one of that modality with most images (body part first).
Positions: Image Position Patient along the slice normal (PS3.3 C.7.6.2.1.1), in mm; two
series with the same Frame of Reference UID link by that position, others by the position
relative to each series' own first and last slice (``compare.js``), and series without
geometry by the slice number relative to the count.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from portal.access.principal import Principal
from portal.index.models import Instance, Series, Study
from portal.studies.service import patient_history, series_images, study_series

MAX_FRAMES = 2000
_FRAME_OF_REFERENCE = "00200052"


def _modalities(study: Study) -> set[str]:
    return {m for m in (study.modalities_in_study or "").split("\\") if m}


def _body_parts(session: Session, study: Study) -> set[str]:
    return {p.upper() for p in session.scalars(
        select(Series.body_part_examined).where(Series.study_fk == study.id)) if p}


def priors(session: Session, principal: Principal, study: Study) -> list[Study]:
    """Earlier studies of the patient, of a modality of this one (and its body part when
    both name one), that this principal may see, newest first."""
    modalities = _modalities(study) - {"SR", "KO", "PR", "DOC", "OT"}
    parts = _body_parts(session, study)
    found = []
    for earlier in patient_history(session, principal, study):
        if study.study_date and earlier.study_date and earlier.study_date > study.study_date:
            continue
        if not (modalities & _modalities(earlier)):
            continue
        theirs = _body_parts(session, earlier)
        if parts and theirs and not parts & theirs:
            continue
        found.append(earlier)
    return found


def main_series(session: Session, principal: Principal, study: Study, modality: str,
                body_parts: set[str]) -> Series | None:
    """The visible series of ``modality`` with most images, one of ``body_parts`` first."""
    candidates = [s for s in study_series(session, principal, study)
                  if s.modality == modality and s.number_of_instances > 0]
    candidates.sort(key=lambda s: (bool(body_parts) and
                                   (s.body_part_examined or "").upper() in body_parts,
                                   s.number_of_instances), reverse=True)
    return candidates[0] if candidates else None


def _normal(orientation: list[float] | None) -> list[float] | None:
    if not orientation or len(orientation) != 6:
        return None
    r, c = orientation[:3], orientation[3:]
    return [r[1] * c[2] - r[2] * c[1], r[2] * c[0] - r[0] * c[2], r[0] * c[1] - r[1] * c[0]]


def describe_pane(session: Session, series: Series, header: dict[str, Any]) -> dict[str, Any]:
    """One side of the comparison: its frames in order, each slice's position along the
    normal (None without geometry), the Frame of Reference, the size of the images."""
    images = [i for i in series_images(session, series) if i.rows]
    frames: list[list[Any]] = []
    positions: list[float | None] = []
    for instance in images:
        normal = _normal(instance.image_orientation_patient)
        position = instance.image_position_patient
        along = (sum(a * b for a, b in zip(normal, position, strict=True))
                 if normal and position and len(position) == 3 else None)
        for number in range(1, max(instance.number_of_frames, 1) + 1):
            frames.append([instance.sop_instance_uid, number])
            positions.append(along if instance.number_of_frames <= 1 else None)
    frames, positions = frames[:MAX_FRAMES], positions[:MAX_FRAMES]
    reference = ((header.get(_FRAME_OF_REFERENCE) or {}).get("Value") or [""])[0]
    middle = images[len(images) // 2] if images else None
    return {"study": series.study.study_instance_uid, "series": series.series_instance_uid,
            "modality": series.modality, "description": series.series_description,
            "frames": frames, "positions": positions if all(
                p is not None for p in positions) else None,
            "frameOfReference": str(reference),
            "rows": middle.rows if middle else None,
            "columns": middle.columns if middle else None}


def middle_uid(session: Session, series: Series) -> str | None:
    """The SOP Instance UID of the series' middle image (its header names the Frame of
    Reference)."""
    uids = list(session.scalars(select(Instance.sop_instance_uid)
                                .where(Instance.series_fk == series.id,
                                       Instance.rows.is_not(None))
                                .order_by(Instance.instance_number, Instance.id)))
    return uids[len(uids) // 2] if uids else None
