"""Metrics and logs an operator expects (issue 16 item 7; docs/operations.md, "Metrics and
logs"): ``/metrics`` closed unless a token or an address allows it; requests counted under
their route family with no UID in any label; the counts of several gunicorn workers added up;
the request id of a trusted proxy in the log line, the answer and the request the portal makes
to a real Orthanc (which prints the header it received from a Lua filter)."""

from __future__ import annotations

import json
import re
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import redis
import requests
from dicomweb_client.api import DICOMwebClient
from flask import Flask
from prometheus_client import CollectorRegistry, multiprocess
from prometheus_client.parser import text_string_to_metric_families

from portal import audit, jobs
from portal.archive import current_archive
from tests.access.test_audit_forward import SyslogReceiver
from tests.archive.test_external import PORTAL_PASSWORD, PORTAL_USER, load_studies, start_pacs
from tests.conftest import (
    PostgresCluster,
    basic_auth,
    close_app,
    free_port,
    make_app,
    make_client,
    wait_for,
)
from tests.dicomweb.test_stow import BOUNDARY, multipart
from tests.factories import make_dataset, to_bytes
from tests.support.gunicorn import served

TOKEN = "metrics-token-for-the-tests-0123456789"
SCRAPE = {"Authorization": f"Bearer {TOKEN}"}
UID = re.compile(r"\d+(\.\d+){3,}")  # what a DICOM UID looks like


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus text answer, by name and labels."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def requests_of(found: dict[tuple[str, tuple[tuple[str, str], ...]], float], family: str,
                status: str = "2xx") -> float:
    key = ("portal_http_request_duration_seconds_count",
           (("family", family), ("status", status)))
    return found.get(key, 0.0)


@pytest.fixture
def metered(tmp_path: Path) -> Iterator[Flask]:
    app = make_app(tmp_path / "instance", METRICS_TOKEN=TOKEN, RENDER_ISOLATION=False)
    yield app
    close_app(app)


def test_metrics_are_closed_unless_a_token_or_an_address_allows(tmp_path: Path) -> None:
    closed = make_app(tmp_path / "closed")
    try:
        assert closed.test_client().get("/metrics", headers=SCRAPE).status_code == 404
    finally:
        close_app(closed)
    by_token = make_app(tmp_path / "token", METRICS_TOKEN=TOKEN)
    try:
        client = by_token.test_client()
        assert client.get("/metrics").status_code == 403
        assert client.get("/metrics", headers={"Authorization": "Bearer wrong"}
                          ).status_code == 403
        assert client.get("/metrics", headers=basic_auth("metrics", TOKEN)).status_code == 403
        answer = client.get("/metrics", headers=SCRAPE)
        assert answer.status_code == 200 and answer.mimetype == "text/plain"
        assert "portal_http_request_duration_seconds" in answer.text
    finally:
        close_app(by_token)
    elsewhere = make_app(tmp_path / "elsewhere", METRICS_ALLOWED=["10.0.0.0/8"])
    try:
        assert elsewhere.test_client().get("/metrics").status_code == 403
        assert elsewhere.test_client().get(
            "/metrics", environ_base={"REMOTE_ADDR": "10.1.2.3"}).status_code == 200
    finally:
        close_app(elsewhere)


def test_readyz_shows_sizes_only_to_a_scraper_and_metrics_have_the_disk(metered: Flask
                                                                         ) -> None:
    """/readyz is public: anyone sees the states, only a scraper (the metrics token or an
    allowed address) the archive disk's bytes, which are on /metrics too."""
    client = metered.test_client()
    public = client.get("/readyz").get_json()
    assert public["archive_disk"] == {"state": "ok"}
    assert public["checks"]["archive_disk"] == "ok"
    assert "bytes" not in json.dumps(public)
    scraper = client.get("/readyz", headers=SCRAPE).get_json()["archive_disk"]
    assert scraper["state"] == "ok" and scraper["total_bytes"] >= scraper["free_bytes"] > 0
    scraped = client.get("/metrics", headers=SCRAPE).text
    free = [line for line in scraped.splitlines()
            if line.startswith("portal_archive_disk_free_bytes ")]
    assert len(free) == 1 and float(free[0].split()[1]) > 0, scraped[-2000:]


def test_a_rendered_image_and_a_qido_are_counted_under_their_families(metered: Flask) -> None:
    ds = make_dataset(patient_name="Metric^Marianne", patient_id="PID-METRICS")
    with metered.app_context():
        current_archive().ingest(to_bytes(ds), who="test")
    headers = basic_auth(*make_client(metered, "reader"))
    client = metered.test_client()
    before = samples(client.get("/metrics", headers=SCRAPE).text)

    rendered = (f"/dicomweb/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
                f"/instances/{ds.SOPInstanceUID}/rendered")
    for _ in range(2):  # rendered, then from the render cache
        answer = client.get(rendered, headers={**headers, "Accept": "image/png"})
        assert answer.status_code == 200
    qido = client.get("/dicomweb/studies", query_string={"PatientID": "PID-METRICS"},
                      headers=headers)
    assert qido.status_code == 200 and len(qido.json) == 1
    missing = client.get(rendered.replace(ds.SOPInstanceUID, "1.2.3.4"),
                         headers={**headers, "Accept": "image/png"})
    assert missing.status_code == 404

    text = client.get("/metrics", headers=SCRAPE).text
    after = samples(text)
    assert requests_of(after, "dicomweb-rendered") - requests_of(before, "dicomweb-rendered") == 2
    assert requests_of(after, "dicomweb-rendered", "4xx") - \
        requests_of(before, "dicomweb-rendered", "4xx") == 1
    assert requests_of(after, "dicomweb-qido") - requests_of(before, "dicomweb-qido") == 1
    assert requests_of(after, "health") - requests_of(before, "health") == 1  # the scrape
    hits = ("portal_render_cache_requests_total", (("result", "hit"),))
    misses = ("portal_render_cache_requests_total", (("result", "miss"),))
    assert after[hits] - before.get(hits, 0) == 1 and after[misses] - before.get(misses, 0) == 1
    renders = [v - before.get(k, 0) for k, v in after.items()
               if k[0] == "portal_render_seconds_count" and ("outcome", "answered") in k[1]]
    assert sum(renders) >= 1
    # No UID, name or patient id anywhere in the answer, labels included.
    for value in (ds.StudyInstanceUID, ds.SOPInstanceUID, "Marianne", "PID-METRICS"):
        assert value not in text
    for _name, labels in after:
        assert not any(UID.search(value) for _label, value in labels), labels


def test_a_proxys_request_id_is_believed_only_from_a_trusted_proxy(tmp_path: Path) -> None:
    given = {"X-Request-Id": "0123456789abcdef0123456789abcdef"}
    direct = make_app(tmp_path / "direct")
    try:
        answer = direct.test_client().get("/healthz", headers=given)
        made = answer.headers["X-Request-Id"]
        assert made != given["X-Request-Id"] and re.fullmatch(r"[0-9a-f]{32}", made)
    finally:
        close_app(direct)
    proxied = make_app(tmp_path / "proxied", TRUSTED_PROXIES=1)
    try:
        client = proxied.test_client()  # from 127.0.0.1, a trusted proxy address
        assert client.get("/healthz", headers=given).headers["X-Request-Id"] == \
            given["X-Request-Id"]
        forged = client.get("/healthz", headers={"X-Request-Id": "<script>alert(1)</script>"})
        assert re.fullmatch(r"[0-9a-f]{32}", forged.headers["X-Request-Id"])
        around = client.get("/healthz", headers=given,
                            environ_base={"REMOTE_ADDR": "192.0.2.7"})
        assert around.headers["X-Request-Id"] != given["X-Request-Id"]
    finally:
        close_app(proxied)


REQUEST_ID_LUA = """
function IncomingHttpRequestFilter(method, uri, ip, username, headers)
  if headers["x-request-id"] ~= nil then
    print("request-id " .. headers["x-request-id"] .. " " .. method)
  end
  return true
end
"""


def per_worker_requests(folder: Path) -> dict[str, float]:
    """Requests counted by each gunicorn worker (its own files of the multiprocess folder,
    read by prometheus_client one worker at a time)."""
    counts = {}
    for histogram in folder.glob("histogram_*.db"):
        pid = histogram.stem.split("_")[-1]
        alone = folder.parent / f"one-worker-{pid}"
        alone.mkdir()
        shutil.copy(histogram, alone)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=str(alone))
        counts[pid] = sum(s.value for family in registry.collect() for s in family.samples
                          if s.name == "portal_http_request_duration_seconds_count")
    return {pid: count for pid, count in counts.items() if count}


def test_under_gunicorn_workers_add_up_and_the_request_id_reaches_orthanc(
        tmp_path: Path) -> None:
    lua = tmp_path / "request-id.lua"
    lua.write_text(REQUEST_ID_LUA)
    orthanc = start_pacs(tmp_path / "orthanc", LuaScripts=[str(lua)])
    log = tmp_path / "gunicorn.log"
    try:
        (study,) = load_studies(orthanc, 1, instances=2)
        with served(tmp_path / "instance", "reader", log=log, read=True, WORKERS="2",
                    THREADS="4", RENDER_WORKERS="1", TRUSTED_PROXIES="1", METRICS_TOKEN=TOKEN,
                    LOG_FORMAT="json", ARCHIVE_URL=orthanc.dicomweb_url,
                    ARCHIVE_USERNAME=PORTAL_USER, ARCHIVE_PASSWORD=PORTAL_PASSWORD) as server:
            base = f"http://127.0.0.1:{server.port}"
            session = requests.Session()
            session.auth = (server.client, server.secret)
            # As nginx would send it: its $request_id, from 127.0.0.1 (a trusted proxy).
            request_id = "7f3a0c2e9b1d4e5f8a6b7c8d9e0f1a2b"
            web = DICOMwebClient(f"{base}/dicomweb", session=session,
                                 headers={"X-Request-Id": request_id})
            # Not in the index yet: the portal asks Orthanc, under the proxy's request id.
            found = web.search_for_studies(search_filters={"StudyInstanceUID": study.study_uid})
            assert [s["0020000D"]["Value"][0] for s in found] == [study.study_uid]
            answered = session.get(f"{base}/healthz", headers={"X-Request-Id": request_id})
            assert answered.headers["X-Request-Id"] == request_id

            def orthanc_saw() -> bool:
                text = orthanc.log_file.read_text(errors="replace") if orthanc.log_file \
                    else ""
                return f"request-id {request_id} GET" in text

            assert wait_for(orthanc_saw, timeout=10), "Orthanc got no X-Request-Id"

            def logged() -> list[dict[str, object]]:
                lines = log.read_text(errors="replace").splitlines()
                return [entry for entry in map(_json_or_none, lines)
                        if entry and entry.get("request_id") == request_id]

            assert wait_for(lambda: len(logged()) >= 2, timeout=10), log.read_text()[-2000:]
            assert {entry.get("path") for entry in logged()} >= {"/dicomweb/studies",
                                                                 "/healthz"}

            # Many requests at once: both workers serve some, /metrics adds them up.
            uids = [i["00080018"]["Value"][0] for i in web.search_for_instances(
                study_instance_uid=study.study_uid)]
            before = samples(requests.get(f"{base}/metrics", headers=SCRAPE, timeout=30).text)
            rendered = (f"{base}/dicomweb/studies/{study.study_uid}/series/{study.series_uid}"
                        f"/instances/{uids[0]}/rendered")
            failures: list[str] = []

            def fetch(count: int) -> None:
                for n in range(count):  # a new connection each time: any worker may take it
                    if n % 2:
                        answer = requests.get(rendered, auth=session.auth, timeout=60,
                                              headers={"Accept": "image/jpeg"})
                    else:
                        answer = requests.get(f"{base}/dicomweb/studies", auth=session.auth,
                                              params={"StudyInstanceUID": study.study_uid},
                                              timeout=60)
                    if answer.status_code != 200:
                        failures.append(f"{answer.url} {answer.status_code}")

            threads = [threading.Thread(target=fetch, args=(10,)) for _ in range(6)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=120)
            assert not failures, failures[:5]
            after = samples(requests.get(f"{base}/metrics", headers=SCRAPE, timeout=30).text)
            assert requests_of(after, "dicomweb-rendered") - \
                requests_of(before, "dicomweb-rendered") == 30
            assert requests_of(after, "dicomweb-qido") - \
                requests_of(before, "dicomweb-qido") == 30
            workers = per_worker_requests(tmp_path / "instance" / "metrics")
            assert len(workers) == 2, workers  # both served; the scrape added both up
            total = sum(value for (name, _labels), value in after.items()
                        if name == "portal_http_request_duration_seconds_count")
            # The last scrape is counted after its answer is made: every request but it.
            assert sum(workers.values()) == total + 1
            assert after[("portal_breaker_state", (("dependency", "archive"),))] == 0
            assert ("portal_render_pool", (("state", "queue"),)) in after
    finally:
        orthanc.stop()


def _json_or_none(line: str) -> dict[str, object] | None:
    try:
        entry = json.loads(line)
    except ValueError:
        return None
    return entry if isinstance(entry, dict) else None


def gauge(found: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
          **labels: str) -> float | None:
    return found.get((name, tuple(sorted(labels.items()))))


@pytest.mark.postgres
def test_audit_backlog_and_forward_lag_follow_the_sealer_and_the_repository(
        tmp_path: Path, postgres: PostgresCluster) -> None:
    port = free_port()
    app = make_app(tmp_path / "instance", postgres.new_database(), METRICS_TOKEN=TOKEN,
                   AUDIT_SYSLOG_URL=f"tcp://127.0.0.1:{port}")
    dsn = app.config["PORTAL"]["DATABASE_URL"].replace("postgresql+psycopg://",
                                                       "postgresql://")

    def scrape() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return samples(app.test_client().get("/metrics", headers=SCRAPE).text)

    def read(n: int) -> None:
        audit.record(app.extensions["db"], audit.INSTANCES_ACCESSED, action="R",
                     outcome=audit.OUTCOME_SUCCESS, who=f"user:t|w{n}",
                     study_instance_uid=f"1.2.3.{n}", details={"what": "study"})

    receiver = None
    try:
        assert gauge(scrape(), "portal_audit_unforwarded") == 0
        assert gauge(scrape(), "portal_audit_forward_lag_seconds") == 0
        # Another node's sealer holds the lock: three records wait unsealed.
        with psycopg.connect(dsn, autocommit=True) as other:
            other.execute("SELECT pg_advisory_lock(%s)", (audit.SEAL_LOCK,))
            for n in range(3):
                read(n)
            waiting = scrape()
            assert gauge(waiting, "portal_audit_unsealed") == 3
            assert gauge(waiting, "portal_audit_unforwarded") == 0  # not sealed: not sendable
            assert gauge(waiting, "portal_audit_forward_lag_seconds") >= 0
            other.execute("SELECT pg_advisory_unlock(%s)", (audit.SEAL_LOCK,))
        # This process's sealer chains them; nobody listens at the repository yet.
        assert wait_for(lambda: gauge(scrape(), "portal_audit_unsealed") == 0, timeout=15)
        sealed = scrape()
        assert gauge(sealed, "portal_audit_unforwarded") == 3
        assert wait_for(lambda: gauge(scrape(), "portal_audit_forward_lag_seconds") >= 1,
                        timeout=5)
        assert gauge(sealed, "portal_audit_last_forward_timestamp_seconds") is None
        receiver = SyslogReceiver(port)
        result = app.test_cli_runner().invoke(args=["audit", "forward"])
        assert result.exit_code == 0, result.output
        sent = scrape()
        assert gauge(sent, "portal_audit_unforwarded") == 0
        assert gauge(sent, "portal_audit_forward_lag_seconds") == 0
        assert gauge(sent, "portal_audit_last_forward_timestamp_seconds") > 0
        assert gauge(sent, "portal_metrics_unreadable", part="audit") == 0
    finally:
        if receiver is not None:
            receiver.close()
        close_app(app)


def test_the_archive_breaker_shows_open_when_orthanc_is_gone(tmp_path: Path) -> None:
    orthanc = start_pacs(tmp_path / "orthanc")
    (study,) = load_studies(orthanc, 1, instances=1)
    app = make_app(tmp_path / "instance", METRICS_TOKEN=TOKEN, ARCHIVE_URL=orthanc.dicomweb_url,
                   ARCHIVE_USERNAME=PORTAL_USER, ARCHIVE_PASSWORD=PORTAL_PASSWORD,
                   ARCHIVE_BREAKER_FAILURES=2, ARCHIVE_TIMEOUT_SECONDS=2,
                   RENDER_ISOLATION=False)
    try:
        client = app.test_client()
        headers = basic_auth(*make_client(app, "reader"))

        def state() -> float | None:
            return gauge(samples(client.get("/metrics", headers=SCRAPE).text),
                         "portal_breaker_state", dependency="archive")

        def opened() -> float:
            return gauge(samples(client.get("/metrics", headers=SCRAPE).text),
                         "portal_breaker_opened_total", dependency="archive") or 0.0

        found = client.get("/dicomweb/studies", query_string={"StudyInstanceUID":
                                                              study.study_uid},
                           headers=headers)
        assert found.status_code == 200
        assert state() == 0
        before = opened()
        orthanc.stop()
        for n in range(3):  # misses forwarded to a stopped archive: the breaker opens
            client.get("/dicomweb/studies", query_string={"PatientID": f"NOBODY{n}"},
                       headers=headers)
        assert state() == 2
        assert opened() - before == 1
    finally:
        orthanc.stop()
        close_app(app)


def test_a_job_queued_by_a_request_carries_its_request_id(tmp_path: Path,
                                                          redis_url: str) -> None:
    """A STOW-RS queues its pre-rendering on RQ (no worker is running here, so the job
    waits), from the thread that waits for the series to settle: the job carries the request
    id the answer carried (a worker logs under it)."""
    url = redis_url.rsplit("/", 1)[0] + "/9"
    redis.Redis.from_url(url).flushdb()
    app = make_app(tmp_path / "instance", REDIS_URL=url, JOBS="queue", RENDER_ISOLATION=False)
    try:
        headers = basic_auth(*make_client(app, "modality"))
        answer = app.test_client().post(
            "/dicomweb/studies", data=multipart(to_bytes(make_dataset())),
            headers={**headers, "Accept": "application/dicom+json",
                     "Content-Type": f'multipart/related; type="application/dicom"; '
                                     f"boundary={BOUNDARY}"})
        assert answer.status_code == 200, answer.text
        with app.app_context():
            queue = jobs.queue_of(app)
            # Queued once the series has settled (a second without a new instance of it).
            assert wait_for(lambda: bool(queue.job_ids), timeout=10)
            queued = [queue.fetch_job(job_id) for job_id in queue.job_ids]
        assert [job.description for job in queued] == ["prerender"]
        assert queued[0].meta["request_id"] == answer.headers["X-Request-Id"]
    finally:
        redis.Redis.from_url(url).flushdb()
        close_app(app)
