"""Changes (grants, revocations, share links) need a recent, strong sign-in (SECURITY.md 8).

"Recent" is within PORTAL_RECENT_AUTH_MINUTES of the provider's ``auth_time``; "strong" means
the ID token's ``acr`` or ``amr`` named one of PORTAL_OIDC_MFA_VALUES, when those are set (the
callback then keeps no ``auth_time`` for a weaker sign-in). Otherwise the browser is sent to
sign in again, with ``prompt=login`` and the wanted ``acr_values``.
"""

from __future__ import annotations

from datetime import timedelta
from urllib.parse import urlsplit

from flask import Response, current_app, flash, redirect, request, session, url_for

from portal.access.principal import current_principal
from portal.db import utcnow


def require_recent_sign_in(fallback_endpoint: str) -> Response | None:
    """None when the session's sign-in is recent and strong enough, else a redirect that
    signs in again and comes back to the page the form was on."""
    principal = current_principal()
    if principal is not None and principal.via == "bearer":
        return None  # a bearer token is as fresh as the provider made it
    minutes = current_app.config["PORTAL"]["RECENT_AUTH_MINUTES"]
    auth_time = getattr(session, "auth_time", None)
    if auth_time is not None and utcnow() - auth_time <= timedelta(minutes=minutes):
        return None
    flash("For this change, please confirm who you are by signing in again.")
    back = urlsplit(request.referrer or "")
    path = back.path if back.netloc == request.host and back.path else url_for(
        fallback_endpoint)
    return redirect(url_for("auth.login", reauth="1", next=path))
