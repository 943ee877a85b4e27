"""Security headers for every response, set in one place."""

from __future__ import annotations

import secrets

from flask import Flask, Response, g, request


def csp_nonce() -> str:
    """The per-response nonce that inline scripts and styles must carry."""
    nonce: str | None = g.get("csp_nonce")
    if nonce is None:
        nonce = g.csp_nonce = secrets.token_urlsafe(18)
    return nonce


def init_app(app: Flask) -> None:
    """Register the header hook and expose ``csp_nonce`` to templates."""
    app.jinja_env.globals["csp_nonce"] = csp_nonce

    @app.after_request
    def _headers(response: Response) -> Response:
        nonce = csp_nonce()
        headers = response.headers
        headers["Content-Security-Policy"] = (
            f"default-src 'self'; script-src 'self' 'nonce-{nonce}'; "
            f"style-src 'self' 'nonce-{nonce}'; img-src 'self' data: blob:; "
            "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
            "frame-ancestors 'none'")
        headers["Strict-Transport-Security"] = "max-age=31536000; includeSubDomains"
        headers["X-Content-Type-Options"] = "nosniff"
        headers["Referrer-Policy"] = "no-referrer"
        headers["Cross-Origin-Opener-Policy"] = "same-origin"
        headers["Cross-Origin-Resource-Policy"] = "same-origin"
        headers["X-Frame-Options"] = "DENY"
        headers["Permissions-Policy"] = "camera=(), microphone=(), geolocation=()"
        if "Cache-Control" not in headers:
            # Anything may carry PHI unless a view says otherwise.
            headers["Cache-Control"] = "no-store"
        if request.method == "TRACE":
            response.status_code = 405
        return response
