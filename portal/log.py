"""Logging with a request id; never patient data, tokens or headers.

The request id follows a request across the tiers (docs/operations.md, "Metrics and logs"):
nginx's ``X-Request-Id`` is taken when the request came from a trusted proxy (the
``TrustedProxies`` middleware of portal/security.py marks it), else one is made here; it is
in every log line of the request, echoed as ``X-Request-Id``, carried into background jobs
and threads (``carry``, portal/jobs.py) and sent on every call to the external archive
(``RequestIdAdapter``). ``LOG_FORMAT=json`` writes the same fields as one JSON object a line.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import re
import secrets
import socket
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from flask import Flask, Response, g, has_request_context, request
from requests.adapters import HTTPAdapter

T = TypeVar("T")

FROM_TRUSTED_PROXY = "portal.from_trusted_proxy"  # WSGI environ key set by TrustedProxies
# What a proxy's id may look like (nginx's $request_id: 32 hex digits; a UUID): anything else
# is replaced, so a header cannot forge log lines or grow them.
_VALID_ID = re.compile(r"[A-Za-z0-9._-]{8,64}")
NODE = socket.gethostname()[:64]
# The request id outside a request: a job, or a thread started for a request (``carry``).
_outside: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id",
                                                                      default=None)


def current_request_id() -> str | None:
    """The id of the request (or of the job or thread it started) this code works for."""
    if has_request_context():
        found: str | None = g.get("request_id")
        if found:
            return found
    return _outside.get()


@contextlib.contextmanager
def request_id_scope(request_id: str | None) -> Iterator[None]:
    """Log (and call the archive) under ``request_id`` for the block: a job's own run."""
    token = _outside.set(request_id if request_id and _VALID_ID.fullmatch(request_id)
                         else None)
    try:
        yield
    finally:
        _outside.reset(token)


def carry(function: Callable[..., T]) -> Callable[..., T]:
    """``function`` to run on another thread under the current request id."""
    request_id = current_request_id()

    def run(*args: Any, **kwargs: Any) -> T:
        with request_id_scope(request_id):
            return function(*args, **kwargs)

    return run


class RequestIdAdapter(HTTPAdapter):
    """A ``requests`` adapter that sends ``X-Request-Id`` (the current request id, if any)."""

    def add_headers(self, request: Any, **kwargs: Any) -> None:
        super().add_headers(request, **kwargs)
        request_id = current_request_id()
        if request_id:
            request.headers["X-Request-Id"] = request_id

# Every character a log reader could take as the end of a line (str.splitlines breaks at
# all of these), or a terminal as a command: C0 controls but the tab, DEL, NEL and the
# Unicode line and paragraph separators.
_UNSAFE = {c: f"\\x{c:02x}" for c in [*range(0x00, 0x09), *range(0x0A, 0x20), 0x7F, 0x85]}
_UNSAFE.update({0x0D: "\\r", 0x0A: "\\n", 0x2028: "\\u2028", 0x2029: "\\u2029"})


def _escaped(value: object) -> object:
    """Strings (and exceptions, whose text may carry caller data) with line breaks and other
    control characters written as escapes; anything else unchanged."""
    if isinstance(value, str):
        return value.translate(_UNSAFE)
    if isinstance(value, BaseException):
        return str(value).translate(_UNSAFE)
    return value


class _RequestContext(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = current_request_id() or "-"
        record.node = NODE
        # Control characters in values (e.g. DICOM strings) must not forge log lines.
        if isinstance(record.msg, str):
            record.msg = record.msg.translate(_UNSAFE)
        if isinstance(record.args, tuple):
            record.args = tuple(_escaped(a) for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: _escaped(v) for k, v in record.args.items()}
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, node, pid, request id, message (and a
    traceback, or an access line's fields). The message is the same escaped text."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
            "level": record.levelname, "logger": record.name,
            "node": getattr(record, "node", NODE), "pid": os.getpid(),
            "request_id": getattr(record, "request_id", "-"), "message": record.getMessage()}
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


TEXT_FORMAT = "%(asctime)s %(levelname)s [%(request_id)s] %(name)s: %(message)s"


def formatter(kind: str) -> logging.Formatter:
    """The formatter of ``LOG_FORMAT`` (``text`` or ``json``)."""
    return JsonFormatter() if kind == "json" else logging.Formatter(TEXT_FORMAT)


def init_app(app: Flask) -> None:
    """Configure the portal's logger and give each request an id."""
    logger = logging.getLogger("portal")
    # A handler filter (not a logger filter) so records of child loggers pass through it too.
    handlers: list[logging.Handler] = [
        h for h in logger.handlers if any(isinstance(f, _RequestContext) for f in h.filters)]
    if not handlers:
        made = logging.StreamHandler()
        made.addFilter(_RequestContext())
        logger.addHandler(made)
        handlers = [made]
    for each in handlers:
        each.setFormatter(formatter(app.config["PORTAL"]["LOG_FORMAT"]))
    logger.setLevel(app.config["PORTAL"]["LOG_LEVEL"])

    @app.before_request
    def _request_id() -> None:
        given = request.headers.get("X-Request-Id", "")
        if request.environ.get(FROM_TRUSTED_PROXY) and _VALID_ID.fullmatch(given):
            g.request_id = given  # nginx's: one id from the proxy to the archive
        else:
            g.request_id = secrets.token_hex(16)

    @app.after_request
    def _echo_id(response: Response) -> Response:
        response.headers["X-Request-Id"] = g.get("request_id", "")
        return response

