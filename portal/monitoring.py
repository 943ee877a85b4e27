"""``/metrics`` for Prometheus, and the request histogram (docs/operations.md, "Metrics and
logs"; the instruments are in portal/metrics.py).

Closed by default: ``/metrics`` answers 404 unless ``METRICS_TOKEN`` or ``METRICS_ALLOWED``
is set, and then 403 to a scraper that sends neither the token (``Authorization: Bearer``)
nor comes from an allowed address. It lists the node's own numbers (scrape each node, not
the address behind nginx): under gunicorn the values of every worker added up (the
multiprocess directory, portal/gunicorn_config.py); the cluster-wide ones (job queue, audit
backlog) are read when scraped.

A request is timed from its arrival at the application to its response being handed to the
server (a download's transfer to a slow phone is not in it), and counted under its route's
family, never its path: no UID or name reaches a label (docs/security.md 28).
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from flask import Blueprint, Flask, Response, abort, current_app, request
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric

from portal.access.policy import public
from portal.metrics import REQUEST_SECONDS

log = logging.getLogger(__name__)

bp = Blueprint("monitoring", __name__)

STARTED = "portal.started"  # WSGI environ key: when the request reached the application

# DICOMweb endpoints by what they do (portal/dicomweb/routes.py).
_STOW = {"dicomweb.store_instances", "dicomweb.store_study_instances"}
_RENDERED = ("rendered", "thumbnail", "volume")


def family(endpoint: str | None) -> str:
    """The route family of an endpoint (``portal.metrics.FAMILIES``)."""
    if endpoint is None:
        return "other"  # no route matched (404, or a method no route has)
    if endpoint == "static":
        return "static"
    blueprint, _, view = endpoint.partition(".")
    if blueprint == "dicomweb":
        if endpoint in _STOW:
            return "stow"
        if view.startswith("search_"):
            return "dicomweb-qido"
        if any(word in view for word in _RENDERED):
            return "dicomweb-rendered"
        return "dicomweb-wado"
    return {"fhir": "fhir", "api": "api", "sharing": "share", "auth": "auth",
            "launch": "auth", "health": "health", "monitoring": "health"}.get(blueprint, "pages")


class _Timed:
    """WSGI middleware: note when the request arrived (outermost, so the proxy and host
    handling are in its time)."""

    def __init__(self, wsgi_app: Any) -> None:
        self.wsgi_app = wsgi_app

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        environ[STARTED] = time.perf_counter()
        return self.wsgi_app(environ, start_response)


def _observe(response: Response) -> Response:
    started = request.environ.get(STARTED)
    if started is not None:
        rule = request.url_rule
        REQUEST_SECONDS.labels(family(rule.endpoint if rule is not None else None),
                               f"{response.status_code // 100}xx").observe(
            time.perf_counter() - started)
    return response


def init_app(app: Flask) -> None:
    """Time every request and serve ``/metrics``."""
    app.wsgi_app = _Timed(app.wsgi_app)  # type: ignore[method-assign]
    app.after_request(_observe)
    app.register_blueprint(bp)


# -- who may read them ---------------------------------------------------------------------------

def _allowed() -> None:
    settings = current_app.config["PORTAL"]
    if not settings["METRICS_TOKEN"] and not settings["METRICS_ALLOWED"]:
        abort(404)  # closed by default: nothing says it is there
    if not may_read_metrics():
        abort(403, description="metrics: a bearer token or an allowed address is needed")


def may_read_metrics() -> bool:
    """Whether this request is a scraper's: it sends ``METRICS_TOKEN`` as a bearer token or
    comes from a ``METRICS_ALLOWED`` network (neither set: nobody). Also who sees the sizes
    on ``/readyz`` (portal/health.py)."""
    settings = current_app.config["PORTAL"]
    token, networks = settings["METRICS_TOKEN"], settings["METRICS_ALLOWED"]
    if token:
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(),
                                                              token.encode()):
            return True
    if networks:
        try:
            address = ipaddress.ip_address((request.remote_addr or "").split("%", 1)[0])
        except ValueError:
            address = None
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        if address is not None and any(address in ipaddress.ip_network(n, strict=False)
                                       for n in networks):
            return True
    return False


@bp.get("/metrics")
@public
def metrics() -> Response:
    """The node's metrics in Prometheus' text format."""
    _allowed()
    registry = CollectorRegistry(auto_describe=False)
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        # every worker's files, added up
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    else:
        registry.register(_ThisProcess())
    registry.register(_ReadWhenScraped(current_app._get_current_object()))  # type: ignore[attr-defined]
    return Response(generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})


class _ThisProcess:
    """The default registry (one process: the development server, tests)."""

    def collect(self) -> Iterator[Metric]:
        yield from REGISTRY.collect()


class _ReadWhenScraped:
    """Numbers read at scrape time from the shared services: the job queue (Redis) and the
    audit trail's backlog (the database). A part that cannot be read is left out and counted
    in ``portal_metrics_unreadable``."""

    def __init__(self, app: Flask) -> None:
        self.app = app

    def collect(self) -> Iterator[Metric]:
        unreadable = GaugeMetricFamily(
            "portal_metrics_unreadable",
            "1 when a part of the metrics could not be read at this scrape", labels=["part"])
        for part, reader in (("jobs", self._jobs), ("audit", self._audit),
                             ("archive_disk", self._disk)):
            try:
                found = list(reader())
            except Exception as exc:  # Redis or the database down: the rest still answers
                log.warning("metrics: %s unreadable (%s)", part, exc.__class__.__name__)
                unreadable.add_metric([part], 1)
                continue
            unreadable.add_metric([part], 0)
            yield from found
        yield unreadable

    def _disk(self) -> Iterator[Metric]:
        """The archive disk's bytes (what ``/readyz`` shows only to a scraper)."""
        space = self.app.extensions["archive"].store.space()
        for name, value, about in (
                ("free", space.free, "Bytes free on the archive's file system"),
                ("total", space.total, "Size of the archive's file system in bytes"),
                ("min_free", space.min_free, "ARCHIVE_MIN_FREE in bytes: uploads are "
                 "refused below it"),
                ("warn_free", space.warn_free, "ARCHIVE_WARN_FREE in bytes: the disk is "
                 "'nearly full' below it")):
            yield GaugeMetricFamily(f"portal_archive_disk_{name}_bytes", about, value=value)

    def _jobs(self) -> Iterator[Metric]:
        settings = self.app.config["PORTAL"]
        if not settings["REDIS_URL"]:
            return  # jobs run in process: failures are portal_jobs_failed_in_process_total
        from portal import jobs

        seen = jobs.status(self.app)
        queue = GaugeMetricFamily(
            "portal_jobs", "Jobs of the cluster's queue by state (waiting, scheduled, running, "
            "failed: kept in RQ's failed registry)", labels=["state"])
        for state in ("waiting", "scheduled", "running", "failed"):
            queue.add_metric([state], seen[state])
        yield queue
        yield GaugeMetricFamily("portal_jobs_workers", "RQ workers registered on the queue",
                                value=seen["workers"])

    def _audit(self) -> Iterator[Metric]:
        from sqlalchemy import func, select

        from portal.access.models import AuditEvent, AuditForward

        forwarding = bool(self.app.config["PORTAL"]["AUDIT_SYSLOG_URL"])
        with self.app.extensions["db"].new_session() as session:
            unsealed = session.scalar(select(func.count()).select_from(AuditEvent)
                                      .where(AuditEvent.seq.is_(None))) or 0
            yield GaugeMetricFamily("portal_audit_unsealed",
                                    "Audit records committed and not yet chained by the sealer",
                                    value=unsealed)
            if not forwarding:
                return
            mark = session.get(AuditForward, 1)
            last_seq = mark.last_seq if mark is not None else 0
            backlog = session.scalar(select(func.count()).select_from(AuditEvent)
                                     .where(AuditEvent.seq > last_seq)) or 0
            # The oldest waiting record: the next one to send, or the first unsealed one
            # (both found through an index, however long the backlog).
            stamps = [session.scalar(select(AuditEvent.occurred_at).where(condition)
                                     .order_by(order).limit(1))
                      for condition, order in ((AuditEvent.seq > last_seq, AuditEvent.seq),
                                               (AuditEvent.seq.is_(None), AuditEvent.id))]
            oldest = min((s if s.tzinfo else s.replace(tzinfo=UTC) for s in stamps
                          if s is not None), default=None)
        yield GaugeMetricFamily(
            "portal_audit_unforwarded",
            "Sealed audit records not yet sent to the audit repository", value=backlog)
        lag = 0.0
        if oldest is not None:
            lag = max(0.0, (datetime.now(UTC) - oldest).total_seconds())
        yield GaugeMetricFamily(
            "portal_audit_forward_lag_seconds",
            "Age of the oldest audit record the repository does not have yet (0: none)",
            value=lag)
        if mark is not None and mark.forwarded_at is not None:
            at = mark.forwarded_at
            yield GaugeMetricFamily(
                "portal_audit_last_forward_timestamp_seconds",
                "When records were last sent to the audit repository (Unix time)",
                value=(at if at.tzinfo else at.replace(tzinfo=UTC)).timestamp())
