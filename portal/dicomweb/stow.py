"""STOW-RS (PS3.18 10.5): split the request, ingest each part, answer per instance."""

from __future__ import annotations

import json
from typing import Any

from flask import Response, abort, request, url_for

from portal.access import policy
from portal.access.principal import Principal
from portal.archive import current_archive
from portal.archive.after import Stored
from portal.archive.validate import CANNOT_UNDERSTAND, Rejected
from portal.dicomweb.accept import parse_media_type
from portal.multipart import MultipartError, split_parts
from portal.security import read_body

_UI, _US, _UR, _SQ = "UI", "US", "UR", "SQ"


def _value(vr: str, value: Any) -> dict[str, Any]:
    return {"vr": vr, "Value": [value]} if value not in (None, "") else {"vr": vr}


def store_request(principal: Principal, study_uid: str | None) -> Response:
    """Store every part of a STOW-RS request; 200, 202 (some failed) or 409 (none stored)."""
    policy.require_store(principal)
    content_type = parse_media_type(request.headers.get("Content-Type", ""))
    params = content_type.params
    if content_type.media_type != "multipart/related":
        abort(415, 'send multipart/related; type="application/dicom"')
    part_type = params.get("type", "application/dicom").lower()
    if part_type != "application/dicom":
        abort(415, f"parts of type {part_type[:64]} are not accepted; "
                   "send application/dicom (Part 10 files)")
    body = read_body()
    try:
        parts = split_parts(body, params.get("boundary", ""))
    except MultipartError as exc:
        abort(400, f"malformed multipart body: {exc}")
    if not parts:
        abort(400, "the request holds no parts")
    archive = current_archive()
    results: list[Stored | Rejected | None] = [None] * len(parts)
    dicom = []
    for index, part in enumerate(parts):
        if part.content_type in ("", "application/dicom"):
            dicom.append(index)
        else:
            results[index] = Rejected(
                f"part type {part.content_type[:64]} is not application/dicom",
                CANNOT_UNDERSTAND)
    archive.record_rejections([(r, bytes(parts[i].payload)) for i, r in enumerate(results)
                               if isinstance(r, Rejected)], who=principal.audit_name,
                              source_address=request.remote_addr or "")
    answers = archive.ingest_many([parts[i].payload for i in dicom],
                                  who=principal.audit_name,
                                  source_address=request.remote_addr or "",
                                  expected_study_uid=study_uid)
    for index, answer in zip(dicom, answers, strict=True):
        results[index] = answer
    stored = [r for r in results if isinstance(r, Stored)]
    # Audit, pre-rendering, reports from SR and PDF objects: the steps every way in runs.
    archive.after_ingest(stored, via="stow", who=principal.audit_name,
                         source_address=request.remote_addr or "")
    failed = [(r, n) for n, r in enumerate(results, start=1) if isinstance(r, Rejected)]
    already = sum(r.outcome == "already_stored" for r in stored)
    return _answer(stored, failed, already, study_uid)


def _answer(stored: list[Stored], failed: list[tuple[Rejected, int]], already: int,
            study_uid: str | None) -> Response:
    payload: dict[str, Any] = {}
    studies = {s.study_instance_uid for s in stored}
    target = study_uid or (next(iter(studies)) if len(studies) == 1 else None)
    if target:
        payload["00081190"] = _value(_UR, url_for("dicomweb.retrieve_study", study=target,
                                                  _external=True))
    if failed:
        payload["00081198"] = {"vr": _SQ, "Value": [{
            "00081150": _value(_UI, exc.sop_class_uid),
            "00081155": _value(_UI, exc.sop_instance_uid),
            "00081197": _value(_US, exc.status),
        } for exc, _n in failed]}
    if stored:
        payload["00081199"] = {"vr": _SQ, "Value": [{
            "00081150": _value(_UI, s.sop_class_uid),
            "00081155": _value(_UI, s.sop_instance_uid),
            "00081190": _value(_UR, url_for(
                "dicomweb.retrieve_instance", study=s.study_instance_uid,
                series=s.series_instance_uid, instance=s.sop_instance_uid, _external=True)),
        } for s in stored]}
    if failed and not stored:
        # 507 when the archive had no room for any (PS3.18 10.5.3: the Failed SOP Sequence
        # carries A700 "Out of resources" for each; docs/operations.md "Disk space").
        statuses = {exc.http_status for exc, _ in failed}
        status = statuses.pop() if len(statuses) == 1 and statuses <= {413, 507} else 409
    else:
        status = 202 if failed else 200
    response = Response(json.dumps(payload, separators=(",", ":")), status=status,
                        mimetype="application/dicom+json")
    for exc, number in failed[:50]:
        add_warning(response, f"part {number}: {exc.reason}")
    if already:
        add_warning(response, f"{already} instance(s) were already stored; kept one copy")
    return response


def add_warning(response: Response, text: str) -> None:
    """Add a ``Warning: 299 portal "..."`` header as PS3.18 answers use it."""
    # The text often quotes the client (a part's Content-Type), so only printable ASCII goes
    # in: a CR would split the header (werkzeug raises) and NUL, ESC or DEL make gunicorn
    # fail the whole answer; quotes and backslashes would end or escape the quoted text.
    safe = "".join(c if " " <= c <= "~" else "?" for c in text[:200])
    safe = safe.replace("\\", "/").replace('"', "'")
    response.headers.add("Warning", f'299 portal "{safe}"')
