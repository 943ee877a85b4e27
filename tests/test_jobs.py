"""Background jobs (portal/jobs.py): real redis-server, real ``flask jobs worker`` processes,
real PostgreSQL for the once-per-cluster locks, a real Orthanc for sync and a TCP syslog
receiver for audit forwarding."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from flask import Flask
from pydicom.uid import generate_uid
from rq.job import Job as RqJob
from rq.serializers import JSONSerializer
from sqlalchemy import func, select, text

from portal import audit, jobs
from portal.archive import current_archive
from portal.imaging.rendition import parse_rendition
from portal.index.models import Instance
from tests.access.test_audit_forward import SyslogReceiver
from tests.archive.test_external import (
    PORTAL_PASSWORD,
    PORTAL_USER,
    Relay,
    load_studies,
    start_pacs,
)
from tests.conftest import (
    OIDC_SETTINGS,
    IdentityProvider,
    PostgresCluster,
    add_person,
    close_app,
    free_port,
    make_app,
    signed_in,
    wait_for,
)
from tests.factories import make_dataset, to_bytes

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def queue_url(redis_url: str) -> Iterator[str]:
    """A Redis database of its own on the session's redis-server, emptied before and after."""
    url = redis_url.rsplit("/", 1)[0] + "/7"
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()


def _environment(app: Flask) -> dict[str, str]:
    """The app's settings as PORTAL_* variables, for a process of the same installation."""
    settings = app.config["PORTAL"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PORTAL_")}
    for key in ("INSTANCE_PATH", "ENV", "SECRET_KEY", "DATABASE_URL", "REDIS_URL", "JOBS",
                "JOBS_RETRIES", "JOBS_RETRY_SECONDS", "AUDIT_SYSLOG_URL", "ARCHIVE_URL",
                "ARCHIVE_USERNAME", "ARCHIVE_PASSWORD", "ARCHIVE_SYNC_INTERVAL_SECONDS",
                "ARCHIVE_SYNC_PAGE_SIZE", "JOBS_PERIODIC", "JOBS_AUDIT_FORWARD_SECONDS",
                "RENDER_ISOLATION"):
        value = settings[key]
        if value is None:
            continue
        if isinstance(value, list):
            value = ",".join(str(v) for v in value)
        env[f"PORTAL_{key}"] = str(value).lower() if isinstance(value, bool) else str(value)
    return env


def flask_process(app: Flask, *args: str) -> subprocess.Popen[str]:
    """``flask --app app ARGS`` as its own process on the app's installation."""
    return subprocess.Popen([sys.executable, "-m", "flask", "--app", "app", *args], cwd=REPO,
                            env=_environment(app), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def stop(process: subprocess.Popen[str]) -> tuple[str, str]:
    """Stop a process (SIGTERM: RQ finishes its job first) and return its output."""
    if process.poll() is None:
        process.terminate()
    try:
        out, err = process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
    return out, err


@pytest.fixture
def worker_of() -> Iterator[Any]:
    """Start ``flask jobs worker`` for an app; every worker started is stopped afterwards."""
    started: list[subprocess.Popen[str]] = []

    def start(app: Flask) -> subprocess.Popen[str]:
        process = flask_process(app, "jobs", "worker")
        started.append(process)
        client = redis.Redis.from_url(app.config["PORTAL"]["REDIS_URL"])
        assert wait_for(lambda: client.scard("rq:workers:portal") > 0 or process.poll(),
                        timeout=30), "the worker did not register"
        assert process.poll() is None, stop(process)
        jobs._workers_seen.clear()
        return process

    yield start
    for process in started:
        stop(process)


def _thumbnail_key(app: Flask, sop_instance_uid: str) -> str:
    with app.app_context():
        return parse_rendition({}, "", thumbnail=True).cache_key(
            current_archive().locate(sop_instance_uid).sha256, 1)


def test_prerendering_runs_on_a_worker_into_the_shared_cache(tmp_path: Path, queue_url: str,
                                                             worker_of: Any) -> None:
    app = make_app(tmp_path / "instance", REDIS_URL=queue_url)
    client = redis.Redis.from_url(queue_url)
    try:
        # auto: no worker yet, so the job runs in this process (the embedded behaviour).
        jobs._workers_seen.clear()
        assert not jobs.uses_queue(app)
        worker = worker_of(app)
        assert jobs.uses_queue(app)
        study, series = generate_uid(), generate_uid()
        datasets = [make_dataset(study=study, series=series, InstanceNumber=i + 1, value=i * 5)
                    for i in range(3)]
        with app.app_context():
            archive = current_archive()
            stored = [archive.ingest(to_bytes(ds), who="test") for ds in datasets]
            archive.after_ingest(stored, via="stow", who="test", source_address="127.0.0.1")
        # It is the worker that renders it: the job ends in RQ's finished registry.
        finished = jobs.queue_of(app).finished_job_registry

        def done() -> list[str]:
            return [RqJob.fetch(i, connection=client, serializer=JSONSerializer).description
                    for i in finished.get_job_ids()]

        assert wait_for(lambda: "prerender" in done(), timeout=60), stop(worker)
        key = _thumbnail_key(app, datasets[1].SOPInstanceUID)
        assert client.get(key) is not None
    finally:
        close_app(app)


SCRAPER_TOKEN = "scrape-the-jobs-with-this-token"


def test_a_failing_job_is_retried_with_back_off_then_failed_and_shown(
        tmp_path: Path, queue_url: str, worker_of: Any, idp: IdentityProvider) -> None:
    closed = free_port()  # nothing listens: the audit repository is down
    app = make_app(tmp_path / "instance", REDIS_URL=queue_url, JOBS="queue", JOBS_RETRIES=2,
                   JOBS_RETRY_SECONDS=[2, 3], AUDIT_SYSLOG_URL=f"tcp://127.0.0.1:{closed}",
                   JOBS_PERIODIC=["archive-sync"],  # no audit-forward slots of its own
                   METRICS_TOKEN=SCRAPER_TOKEN, OIDC_ISSUER=idp.issuer, **OIDC_SETTINGS)
    client = redis.Redis.from_url(queue_url)
    try:
        audit.record(app.extensions["db"], audit.QUERY, action="E",
                     outcome=audit.OUTCOME_SUCCESS, who="user:test", details={})
        worker_of(app)
        started = time.monotonic()
        with app.app_context():
            job_id = jobs.enqueue("audit-forward")
        assert job_id is not None
        queue = jobs.queue_of(app)
        job = RqJob.fetch(job_id, connection=client, serializer=JSONSerializer)
        assert job.retries_left == 2
        assert wait_for(lambda: job_id in queue.failed_job_registry.get_job_ids(), timeout=60)
        # Tried three times, waiting 2 s and then 3 s between (RQ's scheduler moved each
        # retry back to the queue when it was due), then failed for good. RQ keeps a retry's
        # due time in whole seconds (it drops the fraction), so each wait may be up to 1 s
        # short: more than 3 s in all. Without the back-off the three refused connections
        # would take milliseconds.
        assert time.monotonic() - started > 3.0
        job.refresh()
        assert job.retries_left == 0 and job.get_status() == "failed"
        ready = app.test_client().get(
            "/readyz", headers={"Authorization": f"Bearer {SCRAPER_TOKEN}"}).get_json()
        assert ready["jobs"]["failed"] == 1 and ready["jobs"]["workers"] == 1
        assert ready["jobs"]["mode"] == "queue"
        # Anyone else sees the state alone: the queue's counts say how busy the clinic is.
        assert app.test_client().get("/readyz").get_json()["jobs"] == {"state": "ok"}
        shown = app.test_cli_runner().invoke(args=["jobs", "status"])
        assert "1 failed" in shown.output and "audit-forward" in shown.output
        assert "unreachable" in shown.output, shown.output
        # The office manager's console says it in plain words.
        add_person(app, idp, "om-jobs", ["office_manager"], "Clinic")
        page = signed_in(app, idp, "om-jobs").get("/admin/").get_data(as_text=True)
        assert "<strong>1</strong> background jobs failed" in page
        assert "Sending the audit trail to the audit repository: failed" in page
    finally:
        close_app(app)


def test_periodic_slots_are_scheduled_once_however_many_workers(tmp_path: Path,
                                                                queue_url: str) -> None:
    app = make_app(tmp_path / "instance", REDIS_URL=queue_url, AUDIT_SYSLOG_URL="tcp://x:1",
                   JOBS_AUDIT_FORWARD_SECONDS=30,
                   JOBS_PERIODIC=["audit-forward", "audit-seal"])  # (no daily retention run)
    try:
        assert jobs.periodic_jobs(app) == {"audit-forward": 30}  # SQLite: no audit-seal
        first = jobs.schedule_periodic(app)
        assert len(first) == 1 and first[0].startswith("periodic-audit-forward-")
        assert jobs.schedule_periodic(app) == []  # a second worker: the slot is there
        assert jobs.queue_of(app).scheduled_job_registry.get_job_ids() == first
    finally:
        close_app(app)


def test_a_worker_runs_the_periodic_jobs(tmp_path: Path, queue_url: str,
                                        worker_of: Any) -> None:
    """No `audit forward --watch` anywhere: the worker's scheduler runs audit-forward every
    2 s, and each run schedules the next."""
    port = free_port()
    receiver = SyslogReceiver(port)
    app = make_app(tmp_path / "instance", REDIS_URL=queue_url, JOBS_AUDIT_FORWARD_SECONDS=2,
                   AUDIT_SYSLOG_URL=f"tcp://127.0.0.1:{port}")
    try:
        for number in range(5):
            audit.record(app.extensions["db"], audit.QUERY, action="E",
                         outcome=audit.OUTCOME_SUCCESS, who=f"user:test|n{number}", details={})
        worker = worker_of(app)

        def records() -> int:
            return sum(1 for m in receiver.messages if "CHECKPOINT" not in m)

        assert wait_for(lambda: records() >= 5, timeout=30), stop(worker)
        audit.record(app.extensions["db"], audit.QUERY, action="E",
                     outcome=audit.OUTCOME_SUCCESS, who="user:test|later", details={})
        assert wait_for(lambda: records() >= 6, timeout=30), stop(worker)
        assert records() == 6
    finally:
        receiver.close()
        close_app(app)


def test_jobs_run_in_process_without_redis(app: Flask) -> None:
    """The embedded default: no Redis, so a job runs here (the report notice in the caller,
    pre-rendering on its own thread), and /readyz shows no queue."""
    assert not jobs.uses_queue(app)
    ran = app.test_cli_runner().invoke(args=["jobs", "status"])
    assert "run in the process" in ran.output
    assert "jobs" not in app.test_client().get("/readyz").get_json()
    with app.app_context():
        assert jobs.enqueue("report-notice", 12345) is None  # no such report: nothing to do


@pytest.mark.postgres
def test_two_sync_loops_on_postgresql_never_both_run(tmp_path: Path,
                                                      postgres: PostgresCluster) -> None:
    orthanc = start_pacs(tmp_path / "orthanc")
    relay = Relay(orthanc.http_port)
    relay.delay = 0.15  # a slow archive: one run takes longer than the loop's interval
    app = None
    loops: list[subprocess.Popen[str]] = []
    try:
        load_studies(orthanc, 6, instances=2)
        app = make_app(tmp_path / "instance", postgres.new_database(),
                       ARCHIVE_URL=f"http://127.0.0.1:{relay.port}/dicom-web",
                       ARCHIVE_USERNAME=PORTAL_USER, ARCHIVE_PASSWORD=PORTAL_PASSWORD,
                       ARCHIVE_SYNC_INTERVAL_SECONDS=1, ARCHIVE_SYNC_PAGE_SIZE=2)
        loops = [flask_process(app, "archive", "sync", "--watch") for _ in range(2)]
        database = app.extensions["db"]

        def instances() -> int:
            with database.new_session() as session:
                return int(session.scalar(select(func.count(Instance.id))) or 0)

        assert wait_for(lambda: instances() == 12, timeout=120)
        time.sleep(3)  # more turns of both loops
        alive = [loop.poll() is None for loop in loops]
        outputs = [stop(loop) for loop in loops]
        assert alive == [True, True], outputs  # neither died
        errors = "".join(err for _out, err in outputs)
        assert "Traceback" not in errors and "UniqueViolation" not in errors, errors
        assert "this run is skipped" in errors  # one waited its turn
        assert instances() == 12
    finally:
        for loop in loops:
            stop(loop)
        if app is not None:
            close_app(app)
        relay.close()
        orthanc.stop()


@pytest.mark.postgres
def test_two_forwarders_never_send_a_record_twice(tmp_path: Path,
                                                   postgres: PostgresCluster) -> None:
    port = free_port()
    receiver = SyslogReceiver(port)
    relay = Relay(port)  # a slow repository: one forwarding run overlaps the other's start
    relay.delay = 0.2
    app = make_app(tmp_path / "instance", postgres.new_database(),
                   AUDIT_SYSLOG_URL=f"tcp://127.0.0.1:{relay.port}")
    try:
        database = app.extensions["db"]
        with database.write_transaction() as session:
            for number in range(20000):
                audit.append(session, audit.QUERY, action="E", outcome=audit.OUTCOME_SUCCESS,
                             who=f"user:test|n{number}", details={"n": number})
        audit.seal(database, wait=True)
        with database.new_session() as session:
            total = int(session.execute(text("SELECT count(*) FROM audit_event")).scalar() or 0)
        forwarders = [flask_process(app, "audit", "forward", "--watch", "1") for _ in range(2)]
        try:
            assert wait_for(lambda: len(receiver.messages) >= total, timeout=120)
            time.sleep(3)  # both loops take more turns
        finally:
            outputs = [stop(f) for f in forwarders]
        ids = Counter(m.split(' id="', 1)[1].split('"', 1)[0] for m in receiver.messages
                      if " id=" in m and "CHECKPOINT" not in m)
        assert len(ids) == total, outputs
        assert [i for i, n in ids.items() if n > 1] == []
        errors = "".join(err for _out, err in outputs)
        assert "Traceback" not in errors, errors
    finally:
        relay.close()
        receiver.close()
        close_app(app)


@pytest.mark.postgres
def test_once_per_cluster_is_held_for_the_run_and_released(tmp_path: Path,
                                                           postgres: PostgresCluster) -> None:
    app = make_app(tmp_path / "instance", postgres.new_database())
    try:
        with app.app_context():
            with jobs.once_per_cluster("archive-sync") as first:
                with jobs.once_per_cluster("archive-sync") as second:
                    assert first and not second
                with jobs.once_per_cluster("audit-forward") as other:
                    assert other  # another job's lock is another key
            with jobs.once_per_cluster("archive-sync") as again:
                assert again
    finally:
        close_app(app)
