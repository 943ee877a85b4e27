"""The portal's DICOMweb API (PS3.18): QIDO-RS, WADO-RS, STOW-RS; every answer access-filtered."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from functools import partial
from typing import Any
from urllib.parse import quote

from flask import (
    Blueprint,
    Response,
    abort,
    g,
    request,
    stream_with_context,
    url_for,
)
from flask import session as browser_session
from sqlalchemy import select

from portal import audit, failures, multipart
from portal.access import policy
from portal.access.principal import Principal, current_principal
from portal.archive import current_archive
from portal.archive.ingest import Archive
from portal.archive.store import CorruptObject, StoredFile
from portal.db import db
from portal.dicomweb import bulkdata, frames, qido, signed, stow, transcode, transfer
from portal.dicomweb.accept import parse_accept
from portal.errors import error_response
from portal.imaging.prerender import build_volume_soon, volume_failure
from portal.imaging.render import RenderRefused
from portal.imaging.render3d import Turn
from portal.imaging.rendition import Rendition
from portal.imaging.service import (
    RenderedImage,
    prepare_volume,
    rendered_frames,
    rendered_image,
    run_isolated,
    turned_image,
    volume_files,
    volume_image,
    volume_sources,
)
from portal.imaging.volume import VIEWS, NotAVolume, not_in_3d
from portal.index.models import Instance, Series, Study

# A share-link visitor reads the studies of his link through every GET here (the policy
# filters what each returns); the whole-file reads below are also marked @download.
bp = policy.share_reads(Blueprint("dicomweb", __name__, url_prefix="/dicomweb"))
log = logging.getLogger(__name__)

DICOM_JSON = "application/dicom+json"


def _principal() -> Principal:
    principal = current_principal()
    assert principal is not None  # the default-deny hook guarantees it
    return principal


def _json(payload: Any, status: int = 200, warnings: list[str] | None = None) -> Response:
    response = Response(json.dumps(payload, separators=(",", ":")), status=status,
                        mimetype=DICOM_JSON)
    for text in warnings or []:
        stow.add_warning(response, text)
    return response


_JSON_TYPES = frozenset({"*/*", "application/*", DICOM_JSON, "application/json"})


def _accepts_json() -> None:
    """406 unless the Accept header allows DICOM JSON (the only encoding offered here)."""
    ranges = parse_accept(request.headers.get("Accept", ""))
    if ranges and not any(r.media_type in _JSON_TYPES for r in ranges):
        abort(406, f"this resource is available as {DICOM_JSON} only")


# -- QIDO-RS ---------------------------------------------------------------------------------

def _search(level: qido.Level, scope: list[Any]) -> Response:
    principal = _principal()
    _accepts_json()
    query = qido.parse_query(request.args.to_dict(flat=False), level)  # QueryError: 400
    if level != "study":
        scope = [*scope, policy.series_filter(principal)]
    if level == "instance":
        scope = [*scope, policy.instance_filter(principal)]
    stmt = qido.build_select(level, query, policy.study_filter(principal), scope)
    session = db.session
    # The headers standing for each row: matching on attributes the index does not hold,
    # and the attributes answered from a representative header.
    headers = qido.RowHeaders(session, level, current_archive().headers,
                              policy.instance_filter(principal))
    rows = qido.fetch(session, stmt, query, headers)  # QueryError: 400 with the reason
    if not rows and level == "study" and current_archive().remote is not None:
        from portal.archive.sync import sync_on_miss

        if sync_on_miss(current_archive(), request.args.to_dict(flat=False)):
            session.rollback()  # read-only so far: end the snapshot to see the new rows
            rows = qido.fetch(session, stmt, query, headers)
    audit.record(db, audit.QUERY, action="E", outcome=audit.OUTCOME_SUCCESS,
                 who=principal.audit_name, source_address=request.remote_addr or "",
                 details={"level": level, "results": len(rows),
                          "keys": sorted(k for k in request.args if k not in (
                              "limit", "offset", "includefield"))[:20]})

    def retrieve_url(row: Any) -> str:
        if level == "study":
            return url_for("dicomweb.retrieve_study", study=row[0].study_instance_uid,
                           _external=True)
        if level == "series":
            return url_for("dicomweb.retrieve_series", study=row[1].study_instance_uid,
                           series=row[0].series_instance_uid, _external=True)
        return url_for("dicomweb.retrieve_instance", study=row[2].study_instance_uid,
                       series=row[1].series_instance_uid, instance=row[0].sop_instance_uid,
                       _external=True)

    payload = qido.to_json(level, rows, query, retrieve_url, headers.representative)
    if not payload and not query.warnings:
        return Response(status=204)
    return _json(payload, warnings=query.warnings)


@bp.get("/studies")
def search_studies() -> Response:
    """QIDO-RS: search for studies."""
    return _search("study", [])


@bp.get("/series")
def search_all_series() -> Response:
    """QIDO-RS: search for series in every visible study."""
    return _search("series", [])


@bp.get("/studies/<study>/series")
def search_series(study: str) -> Response:
    """QIDO-RS: search for series of one study."""
    policy.require_study(db.session, _principal(), study)
    return _search("series", [Study.study_instance_uid == study])


@bp.get("/instances")
def search_all_instances() -> Response:
    """QIDO-RS: search for instances in every visible study."""
    return _search("instance", [])


@bp.get("/studies/<study>/instances")
def search_study_instances(study: str) -> Response:
    """QIDO-RS: search for instances of one study."""
    policy.require_study(db.session, _principal(), study)
    return _search("instance", [Study.study_instance_uid == study])


@bp.get("/studies/<study>/series/<series>/instances")
def search_instances(study: str, series: str) -> Response:
    """QIDO-RS: search for instances of one series."""
    policy.require_series(db.session, _principal(), study, series)
    return _search("instance", [Study.study_instance_uid == study,
                                Series.series_instance_uid == series])


# -- WADO-RS ---------------------------------------------------------------------------------

def _audit_read(study: Study, what: str) -> None:
    """Start recording the read (one record per study per session); ``_reads_recorded``
    waits for the record before anything is sent."""
    principal = _principal()
    seen: set[str] | None = None
    if principal.via == "session":
        seen = set(browser_session.get("audited_studies", []))
    pending = audit.record_study_read(db, who=principal.audit_name,
                                      study_instance_uid=study.study_instance_uid,
                                      patient_id=study.patient.patient_id,
                                      source_address=request.remote_addr or "", seen=seen,
                                      what=what)
    if pending is None:
        return
    g.setdefault("audit_writes", []).append(
        (pending, study.study_instance_uid if seen is not None else None))
    if seen is not None:
        browser_session["audited_studies"] = sorted(seen)[-500:]


AUDIT_WAIT_SECONDS = 30.0


@bp.after_request
def _reads_recorded(response: Response) -> Response:
    """Fail closed: nothing leaves before its read record is committed (docs/security.md 12, 40).

    The record is written while the images are read or rendered; here the answer waits for
    it, and becomes a 503 without any patient data when it could not be written.
    """
    failed = False
    for pending, study_uid in g.pop("audit_writes", []):
        try:
            pending.result(timeout=AUDIT_WAIT_SECONDS)
        except Exception:  # any failure to record means serving nothing
            log.exception("the read could not be recorded in the audit trail")
            failed = True
            if study_uid is not None:
                browser_session["audited_studies"] = [
                    uid for uid in browser_session.get("audited_studies", [])
                    if uid != study_uid]
    if not failed:
        return response
    response.close()  # a streamed body is never started
    return error_response(503, "the audit trail is unavailable; try again shortly",
                          {"Retry-After": "5"})


def _instances_of(study: str, series: str | None = None,
                  instance: str | None = None) -> list[Instance]:
    session, principal = db.session, _principal()
    if instance is not None and series is not None:
        found_instance = policy.require_instance(session, principal, study, series, instance)
        _audit_read(found_instance.series.study, "instance")
        return [found_instance]
    if series is not None:
        found = policy.require_series(session, principal, study, series)
        _audit_read(found.study, "series")
        stmt = select(Instance).where(Instance.series_fk == found.id)
    else:
        found_study = policy.require_study(session, principal, study)
        _audit_read(found_study, "study")
        stmt = (select(Instance).join(Series, Instance.series_fk == Series.id)
                .where(Series.study_fk == found_study.id))
    return list(session.scalars(stmt.where(policy.instance_filter(principal))
                                .order_by(Instance.series_fk, Instance.instance_number,
                                          Instance.id)))


SPILL_OVER = 32 << 20  # a re-encoded instance larger than this comes back through a file


class _NotConverted(failures.NotAcceptable):
    """An instance asked for in Explicit VR Little Endian could not be re-encoded (406, the
    reason naming why and how to ask for it as stored)."""

    def __init__(self, why: str) -> None:
        super().__init__(f"the instance cannot be sent as {transcode.EXPLICIT_LE} ({why}); ask "
                         "with transfer-syntax=* for it as stored")


def _representations(instances: list[Instance]) -> list[transfer.Representation]:
    """The transfer syntax of each instance (PS3.18 8.7.8); 406 with the reason when the
    Accept header leaves one of them without any."""
    ranges = parse_accept(request.headers.get("Accept", ""))
    chosen = []
    for instance in instances:
        found = transfer.representation(ranges, instance)
        if found is None:
            abort(406, transfer.refusal(ranges, instance))
        chosen.append(found)
    return chosen


def _instance_part(archive: Archive, instance: Instance, chosen: transfer.Representation,
                   ) -> tuple[str, bytes | multipart.FilePart]:
    """One instance as a part in its chosen transfer syntax, named in its Content-Type."""
    uid = instance.sop_instance_uid
    if chosen.convert:
        try:
            done: transcode.Transcoded = run_isolated(
                transcode.explicit_little_endian, archive.locate(uid), str(archive.store.tmp),
                SPILL_OVER)
        except RenderRefused as exc:
            if chosen.strict:
                raise _NotConverted(str(exc)) from exc
            # By default the instance still goes, as stored; its part says in which syntax.
            log.warning("an instance is sent as stored (%s): %s",
                        instance.transfer_syntax_uid, exc)
            chosen = transfer.Representation(instance.transfer_syntax_uid)
        else:
            payload = multipart.FilePart(done.path, done.size) if done.path else done.data
            return f"{transfer.DICOM}; transfer-syntax={chosen.syntax}", payload
    return f"{transfer.DICOM}; transfer-syntax={chosen.syntax}", archive.read(uid)


def _one_syntax(chosen: list[transfer.Representation], first: str) -> str | None:
    """The transfer syntax of every part, when it is known before they are all made."""
    if len(chosen) == 1:
        return first.partition("transfer-syntax=")[2]
    syntaxes = {c.syntax for c in chosen}
    if len(syntaxes) == 1 and not any(c.convert and not c.strict for c in chosen):
        return syntaxes.pop()
    return None


def _retrieve(instances: list[Instance], *, one: bool = False) -> Response:
    """The instances as multipart/related; ``one`` instance asked for as bare
    ``application/dicom`` is answered as a single part (``_single_part``)."""
    chosen = _representations(instances)
    if one and chosen[0].bare:
        return _single_part(instances[0], chosen[0])
    archive = current_archive()
    uids = [i.sop_instance_uid for i in instances]
    if archive.remote is not None:
        archive.locate_many(uids)  # fetch external instances before answering: never a cut stream
    boundary = multipart.new_boundary()
    spilled: list[multipart.FilePart] = []

    def parts() -> Iterator[tuple[str, bytes | multipart.FilePart]]:
        for instance, representation in zip(instances, chosen, strict=True):
            try:
                part = _instance_part(archive, instance, representation)
            except CorruptObject:
                # Never serve a file that fails its hash; cut the response short.
                raise RuntimeError("stored object failed its integrity check") from None
            if isinstance(part[1], multipart.FilePart):
                spilled.append(part[1])
            yield part

    # Make the first part before answering, so a failure there is a clean error.
    first: list[tuple[str, bytes | multipart.FilePart]] = []
    iterator = parts()
    try:
        first.append(next(iterator))
    except StopIteration:
        abort(404, "no instances")
    except RuntimeError:
        abort(500, "a stored object failed its integrity check; it has been reported")

    def body() -> Iterator[bytes]:
        yield from multipart.stream_parts([*first, *iterator], boundary)

    syntax = _one_syntax(chosen, first[0][0])
    response = Response(stream_with_context(body()), status=200, headers={
        "Content-Type": f'multipart/related; type="{transfer.DICOM}"'
                        + (f"; transfer-syntax={syntax}" if syntax else "")
                        + f"; boundary={boundary}",
        "Cache-Control": "private, no-store"})

    def discard_spilled() -> None:
        for part in spilled:  # a re-encoded instance kept in a file, however the answer ends
            part.discard()

    response.call_on_close(discard_spilled)
    return response


@bp.get("/studies/<study>")
@policy.download
def retrieve_study(study: str) -> Response:
    """WADO-RS: every instance of a study."""
    return _retrieve(_instances_of(study))


@bp.get("/studies/<study>/series/<series>")
@policy.download
def retrieve_series(study: str, series: str) -> Response:
    """WADO-RS: every instance of a series."""
    return _retrieve(_instances_of(study, series))


@bp.get("/studies/<study>/series/<series>/instances/<instance>")
@policy.download
def retrieve_instance(study: str, series: str, instance: str) -> Response:
    """WADO-RS: one instance."""
    return _retrieve(_instances_of(study, series, instance), one=True)


def _single_part(instance: Instance, chosen: transfer.Representation) -> Response:
    """One instance as the body itself: ``Content-Type: application/dicom`` with its transfer
    syntax, for a client that asked for ``application/dicom`` and not for multipart."""
    archive = current_archive()
    if archive.remote is not None:
        archive.locate_many([instance.sop_instance_uid])
    # A file failing its hash is CorruptObject: a 500 from portal/errors.py, nothing sent.
    content_type, payload = _instance_part(archive, instance, chosen)
    headers = {"Content-Type": content_type, "Content-Length": str(len(payload)),
               "Cache-Control": "private, no-store"}
    if isinstance(payload, multipart.FilePart):
        answer = Response(stream_with_context(payload.chunks()), status=200, headers=headers)
        answer.call_on_close(payload.discard)
        return answer
    return Response(payload, status=200, headers=headers)


def _metadata(instances: list[Instance]) -> Response:
    _accepts_json()
    headers = current_archive().headers([i.sop_instance_uid for i in instances])
    payload = []
    for instance, header in zip(instances, headers, strict=True):
        base = url_for("dicomweb.retrieve_instance",
                       study=instance.series.study.study_instance_uid,
                       series=instance.series.series_instance_uid,
                       instance=instance.sop_instance_uid, _external=True) + "/bulkdata/"
        payload.append(bulkdata.with_bulkdata_uris(header, base, instance))
    return _json(payload)


@bp.get("/studies/<study>/metadata")
def study_metadata(study: str) -> Response:
    """WADO-RS: metadata of every instance of a study (DICOM JSON)."""
    return _metadata(_instances_of(study))


@bp.get("/studies/<study>/series/<series>/metadata")
def series_metadata(study: str, series: str) -> Response:
    """WADO-RS: metadata of every instance of a series."""
    return _metadata(_instances_of(study, series))


@bp.get("/studies/<study>/series/<series>/instances/<instance>/metadata")
def instance_metadata(study: str, series: str, instance: str) -> Response:
    """WADO-RS: metadata of one instance."""
    return _metadata(_instances_of(study, series, instance))


@bp.get("/studies/<study>/series/<series>/instances/<instance>/frames/<frame_list>")
@policy.download
def retrieve_frames(study: str, series: str, instance: str, frame_list: str) -> Response:
    """WADO-RS: pixel data of frames (1-based, comma separated)."""
    found = _instances_of(study, series, instance)[0]
    try:
        numbers = frames.parse_frame_list(frame_list, found.number_of_frames)
    except ValueError as exc:
        abort(400, str(exc))
    stored = current_archive().locate(found.sop_instance_uid)
    syntax = found.transfer_syntax_uid  # as indexed at ingest: no read to negotiate
    # No rows indexed: a report, a waveform (or known from an external archive's listing).
    parsed = frames.read_dataset(stored.read()) if not syntax or found.rows is None else None
    if parsed is not None and "PixelData" not in parsed:
        abort(404, "this instance holds no image, so it has no frames")
    if parsed is not None:
        syntax = str(parsed.file_meta.TransferSyntaxUID)
    try:
        content_type, payloads = frames.negotiate_and_extract(
            lambda: parsed if parsed is not None else frames.read_dataset(stored.read()),
            syntax, numbers,
            request.headers.get("Accept", ""),
            partial(run_isolated, transcode.native_frames, stored))
    except RenderRefused as exc:  # 406 here (not the 422 of a rendered image): ask as stored
        abort(406, f"the frames cannot be decoded ({exc}); ask with transfer-syntax=* for "
                   "them as stored")
    boundary = multipart.new_boundary()
    body = b"".join(multipart.stream_parts([(content_type, p) for p in payloads], boundary))
    return Response(body, headers={
        "Content-Type": _multipart_type(content_type, boundary),
        "Cache-Control": "private, no-store"})


def _multipart_type(part_type: str, boundary: str) -> str:
    """``multipart/related`` of parts of ``part_type``, its transfer syntax named too."""
    media, _, parameters = part_type.partition(";")
    syntax = parameters.strip()
    return (f'multipart/related; type="{media}"' + (f"; {syntax}" if syntax else "")
            + f"; boundary={boundary}")


@bp.get("/studies/<study>/series/<series>/instances/<instance>/bulkdata/<path:tag_path>")
@policy.download
def retrieve_bulkdata(study: str, series: str, instance: str, tag_path: str) -> Response:
    """WADO-RS bulkdata: the value a metadata BulkDataURI names (pixel data as frames)."""
    found = _instances_of(study, series, instance)[0]
    try:
        path = bulkdata.parse_path(tag_path)
    except ValueError as exc:
        abort(404, str(exc))
    stored = current_archive().locate(found.sop_instance_uid)
    try:
        parts = bulkdata.extract(stored.read(), path, request.headers.get("Accept", ""),
                                 partial(run_isolated, transcode.native_frames, stored))
    except KeyError as exc:
        abort(404, str(exc.args[0]) if exc.args else "no such bulk data")
    except RenderRefused as exc:  # 406 here (not the 422 of a rendered image): ask as stored
        abort(406, f"the pixel data cannot be decoded ({exc}); ask with transfer-syntax=* for "
                   "it as stored")
    if parts.single:
        content_type, payload = parts.items[0]
        return Response(payload, headers={"Content-Type": content_type,
                                          "Cache-Control": "private, no-store"})
    boundary = multipart.new_boundary()
    body = b"".join(multipart.stream_parts(parts.items, boundary))
    return Response(body, headers={
        "Content-Type": _multipart_type(parts.items[0][0], boundary),
        "Cache-Control": "private, no-store"})


# -- STOW-RS ---------------------------------------------------------------------------------

@bp.post("/studies")
def store_instances() -> Response:
    """STOW-RS: store instances (multipart/related; type="application/dicom")."""
    return stow.store_request(_principal(), None)


@bp.post("/studies/<study>")
def store_study_instances(study: str) -> Response:
    """STOW-RS: store instances that must belong to the named study."""
    return stow.store_request(_principal(), study)


# -- rendered and thumbnail (PS3.18 8.3.5, 8.3.8) -------------------------------------------

def _middle_instance(study: str, series: str | None) -> Instance:
    instances = _instances_of(study, series)
    if not instances:
        abort(404, "no instances")
    images = [i for i in instances if i.rows] or instances
    return images[len(images) // 2]


def _rendition(thumbnail: bool) -> Rendition:
    # The front door of signed frames (signed.py) parses it the same way: the same key.
    rendition = signed.rendition_from(request.args, request.headers.get("Accept", ""),
                                      thumbnail=thumbnail)  # or InvalidRendition: 400
    if rendition is None:
        abort(406, "rendered images are available as image/jpeg, image/png or image/webp")
    return rendition


def _image_response(image: RenderedImage) -> Response:
    """A rendered image with a strong ETag, 304 on a match, private caching."""
    headers = {"Cache-Control": "private, max-age=86400", "Vary": "Accept"}
    if request.if_none_match.contains(image.etag):
        response = Response(status=304, headers=headers)
    else:
        # What the imaging service refuses (FrameNotFound 404, RenderRefused and NotAVolume
        # 422, with the reason) is answered by portal/errors.py.
        response = Response(image.body(), mimetype=image.media_type, headers=headers)
    response.set_etag(image.etag)
    return response


MAX_RENDERED_PARTS = 500


def _render_many(instances: list[Instance]) -> Response:
    """PS3.18 rendered study or series: every frame of every image (at most 500) as
    multipart/related when the client asks for multipart, else one representative (middle)
    image, as many clients expect.

    The parts stream in order as they render (the render pool works ahead), each with a
    Content-Location naming its frame's rendered resource, so a viewer gets a whole series'
    small renditions in one request and shows the first at once (docs/conformance/dicomweb.md
    "Rendered series"). The read is recorded before the first byte (``_reads_recorded``); an
    image that cannot be rendered loses its own part only.
    """
    images = [i for i in instances if i.rows]
    if not images:
        abort(404, "no images")
    if "multipart/related" not in request.headers.get("Accept", "").lower():
        return _render(images[len(images) // 2], 1, thumbnail=False)
    rendition = _rendition(thumbnail=False)
    frames = [(i, number) for i in images
              for number in range(1, max(i.number_of_frames, 1) + 1)][:MAX_RENDERED_PARTS]
    query = request.query_string.decode("latin-1")
    query = f"?{query}" if query else ""
    series_paths: dict[int, str] = {}  # each series' instances, as url_for spells it
    for instance, _number in frames:
        if instance.series_fk not in series_paths:
            series_paths[instance.series_fk] = url_for(
                "dicomweb.search_instances", study=instance.series.study.study_instance_uid,
                series=instance.series.series_instance_uid)
    locations = [f"{series_paths[i.series_fk]}/{quote(i.sop_instance_uid)}/frames/{number}"
                 f"/rendered{query}" for i, number in frames]
    boundary = multipart.new_boundary()
    bodies = rendered_frames(db.session, frames, rendition)

    def body() -> Iterator[bytes]:
        for location, payload in zip(locations, bodies, strict=True):
            if payload is not None:
                yield multipart.located_part(rendition.media_type, payload, boundary, location)
        yield multipart.closing(boundary)

    return Response(stream_with_context(body()), headers={
        "Content-Type": f'multipart/related; type="{rendition.media_type}"; '
                        f"boundary={boundary}",
        "Cache-Control": "private, max-age=86400", "Vary": "Accept"})


@bp.get("/studies/<study>/rendered")
def rendered_study(study: str) -> Response:
    """WADO-RS rendered study: each image's first frame (at most 500), multipart."""
    return _render_many(_instances_of(study))


@bp.get("/studies/<study>/series/<series>/rendered")
def rendered_series(study: str, series: str) -> Response:
    """WADO-RS rendered series: each image's first frame (at most 500), multipart."""
    return _render_many(_instances_of(study, series))


def _render(instance: Instance, frame: int, *, thumbnail: bool) -> Response:
    rendition = _rendition(thumbnail)
    image = rendered_image(db.session, instance, frame, rendition)
    response = _image_response(image)
    if not thumbnail and image.stored is not None:
        # For the front door of known readers (signed.py): which file this reader may see
        # now; it keeps the pass only when the answer (read record included) is a 200 or 304.
        request.environ[signed.READER_ENVIRON] = signed.ReaderPass(
            image.stored, instance.number_of_frames)
    return response


@bp.get("/studies/<study>/series/<series>/instances/<instance>/rendered")
def rendered_instance(study: str, series: str, instance: str) -> Response:
    """WADO-RS rendered: the instance's first frame as JPEG, PNG or WebP."""
    return _render(_instances_of(study, series, instance)[0], 1, thumbnail=False)


@bp.get("/studies/<study>/series/<series>/instances/<instance>/frames/<int:frame>/rendered")
def rendered_frame(study: str, series: str, instance: str, frame: int) -> Response:
    """WADO-RS rendered: one frame."""
    return _render(_instances_of(study, series, instance)[0], frame, thumbnail=False)


@bp.get("/studies/<study>/series/<series>/instances/<instance>/thumbnail")
def instance_thumbnail(study: str, series: str, instance: str) -> Response:
    """WADO-RS thumbnail of an instance."""
    return _render(_instances_of(study, series, instance)[0], 1, thumbnail=True)


@bp.get("/studies/<study>/series/<series>/instances/<instance>/frames/<int:frame>/thumbnail")
def frame_thumbnail(study: str, series: str, instance: str, frame: int) -> Response:
    """WADO-RS thumbnail of a frame."""
    return _render(_instances_of(study, series, instance)[0], frame, thumbnail=True)


@bp.get("/studies/<study>/series/<series>/thumbnail")
def series_thumbnail(study: str, series: str) -> Response:
    """WADO-RS thumbnail of a series: its middle image."""
    return _render(_middle_instance(study, series), 1, thumbnail=True)


@bp.get("/studies/<study>/thumbnail")
def study_thumbnail(study: str) -> Response:
    """WADO-RS thumbnail of a study: the middle image of its first series."""
    first = _instances_of(study)
    if not first:
        abort(404, "no instances")
    return _render(_middle_instance(study, first[0].series.series_instance_uid), 1,
                   thumbnail=True)


def _volume_sources(study: str, series: str) -> tuple[str, list[StoredFile]]:
    """The volume key and stored files of a series' images (access checked, read audited)."""
    found = volume_sources([i.sop_instance_uid for i in _instances_of(study, series) if i.rows])
    if found is None:
        abort(503, "some images of this series are not available right now")
    return found


@bp.get("/studies/<study>/series/<series>/volume")
def volume_state(study: str, series: str) -> Response:
    """Portal extension: whether the series' volume (for reformats and MIPs) is built.

    ``{"state": "ready", "mipWindow": {...}}``; ``"building"`` with ``progress`` (0..1) and
    Retry-After, the build being started here when nobody is at it; 422 with the reason when
    the slices form no volume (``"state": "refused"``, the reason in plain words: the viewer
    offers no reformat or 3D view for such a series).
    """
    content, files = _volume_sources(study, series)
    state, progress, reason = volume_files().state(content)
    if state == "missing":
        failed = volume_failure(content)
        if failed:
            return error_response(422, f"the 3D view could not be built: {failed}")
        build_volume_soon(content, files)
        state, progress = "building", 0.0
    if state == "refused":
        return _no_volume(reason)
    body: dict[str, Any] = {"state": state, "progress": round(progress, 3)}
    headers = {"Cache-Control": "no-store"}
    if state == "ready":
        try:
            mip = prepare_volume(content, files)  # a load (or a kept volume) in a render process
        except NotAVolume as exc:  # kept before its geometry was assessed: refused now
            return _no_volume(str(exc))
        except RenderRefused as exc:
            return error_response(422, f"the 3D view could not be built: {exc}")
        if mip is not None:
            body["mipWindow"] = {"center": round(mip.center, 1), "width": round(mip.width, 1)}
    else:
        headers["Retry-After"] = "1"
    return Response(json.dumps(body), status=200 if state == "ready" else 202,
                    mimetype="application/json", headers=headers)


def _no_volume(reason: str) -> Response:
    """The volume status of a series whose slices form no volume: 422, ``"refused"``."""
    return Response(json.dumps({"state": "refused", "status": 422,
                                "error": reason or "the slices do not form a volume"}),
                    status=422, mimetype="application/json",
                    headers={"Cache-Control": "no-store"})


@bp.get("/studies/<study>/series/<series>/volume/<kind>")
def volume_view(study: str, series: str, kind: str) -> Response:
    """Portal extension: sagittal, coronal or axial reformat, an oblique MIP or a 3D view.

    ``position`` (0..1) picks a reformat's plane. The MIP and the 3D view turn by ``angle``
    (azimuth about the patient's vertical axis, 0..355) and ``elevation`` (-90..90), both in
    steps of 5 degrees, take ``zoom`` (1..4, steps of 0.25) and ``detail`` (``low`` while a
    finger turns it, ``full``); the MIP a ``slab`` thickness in mm (0: the whole volume), the
    3D view a ``style`` (bone, vessels, soft, skin: its opacity and colour ramps). Views and
    letters: portal/imaging/render3d.py. The rendition parameters are those of /rendered.
    """
    if kind not in VIEWS:
        abort(404, f"views are {', '.join(VIEWS)}")
    rendition = _rendition(thumbnail=False)
    args = request.args
    try:
        position = float(args.get("position", "0.5"))
        angle = float(args.get("angle", "0"))
        elevation = float(args.get("elevation", "0"))
        zoom = float(args.get("zoom", "1"))
        slab = float(args.get("slab", "0"))
    except ValueError:
        abort(400, "position, angle, elevation, zoom and slab are numbers")
    if not 0.0 <= position <= 1.0 or angle % 5 != 0 or not 0 <= angle < 360:
        abort(400, "position is 0..1; angle is 0..355 in steps of 5")
    if elevation % 5 != 0 or zoom % 0.25 != 0 or slab % 1 != 0:
        abort(400, "elevation is in steps of 5 degrees, zoom of 0.25, slab of 1 mm")
    content, files = _volume_sources(study, series)
    state, _progress, reason = volume_files().state(content)
    if state == "refused":  # assessed once when it was built: no need to read the slices again
        raise not_in_3d(reason or "the slices do not form a volume")
    if kind not in ("mip", "3d"):
        return _image_response(volume_image(content, files, kind, position, angle, rendition))
    if ("style" in args and kind != "3d") or ("slab" in args and kind != "mip"):
        abort(400, "style is a 3D view's (bone, vessels, soft, skin); slab is a MIP's")
    # Out of range (elevation, zoom, slab, style, detail): BadView, 400 with the reason.
    style = args.get("style", "bone") if kind == "3d" else None
    turn = Turn(angle, elevation, zoom, slab, style, args.get("detail", "full"))
    return _image_response(turned_image(content, files, turn, rendition))
