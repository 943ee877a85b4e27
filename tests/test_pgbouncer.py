"""The portal through PgBouncer in transaction pooling mode (docs/cluster.md, "PgBouncer").

A real PgBouncer (the Debian package) on 127.0.0.1 in front of the test PostgreSQL, set up as
docs/cluster.md says: ``pool_mode = transaction``, ``ignore_startup_parameters = options``
(the portal's ``-c lock_timeout`` startup option is refused otherwise, so the database
carries ``lock_timeout`` itself), a server pool sized as docs/cluster.md says (two server
connections per request thread: a request's own transaction stays open while it writes its
ingest or audit record in a second one), shared by more client connections than it has, so
that consecutive transactions of one client land on different server connections. Through
it: the schema's
migrations, a sign-in and its server-side session, STOW-RS and QIDO-RS with dicomweb-client
from several threads at once (prepared statements would be lost between server connections),
audit appends from 16 threads and their sealing, and the cluster-wide job lock
(``once_per_cluster``), whose holder must keep it and whose release must free it.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from flask import Flask
from pydicom.uid import generate_uid
from sqlalchemy import func, select, text

from portal import audit
from portal.access.models import AuditEvent
from portal.jobs import once_per_cluster
from tests.conftest import (
    OIDC_SETTINGS,
    IdentityProvider,
    LiveServer,
    PostgresCluster,
    add_person,
    close_app,
    free_port,
    make_app,
    make_client,
    sign_in,
)
from tests.factories import make_dataset

pytestmark = pytest.mark.postgres

PGBOUNCER = "/usr/sbin/pgbouncer"
THREADS = 8  # request threads of the portal below, as gunicorn's PORTAL_THREADS
SERVER_POOL = 2 * THREADS + 4  # server connections per database (docs/cluster.md)


class PgBouncer:
    """PgBouncer on a free loopback port in front of one PostgreSQL cluster."""

    def __init__(self, cluster: PostgresCluster) -> None:
        self.cluster = cluster
        # Not under pytest's private temp folder: the postgres user must reach it.
        self.root = Path(tempfile.mkdtemp(prefix="portal-pgbouncer-"))
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        ini = self.root / "pgbouncer.ini"
        ini.write_text(f"""[databases]
* = host=127.0.0.1 port={self.cluster.port} user=portal

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {self.port}
unix_socket_dir =
auth_type = any
pool_mode = transaction
default_pool_size = {SERVER_POOL}
max_client_conn = 200
ignore_startup_parameters = options
server_reset_query =
logfile = {self.root}/pgbouncer.log
pidfile = {self.root}/pgbouncer.pid
""")
        if self.cluster.user:  # PgBouncer refuses to run as root
            shutil.chown(self.root, self.cluster.user)
            shutil.chown(ini, self.cluster.user)
        command = [PGBOUNCER, str(ini)]
        if self.cluster.user:
            command = ["runuser", "-u", self.cluster.user, "--", *command]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        import psycopg

        for _ in range(100):
            try:
                with psycopg.connect(f"host=127.0.0.1 port={self.port} user=portal "
                                     "dbname=postgres", connect_timeout=2):
                    return
            except psycopg.OperationalError:
                if self.process.poll() is not None:
                    raise RuntimeError("pgbouncer exited: " + self.log()) from None
                threading.Event().wait(0.1)
        raise RuntimeError("pgbouncer did not answer: " + self.log())

    def log(self) -> str:
        path = self.root / "pgbouncer.log"
        return path.read_text()[-2000:] if path.exists() else ""

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.root, ignore_errors=True)

    def url_of(self, direct_url: str) -> str:
        """The same database reached through PgBouncer."""
        name = direct_url.rsplit("/", 1)[1]
        return f"postgresql+psycopg://portal@127.0.0.1:{self.port}/{name}"


@pytest.fixture(scope="module")
def pgbouncer(postgres: PostgresCluster) -> Iterator[PgBouncer]:
    bouncer = PgBouncer(postgres)
    try:
        bouncer.start()
        yield bouncer
    finally:
        bouncer.stop()


@pytest.fixture
def app(tmp_path: Path, postgres: PostgresCluster, pgbouncer: PgBouncer,
        idp: IdentityProvider) -> Iterator[Flask]:
    """The portal on a new database reached only through PgBouncer."""
    import psycopg

    direct = postgres.new_database()
    name = direct.rsplit("/", 1)[1]
    with psycopg.connect(f"host=127.0.0.1 port={postgres.port} user=portal dbname=postgres",
                         autocommit=True) as conn:
        # What the startup option sets without a pooler (docs/cluster.md).
        conn.execute(f"ALTER DATABASE \"{name}\" SET lock_timeout = '5s'")
    application = make_app(tmp_path / "instance", pgbouncer.url_of(direct),
                           OIDC_ISSUER=idp.issuer, **OIDC_SETTINGS)
    yield application
    close_app(application)


def test_settings_reach_the_server_through_the_pooler(app: Flask) -> None:
    engine = app.extensions["db"].engine
    with engine.connect() as connection:
        assert connection.scalar(text("SHOW lock_timeout")) == "5s"
        # Really through PgBouncer: its port, not the server's.
        assert str(engine.url.port) != str(connection.scalar(
            text("SELECT current_setting('port')")))


def test_sign_in_and_the_session_work(app: Flask, idp: IdentityProvider) -> None:
    add_person(app, idp, "dr-pooled", ["physician"], name="Dr. Pooled")
    client = app.test_client()
    assert sign_in(client, idp, "dr-pooled").status_code == 302
    for _ in range(8):  # the session row is read by each request, on any server connection
        page = client.get("/studies")
        assert page.status_code == 200
    assert client.get("/auth/login").status_code in (200, 302)


def test_stow_and_qido_from_many_clients_at_once(app: Flask) -> None:
    """More clients than server connections, each statement run often enough that psycopg
    would prepare it on the server (prepare_threshold): a prepared statement made on one
    server connection does not exist on the next."""
    name, secret = make_client(app, "pooled-modality")
    study = generate_uid()
    errors: list[str] = []

    def client() -> DICOMwebClient:
        session = requests.Session()
        session.auth = (name, secret)
        return DICOMwebClient(url=f"{server.url}/dicomweb", session=session)

    def work(worker: int) -> int:
        web = client()
        found = 0
        for n in range(8):
            web.store_instances([make_dataset(study=study, patient_id="P-POOL",
                                              patient_name="Pool^Paula",
                                              InstanceNumber=worker * 100 + n)])
            found = len(web.search_for_instances(study_instance_uid=study))
            if not found:
                errors.append(f"worker {worker}: nothing found after store {n}")
        return found

    with LiveServer(app) as server, ThreadPoolExecutor(max_workers=THREADS) as pool:
        list(pool.map(work, range(THREADS)))
        assert errors == []
        web = client()
        assert len(web.search_for_instances(study_instance_uid=study)) == THREADS * 8
        studies = web.search_for_studies(search_filters={"PatientName": "Pool*"})
        assert [s["0020000D"]["Value"][0] for s in studies] == [study]


def test_audit_appends_and_sealing(app: Flask) -> None:
    database = app.extensions["db"]
    errors: list[BaseException] = []

    def writer(index: int) -> None:
        try:
            for k in range(25):
                audit.record(database, audit.INSTANCES_ACCESSED, action="R",
                             outcome=audit.OUTCOME_SUCCESS, who=f"user:pool|{index}",
                             study_instance_uid=f"1.2.3.{index}.{k}",
                             details={"what": "study"})
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    audit.seal(database, wait=True)
    with database.new_session() as session:
        count = session.scalar(select(func.count(AuditEvent.id)).where(
            AuditEvent.who.like("user:pool|%")))
        checked, bad = audit.verify_chain(session)
        unsealed = session.scalar(select(func.count(AuditEvent.id)).where(
            AuditEvent.seq.is_(None)))
    assert count == 16 * 25
    assert bad is None and unsealed == 0 and checked >= count


def test_the_job_lock_is_held_and_released(app: Flask) -> None:
    """``once_per_cluster`` through the pooler: while one run holds the lock, others (on
    other client connections, which PgBouncer may give the holder's server connection) are
    refused; once it ends, the next run gets it."""
    database = app.extensions["db"]
    held, release = threading.Event(), threading.Event()
    answers: list[bool] = []

    def holder() -> None:
        with once_per_cluster("pooled-job", database) as mine:
            answers.append(mine)
            held.set()
            release.wait(30)

    thread = threading.Thread(target=holder)
    thread.start()
    try:
        assert held.wait(30)
        # Other transactions meanwhile, as a busy node's requests would run.
        with database.new_session() as session:
            for _ in range(10):
                session.execute(text("SELECT 1"))
                session.commit()
        others: list[bool] = []
        for _ in range(10):
            with once_per_cluster("pooled-job", database) as mine:
                others.append(mine)
        assert answers == [True] and others == [False] * 10
    finally:
        release.set()
        thread.join(30)
    with once_per_cluster("pooled-job", database) as mine:
        assert mine
    # Released again: a later run gets it too.
    with once_per_cluster("pooled-job", database) as mine:
        assert mine
