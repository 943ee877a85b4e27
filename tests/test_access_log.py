"""gunicorn's access line (portal/gunicorn_config.py, AccessLogger and JsonLogger): one line per
request with the address, time, method, path without its query, status, bytes, duration and
request id, in text and as JSON, under the real server."""

from __future__ import annotations

import datetime
import http.client
import json
import re
from pathlib import Path

import pytest

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


class _Written:
    """Stands in for the access log: what it is handed, formatted as logging would."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def info(self, message: str, *args: object, **_extra: object) -> None:
        self.lines.append(message % (args[0] if len(args) == 1 else args))


class _Response:
    def __init__(self, status: str, sent: int | None, headers: list[tuple[str, str]]) -> None:
        self.status, self.sent, self.headers = status, sent, headers


@pytest.mark.parametrize(("path", "sent", "headers"), [
    ("/healthz", 2, [("X-Request-Id", "0" * 32)]),
    ('/x" 200 1 0ms forged', 10, [("x-request-id", "a" * 32)]),  # a decoded %22
    ("/no-id", None, []),
])
def test_the_access_line_is_gunicorns_own(path: str, sent: int | None,
                                          headers: list[tuple[str, str]], tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """AccessLogger writes, field for field and quote for quote, what gunicorn's Logger
    writes with the portal's format."""
    from gunicorn.config import Config
    from gunicorn.glogging import Logger

    # Importing the settings module sets the metrics folder for a gunicorn server in the
    # environment; here it must not outlive the test (the metrics tests read it).
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "metrics"))
    from portal import gunicorn_config

    lines = []
    for kind in (Logger, gunicorn_config.AccessLogger):
        cfg = Config()
        cfg.set("accesslog", "-")
        cfg.set("access_log_format", gunicorn_config.access_log_format)
        logger = kind(cfg)
        written = _Written()
        logger.access_log = written
        environ = {"REMOTE_ADDR": "127.0.0.1", "REQUEST_METHOD": "GET", "PATH_INFO": path,
                   "RAW_URI": path + "?secret=1", "QUERY_STRING": "secret=1",
                   "SERVER_PROTOCOL": "HTTP/1.1"}
        request = type("Request", (), {"headers": [("HOST", "127.0.0.1")]})()
        logger.access(_Response("200 OK", sent, headers), request, environ,
                      datetime.timedelta(seconds=1, microseconds=2500))
        [line] = written.lines
        lines.append(line)
    # The time field may tick between the two lines; the rest is the same.
    ours, theirs = (re.sub(r"\[[^]]*\]", "[t]", line, count=1) for line in lines[::-1])
    assert ours == theirs
    assert "secret" not in ours and ours.startswith('127.0.0.1 [t] "GET ')
