"""Dependencies treated as dependencies (docs/security.md (c) 1, 3, 16): a stopped or hung
Redis costs a few bounded timeouts and then nothing, ``/readyz`` says so, and a PostgreSQL
outage answers 503 with ``Retry-After`` on every route, sign-in included, under the real
gunicorn; the portal recovers by itself when the database is back."""

from __future__ import annotations

import http.client
import io
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from portal.archive import current_archive
from tests.conftest import (
    OIDC_SETTINGS,
    IdentityProvider,
    PostgresCluster,
    add_person,
    basic_auth,
    close_app,
    free_port,
    make_app,
    make_client,
    signed_in,
    throwaway_postgres,
    wait_for,
)
from tests.factories import make_instance
from tests.support.gunicorn import served

# -- Redis ---------------------------------------------------------------------------------


@pytest.fixture
def own_redis() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A redis-server of this test's own, so it can be hung (SIGSTOP) and stopped."""
    import redis

    port = free_port()
    server = subprocess.Popen([shutil.which("redis-server") or "/usr/bin/redis-server",
                               "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                               "--appendonly", "no"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"

    def ready() -> bool:
        try:
            return bool(redis.Redis.from_url(url).ping())
        except redis.ConnectionError:
            return False

    try:
        assert wait_for(ready, timeout=10), "redis-server did not start"
        yield url, server
    finally:
        server.send_signal(signal.SIGCONT)
        server.terminate()
        server.wait(timeout=10)


def _rendered_urls(app: object, count: int) -> list[str]:
    """``count`` instances stored, each one's rendered URL (distinct: no cache hit)."""
    urls = []
    with app.app_context():  # type: ignore[attr-defined]
        for _ in range(count):
            data = make_instance(rows=32, columns=32)
            current_archive().ingest(data, who="test")
            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
            urls.append(f"/dicomweb/studies/{ds.StudyInstanceUID}/series/"
                        f"{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}/rendered")
    return urls


def test_a_hung_redis_costs_a_few_timeouts_then_nothing(
        tmp_path: Path, own_redis: tuple[str, subprocess.Popen[bytes]]) -> None:
    """SIGSTOP: Redis accepts connections and never answers. Every image still renders; after
    REDIS_BREAKER_FAILURES timeouts the breaker opens and images no longer wait for Redis;
    /readyz says "degraded" (still 200); once Redis answers again the cache is used again."""
    import redis

    url, server = own_redis
    app = make_app(tmp_path / "instance", REDIS_URL=url, REDIS_TIMEOUT_SECONDS=0.5,
                   REDIS_BREAKER_FAILURES=3, REDIS_BREAKER_RESET_SECONDS=2)
    try:
        auth = basic_auth(*make_client(app, "reader"))
        client = app.test_client()
        urls = _rendered_urls(app, 14)
        assert client.get(urls[0], headers=auth).status_code == 200
        assert client.get("/readyz").get_json()["checks"]["cache"] == "ok"
        server.send_signal(signal.SIGSTOP)
        # The first calls wait for their timeout (a get, a put), and open the breaker.
        for image in urls[1:3]:
            assert client.get(image, headers=auth).status_code == 200
        started = time.monotonic()
        for image in urls[3:13]:
            answer = client.get(image, headers=auth)
            assert answer.status_code == 200 and answer.data
        elapsed = time.monotonic() - started
        # Without the breaker these ten would wait 2 x 0.5 s each (10 s); with it, none.
        assert elapsed < 2.5, f"ten images took {elapsed:.1f} s with Redis hung"
        ready = client.get("/readyz")
        assert ready.status_code == 200
        assert ready.get_json()["status"] == "degraded"
        assert ready.get_json()["checks"]["cache"] == "unavailable"
        server.send_signal(signal.SIGCONT)
        time.sleep(2.2)  # the breaker lets one trial call through after its reset time
        assert wait_for(lambda: client.get("/readyz").get_json()["checks"]["cache"] == "ok",
                        timeout=10)
        before = len(redis.Redis.from_url(url).keys("render:*"))
        assert client.get(urls[13], headers=auth).status_code == 200
        assert len(redis.Redis.from_url(url).keys("render:*")) > before
    finally:
        server.send_signal(signal.SIGCONT)
        close_app(app)


def test_a_stopped_redis_makes_the_node_degraded_not_unready(
        tmp_path: Path, own_redis: tuple[str, subprocess.Popen[bytes]]) -> None:
    """Redis gone: /readyz pings it and says so (it said "ok" before), images still render and
    share-link limits are still counted (in the database)."""
    url, server = own_redis
    app = make_app(tmp_path / "instance", REDIS_URL=url, REDIS_TIMEOUT_SECONDS=0.5)
    try:
        auth = basic_auth(*make_client(app, "reader"))
        client = app.test_client()
        image = _rendered_urls(app, 1)[0]
        server.terminate()
        server.wait(timeout=10)
        ready = client.get("/readyz")
        assert ready.status_code == 200, ready.data
        assert ready.get_json()["checks"]["cache"] == "unavailable"
        assert ready.get_json()["status"] == "degraded"
        assert client.get(image, headers=auth).status_code == 200
        unknown = "A" * 43
        statuses = [client.post("/s/exchange", data={"token": unknown}).status_code
                    for _ in range(22)]
        assert statuses[-1] == 429 and statuses.count(404) == 20, statuses
    finally:
        close_app(app)


# -- PostgreSQL ----------------------------------------------------------------------------


@pytest.fixture
def own_postgres() -> Iterator[PostgresCluster]:
    """A PostgreSQL cluster of this test's own, so it can be stopped and started again."""
    with throwaway_postgres() as cluster:
        yield cluster


def _get(port: int, path: str, cookie: str = "", method: str = "GET",
         body: str = "") -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Cookie": f"portal={cookie}"} if cookie else {}
    if body:
        headers.update({"Content-Type": "application/x-www-form-urlencoded",
                        "Origin": f"http://127.0.0.1:{port}", "Sec-Fetch-Site": "same-origin"})
    connection.request(method, path, body=body or None, headers=headers)
    answer = connection.getresponse()
    return answer.status, dict(answer.getheaders()), answer.read()


@pytest.mark.postgres
def test_a_database_outage_answers_503_on_every_route_and_recovers(
        tmp_path: Path, own_postgres: PostgresCluster, idp: IdentityProvider) -> None:
    """PostgreSQL stopped under a running gunicorn: a signed-in physician gets 503 with
    Retry-After (not a trip to the sign-in page), and so do sign-in, the share-link exchange
    and the API; nothing answers 500. Started again, the same session works."""
    url = own_postgres.new_database()
    instance = tmp_path / "instance"
    settings = {"OIDC_ISSUER": idp.issuer, **OIDC_SETTINGS}
    app = make_app(instance, url, **settings)
    try:
        add_person(app, idp, "outage-doc", ["physician"])
        browser = signed_in(app, idp, "outage-doc")
        cookie = browser.get_cookie("portal")
        assert cookie is not None
    finally:
        close_app(app)
    env_settings = {key: str(value) for key, value in settings.items()}
    with served(instance, "outage-client", DATABASE_URL=url, **env_settings) as node:
        assert _get(node.port, "/studies", cookie.value)[0] == 200
        own_postgres.stop()
        answers = {
            "signed-in list": _get(node.port, "/studies", cookie.value),
            "signed-in API": _get(node.port, "/api/studies", cookie.value),
            "sign-in": _get(node.port, "/auth/login?next=/studies"),
            "share landing exchange": _get(node.port, "/s/exchange", method="POST",
                                           body="token=" + "A" * 43 + "&pin=1234"),
            "readiness": _get(node.port, "/readyz"),
        }
        for name, (status, headers, _body) in answers.items():
            assert status == 503, (name, status)
            assert int(headers.get("Retry-After", "0")) >= 1, name
        # Someone not signed in is sent to sign in (that needs no database), and signing in
        # answers the 503.
        status, headers, _body = _get(node.port, "/studies")
        assert status == 302 and headers["Location"].startswith("/auth/login")
        assert _get(node.port, headers["Location"])[0] == 503
        assert _get(node.port, "/healthz")[0] == 200  # the process itself is alive
        own_postgres.start_again()
        assert wait_for(lambda: _get(node.port, "/studies", cookie.value)[0] == 200,
                        timeout=30), "the node did not recover with the database"
        assert _get(node.port, "/readyz")[0] == 200

