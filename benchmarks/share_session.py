"""What a share session costs on an image request (issue 6, item 8).

Starts the portal under gunicorn (its production config, one worker) on 127.0.0.1 with a
fresh instance folder, stores one CT slice, and asks for the same cached rendition

* with a signed-in staff session (``portal`` cookie, a server-side session row), and
* with a share session (``share`` cookie, obtained by POSTing a real link and PIN to
  ``/s/exchange``),

over one keep-alive connection each, in interleaved rounds so drift hits both alike. Both
answers come from the render cache, so the difference is the cost of validating the
session (cookie -> SHA-256 -> cached link state or one query -> principal -> policy). It also
times ``share_principal()`` in-process, with the link state cached and without.

    .venv/bin/python benchmarks/share_session.py [--requests 2000] [--rounds 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import requests  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402

SECRET = "benchmark-secret-key-that-is-long-enough-0123456789"


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def seed(instance: Path) -> dict[str, Any]:
    """A study, a physician with a grant and a signed-in session, and a share link."""
    from portal import create_app
    from portal.access.grants import create_grant
    from portal.access.models import User
    from portal.access.principal import Principal, user_principal
    from portal.archive import current_archive
    from portal.auth.models import UserSession
    from portal.db import utcnow
    from portal.migrate import upgrade_database
    from portal.sharing import service
    from portal.sharing.routes import share_policy
    from tests.factories import make_instance

    app = create_app({"INSTANCE_PATH": str(instance), "ENV": "test", "SECRET_KEY": SECRET,
                      "RENDER_ISOLATION": False})
    upgrade_database(app)
    study, series, sop = generate_uid(), generate_uid(), generate_uid()
    with app.app_context():
        current_archive().ingest(make_instance(study=study, series=series, sop=sop,
                                               rows=512, columns=512), who="benchmark")
    session_token = secrets.token_urlsafe(32)
    database = app.extensions["db"]
    with app.test_request_context(), database.write_transaction() as session:
        user = User(issuer="https://idp.bench", subject="doctor", email="d@bench.test",
                    display_name="Doctor", roles=["physician"], active=True, security_epoch=0)
        session.add(user)
        session.flush()
        create_grant(session, Principal("user", 0, "benchmark"), user_id=user.id,
                     study_uid=study)
        now = utcnow()
        session.add(UserSession(token_sha256=hashlib.sha256(session_token.encode()).hexdigest(),
                                data={}, user_fk=user.id, security_epoch=0, created_at=now,
                                last_seen_at=now, expires_at=now + timedelta(hours=12),
                                auth_time=now))
        made = service.create_share(session, user_principal(user, "session"), share_policy(),
                                    study_uid=study)
    app.extensions["db"].dispose()
    return {"study": study, "series": series, "sop": sop, "session": session_token,
            "token": made.token, "pin": made.pin}


def start_portal(instance: Path, port: int) -> subprocess.Popen[bytes]:
    """gunicorn with the portal's own config, one worker, on loopback."""
    env = {**os.environ, "PORTAL_INSTANCE_PATH": str(instance), "PORTAL_ENV": "test",
           "PORTAL_SECRET_KEY": SECRET, "PORTAL_BIND": f"127.0.0.1:{port}",
           "PORTAL_WORKERS": "1", "PORTAL_THREADS": "4", "PORTAL_RENDER_ISOLATION": "false",
           "PORTAL_LOG_LEVEL": "WARNING"}
    return subprocess.Popen([sys.executable, "-m", "gunicorn", "-c",
                             "python:portal.gunicorn_config", "--access-logfile", "/dev/null",
                             "app:app"], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_up(url: str, timeout: float = 60.0) -> None:
    """Until /healthz answers."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise RuntimeError("the portal did not start")


def timed_requests(port: int, path: str, cookie: str, count: int) -> list[float]:
    """``count`` sequential GETs on one keep-alive connection; milliseconds each."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Cookie": cookie, "Accept": "image/jpeg"}
    out = []
    for _ in range(count):
        start = time.perf_counter()
        connection.request("GET", path, headers=headers)
        response = connection.getresponse()
        response.read()
        out.append((time.perf_counter() - start) * 1000)
        if response.status != 200:
            raise RuntimeError(f"{path} answered {response.status}")
    connection.close()
    return out


def percentile(values: list[float], p: float) -> float:
    """The p-th percentile (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))]


def in_process(instance: Path, share_cookie: str, count: int) -> dict[str, float]:
    """``share_principal()`` alone: link state cached, and read from the database."""
    from portal import create_app
    from portal.sharing import sessions

    app = create_app({"INSTANCE_PATH": str(instance), "ENV": "test", "SECRET_KEY": SECRET,
                      "RENDER_ISOLATION": False})
    results = {}
    for label, clear in (("cached", False), ("database", True)):
        times = []
        for _ in range(count):
            if clear:
                sessions.forget_cached_visits()
            with app.test_request_context(headers={"Cookie": share_cookie}):
                start = time.perf_counter()
                principal = sessions.share_principal()
                times.append((time.perf_counter() - start) * 1000)
                assert principal is not None
        results[f"{label}_p50_ms"] = statistics.median(times)
        results[f"{label}_p99_ms"] = percentile(times, 99)
    app.extensions["db"].dispose()
    return results


def main() -> int:
    """Run, print a table, optionally write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="per session kind")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="portal-share-bench-"))
    instance = workdir / "instance"
    server = None
    try:
        data = seed(instance)
        port = _free_port()
        server = start_portal(instance, port)
        url = f"http://127.0.0.1:{port}"
        wait_up(url)
        opened = requests.post(f"{url}/s/exchange", data={"token": data["token"],
                                                          "pin": data["pin"]},
                               allow_redirects=False, timeout=30)
        assert opened.status_code == 303, opened.status_code
        share_cookie = f"share={opened.cookies['share']}"
        staff_cookie = f"portal={data['session']}"
        path = (f"/dicomweb/studies/{data['study']}/series/{data['series']}/instances/"
                f"{data['sop']}/rendered")
        for cookie in (staff_cookie, share_cookie):  # render once, warm both sessions
            timed_requests(port, path, cookie, 50)
        per_round = max(1, args.requests // args.rounds)
        samples: dict[str, list[float]] = {"signed-in session": [], "share session": []}
        for _ in range(args.rounds):
            samples["signed-in session"] += timed_requests(port, path, staff_cookie, per_round)
            samples["share session"] += timed_requests(port, path, share_cookie, per_round)
        report: dict[str, Any] = {"requests_per_kind": per_round * args.rounds,
                                  "path": "cached /rendered JPEG (512x512 CT slice)"}
        print(f"{'session':<20}{'p50 ms':>10}{'p99 ms':>10}{'mean ms':>10}")
        for kind, values in samples.items():
            p50, p99 = statistics.median(values), percentile(values, 99)
            report[kind] = {"p50_ms": p50, "p99_ms": p99, "mean_ms": statistics.fmean(values)}
            print(f"{kind:<20}{p50:>10.3f}{p99:>10.3f}{statistics.fmean(values):>10.3f}")
        added = report["share session"]["p50_ms"] - report["signed-in session"]["p50_ms"]
        report["share_minus_signed_in_p50_ms"] = added
        print(f"share session adds {added:+.3f} ms at p50 (target: < 1 ms)")
        report["share_principal_in_process"] = in_process(instance, share_cookie, 2000)
        for key, value in report["share_principal_in_process"].items():
            print(f"share_principal() {key}: {value:.4f}")
        if args.json:
            args.json.write_text(json.dumps(report, indent=2))
        return 0 if added < 1.0 else 1
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
