"""The office-manager console: people, referrer identifiers, grants, break-glass, audit.

One blueprint with one guard: only office managers reach any of it. Changes need a recent
sign-in (docs/security.md 8); without one the browser is sent to sign in again and comes back.
"""

from __future__ import annotations

import csv
import io
from datetime import UTC, date, datetime, time
from typing import Any

from flask import (
    Blueprint,
    Response,
    abort,
    current_app,
    flash,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from flask_babel import gettext as _
from flask_babel import ngettext
from sqlalchemy import and_, select
from werkzeug.wrappers import Response as BaseResponse

from portal import audit, jobs
from portal.access.grants import (
    grant_many,
    grant_one,
    grant_state,
    link_identifier,
    link_patient,
    live_grants_of,
    regrant,
    revoke_everything_of,
    revoke_grants,
    unlink_identifier,
    unmatched_referrers,
    update_user,
)
from portal.access.invitations import create_invitation
from portal.access.models import AuditEvent, Practice, ReferrerIdentifier, User
from portal.access.policy import require_role, study_filter
from portal.access.principal import Principal, current_principal
from portal.access.users import ROLES, UserError, people_condition
from portal.admin import console
from portal.auth.recent import require_recent_sign_in
from portal.db import db, utcnow
from portal.failures import Invalid
from portal.i18n import reason_text
from portal.index.models import Patient, Study
from portal.numbers import bounded_int
from portal.studies.service import MODALITIES, StudySearch

bp = Blueprint("admin", __name__, url_prefix="/admin")


@bp.app_template_global("page_args")
def page_args(page: int) -> dict[str, Any]:
    """This page's query with another page number, for the pager's links. Names starting
    with "_" are dropped: url_for would obey ``_external``, ``_scheme`` (a ``javascript:``
    link) and ``_anchor`` taken from the address bar."""
    kept = {k: v for k, v in request.args.items() if not k.startswith("_")}
    return {**(request.view_args or {}), **kept, "page": page}


def _manager() -> Principal:
    return require_role(current_principal(), "office_manager")


@bp.before_request
def _guard() -> BaseResponse | None:
    """Office managers only; changes need a sign-in within the configured minutes."""
    _manager()
    if request.method == "POST":
        return require_recent_sign_in("admin.index")
    return None


def _done(message: str, endpoint: str) -> BaseResponse:
    flash(message)
    return redirect(url_for(endpoint))


def _failed(exc: UserError, endpoint: str) -> BaseResponse:
    db.session.rollback()
    flash(reason_text(exc), "error")
    return redirect(url_for(endpoint))


def _page() -> int:
    return bounded_int(request.args.get("page", "1") or "1", "page", low=1, high=10_000)


def _day(text: str, name: str) -> date | None:
    """A date from a form (YYYY-MM-DD), None when empty; a 400 naming the field otherwise."""
    if not text:
        return None
    try:
        return date.fromisoformat(text[:10])
    except ValueError:
        raise Invalid("%(name)s is not a date (YYYY-MM-DD)", name=name) from None


def _study_search() -> StudySearch:
    args = request.args
    return StudySearch(text=args.get("q", "")[:64], date_from=args.get("from", "")[:10],
                       date_to=args.get("to", "")[:10], modality=args.get("modality", "")[:16],
                       page=_page(), oldest_first=args.get("sort") == "oldest")


@bp.get("/")
def index() -> str:
    """What needs attention, one search box for studies, patients and people, and the tasks."""
    principal = _manager()
    search = _study_search()
    rows: list[Any] = []
    more = False
    people: list[User] = []
    if search.text:
        rows, more = console.find_studies(db.session, principal, search)
        people = console.find_people(db.session, principal, search.text)
    return render_template("admin/index.html", q=search.text, rows=rows, more=more,
                           patients=console.patients_in(rows), people=people,
                           attention=console.attention(db.session, principal),
                           failed_jobs=jobs.failed_in_words(
                               current_app._get_current_object()),  # type: ignore[attr-defined]
                           month_from=console.month_start(utcnow().date()).isoformat(),
                           today=utcnow().date().isoformat())


def _chosen_people() -> list[User]:
    ids = [bounded_int(v, "user") for v in request.values.getlist("user")[:50]]
    return list(db.session.scalars(select(User).where(
        User.id.in_(ids), people_condition(_manager())))) if ids else []


@bp.get("/give")
def give() -> str:
    """Give access: find the studies (or a patient's every study) and the people, pick them,
    set until when and why. Nothing is chosen at first."""
    principal = _manager()
    search = _study_search()
    rows: list[Any] = []
    more = False
    if search.text or search.date_from or search.date_to or search.modality:
        rows, more = console.find_studies(db.session, principal, search)
    uids = request.args.getlist("study")[:50]
    # Only studies the practice may see are named back (a UID from elsewhere says nothing).
    chosen_studies = list(db.session.execute(
        select(Study, Patient).join(Patient, Study.patient_fk == Patient.id)
        .where(Study.study_instance_uid.in_(uids), study_filter(principal)))) if uids else []
    records = [bounded_int(v, "patient") for v in request.args.getlist("patient")[:50]]
    chosen_patients = [p for p in (console.visible_patient(db.session, principal, r)
                                   for r in records) if p is not None]
    who = request.args.get("who", "")[:100]
    return render_template("admin/give.html", search=search, rows=rows, more=more,
                           modalities=MODALITIES, who=who,
                           people=console.find_people(db.session, principal, who),
                           chosen_people=_chosen_people(), chosen_studies=chosen_studies,
                           chosen_patients=chosen_patients,
                           emergency=request.args.get("emergency") == "1")


def _until(text: str) -> datetime | None:
    """The end of the chosen day (UTC), or None for no end."""
    day = _day(text, "until")
    if day is None:
        return None
    return datetime.combine(day, time(23, 59, 59), tzinfo=UTC)


@bp.post("/give")
def give_access() -> BaseResponse:
    """Grant the chosen studies and patients to the chosen people (one grant and one audit
    record each; all or nothing)."""
    form = request.form
    try:
        made = grant_many(
            db.session, _manager(),
            user_ids=[bounded_int(v, "user") for v in form.getlist("user")[:50]],
            study_uids=[v[:64] for v in form.getlist("study")[:100]],
            patient_records=[bounded_int(v, "patient") for v in form.getlist("patient")[:50]],
            expires_at=_until(form.get("until", "")), reason=form.get("reason", ""))
    except UserError as exc:
        db.session.rollback()
        flash(reason_text(exc), "error")
        chosen: dict[str, Any] = {k: form.getlist(k) for k in ("user", "study", "patient")}
        return redirect(url_for("admin.give", **chosen))
    people = {g.user_fk for g in made}
    flash(ngettext("Access given: %(num)d grant", "Access given: %(num)d grants", len(made))
          + " " + ngettext("for %(num)d person.", "for %(num)d people.", len(people)))
    if len(people) == 1:
        return redirect(url_for("admin.person", user_id=people.pop()))
    return redirect(url_for("admin.grants"))


@bp.get("/people/<int:user_id>")
def person(user_id: int) -> str:
    """What one person was given, with a way to take all of it away."""
    user = console.visible_person(db.session, _manager(), user_id) or abort(404)
    rows, more = console.grant_list(db.session, _manager(), user_id=user_id, state="live",
                                    page=_page())
    return render_template("admin/person.html", user=user, more=more, page=_page(),
                           rows=[(r, grant_state(r.grant)) for r in rows],
                           live=len(live_grants_of(db.session, user_id, _manager())),
                           undo=session.get("console_undo") or [])


@bp.get("/people/<int:user_id>/take-away")
def confirm_take_away(user_id: int) -> str:
    """Say exactly what taking everything away will do, and ask once."""
    user = console.visible_person(db.session, _manager(), user_id) or abort(404)
    grants = live_grants_of(db.session, user_id, _manager())
    rows = console.grant_rows(db.session, [(g, user) for g in grants])
    return render_template("admin/take_away.html", user=user,
                           rows=[(r, grant_state(r.grant)) for r in rows])


@bp.post("/people/<int:user_id>/take-away")
def take_away(user_id: int) -> BaseResponse:
    """Revoke every live grant of a person (one audit record each); undo stays offered."""
    try:
        ids = revoke_everything_of(db.session, _manager(), user_id)
    except UserError as exc:
        return _failed(exc, "admin.index")
    session["console_undo"] = ids
    flash(ngettext("Took away %(num)d grant.", "Took away %(num)d grants.", len(ids)))
    return redirect(url_for("admin.person", user_id=user_id))


@bp.post("/grants/restore")
def restore_grants() -> BaseResponse:
    """Undo: give back revoked grants with one tap (not emergency access)."""
    ids = [bounded_int(v, "grant") for v in request.form.getlist("grant")[:500]]
    try:
        made = regrant(db.session, _manager(), ids)
    except UserError as exc:
        return _failed(exc, "admin.grants")
    session.pop("console_undo", None)
    flash(ngettext("Given back: %(num)d grant.", "Given back: %(num)d grants.", len(made)))
    back = request.form.get("back", "")
    return redirect(back if back.startswith("/admin/") else url_for("admin.grants"))


@bp.post("/grants/revoke")
def revoke_selected() -> BaseResponse:
    """Revoke the ticked grants in one step (one audit record each); undo stays offered."""
    ids = [bounded_int(v, "grant") for v in request.form.getlist("grant")[:500]]
    if not ids:
        return _failed(UserError("tick at least one grant"), "admin.grants")
    try:
        revoke_grants(db.session, _manager(), ids)
    except UserError as exc:
        return _failed(exc, "admin.grants")
    session["console_undo"] = ids
    flash(ngettext("Revoked %(num)d grant.", "Revoked %(num)d grants.", len(ids)))
    return redirect(url_for("admin.grants"))


@bp.get("/patients/<int:record>")
def patient(record: int) -> str:
    """One patient: his studies, who saw them, and the links that open them."""
    principal = _manager()
    found = console.visible_patient(db.session, principal, record) or abort(404)
    return render_template("admin/patient.html", patient=found,
                           studies=console.patient_studies(db.session, principal, found),
                           links=console.open_links_of_patient(db.session, principal, found),
                           month_from=console.month_start(utcnow().date()).isoformat(),
                           today=utcnow().date().isoformat(), now=utcnow())


@bp.post("/links/revoke")
def revoke_links() -> BaseResponse:
    """Revoke the ticked share links in one step (each ends its open sessions)."""
    ids = [v[:36] for v in request.form.getlist("link")[:200]]
    back = request.form.get("back", "")
    target = back if back.startswith("/admin/") else url_for("admin.shares")
    try:
        count = console.revoke_links(db.session, _manager(), ids)
    except UserError as exc:
        db.session.rollback()
        flash(reason_text(exc), "error")
        return redirect(target)
    flash(ngettext("Revoked %(num)d link; its open sessions have ended.",
                   "Revoked %(num)d links; their open sessions have ended.", count))
    return redirect(target)


@bp.get("/invite")
def invite_form() -> str:
    """Invite a physician by e-mail and pick the referrer identifiers studies name him by."""
    principal = _manager()
    practice = db.session.get(Practice, principal.practice_id) \
        if principal.practice_id is not None else None
    return render_template("admin/invite.html", roles=ROLES,
                           suggestions=unmatched_referrers(db.session),
                           practice=practice.name if practice else "")


@bp.get("/users")
def users() -> str:
    """Everybody who has signed in (a manager of a practice: its people and those of no
    practice), with roles, practice and state."""
    rows = list(db.session.scalars(select(User).where(people_condition(_manager()))
                                   .order_by(User.display_name, User.id)))
    practices = {p.id: p.name for p in db.session.scalars(select(Practice))}
    return render_template("admin/users.html", users=rows, practices=practices, roles=ROLES)


@bp.post("/users/<int:user_id>")
def change_user(user_id: int) -> BaseResponse:
    """Change a user's roles, practice, activation, mobile number or text-message notices."""
    form = request.form
    before = db.session.get(User, user_id)
    epoch = before.security_epoch if before else None
    try:
        user = update_user(db.session, _manager(), user_id,
                           roles=[r for r in ROLES if form.get(f"role_{r}")],
                           practice=form.get("practice", ""),
                           active=form.get("active") == "on",
                           phone_number=form.get("phone_number"),
                           notify_by_sms=form.get("notify_by_sms") == "on")
        if form.get("patient_id", "").strip():
            link_patient(db.session, _manager(), user_id, form["patient_id"].strip())
    except UserError as exc:
        return _failed(exc, "admin.users")
    if user.security_epoch != epoch:
        return _done(_("Saved. The user's open sessions have ended."), "admin.users")
    return _done(_("Saved."), "admin.users")


@bp.post("/invitations")
def invite() -> BaseResponse:
    """Make a one-time invitation link and show it once."""
    form = request.form
    try:
        token = create_invitation(db.session, _manager(), email=form.get("email", ""),
                                  roles=[r for r in ROLES if form.get(f"role_{r}")],
                                  practice=form.get("practice", ""),
                                  referrer_keys=form.getlist("key")[:20])
    except UserError as exc:
        return _failed(exc, "admin.invite_form" if form.get("from") == "invite"
                       else "admin.users")
    link = url_for("auth.invitation", t=token, _external=True)
    return _done(_("Send this link to %(who)s (it works once, for 7 days, and is not shown "
                   "again): %(link)s", who=form.get("email", "") or _("the person"), link=link),
                 "admin.invite_form" if form.get("from") == "invite" else "admin.users")


@bp.get("/identifiers")
def identifiers() -> str:
    """Linked referrer identifiers (a practice's manager: of the people he may list) and
    suggestions from studies nobody is linked to."""
    people = people_condition(_manager())
    linked = db.session.execute(select(ReferrerIdentifier, User).join(
        User, ReferrerIdentifier.user_fk == User.id).where(people)
        .order_by(ReferrerIdentifier.key)).all()
    physicians = [u for u in db.session.scalars(select(User).where(people)
                                                .order_by(User.display_name))
                  if "physician" in u.roles]
    return render_template("admin/identifiers.html", linked=linked, physicians=physicians,
                           suggestions=unmatched_referrers(db.session))


@bp.post("/identifiers")
def add_identifier() -> BaseResponse:
    """Link a physician to an identifier."""
    try:
        link_identifier(db.session, _manager(),
                        bounded_int(request.form.get("user_id", "0"), "user_id"),
                        request.form.get("key", ""))
    except UserError as exc:
        return _failed(UserError(str(exc)), "admin.identifiers")
    return _done(_("Identifier linked."), "admin.identifiers")


@bp.post("/identifiers/<int:identifier_id>/delete")
def remove_identifier(identifier_id: int) -> BaseResponse:
    """Unlink an identifier."""
    try:
        unlink_identifier(db.session, _manager(), identifier_id)
    except UserError as exc:
        return _failed(exc, "admin.identifiers")
    return _done(_("Identifier removed."), "admin.identifiers")


def _parse_expiry(text: str) -> datetime | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(text).replace(tzinfo=UTC)
    except ValueError as exc:
        raise UserError("the expiry is not a date and time") from exc


@bp.get("/grants")
def grants() -> str:
    """Grants as a person reads them (patient, study, date; the UID only in details), a page
    at a time, newest or oldest first; tick several to revoke them at once."""
    state = request.args.get("state", "")
    rows, more = console.grant_list(db.session, _manager(),
                                    state=state if state in ("live", "expiring") else "",
                                    page=_page(),
                                    oldest_first=request.args.get("sort") == "oldest")
    now = utcnow()
    return render_template("admin/grants.html", rows=[(r, grant_state(r.grant, now))
                                                      for r in rows],
                           more=more, page=_page(), state=state,
                           sort=request.args.get("sort", ""),
                           undo=session.get("console_undo") or [])


@bp.post("/grants")
def add_grant() -> BaseResponse:
    """Create a grant, or open emergency access with a written reason."""
    form = request.form
    try:
        grant_one(db.session, _manager(),
                     user_id=bounded_int(form.get("user_id", "") or "0", "user_id"),
                     study_uid=form.get("study_uid", "").strip() or None,
                     patient_id=form.get("patient_id", "").strip() or None,
                     expires_at=_parse_expiry(form.get("expires_at", "")),
                     reason=form.get("reason", ""), break_glass=form.get("break_glass") == "on")
    except (UserError, ValueError) as exc:
        return _failed(UserError(str(exc)), "admin.grants")
    return _done(_("Access granted."), "admin.grants")


@bp.post("/grants/<int:grant_id>/revoke")
def revoke_grant(grant_id: int) -> BaseResponse:
    """Revoke one grant at once."""
    try:
        revoke_grants(db.session, _manager(), [grant_id])
    except UserError as exc:
        return _failed(exc, "admin.grants")
    return _done(_("Access revoked."), "admin.grants")


@bp.get("/shares")
def shares() -> str:
    """Every share link with its state, uses and last use; ``show`` expiring (within 7 days)
    or locked narrows the list (revoking goes through /shares)."""
    from portal.sharing.models import link_state
    from portal.sharing.service import list_links

    now, show = utcnow(), request.args.get("show", "")
    links = list_links(db.session, _manager())
    if show == "expiring":
        links = [link for link in links if link_state(link, now) in ("active", "pending")
                 and link.expires_at <= now + console.SOON]
    elif show == "locked":
        links = [link for link in links if link_state(link, now) == "locked"]
    return render_template("admin/shares.html", rows=console.link_rows(db.session, links),
                           state=link_state, now=now, show=show)


@bp.get("/shares/revoke")
def confirm_revoke_links() -> str | BaseResponse:
    """Say what revoking the chosen links does (they stop at once and cannot be reopened),
    and ask once."""
    from portal.sharing.models import link_state
    from portal.sharing.service import get_link

    ids = list(dict.fromkeys(v[:36] for v in request.args.getlist("link")[:200]))
    if not ids:
        return _failed(UserError("tick at least one link"), "admin.shares")
    # NoSuchLink, 404: one unknown (or another practice's) link and none is shown
    links = [get_link(db.session, _manager(), public_id) for public_id in ids]
    now = utcnow()
    open_links = [link for link in links if link_state(link, now) in ("active", "pending",
                                                                      "locked")]
    return render_template("admin/revoke_links.html",
                           rows=console.link_rows(db.session, open_links),
                           closed=len(links) - len(open_links))


AUDIT_FILTERS = ("patient", "from", "to", "who", "event", "failed", "notices", "study", "sort")


def _audit_filter() -> tuple[Any, dict[str, Any]]:
    """The records the console's filters ask for, and what to show about the filters."""
    args = request.args
    principal = _manager()
    patient = None
    if args.get("patient"):
        patient = console.visible_patient(
            db.session, principal, bounded_int(args["patient"], "patient")) or abort(404)
    condition = console.audit_condition(
        db.session, principal, patient=patient, date_from=_day(args.get("from", ""), "from"),
        date_to=_day(args.get("to", ""), "to"), who=args.get("who", "")[:200],
        event_id=args.get("event", "")[:16], failed=args.get("failed") == "1",
        failed_notices=args.get("notices") == "failed")
    if args.get("study"):
        condition = and_(condition, AuditEvent.study_instance_uid
                                 == args["study"][:64])
    audit.record(db, audit.AUDIT_LOG_USED, action="R", outcome=audit.OUTCOME_SUCCESS,
                 who=principal.audit_name, source_address=request.remote_addr or "",
                 details={"filter": {k: v[:64] for k, v in args.items()}})
    return condition, {"patient": patient, "notices": args.get("notices") == "failed"}


@bp.get("/audit")
def audit_trail() -> str:
    """The audit trail, newest first, a page at a time, filtered by patient, dates, who or
    event (reading it is itself audited)."""
    condition, shown = _audit_filter()
    events, more = console.audit_page(db.session, condition, _page(),
                                      oldest_first=request.args.get("sort") == "oldest")
    # Only the filters go on to links: url_for would also obey _external, _scheme, _anchor.
    args = {k: v for k, v in request.args.items() if k in AUDIT_FILTERS}
    return render_template("admin/audit.html", rows=console.audit_rows(db.session, events),
                           more=more, page=_page(), args=args, **shown)


@bp.get("/audit.csv")
def audit_csv() -> Response:
    """The filtered audit trail as CSV."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["id", "time_utc", "event_id", "event", "action", "outcome", "who",
                     "source", "study_instance_uid", "patient_id", "details", "hash"])
    condition, _shown = _audit_filter()
    for row in db.session.scalars(select(AuditEvent).where(condition)
                                  .order_by(AuditEvent.id.desc()).limit(10_000)):
        writer.writerow([row.id, row.occurred_at.isoformat(), row.event_id, row.event_name,
                         row.action, row.outcome, _csv_safe(row.who),
                         _csv_safe(row.source_address), _csv_safe(row.study_instance_uid),
                         _csv_safe(row.patient_id), _csv_safe(str(row.details)),
                         row.record_hash])
    return Response(buffer.getvalue(), mimetype="text/csv", headers={
        "Content-Disposition": 'attachment; filename="audit.csv"'})


def _csv_safe(value: str) -> str:
    """Keep spreadsheet programs from running a value as a formula (CSV injection)."""
    return "'" + value if value[:1] in ("=", "+", "-", "@", "\t", "\r") else value
