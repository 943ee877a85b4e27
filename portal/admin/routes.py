"""The office-manager console: people, referrer identifiers, grants, break-glass, audit.

One blueprint with one guard: only office managers reach any of it. Changes need a recent
sign-in (SECURITY.md 8); without one the browser is sent to sign in again and comes back.
"""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime
from typing import Any

from flask import (
    Blueprint,
    Response,
    flash,
    redirect,
    render_template,
    request,
    url_for,
)
from sqlalchemy import select

from portal.access import audit
from portal.access.grants import (
    create_grant,
    grant_state,
    link_identifier,
    link_patient,
    revoke_grants,
    unlink_identifier,
    unmatched_referrers,
    update_user,
)
from portal.access.invitations import create_invitation
from portal.access.models import Grant, Practice, ReferrerIdentifier, User
from portal.access.policy import require_role
from portal.access.principal import Principal, current_principal
from portal.access.users import ROLES, UserError
from portal.auth.recent import require_recent_sign_in
from portal.db import db, utcnow
from portal.numbers import bounded_int

bp = Blueprint("admin", __name__, url_prefix="/admin")


def _manager() -> Principal:
    return require_role(current_principal(), "office_manager")


@bp.before_request
def _guard() -> Response | None:
    """Office managers only; changes need a sign-in within the configured minutes."""
    _manager()
    if request.method == "POST":
        return require_recent_sign_in("admin.index")
    return None


def _done(message: str, endpoint: str) -> Response:
    db.session.commit()
    flash(message)
    return redirect(url_for(endpoint))


def _failed(exc: UserError, endpoint: str) -> Response:
    db.session.rollback()
    flash(str(exc), "error")
    return redirect(url_for(endpoint))


@bp.get("/")
def index() -> str:
    """Overview of the console."""
    return render_template("admin/index.html")


@bp.get("/users")
def users() -> str:
    """Everybody who has signed in, with roles, practice and state."""
    rows = list(db.session.scalars(select(User).order_by(User.display_name, User.id)))
    practices = {p.id: p.name for p in db.session.scalars(select(Practice))}
    return render_template("admin/users.html", users=rows, practices=practices, roles=ROLES)


@bp.post("/users/<int:user_id>")
def change_user(user_id: int) -> Response:
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
        return _done("Saved. The user's open sessions have ended.", "admin.users")
    return _done("Saved.", "admin.users")


@bp.post("/invitations")
def invite() -> Response:
    """Make a one-time invitation link and show it once."""
    form = request.form
    try:
        token = create_invitation(db.session, _manager(), email=form.get("email", ""),
                                  roles=[r for r in ROLES if form.get(f"role_{r}")],
                                  practice=form.get("practice", ""))
    except UserError as exc:
        return _failed(exc, "admin.users")
    link = url_for("auth.invitation", t=token, _external=True)
    return _done(f"Send this link to {form.get('email', '') or 'the person'} (it works once, "
                 f"for 7 days, and is not shown again): {link}", "admin.users")


@bp.get("/identifiers")
def identifiers() -> str:
    """Linked referrer identifiers and suggestions from studies nobody is linked to."""
    linked = db.session.execute(select(ReferrerIdentifier, User).join(
        User, ReferrerIdentifier.user_fk == User.id).order_by(ReferrerIdentifier.key)).all()
    physicians = [u for u in db.session.scalars(select(User).order_by(User.display_name))
                  if "physician" in u.roles]
    return render_template("admin/identifiers.html", linked=linked, physicians=physicians,
                           suggestions=unmatched_referrers(db.session))


@bp.post("/identifiers")
def add_identifier() -> Response:
    """Link a physician to an identifier."""
    try:
        link_identifier(db.session, _manager(),
                        bounded_int(request.form.get("user_id", "0"), "user_id"),
                        request.form.get("key", ""))
    except UserError as exc:
        return _failed(UserError(str(exc)), "admin.identifiers")
    return _done("Identifier linked.", "admin.identifiers")


@bp.post("/identifiers/<int:identifier_id>/delete")
def remove_identifier(identifier_id: int) -> Response:
    """Unlink an identifier."""
    try:
        unlink_identifier(db.session, _manager(), identifier_id)
    except UserError as exc:
        return _failed(exc, "admin.identifiers")
    return _done("Identifier removed.", "admin.identifiers")


def _parse_expiry(text: str) -> datetime | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(text).replace(tzinfo=UTC)
    except ValueError as exc:
        raise UserError("the expiry is not a date and time") from exc


@bp.get("/grants")
def grants() -> str:
    """Every grant with its state."""
    rows = db.session.execute(select(Grant, User).join(User, Grant.user_fk == User.id)
                              .order_by(Grant.id.desc()).limit(500)).all()
    people = list(db.session.scalars(select(User).where(User.active.is_(True))
                                     .order_by(User.display_name)))
    now = utcnow()
    return render_template("admin/grants.html", rows=[(g, u, grant_state(g, now))
                                                      for g, u in rows], people=people)


@bp.post("/grants")
def add_grant() -> Response:
    """Create a grant, or open emergency access with a written reason."""
    form = request.form
    try:
        create_grant(db.session, _manager(),
                     user_id=bounded_int(form.get("user_id", "") or "0", "user_id"),
                     study_uid=form.get("study_uid", "").strip() or None,
                     patient_id=form.get("patient_id", "").strip() or None,
                     expires_at=_parse_expiry(form.get("expires_at", "")),
                     reason=form.get("reason", ""), break_glass=form.get("break_glass") == "on")
    except (UserError, ValueError) as exc:
        return _failed(UserError(str(exc)), "admin.grants")
    return _done("Access granted.", "admin.grants")


@bp.post("/grants/<int:grant_id>/revoke")
def revoke_grant(grant_id: int) -> Response:
    """Revoke one grant at once."""
    try:
        revoke_grants(db.session, _manager(), [grant_id])
    except UserError as exc:
        return _failed(exc, "admin.grants")
    return _done("Access revoked.", "admin.grants")


@bp.get("/shares")
def shares() -> str:
    """Every share link with its state, uses and last use (revoking goes through /shares)."""
    from portal.sharing.service import link_state, list_links

    return render_template("admin/shares.html", links=list_links(db.session, _manager()),
                           state=link_state, now=utcnow())


def _audit_rows() -> list[Any]:
    args = request.args
    principal = _manager()
    rows = list(audit.iter_events(db.session, who=args.get("who", "")[:200],
                                  study=args.get("study", "")[:64],
                                  event_id=args.get("event", "")[:16], limit=500))
    audit.record(db, audit.AUDIT_LOG_USED, action="R", outcome=audit.OUTCOME_SUCCESS,
                 who=principal.audit_name, source_address=request.remote_addr or "",
                 details={"filter": {k: v[:64] for k, v in args.items()}})
    return rows


@bp.get("/audit")
def audit_trail() -> str:
    """The audit trail, newest first, with filters (reading it is itself audited)."""
    return render_template("admin/audit.html", rows=_audit_rows(), args=request.args)


@bp.get("/audit.csv")
def audit_csv() -> Response:
    """The filtered audit trail as CSV."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["id", "time_utc", "event_id", "event", "action", "outcome", "who",
                     "source", "study_instance_uid", "patient_id", "details", "hash"])
    for row in _audit_rows():
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
