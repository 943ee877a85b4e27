"""The front door for signed rendered frames: a cached image without Flask, the session
loader or a query (issue 17; docs/architecture.md "The path of an image" ⑤ and ⑥).

``GET /dicomweb/studies/{st}/series/{se}/instances/{sop}/frames/{n}/rendered?...&t=TOKEN``
(the URLs the viewer page hands out, ``portal/imaging/signed.py``) is looked at here, in a
WSGI middleware in front of the app:

1. a token that is malformed, expired, or made for other session cookies or another image is
   a 403 with its reason and no image (docs/security.md 12: every request authorised);
2. the session behind the cookies must have been let through by the full path for this
   study within the last few seconds (``alive_seconds``, so sign-out, a revoked share link
   or a grant taken away stop the fast answers within 10 s together with the share link's
   own state cache, ``SHARE_STATE_CACHE_SECONDS``); otherwise the request goes to the app
   unchanged, which authenticates, asks access, records the study read (its durable audit
   record before any byte leaves, docs/security.md 40) and renders; its 200 or 304 renews
   the session's pass for that study;
3. the rendition is parsed exactly as the route parses it (``rendition_from``), the ETag is
   the route's (``RenderedImage.etag``), and the bytes come from the render cache; a miss,
   or anything the route would refuse, goes to the app.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

from werkzeug.http import parse_cookie, parse_etags

from portal.archive.store import StoredFile
from portal.dicomweb.accept import parse_accept
from portal.failures import PortalError
from portal.imaging.rendition import FORMATS, InvalidRendition, Rendition, parse_rendition
from portal.imaging.signed import QUERY_PARAM, BadToken, Signer
from portal.metrics import CACHE_REQUESTS, REQUEST_SECONDS
from portal.monitoring import STARTED

if TYPE_CHECKING:
    from flask import Flask

    from portal.imaging.cache import RenderCache

log = logging.getLogger(__name__)

StartResponse = Callable[..., Any]
WsgiApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]

_FRAME = re.compile(r"/dicomweb/studies/([^/]+)/series/([^/]+)/instances/([^/]+)"
                    r"/frames/([1-9][0-9]{0,5})/rendered")
# An instance's or a frame's rendered resource, as the routes name them.
_RENDERED = re.compile(r"/dicomweb/studies/([^/]+)/series/([^/]+)/instances/([^/]+)"
                       r"(?:/frames/([1-9][0-9]{0,5}))?/rendered")
READER_ENVIRON = "portal.reader"  # the WSGI environ key the rendered routes set
# What the app's answer hooks put on an image (portal/security.py), kept the same here.
_IMAGE_HEADERS = [
    ("Cache-Control", "private, max-age=86400"), ("Vary", "Accept, Accept-Encoding"),
    ("X-Content-Type-Options", "nosniff"), ("Referrer-Policy", "no-referrer"),
    ("Cross-Origin-Opener-Policy", "same-origin"),
    ("Cross-Origin-Resource-Policy", "same-origin"), ("X-Frame-Options", "DENY"),
]
_MAX_PASSES = 50_000


def rendition_from(args: Mapping[str, str], accept: str, *, thumbnail: bool) -> Rendition | None:
    """The rendition a rendered request asks for (PS3.18 8.3.5.1); None when its Accept
    allows no image type the portal makes (406), InvalidRendition when a parameter is outside
    the allow-list (400). The route and the front door both use it, so both name the same
    cached bytes."""
    ranges = parse_accept(accept)
    # A multipart Accept names the image type in its "type" parameter.
    offered = [r.part_type or ("image/jpeg" if r.media_type.startswith("multipart/")
                               else r.media_type) for r in ranges]
    if ranges and not any(media in FORMATS for media in offered):
        return None
    return parse_rendition(args, ",".join(offered), thumbnail=thumbnail)


@dataclass(frozen=True)
class _Checked:
    """What a request with a good token names: the holder's pass key, the token's expiry,
    the cache key, media type and ETag of the image."""

    holder: tuple[bytes, str]
    expires: int
    key: str
    media_type: str
    etag: str


@dataclass(frozen=True)
class ReaderPass:
    """What the full path found for a reader's rendered request: the instance's stored file
    and its number of frames (set in the WSGI environ by the rendered routes)."""

    stored: StoredFile
    frames: int


@dataclass(frozen=True)
class _Known:
    """A known reader's pass for one instance: its file, frames, and until when it counts."""

    reader: ReaderPass
    until: float


class SignedRenditions:
    """WSGI middleware answering signed rendered frames from the render cache, and rendered
    images of an instance a machine client (HTTP Basic) was let through to moments ago."""

    def __init__(self, inner: WsgiApp, app: Flask, signer: Signer,
                 alive_seconds: float) -> None:
        self.inner = inner
        self.app = app
        self.signer = signer
        self.alive_seconds = alive_seconds
        # (the cookies' digest, study UID) -> until when the full path's last answer counts.
        self._passes: dict[tuple[bytes, str], float] = {}
        # (path, query, Cookie, Accept) of a request whose token was good -> what it named,
        # so a repeated request skips parsing and the HMAC (until the token expires).
        self._known: dict[tuple[str, str, str, str], _Checked] = {}
        # (the credentials' digest, study, series, instance) -> the full path's last pass.
        self._readers: dict[tuple[bytes, str, str, str], _Known] = {}
        self._lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: StartResponse
                 ) -> Iterable[bytes]:
        return self._route(environ, _observed(environ, start_response, time.perf_counter()))

    def _route(self, environ: dict[str, Any], start_response: StartResponse
               ) -> Iterable[bytes]:
        query = environ.get("QUERY_STRING", "")
        if environ.get("REQUEST_METHOD") == "GET" and \
                environ.get("HTTP_AUTHORIZATION", "")[:6].lower() == "basic ":
            return self._reader(environ, start_response)
        if environ.get("REQUEST_METHOD") != "GET" or f"{QUERY_PARAM}=" not in query \
                or "HTTP_AUTHORIZATION" in environ:  # tokens are for cookie sessions only
            return self.inner(environ, start_response)
        path = environ.get("PATH_INFO", "")
        memo = (path, query, environ.get("HTTP_COOKIE", ""), environ.get("HTTP_ACCEPT", ""))
        known = self._known.get(memo)
        if known is not None and known.expires > time.time():
            return self._answer(known, environ, start_response)  # checked before: as then
        found = _FRAME.fullmatch(path)
        if found is None:
            return self.inner(environ, start_response)
        args = dict(parse_qsl(query, keep_blank_values=True))
        token = args.pop(QUERY_PARAM, "")
        if not token:
            return self.inner(environ, start_response)
        study, series, instance, frame = found.groups()
        identity = self.signer.identity(parse_cookie(environ))
        if identity is None:  # signed out: the app says so (401) as for any image
            return self.inner(environ, start_response)
        try:
            sha256 = self.signer.verify(identity, study, series, instance, token, time.time())
        except BadToken as exc:
            return _refuse(start_response, str(exc))
        try:
            rendition = rendition_from(args, environ.get("HTTP_ACCEPT", ""), thumbnail=False)
        except InvalidRendition:
            rendition = None
        if rendition is None:
            return self.inner(environ, start_response)  # its 400 or 406, with the reason
        key = rendition.cache_key(sha256, int(frame))
        known = _Checked(
            holder=(hashlib.sha256(identity.encode("utf-8", "replace")).digest(), study),
            expires=int(token.partition(".")[0]), key=key, media_type=rendition.media_type,
            etag=hashlib.sha256(key.encode()).hexdigest()[:32])  # RenderedImage.etag
        if len(self._known) >= _MAX_PASSES:
            self._known.clear()
        self._known[memo] = known
        return self._answer(known, environ, start_response)

    def _answer(self, known: _Checked, environ: dict[str, Any],
                start_response: StartResponse) -> Iterable[bytes]:
        """A request whose token was good: the full path unless the session's pass for the
        study is fresh, else 304 on a matching ETag, the cached bytes, or the full path."""
        if self._passes.get(known.holder, 0.0) <= time.monotonic():
            return self._full_path(environ, start_response, known.holder)
        return self._cached(known.key, known.etag, known.media_type, environ, start_response,
                            lambda: self.inner(environ, start_response))  # renders, keeps

    def _cached(self, key: str, etag: str, media_type: str, environ: dict[str, Any],
                start_response: StartResponse, otherwise: Callable[[], Iterable[bytes]]
                ) -> Iterable[bytes]:
        """304 on a matching ETag, the render cache's bytes of ``key``, or ``otherwise()``
        (the app) when the cache does not have them."""
        headers = [*_IMAGE_HEADERS, ("ETag", f'"{etag}"')]
        if parse_etags(environ.get("HTTP_IF_NONE_MATCH")).contains(etag):
            start_response("304 Not Modified", headers)
            return [b""]
        cache: RenderCache = self.app.extensions["render_cache"]
        body = cache.get(key)
        if body is None:
            return otherwise()
        CACHE_REQUESTS.labels("hit").inc()
        start_response("200 OK", [("Content-Type", media_type),
                                  ("Content-Length", str(len(body))), *headers])
        return [body]

    def _full_path(self, environ: dict[str, Any], start_response: StartResponse,
                   holder: tuple[bytes, str]) -> Iterable[bytes]:
        """The app answers (authentication, access, the read record, rendering); a 200 or
        304 lets the next few seconds of this session's requests for the study skip it."""

        def noting(status: str, headers: list[tuple[str, str]], *info: Any) -> Any:
            if status[:3] in ("200", "304"):
                with self._lock:
                    if len(self._passes) >= _MAX_PASSES:
                        now = time.monotonic()
                        self._passes = {k: v for k, v in self._passes.items() if v > now}
                        if len(self._passes) >= _MAX_PASSES:
                            self._passes.clear()
                    self._passes[holder] = time.monotonic() + self.alive_seconds
            return start_response(status, headers, *info)

        return self.inner(environ, noting)


    # -- machine clients (HTTP Basic): the rendered images of an instance just let through --

    def _reader(self, environ: dict[str, Any], start_response: StartResponse
                ) -> Iterable[bytes]:
        """A rendered image for credentials the full path let through to this instance within
        ``alive_seconds`` (authentication, access and the read record done there), rendered
        or from the cache without Flask or a query; anything else goes to the app, whose
        200 or 304 gives these credentials that pass."""
        found = _RENDERED.fullmatch(environ.get("PATH_INFO", ""))
        if found is None:
            return self.inner(environ, start_response)
        study, series, instance, number = found.groups()
        holder = (hashlib.sha256(environ["HTTP_AUTHORIZATION"].encode("utf-8", "replace"))
                  .digest(), study, series, instance)
        known = self._readers.get(holder)
        if known is None or known.until <= time.monotonic():
            return self._reader_full_path(environ, start_response, holder)
        frame = int(number or 1)
        try:
            rendition = rendition_from(
                dict(parse_qsl(environ.get("QUERY_STRING", ""), keep_blank_values=True)),
                environ.get("HTTP_ACCEPT", ""), thumbnail=False)
        except InvalidRendition:
            rendition = None
        if rendition is None or frame > known.reader.frames:
            # A refusal (400, 406, 404): the app says why.
            return self._reader_full_path(environ, start_response, holder)
        if rendition.window is None and rendition.preset == "auto":
            # The series' default window, which only the app can find: the image it made
            # before, from the cache (the key names the file and the rendition, not the
            # window, so it is what the route answers from there too), else the app.
            return self._cached_for_reader(known.reader.stored.sha256, frame, rendition,
                                           environ, start_response, holder)
        from portal.imaging.service import stored_image

        image = stored_image(known.reader.stored, frame, rendition)
        headers = [*_IMAGE_HEADERS, ("ETag", f'"{image.etag}"')]
        if parse_etags(environ.get("HTTP_IF_NONE_MATCH")).contains(image.etag):
            start_response("304 Not Modified", headers)
            return [b""]
        try:
            with self.app.app_context():
                body = image.body()
        except PortalError as exc:  # RenderRefused 422, FrameNotFound 404: with the reason
            return _failed(start_response, exc)
        except Exception:  # anything else: the app answers it as it answers its own
            log.exception("a known reader's image failed; the app answers instead")
            self._readers.pop(holder, None)
            return self._reader_full_path(environ, start_response, holder)
        start_response("200 OK", [("Content-Type", image.media_type),
                                  ("Content-Length", str(len(body))), *headers])
        return [body]

    def _cached_for_reader(self, sha256: str, frame: int, rendition: Rendition,
                           environ: dict[str, Any], start_response: StartResponse,
                           holder: tuple[bytes, str, str, str]) -> Iterable[bytes]:
        """A known reader's rendition in the series' default window: 304 on a matching ETag,
        the cached bytes, or the app (which renders it and keeps it in the cache)."""
        key = rendition.cache_key(sha256, frame)
        etag = hashlib.sha256(key.encode()).hexdigest()[:32]  # RenderedImage.etag
        return self._cached(key, etag, rendition.media_type, environ, start_response,
                            lambda: self._reader_full_path(environ, start_response, holder))

    def _reader_full_path(self, environ: dict[str, Any], start_response: StartResponse,
                          holder: tuple[bytes, str, str, str]) -> Iterable[bytes]:
        """The app answers; when a rendered route let these credentials through to the
        instance (200 or 304, so the read record is durable), the pass is renewed."""
        environ.pop(READER_ENVIRON, None)  # only the app's own route may set it

        def noting(status: str, headers: list[tuple[str, str]], *info: Any) -> Any:
            reader = environ.get(READER_ENVIRON)
            if isinstance(reader, ReaderPass) and status[:3] in ("200", "304"):
                with self._lock:
                    if len(self._readers) >= _MAX_PASSES:
                        now = time.monotonic()
                        self._readers = {k: v for k, v in self._readers.items()
                                         if v.until > now}
                        if len(self._readers) >= _MAX_PASSES:
                            self._readers.clear()
                    self._readers[holder] = _Known(reader, time.monotonic() + self.alive_seconds)
            else:
                self._readers.pop(holder, None)
            return start_response(status, headers, *info)

        return self.inner(environ, noting)


def _observed(environ: dict[str, Any], start_response: StartResponse,
              started: float) -> StartResponse:
    """``start_response``, which also times an answer the front door gives itself in the
    request metrics, as the route's (an answer of the app, the app times: monitoring)."""

    def observe(status: str, headers: list[tuple[str, str]], *info: Any) -> Any:
        if STARTED not in environ:  # the app was never entered
            REQUEST_SECONDS.labels("dicomweb-rendered", f"{status[:1]}xx").observe(
                time.perf_counter() - started)
        return start_response(status, headers, *info)

    return observe


def _failed(start_response: StartResponse, exc: PortalError) -> list[bytes]:
    """A refusal in the JSON the app gives machine clients (portal/errors.py)."""
    body = json.dumps({"error": exc.reason, "status": exc.status}).encode()
    start_response(f"{exc.status} {HTTPStatus(exc.status).phrase}",
                   [("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                    ("Cache-Control", "no-store"), ("X-Content-Type-Options", "nosniff"),
                    *[(k, v) for k, v in exc.headers().items()]])
    return [body]


def _refuse(start_response: StartResponse, reason: str) -> list[bytes]:
    body = reason.encode()
    start_response("403 Forbidden", [("Content-Type", "text/plain; charset=utf-8"),
                                      ("Content-Length", str(len(body))),
                                      ("Cache-Control", "no-store"),
                                      ("X-Content-Type-Options", "nosniff")])
    return [body]


def install(app: Flask, cookie_names: Iterable[str]) -> None:
    """Put the front door in front of the app (inside the proxy and host handling, which wrap
    it afterwards) and keep its signer for the viewer page (``app.extensions``)."""
    settings = app.config["PORTAL"]
    signer = Signer(app.config["SECRET_KEY"], cookie_names)
    app.extensions["rendition_signer"] = signer
    # Sign-out or a revoked link must stop the images within 10 s: this pass plus the share
    # link's own state cache.
    alive = max(0.5, min(5.0, 10.0 - float(settings["SHARE_STATE_CACHE_SECONDS"])))
    app.wsgi_app = SignedRenditions(  # type: ignore[method-assign]
        app.wsgi_app, app, signer, alive)
