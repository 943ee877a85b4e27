"""Launch from the EHR: ``/IHEInvokeImageDisplay`` (IHE IID) and ``/smart/launch`` with its
callback (SMART App Launch v2, EHR launch); docs/conformance/launch.md.

Both show only what the signed-in person may see (``access.policy``): a study he may not see
answers the same 404 as an unknown one (docs/security.md 40), and a patient he may not see
lists nothing. IID needs a signed-in person like any page (the default-deny hook sends the
browser to sign in, then back to the same address); a SMART launch signs the EHR's user in
itself, with the account matching and session rules of the OpenID Connect callback
(``portal/auth/routes.py``).
"""

from __future__ import annotations

import secrets
from typing import Any

from flask import (
    Blueprint,
    abort,
    current_app,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from flask_babel import gettext as _
from sqlalchemy import exists, select
from werkzeug.datastructures import MultiDict
from werkzeug.wrappers import Response as BaseResponse

from portal import audit
from portal.access.policy import deny, public, series_filter
from portal.access.principal import Principal, current_principal
from portal.access.users import sign_in_user
from portal.db import db
from portal.i18n import N_, reason_text
from portal.index.models import Instance, Series, Study
from portal.launch import iid, smart

bp = Blueprint("launch", __name__)
PENDING_LAUNCHES = 4  # SMART launches begun in one browser and not yet back (tabs)
KEPT_LAUNCHES = 8  # launches whose patient pages stay open in one session


def _principal() -> Principal:
    principal = current_principal()
    assert principal is not None  # the default-deny hook let only principals through
    return principal


def _address() -> str:
    return request.remote_addr or ""


def _first_view(principal: Principal, study: Study) -> str:
    """The viewer on the study's first series with images, else the study page."""
    series = db.session.scalars(
        select(Series.series_instance_uid)
        .where(Series.study_fk == study.id, series_filter(principal),
               exists(select(Instance.id).where(Instance.series_fk == Series.id,
                                                Instance.rows.is_not(None))))
        .order_by(Series.series_number, Series.id).limit(1)).first()
    if series is None:
        return url_for("studies.study_page", study_uid=study.study_instance_uid)
    return url_for("studies.viewer", study_uid=study.study_instance_uid, series_uid=series)


def _audit_query(principal: Principal, kind: str, results: int, **details: Any) -> None:
    audit.record(db, audit.QUERY, action="E", outcome=audit.OUTCOME_SUCCESS,
                 who=principal.audit_name, source_address=_address(),
                 details={"launch": kind, "results": results, **details})


@bp.get("/IHEInvokeImageDisplay")
def invoke_image_display() -> str | BaseResponse:
    """IHE RAD-106: one study opens in the viewer; several, or a patient, list their studies."""
    principal = _principal()
    wanted = iid.parse_request(request.args)  # LaunchError: 400 with the reason
    if wanted.request_type == "PATIENT" and principal.kind == "user":
        # The Patient ID leaves the address bar and history at once: the list is shown
        # at an opaque address whose request the session keeps (docs/security.md 28).
        return redirect(url_for("launch.launched", key=_keep({
            "kind": "IID", "args": {k: request.args.getlist(k) for k in request.args}})))
    return _show_request(principal, wanted)


def _show_request(principal: Principal, wanted: iid.DisplayRequest) -> str | BaseResponse:
    studies = iid.find_studies(db.session, principal, wanted)
    _audit_query(principal, "IID", len(studies), requestType=wanted.request_type)
    if wanted.request_type == "STUDY":
        if not studies:  # unknown and not allowed look alike (docs/security.md 40)
            deny(principal, "study", (wanted.study_uids or ("",))[0], reason="no such study")
        if len(studies) == 1:
            return redirect(_first_view(principal, studies[0]))
    return render_template("launch/studies.html", studies=studies, patient_request=(
        wanted.request_type == "PATIENT"), source="IID", encounter="", mismatched=0)


def _keep(context: dict[str, Any]) -> str:
    """Keep a launch's context in the session under a new opaque key (the newest few)."""
    key = secrets.token_urlsafe(9)
    kept = dict(session.get("launches") or {})
    kept[key] = context
    session["launches"] = dict(list(kept.items())[-KEPT_LAUNCHES:])
    return key


def _refuse(reason: str | smart.LaunchRefused, state: str = "") -> BaseResponse:
    """A launch that cannot go on: audited (in English), its pending state dropped, 400 with
    the reason in the reader's language (a browser's page, docs/i18n.md). A signed-in
    session stays (a forged callback must not sign anybody out)."""
    audit.record(db, audit.USER_AUTHENTICATION, action="E", outcome=audit.OUTCOME_MINOR_FAILURE,
                 who="unknown", source_address=_address(),
                 details={"type": audit.LOGIN, "launch": "SMART", "reason": str(reason)})
    pending = dict(session.get("smart_states") or {})
    if state in pending:
        pending.pop(state)
        session["smart_states"] = pending
    said = reason_text(reason) if isinstance(reason, smart.LaunchRefused) else _(reason)
    abort(400, _("The launch from the EHR failed: %(reason)s", reason=said))


@bp.get("/smart/launch")
@public
def smart_launch() -> BaseResponse:
    """SMART EHR launch: an allowed EHR's ``iss`` and its opaque ``launch``; off to its
    authorization server (launch, aud, state, PKCE S256, nonce)."""
    iss, launch = request.args.get("iss", "").strip(), request.args.get("launch", "").strip()
    if not iss or not launch:
        return _refuse(N_("the EHR must send iss and launch"))
    if len(iss) > 500 or len(launch) > 1000:
        return _refuse(N_("iss or launch is too long"))
    try:
        name = smart.client_name(iss)
        found = smart.authorization(name, iss.rstrip("/"), launch,
                                    url_for("launch.smart_callback", _external=True))
    except smart.LaunchRefused as exc:
        return _refuse(exc)
    pending = dict(session.get("smart_states") or {})
    pending[found["state"]] = [name, iss.rstrip("/")]
    session["smart_states"] = dict(list(pending.items())[-PENDING_LAUNCHES:])
    return redirect(found["url"])


@bp.get("/smart/callback")
@public
def smart_callback() -> BaseResponse:
    """The EHR's answer: the code exchanged, the EHR's user signed in (a fresh session), the
    launched patient's studies opened."""
    state = request.args.get("state", "")
    pending = (session.get("smart_states") or {}).get(state)
    if not state or pending is None:
        return _refuse(N_("the answer does not belong to a launch begun in this browser "
                          "(state mismatch); launch again from the EHR"))
    name, iss = pending
    try:
        result = smart.complete(name, iss)
    except smart.LaunchRefused as exc:
        return _refuse(exc, state)
    user = sign_in_user(db.session, issuer=result.issuer, subject=result.subject,
                        email=result.email, name=result.name, idp_roles=None)
    if not user.active:
        session.destroy()  # type: ignore[attr-defined]
        abort(400, "This account has been deactivated. Ask your office manager.")
    # The OpenID Connect callback's rules: a new session id, the account's security epoch;
    # an EHR launch never counts as a recent sign-in for changes (docs/security.md 8).
    session.clear()
    session.user_fk = user.id  # type: ignore[attr-defined]
    session.security_epoch = user.security_epoch  # type: ignore[attr-defined]
    session.auth_time = None  # type: ignore[attr-defined]
    session.regenerate()  # type: ignore[attr-defined]
    # In the sign-in's unit of work (portal/db.py): the account and its record together.
    audit.append(db.session, audit.USER_AUTHENTICATION, action="E",
                 outcome=audit.OUTCOME_SUCCESS,
                 who=f"user:{user.issuer}|{user.subject}", source_address=_address(),
                 details={"type": audit.LOGIN, "launch": "SMART", "iss": iss[:200],
                          "fhirUser": result.fhir_user, "encounter": result.encounter})
    if not result.patient:
        return redirect(url_for("studies.study_list"))
    key = _keep({"kind": "SMART",
                 "patients": [[k.patient_id, list(k.issuers)] for k in result.patients],
                 "birth_date": result.birth_date, "encounter": result.encounter})
    return redirect(url_for("launch.launched", key=key))


@bp.get("/launch/<key>")
def launched(key: str) -> str | BaseResponse:
    """The studies of the patient an EHR launched the portal for (the session keeps who he
    is, so no patient identifier is in an address; docs/security.md 28)."""
    principal = _principal()
    context = (session.get("launches") or {}).get(key)
    if not isinstance(context, dict):
        abort(404, "this launch is not open in this session; launch again from the EHR")
    if context.get("kind") == "IID":
        return _show_request(principal, iid.parse_request(MultiDict(context["args"])))
    keys = [iid.PatientKey(str(pid), tuple(str(i) for i in issuers))
            for pid, issuers in context.get("patients", [])]
    studies = iid.patient_studies(db.session, principal, keys) if keys else []
    born = str(context.get("birth_date") or "")
    kept = [s for s in studies if not born or not s.patient.patient_birth_date
            or s.patient.patient_birth_date == born]
    _audit_query(principal, "SMART", len(kept), encounter=str(context.get("encounter", "")))
    return render_template("launch/studies.html", studies=kept, patient_request=True,
                           source="SMART", encounter=context.get("encounter", ""),
                           mismatched=len(studies) - len(kept),
                           unmatched=not keys,
                           systems=bool(current_app.config["PORTAL"]["SMART_PATIENT_SYSTEMS"]))
