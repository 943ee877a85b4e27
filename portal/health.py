"""Liveness (no dependencies) and readiness (database and archive reachable)."""

from __future__ import annotations

import os

from flask import Blueprint, Response, current_app, jsonify
from sqlalchemy import text

from portal.access.policy import public
from portal.archive import current_archive
from portal.db import db

bp = Blueprint("health", __name__)


@bp.get("/healthz")
@public
def healthz() -> Response:
    """The process is alive."""
    return jsonify(status="ok")


@bp.get("/readyz")
@public
def readyz() -> tuple[Response, int]:
    """Database and archive are reachable."""
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
    checks["cache"] = "in-process" if not current_app.config["PORTAL"]["REDIS_URL"] else "ok"
    ready = all(v in ("ok", "in-process") for v in checks.values())
    return jsonify(status="ready" if ready else "not ready", checks=checks), (200 if ready else 503)
