"""Shared fixtures: app, client, runner, databases (SQLite and a throwaway PostgreSQL), a live
HTTP server, machine-client credentials, and a guard that keeps every test on loopback."""

from __future__ import annotations

import base64
import ipaddress
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import pytest
from flask import Flask, has_app_context
from flask.testing import FlaskClient
from werkzeug.serving import BaseWSGIServer, make_server

from portal import create_app
from portal.access import clients
from portal.migrate import upgrade_database

REPO = Path(__file__).resolve().parent.parent


# -- network guard ---------------------------------------------------------------------------

def _is_loopback(address: Any) -> bool:
    if not isinstance(address, tuple):
        return True  # AF_UNIX paths
    host = address[0]
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@pytest.fixture(autouse=True, scope="session")
def network_guard() -> Iterator[None]:
    """Fail any test that tries to reach beyond 127.0.0.1."""
    original_connect = socket.socket.connect
    original_connect_ex = socket.socket.connect_ex

    def connect(self: socket.socket, address: Any) -> Any:
        if not _is_loopback(address):
            raise AssertionError(f"test tried to reach {address!r}, beyond loopback")
        return original_connect(self, address)

    def connect_ex(self: socket.socket, address: Any) -> Any:
        if not _is_loopback(address):
            raise AssertionError(f"test tried to reach {address!r}, beyond loopback")
        return original_connect_ex(self, address)

    socket.socket.connect = connect  # type: ignore[method-assign]
    socket.socket.connect_ex = connect_ex  # type: ignore[method-assign]
    yield
    socket.socket.connect = original_connect  # type: ignore[method-assign]
    socket.socket.connect_ex = original_connect_ex  # type: ignore[method-assign]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# -- PostgreSQL ------------------------------------------------------------------------------

class PostgresCluster:
    """A throwaway PostgreSQL cluster on 127.0.0.1, made with initdb and pg_ctl."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.data = root / "data"
        self.port = free_port()
        self.user = "postgres" if os.geteuid() == 0 else None
        self._counter = 0

    def _run(self, *argv: str) -> None:
        command = list(argv)
        if self.user:
            command = ["runuser", "-u", self.user, "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if done.returncode:
            raise RuntimeError(f"{argv[0]} failed: {done.stderr.strip() or done.stdout.strip()}")

    def start(self) -> None:
        bindir = _pg_bindir()
        self.root.mkdir(parents=True, exist_ok=True)
        if self.user:
            shutil.chown(self.root, self.user)
        self._run(str(bindir / "initdb"), "-D", str(self.data), "-U", "portal", "-A", "trust",
                  "--no-sync", "-E", "UTF8")
        self.start_again()

    def start_again(self) -> None:
        """Start the (initialised, stopped) cluster on its port: a restart after ``stop``."""
        self._run(str(_pg_bindir() / "pg_ctl"), "-D", str(self.data), "-w", "-t", "60", "-l",
                  str(self.root / "log"), "-o",
                  f"-h 127.0.0.1 -p {self.port} -k {self.root} -F -c fsync=off "
                  # One cluster serves the whole session: each test app keeps a pool, and
                  # PgBouncer its server connections (100 ran out once, late in a CI run).
                  "-c max_connections=300", "start")

    def stop(self) -> None:
        self._run(str(_pg_bindir() / "pg_ctl"), "-D", str(self.data), "-m", "immediate",
                  "-w", "stop")

    def new_database(self) -> str:
        """Create an empty database and return its SQLAlchemy URL."""
        import psycopg

        self._counter += 1
        name = f"portal_test_{self._counter}"
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=portal dbname=postgres",
                             autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql+psycopg://portal@127.0.0.1:{self.port}/{name}"


def _pg_bindir() -> Path:
    for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (candidate / "initdb").exists():
            return candidate
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    raise RuntimeError("PostgreSQL server binaries not found: install the postgresql package")


@contextmanager
def throwaway_postgres() -> Iterator[PostgresCluster]:
    """A started PostgreSQL cluster, stopped (if still running) and removed afterwards."""
    # Not under pytest's private temp folder: the postgres user must be able to reach it.
    root = Path(tempfile.mkdtemp(prefix="portal-pg-"))
    cluster = PostgresCluster(root)
    try:
        cluster.start()
        yield cluster
    finally:
        try:
            with suppress(RuntimeError):  # a test may have stopped it already
                cluster.stop()
        finally:
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    """One PostgreSQL cluster for the session; each test gets its own database."""
    with throwaway_postgres() as cluster:
        yield cluster


# -- the app ---------------------------------------------------------------------------------

@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Run the test on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'portal.db'}"
    cluster: PostgresCluster = request.getfixturevalue("postgres")
    return cluster.new_database()


def close_app(app: Flask) -> None:
    """Release what an app holds: database connections and render processes (and drop its
    warm-ups that wait for a series to settle, which would connect again later)."""
    from portal.imaging.prerender import forget_waiting

    forget_waiting(app)
    app.extensions["db"].dispose()
    pool = app.extensions.get("render_pool")
    if pool is not None:
        pool.close()


def make_app(instance: Path, database_url: str | None = None, **overrides: Any) -> Flask:
    """An app on its own instance folder with the schema created."""
    settings = {"INSTANCE_PATH": str(instance), "ENV": "test",
                "SECRET_KEY": "test-secret-key-that-is-long-enough-123456"}
    if database_url:
        settings["DATABASE_URL"] = database_url
    settings.update(overrides)
    instance.mkdir(parents=True, exist_ok=True)
    app = create_app(settings)
    upgrade_database(app)  # the real migrations, as a deployment would run them
    return app


@pytest.fixture
def app(tmp_path: Path) -> Iterator[Flask]:
    """The app on SQLite in a fresh instance folder."""
    application = make_app(tmp_path / "instance")
    yield application
    close_app(application)


@pytest.fixture
def any_db_app(tmp_path: Path, database_url: str) -> Iterator[Flask]:
    """The app, once on SQLite and once on PostgreSQL."""
    application = make_app(tmp_path / "instance", database_url)
    yield application
    close_app(application)


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    """A test client."""
    return app.test_client()


@pytest.fixture
def runner(app: Flask) -> Any:
    """A CLI runner."""
    return app.test_cli_runner()


def basic_auth(name: str, secret: str) -> dict[str, str]:
    """An Authorization header for HTTP Basic."""
    token = base64.b64encode(f"{name}:{secret}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def make_client(app: Flask, name: str, *, can_read: bool = True,
                can_store: bool = True) -> tuple[str, str]:
    """Register a machine client; return (name, secret)."""
    database = app.extensions["db"]
    with database.new_session() as session:
        secret = clients.create_client(session, name, can_read=can_read, can_store=can_store)
        session.commit()
    return name, secret


@pytest.fixture
def auth(app: Flask) -> dict[str, str]:
    """Basic credentials of a client that may store and read."""
    return basic_auth(*make_client(app, "tester"))


# -- a live HTTP server ----------------------------------------------------------------------

class LiveServer:
    """The app served over real HTTP on 127.0.0.1 in a thread."""

    def __init__(self, app: Flask) -> None:
        self.app = app
        self.server: BaseWSGIServer = make_server("127.0.0.1", 0, app, threaded=True)
        self.port = self.server.server_port
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.thread.join(timeout=10)


@pytest.fixture
def live_server(app: Flask) -> Iterator[LiveServer]:
    """The app on a real loopback port."""
    with LiveServer(app) as server:
        yield server


# -- sample files ----------------------------------------------------------------------------

def sample_paths() -> list[Path]:
    """Part 10 sample files shipped inside the pydicom and pydicom-data wheels (offline)."""
    from demo.studies import sample_files

    return sample_files()


def wait_for(predicate: Any, timeout: float = 10.0, interval: float = 0.05) -> bool:
    """Poll until ``predicate()`` is true or the timeout passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


# -- a real OIDC provider (PyPI oidc-provider-mock, in-process on loopback) -------------------

class IdentityProvider:
    """The running mock provider: its issuer URL and a way to add users."""

    def __init__(self, server: Any) -> None:
        self.server = server
        self.issuer = f"http://localhost:{server.server_port}"

    def set_user(self, sub: str, **claims: Any) -> None:
        """Create or replace a user with these claims."""
        import requests

        response = requests.put(f"{self.issuer}/users/{sub}", json=claims, timeout=10)
        response.raise_for_status()


@pytest.fixture(scope="session")
def idp() -> Iterator[IdentityProvider]:
    """One mock identity provider for the session (nonces required, like real ones)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from oidc_provider_mock import run_server_in_thread

    with run_server_in_thread(port=0, require_nonce=True) as server:
        yield IdentityProvider(server)


OIDC_SETTINGS = {"OIDC_CLIENT_ID": "portal-test", "OIDC_CLIENT_SECRET": "portal-test-secret",
                 "OIDC_ROLES_CLAIM": "portal_roles"}


@pytest.fixture
def oidc_app(tmp_path: Path, idp: IdentityProvider) -> Iterator[Flask]:
    """The app configured to sign people in at the mock provider."""
    application = make_app(tmp_path / "instance", OIDC_ISSUER=idp.issuer, **OIDC_SETTINGS)
    yield application
    close_app(application)


def sign_in(client: FlaskClient, idp: IdentityProvider, sub: str,
            next_path: str = "/studies") -> Any:
    """Walk the real code flow: portal -> provider (choose the user) -> callback."""
    from urllib.parse import urlsplit

    import requests

    start = client.get("/auth/login", query_string={"next": next_path})
    assert start.status_code == 302, start.data
    authorize = start.headers["Location"]
    assert authorize.startswith(idp.issuer)
    chosen = requests.post(authorize, data={"sub": sub}, allow_redirects=False, timeout=10)
    assert chosen.status_code in (302, 303), chosen.text[:500]
    callback = urlsplit(chosen.headers["Location"])
    return client.get(f"{callback.path}?{callback.query}")


def add_person(app: Flask, idp: IdentityProvider, sub: str, roles: list[str],
               practice: str | None = None, name: str = "") -> int:
    """Register a person as an office manager would (roles, practice); return the user id."""
    from portal.access.models import User
    from portal.access.users import get_or_create_practice

    idp.set_user(sub, email=f"{sub}@demo.example", name=name or sub)
    with app.extensions["db"].write_transaction() as session:
        user = User(issuer=idp.issuer, subject=sub, email=f"{sub}@demo.example",
                    display_name=name or sub, roles=roles, active=True, security_epoch=0)
        if practice:
            user.practice_fk = get_or_create_practice(session, practice).id
        session.add(user)
        session.flush()
        return user.id


def signed_in(app: Flask, idp: IdentityProvider, sub: str) -> FlaskClient:
    """A browser signed in as ``sub`` through the real provider."""
    client = app.test_client()
    assert sign_in(client, idp, sub).status_code == 302
    return client


def access_token(app: Flask, idp: IdentityProvider, sub: str,
                 client: tuple[str, str] = ("portal-test", "portal-test-secret")) -> str:
    """An access token for ``sub`` as a script with its own client would get one: the code
    flow with PKCE at the provider, then its token endpoint (``client``: id and secret of
    the application it is issued to)."""
    import base64
    import hashlib
    import secrets
    from urllib.parse import parse_qs, urlsplit

    import requests

    start = app.test_client().get("/auth/login")
    redirect_uri = parse_qs(urlsplit(start.headers["Location"]).query)["redirect_uri"][0]
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()
                                         ).rstrip(b"=").decode()
    params = {"client_id": client[0], "redirect_uri": redirect_uri,
              "response_type": "code", "scope": "openid email", "state": "s", "nonce": "n",
              "code_challenge": challenge, "code_challenge_method": "S256"}
    chosen = requests.post(f"{idp.issuer}/oauth2/authorize", params=params,
                           data={"sub": sub}, allow_redirects=False, timeout=10)
    code = parse_qs(urlsplit(chosen.headers["Location"]).query)["code"][0]
    answer = requests.post(f"{idp.issuer}/oauth2/token", data={
        "grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri,
        "code_verifier": verifier}, auth=client, timeout=10)
    return str(answer.json()["access_token"])


def csrf_of(client: FlaskClient) -> str:
    """The CSRF token of a signed-in browser's session."""
    client.get("/studies")
    with client.session_transaction() as session:
        return str(session.get("csrf") or "")


# -- a real Redis (Debian redis-server) -------------------------------------------------------

@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A throwaway redis-server on 127.0.0.1, stopped after the session."""
    executable = shutil.which("redis-server") or "/usr/bin/redis-server"
    port = free_port()
    server = subprocess.Popen([executable, "--port", str(port), "--bind", "127.0.0.1",
                               "--save", "", "--appendonly", "no", "--maxmemory", "64mb",
                               "--maxmemory-policy", "allkeys-lru"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        import redis

        client = redis.Redis.from_url(url)

        def ready() -> bool:
            try:
                return bool(client.ping())
            except redis.ConnectionError:
                return False

        assert wait_for(ready, timeout=10), "redis-server did not start"
        yield url
    finally:
        server.terminate()
        server.wait(timeout=10)



@pytest.fixture(autouse=True)
def no_leaked_flask_context(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test that leaves a Flask context pushed.

    A streamed response (WADO-RS, ZIP) that a test does not read keeps its request context
    pushed until the garbage collector closes the generator; meanwhile every later CLI
    command runs against that stale app. Read or close every streamed response.
    """
    yield
    if has_app_context():
        pytest.fail(f"{request.node.nodeid} left a Flask context pushed "
                    "(a streamed response not read or closed)", pytrace=False)


@pytest.fixture(autouse=True)
def no_warm_up_after_the_test() -> Iterator[None]:
    """Drop the pre-render warm-ups still waiting for a series to settle when a test ends
    (portal/imaging/prerender.py, ``Settling``): started a second later, they would open
    connections to a database the test has closed (and keep them: a shared PostgreSQL then
    runs out of connections)."""
    yield
    from portal.imaging.prerender import forget_waiting

    forget_waiting()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Stop the one Chromium the browser tests share (tests/browser.py)."""
    from tests.browser import close_shared

    close_shared()
