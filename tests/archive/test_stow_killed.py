"""A web worker killed (kill -9) in the middle of a STOW-RS upload, under real gunicorn on
PostgreSQL (issue 16 items 3 and 6): what the index kept and what the 110104 records count
are the same (the record is committed with the rows, not by a later after-ingest step; STOW-RS
commits one transaction a request, so a kill before its commit keeps none and records none);
the files written for the transaction that never committed are reported by ``flask archive
verify``; the client, which got no answer, re-sends and all is stored and recorded once."""

from __future__ import annotations

import http.client
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import psycopg
import pytest
from flask import Flask
from pydicom.uid import generate_uid
from sqlalchemy import select

from tests.conftest import REPO, PostgresCluster, basic_auth, wait_for
from tests.dicomweb.test_stow import headers, multipart
from tests.factories import make_instance
from tests.support.gunicorn import Served, served


def stow(node: Served, body: bytes) -> int | str:
    """POST /dicomweb/studies; the status, or the error when the connection broke."""
    connection = http.client.HTTPConnection("127.0.0.1", node.port, timeout=120)
    try:
        connection.request("POST", "/dicomweb/studies", body=body,
                           headers=headers(basic_auth(node.client, node.secret)))
        return connection.getresponse().status
    except (OSError, http.client.HTTPException) as exc:
        return exc.__class__.__name__
    finally:
        connection.close()


def worker_of(master: int) -> int:
    children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    assert len(children) == 1, children
    return int(children[0])


def kept(conn: psycopg.Connection[Any], study: str) -> tuple[int, int]:
    """(instances indexed, instances the study's 110104 records count)."""
    indexed = conn.execute(
        "SELECT count(*) FROM instance i JOIN series s ON i.series_fk = s.id "
        "JOIN study t ON s.study_fk = t.id WHERE t.study_instance_uid = %s",
        (study,)).fetchone()
    recorded = conn.execute(
        "SELECT details FROM audit_event WHERE event_id = '110104' "
        "AND study_instance_uid = %s", (study,)).fetchall()
    assert indexed is not None
    return indexed[0], sum(int(details["instances"]) for (details,) in recorded)


@pytest.mark.postgres
def test_a_worker_killed_mid_stow_leaves_rows_and_records_consistent(
        tmp_path: Path, postgres: PostgresCluster) -> None:
    url = postgres.new_database()
    dsn = url.replace("postgresql+psycopg://", "postgresql://")
    instance = tmp_path / "instance"
    study_a, study_b = generate_uid(), generate_uid()
    series_a, series_b = generate_uid(), generate_uid()
    # 40 instances of a new study, then 20 of a study the archive already has: the request's
    # transaction waits on study B's row, which this test holds, and the worker is killed
    # while it waits.
    parts = [make_instance(study=study_a, series=series_a, InstanceNumber=n)
             for n in range(40)]
    parts += [make_instance(study=study_b, series=series_b, InstanceNumber=n)
              for n in range(20)]
    body = multipart(*parts)
    with served(instance, "modality", DATABASE_URL=url) as node, \
            psycopg.connect(dsn, autocommit=True) as watcher:
        assert stow(node, multipart(make_instance(study=study_b))) == 200
        answers: list[int | str] = []
        with psycopg.connect(dsn) as holder:
            holder.execute("SELECT id FROM study WHERE study_instance_uid = %s FOR UPDATE",
                           (study_b,))
            upload = threading.Thread(target=lambda: answers.append(stow(node, body)))
            upload.start()

            def commit_waits() -> bool:
                found = watcher.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = "
                    "current_database() AND wait_event_type = 'Lock'").fetchone()
                return found is not None and found[0] > 0

            assert wait_for(commit_waits, timeout=60, interval=0.02)
            os.kill(worker_of(node.pid), signal.SIGKILL)
            upload.join(timeout=60)
            holder.rollback()
        assert answers and answers[0] != 200, answers  # nothing was acknowledged
        # Indexed and recorded agree: nothing of the killed request (before the group commit,
        # 32 instances of a committed batch were kept and none recorded).
        assert kept(watcher, study_a) == (0, 0)
        assert kept(watcher, study_b) == (1, 1)
        # The 60 files written for the transaction that died are reported, not invisible.
        env = {k: v for k, v in os.environ.items() if not k.startswith("PORTAL_")}
        env.update(PORTAL_INSTANCE_PATH=str(instance), PORTAL_ENV="test",
                   PORTAL_DATABASE_URL=url)
        verify = subprocess.run([sys.executable, "-m", "flask", "--app", "app", "archive",
                                 "verify"], cwd=REPO, env=env, capture_output=True,
                                text=True, timeout=120, check=False)
        assert verify.returncode == 1, verify.stdout + verify.stderr
        assert verify.stdout.count("unreferenced file") == 60, verify.stdout
        assert "60 problem(s) found" in verify.stdout
        # The client re-sends (to the worker gunicorn started instead): everything is stored,
        # each instance counted by exactly one record, and no file is left unreferenced.
        assert wait_for(lambda: stow(node, body) == 200, timeout=60, interval=0.5)
        assert kept(watcher, study_a) == (40, 40)
        assert kept(watcher, study_b) == (21, 21)
        again = subprocess.run([sys.executable, "-m", "flask", "--app", "app", "archive",
                                "verify"], cwd=REPO, env=env, capture_output=True, text=True,
                               timeout=120, check=False)
        assert again.returncode == 0 and "0 problem(s) found" in again.stdout, again.stdout


def test_the_stow_record_is_committed_with_the_rows_before_any_after_step(
        app: Flask) -> None:
    """The after-ingest steps never run (the worker dies right after the commit): the
    110104 record is there anyway, counting what was kept (on the old code: no record)."""
    from portal.access.models import AuditEvent
    from portal.archive import current_archive

    study = generate_uid()
    parts = [make_instance(study=study, InstanceNumber=n) for n in range(5)]
    with app.app_context():
        answers = current_archive().ingest_many(parts, who="machine:modality",
                                                source_address="127.0.0.1")
    assert len(answers) == 5
    with app.extensions["db"].new_session() as session:
        rows = list(session.scalars(select(AuditEvent).where(
            AuditEvent.event_id == "110104", AuditEvent.study_instance_uid == study)))
    assert [(r.who, r.details) for r in rows] == [("machine:modality", {"instances": 5})]
    assert rows[0].record_hash  # SQLite: sealed in the same transaction
