"""Share links under attack, over real HTTP: parallel PIN guessing (SQLite and PostgreSQL),
Redis flushed mid-sequence, per-address limits, revocation while a viewer fetches images,
and the token absent from gunicorn's and the app's logs (docs/security.md 15, 17, 20)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis
import requests
from flask import Flask

from portal.sharing import service
from tests.conftest import LiveServer, close_app, free_port, make_app, wait_for
from tests.sharing.conftest import build_world, link_row, make_share

REPO = Path(__file__).resolve().parents[2]


def _wrong(pin: str | None) -> str:
    return "000000" if pin != "000000" else "111111"


def _post(url: str, token: str, pin: str) -> int:
    response = requests.post(f"{url}/s/exchange", data={"token": token, "pin": pin},
                             allow_redirects=False, timeout=60)
    return response.status_code


def test_fifty_parallel_wrong_pins_lock_at_ten(tmp_path: Path, database_url: str) -> None:
    app = make_app(tmp_path / "race", database_url, SHARE_ATTEMPTS_PER_ADDRESS=1000)
    try:
        world = build_world(app)
        made = make_share(world)
        with LiveServer(app) as server, ThreadPoolExecutor(50) as pool:
            barrier = threading.Barrier(50)

            def guess(_: int) -> int:
                barrier.wait()
                return _post(server.url, made.token, _wrong(made.pin))

            statuses = Counter(pool.map(guess, range(50)))
            row = link_row(app, made.link.public_id)
            assert row.failed_attempts == 10, statuses
            assert row.locked_at is not None
            # Nine "wrong PIN, try again", one "now locked", the rest the generic answer.
            assert statuses[401] == 9 and statuses[403] == 1, statuses
            assert statuses[404] == 40, statuses
            assert statuses[303] == 0
            # The right PIN after the lock: refused, and nothing counts any more.
            assert _post(server.url, made.token, made.pin or "") == 404
        assert link_row(app, made.link.public_id).failed_attempts == 10
    finally:
        close_app(app)


def test_flushing_redis_keeps_the_database_counter(tmp_path: Path, redis_url: str) -> None:
    app = make_app(tmp_path / "flush", REDIS_URL=redis_url, SHARE_ATTEMPTS_PER_ADDRESS=6)
    store = redis.Redis.from_url(redis_url)
    try:
        world = build_world(app)
        made = make_share(world)
        client = app.test_client()
        store.flushall()
        for _ in range(6):
            assert client.post("/s/exchange", data={"token": made.token,
                                                    "pin": _wrong(made.pin)}).status_code == 401
        limited = client.post("/s/exchange", data={"token": made.token, "pin": made.pin})
        assert limited.status_code == 429 and limited.headers["Retry-After"]
        assert any(k.startswith(b"ratelimit:") for k in store.keys("*"))
        store.flushall()  # Redis restarted without its data: the address limit resets...
        statuses = [client.post("/s/exchange", data={"token": made.token,
                                                     "pin": _wrong(made.pin)}).status_code
                    for _ in range(4)]
        assert statuses == [401, 401, 401, 403]  # ...the per-link counter does not
        row = link_row(app, made.link.public_id)
        assert row.failed_attempts == 10 and row.locked_at is not None
        assert client.post("/s/exchange", data={"token": made.token,
                                                "pin": made.pin}).status_code == 404
    finally:
        close_app(app)


def test_address_limit_is_counted_in_the_database_without_redis(app: Flask) -> None:
    client = app.test_client()
    statuses = [client.post("/s/exchange", data={"token": "x" * 43, "pin": ""}).status_code
                for _ in range(21)]
    assert statuses[:20] == [404] * 20 and statuses[20] == 429
    other = client.post("/s/exchange", data={"token": "x" * 43},
                        environ_base={"REMOTE_ADDR": "127.0.0.9"})
    assert other.status_code == 404



def test_address_limit_counts_an_ipv6_subscriber_as_one(app: Flask) -> None:
    """Rotating through the addresses of one /64 does not reset the count."""
    client = app.test_client()
    statuses = [client.post("/s/exchange", data={"token": "x" * 43},
                            environ_base={"REMOTE_ADDR": f"2001:db8:5:7::{n:x}"}).status_code
                for n in range(1, 22)]
    assert statuses[:20] == [404] * 20 and statuses[20] == 429
    elsewhere = client.post("/s/exchange", data={"token": "x" * 43},
                            environ_base={"REMOTE_ADDR": "2001:db8:5:8::1"})
    assert elsewhere.status_code == 404


@pytest.mark.parametrize("with_redis", [False, True], ids=["database", "redis"])
def test_guessing_from_many_addresses_meets_a_global_limit_and_an_alert(
        tmp_path: Path, request: pytest.FixtureRequest, with_redis: bool) -> None:
    """docs/security.md (b) 5: random tokens spread over many addresses stay under each address's
    limit, but all failed openings together meet a global one (429 for links that do not
    open until the window ends) and raise one security alert; one address over its own limit
    raises one too. A link that exists still opens (docs/security.md 51)."""
    from sqlalchemy import select

    from portal.access.models import AuditEvent

    extra = {"REDIS_URL": request.getfixturevalue("redis_url")} if with_redis else {}
    if with_redis:
        redis.Redis.from_url(extra["REDIS_URL"]).flushall()
    app = make_app(tmp_path / "global", SHARE_FAILED_OPENINGS=8, SHARE_ATTEMPTS_PER_ADDRESS=3,
                   **extra)
    try:
        world = build_world(app)
        made = make_share(world)
        client = app.test_client()

        def attempt(address: str, token: str, pin: str = "") -> int:
            return client.post("/s/exchange", data={"token": token, "pin": pin},
                               environ_base={"REMOTE_ADDR": address}).status_code

        def alerts() -> list[str]:
            with app.extensions["db"].new_session() as session:
                return [e.details["reason"] for e in session.scalars(
                    select(AuditEvent).where(AuditEvent.event_id == "110113"))
                        if e.details.get("type") == "share link guessing"]

        # One address over its own limit: 429, and one alert however often it goes on.
        assert [attempt("192.0.2.1", "y" * 43) for _ in range(6)] == [404] * 3 + [429] * 3
        assert alerts() == ["one address reached its limit of link openings"]
        # Guesses from many addresses, one each: 404 while all failures together (these 5
        # and the 3 above) are within 8...
        assert [attempt(f"198.51.100.{n}", "z" * 43) for n in range(1, 6)] == [404] * 5
        assert attempt("203.0.113.7", made.token, made.pin or "") == 303  # a real visitor
        assert attempt("198.51.100.6", "z" * 43) == 404  # the ninth failure: the alert
        # ...then every opening of an unknown token waits, but a real link still opens.
        assert attempt("198.51.100.7", "z" * 43) == 429
        assert attempt("203.0.113.8", made.token, made.pin or "") == 303
        assert alerts() == ["one address reached its limit of link openings",
                            "unknown or ended links were opened from many addresses"]
    finally:
        close_app(app)


def test_forwarded_for_is_believed_only_from_the_configured_proxy(tmp_path: Path) -> None:
    """docs/security.md 45: a client that reaches the portal around its proxy cannot pick a fresh
    X-Forwarded-For per guess; behind the proxy, each real client has its own count."""
    app = make_app(tmp_path / "proxy", TRUSTED_PROXIES=1,
                   TRUSTED_PROXY_ADDRESSES=["10.8.0.0/24"], SHARE_ATTEMPTS_PER_ADDRESS=3)
    try:
        client = app.test_client()

        def attempt(peer: str, forwarded: str) -> int:
            return client.post("/s/exchange", data={"token": "x" * 43},
                               headers={"X-Forwarded-For": forwarded},
                               environ_base={"REMOTE_ADDR": peer}).status_code

        direct = [attempt("192.0.2.7", f"198.51.100.{n}") for n in range(1, 6)]
        assert direct == [404, 404, 404, 429, 429]
        through_proxy = [attempt("10.8.0.5", f"198.51.100.{n}") for n in range(1, 6)]
        assert through_proxy == [404] * 5  # five clients, one attempt each
        # The proxy's own address is not a client: one spoofed hop more is not believed.
        assert [attempt("10.8.0.5", "203.0.113.9, 198.51.100.1") for _ in range(3)] == [404,
                                                                                           404, 429]
    finally:
        close_app(app)


def test_revocation_stops_an_open_viewer_within_ten_seconds(tmp_path: Path) -> None:
    """A viewer fetches images in a loop; another process of the portal revokes the link."""
    app = make_app(tmp_path / "revoke")
    other_worker = make_app(tmp_path / "revoke")  # same database, its own cache
    try:
        world = build_world(app)
        made = make_share(world)
        with LiveServer(app) as server:
            viewer = requests.Session()
            opened = viewer.post(f"{server.url}/s/exchange",
                                 data={"token": made.token, "pin": made.pin},
                                 allow_redirects=False, timeout=30)
            assert opened.status_code == 303
            image = (f"{server.url}/dicomweb/studies/{world.study}/series/{world.series}/"
                     f"instances/{world.sop}/rendered")
            statuses: list[tuple[float, int]] = []
            stop = threading.Event()

            def fetch() -> None:
                while not stop.is_set():
                    response = viewer.get(image, headers={"Accept": "image/jpeg"}, timeout=30)
                    statuses.append((time.monotonic(), response.status_code))
                    time.sleep(0.05)

            loop = threading.Thread(target=fetch)
            loop.start()
            assert wait_for(lambda: len(statuses) >= 5, timeout=30)
            assert {s for _, s in statuses} == {200}
            with other_worker.extensions["db"].write_transaction() as session:
                service.revoke_link(session, world.doctor, made.link.public_id)
            revoked_at = time.monotonic()
            assert wait_for(lambda: statuses[-1][1] != 200, timeout=12)
            stop.set()
            loop.join(timeout=30)
        first_refusal = next(t for t, s in statuses if s != 200 and t > revoked_at)
        assert first_refusal - revoked_at < 10
        assert all(s == 401 for t, s in statuses if t >= first_refusal)
    finally:
        close_app(app)
        close_app(other_worker)


def test_token_and_pin_never_reach_the_logs(tmp_path: Path) -> None:
    """Through gunicorn with the portal's own config: access log, error log, app log."""
    instance = tmp_path / "logs"
    app = make_app(instance)
    world = build_world(app)
    made = make_share(world)
    close_app(app)
    port = free_port()
    access, errors = tmp_path / "access.log", tmp_path / "error.log"
    env = {**os.environ, "PORTAL_INSTANCE_PATH": str(instance), "PORTAL_ENV": "test",
           "PORTAL_SECRET_KEY": "test-secret-key-that-is-long-enough-123456",
           "PORTAL_BIND": f"127.0.0.1:{port}", "PORTAL_WORKERS": "1",
           "PORTAL_LOG_LEVEL": "DEBUG", "PORTAL_RENDER_ISOLATION": "false"}
    with (tmp_path / "stderr.log").open("w") as stderr:
        server = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "python:portal.gunicorn_config",
             "--access-logfile", str(access), "--error-logfile", str(errors), "app:app"],
            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_for(lambda: _up(url), timeout=60), (tmp_path / "stderr.log").read_text()
        browser = requests.Session()
        assert browser.get(f"{url}/s").status_code == 200
        wrong = browser.post(f"{url}/s/exchange", data={"token": made.token, "pin": "999999"
                                                        if made.pin != "999999" else "888888"},
                             allow_redirects=False, timeout=30)
        assert wrong.status_code == 401
        opened = browser.post(f"{url}/s/exchange", data={"token": made.token, "pin": made.pin},
                              headers={"Referer": f"{url}/s"}, allow_redirects=False,
                              timeout=30)
        assert opened.status_code == 303
        assert browser.get(url + opened.headers["Location"]).status_code == 200
        assert browser.get(f"{url}/dicomweb/studies/{world.study}/series/{world.series}/"
                           "thumbnail").status_code == 200
        cookie = browser.cookies.get("share") or ""
        assert cookie
    finally:
        server.terminate()
        server.wait(timeout=30)
    logs = "".join(p.read_text() for p in (access, errors, tmp_path / "stderr.log"))
    assert "POST /s/exchange" in logs  # the access log did record the requests...
    for secret in (made.token, made.pin or "", cookie):
        assert secret not in logs  # ...but never the token, the PIN or the share cookie


def _up(url: str) -> bool:
    try:
        return requests.get(f"{url}/healthz", timeout=2).status_code == 200
    except requests.RequestException:
        return False


@pytest.mark.parametrize("header", [{"Origin": "https://evil.test"},
                                    {"Sec-Fetch-Site": "cross-site"}])
def test_cross_site_exchange_is_refused(app: Flask, header: dict[str, str]) -> None:
    world = build_world(app)
    made = make_share(world)
    response = app.test_client().post("/s/exchange", data={"token": made.token,
                                                           "pin": made.pin}, headers=header)
    assert response.status_code == 403
    assert link_row(app, made.link.public_id).use_count == 0
