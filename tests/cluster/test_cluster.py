"""Failures on purpose on the reference cluster (docs/cluster.md): two portal nodes behind
nginx (TLS, HTTP/2), one PostgreSQL, one Redis, Orthanc with orthanc-postgresql.

Every test uses the session's cluster and leaves it healthy: all nodes up, Redis, PostgreSQL
and Orthanc running. Node A is ``cluster.nodes[0]``, node B ``cluster.nodes[1]``.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from flask import Flask
from pydicom.uid import generate_uid
from sqlalchemy import select

from portal import create_app
from portal.access.grants import create_grant
from portal.access.models import AuditEvent, User
from portal.access.principal import Principal, user_principal
from portal.auth.models import UserSession
from portal.auth.sessions import _digest
from portal.db import utcnow
from portal.sharing import service
from portal.sharing.models import ShareLink
from tests.conftest import close_app, wait_for
from tests.factories import make_dataset, to_bytes
from tests.support.cluster import Cluster, Node

SESSION_COOKIE = "__Host-portal"  # production: Secure cookies (nginx terminates TLS)
SHARE_COOKIE = "__Host-share"


# -- helpers ---------------------------------------------------------------------------------

def https(cluster: Cluster) -> requests.Session:
    """A client that trusts the cluster's throwaway certificate and nothing from the env."""
    session = requests.Session()
    session.verify = str(cluster.tls_cert)
    session.trust_env = False
    return session


def dicomweb(cluster: Cluster, base: str | None = None) -> DICOMwebClient:
    """The real DICOMweb client, as the machine client, through nginx unless told."""
    session = https(cluster)
    session.auth = cluster.client
    return DICOMwebClient(url=(base or cluster.url) + "/dicomweb", session=session)


def bases(cluster: Cluster) -> list[str]:
    """Each node directly, and nginx."""
    return [node.url for node in cluster.nodes] + [cluster.url]


def local_files(node: Node) -> set[str]:
    objects = node.instance / "archive" / "objects"
    return {p.name for p in objects.rglob("*.dcm")} if objects.exists() else set()


def rendered_path(study: str, series: str, sop: str) -> str:
    return f"/dicomweb/studies/{study}/series/{series}/instances/{sop}/rendered"


@dataclass
class Study:
    uid: str
    series: str
    sops: list[str]


@dataclass
class Physician:
    user_id: int
    principal: Principal
    cookie: str
    csrf: str

    def headers(self, **more: str) -> dict[str, str]:
        return {"Cookie": f"{SESSION_COOKIE}={self.cookie}", **more}


def stow(cluster: Cluster, count: int, *, patient: str = "CLUSTER-1", rows: int = 64,
         study: str | None = None, series: str | None = None) -> Study:
    """STOW-RS ``count`` new instances of one series through nginx."""
    study, series = study or generate_uid(), series or generate_uid()
    datasets = [make_dataset(study=study, series=series, patient_id=patient, rows=rows,
                             columns=rows, value=i, InstanceNumber=i + 1) for i in range(count)]
    dicomweb(cluster).store_instances(datasets=datasets)
    return Study(study, series, [str(ds.SOPInstanceUID) for ds in datasets])


# -- fixtures --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def app(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Flask]:
    """The portal's code on the cluster's database (same SECRET_KEY, so the same PIN
    pepper): to make people, grants, links and sessions as the product's services do."""
    application = create_app({"INSTANCE_PATH": str(tmp_path_factory.mktemp("setup")),
                              "ENV": "test", "SECRET_KEY": cluster.secret_key,
                              "DATABASE_URL": cluster.database_url})
    yield application
    close_app(application)


@pytest.fixture(scope="module")
def study(cluster: Cluster) -> Study:
    """Three instances stored through nginx by the machine client."""
    return stow(cluster, 3)


@pytest.fixture(scope="module")
def physician(app: Flask, study: Study) -> Physician:
    """A physician granted ``study``, signed in (a server-side session row, as the sign-in
    callback writes it, with a recent sign-in)."""
    database = app.extensions["db"]
    token, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    with database.write_transaction() as session:
        user = User(issuer="https://idp.cluster.test", subject=f"doc-{token[:8]}",
                    email="doc@cluster.test", display_name="Dr Cluster",
                    roles=["physician"], active=True, security_epoch=0)
        session.add(user)
        session.flush()
        admin = Principal("user", 0, "setup", roles=frozenset({"office_manager"}))
        create_grant(session, admin, user_id=user.id, study_uid=study.uid)
        now = utcnow()
        session.add(UserSession(token_sha256=_digest(token), data={"csrf": csrf},
                                user_fk=user.id, security_epoch=0, created_at=now,
                                last_seen_at=now, expires_at=now + timedelta(hours=4),
                                auth_time=now))
        principal = user_principal(user, "session")
        user_id = user.id
    return Physician(user_id, principal, token, csrf)


def new_link(app: Flask, physician: Physician, study: Study) -> service.NewShare:
    from portal.sharing.routes import share_policy

    with app.app_context(), app.extensions["db"].write_transaction() as session:
        made = service.create_share(session, physician.principal, share_policy(),
                                    study_uid=study.uid, with_pin=True)
        session.flush()
        made.link.public_id  # noqa: B018 - loaded before the session closes
    return made


def link_state(app: Flask, public_id: str) -> ShareLink:
    with app.extensions["db"].new_session() as session:
        link = session.scalars(select(ShareLink).where(ShareLink.public_id == public_id)).one()
        session.expunge(link)
        return link


def exchange(http: requests.Session, base: str, token: str, pin: str) -> requests.Response:
    return http.post(f"{base}/s/exchange", data={"token": token, "pin": pin},
                     allow_redirects=False, timeout=30)


def share_cookie(answer: requests.Response) -> str:
    for header in answer.raw.headers.getlist("Set-Cookie"):
        name, _, rest = header.partition("=")
        if name == SHARE_COOKIE:
            return rest.split(";", 1)[0]
    raise AssertionError(f"no share cookie in {answer.status_code} {answer.headers}")


def healthy(cluster: Cluster) -> None:
    """Every node ready (or degraded by nothing) through its own port and through nginx."""
    http = https(cluster)

    def ready() -> bool:
        try:
            return all(http.get(f"{base}/readyz", timeout=5).json()["status"] == "ready"
                       for base in bases(cluster))
        except (requests.RequestException, ValueError):
            return False

    assert wait_for(ready, timeout=40, interval=0.5), "the cluster did not come back"


# -- the tests -------------------------------------------------------------------------------

def test_stow_through_nginx_lands_in_orthanc_and_is_served_by_every_node(
        cluster: Cluster, study: Study, physician: Physician) -> None:
    # Orthanc's own REST API has every instance: no node holds the only copy.
    for sop in study.sops:
        assert cluster.orthanc_has_instance(sop), sop
    holders = [n for n in cluster.nodes if local_files(n)]
    assert len(holders) == 1, "one node wrote the upload, the other has no file yet"
    http = https(cluster)
    http.auth = cluster.client
    for base in bases(cluster):
        found = dicomweb(cluster, base).search_for_studies(
            search_filters={"StudyInstanceUID": study.uid})
        assert [s["0020000D"]["Value"][0] for s in found] == [study.uid]
        for sop in study.sops:
            image = http.get(base + rendered_path(study.uid, study.series, sop),
                             headers={"Accept": "image/jpeg"}, timeout=30)
            assert image.status_code == 200, (base, image.text[:300])
            assert image.content[:2] == b"\xff\xd8"
        page = requests.get(f"{base}/studies/{study.uid}", headers=physician.headers(),
                            verify=str(cluster.tls_cert), timeout=30, allow_redirects=False)
        assert page.status_code == 200, (base, page.status_code)
    # The node that had nothing fetched the same bytes from Orthanc (hash-checked).
    assert all(local_files(n) for n in cluster.nodes)
    assert http.get(cluster.url + "/readyz", timeout=10).json()["status"] == "ready"


def test_background_work_runs_on_the_job_worker(cluster: Cluster, study: Study) -> None:
    """The nodes put the upload's pre-rendering on the RQ queue and the cluster's worker (not
    a node) ran it: its jobs are in RQ's finished registry, none failed, /readyz shows the
    worker, and the thumbnail it made is in the shared Redis cache."""
    import redis
    from rq import Queue
    from rq.serializers import JSONSerializer

    connection = redis.Redis.from_url(cluster.redis_url)
    queue = Queue("portal", connection=connection, serializer=JSONSerializer)

    def prerendered() -> bool:
        jobs = [queue.fetch_job(i) for i in queue.finished_job_registry.get_job_ids()]
        return any(job is not None and job.description == "prerender" for job in jobs)

    assert wait_for(prerendered, timeout=60, interval=0.5), "no pre-render job finished"
    assert queue.failed_job_registry.count == 0
    ready = https(cluster).get(cluster.url + "/readyz", timeout=10, headers={
        "Authorization": f"Bearer {cluster.metrics_token}"}).json()
    assert ready["jobs"]["workers"] >= 1 and ready["jobs"]["mode"] == "queue", ready
    assert connection.keys("render:*"), "the worker's renditions are not in the shared cache"


def test_nginx_front_tls_http2_static_and_body_limit(cluster: Cluster) -> None:
    import subprocess

    version = subprocess.run(
        ["curl", "-sS", "--http2", "--cacert", str(cluster.tls_cert), "-o", "/dev/null",
         "-w", "%{http_version}", cluster.url + "/healthz"],
        capture_output=True, text=True, timeout=30, check=True).stdout
    assert version == "2"
    http = https(cluster)
    static = http.get(cluster.url + "/static/manifest.webmanifest?v=abc", timeout=10)
    if static.status_code == 404:  # the file name differs: take any CSS file
        name = next((Path(__file__).resolve().parents[2] / "static").rglob("*.css"))
        static = http.get(f"{cluster.url}/static/{name.name}?v=abc", timeout=10)
    assert static.status_code == 200
    assert "immutable" in static.headers["Cache-Control"]
    assert "X-Request-Id" not in static.headers, "served by nginx, not a node"
    # A body above PORTAL_MAX_REQUEST_BYTES is refused by nginx from its Content-Length,
    # before anything is read or a node is asked.
    import http.client
    import ssl

    connection = http.client.HTTPSConnection(
        "127.0.0.1", cluster.nginx_port, timeout=10,
        context=ssl.create_default_context(cafile=str(cluster.tls_cert)))
    connection.putrequest("POST", "/dicomweb/studies")
    connection.putheader("Content-Type", 'multipart/related; type="application/dicom"')
    connection.putheader("Content-Length", str(cluster_max_body() + 1))
    connection.endheaders()
    assert connection.getresponse().status == 413
    connection.close()


def cluster_max_body() -> int:
    from tests.support.cluster import MAX_REQUEST_BYTES

    return int(MAX_REQUEST_BYTES)


def test_session_works_on_both_nodes_and_revocation_reaches_the_other(
        cluster: Cluster, app: Flask, study: Study, physician: Physician) -> None:
    node_a, node_b = cluster.nodes
    for node in cluster.nodes:
        listing = requests.get(f"{node.url}/studies", headers=physician.headers(), timeout=30,
                               allow_redirects=False)
        assert listing.status_code == 200, node.name
        assert study.uid in listing.text or "Cluster" in listing.text or listing.text
    made = new_link(app, physician, study)
    assert made.pin is not None
    visitor = https(cluster)
    opened = exchange(visitor, cluster.url, made.token, made.pin)
    assert opened.status_code == 303, opened.text[:300]
    cookie = {"Cookie": f"{SHARE_COOKIE}={share_cookie(opened)}"}
    for node in cluster.nodes:
        assert requests.get(f"{node.url}/studies/{study.uid}", headers=cookie, timeout=30,
                            allow_redirects=False).status_code == 200, node.name
    revoked = requests.post(f"{node_a.url}/shares/{made.link.public_id}/revoke",
                            headers=physician.headers(**{"X-CSRF-Token": physician.csrf}),
                            timeout=30, allow_redirects=False)
    assert revoked.status_code in (302, 303), revoked.text[:300]
    assert link_state(app, made.link.public_id).revoked_at is not None
    started = time.monotonic()

    def refused_on_b() -> bool:
        answer = requests.get(f"{node_b.url}/studies/{study.uid}", headers=cookie,
                              timeout=30, allow_redirects=False)
        return answer.status_code != 200

    assert wait_for(refused_on_b, timeout=10, interval=0.2), "still open on node B after 10 s"
    assert time.monotonic() - started <= 10


def test_kill_a_node_during_stow(cluster: Cluster, app: Flask) -> None:
    study, series = generate_uid(), generate_uid()
    datasets = [make_dataset(study=study, series=series, patient_id="CLUSTER-KILL", rows=256,
                             columns=256, value=i, InstanceNumber=i + 1) for i in range(100)]
    sops = [str(ds.SOPInstanceUID) for ds in datasets]
    before = {n.name: local_files(n) for n in cluster.nodes}
    outcome: dict[str, Any] = {}

    def upload() -> None:
        try:
            outcome["answer"] = dicomweb(cluster).store_instances(datasets=datasets)
        except requests.HTTPError as exc:
            outcome["status"] = exc.response.status_code
        except requests.RequestException as exc:
            outcome["error"] = exc

    sender = threading.Thread(target=upload)
    sender.start()
    victim: Node | None = None
    deadline = time.monotonic() + 120
    while victim is None and time.monotonic() < deadline and sender.is_alive():
        for node in cluster.nodes:
            if len(local_files(node) - before[node.name]) >= 10:
                victim = node
                break
        time.sleep(0.01)
    assert victim is not None, f"the upload finished before a node could be killed: {outcome}"
    cluster.kill_node(victim)
    sender.join(timeout=120)
    survivor = next(n for n in cluster.nodes if n is not victim)
    try:
        # An error, or a full answer: never a success for data that was lost.
        if "answer" in outcome:
            acknowledged = [item.ReferencedSOPInstanceUID
                            for item in outcome["answer"].ReferencedSOPSequence]
            assert sorted(acknowledged) == sorted(sops)
        else:
            assert outcome.get("status", 502) >= 500 or "error" in outcome, outcome
            acknowledged = []
        client = dicomweb(cluster)
        for sop in acknowledged:
            assert client.retrieve_instance(study, series, sop).SOPInstanceUID == sop
        # What the killed node left on its disk is listed, not silently kept (and reaped
        # when the node starts, once 5 minutes old).
        leftovers = local_files(victim) - before[victim.name]
        if not acknowledged:
            assert len(leftovers) >= 10
            verify = cluster.flask("archive", "verify", node=cluster.nodes.index(victim))
            assert verify.returncode == 1, verify.stdout
            listed = [line for line in verify.stdout.splitlines() if "unreferenced" in line]
            assert len(listed) == len(leftovers), verify.stdout[-2000:]
        # The client's retry goes to the other node (nginx marks the dead one failed).
        answer = dicomweb(cluster).store_instances(datasets=datasets)
        assert sorted(i.ReferencedSOPInstanceUID for i in answer.ReferencedSOPSequence) == \
            sorted(sops)
        assert not hasattr(answer, "FailedSOPSequence")
        for sop in sops:
            assert cluster.orthanc_has_instance(sop)
        for sop in sops[::10]:
            retrieved = dicomweb(cluster, survivor.url).retrieve_instance(study, series, sop)
            assert retrieved.SOPInstanceUID == sop
        found = dicomweb(cluster).search_for_instances(
            study_instance_uid=study, search_filters={"SeriesInstanceUID": series})
        assert len(found) == 100
        # The 110104 records count exactly what was kept: nothing for the killed attempt.
        with app.extensions["db"].new_session() as session:
            records = session.scalars(select(AuditEvent).where(
                AuditEvent.event_id == "110104", AuditEvent.study_instance_uid == study)).all()
            assert sum(r.details.get("instances", 0) for r in records) == 100, \
                [r.details for r in records]
    finally:
        cluster.start_node(victim)
    healthy(cluster)


def test_kill_a_node_during_a_share_exchange(cluster: Cluster, app: Flask, study: Study,
                                             physician: Physician) -> None:
    node_a = cluster.nodes[0]
    made = new_link(app, physician, study)
    assert made.pin is not None
    wrong = "0" * len(made.pin) if made.pin != "0" * len(made.pin) else "1" * len(made.pin)
    visitor = https(cluster)
    first = exchange(visitor, cluster.url, made.token, wrong)
    assert first.status_code == 401 and "9 more times" in first.text
    assert link_state(app, made.link.public_id).failed_attempts == 1
    # Node A freezes with the visitor's next attempt in flight, then dies (kill -9).
    node_a_pgid = node_a.process.pid if node_a.process else 0
    import os
    import signal

    os.killpg(node_a_pgid, signal.SIGSTOP)
    outcome: dict[str, Any] = {}

    def attempt() -> None:
        try:
            outcome["answer"] = exchange(https(cluster), node_a.url, made.token, wrong)
        except requests.RequestException as exc:
            outcome["error"] = exc

    inflight = threading.Thread(target=attempt)
    inflight.start()
    time.sleep(0.5)
    cluster.kill_node(node_a)
    inflight.join(timeout=30)
    try:
        assert "error" in outcome, outcome  # the visitor saw the connection fail
        assert link_state(app, made.link.public_id).failed_attempts == 1, \
            "an attempt that was never answered must not count"
        # The visitor retries through nginx: node B answers, counting from where it was.
        second = exchange(visitor, cluster.url, made.token, wrong)
        if second.status_code == 502:
            # nginx may have sent this POST on a kept-alive connection of the dead node
            # before it saw that connection close; it does not resend a POST it has sent
            # (proxy_next_upstream without non_idempotent: a PIN attempt is never replayed).
            # The visitor sees the error page and tries once more.
            time.sleep(1)
            assert link_state(app, made.link.public_id).failed_attempts == 1
            second = exchange(visitor, cluster.url, made.token, wrong)
        assert second.status_code == 401 and "8 more times" in second.text, second.text[:300]
        assert link_state(app, made.link.public_id).failed_attempts == 2
        opened = exchange(visitor, cluster.url, made.token, made.pin)
        assert opened.status_code == 303, opened.text[:300]
        assert link_state(app, made.link.public_id).use_count == 1
    finally:
        cluster.start_node(node_a)
    healthy(cluster)


def test_redis_stopped_and_hung(cluster: Cluster, study: Study, physician: Physician) -> None:
    http = https(cluster)
    http.auth = cluster.client

    def serves(limit_s: float) -> None:
        for base in bases(cluster):
            viewport = f"{secrets.randbelow(200) + 50},{secrets.randbelow(200) + 50}"
            started = time.monotonic()
            image = http.get(base + rendered_path(study.uid, study.series, study.sops[0]),
                             params={"viewport": viewport}, headers={"Accept": "image/jpeg"},
                             timeout=30)
            assert image.status_code == 200, (base, image.text[:200])
            page = requests.get(f"{base}/studies", headers=physician.headers(),
                                verify=str(cluster.tls_cert), timeout=30)
            assert page.status_code == 200, base
            assert time.monotonic() - started < limit_s, base
            ready = http.get(f"{base}/readyz", timeout=30).json()
            assert ready["status"] == "degraded" and ready["checks"]["cache"] == "unavailable"

    cluster.stop_redis()
    try:
        serves(limit_s=5)
    finally:
        cluster.start_redis()
    healthy(cluster)
    cluster.hang_redis()
    try:
        serves(limit_s=10)  # the first calls wait for the timeout, then the breaker opens
        serves(limit_s=2)   # open breaker: Redis is not asked at all
    finally:
        cluster.resume_redis()
    healthy(cluster)


def test_postgres_restarted(cluster: Cluster, study: Study, physician: Physician) -> None:
    pids = [n.process.pid for n in cluster.nodes if n.process]
    cluster.stop_postgres()
    try:
        for base in bases(cluster):
            for path in ("/studies", "/auth/login", f"/studies/{study.uid}"):
                answer = requests.get(base + path, headers=physician.headers(),
                                      verify=str(cluster.tls_cert), timeout=30,
                                      allow_redirects=False)
                assert answer.status_code == 503, (base, path, answer.status_code)
                assert answer.headers.get("Retry-After"), (base, path)
    finally:
        cluster.start_postgres()
    healthy(cluster)
    for base in bases(cluster):
        answer = requests.get(f"{base}/studies/{study.uid}", headers=physician.headers(),
                              verify=str(cluster.tls_cert), timeout=30, allow_redirects=False)
        assert answer.status_code == 200, base
    assert [n.process.pid for n in cluster.nodes if n.process] == pids, "no node restarted"
    # Orthanc's PostgreSQL connection broke too: its first STOW-RS answers 200 with nothing
    # stored. The portal must not acknowledge that upload (503, retry), and every instance
    # it acknowledges is in Orthanc.
    stored: Study | None = None
    refusals = 0
    for _attempt in range(5):
        try:
            stored = stow(cluster, 2, patient="CLUSTER-PG")
            break
        except requests.HTTPError as exc:
            assert exc.response.status_code == 503, exc.response.text[:300]
            assert exc.response.headers.get("Retry-After")
            refusals += 1
    assert stored is not None
    for sop in stored.sops:
        assert cluster.orthanc_has_instance(sop), (sop, refusals)


def test_orthanc_stopped(cluster: Cluster, study: Study, physician: Physician) -> None:
    before = {n.name: local_files(n) for n in cluster.nodes}
    fresh = stow(cluster, 1, patient="CLUSTER-1", study=study.uid, series=generate_uid())
    writer = next(n for n in cluster.nodes if local_files(n) - before[n.name])
    http = https(cluster)
    http.auth = cluster.client
    cluster.stop_orthanc()
    try:
        for node in cluster.nodes:
            durations = []
            for _ in range(6):
                started = time.monotonic()
                image = http.get(node.url + rendered_path(fresh.uid, fresh.series,
                                                         fresh.sops[0]),
                                 params={"viewport": f"{secrets.randbelow(300) + 40},64"},
                                 headers={"Accept": "image/jpeg"}, timeout=30)
                durations.append(time.monotonic() - started)
                if image.status_code == 503:
                    assert image.headers.get("Retry-After")
                else:  # the node that wrote it still has its local copy
                    assert image.status_code == 200 and node is writer, node.name
            assert max(durations[3:]) < 0.5, (node.name, durations)  # the breaker answers
        for base in bases(cluster):
            listing = requests.get(f"{base}/studies", headers=physician.headers(),
                                   verify=str(cluster.tls_cert), timeout=30)
            assert listing.status_code == 200, base
            found = dicomweb(cluster, base).search_for_studies(
                search_filters={"StudyInstanceUID": study.uid})
            assert len(found) == 1
        # An upload cannot be kept where it counts: refused, nothing indexed.
        # (A raw request: dicomweb-client would retry the 503 itself.)
        boundary = secrets.token_hex(8)
        part = to_bytes(make_dataset(patient_id="CLUSTER-DOWN"))
        refused = http.post(
            cluster.url + "/dicomweb/studies", timeout=60,
            data=b"".join((f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n"
                           .encode(), part, f"\r\n--{boundary}--\r\n".encode())),
            headers={"Content-Type": f'multipart/related; type="application/dicom"; '
                                     f"boundary={boundary}",
                     "Accept": "application/dicom+json"})
        assert refused.status_code == 503, refused.text[:300]
        assert refused.headers.get("Retry-After")
        assert not dicomweb(cluster).search_for_studies(
            search_filters={"PatientID": "CLUSTER-DOWN"})
    finally:
        cluster.start_orthanc()
    # The breaker closes again after its reset time; both nodes serve the image.
    seen: list[tuple[str, int, str]] = []

    def served_everywhere() -> bool:
        answers = [(node.name, http.get(
            node.url + rendered_path(fresh.uid, fresh.series, fresh.sops[0]),
            headers={"Accept": "image/jpeg"}, timeout=30)) for node in cluster.nodes]
        seen[:] = [(name, a.status_code, a.text[:120]) for name, a in answers
                   if a.status_code != 200]
        return not seen

    assert wait_for(served_everywhere, timeout=30, interval=1), seen
    healthy(cluster)
