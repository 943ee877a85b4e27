"""The app as a whole: health, security headers, error pages, the public allow-list."""

from __future__ import annotations

import re
from pathlib import Path

from flask import Flask
from flask.testing import FlaskClient

from portal import create_app

PUBLIC = {"health.healthz", "health.readyz", "studies.home", "static", "auth.login",
          "auth.callback", "auth.logout", "auth.invitation", "api.openapi"}


def test_health_and_readiness(client: FlaskClient) -> None:
    assert client.get("/healthz").get_json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.get_json()["checks"]["database"] == "ok"


def test_readiness_fails_when_the_database_is_gone(tmp_path: Path) -> None:
    app = create_app({"INSTANCE_PATH": str(tmp_path), "ENV": "test",
                      "DATABASE_URL": "sqlite:////nonexistent/folder/portal.db"})
    response = app.test_client().get("/readyz")
    assert response.status_code == 503
    assert response.get_json()["checks"]["database"] == "unavailable"
    assert app.test_client().get("/healthz").status_code == 200


def test_security_headers_on_every_kind_of_response(client: FlaskClient,
                                                    auth: dict[str, str]) -> None:
    nonces = set()
    for path, headers in (("/", {}), ("/healthz", {}), ("/no-such-page", {}),
                          ("/dicomweb/studies", {}), ("/dicomweb/studies", auth)):
        response = client.get(path, headers=headers)
        csp = response.headers["Content-Security-Policy"]
        for directive in ("object-src 'none'", "base-uri 'none'", "frame-ancestors 'none'"):
            assert directive in csp
        nonce = re.search(r"'nonce-([^']+)'", csp)
        assert nonce
        nonces.add(nonce.group(1))
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["Strict-Transport-Security"].startswith("max-age=31536000")
        assert response.headers["Referrer-Policy"] == "no-referrer"
        assert response.headers["Cross-Origin-Opener-Policy"] == "same-origin"
        assert "no-store" in response.headers["Cache-Control"]
    assert len(nonces) == 5  # a fresh nonce per response


def test_error_pages_are_clear_and_generic(app: Flask, client: FlaskClient) -> None:
    @app.get("/boom")
    def boom() -> str:
        raise RuntimeError("secret internals")

    app.view_functions["boom"].portal_public = True  # type: ignore[attr-defined]
    app.config["PROPAGATE_EXCEPTIONS"] = False
    response = client.get("/boom", headers={"Accept": "text/html"})
    assert response.status_code == 500
    assert b"secret internals" not in response.data and b"Something went wrong" in response.data
    page = client.get("/no-such-page", headers={"Accept": "text/html"})
    assert page.status_code == 404
    assert b"Not found" in page.data and b"Traceback" not in page.data


def test_every_route_is_public_by_choice_or_needs_a_principal(app: Flask,
                                                             client: FlaskClient) -> None:
    """Walk the URL map: only allow-listed endpoints answer without credentials."""
    for rule in app.url_map.iter_rules():
        view = app.view_functions[rule.endpoint]
        declared_public = getattr(view, "portal_public", False) or rule.endpoint == "static"
        assert declared_public == (rule.endpoint in PUBLIC), rule.endpoint
        if declared_public:
            continue
        path = re.sub(r"<[^>]+>", "1.2.3", re.sub(r"<int:[^>]+>", "1", rule.rule))
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            response = client.open(path, method=method)
            machine = path.startswith(("/dicomweb", "/api", "/fhir"))
            if machine or method != "GET":
                assert response.status_code == 401, (rule.rule, method)
            else:  # a person is sent to sign in, and comes back afterwards
                assert response.status_code == 302, (rule.rule, method)
                assert "/auth/login?next=" in response.headers["Location"]


def test_trace_is_not_allowed(client: FlaskClient) -> None:
    assert client.open("/", method="TRACE").status_code == 405
