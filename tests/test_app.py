"""The app as a whole: health, security headers, error pages, the public allow-list."""

from __future__ import annotations

import re
from pathlib import Path

from flask import Flask
from flask.testing import FlaskClient

from portal import create_app
from tests.conftest import basic_auth, close_app, make_app, make_client

PUBLIC = {"health.healthz", "health.readyz", "studies.home", "static", "auth.login",
          "auth.callback", "auth.logout", "auth.invitation", "api.openapi",
          "fhir.metadata",  # the CapabilityStatement, as api.openapi: what the API offers
          "monitoring.metrics",  # closed unless a token or addresses are set (404/403)
          # SMART App Launch: the EHR opens these before anyone is signed in here; both
          # refuse unless the issuer is allow-listed, and the callback checks its state
          "launch.smart_launch", "launch.smart_callback",
          # share links: the landing page, the exchange, the visitor's pages (they check the
          # share session themselves and show a plain "ended" page without one)
          "sharing.landing", "sharing.exchange", "sharing.shared_home",
          "sharing.shared_accesses", "sharing.close", "sharing.closed",
          # upload links: the landing page, the exchange, the upload page and the chunk API
          # (they check the upload session or the signed-in uploader themselves; docs/inbox.md)
          "inbox.link_landing", "inbox.link_exchange", "inbox.link_upload",
          "inbox_api.announce_file", "inbox_api.file_status", "inbox_api.file_chunk",
          # the language switch at every page's foot: anyone may choose (docs/i18n.md)
          "i18n.choose_language"}


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
        # Over https: HSTS is sent only there (tests/security/test_attacks_limits.py).
        response = client.get(path, headers=headers, base_url="https://localhost")
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
        assert response.headers["Cross-Origin-Resource-Policy"] == "same-origin"
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


def test_log_lines_cannot_be_forged_with_line_breaks(app: Flask) -> None:
    """docs/security.md 43: values with CR/LF (e.g. from DICOM or a caller) stay on one line."""
    import logging

    logger = logging.getLogger("portal.archive")
    handler = next(h for h in logging.getLogger("portal").handlers if h.filters)
    record = logger.makeRecord("portal.archive", logging.WARNING, __file__, 1,
                               "refused from %s", ("A\r\n2026-01-01 INFO login ok user=admin",),
                               None)
    assert handler.filter(record)
    line = handler.format(record)
    assert "\n" not in line and "\r" not in line
    assert "A\\r\\n2026-01-01 INFO login ok" in line


def test_a_chunked_body_over_the_limit_is_refused(tmp_path: Path) -> None:
    """docs/security.md 29: a stream without Content-Length is bounded too (413), under gunicorn."""
    import http.client

    from tests.dicomweb.test_stow import multipart
    from tests.factories import make_instance
    from tests.support.gunicorn import served

    with served(tmp_path / "instance", "chunky", MAX_REQUEST_BYTES="4096") as server:

        def post_chunked(chunks: list[bytes]) -> int:
            connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
            connection.putrequest("POST", "/dicomweb/studies")
            connection.putheader("Authorization",
                                 basic_auth(server.client, server.secret)["Authorization"])
            connection.putheader("Content-Type",
                                 'multipart/related; type="application/dicom"; boundary=b')
            connection.putheader("Transfer-Encoding", "chunked")
            connection.endheaders()
            for chunk in chunks:
                connection.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            connection.send(b"0\r\n\r\n")
            status = connection.getresponse().status
            connection.close()
            return status

        assert post_chunked([b"x" * 1024] * 16) == 413
        # A chunked upload within the limit is stored (clients that stream do work).
        body = multipart(make_instance(rows=8, columns=8)).replace(b"test-boundary-1234", b"b")
        assert len(body) < 4096
        assert post_chunked([body]) == 200


def test_public_url_pins_every_absolute_link_whatever_the_host_header(tmp_path: Path) -> None:
    from pydicom.uid import generate_uid

    from portal.archive import current_archive
    from tests.conftest import close_app, make_app, make_client
    from tests.factories import make_instance

    app = make_app(tmp_path / "i", PUBLIC_URL="https://portal.example")
    try:
        study = generate_uid()
        with app.app_context():
            current_archive().ingest(make_instance(study=study), who="test")
        auth = basic_auth(*make_client(app, "reader"))
        client = app.test_client()
        for host in ("evil.example", "127.0.0.1:5", "portal.example"):
            found = client.get("/dicomweb/studies", headers={**auth, "Host": host})
            assert found.status_code == 200, host
            retrieve = found.get_json()[0]["00081190"]["Value"][0]
            assert retrieve == f"https://portal.example/dicomweb/studies/{study}", host
        # A cross-site form cannot pass the Origin check by forging Host as well.
        forged = client.post("/dicomweb/studies", headers={
            **auth, "Host": "evil.example", "Origin": "http://evil.example",
            "Content-Type": "multipart/related; type=\"application/dicom\"; boundary=x"},
            data=b"--x--")
        assert forged.status_code == 403
    finally:
        close_app(app)



def test_max_request_bytes_caps_a_routes_own_larger_limit(tmp_path: Path) -> None:
    """docs/security.md 29: a route with a limit of its own (FHIR's 30 MB) still refuses a
    body above MAX_REQUEST_BYTES (413), before reading it."""
    app = make_app(tmp_path / "instance", MAX_REQUEST_BYTES="4096")
    auth = basic_auth(*make_client(app, "ris", can_read=False, can_store=True))
    body = b'{"resourceType": "DiagnosticReport", "note": "' + b"x" * 8192 + b'"}'
    answer = app.test_client().post("/fhir/DiagnosticReport", data=body, headers={
        **auth, "Content-Type": "application/fhir+json"})
    assert answer.status_code == 413
    close_app(app)
