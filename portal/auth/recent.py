"""Changes (grants, revocations, share links) need a recent, strong sign-in (docs/security.md 8).

"Recent" is within PORTAL_RECENT_AUTH_MINUTES of the provider's ``auth_time``; "strong" means
the ID token's ``acr`` or ``amr`` named one of PORTAL_OIDC_MFA_VALUES, when those are set (the
callback then keeps no ``auth_time`` for a weaker sign-in). Otherwise the browser is sent to
sign in again, with ``prompt=login`` and the wanted ``acr_values``.

A bearer token proves the same with its own ``auth_time`` (and ``acr``/``amr``), from the JWT
or the introspection answer; else the answer is a 401 with RFC 9470's
``insufficient_user_authentication``, ``max_age`` and ``acr_values``, so that the client signs
its person in again. A token's ``iat`` is no sign-in time (a refresh token mints new ones
long after), so a token without ``auth_time`` cannot make changes.
"""

from __future__ import annotations

import math
import time
from datetime import timedelta
from urllib.parse import urlsplit

from flask import Response, current_app, flash, jsonify, redirect, request, session, url_for
from flask_babel import gettext as _
from werkzeug.datastructures import WWWAuthenticate
from werkzeug.wrappers import Response as BaseResponse

from portal.access.principal import current_principal
from portal.auth import bearer, oidc
from portal.db import utcnow

# Clocks differ: an auth_time this far ahead of ours is still taken as "now".
CLOCK_LEEWAY_SECONDS = 60


def bearer_sign_in_problem() -> str | None:
    """Why this request's bearer token is no recent, strong enough sign-in for a change
    (a text safe to send back), or None when it is one."""
    settings = current_app.config["PORTAL"]
    minutes = settings["RECENT_AUTH_MINUTES"]
    claims = bearer.token_claims() or {}
    auth_time = claims.get("auth_time")
    if isinstance(auth_time, bool) or not isinstance(auth_time, int | float) \
            or not math.isfinite(auth_time):
        return "this change needs a token that says when its holder signed in (auth_time)"
    age = time.time() - auth_time
    if age < -CLOCK_LEEWAY_SECONDS:
        return "the token's auth_time lies in the future"
    if age > minutes * 60:
        return f"this change needs a sign-in within the last {minutes} minutes"
    if settings["OIDC_MFA_VALUES"] and not oidc.multi_factor(claims):
        return "this change needs a multi-factor sign-in (acr or amr)"
    return None


def insufficient_user_authentication(reason: str) -> Response:
    """The 401 that asks a bearer client for a more recent or stronger sign-in (RFC 9470)."""
    settings = current_app.config["PORTAL"]
    params: dict[str, str | None] = {
        "realm": "portal", "error": "insufficient_user_authentication",
        "error_description": reason, "max_age": str(settings["RECENT_AUTH_MINUTES"] * 60)}
    if settings["OIDC_MFA_VALUES"]:
        params["acr_values"] = " ".join(settings["OIDC_MFA_VALUES"])
    response = jsonify(error=reason, status=401)
    response.status_code = 401
    response.www_authenticate = WWWAuthenticate("bearer", params)
    return response


def require_recent_sign_in(fallback_endpoint: str) -> BaseResponse | None:
    """None when the session's sign-in is recent and strong enough, else a redirect that
    signs in again and comes back to the page the form was on (for a bearer token: None or
    the 401 of ``insufficient_user_authentication``)."""
    principal = current_principal()
    if principal is not None and principal.via == "bearer":
        problem = bearer_sign_in_problem()
        return None if problem is None else insufficient_user_authentication(problem)
    minutes = current_app.config["PORTAL"]["RECENT_AUTH_MINUTES"]
    auth_time = getattr(session, "auth_time", None)
    if auth_time is not None and utcnow() - auth_time <= timedelta(minutes=minutes):
        return None
    flash(_("For this change, please confirm who you are by signing in again."))
    back = urlsplit(request.referrer or "")
    path = back.path if back.netloc == request.host and back.path else url_for(
        fallback_endpoint)
    return redirect(url_for("auth.login", reauth="1", next=path))
