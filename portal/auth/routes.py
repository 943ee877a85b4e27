"""Sign-in, the callback from the identity provider, and sign-out."""

from __future__ import annotations

import secrets
from urllib.parse import unquote, urlsplit

from flask import (
    Blueprint,
    Response,
    current_app,
    flash,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from flask_babel import gettext as _
from werkzeug.exceptions import BadRequest
from werkzeug.wrappers import Response as BaseResponse

from portal import audit
from portal.access.invitations import invitation_digest, redeem_invitation
from portal.access.policy import public
from portal.access.principal import current_principal
from portal.access.users import sign_in_user
from portal.auth import oidc
from portal.db import db

bp = Blueprint("auth", __name__, url_prefix="/auth")


def safe_next(target: str | None) -> str:
    """Only a same-origin path is a place to go after sign-in; anything else is ``/``."""
    if not target or len(target) > 2000:
        return "/"
    for candidate in (target, unquote(target)):
        if (not candidate.startswith("/") or candidate.startswith(("//", "/\\"))
                or "\\" in candidate or any(ord(c) < 32 or ord(c) == 127 for c in candidate)):
            return "/"
        parts = urlsplit(candidate)
        if parts.scheme or parts.netloc:
            return "/"
    return target


def _address() -> str:
    return request.remote_addr or ""


@bp.get("/login")
@public
def login() -> Response:
    """Send the browser to the identity provider (PKCE S256, state, nonce)."""
    force = request.args.get("reauth") == "1"
    wanted = request.args.get("next")
    session["next"] = safe_next(wanted) if wanted else url_for("studies.study_list")
    try:
        response: Response = oidc.authorization_redirect(
            url_for("auth.callback", _external=True), secrets.token_urlsafe(24),
            force_login=force)
    except oidc.SignInFailed as exc:
        raise BadRequest(str(exc)) from exc
    return response


@bp.get("/callback")
@public
def callback() -> BaseResponse:
    """Validate the provider's answer, start a fresh session, go where the user was going."""
    settings = current_app.config["PORTAL"]
    try:
        identity = oidc.complete_sign_in(settings["OIDC_ROLES_CLAIM"])
    except oidc.SignInFailed as exc:
        audit.record(db, audit.USER_AUTHENTICATION, action="E",
                     outcome=audit.OUTCOME_MINOR_FAILURE, who="unknown",
                     source_address=_address(), details={"type": audit.LOGIN,
                                                         "reason": str(exc)})
        session.destroy()  # type: ignore[attr-defined]
        # A browser's page: said in the reader's language (the English detail is audited).
        raise BadRequest(_("Sign-in failed: %(reason)s", reason=_(exc.reason))) from exc
    user = sign_in_user(db.session, issuer=identity.issuer, subject=identity.subject,
                        email=identity.email, name=identity.name,
                        idp_roles=identity.roles if settings["OIDC_ROLES_CLAIM"] else None,
                        phone_number=identity.phone_number)
    invited = session.get("invitation")
    if invited and user.active:
        if redeem_invitation(db.session, invited, user):
            flash(_("Welcome: your invitation has been accepted."))
        else:
            flash(_("That invitation was already used or has expired; ask for a new one."),
                  "error")
    destination = session.get("next", "/")
    messages = session.get("_flashes", [])
    if not user.active:
        session.destroy()  # type: ignore[attr-defined]
        raise BadRequest("This account has been deactivated. Ask your office manager.")
    session.clear()
    if messages:
        session["_flashes"] = messages
    session["id_token"] = identity.id_token
    session.user_fk = user.id  # type: ignore[attr-defined]
    session.security_epoch = user.security_epoch  # type: ignore[attr-defined]
    # A sign-in only counts as a recent strong one (for changes) when it met the
    # multi-factor requirement, if there is one (docs/security.md 8).
    strong = identity.mfa or not settings["OIDC_MFA_VALUES"]
    session.auth_time = identity.auth_time if strong else None  # type: ignore[attr-defined]
    session.regenerate()  # type: ignore[attr-defined]
    # In the sign-in's own unit of work (portal/db.py): the account and its record together.
    audit.append(db.session, audit.USER_AUTHENTICATION, action="E",
                 outcome=audit.OUTCOME_SUCCESS,
                 who=f"user:{user.issuer}|{user.subject}", source_address=_address(),
                 details={"type": audit.LOGIN})
    return redirect(safe_next(destination))


@bp.get("/invitation")
@public
def invitation() -> str:
    """Landing page of an invitation link; nothing is used up until the person signs in."""
    token = request.args.get("t", "")
    valid = 20 <= len(token) <= 100 and all(c.isalnum() or c in "-_" for c in token)
    if valid:
        session["invitation"] = invitation_digest(token)  # the session row never holds it
    return render_template("auth/invitation.html", valid=valid)


@bp.post("/logout")
@public
def logout() -> BaseResponse:
    """End the session here and, when the provider supports it, there too."""
    principal = current_principal()
    id_token = session.get("id_token")
    if principal is not None:
        audit.record(db, audit.USER_AUTHENTICATION, action="E", outcome=audit.OUTCOME_SUCCESS,
                     who=principal.audit_name, source_address=_address(),
                     details={"type": audit.LOGOUT})
    session.destroy()  # type: ignore[attr-defined]
    home = url_for("studies.home", _external=True)
    target = oidc.logout_url(id_token, home) if principal is not None else None
    response = redirect(target or home)
    response.headers["Clear-Site-Data"] = '"cache", "cookies", "storage"'
    return response
