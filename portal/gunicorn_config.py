"""gunicorn settings for the portal: ``gunicorn -c python:portal.gunicorn_config app:app``.

Loopback by default; a reverse proxy terminates TLS in production. The access log format
leaves out the query string and the Referer, so nothing secret in a URL reaches the log.
"""

from __future__ import annotations

import os
from typing import Any

bind = os.environ.get("PORTAL_BIND", "127.0.0.1:5000")
workers = int(os.environ.get("PORTAL_WORKERS", "2"))
worker_class = "gthread"
threads = int(os.environ.get("PORTAL_THREADS", "8"))
timeout = 120
graceful_timeout = 30
keepalive = 5
limit_request_line = 4094
limit_request_fields = 100
limit_request_field_size = 8190
control_socket_disable = True  # one shared socket per machine otherwise (gunicorn 27)
accesslog = "-"
access_log_format = '%(h)s %(t)s "%(m)s %(U)s" %(s)s %(B)s %(M)sms'


def on_starting(server: Any) -> None:
    """Before workers start: bring the schema up to date and reap crash leftovers."""
    from portal import create_app
    from portal.archive import current_archive
    from portal.migrate import upgrade_database

    app = create_app()
    with app.app_context():
        upgrade_database(app)
        temps, orphans = current_archive().reap()
        if temps or orphans:
            server.log.info("reaped %d temp and %d unreferenced file(s)", temps, orphans)


def post_worker_init(worker: Any) -> None:
    """In each web worker, start its render processes before the first request."""
    pool = getattr(worker.wsgi, "extensions", {}).get("render_pool")
    if pool is not None:
        pool.start()
