"""gunicorn settings for the portal: ``gunicorn -c python:portal.gunicorn_config app:app``.

Loopback by default; a reverse proxy terminates TLS in production. The access log format
leaves out the query string and the Referer, so nothing secret in a URL reaches the log.
"""

from __future__ import annotations

import os
import time
import traceback
from pathlib import Path
from typing import Any

from gunicorn.glogging import Logger
from gunicorn.workers.gthread import ThreadWorker

# Metrics of all workers, added up at a scrape (portal/monitoring.py): prometheus_client's
# multiprocess mode, chosen when it is first imported, so set here before anything imports it.
# The folder is emptied as the server starts (on_starting); a dead worker's live gauges are
# dropped (child_exit).
METRICS_DIR = os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", str(
    Path(os.environ.get("PORTAL_INSTANCE_PATH")
         or Path(__file__).resolve().parent.parent / "instance") / "metrics"))

bind = os.environ.get("PORTAL_BIND", "127.0.0.1:5000")
workers = int(os.environ.get("PORTAL_WORKERS", "2"))
threads = int(os.environ.get("PORTAL_THREADS", "8"))
# Several workers on TCP: each its own listening socket (SO_REUSEPORT), and the kernel spreads
# new connections over them by their addresses. On the one socket the master shares, the worker
# that wakes first takes them: a client's 8 keep-alive connections all went to one of two
# workers in 1 of 8 tries, with half the throughput (benchmarks/README.md, "Connections spread
# over the workers"). But a socket that closes resets the connections waiting on it, so a
# reload would lose some unless the kernel hands them on: ``on_starting`` keeps it only where
# net.ipv4.tcp_migrate_req=1 (or PORTAL_REUSE_PORT=1) and it can work (``own_sockets``); the
# worker class below closes a stopping worker's socket at once (docs/operations.md).
reuse_port = True
worker_class = "portal.gunicorn_config.Worker"
timeout = 120
graceful_timeout = 30
keepalive = 5
limit_request_line = 4094
limit_request_fields = 100
limit_request_field_size = 8190
# The worker touches its heartbeat file on every turn of its loop; on a disk-backed /tmp that
# utime waits on the file system's journal while fsyncs run (gunicorn's docs, "Blocking
# os.fchmod"). In memory it does not wait (benchmarks/README.md, "The request around the work").
# gunicorn makes the file with mkstemp (owner only) and unlinks it at once: no shared name.
_IN_MEMORY = "/dev/shm"  # noqa: S108
worker_tmp_dir = _IN_MEMORY if os.path.isdir(_IN_MEMORY) and \
    os.access(_IN_MEMORY, os.W_OK | os.X_OK) else None
control_socket_disable = True  # one shared socket per machine otherwise (gunicorn 27)
# Forwarding headers are the portal's to believe or drop (PORTAL_TRUSTED_PROXIES and
# PORTAL_TRUSTED_PROXY_ADDRESSES, portal.security.TrustedProxies). gunicorn's own defaults
# would take X-Forwarded-Proto: https (and SCRIPT_NAME headers) from any process on the
# machine, or anything behind a Unix socket, whatever those settings say.
forwarded_allow_ips = ""
secure_scheme_headers: dict[str, str] = {}
forwarder_headers = ""
accesslog = "-"
# The last field is the request id (portal/log.py): nginx's when it came from a trusted proxy.
access_log_format = '%(h)s %(t)s "%(m)s %(U)s" %(s)s %(B)s %(M)sms %({x-request-id}o)s'


class AccessLogger(Logger):  # type: ignore[misc]  # gunicorn has no type hints
    """gunicorn's logger, with the access line made from the fields it shows only.

    gunicorn's own ``access`` first builds a dictionary of every CGI variable and header of
    the request and the response: 19.5 us a line here, against 8.6 us for the same line made
    from its eight fields (benchmarks/README.md, "The request around the work"). Quotes in
    the values are escaped as gunicorn escapes them. Another ``access_log_format`` (set by an
    operator) goes through gunicorn's way. Being the logger class, it also stands in for
    gunicorn's statsd logger: the portal's metrics are Prometheus' (``/metrics``).
    """

    _second = -1
    _stamp = ""

    def _fields(self, resp: Any, environ: dict[str, Any], request_time: Any
                ) -> dict[str, Any]:
        status = resp.status
        if isinstance(status, str):
            status = status.split(None, 1)[0]
        request_id = "-"
        for name, value in resp.headers:
            if name.lower() == "x-request-id":
                request_id = value
        return {"remote": environ.get("REMOTE_ADDR", "-"),
                "method": environ.get("REQUEST_METHOD"), "path": environ.get("PATH_INFO"),
                "status": status, "bytes": getattr(resp, "sent", None),
                "duration_ms": request_time.seconds * 1000
                + request_time.microseconds // 1000, "request_id": request_id}

    def _now(self) -> str:
        second = int(time.time())
        if second != self._second:  # one strftime a second, as the line shows seconds
            self._stamp = time.strftime("[%d/%b/%Y:%H:%M:%S %z]", time.localtime(second))
            self._second = second
        return self._stamp

    def access(self, resp: Any, req: Any, environ: dict[str, Any], request_time: Any) -> None:
        if not self.access_log_enabled:
            return
        if self.cfg.access_log_format != access_log_format:
            super().access(resp, req, environ, request_time)
            return
        try:
            f = {k: v.replace('"', '\\"') if isinstance(v, str) else v
                 for k, v in self._fields(resp, environ, request_time).items()}
            self.access_log.info('%s %s "%s %s" %s %s %sms %s', f["remote"], self._now(),
                                 f["method"], f["path"], f["status"], f["bytes"],
                                 f["duration_ms"], f["request_id"])
        except Exception:  # as gunicorn's own: a log line never fails the request
            self.error(traceback.format_exc())


class JsonLogger(AccessLogger):
    """gunicorn's own lines as JSON objects with PORTAL_LOG_FORMAT=json: the access line's
    fields (no query string, no Referer) and the request id, the error log's messages."""

    def setup(self, cfg: Any) -> None:
        from portal.log import JsonFormatter

        super().setup(cfg)
        for logger in (self.error_log, self.access_log):
            for handler in logger.handlers:
                handler.setFormatter(JsonFormatter())

    def access(self, resp: Any, req: Any, environ: dict[str, Any], request_time: Any) -> None:
        if not self.access_log_enabled:
            return
        try:
            fields = self._fields(resp, environ, request_time)
            request_id = fields.pop("request_id")
            self.access_log.info("%s %s %s", fields["method"], fields["path"],
                                 fields["status"],
                                 extra={"fields": fields, "request_id": request_id})
        except Exception:  # as gunicorn's own: a log line never fails the request
            self.error(traceback.format_exc())


logger_class = JsonLogger if os.environ.get("PORTAL_LOG_FORMAT") == "json" else AccessLogger


class Worker(ThreadWorker):  # type: ignore[misc]  # gunicorn has no type hints
    """gunicorn's gthread worker, which closes its own listening sockets (``reuse_port``) as
    soon as it stops accepting to stop: the kernel then sends new connections to the other
    workers, where a socket kept open while the worker finishes its requests (up to the
    graceful timeout) would collect connections that are reset when it closes."""

    def set_accept_enabled(self, enabled: bool) -> None:
        super().set_accept_enabled(enabled)
        if not enabled and not self.alive and self.cfg.reuse_port:
            for listener in self.sockets:
                listener.close()


_MIGRATE = Path("/proc/sys/net/ipv4/tcp_migrate_req")


def _choose_sockets(cfg: Any) -> None:
    """Set ``reuse_port`` (``own_sockets``); with it, start only when nothing listens on the
    addresses yet: another server of the same user on SO_REUSEPORT would quietly share the
    connections."""
    import socket

    from portal.listening import own_sockets  # here: the metrics folder is set by now

    try:
        migrates = _MIGRATE.read_text().strip() == "1"
    except OSError:
        migrates = False
    if not own_sockets(os.environ.get("PORTAL_REUSE_PORT", ""), cfg.workers, cfg.address,
                       bool(os.environ.get("LISTEN_FDS") or os.environ.get("GUNICORN_FD")),
                       migrates):
        cfg.set("reuse_port", False)
        return
    for host, port in cfg.address:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is no server
            try:
                probe.bind((host, port))
            except OSError as exc:
                raise SystemExit(f"{host}:{port} is taken by another server "
                                 f"({exc.strerror})") from None


def on_reload(server: Any) -> None:
    """A reload (HUP) reads this file again, ``reuse_port = True`` with it: keep the way the
    server listens since it started (a master holding the socket shares it; one without
    leaves each worker its own), so the new workers bind as the old ones did."""
    server.cfg.set("reuse_port", not server.LISTENERS)


def on_starting(server: Any) -> None:
    """Before workers start: how they listen (``_choose_sockets``), then empty the metrics
    folder, bring the schema up to date and reap crash leftovers."""
    if server.cfg.reuse_port:
        _choose_sockets(server.cfg)
    folder = Path(METRICS_DIR)
    folder.mkdir(parents=True, exist_ok=True)
    for leftover in folder.glob("*.db"):
        leftover.unlink(missing_ok=True)
    from portal import create_app
    from portal.archive import current_archive
    from portal.migrate import upgrade_database

    app = create_app()
    with app.app_context():
        upgrade_database(app)
        temps, orphans = current_archive().reap()
        if temps or orphans:
            server.log.info("reaped %d temp and %d unreferenced file(s)", temps, orphans)


# mallopt parameters (malloc.h): what a web worker's heap may keep (issue 17 item 5).
_M_MMAP_THRESHOLD, _M_ARENA_MAX = -3, -8
MMAP_THRESHOLD = 512 << 10  # bodies of images this large or larger: their own pages
ARENA_MAX = 2


def _tame_malloc() -> None:
    """Keep a web worker's peak near what it holds: images from 512 KiB up (a full-size PNG,
    a rendered series part) get their own pages, returned when freed, instead of glibc's
    raising its mmap threshold after the first such free and keeping their space in the
    heap; and two malloc arenas instead of one per request thread, each keeping its own
    freed space. Measured with ``benchmarks/render.py --scenarios m`` (caches full)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        libc.mallopt(_M_ARENA_MAX, ARENA_MAX)
    except (OSError, AttributeError):
        pass  # not glibc: its own allocator's habits


def post_worker_init(worker: Any) -> None:
    """In each web worker, bound what its heap keeps (before its request threads start),
    then start its render processes before the first request."""
    _tame_malloc()
    pool = getattr(worker.wsgi, "extensions", {}).get("render_pool")
    if pool is not None:
        pool.start()


def worker_exit(server: Any, worker: Any) -> None:
    """A web worker stops (a reload, a shutdown): what the after-ingest steps left for later
    runs now, within the graceful timeout (``AfterIngest.finish``): a series whose last
    instance came less than a second ago is still warmed up, not left to render on first
    view."""
    archive = getattr(getattr(worker, "wsgi", None), "extensions", {}).get("archive")
    if archive is not None and archive.after is not None:
        archive.after.finish()


def child_exit(server: Any, worker: Any) -> None:
    """A worker ended: its live gauges (render queue, breaker state) no longer count."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]
