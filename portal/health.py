"""Liveness (no dependencies) and readiness (database and archive reachable; Redis and an
external archive, when configured, reported as degraded when down)."""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

from flask import Blueprint, Response, current_app, jsonify
from sqlalchemy import text

from portal.access.policy import public
from portal.archive import current_archive
from portal.db import db
from portal.monitoring import may_read_metrics
from portal.redis_link import redis_link

if TYPE_CHECKING:
    from portal.archive.copies import RemoteCopies
    from portal.archive.space import DiskSpace

bp = Blueprint("health", __name__)


@bp.get("/healthz")
@public
def healthz() -> Response:
    """The process is alive."""
    return jsonify(status="ok")


@bp.get("/readyz")
@public
def readyz() -> tuple[Response, int]:
    """Database and archive are reachable (and the external archive's state, if any)."""
    checks: dict[str, str] = {}
    try:
        with db.new_session() as session:
            session.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception:  # any failure means "not ready"; the reason goes to the log
        current_app.logger.exception("readiness: database")
        checks["database"] = "unavailable"
    store = current_archive().store
    try:
        store.ensure()
        checks["archive"] = "ok" if os.access(store.objects, os.W_OK) else "read-only"
    except OSError:
        checks["archive"] = "unavailable"
    ready = all(v == "ok" for v in checks.values())
    # A full disk refuses uploads but still serves every read: "degraded", never "not ready"
    # (a balancer taking the node out would hide the images it still serves).
    # Sizes (the disk's bytes, the external archive's cache) only to a scraper
    # (METRICS_TOKEN or METRICS_ALLOWED, as /metrics): this page is public, and a disk's
    # size and how fast it fills say how busy the clinic is. The states are for anyone.
    sizes = may_read_metrics()
    space = archive_disk()
    if space is not None:
        body_disk: dict[str, object] | None = space.to_json() if sizes else \
            {"state": space.state}
        checks["archive_disk"] = space.state
    else:
        body_disk = None
    # Redis is pinged (through its breaker, so a dead one costs nothing while it is open).
    # Without it the portal still serves: rendered images are cache misses and rate limits
    # are counted in the database, so it makes the node "degraded", never "not ready".
    link = redis_link(current_app)
    checks["cache"] = "in-process" if link is None else "ok" if link.ping() else "unavailable"
    body: dict[str, object] = {"status": "ready" if ready else "not ready", "checks": checks}
    if ready and checks["cache"] == "unavailable":
        body["status"] = "degraded"
    if body_disk is not None:
        body["archive_disk"] = body_disk
        if ready and body_disk["state"] != "ok":
            body["status"] = "degraded"
    if link is not None:  # the queue lives in Redis: only asked while Redis answers
        jobs = _jobs_state() if checks["cache"] == "ok" else {"state": "unavailable"}
        # The counts (how many wait, run, failed; how many workers) only to a scraper, as
        # the sizes: a queue's length says how busy the clinic is. Anyone sees the state.
        body["jobs"] = jobs if sizes else {"state": jobs["state"]}
    remote = current_archive().remote
    if remote is not None:
        # An external PACS that is down degrades the portal but does not make it unready:
        # the index, reports and cached images still serve, and viewers get a clear 503.
        # Taking every worker out of the load balancer would hide all of that.
        body["external_archive"] = external = _external_state(remote, sizes)
        checks["external_archive"] = str(external["state"])
        if ready and external["state"] != "ok":
            body["status"] = "degraded"
    if ready:
        return jsonify(body), 200
    answer = jsonify(body)
    answer.headers["Retry-After"] = "5"
    return answer, 503


@bp.app_template_global("archive_disk")
def archive_disk() -> DiskSpace | None:
    """Free space on the archive's disk (None when it cannot be asked); also the template
    global of the console's "disk nearly full" line (docs/operations.md "Disk space")."""
    try:
        return current_archive().store.space()
    except OSError:
        return None


def _jobs_state() -> dict[str, object]:
    """The job queue (counts only, and those only to a scraper: no job's name or arguments on
    this public page), read at most every PROBE_INTERVAL_SECONDS per process like the
    external archive; never makes the node unready: a failed job is the console's business,
    not the balancer's."""
    from portal import jobs

    app = current_app._get_current_object()  # type: ignore[attr-defined]
    now = time.monotonic()
    last: tuple[float, dict[str, object]] | None = app.extensions.get("readyz_jobs")
    if last is not None and now - last[0] < PROBE_INTERVAL_SECONDS:
        return last[1]
    try:
        state: dict[str, object] = {"state": "ok", **jobs.status(app)}
    except Exception:  # Redis down: the cache check above says so; jobs run in process
        state = {"state": "unavailable"}
    app.extensions["readyz_jobs"] = (now, state)
    return state


# /readyz is public: a probe of the external archive runs at most this often per process, so
# anonymous calls cannot turn into a stream of queries against the hospital's PACS.
PROBE_INTERVAL_SECONDS = 5.0
_last_probe: dict[int, tuple[float, bool]] = {}


def _external_state(remote: RemoteCopies, sizes: bool) -> dict[str, object]:
    """The breaker's state, and a bounded QIDO-RS probe (at most every few seconds) unless
    the breaker is open. The archive's address is not shown: this page is public; the
    cache's counts and bytes only with ``sizes``."""
    from portal.archive.external import ExternalUnavailable

    client = remote.client
    status = client.breaker.status()
    state = "ok"
    if status.state == "open":
        state = "unavailable"
    else:
        now = time.monotonic()
        last = _last_probe.get(id(client))
        if last is not None and now - last[0] < PROBE_INTERVAL_SECONDS:
            reachable = last[1]
        else:
            try:
                client.ping()
                reachable = True
            except ExternalUnavailable:
                reachable = False
            _last_probe[id(client)] = (now, reachable)
        state = "ok" if reachable else "unavailable"
        status = client.breaker.status()
    shown: dict[str, object] = {
        "state": state, "breaker": status.state,
        "consecutive_failures": status.consecutive_failures,
        "retry_after_seconds": round(status.retry_after)}
    if sizes:
        count, size = remote.usage()
        shown.update(cached_copies=count, cached_bytes=size,
                     cache_limit_bytes=remote.cache_bytes)
    return shown
