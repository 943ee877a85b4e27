"""Background work as named jobs: on RQ queues in Redis when there is a worker, in this
process otherwise, and periodic work once per cluster (docs/operations.md, "Background
jobs"; docs/architecture.md, "Real components").

One interface for every room: ``enqueue(name, *args)`` runs the job function registered
under ``name`` (``JOBS`` below: "module:function" names, resolved when a job runs, so this
module imports no room and every room may import it). Where it runs is ``PORTAL_JOBS``:

- ``queue``: on the RQ queue ``portal`` in ``REDIS_URL``, run by ``flask jobs worker`` (an
  RQ worker with the application), retried ``JOBS_RETRIES`` times with the back-off
  ``JOBS_RETRY_SECONDS`` (RQ's ``Retry``; its scheduler, which every ``flask jobs worker``
  runs unless told not to, moves a retry and a periodic run to the queue when it is due),
  then kept in RQ's failed-job registry (``/readyz``, ``flask jobs status``).
- ``process``: in this process, as before: a background job on its own thread (one thread
  per lane: pre-rendering never queues behind anything else), a foreground one (report
  notices) in the caller, as it always ran.
- ``auto`` (the default): ``queue`` while Redis answers and at least one worker is
  registered on it (looked at every few seconds), ``process`` otherwise: a portal without
  workers, or with Redis down, loses no work.

Periodic jobs (archive sync, audit forwarding and sealing, the report digest) are scheduled
by the workers: each run has a slot (``periodic-<name>-<n>``, time // every), enqueued with
RQ's ``unique`` id, so however many workers schedule it, the slot runs once; a run schedules
the next slot. Each periodic job, and each ``--watch`` loop of the CLI that does the same
work, runs inside ``once_per_cluster``: a PostgreSQL advisory lock held on a connection of its
own for the run (``pg_try_advisory_lock``), or a file lock in the instance folder on SQLite
(one node); whoever does not get it skips its turn.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import logging
import os
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from flask import Flask, current_app, has_app_context
from flask.cli import with_appcontext
from sqlalchemy import text

from portal import failures
from portal.log import carry, current_request_id, request_id_scope
from portal.metrics import JOB_FAILURES

if TYPE_CHECKING:
    from portal.db import Database

log = logging.getLogger(__name__)

QUEUE = "portal"
RUN = "portal.jobs.run_job"  # what RQ calls: the job's name and arguments follow


@dataclass(frozen=True)
class Job:
    """A kind of job: its function ("module:function"), and where it runs in process."""

    function: str
    lane: str | None = None  # in process: a thread of its own (None: in the caller)
    periodic: bool = False  # scheduled by the workers, run once per cluster at a time


JOBS: dict[str, Job] = {
    # After ingest: thumbnails and middle images into the shared render cache, volumes.
    "prerender": Job("portal.imaging.prerender:warm_series", lane="prerender"),
    # A report is final: e-mail and text message to who should read it.
    "report-notice": Job("portal.reports.notify:send_notices"),
    "report-digest": Job("portal.reports.notify:send_digest_now", periodic=True),
    "archive-sync": Job("portal.archive.sync:sync_now", periodic=True),
    "audit-forward": Job("portal.jobs:forward_audit", periodic=True),
    "audit-seal": Job("portal.jobs:seal_audit", periodic=True),
    # Retention (docs/operations.md): the daily list of studies due, then the approved
    # deletions; an approval in the console queues the deletions at once.
    "retention-daily": Job("portal.retention.service:run_daily", periodic=True),
    "retention-apply": Job("portal.retention.service:apply_now", lane="retention"),
    # Embedded images older than ARCHIVE_COMPRESS_AFTER_DAYS re-encoded losslessly.
    "archive-compress": Job("portal.archive.compress:compress_now", periodic=True),
    # A large study accepted from the upload inbox, batch by batch, resumable (docs/inbox.md).
    "inbox-accept": Job("portal.inbox.reconcile:run_accept", lane="inbox"),
}


class JobsUnavailable(failures.Unavailable):
    """The queue was asked for and cannot be used (no Redis configured): 503."""


# -- where a job runs --------------------------------------------------------------------------

_lanes: dict[str, ThreadPoolExecutor] = {}
_lanes_lock = threading.Lock()
_workers_seen: dict[str, tuple[float, bool]] = {}
WORKER_LOOK_SECONDS = 5.0


def _lane(name: str) -> ThreadPoolExecutor:
    with _lanes_lock:
        executor = _lanes.get(name)
        if executor is None:
            executor = _lanes[name] = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        return executor


def _redis(app: Flask, *, blocking: bool) -> Any:
    """A Redis client for RQ: a worker's waits on the queue (no read timeout: RQ blocks on
    it), or short calls (enqueue, status: a hung Redis costs at most a few seconds)."""
    import redis

    url = app.config["PORTAL"]["REDIS_URL"]
    if not url:
        raise JobsUnavailable("background jobs on a queue need REDIS_URL")
    key = "jobs_redis_blocking" if blocking else "jobs_redis"
    made = app.extensions.get(key)
    if made is None or made[0] != os.getpid():  # none yet, or a forked process
        timeout = None if blocking else max(2.0, app.config["PORTAL"]["REDIS_TIMEOUT_SECONDS"])
        made = app.extensions[key] = (os.getpid(), redis.Redis.from_url(
            url, socket_connect_timeout=2, socket_timeout=timeout))
    return made[1]


def queue_of(app: Flask, *, blocking: bool = False) -> Any:
    """The RQ queue (JSON-serialised: nothing read from Redis is unpickled)."""
    from rq import Queue
    from rq.serializers import JSONSerializer

    return Queue(QUEUE, connection=_redis(app, blocking=blocking), serializer=JSONSerializer)


def uses_queue(app: Flask) -> bool:
    """Whether jobs go to the RQ queue now (``PORTAL_JOBS``; ``auto``: a worker is there)."""
    mode = app.config["PORTAL"]["JOBS"]
    if mode == "process" or not app.config["PORTAL"]["REDIS_URL"]:
        return False
    if mode == "queue":
        return True
    url = app.config["PORTAL"]["REDIS_URL"]
    now = time.monotonic()
    seen = _workers_seen.get(url)
    if seen is not None and now - seen[0] < WORKER_LOOK_SECONDS:
        return seen[1]
    try:
        from rq import Worker

        answer = bool(Worker.all(queue=queue_of(app)))
    except Exception:  # Redis down or hung: the work runs here
        log.warning("the job queue is unreachable; background jobs run in process")
        answer = False
    _workers_seen[url] = (now, answer)
    return answer


def _retry(app: Flask) -> Any:
    from rq import Retry

    settings = app.config["PORTAL"]
    if not settings["JOBS_RETRIES"]:
        return None
    return Retry(max=settings["JOBS_RETRIES"], interval=settings["JOBS_RETRY_SECONDS"])


def enqueue(name: str, *args: Any, at: datetime | None = None, wait: bool = False,
            app: Flask | None = None) -> str | None:
    """Run job ``name`` with ``args`` (JSON values) in the background; return the RQ job id,
    or None when it runs (or ran) in this process.

    ``at``: not before then. ``wait``: in this process, now, and return when done (a CLI
    import that waits for its pre-rendering). ``app`` where no application context is
    active (DIMSE handler threads).
    """
    kind = JOBS[name]
    app = app or current_app._get_current_object()  # type: ignore[attr-defined]
    if not wait and uses_queue(app):
        try:
            queue = queue_of(app)
            options = {"retry": _retry(app), "description": name, "failure_ttl": 7 * 86400,
                       "timeout": app.config["PORTAL"]["JOBS_TIMEOUT_SECONDS"],
                       "meta": {"request_id": current_request_id()}}  # portal/log.py
            if at is not None:
                job = queue.enqueue_at(at, RUN, name, list(args), **options)
            else:
                job = queue.enqueue_call(RUN, args=(name, list(args)), **options)
            return str(job.id)
        except JobsUnavailable:
            raise
        except Exception:  # Redis went away between the look and the enqueue
            log.warning("job %s could not be queued; it runs in process", name)
    if wait or kind.lane is None:
        _run_in_process(app, name, list(args))
        return None
    delay = 0.0 if at is None else max(0.0, (at - datetime.now(UTC)).total_seconds())
    _lane(kind.lane).submit(carry(_later), delay, app, name, list(args))
    return None


def _later(delay: float, app: Flask, name: str, args: list[Any]) -> None:
    if delay:
        time.sleep(delay)
    try:
        _run_in_process(app, name, args)
    except Exception:  # a background job never fails anyone's request; it is logged
        log.exception("background job %s failed", name)
        JOB_FAILURES.labels(name).inc()


def _run_in_process(app: Flask, name: str, args: list[Any]) -> None:
    with app.app_context():
        _call(name, args)


def _function(name: str) -> Callable[..., Any]:
    module, _, attribute = JOBS[name].function.partition(":")
    function: Callable[..., Any] = getattr(importlib.import_module(module), attribute)
    return function


def _call(name: str, args: list[Any]) -> Any:
    if JOBS[name].periodic:
        with once_per_cluster(name) as mine:
            if not mine:
                log.info("periodic job %s: another node runs it now; this turn is skipped", name)
                return None
            return _function(name)(*args)
    return _function(name)(*args)


def run_job(name: str, args: list[Any]) -> Any:
    """What an RQ worker runs (``flask jobs worker`` pushes the application context); a
    periodic job schedules its next slot first, so a failing run does not end the series."""
    if name not in JOBS:
        raise ValueError(f"no such job: {name}")
    if not has_app_context():
        raise RuntimeError("run jobs with `flask jobs worker` (it provides the application)")
    from rq import get_current_job

    app = current_app._get_current_object()  # type: ignore[attr-defined]
    if JOBS[name].periodic:
        schedule_periodic(app, only=name)
    job = get_current_job()  # logs under the id of the request that queued it, else its own
    with request_id_scope((job.meta.get("request_id") or job.id) if job is not None else None):
        return _call(name, args)


# -- periodic jobs ------------------------------------------------------------------------------

def periodic_jobs(app: Flask) -> dict[str, int]:
    """The periodic jobs this configuration has, with their period in seconds."""
    settings = app.config["PORTAL"]
    wanted = set(settings["JOBS_PERIODIC"])
    database_url = settings["DATABASE_URL"] or ""
    jobs = {"archive-sync": settings["ARCHIVE_SYNC_INTERVAL_SECONDS"]
            if settings["ARCHIVE_URL"] else 0,
            "audit-forward": settings["JOBS_AUDIT_FORWARD_SECONDS"]
            if settings["AUDIT_SYSLOG_URL"] else 0,
            # SQLite seals at every append; PostgreSQL has background sealers as well.
            "audit-seal": 10 if database_url.startswith("postgresql") else 0,
            "report-digest": 86400 if settings["SMTP_URL"] else 0,
            "retention-daily": 86400,
            "archive-compress": 86400 if settings["ARCHIVE_COMPRESS_AFTER_DAYS"] else 0}
    return {name: every for name, every in jobs.items() if every > 0 and name in wanted}


def schedule_periodic(app: Flask, only: str | None = None) -> list[str]:
    """Put the next slot of each periodic job (or of ``only``) on the queue, once: the slot's
    id is unique, so every worker may do this. Returns the ids scheduled now."""
    from rq.exceptions import DuplicateJobError
    from rq.job import JobStatus

    queue = queue_of(app)
    scheduled = []
    for name, every in periodic_jobs(app).items():
        if only is not None and name != only:
            continue
        slot = int(time.time() // every) + 1
        at = datetime.fromtimestamp(slot * every, UTC)
        job_id = f"periodic-{name}-{slot}"
        # Study dates only catch new studies: every Nth sync walks every study (as --watch).
        args = [slot % app.config["PORTAL"]["ARCHIVE_SYNC_FULL_EVERY"] == 0] \
            if name == "archive-sync" else []
        job = queue.create_job(RUN, args=(name, args), job_id=job_id, description=name,
                               timeout=app.config["PORTAL"]["JOBS_TIMEOUT_SECONDS"],
                               result_ttl=2 * every, failure_ttl=7 * 86400,
                               status=JobStatus.SCHEDULED)
        try:  # (Queue.enqueue_at does not pass ``unique`` on; schedule_job does)
            queue.schedule_job(job, at, unique=True)
        except DuplicateJobError:
            continue
        scheduled.append(job_id)
    return scheduled


# -- once per cluster ---------------------------------------------------------------------------

LOCK_SPACE = 0x6A6F6273  # "jobs": the first key of pg_try_advisory_lock(int, int)


def _lock_key(name: str) -> int:
    return zlib.crc32(name.encode()) - 2**31  # an int4


@contextlib.contextmanager
def once_per_cluster(name: str, database: Database | None = None,
                     folder: Path | None = None) -> Iterator[bool]:
    """Hold the cluster-wide lock of ``name`` for the block, without waiting: yields True
    when this process holds it, False when another does (it skips its turn).

    PostgreSQL: a transaction-level advisory lock in a transaction of its own, open for the
    run (it takes no snapshot past its one statement, so it holds back no vacuum; a process
    that dies releases it with its connection). Not a session lock: behind PgBouncer in
    transaction pooling mode the session outlives the client's transaction, so the lock
    would stay with a server connection that the pooler hands to others, and the unlock
    would run on another one (docs/cluster.md, "PgBouncer"). SQLite (one node): ``flock`` on
    a file in the instance folder's ``locks/``.
    """
    if database is None:
        database = current_app.extensions["db"]
    engine = database.engine
    if engine is None:
        raise RuntimeError("database not initialised")
    if engine.dialect.name == "postgresql":
        keys = {"space": LOCK_SPACE, "key": _lock_key(name)}
        with engine.connect() as connection:
            transaction = connection.begin()
            try:
                mine = bool(connection.scalar(
                    text("SELECT pg_try_advisory_xact_lock(:space, :key)"), keys))
                yield mine
            finally:
                try:
                    transaction.rollback()  # releases the lock; the run wrote nothing here
                except Exception:  # the connection broke: the lock went with it
                    connection.invalidate()
        return
    folder = folder or Path(current_app.instance_path) / "locks"
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / f"{name}.lock").open("a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# -- the audit jobs (their modules belong to the audit trail; these only call them) ----------

def forward_audit() -> int:
    """Send the audit records not yet forwarded to AUDIT_SYSLOG_URL (ForwardFailed: retried)."""
    from portal.audit import checkpoints_from
    from portal.audit_forward import forward

    app = current_app._get_current_object()  # type: ignore[attr-defined]
    settings = app.config["PORTAL"]
    if not settings["AUDIT_SYSLOG_URL"]:
        return 0
    return forward(app.extensions["db"], settings["AUDIT_SYSLOG_URL"],
                   ca_file=settings["AUDIT_SYSLOG_CA"],
                   checkpoints=checkpoints_from(settings, app.instance_path))


def seal_audit() -> int:
    """Chain the audit records committed and not sealed yet."""
    from portal.audit import seal

    return seal(current_app.extensions["db"]) or 0


# -- what an operator sees ----------------------------------------------------------------------

def status(app: Flask, *, failed_limit: int = 0) -> dict[str, Any]:
    """The queue as ``/readyz`` and ``flask jobs status`` show it: waiting, scheduled,
    running and failed jobs, workers seen (and the newest failures, without arguments)."""
    from rq import Worker
    from rq.job import Job as RqJob
    from rq.serializers import JSONSerializer

    queue = queue_of(app)
    failed = queue.failed_job_registry
    answer: dict[str, Any] = {
        "mode": "queue" if uses_queue(app) else "process", "waiting": queue.count,
        "scheduled": queue.scheduled_job_registry.count,
        "running": queue.started_job_registry.count, "failed": failed.count,
        "workers": len(Worker.all(queue=queue))}
    if failed_limit:
        ids = failed.get_job_ids(0, failed_limit - 1)
        jobs = [j for j in RqJob.fetch_many(ids, connection=queue.connection,
                                             serializer=JSONSerializer) if j is not None]
        answer["failures"] = [_failure(job) for job in jobs]
    return answer


# What each job is, in the office manager's words (the console's "Needs attention").
IN_WORDS = {"prerender": "Preparing the first images of new series",
            "report-notice": "Telling physicians a report is ready",
            "report-digest": "The daily e-mail of unread reports",
            "archive-sync": "Bringing the study list in step with the hospital archive",
            "audit-forward": "Sending the audit trail to the audit repository",
            "audit-seal": "Sealing the audit trail",
            "retention-daily": "Listing the studies due for deletion",
            "retention-apply": "Deleting the studies approved for deletion",
            "archive-compress": "Compressing older images without loss",
            "inbox-accept": "Moving a study accepted from the inbox into the archive"}


def failed_in_words(app: Flask, limit: int = 10) -> tuple[int, list[str]] | None:
    """How many jobs failed for good (kept 7 days), and the newest as sentences, for the
    console; None when jobs have no queue (no Redis) or it cannot be read now."""
    if not app.config["PORTAL"]["REDIS_URL"]:
        return None
    try:
        seen = status(app, failed_limit=limit)
    except Exception:  # Redis down: /readyz says so; the console still works
        return None
    lines = []
    for failure in seen["failures"]:
        when = f"{failure['failed_at']:%Y-%m-%d %H:%M} UTC" if failure["failed_at"] else ""
        what = IN_WORDS.get(failure["job"], failure["job"])
        lines.append(f"{what}: failed {when}"
                     + (f" ({failure['error']})" if failure["error"] else ""))
    return int(seen["failed"]), lines


def _failure(job: Any) -> dict[str, Any]:
    """A failed job in plain words: which, when, and the last line of its error."""
    result = job.latest_result()
    error = (result.exc_string or "") if result is not None else (job.exc_info or "")
    last = next((line for line in reversed(error.strip().splitlines()) if line.strip()), "")
    ended = job.ended_at.replace(tzinfo=UTC) if job.ended_at else None
    return {"id": job.id, "job": job.description or "", "failed_at": ended,
            "error": last[:300]}


def wait_for_lanes(timeout: float = 30.0) -> None:
    """Wait until the in-process lanes have run what they were given (tests, shutdown)."""
    with _lanes_lock:
        executors = list(_lanes.values())
    deadline = time.monotonic() + timeout
    for executor in executors:
        future: Future[None] = executor.submit(lambda: None)
        future.result(timeout=max(0.1, deadline - time.monotonic()))


# -- flask jobs ...  ----------------------------------------------------------------------------

jobs_cli = click.Group("jobs", help="Background jobs: run a worker, see the queue.")


@jobs_cli.command("worker")
@click.option("--with-scheduler/--without-scheduler", default=True, show_default=True,
              help="also run RQ's scheduler (due retries and delayed jobs) and schedule the "
                   "periodic jobs (any number of workers may: each slot runs once)")
@click.option("--burst", is_flag=True, help="stop when the queue is empty")
@with_appcontext
def worker_command(with_scheduler: bool, burst: bool) -> None:
    """Run jobs from the queue in this process, with the application (stop: SIGTERM)."""
    from rq import SimpleWorker
    from rq.serializers import JSONSerializer

    app = current_app._get_current_object()  # type: ignore[attr-defined]
    try:
        queue = queue_of(app, blocking=True)
        if with_scheduler:
            schedule_periodic(app)
    except JobsUnavailable as exc:
        click.echo(str(exc), err=True)
        raise SystemExit(1) from exc

    class PortalWorker(SimpleWorker):
        """Jobs in this process (the app's database pool, render processes and caches stay
        warm); between jobs it also keeps the periodic jobs scheduled."""

        def run_maintenance_tasks(self) -> None:
            super().run_maintenance_tasks()  # type: ignore[no-untyped-call]
            if with_scheduler:
                schedule_periodic(app)

    worker = PortalWorker([queue], connection=queue.connection, serializer=JSONSerializer,
                          maintenance_interval=60)
    worker.work(burst=burst, with_scheduler=with_scheduler,
                logging_level=app.config["PORTAL"]["LOG_LEVEL"])


@jobs_cli.command("status")
@with_appcontext
def status_command() -> None:
    """The queue: waiting, scheduled, running and failed jobs, workers, newest failures."""
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    if not app.config["PORTAL"]["REDIS_URL"]:
        click.echo("no REDIS_URL: background jobs run in the process that starts them")
        return
    try:
        seen = status(app, failed_limit=10)
    except JobsUnavailable as exc:
        click.echo(str(exc), err=True)
        raise SystemExit(1) from exc
    except Exception as exc:  # Redis down
        click.echo(f"the job queue is unreachable ({exc.__class__.__name__})", err=True)
        raise SystemExit(1) from exc
    click.echo(f"jobs run: {'on the queue' if seen['mode'] == 'queue' else 'in process'}; "
               f"{seen['workers']} worker(s); {seen['waiting']} waiting, {seen['scheduled']} "
               f"scheduled, {seen['running']} running, {seen['failed']} failed")
    for failure in seen["failures"]:
        when = f"{failure['failed_at']:%Y-%m-%d %H:%M}Z" if failure["failed_at"] else "?"
        click.echo(f"  failed {when}: {failure['job']} ({failure['id']}): {failure['error']}")
