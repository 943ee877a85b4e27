"""The start page, the study list, the study page, the viewer and the study download."""

from __future__ import annotations

import re
import secrets
import time
from dataclasses import replace
from typing import Any

from flask import (
    Blueprint,
    Response,
    abort,
    current_app,
    redirect,
    render_template,
    request,
    session,
    stream_with_context,
    url_for,
)
from markupsafe import Markup
from werkzeug.wrappers import Response as BaseResponse

from portal import audit, failures
from portal.access.policy import (
    download,
    is_patient_user,
    public,
    reads_plain_words,
    require_series,
    require_study,
    share_audiences,
    share_visible,
)
from portal.access.principal import Principal, current_principal
from portal.archive import current_archive
from portal.db import db
from portal.imaging.presets import presets_for
from portal.imaging.service import series_default_window
from portal.imaging.signed import sign_series
from portal.index.names import name_language, person_name
from portal.index.referrers import key_label
from portal.numbers import bounded_int
from portal.reports.service import mark_shown_read, unread_studies
from portal.sharing.service import link_note
from portal.studies import export
from portal.studies.patients import scans_page
from portal.studies.prior import describe_pane, main_series, middle_uid, priors
from portal.studies.service import (
    MODALITIES,
    SortKey,
    StudySearch,
    key_images,
    list_page,
    list_place,
    patient_history,
    series_images,
    study_instances,
    study_series,
)
from portal.studies.viewer import describe_series, file_windows

bp = Blueprint("studies", __name__)
# Every page shows DICOM person names through this one filter ("Dr Gregory House").
bp.add_app_template_filter(person_name, "person_name")


def _name_lang(value: object) -> Markup:
    """`` lang="ja"`` (or ko, zh) for the element showing a Japanese, Korean or Chinese name:
    the glyphs of its language and a screen reader's voice for it (docs/i18n.md, "Person
    names"); nothing for any other name."""
    language = name_language(value)
    return Markup(' lang="{}"').format(language) if language else Markup("")


def _name_html(value: object, fallback: str = "") -> Markup:
    """A name to put inside a sentence (``_('Studies of %(who)s', who=...)``): written as
    people write it, in a ``<span lang>`` only when it is a Japanese, Korean or Chinese
    name, escaped; ``fallback`` when there is no name."""
    written = person_name(value) or fallback
    language = name_language(value)
    if language:
        return Markup('<span lang="{}">{}</span>').format(language, written)
    return Markup("{}").format(written)


bp.add_app_template_filter(_name_lang, "name_lang")
bp.add_app_template_filter(_name_html, "name_html")
bp.add_app_template_filter(key_label, "referrer_key")

_DATE = re.compile(r"^\d{4}-?\d{2}-?\d{2}$")


@bp.app_template_global("download_size")
def download_size(study: Any, principal: Principal) -> str:
    """The study ZIP's size for the download button ('23 MB'), or '' when it is not known."""
    size = export.study_zip_bytes(db.session, principal, study)
    return export.file_size(size) if size is not None else ""


def _principal() -> Principal:
    principal = current_principal()
    assert principal is not None
    return principal


@bp.get("/")
@public
def home() -> str:
    """Front page: sign in, or go to the studies when signed in. Shows no patient data."""
    principal = current_principal()
    signed_in = principal is not None and principal.kind == "user"
    return render_template("studies/home.html", signed_in=signed_in,
                           patient=is_patient_user(principal),
                           sign_in_configured=bool(current_app.config["PORTAL"]["OIDC_ISSUER"]))


SEARCHES_KEPT = 8  # recent search texts kept in the (server-side) session


def _search_redirect(text: str, source: Any) -> BaseResponse:
    """Keep the search text (a patient's name, ID or accession number) in the session and
    send the browser to a URL that names it only by an opaque key, so it is in no address
    bar, history, bookmark, Referer or proxy log (docs/security.md 28)."""
    params = {k: source.get(k) for k in ("from", "to", "modality", "report") if source.get(k)}
    text = text.strip()[:64]
    if text:
        kept = dict(session.get("searches") or {})
        key = next((k for k, v in kept.items() if v == text), None) or secrets.token_urlsafe(6)
        kept.pop(key, None)
        kept[key] = text
        session["searches"] = dict(list(kept.items())[-SEARCHES_KEPT:])
        params["s"] = key
    return redirect(url_for("studies.study_list", **params), 303)


@bp.route("/studies", methods=["GET", "POST"])
def study_list() -> str | BaseResponse:
    """The studies this person may see, newest first, with search."""
    principal = _principal()
    if is_patient_user(principal):
        return scans_page(principal)  # a patient's own list: no search, no codes
    if request.method == "POST":
        return _search_redirect(request.form.get("q", ""), request.form)
    args = request.args
    if "q" in args:  # an old link or bookmark: take the text out of the address
        return _search_redirect(args.get("q", ""), args)
    dates = [args.get("from", ""), args.get("to", "")]
    if any(d and not _DATE.match(d) for d in dates):
        abort(400, "dates are written YYYY-MM-DD")
    try:
        page = max(1, min(int(args.get("page", "1")), 10_000))
    except ValueError:
        abort(400, "page must be a number")
    edges: dict[str, SortKey] = {}
    for name in ("after", "before"):  # keyset paging: the study the page starts beside
        if args.get(name):
            place = list_place(db.session, principal, bounded_int(args[name], name))  # or 400
            if place is None:
                raise failures.Invalid("%(name)s: that study is no longer in your list, open "
                                       "the list again", name=name)
            edges[name] = place
    text = (session.get("searches") or {}).get(args.get("s", ""), "")
    search = StudySearch(text=text, date_from=dates[0], date_to=dates[1],
                         modality=args.get("modality", "")[:16],
                         new_report=args.get("report") == "new", page=page,
                         after=edges.get("after"), before=edges.get("before"))
    rows, more, newer = list_page(db.session, principal, search)
    if not newer and search.page > 1:  # walked back to the top: the first page after all
        search = replace(search, page=1)
    unread = unread_studies(db.session, principal, [study.id for study, _patient in rows])
    audit.record(db, audit.QUERY, action="E", outcome=audit.OUTCOME_SUCCESS,
                 who=principal.audit_name, source_address=request.remote_addr or "",
                 details={"results": len(rows), "page": page})
    # The pager's links carry the first and last rows' places, not an offset (keyset paging).
    return render_template("studies/list.html", rows=rows, search=search, more=more,
                           newer=newer, principal=principal, modalities=MODALITIES,
                           unread=unread, search_key=args.get("s", "") if text else "",
                           first_key=rows[0][0].id if rows else "",
                           last_key=rows[-1][0].id if rows else "")


def _audit_view(principal: Principal, study_uid: str, patient_id: str, view: str) -> None:
    audit.record(db, audit.INSTANCES_ACCESSED, action="R", outcome=audit.OUTCOME_SUCCESS,
                 who=principal.audit_name, source_address=request.remote_addr or "",
                 study_instance_uid=study_uid, patient_id=patient_id, details={"view": view})


@bp.get("/studies/<study_uid>")
@share_visible
def study_page(study_uid: str) -> str:
    """One study: report slot, series strip, actions and the patient's other studies."""
    principal = _principal()
    study = require_study(db.session, principal, study_uid)
    _audit_view(principal, study.study_instance_uid, study.patient.patient_id, "study page")
    shown = {"series": study_series(db.session, principal, study),
             "key_images": key_images(db.session, principal, study, current_archive().read),
             "history": patient_history(db.session, principal, study),
             "priors": priors(db.session, principal, study)[:1]}
    # Last before the page: the report card shows them (a write of the request's unit of
    # work, portal/db.py, so no transaction of its own may follow it on SQLite).
    mark_shown_read(db.session, principal, [study])
    visitor = principal.kind == "share"
    return render_template("studies/study.html", study=study, **shown, principal=principal,
                           visitor=visitor,
                           note=link_note(db.session, principal.share_id) if visitor else None,
                           plain=reads_plain_words(principal),
                           may_share=bool(share_audiences(principal)))


@bp.get("/studies/<study_uid>/view/<series_uid>")
@share_visible
def viewer(study_uid: str, series_uid: str) -> str:
    """The full-screen image viewer for one series (images come from /dicomweb renditions)."""
    principal = _principal()
    series = require_series(db.session, principal, study_uid, series_uid)
    study = series.study
    images = series_images(db.session, series)
    if not images:
        abort(404, "this series has no images to show")
    middle = images[len(images) // 2]
    header = current_archive().header(middle.sop_instance_uid)
    # The file's own windows come first; else the window /rendered gives images without one.
    found = None if file_windows(header) else series_default_window(db.session, middle)
    default = (found.center, found.width) if found else None
    _audit_view(principal, study.study_instance_uid, study.patient.patient_id, "viewer")
    # Signed URLs of the images (issue 17): answered from the render cache up front.
    signed = sign_series(
        current_app.extensions.get("rendition_signer") if principal.via in ("session", "share")
        else None, request.cookies, db.session, study.study_instance_uid,
        series.series_instance_uid, [i.sop_instance_uid for i in images], time.time())
    return render_template("studies/viewer.html", study=study, series=series,
                           description=describe_series(study, series, images, header, default,
                                                       signed),
                           # saved measurements: by physicians (portal/studies/measurements.py)
                           save_measures=principal.kind == "user"
                           and not is_patient_user(principal))


@bp.get("/studies/<study_uid>/compare/<prior_uid>")
@share_visible
def compare(study_uid: str, prior_uid: str) -> str:
    """The prior beside the current (stacked on a phone held upright), scrolling linked by
    the position in the patient and one window for both (portal/studies/prior.py)."""
    principal = _principal()
    study = require_study(db.session, principal, study_uid)
    prior = require_study(db.session, principal, prior_uid)
    if prior.patient_fk != study.patient_fk or prior.id == study.id:
        abort(404, "not an earlier study of this patient")
    wanted = request.args.get("series", "")
    visible = study_series(db.session, principal, study)
    chosen = next((s for s in visible if s.series_instance_uid == wanted), None)
    theirs = {m for m in (prior.modalities_in_study or "").split("\\") if m}
    if chosen is None:
        by_size = sorted((s for s in visible if s.modality in theirs),
                         key=lambda s: s.number_of_instances, reverse=True)
        chosen = by_size[0] if by_size else None
    parts = {chosen.body_part_examined.upper()} if chosen and chosen.body_part_examined \
        else set()
    earlier = main_series(db.session, principal, prior, chosen.modality, parts) \
        if chosen else None
    if chosen is None or earlier is None:
        abort(404, "the earlier study has no images of the same kind")
    panes = []
    archive = current_archive()
    for series in (chosen, earlier):
        uid = middle_uid(db.session, series)
        panes.append(describe_pane(db.session, series, archive.header(uid) if uid else {}))
    # The file's own window first, else the series default (as the viewer's).
    middle_sop = middle_uid(db.session, chosen)
    own = file_windows(archive.header(middle_sop)) if middle_sop else []
    middle = next((i for i in series_images(db.session, chosen)
                   if i.sop_instance_uid == middle_sop), None)
    found = own[0] if own else (series_default_window(db.session, middle) if middle else None)
    _audit_view(principal, study.study_instance_uid, study.patient.patient_id, "compare")
    _audit_view(principal, prior.study_instance_uid, prior.patient.patient_id, "compare")
    data = {"panes": panes, "presets": presets_for(chosen.modality, chosen.body_part_examined, []),
            "window": None if found is None else found if isinstance(found, dict)
            else {"center": found.center, "width": found.width}}
    return render_template("studies/compare.html", study=study, prior=prior, series=chosen,
                           earlier=earlier, data=data, plain=reads_plain_words(principal))


@bp.get("/studies/<study_uid>/download.zip")
@share_visible
@download
def download_study(study_uid: str) -> Response:
    """The study as a ZIP of its DICOM files with a DICOMDIR (audited as an export)."""
    principal = _principal()
    study = require_study(db.session, principal, study_uid)
    instances = study_instances(db.session, principal, study)
    if not instances:
        abort(404, "this study has no files")
    archive = current_archive()
    headers = archive.headers([i.sop_instance_uid for i in instances])
    entries = export.study_entries(instances, headers, archive.locate)
    threshold = export.ZIP64_THRESHOLD  # read once: the length and the stream must agree
    length = export.check_size(entries, threshold)  # ExportTooLarge: 413 with the reason
    audit.record(db, audit.EXPORT, action="R", outcome=audit.OUTCOME_SUCCESS,
                 who=principal.audit_name, source_address=request.remote_addr or "",
                 study_instance_uid=study.study_instance_uid,
                 patient_id=study.patient.patient_id,
                 details={"what": "study zip", "files": len(instances)})
    name = export.download_name(study)
    return Response(stream_with_context(export.stream_zip(entries, threshold)), headers={
        "Content-Type": "application/zip", "Content-Length": str(length),
        "Content-Disposition": f'attachment; filename="{name}"',
        "X-Content-Type-Options": "nosniff", "Cache-Control": "private, no-store"})

