"""gunicorn's access line (portal/gunicorn_config.py, AccessLogger and JsonLogger): one line per
request with the address, time, method, path without its query, status, bytes, duration and
request id, in text and as JSON, under the real server."""

from __future__ import annotations

import http.client
import json
import re
from pathlib import Path

from tests.conftest import basic_auth
from tests.support.gunicorn import served

_TEXT = re.compile(r'127\.0\.0\.1 \[\d\d/[A-Z][a-z]{2}/\d{4}:\d\d:\d\d:\d\d [+-]\d{4}\] '
                   r'"(GET|POST) (/[^ "?]*)" (\d{3}) (\d+) (\d+)ms ([0-9a-f]{32})')


def _get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    connection.request("GET", path, headers=headers or {})
    answer = connection.getresponse()
    body = answer.read()
    request_id = answer.getheader("X-Request-Id") or ""
    connection.close()
    assert len(body) == int(answer.getheader("Content-Length") or len(body))
    return answer.status, request_id


def test_the_text_access_line_shows_the_fields_and_never_the_query(tmp_path: Path) -> None:
    log = tmp_path / "gunicorn.log"
    with served(tmp_path / "instance", "logger", log=log) as server:
        status, healthz_id = _get(server.port, "/healthz?token=do-not-log-me")
        assert status == 200
        status, refused_id = _get(server.port, "/dicomweb/studies?PatientName=Secret",
                                  basic_auth(server.client, "not-the-secret"))
        assert status == 401
    text = log.read_text()
    assert "do-not-log-me" not in text and "Secret" not in text
    lines = {m.group(6): m for m in map(_TEXT.match, text.splitlines()) if m}
    healthz, refused = lines[healthz_id], lines[refused_id]
    assert healthz.group(1, 2, 3) == ("GET", "/healthz", "200")
    assert int(healthz.group(4)) > 0
    assert refused.group(1, 2, 3) == ("GET", "/dicomweb/studies", "401")


def test_the_json_access_line_has_the_same_fields(tmp_path: Path) -> None:
    log = tmp_path / "gunicorn.log"
    with served(tmp_path / "instance", "logger", log=log, LOG_FORMAT="json") as server:
        status, request_id = _get(server.port, "/readyz?token=do-not-log-me")
        assert status == 200
    assert "do-not-log-me" not in log.read_text()
    records = [json.loads(line) for line in log.read_text().splitlines()
               if line.startswith("{")]
    [fields] = [r for r in records if r.get("request_id") == request_id and "duration_ms" in r]
    assert fields["remote"] == "127.0.0.1"
    assert (fields["method"], fields["path"], str(fields["status"])) == ("GET", "/readyz", "200")
    assert fields["bytes"] > 0 and fields["duration_ms"] >= 0
