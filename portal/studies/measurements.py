"""Measurements that mean something (issue 20 item 4): region values from the stored pixels,
and measurements saved with the study as DICOM that other viewers read.

- ``POST .../instances/<sop>/frames/<n>/roi``: an ellipse or freehand region (image pixel
  coordinates, ``imaging/measure.py``) measured on the original pixels in the modality's units
  (HU for CT), with its area in mm² when the pixel spacing is known: ``calibration`` says
  ``patient`` (Pixel Spacing in the patient), ``detector`` (Imager Pixel Spacing only, PS3.3
  10.7.1.3: sizes are approximate, enlarged by the magnification) or ``none`` (areas in
  pixels). Access is checked like the frame's; a bad shape is a 400 with the reason.
- ``POST /studies/<study>/measurements``: the lengths, angles and regions a physician drew,
  saved as one Grayscale Softcopy Presentation State (PS3.3 A.33.1) made with highdicom and
  stored in the archive as a normal instance of the study, so QIDO-RS and WADO-RS list it and
  any viewer shows it. GSPS rather than an SR TID 1500 report: it carries the drawing itself
  (ellipse, polyline, the text beside it) on the exact image and frame, which is what other
  viewers draw again; a TID 1500 report carries numbers whose shapes many viewers do not show.
- ``GET /studies/<study>/series/<series>/measurements``: the presentation states of the
  study this person may read, as the shapes drawn on this series' images. A set saved here is
  its author's (``SavedMeasurements``, recorded when it is saved): it is shown to him, to the
  visitors of the share links he made, and to a colleague whose grant came from his sign-in
  link; not to another physician with a grant, nor in an office manager's viewer (they are
  told how many there are). A presentation state that came from elsewhere (the modality, the
  PACS) is the hospital's: shown to all who may see its series. The objects themselves stay
  instances of the study: DICOMweb, DIMSE and the study ZIP carry them like any other
  (docs/features.md, "Measurements").

Text is written as UTF-8 (Specific Character Set ``ISO_IR 192``, PS3.5 6.1.2.5.3): a note, a
name like "Müller" or a label reads back equal in any viewer, whatever the images' own set.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import highdicom as hd
import numpy as np
from flask import Blueprint, abort, current_app, jsonify, request
from flask.typing import ResponseReturnValue
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid
from sqlalchemy import func, insert, literal, or_, select

from portal.access.models import Grant
from portal.access.policy import (
    allowed,
    is_patient_user,
    require_instance,
    require_study,
    share_visible,
)
from portal.access.principal import Principal, current_principal
from portal.archive import current_archive
from portal.db import db
from portal.imaging.measure import measure_source, parse_shape
from portal.imaging.service import run_isolated
from portal.index.models import Instance, Series, Study
from portal.sharing.models import ShareLink
from portal.studies.models import SavedMeasurements
from portal.studies.service import key_images, study_series
from portal.studies.viewer import spacing_of

bp = Blueprint("measurements", __name__)

GSPS = "1.2.840.10008.5.1.4.1.1.11.1"
MAX_SAVED = 50  # measurements in one presentation state
MAX_TEXT = 64  # characters of the text beside a measurement (LO)
MAX_STATES = 20  # presentation states read for one series
MANUFACTURER = "Referrer portal"  # of the objects made here
UTF8 = "ISO_IR 192"  # Specific Character Set of what the portal writes (PS3.3 C.12.1.1.2)
KINDS = {"length": 2, "angle": 3, "ellipse": 2, "polygon": 0}  # points (0: 3 or more)


def _principal() -> Principal:
    principal = current_principal()
    assert principal is not None
    return principal


@bp.post("/studies/<study_uid>/series/<series_uid>/instances/<sop_uid>/frames/<int:frame>/roi")
@share_visible
def region(study_uid: str, series_uid: str, sop_uid: str, frame: int) -> ResponseReturnValue:
    """Area, mean, SD, minimum and maximum of a region of one frame, in the modality's units."""
    principal = _principal()
    instance = require_instance(db.session, principal, study_uid, series_uid, sop_uid)
    shape = parse_shape(request.get_json(silent=True))  # BadShape: 400 with the reason
    if not 1 <= frame <= max(instance.number_of_frames, 1):
        abort(404, f"frame {frame} is outside 1..{instance.number_of_frames}")
    archive = current_archive()
    spacing, source = spacing_of(instance, archive.header(sop_uid))
    values = run_isolated(measure_source, archive.locate(sop_uid), frame - 1, shape,
                          int(current_app.config["PORTAL"]["MAX_RENDER_PIXELS"]))
    answer: dict[str, Any] = {
        "pixels": values.pixels, "mean": values.mean, "sd": values.sd,
        "min": values.minimum, "max": values.maximum, "unit": values.unit,
        "calibration": {"patient": "patient", "detector": "detector"}.get(source, "none")}
    if spacing:
        answer["area"] = values.pixel_area * spacing[0] * spacing[1]
        answer["areaUnit"] = "mm2"
    else:
        answer["area"], answer["areaUnit"] = values.pixel_area, "px2"
    answer["approximate"] = answer["calibration"] == "detector"
    return jsonify(answer)


# -- saving as a Grayscale Softcopy Presentation State ---------------------------------------

def _checked(item: Any) -> tuple[str, int, str, np.ndarray, str]:
    """(sop, frame, kind, points as an n x 2 array, text) of one measurement, or a 400."""
    if not isinstance(item, dict):
        abort(400, "each measurement is an object with sop, frame, kind, points and text")
    sop, frame, kind, text = item.get("sop"), item.get("frame", 1), item.get("kind"), \
        item.get("text", "")
    if not isinstance(sop, str) or not sop or len(sop) > 64:
        abort(400, "sop must name an image of the study")
    if not isinstance(frame, int) or isinstance(frame, bool) or frame < 1:
        abort(400, "frame must be a number from 1")
    if kind not in KINDS:
        abort(400, f"kind must be one of {', '.join(KINDS)}")
    if not isinstance(text, str) or len(text) > MAX_TEXT:
        abort(400, f"text must be at most {MAX_TEXT} characters")
    points = parse_shape({"kind": "polygon" if kind == "polygon" else "ellipse",
                          "points": item.get("points")}) if kind in ("ellipse", "polygon") \
        else None
    raw = item.get("points")
    if points is None:
        if not isinstance(raw, list) or len(raw) != KINDS[kind] or not all(
                isinstance(p, list) and len(p) == 2 and all(
                    isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
                    for v in p) for p in raw):
            abort(400, f"a {kind} has {KINDS[kind]} points [x, y]")
        array = np.array(raw, dtype=float)
    else:
        array = np.array(points.points, dtype=float)
    return sop, frame, kind, array, text


def _graphic(kind: str, points: np.ndarray) -> hd.pr.GraphicObject:
    """The shape as a GSPS graphic object in PIXEL units (the top-left corner of the image
    is 0.0\\0.0, PS3.3 C.10.5.1.2, as in the viewer): an axis-aligned ellipse by the ends of
    its axes, a region as a closed polyline, a length or an angle as an open one."""
    if kind == "ellipse":
        (x0, y0), (x1, y1) = points
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        data = np.array([[min(x0, x1), cy], [max(x0, x1), cy],
                         [cx, min(y0, y1)], [cx, max(y0, y1)]])
        return hd.pr.GraphicObject("ELLIPSE", data, "PIXEL")
    if kind == "polygon":
        return hd.pr.GraphicObject("POLYLINE", np.vstack([points, points[:1]]), "PIXEL")
    return hd.pr.GraphicObject("POLYLINE", points, "PIXEL")


def _creator(principal: Principal) -> str:
    """The person's name as he writes it, as one component (the trailing caret says so,
    PS3.5 6.2.1.2): the portal does not know which part is the family name."""
    name = (principal.name or principal.subject or "unknown")[:63]
    return name.replace("\\", " ").replace("^", " ").replace("=", " ") + "^"


@bp.post("/studies/<study_uid>/measurements")
def save(study_uid: str) -> ResponseReturnValue:
    """Store the measurements as one presentation state of the study (201 with its UID)."""
    principal = _principal()
    if principal.kind != "user" or is_patient_user(principal):
        abort(403, "only the physicians who read the study save measurements with it")
    study = require_study(db.session, principal, study_uid)
    body = request.get_json(silent=True)
    items = body.get("measurements") if isinstance(body, dict) else None
    if not isinstance(items, list) or not 1 <= len(items) <= MAX_SAVED:
        abort(400, f"measurements must be a list of 1 to {MAX_SAVED}")
    checked = [_checked(item) for item in items]
    uids = sorted({sop for sop, *_rest in checked})
    images = {i.sop_instance_uid: i for i in db.session.scalars(
        select(Instance).join(Series, Instance.series_fk == Series.id)
        .where(Series.id.in_([s.id for s in study_series(db.session, principal, study)]),
               Instance.sop_instance_uid.in_(uids), Instance.rows.is_not(None)))}
    missing = [uid for uid in uids if uid not in images]
    if missing:
        abort(400, f"no image {missing[0]} in this study")
    archive = current_archive()
    headers = {uid: dcmread(io.BytesIO(archive.read(uid)), stop_before_pixels=True)
               for uid in uids}
    with _refused_as_bad_input("measurements"):
        layer = hd.pr.GraphicLayer(layer_name="MEASUREMENTS", order=1,
                                   description="Measurements made in the referrer portal")
        annotations = []
        for sop, frame, kind, points, text in checked:
            if frame > max(images[sop].number_of_frames, 1):
                abort(400, f"image {sop} has no frame {frame}")
            texts = [hd.pr.TextObject(text, "PIXEL", anchor_point=(float(points[:, 0].max()),
                                                                   float(points[:, 1].min())))
                     ] if text else []
            multi = images[sop].number_of_frames > 1
            annotations.append(hd.pr.GraphicAnnotation(
                referenced_images=[headers[sop]], graphic_layer=layer,
                referenced_frame_number=frame if multi else None,
                graphic_objects=[_graphic(kind, points)], text_objects=texts))
        now = datetime.now(UTC)
        state = hd.pr.GrayscaleSoftcopyPresentationState(
            referenced_images=[headers[uid] for uid in uids],
            series_instance_uid=generate_uid(), series_number=9900,
            sop_instance_uid=generate_uid(), instance_number=1,
            manufacturer=MANUFACTURER, manufacturer_model_name="referrer-portal",
            software_versions="1", device_serial_number="portal",
            content_label="MEASUREMENTS", content_description="Measurements",
            graphic_annotations=annotations, graphic_layers=[layer],
            content_creator_name=_creator(principal), specific_character_set=UTF8)
        state.PresentationCreationDate, state.PresentationCreationTime = \
            now.strftime("%Y%m%d"), now.strftime("%H%M%S")
        state.SeriesDescription = "Measurements"
        out = io.BytesIO()
        state.save_as(out, enforce_file_format=True)
    archive.ingest(out.getvalue(), who=principal.audit_name,
                   source_address=request.remote_addr or "")
    # Its author, in the request's unit of work: should that fail after the ingest, the
    # object has no author and, being the portal's own, is shown to nobody (fail closed).
    # One statement: a write ends an older SQLite read snapshot first (db.py), so it sees
    # the instance the ingest has just committed in its own transaction.
    db.session.execute(insert(SavedMeasurements).from_select(
        ["instance_fk", "author_fk"],
        select(Instance.id, literal(principal.id)).where(
            Instance.sop_instance_uid == str(state.SOPInstanceUID))))
    return jsonify({"sop": str(state.SOPInstanceUID), "saved": len(checked)}), 201


@contextmanager
def _refused_as_bad_input(what: str) -> Iterator[None]:
    """highdicom refuses images it cannot annotate (colour, mixed rescale, no Study ID...)
    with ValueError and the like: the answer is a 400 with its reason, never a 500."""
    try:
        yield
    except (ValueError, AttributeError, TypeError) as exc:
        abort(400, f"these images cannot carry {what}: {str(exc)[:200]}")


# -- key images -------------------------------------------------------------------------------

@bp.post("/studies/<study_uid>/key-images")
def mark_key_image(study_uid: str) -> ResponseReturnValue:
    """Flag an image as a key image: a new Key Object Selection document (PS3.3 A.35.4,
    "Of Interest") naming it and the images flagged before, stored as an instance of the
    study; the study page shows its images first to those the study is shared with."""
    principal = _principal()
    if principal.kind != "user" or is_patient_user(principal):
        abort(403, "only the physicians who read the study mark key images")
    study = require_study(db.session, principal, study_uid)
    body = request.get_json(silent=True)
    sop = body.get("sop") if isinstance(body, dict) else None
    if not isinstance(sop, str) or not sop or len(sop) > 64:
        abort(400, "sop must name an image of the study")
    visible = [s.id for s in study_series(db.session, principal, study)]
    found = db.session.scalars(select(Instance).where(
        Instance.series_fk.in_(visible), Instance.sop_instance_uid == sop,
        Instance.rows.is_not(None))).first()
    if found is None:
        abort(400, "no such image in this study")
    archive = current_archive()
    flagged = [i.sop_instance_uid for i, _s in key_images(db.session, principal, study,
                                                          archive.read)]
    uids = [*dict.fromkeys([*flagged, sop])][:MAX_SAVED]
    evidence = [dcmread(io.BytesIO(archive.read(uid)), stop_before_pixels=True)
                for uid in uids]
    with _refused_as_bad_input("key image marks"):
        document = hd.ko.KeyObjectSelectionDocument(
            evidence=evidence,
            content=hd.ko.KeyObjectSelection(
                document_title=codes.DCM.OfInterest, referenced_objects=evidence,
                observer_person_context=hd.sr.ObserverContext(
                    observer_type=codes.DCM.Person,
                    observer_identifying_attributes=hd.sr.PersonObserverIdentifyingAttributes(
                        name=_creator(principal))),
                description="Key images marked in the referrer portal"),
            series_instance_uid=generate_uid(), series_number=9901,
            sop_instance_uid=generate_uid(), instance_number=1, manufacturer=MANUFACTURER,
            specific_character_set=UTF8)
        document.SeriesDescription = "Key images"
        out = io.BytesIO()
        document.save_as(out, enforce_file_format=True)
    archive.ingest(out.getvalue(), who=principal.audit_name,
                   source_address=request.remote_addr or "")
    return jsonify({"sop": str(document.SOPInstanceUID), "flagged": uids}), 201


# -- reading them back ------------------------------------------------------------------------

def _shape_of(graphic: Dataset) -> tuple[str, list[list[float]]] | None:
    """(kind, points) of a GSPS graphic object in PIXEL units, or None for another one."""
    if str(graphic.get("GraphicAnnotationUnits", "")) != "PIXEL":
        return None
    data = [float(v) for v in graphic.get("GraphicData", [])]
    points = [[data[i], data[i + 1]] for i in range(0, len(data) - 1, 2)]
    kind = str(graphic.get("GraphicType", ""))
    if kind == "ELLIPSE" and len(points) == 4:
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        return "ellipse", [[min(xs), min(ys)], [max(xs), max(ys)]]
    if kind == "POLYLINE" and len(points) >= 4 and points[0] == points[-1]:
        return "polygon", points[:-1]
    if kind == "POLYLINE" and len(points) in (2, 3):
        return ("length" if len(points) == 2 else "angle"), points
    return None


def read_state(ds: Dataset, wanted: set[str]) -> list[dict[str, Any]]:
    """The measurements of a presentation state drawn on the images in ``wanted``."""
    found = []
    author = str(ds.get("ContentCreatorName", "") or "").replace("^", " ").strip()
    for annotation in ds.get("GraphicAnnotationSequence", []):
        refs = [(str(r.ReferencedSOPInstanceUID), r.get("ReferencedFrameNumber"))
                for r in annotation.get("ReferencedImageSequence", [])]
        texts = [str(t.get("UnformattedTextValue", ""))
                 for t in annotation.get("TextObjectSequence", [])]
        for graphic in annotation.get("GraphicObjectSequence", []):
            shape = _shape_of(graphic)
            if shape is None:
                continue
            for sop, frames in refs:
                if sop not in wanted:
                    continue
                numbers = [1] if frames is None else [int(frames)] \
                    if isinstance(frames, int) else [int(f) for f in frames]
                for number in numbers:
                    found.append({"sop": sop, "frame": number, "kind": shape[0],
                                  "points": shape[1], "text": " ".join(texts)[:200],
                                  "author": author, "state": str(ds.SOPInstanceUID)})
    return found


def _authors(principal: Principal, study: Study) -> set[int]:
    """The people whose saved measurements of ``study`` this principal sees: himself; a
    share visitor, the maker of his link; a colleague, also the makers of the sign-in links
    his live grants on the study came from (sharing/service.py ``claim_for_colleague``)."""
    if principal.kind == "share":
        link = db.session.get(ShareLink, principal.id)
        return {link.created_by_fk} if link is not None and link.created_by_fk is not None \
            else set()
    if principal.kind != "user":
        return set()
    now = datetime.now(UTC)
    links = [who.removeprefix("share:") for who in db.session.scalars(
        select(Grant.granted_by).where(
            Grant.user_fk == principal.id, Grant.study_instance_uid == study.study_instance_uid,
            Grant.revoked_at.is_(None), Grant.granted_by.startswith("share:"),
            or_(Grant.expires_at.is_(None), Grant.expires_at > now)))]
    makers = set(db.session.scalars(select(ShareLink.created_by_fk).where(
        ShareLink.public_id.in_(links), ShareLink.created_by_fk.is_not(None)))) if links \
        else set()
    return {principal.id, *(m for m in makers if m is not None)}


@bp.get("/studies/<study_uid>/series/<series_uid>/measurements")
@share_visible
def saved(study_uid: str, series_uid: str) -> ResponseReturnValue:
    """The saved measurements drawn on this series' images (newest presentation state last),
    and for an office manager how many sets saved by others are not shown (``withheld``)."""
    principal = _principal()
    study = require_study(db.session, principal, study_uid)
    visible = study_series(db.session, principal, study)
    series = next((s for s in visible if s.series_instance_uid == series_uid), None)
    if series is None:
        abort(404, "no such series")
    wanted = set(db.session.scalars(select(Instance.sop_instance_uid)
                                    .where(Instance.series_fk == series.id)))
    authors = _authors(principal, study)
    of_study = select(SavedMeasurements.instance_fk).join(
        Instance, Instance.id == SavedMeasurements.instance_fk).join(
        Series, Series.id == Instance.series_fk).where(Series.study_fk == study.id)
    theirs = of_study.where(SavedMeasurements.author_fk.in_(authors))
    rows = list(db.session.execute(
        select(Instance.sop_instance_uid, Instance.id.in_(theirs))
        .join(Series, Series.id == Instance.series_fk)
        .where(Series.study_fk == study.id, Instance.sop_class_uid == GSPS,
               or_(Instance.id.in_(theirs),  # in its own series
                   Instance.series_fk.in_([s.id for s in visible])
                   & Instance.id.not_in(of_study)))
        .order_by(Instance.id.desc()).limit(MAX_STATES)))[::-1]  # the newest, oldest first
    states = [uid for uid, _theirs in rows]
    shown = {uid for uid, mine in rows if mine}
    archive = current_archive()
    found: list[dict[str, Any]] = []
    for uid in states:
        try:
            ds = dcmread(io.BytesIO(archive.read(uid)), stop_before_pixels=True)
            if uid not in shown and str(ds.get("Manufacturer", "")) == MANUFACTURER:
                continue  # the portal's own without an author: shown to nobody
            found += read_state(ds, wanted)
        except (OSError, KeyError, ValueError, AttributeError, TypeError):
            continue  # an unreadable presentation state hides its marks, never the images
    answer: dict[str, Any] = {"measurements": found}
    if allowed(principal, "console"):  # office managers manage; they do not read images
        answer["withheld"] = db.session.scalar(
            select(func.count()).select_from(of_study.where(
                SavedMeasurements.author_fk.not_in(authors)).subquery())) or 0
    return jsonify(answer), 200, {"Cache-Control": "private, no-store"}
