"""Attacks and faults from docs/security.md that no other test names, each against the real portal:
PIN guesses sent all at once, a share cookie planted before the exchange, an identity
provider that is down or never answers, a database lock held by a stuck transaction, and
cross-site JSON sent as text/plain."""

from __future__ import annotations

import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
from flask import Flask

from portal.sharing import service
from tests.conftest import (
    OIDC_SETTINGS,
    IdentityProvider,
    LiveServer,
    PostgresCluster,
    add_person,
    basic_auth,
    close_app,
    csrf_of,
    make_app,
    make_client,
    signed_in,
)
from tests.sharing.conftest import build_world, link_row, make_share, open_link


def _wrong(pin: str | None) -> str:
    return "000000" if pin != "000000" else "111111"


# -- (b) 6 / requirement 20: parallel PIN guesses ----------------------------------------------

def test_parallel_pin_guesses_get_no_more_checks_than_the_lock_allows(
        tmp_path: Path, database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Thirty wrong guesses sent at once: the server compares at most ten of them with the
    PIN, then the link is locked and the right PIN no longer opens it. Counting a guess only
    after checking it let every guess in flight be checked (all thirty), so with enough
    parallel requests a guess past the tenth could still open the link."""
    app = make_app(tmp_path / "race", database_url, SHARE_ATTEMPTS_PER_ADDRESS=1000)
    checked: list[str] = []
    real_verify = service.verify_pin

    def counting_verify(pin: str, stored: str, pepper: bytes) -> bool:
        checked.append(pin)
        time.sleep(0.05)  # scrypt on a loaded server: the window the race needs
        return real_verify(pin, stored, pepper)

    monkeypatch.setattr(service, "verify_pin", counting_verify)
    try:
        world = build_world(app)
        made = make_share(world)
        with LiveServer(app) as server, ThreadPoolExecutor(30) as pool:
            barrier = threading.Barrier(30)

            def guess(_: int) -> int:
                barrier.wait()
                return requests.post(f"{server.url}/s/exchange",
                                     data={"token": made.token, "pin": _wrong(made.pin)},
                                     allow_redirects=False, timeout=60).status_code

            statuses = Counter(pool.map(guess, range(30)))
        assert len(checked) == 10, (len(checked), statuses)
        assert statuses[401] == 9 and statuses[403] == 1 and statuses[404] == 20, statuses
        row = link_row(app, made.link.public_id)
        assert row.locked_at is not None and row.failed_attempts == 10
        assert open_link(app.test_client(), made.token, made.pin).status_code == 404
        assert len(checked) == 10  # the right PIN was not even compared
    finally:
        close_app(app)


# -- (b) 10: share-session fixation ------------------------------------------------------------

def test_a_planted_share_cookie_never_becomes_a_share_session(app: Flask) -> None:
    world = build_world(app)
    made = make_share(world)
    visitor = app.test_client()
    visitor.set_cookie("share", "attacker-chosen-share-cookie-value-0123456789abcdef")
    assert visitor.get(f"/studies/{world.study}").status_code in (302, 401)
    assert open_link(visitor, made.token, made.pin).status_code == 303
    issued = visitor.get_cookie("share")
    assert issued is not None
    assert issued.value != "attacker-chosen-share-cookie-value-0123456789abcdef"
    assert visitor.get(f"/studies/{world.study}").status_code == 200
    attacker = app.test_client()
    attacker.set_cookie("share", "attacker-chosen-share-cookie-value-0123456789abcdef")
    assert attacker.get(f"/studies/{world.study}").status_code in (302, 401)
    assert attacker.get(f"/dicomweb/studies/{world.study}/metadata").status_code == 401


# -- (c) identity provider down ------------------------------------------------------------------

class _BlackHole:
    """A loopback port that accepts connections and never answers (a hung provider)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def black_hole() -> Iterator[_BlackHole]:
    hole = _BlackHole()
    yield hole
    hole.close()


def _closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.mark.parametrize("outage", ["refused", "hung"])
def test_a_provider_outage_gives_a_neutral_page_in_bounded_time_and_links_still_work(
        tmp_path: Path, outage: str, black_hole: _BlackHole,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from portal.auth import oidc

    monkeypatch.setattr(oidc, "HTTP_TIMEOUT", 2)  # the same bound, shorter for the test
    issuer = _closed_port_url() if outage == "refused" else black_hole.url
    app = make_app(tmp_path / "instance", OIDC_ISSUER=issuer, **OIDC_SETTINGS)
    try:
        world = build_world(app)
        made = make_share(world)
        start = time.monotonic()
        answer = app.test_client().get("/auth/login?next=/studies")
        elapsed = time.monotonic() - start
        assert answer.status_code in (400, 502, 503), answer.status_code
        assert elapsed < 8, elapsed
        body = answer.get_data(as_text=True)
        assert "cannot be reached" in body
        for leak in ("Traceback", "File \"", "requests.", "urllib3", "ConnectionError",
                     issuer):
            assert leak not in body, leak
        assert "Location" not in answer.headers
        # Patients' links do not depend on the provider.
        visitor = app.test_client()
        assert open_link(visitor, made.token, made.pin).status_code == 303
        assert visitor.get(f"/studies/{world.study}").status_code == 200
    finally:
        close_app(app)


def test_existing_sessions_outlive_a_provider_outage(tmp_path: Path) -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from oidc_provider_mock import run_server_in_thread

    with run_server_in_thread(port=0, require_nonce=True) as server:
        provider = IdentityProvider(server)
        app = make_app(tmp_path / "instance", OIDC_ISSUER=provider.issuer, **OIDC_SETTINGS)
        add_person(app, provider, "outage-doc", ["physician"])
        browser = signed_in(app, provider, "outage-doc")
        assert browser.get("/studies").status_code == 200
    try:
        # The provider is gone: the signed-in physician keeps working until his session
        # ends, and signing out still ends it.
        assert browser.get("/studies").status_code == 200
        out = browser.post("/auth/logout", headers={"X-CSRF-Token": csrf_of(browser)})
        assert out.status_code in (302, 303)
        assert browser.get("/studies").status_code == 302
    finally:
        close_app(app)


# -- (c) DB locked: a stuck transaction holds a lock ---------------------------------------------

@pytest.mark.postgres
def test_a_held_database_lock_answers_503_in_bounded_time(tmp_path: Path,
                                                          postgres: PostgresCluster) -> None:
    """A transaction that holds a lock the read's audit record needs (a stuck migration or
    a console left open in psql locking the audit table) must not wedge every PHI read: each
    waits a bounded time, then 503. (Records no longer lock the chain's head: the sealer
    does, off the request path.)"""
    import psycopg

    url = postgres.new_database()
    app = make_app(tmp_path / "instance", url)
    try:
        world = build_world(app)
        reader = basic_auth(*make_client(app, "reader"))
        client = app.test_client()
        dsn = url.replace("postgresql+psycopg://", "postgresql://")
        with psycopg.connect(dsn) as holder:
            holder.execute("LOCK TABLE audit_event IN SHARE MODE")  # no insert passes
            result: dict[str, Any] = {}

            def read() -> None:
                start = time.monotonic()
                answer = app.test_client().get(f"/dicomweb/studies/{world.study}/metadata",
                                               headers=reader)
                result.update(status=answer.status_code, body=answer.get_data(as_text=True),
                              retry=answer.headers.get("Retry-After"),
                              elapsed=time.monotonic() - start)

            worker = threading.Thread(target=read, daemon=True)
            worker.start()
            worker.join(timeout=20)
            hung = worker.is_alive()
            holder.rollback()
            worker.join(timeout=30)
        assert not hung, "the read waited on the lock without bound"
        assert result["status"] == 503 and result["retry"], result
        assert result["elapsed"] < 15, result["elapsed"]
        assert "PAT-1" not in result["body"] and "Doe" not in result["body"]
        # The lock gone, the same read works again.
        assert client.get(f"/dicomweb/studies/{world.study}/metadata",
                          headers=reader).status_code == 200
    finally:
        close_app(app)


# -- (b) 13: cross-site JSON sent as text/plain, and GET variants --------------------------------

def test_cross_site_text_plain_json_and_get_variants_change_nothing(
        oidc_app: Flask, idp: IdentityProvider) -> None:
    """A form with ``enctype="text/plain"`` can post JSON-looking bodies cross-site without
    a preflight; with the office manager's cookie it must still change nothing."""
    from portal.access.models import Grant
    from tests.access.test_console import count, setup

    manager, doctor, study = setup(oidc_app, idp)
    token = csrf_of(manager)
    body = f'{{"user_id": {doctor}, "study_uid": "{study}", "x": "="}}'
    attempts = [
        {"Content-Type": "text/plain", "Origin": "https://evil.example"},
        {"Content-Type": "text/plain", "Sec-Fetch-Site": "cross-site"},
        {"Content-Type": "text/plain"},  # no Origin (old browser): no token either
        {"Content-Type": "application/json", "Origin": "https://evil.example",
         "X-CSRF-Token": token},  # even a leaked token does not help from another origin
    ]
    for headers in attempts:
        answer = manager.post("/api/grants", data=body, headers=headers)
        assert answer.status_code == 403, (headers, answer.status_code)
    # Another browser's token is no token for this session.
    add_person(oidc_app, idp, "om-other", ["office_manager"], "Clinic")
    other_token = csrf_of(signed_in(oidc_app, idp, "om-other"))
    assert other_token and other_token != token
    answer = manager.post("/api/grants", json={"user_id": doctor, "study_uid": study},
                          headers={"X-CSRF-Token": other_token})
    assert answer.status_code == 403
    for path in ("/api/grants/revoke", "/auth/logout", "/s/exchange", "/shared/close",
                 f"/shares/{study}/revoke"):
        assert manager.get(path).status_code == 405, path
    assert count(oidc_app, Grant) == 0
    # The same request from the portal's own page (token, same origin) works.
    ok = manager.post("/api/grants", json={"user_id": doctor, "study_uid": study},
                      headers={"X-CSRF-Token": token})
    assert ok.status_code == 201 and count(oidc_app, Grant) == 1
