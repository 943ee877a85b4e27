"""Share-link pages: the landing page and exchange, the visitor's pages, the sender's pages.

The link is ``/s#<token>``: the token sits in the fragment, which browsers never send, so it
reaches no access log and no Referer. The landing page has no side effects; its form POSTs
the token (and PIN) to ``/s/exchange``, which sets the share cookie and redirects to a URL
without the token.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any, Literal
from urllib.parse import urlsplit

from flask import (
    Blueprint,
    Flask,
    Response,
    abort,
    current_app,
    flash,
    g,
    redirect,
    render_template,
    request,
    url_for,
)
from flask_babel import force_locale, get_locale, ngettext
from flask_babel import gettext as _
from sqlalchemy import select
from sqlalchemy.orm import selectinload
from werkzeug.wrappers import Response as BaseResponse

from portal import audit, notify
from portal.access.policy import (
    is_patient_user,
    public,
    require_study,
    share_audiences,
    share_visible,
    visible_studies,
)
from portal.access.policy import is_public as policy_is_public
from portal.access.principal import Principal, current_principal, register_visitor
from portal.auth.recent import require_recent_sign_in
from portal.db import db, utcnow
from portal.errors import error_response
from portal.i18n import SUPPORTED, language_choices
from portal.index.models import Study
from portal.sharing import messages, service
from portal.sharing.limits import address_key, rate_limiter
from portal.sharing.limits import init_app as init_limits
from portal.sharing.models import ShareLink, link_state
from portal.sharing.sessions import (
    clear_share_cookie,
    cookie_name,
    current_visit,
    forget_cached_visits,
    set_share_cookie,
    share_principal,
)
from portal.studies.service import study_series

bp = Blueprint("sharing", __name__)
log = logging.getLogger(__name__)

PORTAL_NAME = "the referrer portal"
_NOINDEX_ENDPOINTS = ("sharing.", "studies.study_page", "dicomweb.")


# -- helpers ---------------------------------------------------------------------------------

def share_policy() -> service.SharePolicy:
    """The configured limits of share links (cached per app)."""
    policy: service.SharePolicy | None = current_app.extensions.get("share_policy")
    if policy is None:
        policy = service.SharePolicy.from_settings(current_app.config["PORTAL"],
                                                   current_app.config["SECRET_KEY"])
        current_app.extensions["share_policy"] = policy
    return policy


def share_url(token: str, language: str = "") -> str:
    """The link to hand out: the landing page with the token in the fragment, and the link's
    language in the query (not secret: the page opens in it, docs/i18n.md)."""
    # Absolute URLs follow PUBLIC_URL when it is set (portal.security.PublicHost).
    if language in SUPPORTED:
        return f"{url_for('sharing.landing', lang=language, _external=True)}#{token}"
    return f"{url_for('sharing.landing', _external=True)}#{token}"


def _in_language(language: str) -> contextlib.AbstractContextManager[None]:
    """Write a message in the link's language (the sender's current one when it has none)."""
    return force_locale(language) if language in SUPPORTED else contextlib.nullcontext()


def _landing_language() -> str:
    """The language the link's address names (``/s?lang=de``), or ''."""
    code = request.args.get("lang", "")
    return code if code in SUPPORTED else ""


def _link_language_hint() -> None:
    """The landing page and the exchange open in the language the link names, unless the
    visitor chose another one (portal/i18n.py ``select_locale``, docs/i18n.md)."""
    if request.endpoint in ("sharing.landing", "sharing.exchange"):
        code = _landing_language()
        if code:
            g.link_language = code


def _address() -> str:
    return request.remote_addr or ""


def _user() -> Principal:
    principal = current_principal()
    if principal is None or principal.kind != "user":
        abort(404)
    return principal


def _visitor() -> Principal | None:
    principal = current_principal()
    return principal if principal is not None and principal.kind == "share" else None


def _recent_sign_in() -> BaseResponse | None:
    """Creating and revoking links need a recent, strong sign-in (docs/security.md 8)."""
    return require_recent_sign_in("sharing.my_links")


def within_creation_limit(principal: Principal) -> bool:
    """Count one new link of this person; False past SHARE_CREATE_PER_HOUR (docs/security.md 22)."""
    # Counted in the request's transaction when in the database: the new link's rows are
    # already written there (a second SQLite writer would wait for it), and a refused or
    # failed creation then takes its count back with it.
    return rate_limiter().hit(f"share-create:{principal.id}",
                              limit=current_app.config["PORTAL"]["SHARE_CREATE_PER_HOUR"],
                              window=3600, session=db.session)


def unavailable() -> Response:
    """The one answer for unknown, expired, revoked and locked links (docs/security.md 16)."""
    return Response(render_template("sharing/unavailable.html"), status=404,
                    mimetype="text/html")


def too_many() -> Response:
    """Per-address or per-sender limit reached."""
    return Response(render_template("sharing/too_many.html"), status=429,
                    mimetype="text/html", headers={"Retry-After": "600"})


def _tell_sender(public_id: str, message: Callable[[str, str], tuple[str, str]]) -> None:
    """E-mail the link's sender a notice (in the background; best effort, no patient data)."""
    settings = dict(current_app.config["PORTAL"])
    if not settings["SMTP_URL"]:
        return
    link = db.session.scalars(select(ShareLink).where(
        ShareLink.public_id == public_id)).first()
    to = service.sender_email(db.session, link) if link is not None else ""
    if link is None or not to:
        return
    manage = url_for("sharing.link_detail", public_id=public_id, _external=True)
    # Written for the sender, in his own account's language, not in the visitor's.
    with force_locale(service.sender_language(db.session, link) or "en"):
        subject, body = message(PORTAL_NAME, manage)

    def send() -> None:
        with contextlib.suppress(notify.DeliveryFailed):  # logged; a notice is best effort
            notify.send_email(settings, to, subject, body)

    threading.Thread(target=send, name="share-notice", daemon=True).start()


def _notify_sender(exchanged: service.Exchanged) -> None:
    """Tell the sender once, on the first use, if he asked for it."""
    if exchanged.first_use and exchanged.notify_sender:
        _tell_sender(exchanged.public_id, messages.first_use_email)


# -- the landing page and the exchange -------------------------------------------------------

@bp.get("/s")
@public
def landing() -> str:
    """The link's page: explains, asks for the PIN, changes nothing (preview bots)."""
    return render_template("sharing/landing.html", message="", token="",
                           link_language=_landing_language())


FAILED_OPENINGS = "share-exchange-failed:all"  # one count for every address


def _guessing_alert(what: str) -> None:
    """A security alert (110113) when share links look guessed: once per window and scope."""
    log.warning("share links may be being guessed: %s", what)
    audit.record(db, audit.SECURITY_ALERT, action="E", outcome=audit.OUTCOME_MINOR_FAILURE,
                 who="anonymous", source_address=_address(),
                 details={"type": "share link guessing", "reason": what})


@bp.post("/s/exchange")
@public
def exchange() -> BaseResponse:
    """Exchange the token (and PIN) for a share session, then leave the token behind."""
    settings = current_app.config["PORTAL"]
    limiter, everyone = rate_limiter(), settings["SHARE_FAILED_OPENINGS"]
    # Links are being guessed from many addresses: openings that find no open link wait.
    # A link that exists still reaches its PIN check (its own lock guards it), so guessers
    # cannot lock every patient out (docs/security.md 51).
    crowded = limiter.count(FAILED_OPENINGS, window=600, add=0) > everyone
    mine = limiter.count(f"share-exchange:{address_key(_address())}", window=600)
    if mine > settings["SHARE_ATTEMPTS_PER_ADDRESS"]:
        if mine == settings["SHARE_ATTEMPTS_PER_ADDRESS"] + 1:
            _guessing_alert("one address reached its limit of link openings")
        return too_many()
    token = request.form.get("token", "").strip()[:200]
    pin = request.form.get("pin", "")[:32]
    device = messages.device_class(request.headers.get("User-Agent", ""))
    try:
        exchanged = service.exchange(db, share_policy(), token=token, pin=pin,
                                     address=_address(), device=device,
                                     record_unavailable=not crowded)
    except service.LinkUnavailable:
        if crowded:  # unknown and ended links alike (docs/security.md 16)
            return too_many()
        if limiter.count(FAILED_OPENINGS, window=600) == everyone + 1:
            _guessing_alert("unknown or ended links were opened from many addresses")
        return unavailable()
    except service.PinRequired:
        return Response(render_template("sharing/landing.html", token=token,
                                        message=_("Please enter the PIN you were given."),
                                        link_language=_landing_language()),
                        status=401)
    except service.WrongPin as wrong:
        text = ngettext("That PIN is not right. You can try %(num)d more time.",
                        "That PIN is not right. You can try %(num)d more times.", wrong.remaining)
        return Response(render_template("sharing/landing.html", token=token, message=text,
                                        link_language=_landing_language()),
                        status=401)
    except service.LinkLocked:
        # This attempt locked the link: its sender hears of it (docs/security.md 20).
        locked = service.find_link(db, token)
        if locked is not None:
            _tell_sender(locked.public_id, messages.locked_email)
        return Response(render_template("sharing/locked.html"), status=403)
    _notify_sender(exchanged)
    if exchanged.purpose == "claim":
        target = url_for("sharing.claim")
    elif len(exchanged.study_uids) == 1:
        target = url_for("studies.study_page", study_uid=exchanged.study_uids[0])
    else:
        target = url_for("sharing.shared_home")
    response = redirect(target, code=303)
    set_share_cookie(response, exchanged.session_token, share_policy().session_absolute)
    return response


# -- the visitor's pages ---------------------------------------------------------------------

@bp.get("/shared")
@share_visible
@public
def shared_home() -> Response | str:
    """What the link opens: its studies, how long it lasts, who opened them."""
    visitor = _visitor()
    if visitor is None:
        return _ended()
    link = db.session.get(ShareLink, visitor.id)
    if link is None:
        return _ended()
    studies = db.session.scalars(visible_studies(visitor).options(
        selectinload(Study.patient)).order_by(Study.study_date.desc())).all()
    audit.record(db, audit.QUERY, action="E", outcome=audit.OUTCOME_SUCCESS,
                 who=visitor.audit_name, source_address=_address(),
                 details={"share": link.public_id, "results": len(studies)})
    return render_template("sharing/shared_home.html", link=link, studies=studies)


@bp.get("/shared/accesses")
@share_visible
@public
def shared_accesses() -> Response | str:
    """Who opened my images: every access to the shared studies, from the audit trail."""
    visitor = _visitor()
    link = db.session.get(ShareLink, visitor.id) if visitor is not None else None
    if visitor is None or link is None:
        return _ended()
    rows = service.accesses(db.session, link, others_addresses=False)
    audit.record(db, audit.AUDIT_LOG_USED, action="R", outcome=audit.OUTCOME_SUCCESS,
                 who=visitor.audit_name, source_address=_address(),
                 details={"share": link.public_id})
    return render_template("sharing/accesses.html", rows=rows, link=link)


@bp.post("/shared/close")
@share_visible
@public
def close() -> BaseResponse:
    """End the share session on this device (the link itself still works)."""
    token = request.cookies.get(cookie_name(current_app), "")
    if token:
        service.end_share_session(db, token)
    response = redirect(url_for("sharing.closed"), code=303)
    clear_share_cookie(response)
    # Images the browser kept (rendered frames are cached privately) leave with the session:
    # a phone or a family computer is often shared (docs/security.md 5).
    response.headers["Clear-Site-Data"] = '"cache", "cookies", "storage"'
    return response


# The share cookie's value after "Close": no session, only a mark that this browser was a
# visitor, so that Back to a shared page shows the closed page, not the practice's sign-in.
CLOSED_MARK = "closed"


@bp.get("/s/closed")
@public
def closed() -> Response:
    """Where "Close" ends: says the images are closed and how to open them again."""
    response = Response(render_template("sharing/closed.html"), mimetype="text/html")
    set_share_cookie(response, CLOSED_MARK, timedelta(hours=12))
    return response


def _ended() -> Response:
    if request.cookies.get(cookie_name(current_app)) == CLOSED_MARK:
        return Response(render_template("sharing/closed.html"), status=401,
                        mimetype="text/html")
    response = Response(render_template("sharing/ended.html"), status=401,
                        mimetype="text/html")
    clear_share_cookie(response)
    return response


@bp.get("/shared/claim")
def claim() -> Response | str:
    """A colleague link that asks for sign-in: confirm to get access under one's own name."""
    _user()
    if current_visit("claim") is None:
        return unavailable()
    return render_template("sharing/claim.html")


@bp.post("/shared/claim")
def accept_claim() -> BaseResponse:
    """Give the signed-in colleague a grant on the link's studies (audited)."""
    user = _user()
    visit = current_visit("claim")
    if visit is None:
        return unavailable()
    try:
        uids = service.claim_for_colleague(db.session, user, visit.link_id)
    except service.LinkUnavailable:
        db.session.rollback()
        return unavailable()
    db.after_commit(forget_cached_visits)
    flash(_("The study has been added to your studies."))
    response = redirect(url_for("studies.study_page", study_uid=uids[0]), code=303)
    clear_share_cookie(response)
    return response


# -- the sender's pages ----------------------------------------------------------------------

def _form_days() -> int | None:
    text = request.form.get("days", "").strip()
    if not text:
        return None
    try:
        return int(text)
    except ValueError as exc:
        raise service.ShareError("the number of days is a whole number") from exc


@bp.get("/studies/<study_uid>/share")
def share_form(study_uid: str) -> str:
    """The form to share one study (or every study of its patient)."""
    principal = _user()
    study = require_study(db.session, principal, study_uid)
    audit.record(db, audit.INSTANCES_ACCESSED, action="R", outcome=audit.OUTCOME_SUCCESS,
                 who=principal.audit_name, source_address=_address(),
                 study_instance_uid=study.study_instance_uid,
                 patient_id=study.patient.patient_id, details={"view": "share form"})
    links = service.list_links(db.session, principal, study_uid=study_uid, limit=50)
    # A patient shares his own scan with a doctor: his own form, in plain words.
    template = "patients/share.html" if is_patient_user(principal) \
        else "sharing/share_form.html"
    # The message's language: the patient's own when the portal knows it, else the sender's.
    recipient = service.KnownLanguage("", "") if is_patient_user(principal) \
        else service.recipient_language(db.session, study, "patient")
    return render_template(template, study=study, policy=share_policy(),
                           languages=language_choices(), recipient=recipient,
                           language=recipient.language or str(get_locale() or "en"),
                           series=study_series(db.session, principal, study),
                           links=links, now=utcnow(), state=link_state,
                           may_share=bool(share_audiences(principal)))


@bp.post("/studies/<study_uid>/share")
def create(study_uid: str) -> BaseResponse | str:
    """Make the link and show it (with its PIN and QR code) once."""
    principal = _user()
    require_study(db.session, principal, study_uid)
    again = _recent_sign_in()
    if again is not None:
        if again.status_code == 302:
            # Back to this form after the fresh sign-in (no Referer is ever sent to say so);
            # static/js/share_form.js puts the choices back.
            again.location = url_for("auth.login", reauth="1", next=url_for(
                "sharing.share_form", study_uid=study_uid))
        return again
    form = request.form
    audience: Literal["patient", "physician"] = \
        "physician" if form.get("audience") == "physician" else "patient"
    # A language the portal does not offer is a refused form (400 with the reason), not a
    # choice to correct: the form offers only SUPPORTED.
    language = service.message_language(form.get("language") or str(get_locale() or "en"))
    try:
        made = service.create_share(
            db.session, principal, share_policy(), study_uid=study_uid,
            whole_patient=form.get("scope") == "patient", audience=audience,
            requires_sign_in=audience == "physician" and form.get("colleague") == "sign_in",
            can_download=form.get("download") == "on", with_pin=form.get("pin") == "on",
            days=_form_days(), note=form.get("note", ""),
            notify_sender=form.get("notify") == "on", message=form.get("message", ""),
            language=language,
            series_uids=form.getlist("series") if form.get("scope") == "series" else ())
    except service.ShareError as exc:
        db.session.rollback()
        flash(_(str(exc)), "error")
        return redirect(url_for("sharing.share_form", study_uid=study_uid))
    if not within_creation_limit(principal):
        db.session.rollback()
        return too_many()
    return _created_page(made.link, made.token, made.pin)


def _created_page(link: ShareLink, token: str, pin: str | None, status: int = 201) -> Response:
    url = share_url(token, link.language)
    return Response(render_template("sharing/created.html", link=link, url=url, token=token,
                                    pin=pin, qr=messages.qr_data_uri(url),
                                    email_ready=bool(current_app.config["PORTAL"]["SMTP_URL"]),
                                    sms_ready=bool(
                                        current_app.config["PORTAL"]["SMS_WEBHOOK_URL"])),
                    status=status)


def deliver(link: ShareLink, *, token: str, pin: str | None, channel: str, to: str,
            what: str) -> None:
    """Send the link (e-mail or SMS) or the PIN (SMS, never by the link's own channel)."""
    settings = current_app.config["PORTAL"]
    service.check_own_secret(link, token, pin if what == "pin" else None, share_policy())
    days_left = max(1, (link.expires_at - utcnow()).days)
    with _in_language(link.language):
        digest = _deliver(link, settings, token=token, pin=pin, channel=channel, to=to,
                          what=what, days_left=days_left)
    service.record_delivery(link, what, channel, digest)


def _deliver(link: ShareLink, settings: dict[str, Any], *, token: str, pin: str | None,
             channel: str, to: str, what: str, days_left: int) -> str:
    """Write and send one message (in the locale the caller chose); the recipient's digest."""
    url = share_url(token, link.language)
    if what == "pin":
        if not pin or channel != "sms":
            raise service.ShareError("a PIN goes by text message, apart from the link")
        digest = notify.address_digest(notify.clean_phone(to))
        if any(d.get("what") == "link" and d.get("to_sha256") == digest
               for d in link.deliveries):
            raise service.ShareError("the PIN must not go to where the link went; "
                                     "print it or send it to another number")
        notify.send_sms(settings, to, messages.pin_sms(PORTAL_NAME, pin), "share_pin")
    elif channel == "email":
        digest = notify.address_digest(notify.clean_email(to))
        subject, body = messages.link_email(PORTAL_NAME, url, days_left, bool(link.pin_hash))
        notify.send_email(settings, to, subject, body)
    elif channel == "sms":
        digest = notify.address_digest(notify.clean_phone(to))
        if any(d.get("what") == "pin" and d.get("to_sha256") == digest
               for d in link.deliveries):
            raise service.ShareError("the link must not go to where the PIN went; "
                                     "send it by e-mail or to another number")
        notify.send_sms(settings, to, messages.link_sms(PORTAL_NAME, url), "share_link")
    else:
        raise service.ShareError("choose e-mail or text message")
    return digest


@bp.post("/shares/<public_id>/send")
def send(public_id: str) -> Response:
    """Send a link just made by e-mail or SMS, or its PIN by SMS; then show the page again."""
    principal = _user()
    form = request.form
    pin = form.get("pin") or None
    # NoSuchLink, 404: missing, or a link this person may not manage: the same answer
    link = service.get_link(db.session, principal, public_id)
    try:
        deliver(link, token=form.get("token", ""), pin=pin, channel=form.get("channel", ""),
                to=form.get("to", ""), what="pin" if form.get("what") == "pin" else "link")
    except (service.ShareError, notify.DeliveryFailed) as exc:
        db.session.rollback()
        flash(_(str(exc)), "error")
        link = service.get_link(db.session, principal, public_id)
        return _created_page(link, form.get("token", ""), pin, status=400)
    flash(_("The PIN was sent.") if form.get("what") == "pin" else _("The link was sent."))
    return _created_page(link, form.get("token", ""), pin, status=200)


@bp.get("/shares")
def my_links() -> str:
    """The links I made (an office manager sees every link)."""
    principal = _user()
    links = service.list_links(db.session, principal)
    return render_template("sharing/links.html", links=links, now=utcnow(),
                           state=link_state)


@bp.get("/shares/<public_id>")
def link_detail(public_id: str) -> str:
    """One link: its state, uses and every access."""
    principal = _user()
    link = service.get_link(db.session, principal, public_id)  # or NoSuchLink, 404
    # A patient is told who opened his link, not where from (as on the visitor's page).
    return render_template("sharing/link.html", link=link, state=link_state(link),
                           rows=service.accesses(db.session, link,
                                                 others_addresses=not is_patient_user(principal)))


@bp.post("/shares/<public_id>/revoke")
def revoke(public_id: str) -> BaseResponse:
    """Revoke one link; open share sessions end at once."""
    principal = _user()
    again = _recent_sign_in()
    if again is not None:
        return again
    service.revoke_link(db.session, principal, public_id)  # or NoSuchLink, 404
    flash(_("The link has been revoked. Anyone viewing through it is cut off."))
    return redirect(_back_or(url_for("sharing.link_detail", public_id=public_id)))


@bp.post("/shares/revoke-all")
def revoke_all() -> BaseResponse:
    """Revoke every link of a study, or of the study's patient."""
    principal = _user()
    again = _recent_sign_in()
    if again is not None:
        return again
    study_uid = request.form.get("study_uid", "")[:64]
    require_study(db.session, principal, study_uid)
    if request.form.get("scope") == "patient":
        count = service.revoke_links_of_patient(db.session, principal, study_uid)
    else:
        count = service.revoke_links_of_study(db.session, principal, study_uid)
    flash(ngettext("%(num)d link revoked.", "%(num)d links revoked.", count))
    return redirect(_back_or(url_for("sharing.share_form", study_uid=study_uid)))


def _back_or(default: str) -> str:
    back = urlsplit(request.referrer or "")
    if back.netloc == request.host and back.path.startswith(("/shares", "/admin/shares",
                                                             "/studies/", "/my/")):
        return back.path
    return default


# -- wiring ----------------------------------------------------------------------------------

def _ended_share_pages() -> Response | None:
    """A patient whose share session ended sees a plain page, not a staff sign-in; his
    viewer's image requests get a 401 without a Basic challenge (no password dialog)."""
    name = cookie_name(current_app)
    if name not in request.cookies or request.headers.get("Authorization"):
        return None
    if request.endpoint in (None, "static") or (request.endpoint or "").startswith("sharing.") \
            or policy_is_public(request.endpoint):
        return None
    if any(c in request.cookies for c in ("__Host-portal", "portal")):
        return None
    if current_visit("view") is not None or current_visit("claim") is not None:
        return None
    if request.path.startswith(("/dicomweb", "/api")):
        # The cookie stays until a page says why the images stopped (``_ended`` clears it).
        return error_response(401, "the shared view has ended; open the link again")
    return _ended() if request.method == "GET" else None


def _noindex(response: Response) -> Response:
    if (request.endpoint or "").startswith(_NOINDEX_ENDPOINTS) or g.get("share_visit"):
        response.headers["X-Robots-Tag"] = "noindex, nofollow"
    return response


def init_app(app: Flask) -> None:
    """Rate limiter, the ended-session page and the noindex header (before the policy hook);
    share sessions become principals through the loader registered with access."""
    register_visitor(app, share_principal)
    init_limits(app)
    app.before_request(_link_language_hint)
    app.before_request(_ended_share_pages)
    app.after_request(_noindex)
