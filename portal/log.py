"""Logging with a request id; never patient data, tokens or headers."""

from __future__ import annotations

import logging
import secrets

from flask import Flask, Response, g, has_request_context


class _RequestContext(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = g.get("request_id", "-") if has_request_context() else "-"
        # Control characters in values (e.g. DICOM strings) must not forge log lines.
        if isinstance(record.msg, str):
            record.msg = record.msg.replace("\r", "\\r").replace("\n", "\\n")
        if record.args and isinstance(record.args, tuple):
            record.args = tuple(a.replace("\r", "\\r").replace("\n", "\\n")
                                if isinstance(a, str) else a for a in record.args)
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

