"""The retention jobs on a real RQ worker (``flask jobs worker`` on a real Redis): the daily
run is a periodic job of every installation, and an approval's deletion runs on the worker."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flask import Flask
from sqlalchemy import func, select

from portal import jobs
from portal.index.models import Study
from portal.retention.service import approve, practice_principal, refresh_due
from tests.conftest import close_app, make_app, wait_for
from tests.retention.test_retention import _setup_due
from tests.test_jobs import queue_url, worker_of  # noqa: F401  (fixtures)


def _studies(app: Flask, uid: str) -> int:
    with app.extensions["db"].new_session() as session:
        return int(session.scalar(select(func.count()).select_from(Study)
                                  .where(Study.study_instance_uid == uid)) or 0)


def test_approved_deletion_runs_on_the_worker(tmp_path: Path, queue_url: str,  # noqa: F811
                                              worker_of: Any) -> None:  # noqa: F811
    app = make_app(tmp_path / "instance", REDIS_URL=queue_url, JOBS="queue")
    try:
        assert jobs.periodic_jobs(app)["retention-daily"] == 86400
        gone, kept, practice, _manager = _setup_due(app)
        with app.app_context(), app.extensions["db"].write_transaction() as session:
            refresh_due(session)
            approve(session, practice_principal(practice), "user:t|om", None)
        worker_of(app)
        with app.app_context():
            assert jobs.enqueue("retention-apply") is not None  # queued, not run here
        assert wait_for(lambda: _studies(app, gone) == 0, timeout=60)
        assert _studies(app, kept) == 1
    finally:
        close_app(app)
