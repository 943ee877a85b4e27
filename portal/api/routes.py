"""``/api``: people, referrer identifiers, grants and the audit trail as JSON.

The console's pages and this API call the same service functions. Callers: a signed-in office
manager (session + CSRF token) or a script with an office manager's bearer token.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from flask import Blueprint, Response, abort, jsonify, request, url_for
from sqlalchemy import select
from werkzeug.wrappers import Response as BaseResponse

from portal import audit
from portal.access.grants import (
    grant_one,
    grant_state,
    link_identifier,
    revoke_grants,
    unlink_identifier,
    unmatched_referrers,
    update_user,
    visible_grant_condition,
)
from portal.access.invitations import create_invitation
from portal.access.models import Grant, ReferrerIdentifier, User
from portal.access.policy import public, require_role, require_study
from portal.access.principal import Principal, current_principal
from portal.access.users import UserError, people_condition
from portal.api.openapi import OPENAPI
from portal.auth.recent import require_recent_sign_in
from portal.db import db
from portal.numbers import bounded_int
from portal.security import UNSAFE_METHODS

bp = Blueprint("api", __name__, url_prefix="/api")


def _manager() -> Principal:
    return require_role(current_principal(), "office_manager")


@bp.before_request
def _recent_sign_in_for_changes() -> BaseResponse | None:
    """Changes from a browser session or a bearer token need a recent, strong sign-in, as on
    the console's pages (docs/security.md 8); the answer names where to sign in again (for a
    token, RFC 9470's challenge). Machine clients (HTTP Basic) are no people: not asked."""
    principal = current_principal()
    if request.method not in UNSAFE_METHODS or principal is None \
            or principal.via not in ("session", "bearer"):
        return None
    again = require_recent_sign_in("sharing.my_links")
    if again is None or principal.via == "bearer":
        return again
    response = jsonify(error="sign in again first (recent sign-in needed)", status=401,
                       login=again.headers["Location"])
    response.status_code = 401
    return response


def _body() -> dict[str, Any]:
    data = request.get_json(silent=True)
    if not isinstance(data, dict):
        raise UserError("send a JSON object (Content-Type: application/json)")
    return data


def _id(body: dict[str, Any], key: str) -> int:
    """A whole-number id from the body (a 400 naming the bounds for anything else)."""
    return bounded_int(body.get(key, 0), key)


def _text(body: dict[str, Any], key: str) -> str | None:
    """An optional text value from the body (UserError, a 400, for anything else)."""
    value = body.get(key)
    if value is not None and not isinstance(value, str):
        raise UserError(f"{key} must be text")
    return value


def _flag(body: dict[str, Any], key: str, default: bool) -> bool:
    """A true/false choice from the body: JSON true or false only, so that "false" (a string,
    which Python would count as true) never widens a share or opens emergency access."""
    value = body.get(key, default)
    if not isinstance(value, bool):
        raise UserError(f"{key} must be true or false")
    return value


def _user_json(user: User) -> dict[str, Any]:
    return {"id": user.id, "issuer": user.issuer, "subject": user.subject, "email": user.email,
            "name": user.display_name, "roles": user.roles, "practice_id": user.practice_fk,
            "active": user.active, "phone_number": user.phone_number,
            "notify_by_sms": user.notify_by_sms}


def _grant_json(grant: Grant) -> dict[str, Any]:
    return {"id": grant.id, "user_id": grant.user_fk, "study_uid": grant.study_instance_uid,
            "patient_record": grant.patient_fk, "break_glass": grant.break_glass,
            "reason": grant.reason, "state": grant_state(grant),
            "expires_at": grant.expires_at.isoformat() if grant.expires_at else None,
            "created_at": grant.created_at.isoformat() if grant.created_at else None}


@bp.get("/openapi.json")
@public
def openapi() -> Response:
    """The OpenAPI 3.1 description of this API."""
    return jsonify(OPENAPI)


@bp.get("/users")
def list_users() -> Response:
    """Everybody who has signed in (a manager of a practice: its people and those of no
    practice)."""
    return jsonify([_user_json(u) for u in db.session.scalars(
        select(User).where(people_condition(_manager())).order_by(User.id))])


@bp.patch("/users/<int:user_id>")
def patch_user(user_id: int) -> Response:
    """Change roles, practice, activation, mobile number or text-message notices."""
    body = _body()
    roles = body.get("roles")
    if roles is not None and not (isinstance(roles, list) and all(isinstance(r, str)
                                                                 for r in roles)):
        raise UserError("roles must be a list of names")
    active = body.get("active")
    if active is not None and not isinstance(active, bool):
        raise UserError("active must be true or false")
    sms = body.get("notify_by_sms")
    if sms is not None and not isinstance(sms, bool):
        raise UserError("notify_by_sms must be true or false")
    user = update_user(db.session, _manager(), user_id, roles=roles,
                       practice=_text(body, "practice"), active=active,
                       phone_number=_text(body, "phone_number"), notify_by_sms=sms)
    return jsonify(_user_json(user))


@bp.post("/invitations")
def add_invitation() -> tuple[Response, int]:
    """Make a one-time invitation link (returned once)."""
    body = _body()
    roles = body.get("roles")
    if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
        raise UserError("roles must be a list of names")
    token = create_invitation(db.session, _manager(), email=_text(body, "email") or "",
                              roles=roles, practice=_text(body, "practice") or "")
    return jsonify(link=url_for("auth.invitation", t=token, _external=True)), 201


@bp.get("/identifiers")
def list_identifiers() -> Response:
    """Linked identifiers (a practice's manager: of the people he may list) and unmatched
    suggestions."""
    linked = [{"id": i.id, "user_id": i.user_fk, "key": i.key}
              for i in db.session.scalars(select(ReferrerIdentifier).join(
                  User, User.id == ReferrerIdentifier.user_fk).where(
                  people_condition(_manager())).order_by(ReferrerIdentifier.id))]
    return jsonify(linked=linked, suggestions=[{"key": k, "studies": n}
                                               for k, n in unmatched_referrers(db.session)])


@bp.post("/identifiers")
def add_identifier() -> tuple[Response, int]:
    """Link a physician to an identifier."""
    body = _body()
    row = link_identifier(db.session, _manager(), _id(body, "user_id"),
                          _text(body, "key") or "")
    return jsonify(id=row.id, user_id=row.user_fk, key=row.key), 201


@bp.delete("/identifiers/<int:identifier_id>")
def delete_identifier(identifier_id: int) -> tuple[str, int]:
    """Unlink an identifier."""
    unlink_identifier(db.session, _manager(), identifier_id)
    return "", 204


@bp.get("/grants")
def list_grants() -> Response:
    """Every grant the caller may see (a practice's manager: of the studies his practice
    may see, and those he gave), newest first."""
    return jsonify([_grant_json(g) for g in db.session.scalars(
        select(Grant).where(visible_grant_condition(_manager()))
        .order_by(Grant.id.desc()).limit(1000))])


@bp.post("/grants")
def add_grant() -> tuple[Response, int]:
    """Grant access to a study or a patient (``break_glass`` with a reason for emergencies)."""
    body = _body()
    expires = body.get("expires_at")
    try:
        expires_at = datetime.fromisoformat(expires) if expires else None
    except (TypeError, ValueError) as exc:
        raise UserError("expires_at must be an ISO 8601 date-time with a time zone") from exc
    if expires_at is not None and expires_at.tzinfo is None:
        raise UserError("expires_at must carry a time zone")
    grant = grant_one(db.session, _manager(), user_id=_id(body, "user_id"),
                         study_uid=_text(body, "study_uid"),
                         patient_id=_text(body, "patient_id"),
                         expires_at=expires_at, reason=_text(body, "reason") or "",
                         break_glass=_flag(body, "break_glass", False))
    return jsonify(_grant_json(grant)), 201


@bp.post("/grants/revoke")
def revoke() -> Response:
    """Revoke several grants; if one id is unknown, nothing changes (403)."""
    ids = _body().get("ids")
    if not isinstance(ids, list) or not ids:
        raise UserError("ids must be a non-empty list of grant ids")
    ids = [bounded_int(i, "each of ids") for i in ids]
    principal = _manager()
    try:
        count = revoke_grants(db.session, principal, ids)
    except UserError as exc:
        db.session.rollback()
        response = jsonify(error=str(exc), status=403)
        response.status_code = 403
        return response
    return jsonify(revoked=count)


def _audit_rows(principal: Principal, limit: int, offset: int) -> list[Any]:
    """The audit records the query asks for: by who, study, event, and (as the console asks)
    by patient record and a UTC date range."""
    from datetime import date

    from portal.access.models import AuditEvent
    from portal.admin.console import audit_condition, visible_patient

    args = request.args
    patient = None
    if args.get("patient"):
        patient = visible_patient(db.session, principal,
                                  bounded_int(args["patient"], "patient"))
        if patient is None:
            abort(404)
    try:
        start = date.fromisoformat(args["from"]) if args.get("from") else None
        end = date.fromisoformat(args["to"]) if args.get("to") else None
    except ValueError as exc:
        raise UserError("from and to must be dates (YYYY-MM-DD)") from exc
    condition = audit_condition(db.session, principal, patient=patient, date_from=start,
                                date_to=end, who=args.get("who", "")[:200],
                                event_id=args.get("event", "")[:16])
    if args.get("study"):
        condition = condition & (AuditEvent.study_instance_uid == args["study"][:64])
    return list(db.session.scalars(select(AuditEvent).where(condition)
                                   .order_by(AuditEvent.id.desc()).limit(limit)
                                   .offset(offset)))


@bp.get("/audit")
def audit_events() -> Response:
    """The audit trail, newest first (reading it is itself audited)."""
    principal = _manager()
    args = request.args
    limit = min(bounded_int(args.get("limit", "100"), "limit", low=1), 1000)
    offset = bounded_int(args.get("offset", "0"), "offset")
    rows = _audit_rows(principal, limit, offset)
    audit.record(db, audit.AUDIT_LOG_USED, action="R", outcome=audit.OUTCOME_SUCCESS,
                 who=principal.audit_name, source_address=request.remote_addr or "")
    return jsonify([{"id": r.id, "time": r.occurred_at.isoformat(), "event_id": r.event_id,
                     "event": r.event_name, "action": r.action, "outcome": r.outcome,
                     "who": r.who, "source": r.source_address,
                     "study_uid": r.study_instance_uid, "patient_id": r.patient_id,
                     "details": r.details, "hash": r.record_hash} for r in rows])


# -- share links (the same services as the /shares pages) ----------------------------------

def _sender() -> Principal:
    principal = current_principal()
    if principal is None or principal.kind != "user":
        raise UserError("share links are made and managed by people")
    return principal


def _share_json(link: Any) -> dict[str, Any]:
    from portal.sharing.models import link_state

    return {"id": link.public_id, "state": link_state(link), "audience": link.audience,
            "requires_sign_in": link.requires_sign_in, "download": link.can_download,
            "pin": bool(link.pin_hash), "note": link.note,
            "study_uids": [s.study_instance_uid for s in link.studies],
            "created_by": link.created_by, "created_at": link.created_at.isoformat(),
            "not_before": link.not_before.isoformat(), "expires_at": link.expires_at.isoformat(),
            "revoked_at": link.revoked_at.isoformat() if link.revoked_at else None,
            "uses": link.use_count, "failed_attempts": link.failed_attempts,
            "last_used_at": link.last_used_at.isoformat() if link.last_used_at else None}


def _when(body: dict[str, Any], key: str) -> datetime | None:
    value = body.get(key)
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(str(value))
    except ValueError as exc:
        raise UserError(f"{key} must be an ISO 8601 date-time with a time zone") from exc
    if parsed.tzinfo is None:
        raise UserError(f"{key} must carry a time zone")
    return parsed


def _audience(text: str) -> Literal["patient", "physician"]:
    if text not in ("patient", "physician"):
        raise UserError("audience is patient or physician")
    return "physician" if text == "physician" else "patient"


@bp.get("/shares")
def list_shares() -> Response:
    """Share links the caller may manage (his own; every link for office managers)."""
    from portal.sharing.service import list_links

    links = list_links(db.session, _sender(), study_uid=request.args.get("study", "")[:64])
    return jsonify([_share_json(link) for link in links])


@bp.post("/shares")
def add_share() -> Response | tuple[Response, int]:
    """Make a share link; the link and PIN are in this answer only."""
    from portal.sharing import routes as sharing
    from portal.sharing.service import ShareError, create_share

    principal, body = _sender(), _body()
    study_uid = str(body.get("study_uid", ""))[:64]
    require_study(db.session, principal, study_uid)
    days = body.get("days")
    if days is not None and (isinstance(days, bool) or not isinstance(days, int)):
        raise UserError("days must be a whole number")
    audience = str(body.get("audience", "patient"))
    try:
        made = create_share(
            db.session, principal, sharing.share_policy(), study_uid=study_uid,
            whole_patient=_flag(body, "whole_patient", False),
            audience=_audience(audience),
            requires_sign_in=_flag(body, "requires_sign_in", False),
            can_download=_flag(body, "download", False), with_pin=_flag(body, "pin", True),
            days=days, expires_at=_when(body, "expires_at"), not_before=_when(body, "not_before"),
            note=_text(body, "note") or "", notify_sender=_flag(body, "notify_sender", False),
            series_uids=_series_list(body.get("series")),
            language=str(body.get("language") or "")[:16])
    except ShareError as exc:
        raise UserError(str(exc)) from exc
    if not sharing.within_creation_limit(principal):
        db.session.rollback()
        return jsonify(error="too many share links this hour", status=429), 429
    return jsonify({**_share_json(made.link),
                    "link": sharing.share_url(made.token, made.link.language),
                    "pin_code": made.pin}), 201


def _series_list(value: object) -> list[str]:
    """The optional ``series`` of a share: a list of Series Instance UIDs."""
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise UserError("series is a list of Series Instance UIDs")
    return value


@bp.get("/shares/<public_id>")
def get_share(public_id: str) -> Response:
    """One link with each access."""
    from portal.sharing.service import accesses, get_link

    link = get_link(db.session, _sender(), public_id)  # or NoSuchLink, 404
    return jsonify({**_share_json(link), "accesses": [
        {"at": a.at.isoformat(), "what": a.what, "who": a.who, "address": a.address,
         "device": a.device, "outcome": a.outcome} for a in accesses(db.session, link)]})


@bp.post("/shares/<public_id>/revoke")
def revoke_share(public_id: str) -> Response:
    """Revoke one link; its open share sessions end at once."""
    from portal.sharing.service import revoke_link

    link = revoke_link(db.session, _sender(), public_id)  # or NoSuchLink, 404
    return jsonify(_share_json(link))


@bp.post("/shares/revoke")
def revoke_shares() -> Response:
    """Revoke every link of a study (``scope: study``) or of its patient (``scope: patient``)."""
    from portal.sharing.service import revoke_links_of_patient, revoke_links_of_study

    principal, body = _sender(), _body()
    study_uid = str(body.get("study_uid", ""))[:64]
    require_study(db.session, principal, study_uid)
    revoke = revoke_links_of_patient if body.get("scope") == "patient" else revoke_links_of_study
    count = revoke(db.session, principal, study_uid)
    return jsonify(revoked=count)


# -- the console's searches and bulk actions (the same functions as /admin) -----------------

def _ids(body: dict[str, Any], key: str) -> list[int]:
    """A list of whole-number ids from the body (may be empty)."""
    values = body.get(key, [])
    if not isinstance(values, list) or len(values) > 500:
        raise UserError(f"{key} must be a list of ids (at most 500)")
    return [bounded_int(v, f"each of {key}") for v in values]


def _uids(body: dict[str, Any], key: str) -> list[str]:
    """A list of UIDs (text) from the body (may be empty)."""
    values = body.get(key, [])
    if not isinstance(values, list) or len(values) > 500 or not all(
            isinstance(v, str) and 0 < len(v) <= 64 for v in values):
        raise UserError(f"{key} must be a list of UIDs (at most 500)")
    return values


@bp.get("/search/studies")
def search_studies() -> Response:
    """Studies the caller's practice may see, by patient name (as typed), patient ID,
    accession number, date range and modality; newest (or ``sort=oldest``) first."""
    from portal.admin.console import find_studies, study_json
    from portal.studies.service import StudySearch

    args = request.args
    page = bounded_int(args.get("page", "1") or "1", "page", low=1, high=10_000)
    rows, more = find_studies(db.session, _manager(), StudySearch(
        text=args.get("q", "")[:64], date_from=args.get("from", "")[:10],
        date_to=args.get("to", "")[:10], modality=args.get("modality", "")[:16], page=page,
        oldest_first=args.get("sort") == "oldest"))
    return jsonify(studies=[study_json(s, p) for s, p in rows], more=more, page=page)


@bp.get("/search/people")
def search_people() -> Response:
    """Active people by name or e-mail (``role`` narrows); nobody for an empty query."""
    from portal.admin.console import find_people, user_json

    return jsonify([user_json(u) for u in find_people(
        db.session, _manager(), request.args.get("q", "")[:100],
        role=request.args.get("role", "")[:32])])


@bp.post("/grants/bulk")
def add_grants() -> tuple[Response, int]:
    """Give several people several studies or patients' every study (one grant and one audit
    record each; all or nothing)."""
    from portal.access.grants import grant_many

    body = _body()
    grants = grant_many(db.session, _manager(), user_ids=_ids(body, "user_ids"),
                        study_uids=_uids(body, "study_uids"),
                        patient_records=_ids(body, "patient_records"),
                        expires_at=_when(body, "expires_at"), reason=_text(body, "reason") or "")
    return jsonify([_grant_json(g) for g in grants]), 201


@bp.post("/users/<int:user_id>/grants/revoke")
def revoke_everything(user_id: int) -> Response:
    """Take away every live grant of a person; the revoked ids (for an undo)."""
    from portal.access.grants import revoke_everything_of

    ids = revoke_everything_of(db.session, _manager(), user_id)
    return jsonify(revoked=ids)


@bp.post("/grants/restore")
def restore() -> tuple[Response, int]:
    """Undo revocations: a new grant like each revoked one (never emergency access)."""
    from portal.access.grants import regrant

    grants = regrant(db.session, _manager(), _ids(_body(), "ids"))
    return jsonify([_grant_json(g) for g in grants]), 201


@bp.get("/patients/<int:record>/links")
def patient_links(record: int) -> Response:
    """Share links still open (or locked, or not yet open) for any study of a patient."""
    from portal.admin.console import open_links_of_patient, visible_patient

    principal = _manager()
    patient = visible_patient(db.session, principal, record)
    if patient is None:
        abort(404)
    return jsonify([_share_json(link) for link in open_links_of_patient(
        db.session, principal, patient)])


@bp.post("/shares/revoke-many")
def revoke_many_shares() -> Response:
    """Revoke several links by id in one step (each audited); if one is unknown, none."""
    from portal.admin.console import revoke_links

    ids = _body().get("ids")
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise UserError("ids must be a list of share link ids")
    count = revoke_links(db.session, _manager(), [i[:36] for i in ids[:200]])
    return jsonify(revoked=count)


@bp.get("/attention")
def needs_attention() -> Response:
    """The console's "needs attention" counts."""
    from dataclasses import asdict

    from portal.admin.console import attention

    return jsonify(asdict(attention(db.session, _manager())))
