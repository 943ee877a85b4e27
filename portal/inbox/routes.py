"""Pages and the chunk API of the upload inbox (docs/inbox.md).

- ``/inbox/upload``: a signed-in physician or office manager uploads into his practice's inbox.
- ``/u#<token>``: a patient's upload link (token in the fragment, as share links'; PIN; the
  exchange sets the ``upload`` cookie); ``/u/upload`` is the same upload page. An upload
  session reaches only these pages and the chunk API: never an image or a study.
- ``/inbox``: office managers reconcile (accept with a local patient) or reject what waits.
- ``/inbox/api/files``: announce a file, ask how much of it arrived, send the rest in chunks
  (``Content-Range: bytes first-last/total``).
"""

from __future__ import annotations

import re
from typing import Any

from flask import (
    Blueprint,
    Flask,
    Response,
    abort,
    current_app,
    flash,
    jsonify,
    redirect,
    render_template,
    request,
    url_for,
)
from flask_babel import gettext as _
from flask_babel import ngettext
from sqlalchemy import select
from werkzeug.wrappers import Response as BaseResponse

from portal import failures, jobs
from portal.access.policy import public
from portal.access.principal import Principal, current_principal
from portal.archive import current_archive
from portal.auth.recent import require_recent_sign_in
from portal.db import db, utcnow
from portal.i18n import reason_text
from portal.inbox import links, quarantine, reconcile
from portal.inbox.models import InboxFile, InboxStudy, UploadLink
from portal.numbers import bounded_int
from portal.security import read_body
from portal.sharing.limits import address_key, rate_limiter
from portal.sharing.routes import share_policy

bp = Blueprint("inbox", __name__)
api = Blueprint("inbox_api", __name__)

_RANGE = re.compile(r"^bytes (\d{1,15})-(\d{1,15})/(\d{1,15})$")
_COMPLETE = re.compile(r"^bytes \*/(\d{1,15})$")


def init_app(app: Flask) -> None:
    """Register the pages and the chunk API; the quarantine lives in ``instance/inbox/``."""
    app.extensions["inbox"] = quarantine.Quarantine.from_settings(
        app.config["PORTAL"], app.extensions["archive"].store.space_rule)
    app.register_blueprint(bp)
    app.register_blueprint(api)


def _q() -> quarantine.Quarantine:
    q: quarantine.Quarantine = current_app.extensions["inbox"]
    return q


def _address() -> str:
    return request.remote_addr or ""


def cookie_name() -> str:
    """``__Host-upload`` when cookies are Secure; ``upload`` on plain-HTTP development."""
    return "__Host-upload" if current_app.config["SESSION_COOKIE_SECURE"] else "upload"


def _uploader() -> Principal | None:
    """A signed-in physician or office manager of a practice."""
    principal = current_principal()
    if principal is not None and links.may_make_links(principal):
        return principal
    return None


def _manager() -> Principal:
    principal = current_principal()
    if principal is None or principal.kind != "user" or principal.practice_id is None \
            or not principal.has_role("office_manager"):
        abort(404)
    return principal


def _link() -> UploadLink | None:
    cookie = request.cookies.get(cookie_name(), "")
    return links.session_link(db.session, cookie) if cookie else None


# -- the upload pages --------------------------------------------------------------------------

@bp.get("/inbox/upload")
def upload_page() -> str:
    """The upload page of a signed-in physician or office manager."""
    if _uploader() is None:
        abort(404)
    return render_template("inbox/upload.html", for_link=False)


@bp.get("/u")
@public
def link_landing() -> str:
    """An upload link's landing page: the script moves the code from the fragment into the
    form; nothing happens until the PIN is sent."""
    return render_template("inbox/landing.html", token="", message="")


@bp.post("/u/exchange")
@public
def link_exchange() -> BaseResponse:
    """Exchange token and PIN for an upload session (rate-limited per address)."""
    settings = current_app.config["PORTAL"]
    count = rate_limiter().count(f"upload-exchange:{address_key(_address())}", window=600)
    token = request.form.get("token", "").strip()[:200]
    if count > settings["SHARE_ATTEMPTS_PER_ADDRESS"]:
        return Response(render_template("inbox/landing.html", token=token,
                                        message=_("Too many tries from here. Please wait ten "
                                                  "minutes.")), status=429)
    pin = request.form.get("pin", "").strip()[:32]
    try:
        cookie, link = links.exchange(db, share_policy(), token=token, pin=pin,
                                      address=_address())
    except links.LinkUnavailable:
        return Response(render_template("inbox/ended.html"), status=404)
    except links.PinRequired:
        return Response(render_template("inbox/landing.html", token=token,
                                        message=_("Please enter the PIN you were given.")),
                        status=401)
    except links.WrongPin as wrong:
        text = ngettext("That PIN is not right. You can try %(num)d more time.",
                        "That PIN is not right. You can try %(num)d more times.", wrong.remaining)
        return Response(render_template("inbox/landing.html", token=token, message=text),
                        status=401)
    except links.LinkLocked:
        return Response(render_template("inbox/ended.html", locked=True), status=403)
    response = redirect(url_for("inbox.link_upload"), code=303)
    lifetime = min(links.SESSION_LIFETIME, link.expires_at - utcnow())
    response.set_cookie(cookie_name(), cookie, max_age=int(lifetime.total_seconds()),
                        path="/", secure=bool(current_app.config["SESSION_COOKIE_SECURE"]),
                        httponly=True, samesite="Strict")
    return response


@bp.get("/u/upload")
@public
def link_upload() -> Response | str:
    """The upload page of a link's visitor (or a page saying the link ended)."""
    if _link() is None:
        return Response(render_template("inbox/ended.html"), status=401)
    return render_template("inbox/upload.html", for_link=True)


# -- the chunk API -----------------------------------------------------------------------------

class _NotUploader(failures.PortalError):
    """Neither a signed-in uploader nor an open upload session (401)."""

    status = 401
    default_reason = "open your upload link again, or sign in"


@api.errorhandler(failures.PortalError)
def _api_refusal(exc: failures.PortalError) -> tuple[Response, int, dict[str, str]]:
    """The chunk API's refusals as every JSON answer (``error``: English), with ``message``:
    the same reason in the uploader's language, which his page shows (docs/i18n.md)."""
    if exc.status >= 500:
        current_app.logger.error("%s: %s", exc.__class__.__name__, exc.reason)
    db.session.rollback()  # nothing the request wrote before it failed is kept
    return (jsonify(error=exc.reason, status=exc.status, message=reason_text(exc)),
            exc.status, exc.headers())


def _uploader_or_401() -> tuple[int, int | None, str]:
    principal = _uploader()
    if principal is not None and principal.practice_id is not None:
        return principal.practice_id, None, principal.audit_name
    link = _link()
    if link is not None:
        return link.practice_fk, link.id, links.link_who(link)
    raise _NotUploader()


def _own_file(public_id: str) -> InboxFile:
    """A file the caller announced himself; anybody else's answers 404."""
    practice, link_fk, who = _uploader_or_401()
    file = db.session.scalars(select(InboxFile).where(InboxFile.public_id == public_id)).first()
    if file is None or file.practice_fk != practice or file.link_fk != link_fk \
            or file.uploaded_by != who:
        raise failures.NotFound("no such upload")
    return file


def _file_json(file: InboxFile) -> dict[str, Any]:
    return {"id": file.public_id, "name": file.name, "size": file.size,
            "received": quarantine.received_bytes(_q(), file), "state": file.state,
            # The uploader's page shows the reasons: in his language (docs/i18n.md).
            "results": [quarantine.shown(r, _) for r in file.results],
            "chunk": quarantine.MAX_CHUNK_BYTES}


@api.post("/inbox/api/files")
@public
def announce_file() -> tuple[Response, int]:
    """Announce a file: ``{"name": ..., "size": ...}``; answers its id (201)."""
    practice, link_fk, who = _uploader_or_401()
    body = request.get_json(silent=True)
    if not isinstance(body, dict) or not isinstance(body.get("name"), str) \
            or not isinstance(body.get("size"), int) or isinstance(body.get("size"), bool):
        raise quarantine.UploadRefused("send the file's name and size as JSON")
    quarantine.reap_abandoned(db.session, _q())
    file = quarantine.start_file(db.session, _q(), practice_id=practice, link_fk=link_fk,
                                 uploaded_by=who, name=body["name"], size=body["size"])
    return jsonify(_file_json(file)), 201


@api.get("/inbox/api/files/<public_id>")
@public
def file_status(public_id: str) -> Response:
    """How much of the file the server has (resume from ``received``), and its results."""
    return jsonify(_file_json(_own_file(public_id)))


@api.put("/inbox/api/files/<public_id>")
@public
def file_chunk(public_id: str) -> Response:
    """One chunk, ``Content-Range: bytes first-last/total``; the last one is checked and
    kept in quarantine, and the answer lists what became of the file (or its entries).
    ``Content-Range: bytes */total`` without a body checks a complete file whose last piece's
    request did not live to do it."""
    file = _own_file(public_id)
    header = request.headers.get("Content-Range", "")
    complete = _COMPLETE.match(header)
    if complete is not None:
        # "Check what you have": the request that sent the last piece died before it did.
        if file.state == "receiving":
            if int(complete.group(1)) != file.size \
                    or quarantine.received_bytes(_q(), file) != file.size:
                raise quarantine.UploadRefused("the file is not complete yet")
            file.received = file.size
            quarantine.finish(db.session, _q(), file)
        return jsonify(_file_json(file))
    found = _RANGE.match(header)
    if found is None:
        raise quarantine.UploadRefused("send Content-Range: bytes first-last/total")
    first, last, total = (int(x) for x in found.groups())
    data = read_body(quarantine.MAX_CHUNK_BYTES)
    if last - first + 1 != len(data):
        raise quarantine.UploadRefused("the chunk's length differs from its Content-Range")
    if quarantine.append_chunk(db.session, _q(), file, first, total, data) \
            and file.state == "receiving":
        quarantine.finish(db.session, _q(), file)
    return jsonify(_file_json(file))


# -- the office manager's inbox -------------------------------------------------------------------

@bp.get("/inbox")
def index() -> str:
    """What waits in the practice's inbox, and the latest decisions."""
    actor = _manager()
    waiting = reconcile.waiting_studies(db.session, actor)
    decided = list(db.session.scalars(select(InboxStudy).where(
        InboxStudy.practice_fk == actor.practice_id,
        InboxStudy.state.in_(("accepted", "rejected")))
        .order_by(InboxStudy.decided_at.desc()).limit(20)))
    return render_template("inbox/index.html", waiting=waiting, decided=decided)


@bp.get("/inbox/studies/<public_id>")
def study(public_id: str) -> str:
    """One waiting study: what it says, local patients that may be its, accept or reject."""
    actor = _manager()
    item = reconcile.get_study(db.session, actor, public_id)
    progress = reconcile.read_progress(_q(), item.public_id)
    if item.state != "waiting":  # being accepted in the background, or accepted
        return render_template("inbox/accepting.html", study=item, progress=progress,
                               may_continue=item.state == "accepting"
                               and reconcile.may_continue(progress))
    link = db.session.get(UploadLink, item.link_fk) if item.link_fk else None
    uploader = reconcile.uploader_physician(db.session, actor, item)
    return render_template("inbox/study.html", study=item,
                           asked_by=link.created_by_fk if link else None,
                           uploader=uploader.id if uploader else None,
                           suggestions=reconcile.suggestions(db.session, actor, item),
                           physicians=reconcile.practice_physicians(db.session, actor),
                           series=len({i.series_instance_uid for i in item.instances}),
                           progress=progress if progress and progress["state"] == "done"
                           else None)


@bp.get("/inbox/studies/<public_id>/progress")
def accept_progress(public_id: str) -> Response:
    """How far a background accept is (the study's page asks every few seconds)."""
    actor = _manager()
    item = reconcile.get_study(db.session, actor, public_id)
    progress = reconcile.read_progress(_q(), item.public_id) or {}
    return jsonify(state=item.state, done=progress.get("done", 0),
                   total=progress.get("total", 0),
                   failed=progress.get("state") == "failed")


def _recent() -> BaseResponse | None:
    return require_recent_sign_in("inbox.index")


@bp.post("/inbox/studies/<public_id>/accept")
def accept(public_id: str) -> BaseResponse:
    """Accept with the chosen local patient: the study enters the archive."""
    actor = _manager()
    again = _recent()
    if again is not None:
        return again
    patient = request.form.get("patient", "")
    if not patient:
        raise reconcile.ReconcileError("choose the local patient")
    give = request.form.get("give_to", "")
    # The referrer written into the files: the form's choice ("" for nobody); a request
    # without the field gets the physician who uploaded the study himself, if one did.
    referrer = request.form.get("referrer")
    # The same choices for both ways (reconcile.accept and reconcile.start_accept check them).
    choices: dict[str, Any] = dict(
        patient_pk=None if patient == "new" else bounded_int(patient, "patient", low=1),
        new_patient_id=request.form.get("new_patient_id", "")[:64],
        accession=request.form.get("accession", "")[:64],
        give_to=bounded_int(give, "give_to", low=1) if give else None,
        referrer=bounded_int(referrer, "referrer", low=1) if referrer else None,
        referrer_chosen=referrer is not None, address=_address())
    if len(reconcile.get_waiting(db.session, actor, public_id).instances) \
            > reconcile.ACCEPT_INLINE_MAX:  # a large study: a job, with its progress shown
        total = reconcile.start_accept(db.session, actor, _q(), public_id, **choices)
        db.after_commit(lambda: _queue_accept(public_id))
        flash(_("Accepting %(num)d images: this page shows how far it is.", num=total))
        return redirect(url_for("inbox.study", public_id=public_id), code=303)
    done = reconcile.accept(db.session, actor, _q(), current_archive(), public_id,
                            database=db, **choices)
    db.after_commit(reconcile.delete_files(done.forget))
    if done.refused:
        flash(_("%(stored)d images moved into the archive; %(refused)d were refused and stay "
                "in the inbox: %(reason)s", stored=done.stored, refused=len(done.refused),
                reason=done.refused[0][1]), "error")
    else:
        flash(_("Accepted: %(num)d images are now in the archive.", num=done.stored))
    return redirect(url_for("inbox.index"), code=303)


def _queue_accept(public_id: str) -> None:
    jobs.enqueue("inbox-accept", public_id)


@bp.post("/inbox/studies/<public_id>/accept/continue")
def continue_accept(public_id: str) -> BaseResponse:
    """Continue a background accept that stopped: the files still waiting are moved."""
    actor = _manager()
    again = _recent()
    if again is not None:
        return again
    item = reconcile.get_study(db.session, actor, public_id)
    if item.state != "accepting":
        raise reconcile.NoSuchInboxStudy()
    progress = reconcile.read_progress(_q(), item.public_id)
    if not reconcile.may_continue(progress):
        raise reconcile.AcceptRunning()
    if not reconcile.has_plan(progress):  # lost: the study waits again, to be accepted again
        reconcile.release_stopped(db.session, _q(), item.public_id)
        flash(_("The move stopped. The images not moved yet wait here: accept the study "
                "again."), "error")
        return redirect(url_for("inbox.study", public_id=item.public_id), code=303)
    db.after_commit(lambda: _queue_accept(item.public_id))
    flash(_("Continuing: this page shows how far it is."))
    return redirect(url_for("inbox.study", public_id=item.public_id), code=303)


@bp.post("/inbox/studies/<public_id>/reject")
def reject(public_id: str) -> BaseResponse:
    """Reject (a waiting study, or one whose move stopped): the files are deleted once the
    decision, audited, is committed."""
    actor = _manager()
    again = _recent()
    if again is not None:
        return again
    forget = reconcile.reject(db.session, actor, _q(), public_id,
                              reason=request.form.get("reason", "")[:300],
                              address=_address())
    db.after_commit(reconcile.delete_files(forget))
    flash(_("Rejected: the uploaded files are deleted."))
    return redirect(url_for("inbox.index"), code=303)


# -- upload links ----------------------------------------------------------------------------------

@bp.get("/inbox/links")
def link_list() -> str:
    """Upload links of the practice (office managers) or one's own (physicians)."""
    actor = _uploader()
    if actor is None:
        abort(404)
    return render_template("inbox/links.html",
                           links=links.practice_links(db.session, actor),
                           state=links.link_state, now=utcnow(),
                           days=share_policy().default_days, max_days=share_policy().max_days)


@bp.post("/inbox/links")
def create_link() -> Response:
    """Make an upload link for a patient: its address and PIN are shown once."""
    actor = _uploader()
    if actor is None:
        abort(404)
    days_text = request.form.get("days", "")
    made = links.create_link(db.session, actor, share_policy(),
                             for_whom=request.form.get("for_whom", ""),
                             days=bounded_int(days_text, "days", low=1, high=366)
                             if days_text else None)
    url = f"{url_for('inbox.link_landing', _external=True)}#{made.token}"
    return Response(render_template("inbox/link_created.html", link=made.link, url=url,
                                    pin=made.pin), status=201)


@bp.post("/inbox/links/<public_id>/revoke")
def revoke_link(public_id: str) -> BaseResponse:
    """Revoke an upload link: it stops at once, open upload sessions too."""
    actor = _uploader()
    if actor is None:
        abort(404)
    links.revoke_link(db.session, actor, public_id)
    flash(_("The upload link is revoked."))
    return redirect(url_for("inbox.link_list"), code=303)
