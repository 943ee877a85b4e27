"""STOW-RS answers as PS3.18 says: 200, 202 with reasons, 409, 413, 415; nothing half-stored."""

from __future__ import annotations

import io
import json
import socket
import time
from pathlib import Path

from flask import Flask
from flask.testing import FlaskClient
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from portal.index.models import Instance
from tests.conftest import LiveServer, basic_auth, make_client
from tests.factories import make_instance

BOUNDARY = "test-boundary-1234"


def multipart(*parts: bytes, part_type: str = "application/dicom") -> bytes:
    chunks = []
    for part in parts:
        chunks.append(f"--{BOUNDARY}\r\nContent-Type: {part_type}\r\n\r\n".encode())
        chunks.append(part + b"\r\n")
    chunks.append(f"--{BOUNDARY}--\r\n".encode())
    return b"".join(chunks)


def headers(auth: dict[str, str], part_type: str = "application/dicom") -> dict[str, str]:
    return {**auth, "Content-Type": f'multipart/related; type="{part_type}"; '
                                     f"boundary={BOUNDARY}",
            "Accept": "application/dicom+json"}


def instance_count(app: Flask) -> int:
    with app.extensions["db"].new_session() as session:
        return session.scalar(select(func.count()).select_from(Instance)) or 0


def test_stow_stores_and_answers_200(client: FlaskClient, auth: dict[str, str],
                                     app: Flask) -> None:
    study = generate_uid()
    body = multipart(make_instance(study=study), make_instance(study=study))
    response = client.post("/dicomweb/studies", data=body, headers=headers(auth))
    assert response.status_code == 200, response.data
    payload = response.get_json()
    assert len(payload["00081199"]["Value"]) == 2
    assert payload["00081190"]["Value"][0].endswith(f"/dicomweb/studies/{study}")
    assert "00081198" not in payload
    assert instance_count(app) == 2


def test_one_good_and_one_bad_part_answers_202(client: FlaskClient, auth: dict[str, str],
                                               app: Flask) -> None:
    body = multipart(make_instance(), b"this is not a DICOM file at all" * 10)
    response = client.post("/dicomweb/studies", data=body, headers=headers(auth))
    assert response.status_code == 202
    payload = response.get_json()
    assert len(payload["00081199"]["Value"]) == 1
    [failed] = payload["00081198"]["Value"]
    assert failed["00081197"]["Value"] == [0xC000]
    assert "DICM" in response.headers["Warning"]
    assert instance_count(app) == 1


def test_all_parts_failing_answers_409(client: FlaskClient, auth: dict[str, str],
                                       app: Flask) -> None:
    bad = bytearray(make_instance())
    bad = bad[: len(bad) // 2]
    response = client.post("/dicomweb/studies", data=multipart(bytes(bad)),
                           headers=headers(auth))
    assert response.status_code == 409
    assert response.get_json()["00081198"]["Value"][0]["00081197"]["Value"]
    assert instance_count(app) == 0


def test_conflicting_duplicate_is_a_failed_item(client: FlaskClient, auth: dict[str, str],
                                                app: Flask) -> None:
    sop, study, series = generate_uid(), generate_uid(), generate_uid()
    original = make_instance(sop=sop, study=study, series=series, value=1)
    first = client.post("/dicomweb/studies", headers=headers(auth), data=multipart(original))
    assert first.status_code == 200
    again = client.post("/dicomweb/studies", headers=headers(auth), data=multipart(original))
    assert again.status_code == 200
    assert "already stored" in again.headers["Warning"]
    other = client.post("/dicomweb/studies", headers=headers(auth),
                        data=multipart(make_instance(sop=sop, study=study, series=series,
                                                     value=9)))
    assert other.status_code == 409
    item = other.get_json()["00081198"]["Value"][0]
    assert item["00081155"]["Value"] == [sop]
    assert item["00081197"]["Value"] == [0x0111]
    assert instance_count(app) == 1


def test_study_in_url_must_match(client: FlaskClient, auth: dict[str, str], app: Flask) -> None:
    url_study = generate_uid()
    body = multipart(make_instance(study=url_study), make_instance(study=generate_uid()))
    response = client.post(f"/dicomweb/studies/{url_study}", data=body, headers=headers(auth))
    assert response.status_code == 202
    assert response.get_json()["00081198"]["Value"][0]["00081197"]["Value"] == [0xA900]
    assert instance_count(app) == 1


def test_wrong_media_types_answer_415(client: FlaskClient, auth: dict[str, str]) -> None:
    body = multipart(b"{}", part_type="application/dicom+json")
    response = client.post("/dicomweb/studies", data=body,
                           headers=headers(auth, "application/dicom+json"))
    assert response.status_code == 415
    plain = client.post("/dicomweb/studies", data=make_instance(),
                        headers={**auth, "Content-Type": "application/dicom"})
    assert plain.status_code == 415
    gz = client.post("/dicomweb/studies", data=multipart(make_instance()),
                     headers={**headers(auth), "Content-Encoding": "gzip"})
    assert gz.status_code == 415
    assert "error" in gz.get_json()


def test_malformed_multipart_answers_400(client: FlaskClient, auth: dict[str, str]) -> None:
    response = client.post("/dicomweb/studies", data=b"--other\r\n\r\nxx",
                           headers=headers(auth))
    assert response.status_code == 400


def test_storing_needs_credentials_and_the_store_right(client: FlaskClient, app: Flask) -> None:
    body = multipart(make_instance())
    anonymous = client.post("/dicomweb/studies", data=body, headers=headers({}))
    assert anonymous.status_code == 401
    assert anonymous.headers["WWW-Authenticate"].lower().startswith("basic")
    wrong = client.post("/dicomweb/studies", data=body,
                        headers=headers(basic_auth("tester", "not-the-secret")))
    assert wrong.status_code == 401
    reader = basic_auth(*make_client(app, "reader", can_store=False))
    refused = client.post("/dicomweb/studies", data=body, headers=headers(reader))
    assert refused.status_code == 403
    assert instance_count(app) == 0


def test_a_five_gigabyte_request_is_refused_at_once(live_server: LiveServer,
                                                    auth: dict[str, str]) -> None:
    with socket.create_connection(("127.0.0.1", live_server.port), timeout=5) as sock:
        started = time.monotonic()
        request = (f"POST /dicomweb/studies HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                   f"Authorization: {auth['Authorization']}\r\n"
                   f'Content-Type: multipart/related; type="application/dicom"; '
                   f"boundary={BOUNDARY}\r\nContent-Length: 5000000000\r\n\r\n")
        sock.sendall(request.encode() + b"--" + BOUNDARY.encode())
        answer = sock.recv(4096).decode("latin-1")
        assert time.monotonic() - started < 1.0
    assert answer.startswith("HTTP/1.1 413")


def test_database_down_answers_503_and_a_retry_succeeds(tmp_path: object, postgres: object
                                                        ) -> None:
    """A real outage: PostgreSQL refuses connections; STOW answers 503 and stores nothing."""
    import psycopg

    from tests.conftest import make_app

    url = postgres.new_database()  # type: ignore[attr-defined]
    app = make_app(tmp_path / "instance", url)  # type: ignore[operator]
    name = url.rsplit("/", 1)[1]
    admin = f"host=127.0.0.1 port={postgres.port} user=portal dbname=postgres"  # type: ignore[attr-defined]
    auth = basic_auth(*make_client(app, "sender"))
    client = app.test_client()
    app.extensions["db"].dispose()
    data = make_instance()

    def allow(allowed: bool) -> None:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {str(allowed).lower()}')
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                         "WHERE datname = %s", (name,))

    # With the database gone even the credential check fails: the answer must be a 503 the
    # sender retries (fail closed), never a success and never a stored file.
    allow(False)
    try:
        response = client.post("/dicomweb/studies", data=multipart(data), headers=headers(auth))
        assert response.status_code == 503
        assert response.headers["Retry-After"]
    finally:
        allow(True)
    assert not list(app.extensions["archive"].store.objects.rglob("*.dcm"))
    app.extensions["db"].dispose()
    retry = client.post("/dicomweb/studies", data=multipart(data), headers=headers(auth))
    assert retry.status_code == 200
    assert instance_count(app) == 1
    assert len(list(app.extensions["archive"].store.objects.rglob("*.dcm"))) == 1


def test_under_gunicorn_a_large_upload_is_read_whole_and_a_short_one_is_a_400(
        tmp_path: Path) -> None:
    """Under the real server a many-part upload arrives whole, byte for byte; one whose
    sender stops before its Content-Length gets a 400 and stores nothing."""
    import http.client

    import pydicom

    from tests.support.gunicorn import served

    study = generate_uid()
    files = [make_instance(study=study, rows=256, columns=256, value=n) for n in range(12)]
    with served(tmp_path / "instance", "stower", read=True) as server:
        auth = basic_auth(server.client, server.secret)
        body = multipart(*files)
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
            request = (f"POST /dicomweb/studies HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                       f"Authorization: {auth['Authorization']}\r\n"
                       f'Content-Type: multipart/related; type="application/dicom"; '
                       f"boundary={BOUNDARY}\r\nContent-Length: {len(body)}\r\n"
                       f"Connection: close\r\n\r\n")
            sock.sendall(request.encode() + body[:len(body) // 2])
            sock.shutdown(socket.SHUT_WR)  # the sender gives up half way
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        connection.request("GET", f"/dicomweb/studies/{study}/instances",
                           headers={**auth, "Accept": "application/dicom+json"})
        empty = connection.getresponse()
        assert empty.status == 404, empty.status  # no instance of the study was kept
        empty.read()
        connection.request("POST", "/dicomweb/studies", body=body,
                           headers={**headers(auth)})
        stored = connection.getresponse()
        assert stored.status == 200, stored.read()[:300]
        assert len(json.loads(stored.read())["00081199"]["Value"]) == len(files)
        sop = pydicom.dcmread(io.BytesIO(files[7]), stop_before_pixels=True).SOPInstanceUID
        connection.request("GET", f"/dicomweb/studies/{study}/series/"
                           f"{pydicom.dcmread(io.BytesIO(files[7])).SeriesInstanceUID}"
                           f"/instances/{sop}",
                           headers={**auth, "Accept": 'multipart/related; '
                                    'type="application/dicom"; transfer-syntax=*'})
        back = connection.getresponse()
        assert back.status == 200
        assert files[7] in back.read()  # the instance as it was sent
        connection.close()
