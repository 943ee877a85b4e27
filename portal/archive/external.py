"""A client for an external DICOMweb archive (Orthanc, dcm4chee, a cloud DICOM store).

Every request is a GET (idempotent, so retried after network errors), bounded by a connect
timeout and a total deadline that also covers reading the body, limited in size, and guarded by
a circuit breaker. Failures surface as ``ExternalUnavailable`` (an ``ArchiveUnavailable``: the
error handler answers 503 with ``Retry-After``).

Authentication: HTTP Basic, a static Bearer token, or OAuth 2.0 client credentials (RFC 6749
4.4; the token is cached until shortly before it expires and fetched again after a 401).

Query strings are written by hand: Orthanc 1.10's DICOMweb plugin does not decode
percent-encoded values (``StudyInstanceUID=a%2Cb`` is one odd UID to it, and ``Doe%2A`` no
wildcard), so the characters QIDO-RS gives meaning to (``,*?^-``) travel raw and only
characters that would break the URL are encoded.
"""

from __future__ import annotations

import base64
import json
import logging
import secrets
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

import requests
from werkzeug.http import parse_options_header

from portal import failures
from portal.archive.store import ArchiveUnavailable
from portal.breaker import BreakerOpen, CircuitBreaker
from portal.log import RequestIdAdapter
from portal.metrics import breaker_observer

log = logging.getLogger(__name__)

DICOM_JSON = "application/dicom+json"
_JSON_LIMIT = 256 << 20
# Characters sent raw in query values (RFC 3986 unreserved + QIDO-RS syntax that Orthanc
# would otherwise not understand).
_RAW = "-._~*,?^:@!$'()/"
_RETRY_STATUSES = frozenset({502, 503, 504})
_BACKOFF = 0.2


class ExternalUnavailable(ArchiveUnavailable):
    """The external archive cannot answer now (down, slow, refusing us, or circuit open)."""

    def __init__(self, reason: str, retry_after: float = 5.0) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


class ExternalNotFound(failures.NotFound):
    """The external archive does not have what was asked for (404)."""


class _Timeout(Exception):
    pass


@dataclass(frozen=True)
class ExternalSettings:
    """Where the archive is, how to authenticate, and the bounds of each request."""

    url: str
    auth: str = "none"
    username: str | None = None
    password: str | None = None
    token: str | None = None
    token_url: str | None = None
    client_id: str | None = None
    client_secret: str | None = None
    scope: str | None = None
    connect_timeout: float = 3.0
    timeout: float = 20.0
    retries: int = 2
    breaker_failures: int = 5
    breaker_reset: float = 30.0

    @classmethod
    def from_config(cls, settings: Mapping[str, Any]) -> ExternalSettings:
        """The settings of ``PORTAL_ARCHIVE_*``; the auth type defaults to what is set."""
        auth = settings["ARCHIVE_AUTH"].strip().lower()
        if not auth:
            auth = ("oauth" if settings["ARCHIVE_TOKEN_URL"] else
                    "bearer" if settings["ARCHIVE_TOKEN"] else
                    "basic" if settings["ARCHIVE_USERNAME"] else "none")
        return cls(url=settings["ARCHIVE_URL"].rstrip("/"), auth=auth,
                   username=settings["ARCHIVE_USERNAME"],
                   password=settings["ARCHIVE_PASSWORD"], token=settings["ARCHIVE_TOKEN"],
                   token_url=settings["ARCHIVE_TOKEN_URL"],
                   client_id=settings["ARCHIVE_CLIENT_ID"],
                   client_secret=settings["ARCHIVE_CLIENT_SECRET"],
                   scope=settings["ARCHIVE_SCOPE"],
                   connect_timeout=settings["ARCHIVE_CONNECT_TIMEOUT_SECONDS"],
                   timeout=settings["ARCHIVE_TIMEOUT_SECONDS"],
                   retries=settings["ARCHIVE_RETRIES"],
                   breaker_failures=settings["ARCHIVE_BREAKER_FAILURES"],
                   breaker_reset=settings["ARCHIVE_BREAKER_RESET_SECONDS"])


def query_string(params: Mapping[str, str | int]) -> str:
    """``key=value&...`` with QIDO-RS syntax left raw (see the module docstring)."""
    return "&".join(f"{quote(str(key), safe=_RAW)}={quote(str(value), safe=_RAW)}"
                    for key, value in params.items())


def source_name(url: str) -> str:
    """The archive's URL without credentials, as it appears in logs and sync state."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}".rstrip("/")[:256]


class DicomWebArchive:
    """QIDO-RS and WADO-RS against one external archive, bounded and behind a breaker."""

    def __init__(self, settings: ExternalSettings) -> None:
        self.settings = settings
        self.source = source_name(settings.url)
        self.breaker = CircuitBreaker(settings.breaker_failures, settings.breaker_reset,
                                      on_change=breaker_observer("archive"))
        self._http = requests.Session()
        self._http.trust_env = False  # no proxies or .netrc from the environment
        # Every request carries the request id of what caused it (portal/log.py).
        adapter = RequestIdAdapter(pool_connections=4, pool_maxsize=32, max_retries=0)
        self._http.mount("http://", adapter)
        self._http.mount("https://", adapter)
        self._token: tuple[str, float] | None = None
        self._token_lock = threading.Lock()

    def close(self) -> None:
        """Close pooled connections."""
        self._http.close()

    # -- the operations ----------------------------------------------------------------------

    def search_studies(self, filters: Mapping[str, str], *, limit: int,
                       offset: int = 0) -> list[dict[str, Any]]:
        """QIDO-RS ``/studies`` with ``filters`` (DICOM keywords or tags), one page."""
        params: dict[str, str | int] = {**filters, "limit": limit, "offset": offset}
        return self._json(f"/studies?{query_string(params)}")

    def study_metadata(self, study_uid: str) -> list[dict[str, Any]]:
        """WADO-RS metadata of every instance of a study (DICOM JSON, PS3.18 F.2)."""
        return self._json(f"/studies/{quote(study_uid, safe='')}/metadata")

    def retrieve_instance(self, study_uid: str, series_uid: str, sop_instance_uid: str,
                          max_bytes: int) -> bytes:
        """WADO-RS one instance as stored (``transfer-syntax=*``): its Part 10 bytes."""
        path = "/studies/{}/series/{}/instances/{}".format(
            *(quote(uid, safe="") for uid in (study_uid, series_uid, sop_instance_uid)))
        accept = 'multipart/related; type="application/dicom"; transfer-syntax=*'
        content_type, body = self._get(path, accept, max_bytes + 64 * 1024)
        return _single_dicom_part(content_type, body)

    def ping(self) -> None:
        """A minimal QIDO-RS request: raise ``ExternalUnavailable`` unless it answers."""
        self._json("/studies?limit=1")

    def store(self, data: bytes, sop_instance_uid: str) -> None:
        """STOW-RS one Part 10 file (a cluster's write-through, docs/cluster.md): returns
        once the archive has acknowledged it, raises ``ExternalUnavailable`` otherwise.

        Acknowledged means listed in the answer's Referenced SOP Sequence: Orthanc 1.10
        answers 200 with an empty one when its database connection was lost (after a
        PostgreSQL restart), having stored nothing. Sent once, through the breaker, never
        retried here (the caller's client retries the whole upload; storing the same
        instance twice is harmless)."""
        try:
            self.breaker.before_call()
        except BreakerOpen as exc:
            raise ExternalUnavailable("the image archive is temporarily unavailable",
                                      exc.retry_after) from exc
        boundary = secrets.token_hex(16)
        body = b"".join((f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode(),
                         data, f"\r\n--{boundary}--\r\n".encode()))
        settings = self.settings
        deadline = time.monotonic() + settings.timeout
        headers = {"Accept": DICOM_JSON, **self._authorization(deadline),
                   "Content-Type": f'multipart/related; type="application/dicom"; '
                                   f"boundary={boundary}"}
        try:
            response = self._http.post(settings.url + "/studies", data=body, headers=headers,
                                       allow_redirects=False,
                                       timeout=(settings.connect_timeout, settings.timeout))
            status, answer = response.status_code, response.content[:1 << 20]
            response.close()
        except requests.RequestException as exc:
            self.breaker.failed(exc.__class__.__name__)
            raise ExternalUnavailable(
                f"the image archive cannot be reached ({exc.__class__.__name__})") from None
        if status != 200:  # 202 (some failed) or 409 for one instance: not stored
            if status >= 500:
                self.breaker.failed(f"HTTP {status}")
            else:
                self.breaker.succeeded()  # it answered; it refused this one instance
            raise ExternalUnavailable(f"the image archive did not store an instance "
                                      f"(HTTP {status})")
        if not _acknowledged(answer, sop_instance_uid):
            self.breaker.failed("store not acknowledged")
            raise ExternalUnavailable("the image archive did not confirm it stored an instance")
        self.breaker.succeeded()

    # -- plumbing ----------------------------------------------------------------------------

    def _json(self, path: str) -> list[dict[str, Any]]:
        _content_type, body = self._get(path, DICOM_JSON, _JSON_LIMIT)
        if not body.strip():
            return []  # 204 No Content: nothing matched
        try:
            payload = json.loads(body)
        except ValueError as exc:
            raise ExternalUnavailable("the external archive sent malformed JSON") from exc
        if not isinstance(payload, list) or not all(isinstance(i, dict) for i in payload):
            raise ExternalUnavailable("the external archive sent unexpected JSON")
        return payload

    def _get(self, path: str, accept: str, max_bytes: int) -> tuple[str, bytes]:
        """GET through the breaker, with retries and a total deadline; (content type, body)."""
        try:
            self.breaker.before_call()
        except BreakerOpen as exc:
            raise ExternalUnavailable("the image archive is temporarily unavailable",
                                      exc.retry_after) from exc
        try:
            result = self._get_with_retries(path, accept, max_bytes)
        except ExternalNotFound:
            self.breaker.succeeded()  # the archive answered; it just has no such thing
            raise
        except ExternalUnavailable as exc:
            self.breaker.failed(str(exc)[:80])
            log.warning("external archive: %s", exc)
            raise
        self.breaker.succeeded()
        return result

    def _get_with_retries(self, path: str, accept: str, max_bytes: int) -> tuple[str, bytes]:
        settings = self.settings
        deadline = time.monotonic() + settings.timeout
        url = settings.url + path
        reauthenticated = False
        attempt = 0
        while True:
            headers = {"Accept": accept, "Accept-Encoding": "identity",
                       **self._authorization(deadline)}
            try:
                status, content_type, body = self._attempt(url, headers, deadline, max_bytes)
            except _Timeout:
                raise ExternalUnavailable("the image archive did not answer in time") from None
            except requests.RequestException as exc:
                if attempt < settings.retries and self._pause(attempt, deadline):
                    attempt += 1
                    continue
                raise ExternalUnavailable(
                    f"the image archive cannot be reached ({exc.__class__.__name__})") from None
            if status == 200:
                return content_type, body
            if status == 204:
                return content_type, b""
            if status == 404:
                raise ExternalNotFound(path)
            if status == 401 and settings.auth == "oauth" and not reauthenticated:
                with self._token_lock:
                    self._token = None  # expired or revoked early: ask for a new one once
                reauthenticated = True
                continue
            if status in _RETRY_STATUSES and attempt < settings.retries and \
                    self._pause(attempt, deadline):
                attempt += 1
                continue
            raise ExternalUnavailable(f"the image archive answered HTTP {status}")

    @staticmethod
    def _pause(attempt: int, deadline: float) -> bool:
        """Back off before a retry if the deadline leaves room for it."""
        delay = _BACKOFF * (2 ** attempt)
        if time.monotonic() + delay >= deadline:
            return False
        time.sleep(delay)
        return True

    def _attempt(self, url: str, headers: dict[str, str], deadline: float,
                 max_bytes: int) -> tuple[int, str, bytes]:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _Timeout
        response = self._http.get(
            url, headers=headers, stream=True, allow_redirects=False,
            timeout=(min(self.settings.connect_timeout, remaining), remaining))
        with response:
            content_type = response.headers.get("Content-Type", "")
            if response.status_code != 200:
                return response.status_code, content_type, b""
            declared = response.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > max_bytes:
                raise ExternalUnavailable("the image archive sent more than the size limit")
            chunks: list[bytes] = []
            total = 0
            # read1 returns what one read gives, so a server dripping bytes meets the deadline
            # after at most one read timeout, not after a whole chunk.
            try:
                while True:
                    if time.monotonic() > deadline:
                        raise _Timeout
                    chunk = response.raw.read1(256 * 1024)
                    if not chunk:
                        break
                    total += len(chunk)
                    if total > max_bytes:
                        raise ExternalUnavailable(
                            "the image archive sent more than the size limit")
                    chunks.append(chunk)
            except (TimeoutError, requests.exceptions.ReadTimeout) as exc:
                raise _Timeout from exc
            except Exception as exc:
                if exc.__class__.__name__ in ("ReadTimeoutError", "TimeoutError"):
                    raise _Timeout from exc
                if isinstance(exc, (ExternalUnavailable, _Timeout)):
                    raise
                raise requests.ConnectionError(str(exc)) from exc
            return 200, content_type, b"".join(chunks)

    def _authorization(self, deadline: float) -> dict[str, str]:
        settings = self.settings
        if settings.auth == "basic":
            pair = f"{settings.username or ''}:{settings.password or ''}".encode()
            return {"Authorization": f"Basic {base64.b64encode(pair).decode()}"}
        if settings.auth == "bearer":
            return {"Authorization": f"Bearer {settings.token}"}
        if settings.auth == "oauth":
            return {"Authorization": f"Bearer {self._oauth_token(deadline)}"}
        return {}

    def _oauth_token(self, deadline: float) -> str:
        """A client-credentials access token, cached until 30 s before it expires."""
        with self._token_lock:
            if self._token is not None and self._token[1] > time.monotonic():
                return self._token[0]
            settings = self.settings
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ExternalUnavailable("the archive's token endpoint did not answer in time")
            form = {"grant_type": "client_credentials"}
            if settings.scope:
                form["scope"] = settings.scope
            try:
                response = self._http.post(
                    settings.token_url or "", data=form, allow_redirects=False,
                    auth=(settings.client_id or "", settings.client_secret or ""),
                    timeout=(min(settings.connect_timeout, remaining), remaining))
                payload = response.json() if response.status_code == 200 else {}
            except (requests.RequestException, ValueError) as exc:
                raise ExternalUnavailable(
                    f"the archive's token endpoint failed ({exc.__class__.__name__})") from None
            token = payload.get("access_token") if isinstance(payload, dict) else None
            if not isinstance(token, str) or not token:
                raise ExternalUnavailable(
                    f"the archive's token endpoint refused us (HTTP {response.status_code})")
            lifetime = payload.get("expires_in", 300)
            lifetime = float(lifetime) if isinstance(lifetime, int | float | str) and \
                str(lifetime).replace(".", "", 1).isdigit() else 300.0
            self._token = (token, time.monotonic() + max(0.0, lifetime - 30))
            return token


def _acknowledged(answer: bytes, sop_instance_uid: str) -> bool:
    """Whether a STOW-RS answer (DICOM JSON) lists this instance as stored, not as failed."""
    try:
        payload = json.loads(answer)
    except ValueError:
        return False
    if not isinstance(payload, dict):
        return False

    def uids(tag: str) -> set[str]:
        items = (payload.get(tag) or {}).get("Value") or []
        return {str(((item or {}).get("00081155") or {}).get("Value", [""])[0])
                for item in items if isinstance(item, dict)}

    return sop_instance_uid in uids("00081199") and sop_instance_uid not in uids("00081198")


def _single_dicom_part(content_type: str, body: bytes) -> bytes:
    """The one application/dicom part of a WADO-RS answer (or a bare application/dicom)."""
    from portal.multipart import MultipartError, split_parts

    mimetype, params = parse_options_header(content_type)
    if mimetype.lower() == "application/dicom":
        return body
    if mimetype.lower() != "multipart/related":
        raise ExternalUnavailable("the image archive answered with an unexpected media type")
    try:
        parts = split_parts(body, params.get("boundary", ""), max_parts=2)
    except MultipartError as exc:
        raise ExternalUnavailable("the image archive sent a malformed multipart body") from exc
    dicom = [p for p in parts if p.content_type in ("application/dicom", "")]
    if len(parts) != 1 or len(dicom) != 1:
        raise ExternalUnavailable("the image archive sent other than exactly one instance")
    return bytes(dicom[0].payload)
