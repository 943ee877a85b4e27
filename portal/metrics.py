"""The portal's Prometheus instruments (docs/operations.md, "Metrics and logs").

Only ``prometheus_client`` is imported here, so every layer (the imaging core and the archive
included) may record into them; ``portal/monitoring.py`` serves them at ``/metrics``.

Labels are from small fixed sets (route family, status class, outcome, dependency): never a
path, UID, name or anything a request carries (docs/security.md 28).

Under gunicorn every worker is a process of its own: ``portal/gunicorn_config.py`` sets
``PROMETHEUS_MULTIPROC_DIR`` before anything imports ``prometheus_client``, each worker writes
its values to files there, and a scrape adds them up (prometheus_client's multiprocess mode).
Every instrument has a label, so a process that only imports this module (a render process)
writes no file.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import Counter, Gauge, Histogram

# Route families of the request histogram (portal/monitoring.py maps an endpoint to one).
FAMILIES = ("dicomweb-qido", "dicomweb-wado", "dicomweb-rendered", "stow", "fhir", "pages",
            "api", "share", "auth", "static", "health", "other")

REQUEST_SECONDS = Histogram(
    "portal_http_request_duration_seconds",
    "Time from a request's arrival to its response being handed to the server, by route "
    "family and status class (2xx, 3xx, 4xx, 5xx)",
    ["family", "status"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0))

RENDER_SECONDS = Histogram(
    "portal_render_seconds",
    "Time of one render call (decode, window, resize, encode), by what was rendered and how "
    "it ended (answered, failed)",
    ["function", "outcome"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0))

RENDER_WAIT_SECONDS = Histogram(
    "portal_render_wait_seconds",
    "Time a render call waited for a free render process", ["pool"],
    buckets=(0.001, 0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0))

RENDER_PROCESSES = Gauge(
    "portal_render_pool",
    "Render calls waiting for a free render process (queue) and render processes in use "
    "(busy), summed over the node's live workers",
    ["state"], multiprocess_mode="livesum")

RENDER_FAILURES = Counter(
    "portal_render_process_failures_total",
    "Render processes stopped because a call timed out or the decoder crashed", ["reason"])

CACHE_REQUESTS = Counter(
    "portal_render_cache_requests_total",
    "Rendered images asked of the render cache, by result (hit, miss)", ["result"])

BREAKER_STATE = Gauge(
    "portal_breaker_state",
    "Circuit breaker of a dependency (archive: the external archive, redis): 0 closed, "
    "1 half open (a trial call), 2 open; the worst of the node's live workers",
    ["dependency"], multiprocess_mode="livemax")

BREAKER_OPENED = Counter(
    "portal_breaker_opened_total", "Times a dependency's circuit breaker opened",
    ["dependency"])

JOB_FAILURES = Counter(
    "portal_jobs_failed_in_process_total",
    "Background jobs that failed while running in a web process (no queue; queued jobs' "
    "failures are portal_jobs{state=\"failed\"})", ["job"])

_STATE_VALUES = {"closed": 0, "half_open": 1, "open": 2}


def breaker_observer(dependency: str) -> Callable[[str], None]:
    """What a circuit breaker calls on a change of state (``portal.breaker``): the gauge, and
    the count of openings. The gauge starts at closed."""
    BREAKER_STATE.labels(dependency).set(0)

    def changed(state: str) -> None:
        BREAKER_STATE.labels(dependency).set(_STATE_VALUES.get(state, 2))
        if state == "open":
            BREAKER_OPENED.labels(dependency).inc()

    return changed
