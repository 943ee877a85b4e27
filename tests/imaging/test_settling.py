"""The pre-render lane waits for a series to settle (portal/imaging/prerender.py, ``Settling``):
a series sent one instance a request is warmed once it stops arriving, not while it arrives,
and a series that never stops is still warmed every ``longest`` seconds."""

from __future__ import annotations

import base64
import http.client
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from flask import Flask

from portal.imaging.prerender import Settling
from portal.log import current_request_id, request_id_scope
from tests.conftest import REPO, wait_for

APP = Flask("settling-test")


class Started:
    """What ``Settling`` started, when and under which request id."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, list[str], bool, str | None]] = []
        self.lock = threading.Lock()

    def __call__(self, app: Flask, uids: list[str], images: bool) -> None:
        assert app is APP
        with self.lock:
            self.calls.append((time.monotonic(), uids, images, current_request_id()))

    def uids(self) -> list[tuple[str, bool]]:
        with self.lock:
            return [(uid, images) for _, uids, images, _ in self.calls for uid in uids]


def test_a_burst_of_arrivals_is_started_once_after_the_last_is_quiet() -> None:
    started = Started()
    settling = Settling(started, quiet=1.0, longest=10.0)
    last = 0.0
    for _ in range(6):
        last = time.monotonic()  # before add, which takes its own clock reading
        settling.add(APP, ["1.2.3"], True)
        time.sleep(0.05)
    assert wait_for(lambda: bool(started.calls), timeout=10)
    time.sleep(0.5)  # nothing more comes: one start
    assert started.uids() == [("1.2.3", True)]
    assert started.calls[0][0] >= last + 1.0  # not before the series was quiet


def test_a_series_that_never_stops_arriving_is_still_started_every_longest_seconds() -> None:
    started = Started()
    settling = Settling(started, quiet=1.0, longest=0.4)
    began = time.monotonic()
    while time.monotonic() - began < 1.5:  # never a second quiet
        settling.add(APP, ["1.2.4"], False)
        time.sleep(0.05)
    during = list(started.calls)
    # Started 0.4 s after each first waiting arrival: about three times (waiting for a quiet
    # second alone, never while the series arrives).
    assert 2 <= len(during) <= 4, during
    assert all(uids == ["1.2.4"] and images is False for _, uids, images, _ in during)
    assert during[0][0] - began >= 0.4


def test_series_and_their_kind_of_warm_up_are_started_each_on_its_own() -> None:
    started = Started()
    settling = Settling(started, quiet=0.2, longest=5.0)
    settling.add(APP, ["1.2.5", "1.2.6"], True)
    settling.add(APP, ["1.2.5"], False)  # the same series, volume only (a DIMSE arrival)
    assert wait_for(lambda: len(started.calls) == 3, timeout=5)
    assert sorted(started.uids()) == [("1.2.5", False), ("1.2.5", True), ("1.2.6", True)]


def test_a_start_runs_under_the_request_id_of_the_series_first_waiting_arrival() -> None:
    started = Started()
    settling = Settling(started, quiet=0.2, longest=5.0)
    with request_id_scope("first-arrival-0001"):
        settling.add(APP, ["1.2.7"], True)
    with request_id_scope("second-arrival-0002"):
        settling.add(APP, ["1.2.7"], True)
    assert wait_for(lambda: bool(started.calls), timeout=5)
    assert started.calls[0][3] == "first-arrival-0001"


def test_a_failing_start_is_logged_and_the_next_series_still_starts(
        caplog: pytest.LogCaptureFixture) -> None:
    started = Started()

    def start(app: Flask, uids: list[str], images: bool) -> None:
        if uids == ["1.2.8"]:
            raise RuntimeError("the lane is gone")
        started(app, uids, images)

    settling = Settling(start, quiet=0.1, longest=5.0)
    with caplog.at_level(logging.ERROR, logger="portal.imaging.prerender"):
        settling.add(APP, ["1.2.8"], True)
        time.sleep(0.3)
        settling.add(APP, ["1.2.9"], True)
        assert wait_for(lambda: bool(started.calls), timeout=5)
    assert started.uids() == [("1.2.9", True)]
    assert "could not queue the pre-rendering of a series" in caplog.text


def test_what_waits_for_a_closed_app_is_dropped_and_never_started() -> None:
    started = Started()
    other = Flask("settling-other")
    settling = Settling(lambda app, uids, images: started(APP, uids, images) if app is other
                        else started(app, uids, images), quiet=1.0, longest=10.0)
    settling.add(APP, ["1.2.10"], True)
    settling.add(other, ["1.2.11"], True)
    settling.forget(APP)  # the tests' close_app: its database is closed now
    assert wait_for(lambda: bool(started.calls), timeout=10)
    time.sleep(0.4)
    assert started.uids() == [("1.2.11", True)]


def test_a_settled_series_waiting_on_the_busy_lane_is_queued_there_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """While the lane is busy (a volume being built), a series that settles again is not
    queued a second time: the waiting warm-up will see its new instances too."""
    from portal import jobs
    from portal.imaging import prerender

    app = Flask("settling-lane")
    app.config["PORTAL"] = {"JOBS": "process", "REDIS_URL": ""}
    runs: list[list[str]] = []
    monkeypatch.setattr(prerender, "warm_series",
                        lambda uids, images: (prerender._unmark(uids, images),
                                              runs.append(list(uids))))
    busy = threading.Event()
    jobs._lane("prerender").submit(busy.wait, 30)
    try:
        for _ in range(3):
            prerender._start(app, ["1.2.12"], True)
    finally:
        busy.set()
    done = threading.Event()
    jobs._lane("prerender").submit(done.set)
    assert done.wait(30)
    assert runs == [["1.2.12"]]


# A command that stores a series (as a C-STORE association does) and then exits, as
# `flask dimse pull --with-scp` does: it finishes the after-ingest steps first.
_STORE_AND_FINISH = """
import sys
from pathlib import Path

from sqlalchemy import select

from app import app
from portal.archive import current_archive
from portal.imaging.prerender import volume_images
from portal.imaging.service import volume_files, volume_sources
from portal.index.models import Series

with app.app_context():
    archive = current_archive()
    stored = [archive.ingest(path.read_bytes(), who="test")
              for path in sorted(Path(sys.argv[1]).iterdir())]
    archive.after_ingest(stored, via="dimse", who="test", source_address="127.0.0.1")
    archive.after.finish()
    with archive.database.new_session() as session:
        series_id = session.scalars(select(Series.id)).one()
        key, _ = volume_sources(volume_images(session, series_id))
    print("volume:", volume_files().state(key)[0], flush=True)
"""

# A process that exits while a warm-up waits and its lane is still busy: the lane is joined
# at exit, the warm-up comes due meanwhile and finds the lanes closed.
_EXIT_WHILE_WAITING = """
import time
from app import app
from portal import jobs
from portal.imaging.prerender import prerender

jobs._lane("prerender").submit(time.sleep, 2.0)
prerender(["1.2.826.0.1.3680043.99.1"], app, images=False)
"""


def _run_portal_script(tmp_path: Path, script: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PORTAL_")}
    env.update(PORTAL_INSTANCE_PATH=str(tmp_path / "instance"), PORTAL_ENV="development",
               PORTAL_SECRET_KEY="k" * 40)
    upgrade = subprocess.run([sys.executable, "-m", "flask", "--app", "app", "db", "upgrade"],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert upgrade.returncode == 0, upgrade.stderr
    return subprocess.run([sys.executable, "-c", script, *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_a_command_that_stores_then_exits_finishes_the_warm_ups_first(tmp_path: Path) -> None:
    """``AfterIngest.finish`` does at once what waits for the series to settle: the volume
    of the series just received is built before the command returns."""
    from demo.studies import write_ct_series

    write_ct_series(tmp_path / "series", slices=6, size=64, uid_seed="exit-warm")
    run = _run_portal_script(tmp_path, _STORE_AND_FINISH, str(tmp_path / "series"))
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == ["volume: ready"], (run.stdout, run.stderr)
    assert "Traceback" not in run.stderr, run.stderr


def test_a_warm_up_cut_short_by_the_process_exiting_is_no_error(tmp_path: Path) -> None:
    """Without ``finish``, a warm-up that comes due while the process exits is dropped with
    a note (the series renders on first view), not logged as a failure with a traceback."""
    run = _run_portal_script(tmp_path, _EXIT_WHILE_WAITING)
    assert run.returncode == 0, run.stderr
    assert "the process is exiting" in run.stderr, run.stderr
    assert "ERROR" not in run.stderr and "Traceback" not in run.stderr, run.stderr


_VOLUME_STATE = """
from sqlalchemy import select

from app import app
from portal.archive import current_archive
from portal.imaging.prerender import volume_images
from portal.imaging.service import volume_files, volume_sources
from portal.index.models import Series

with app.app_context():
    with current_archive().database.new_session() as session:
        series_id = session.scalars(select(Series.id)).one()
        key, _ = volume_sources(volume_images(session, series_id))
    print("volume:", volume_files().state(key)[0], flush=True)
"""


def test_a_web_worker_that_stops_finishes_the_warm_ups_first(tmp_path: Path) -> None:
    """gunicorn stopped (SIGTERM) at once after a series arrived by STOW-RS, before it had
    settled: the worker's exit hook builds the series' volume before the worker ends,
    instead of leaving the series to be built on first view."""
    from demo.studies import write_ct_series
    from tests.support.gunicorn import served

    files = write_ct_series(tmp_path / "series", slices=6, size=64, uid_seed="worker-exit")
    instance = tmp_path / "instance"
    parts = [b"\r\n".join([b"--cut", b"Content-Type: application/dicom", b"", path.read_bytes()])
             for path in files]
    body = b"\r\n".join(parts) + b"\r\n--cut--\r\n"
    with served(instance, "modality", log=tmp_path / "gunicorn.log") as node:
        connection = http.client.HTTPConnection("127.0.0.1", node.port, timeout=60)
        token = base64.b64encode(f"{node.client}:{node.secret}".encode()).decode()
        connection.request("POST", "/dicomweb/studies", body=body, headers={
            "Authorization": f"Basic {token}", "Accept": "application/dicom+json",
            "Content-Type": 'multipart/related; type="application/dicom"; boundary=cut'})
        answer = connection.getresponse()
        assert answer.status == 200, answer.read()
        connection.close()  # else the worker lingers for it, and the series settles meanwhile
        # Within the second the series waits to settle; served() then waits for the end.
        os.kill(node.pid, signal.SIGTERM)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PORTAL_")}
    env.update(PORTAL_INSTANCE_PATH=str(instance), PORTAL_ENV="test")
    state = subprocess.run([sys.executable, "-c", _VOLUME_STATE], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=120)
    log = (tmp_path / "gunicorn.log").read_text()
    assert state.stdout.splitlines() == ["volume: ready"], (state.stdout, state.stderr, log)
    assert "Traceback" not in log, log
