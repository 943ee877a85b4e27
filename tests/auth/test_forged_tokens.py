"""Forged ID tokens are refused quickly, audited, and never start a session
(docs/security.md 2, 24)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests
from flask import Flask
from sqlalchemy import select
from werkzeug.serving import make_server

from portal.access.models import AuditEvent, User
from tests.conftest import make_app
from tests.support.forging_idp import CLIENT_ID, MODES, ForgingProvider


@pytest.fixture(scope="module")
def forger() -> Iterator[ForgingProvider]:
    import threading

    provider = ForgingProvider()
    server = make_server("127.0.0.1", 0, provider.app, threaded=True)
    provider.issuer = f"http://127.0.0.1:{server.server_port}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield provider
    server.shutdown()
    thread.join(timeout=10)


@pytest.fixture
def forge_app(tmp_path: Path, forger: ForgingProvider) -> Iterator[Flask]:
    app = make_app(tmp_path / "instance", OIDC_ISSUER=forger.issuer, OIDC_CLIENT_ID=CLIENT_ID,
                   OIDC_CLIENT_SECRET="irrelevant")
    yield app
    app.extensions["db"].dispose()


def attempt(app: Flask) -> tuple[int, float, object]:
    client = app.test_client()
    start = client.get("/auth/login")
    answer = requests.get(start.headers["Location"], allow_redirects=False, timeout=10)
    callback = urlsplit(answer.headers["Location"])
    began = time.perf_counter()
    response = client.get(f"{callback.path}?{callback.query}")
    return response.status_code, time.perf_counter() - began, client


def test_the_honest_token_signs_in(forge_app: Flask, forger: ForgingProvider) -> None:
    forger.mode = "valid"
    status, _elapsed, client = attempt(forge_app)
    assert status == 302
    assert client.get("/studies").status_code == 200  # type: ignore[attr-defined]


@pytest.mark.parametrize("mode", [m for m in MODES if m != "valid"])
def test_forgeries_are_refused_quickly_and_audited(forge_app: Flask, forger: ForgingProvider,
                                                   mode: str) -> None:
    forger.mode = mode
    status, elapsed, client = attempt(forge_app)
    assert status == 400, mode
    # The provider round trip is included; 10 MB take longest. docs/security.md asks <= 100 ms
    # for the check itself; this bound leaves room for a busy two-core test machine, and a
    # stalled attempt is tried again (at most three in all): a slow check is slow every time.
    bound, tries = (2.0 if mode == "huge" else 0.5), 1
    while elapsed >= bound and tries < 3:
        again, took, _client = attempt(forge_app)
        assert again == 400, mode
        elapsed, tries = min(elapsed, took), tries + 1
    assert elapsed < bound, (mode, elapsed)
    assert client.get("/studies").status_code == 302  # type: ignore[attr-defined]
    with forge_app.extensions["db"].new_session() as session:
        assert session.scalars(select(User)).first() is None
        failures = session.scalars(select(AuditEvent).where(AuditEvent.event_id == "110114")
                                   ).all()
        assert len(failures) == tries  # each refused attempt is audited once
        failure = failures[0]
    assert failure.outcome == 4 and failure.details["type"] == "110122"


@pytest.mark.parametrize(("change", "accepted"), [
    ({}, True), ({"aud": "another-api"}, False), ({"iss": "http://127.0.0.1:1/evil"}, False),
    ({"exp": 1}, False), ({"sign_with_other_key": True}, False), ({"alg": "none"}, False)])
def test_bearer_jwts_are_verified_against_the_issuer(forge_app: Flask, forger: ForgingProvider,
                                                     change: dict[str, object],
                                                     accepted: bool) -> None:
    from joserfc import jwt

    from portal.auth.bearer import forget_cached_tokens

    now = int(time.time())
    claims = {"iss": forger.issuer, "sub": "script", "aud": CLIENT_ID, "iat": now,
              "exp": now + 300}
    claims.update({k: v for k, v in change.items() if k in ("aud", "iss", "exp")})
    if change.get("alg") == "none":
        import base64
        import json

        def b64(value: dict[str, object]) -> str:
            return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

        token = f"{b64({'alg': 'none'})}.{b64(claims)}."
    else:
        key = forger.other_key if change.get("sign_with_other_key") else forger.key
        token = jwt.encode({"alg": "RS256", "kid": "good"}, claims, key, algorithms=["RS256"])
    forget_cached_tokens()
    response = forge_app.test_client().get("/dicomweb/studies",
                                           headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == (204 if accepted else 401)
