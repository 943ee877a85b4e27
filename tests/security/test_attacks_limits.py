"""Attacks on the rate limits and on the transport headers (issue 12 items 6 and 8).

* Without Redis, a per-address limit counted in each worker's memory let an address have its
  limit once per worker: two gunicorn workers gave 40 answers for a limit of 20.
* Random tokens opened from many addresses filled the global "failed openings" window, and
  then every patient got ``429, Retry-After: 600`` for a genuine link and PIN: a limit meant
  for guessers must never refuse a link that exists (docs/security.md 51).
* Strict-Transport-Security went out on plain-HTTP answers; it belongs to https only.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from flask import Flask
from sqlalchemy import func, select

from portal.access.models import AuditEvent
from portal.sharing import service
from portal.sharing.limits import rate_limiter
from portal.sharing.models import RateLimitCount
from tests.conftest import LiveServer, close_app, free_port, make_app, wait_for
from tests.sharing.conftest import build_world, make_share

REPO = Path(__file__).resolve().parents[2]
UNKNOWN = "u" * 43
PROXY = "10.8.0.5"


# -- per-address limits shared by every worker -----------------------------------------------

def _start_gunicorn(instance: Path, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """The portal under gunicorn (one worker, no Redis) on a free loopback port."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PORTAL_")}
    env.update({"PORTAL_INSTANCE_PATH": str(instance), "PORTAL_ENV": "test",
                "PORTAL_SECRET_KEY": "test-secret-key-that-is-long-enough-123456",
                "PORTAL_BIND": f"127.0.0.1:{port}", "PORTAL_WORKERS": "1",
                "PORTAL_RENDER_ISOLATION": "false"})
    with log.open("w") as stderr:
        server = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "python:portal.gunicorn_config",
             "app:app"], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    return server, f"http://127.0.0.1:{port}"


def _up(url: str) -> bool:
    try:
        return requests.get(f"{url}/healthz", timeout=2).status_code == 200
    except requests.RequestException:
        return False


def test_two_gunicorn_workers_without_redis_share_one_address_limit(tmp_path: Path) -> None:
    """Two gunicorn workers (two servers on one database, so each request's worker is
    known), no Redis, limit 20: one address, alternating between them, gets 20 answers in
    all and then 429 from both, not 20 from each."""
    instance = tmp_path / "instance"
    close_app(make_app(instance))  # the schema, as a deployment's first start makes it
    servers = [_start_gunicorn(instance, tmp_path / f"gunicorn-{n}.log") for n in (1, 2)]
    try:
        for n, (_, url) in enumerate(servers, 1):
            assert wait_for(lambda url=url: _up(url), timeout=60), \
                (tmp_path / f"gunicorn-{n}.log").read_text()
        statuses = []
        for attempt in range(30):
            url = servers[attempt % 2][1]
            statuses.append(requests.post(f"{url}/s/exchange", data={"token": UNKNOWN},
                                          allow_redirects=False, timeout=30).status_code)
        assert statuses == [404] * 20 + [429] * 10, statuses
    finally:
        for server, _ in servers:
            server.terminate()
        for server, _ in servers:
            server.wait(timeout=30)


def test_the_database_count_is_shared_and_atomic_on_each_database(tmp_path: Path,
                                                                  database_url: str) -> None:
    """Two portal processes on one database (SQLite and PostgreSQL) count one address once;
    a count made in a caller's transaction is taken back with it."""
    first = make_app(tmp_path / "one", database_url)
    second = make_app(tmp_path / "two", database_url)
    try:
        apps = [first.test_client(), second.test_client()]
        statuses = [apps[n % 2].post("/s/exchange", data={"token": UNKNOWN}).status_code
                    for n in range(24)]
        assert statuses == [404] * 20 + [429] * 4
        with first.app_context():
            limiter, database = rate_limiter(), first.extensions["db"]
            assert limiter.count("probe", window=3600) == 1
            with database.new_session() as session:
                assert limiter.count("probe", window=3600, session=session) == 2
                session.rollback()
            assert limiter.count("probe", window=3600, add=0) == 1
        with first.extensions["db"].new_session() as session:
            rows = session.scalar(select(func.count()).select_from(RateLimitCount))
        assert rows == 3  # this address, the failed openings of everyone, the probe
    finally:
        close_app(first)
        close_app(second)


def test_while_redis_is_down_the_limit_is_still_shared(tmp_path: Path) -> None:
    """Redis configured but not answering: the count moves to the database, not into each
    worker (docs/security.md fault table, 51)."""
    down = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    url = f"sqlite:///{tmp_path / 'portal.db'}"
    first = make_app(tmp_path / "one", url, REDIS_URL=down)
    second = make_app(tmp_path / "two", url, REDIS_URL=down)
    try:
        apps = [first.test_client(), second.test_client()]
        statuses = [apps[n % 2].post("/s/exchange", data={"token": UNKNOWN}).status_code
                    for n in range(22)]
        assert statuses == [404] * 20 + [429] * 2
    finally:
        close_app(first)
        close_app(second)


# -- the global limit never refuses a link that exists ---------------------------------------

@pytest.fixture
def proxied(tmp_path: Path) -> Iterator[Flask]:
    """The portal behind a trusted proxy: each guess comes from its own client address."""
    application = make_app(tmp_path / "instance", TRUSTED_PROXIES=1,
                           TRUSTED_PROXY_ADDRESSES=["10.8.0.0/24"])
    yield application
    close_app(application)


def _from(app: Flask, client_address: str, token: str, pin: str = "") -> tuple[int, bytes]:
    response = app.test_client().post("/s/exchange", data={"token": token, "pin": pin},
                                      headers={"X-Forwarded-For": client_address},
                                      environ_base={"REMOTE_ADDR": PROXY})
    return response.status_code, response.data


def _failures_audited(app: Flask) -> int:
    with app.extensions["db"].new_session() as session:
        return int(session.scalar(select(func.count()).select_from(AuditEvent).where(
            AuditEvent.event_id == "110114", AuditEvent.outcome != 0)) or 0)


def test_guessing_from_700_addresses_leaves_a_genuine_link_working(proxied: Flask) -> None:
    """700 random tokens from 700 addresses fill the global window (600): unknown tokens
    then wait, but a genuine link with its PIN still opens and a wrong PIN still reaches
    its check; an ended link answers exactly as an unknown token (docs/security.md 16)."""
    world = build_world(proxied)
    genuine = make_share(world)
    ended = make_share(world)
    with proxied.extensions["db"].write_transaction() as session:
        service.revoke_link(session, world.doctor, ended.link.public_id)
    assert proxied.config["PORTAL"]["SHARE_FAILED_OPENINGS"] == 600
    statuses = [_from(proxied, f"198.51.{n // 250}.{n % 250 + 1}", UNKNOWN)[0]
                for n in range(700)]
    # The 601st failure goes over the limit (and raises the alert); from then on, wait.
    assert statuses == [404] * 601 + [429] * 99
    # Unknown and ended: the same answer, also while the window is full.
    unknown, revoked = _from(proxied, "203.0.113.1", UNKNOWN), \
        _from(proxied, "203.0.113.2", ended.token, ended.pin or "")
    assert unknown[0] == revoked[0] == 429 and unknown[1] == revoked[1]
    audited = _failures_audited(proxied)
    # A genuine link reaches its PIN check: a wrong PIN is told so, the right one opens.
    wrong = "000000" if genuine.pin != "000000" else "111111"
    assert _from(proxied, "203.0.113.3", genuine.token, wrong)[0] == 401
    assert _from(proxied, "203.0.113.4", genuine.token, genuine.pin or "")[0] == 303
    # Refused guesses are not written to the audit trail one by one (the alert said it).
    assert _failures_audited(proxied) == audited + 1  # only the wrong PIN
    # Through a real browser's path too: the landing page's form, over HTTP.
    with LiveServer(proxied) as server:
        opened = requests.post(f"{server.url}/s/exchange",
                               data={"token": genuine.token, "pin": genuine.pin},
                               allow_redirects=False, timeout=30)
        # The live server's peer is 127.0.0.1, not the proxy: its own address, own count.
        assert opened.status_code == 303


def test_the_per_link_pin_lock_still_holds_while_the_window_is_full(tmp_path: Path) -> None:
    """The global limit no longer stops PIN guesses on a real link: its own lock does."""
    app = make_app(tmp_path / "instance", SHARE_FAILED_OPENINGS=2)
    try:
        world = build_world(app)
        made = make_share(world)
        fresh = app.test_client()
        assert [fresh.post("/s/exchange", data={"token": UNKNOWN},
                           environ_base={"REMOTE_ADDR": f"192.0.2.{n}"}).status_code
                for n in range(4)] == [404] * 3 + [429]
        wrong = "000000" if made.pin != "000000" else "111111"
        statuses = [app.test_client().post(
            "/s/exchange", data={"token": made.token, "pin": wrong},
            environ_base={"REMOTE_ADDR": f"198.51.100.{n}"}).status_code for n in range(12)]
        assert statuses == [401] * 9 + [403] + [429] * 2  # locked: now an ended link
        assert app.test_client().post("/s/exchange", data={"token": made.token,
                                                           "pin": made.pin}).status_code == 429
    finally:
        close_app(app)


# -- HSTS only over https --------------------------------------------------------------------

HSTS = "Strict-Transport-Security"


def test_plain_http_answers_carry_no_hsts(app: Flask) -> None:
    """Over real plain HTTP, and through the test client over http: no HSTS."""
    with LiveServer(app) as server:
        for path in ("/healthz", "/s", "/no-such-page"):
            response = requests.get(f"{server.url}{path}", timeout=10)
            assert HSTS not in response.headers, path
            assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert HSTS not in app.test_client().get("/healthz").headers
    secure = app.test_client().get("/healthz", base_url="https://localhost")
    assert secure.headers[HSTS] == "max-age=31536000; includeSubDomains"


def test_hsts_follows_the_trusted_proxy_not_the_public_url(tmp_path: Path) -> None:
    """Behind the proxy, https is what its X-Forwarded-Proto says; a client reaching the
    portal around it cannot claim https, and PUBLIC_URL's https is no claim about the hop."""
    app = make_app(tmp_path / "instance", PUBLIC_URL="https://portal.clinic.test",
                   TRUSTED_PROXIES=1, TRUSTED_PROXY_ADDRESSES=["10.8.0.0/24"])
    try:
        client = app.test_client()

        def headers(peer: str, proto: str | None) -> dict[str, str]:
            sent = {"X-Forwarded-For": "198.51.100.1"}
            if proto:
                sent["X-Forwarded-Proto"] = proto
            return dict(client.get("/healthz", headers=sent,
                                   environ_base={"REMOTE_ADDR": peer}).headers)

        assert headers(PROXY, "https")[HSTS].startswith("max-age=31536000")
        assert HSTS not in headers(PROXY, "http")
        assert HSTS not in headers("192.0.2.7", "https")  # not the proxy: not believed
        assert HSTS not in headers("192.0.2.7", None)  # plain HTTP straight to gunicorn
    finally:
        close_app(app)
