"""Logging with a request id; never patient data, tokens or headers."""

from __future__ import annotations

import logging
import secrets

from flask import Flask, Response, g, has_request_context

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
        record.request_id = g.get("request_id", "-") if has_request_context() else "-"
        # Control characters in values (e.g. DICOM strings) must not forge log lines.
        if isinstance(record.msg, str):
            record.msg = record.msg.translate(_UNSAFE)
        if isinstance(record.args, tuple):
            record.args = tuple(_escaped(a) for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: _escaped(v) for k, v in record.args.items()}
        return True

def init_app(app: Flask) -> None:
    """Configure the portal's logger and give each request an id."""
    logger = logging.getLogger("portal")
    # A handler filter (not a logger filter) so records of child loggers pass through it too.
    if not any(isinstance(f, _RequestContext) for h in logger.handlers for f in h.filters):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)s [%(request_id)s] %(name)s: %(message)s"))
        handler.addFilter(_RequestContext())
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(app.config["PORTAL"]["LOG_LEVEL"])

    @app.before_request
    def _request_id() -> None:
        g.request_id = secrets.token_hex(8)

    @app.after_request
    def _echo_id(response: Response) -> Response:
        response.headers["X-Request-Id"] = g.get("request_id", "")
        return response

