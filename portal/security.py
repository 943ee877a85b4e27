"""Security headers for every response, set in one place."""

from __future__ import annotations

import hmac
import ipaddress
import logging
import secrets
from datetime import date
from typing import Any
from urllib.parse import urlsplit

from flask import (
    Flask,
    Response,
    abort,
    current_app,
    g,
    has_request_context,
    request,
    session,
)
from flask.json.provider import DefaultJSONProvider
from flask_babel import format_date, get_locale

from portal.log import FROM_TRUSTED_PROXY


def csp_nonce() -> str:
    """The per-response nonce that inline scripts and styles must carry."""
    nonce: str | None = g.get("csp_nonce")
    if nonce is None:
        nonce = g.csp_nonce = secrets.token_urlsafe(18)
    return nonce


def dicom_date(value: str | None) -> str:
    """A DICOM DA value (YYYYMMDD) for people: YYYY-MM-DD in English (unambiguous for every
    English reader), the locale's own date elsewhere (02.01.2026, 2 janv. 2026; docs/i18n.md);
    anything else unchanged."""
    text = (value or "").strip()
    if len(text) == 8 and text.isdigit():
        locale = get_locale() if has_request_context() else None
        if locale is not None and locale.language != "en":
            try:
                day = date(int(text[:4]), int(text[4:6]), int(text[6:]))
            except ValueError:
                return text
            return str(format_date(day, "medium"))
        return f"{text[:4]}-{text[4:6]}-{text[6:]}"
    return text


UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def csrf_token() -> str:
    """The session's anti-CSRF token (made on first use)."""
    token: str | None = session.get("csrf")
    if token is None:
        token = session["csrf"] = secrets.token_urlsafe(32)
    return token


def has_session_cookie() -> bool:
    """True when the request carries the portal's session cookie (then forms need the token)."""
    return any(name in request.cookies for name in ("__Host-portal", "portal"))


def read_body(limit: int | None = None) -> bytes | bytearray:
    """The request body, never more than ``limit`` bytes nor MAX_CONTENT_LENGTH: 413
    above it, 415 for a compressed body, also when it arrives chunked without a length
    (gunicorn ends a chunked stream but does not tell Werkzeug, which would hand out an empty
    body)."""
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        abort(415, "compressed request bodies (Content-Encoding) are not accepted")
    most = current_app.config["MAX_CONTENT_LENGTH"]  # set from MAX_REQUEST_BYTES
    if limit is None or (most is not None and most < limit):
        limit = most
    if request.content_length is not None and request.content_length > limit:
        abort(413, f"the request is larger than {limit} bytes")
    if request.content_length is None and \
            "chunked" in request.headers.get("Transfer-Encoding", "").lower():
        stream = request.environ["wsgi.input"]
        body = bytearray()
        while piece := stream.read(min(1 << 20, limit + 1 - len(body))):
            body += piece
            if len(body) > limit:
                abort(413, f"the request is larger than {limit} bytes")
        return bytes(body)
    if request.content_length is None:
        return b""
    direct = _from_gunicorn_socket(request.environ, request.content_length)
    if direct is not None:
        return direct
    return _read_declared(request.environ["wsgi.input"], request.content_length)


_FIRST_ROOM = 1 << 20


def _from_gunicorn_socket(environ: dict[str, Any], length: int) -> bytearray | None:
    """Under gunicorn, a body of known length received straight into one buffer that grows
    as the bytes come (``recv_into``), else None (``_read_declared`` then reads it the
    portable way).

    gunicorn's own read gathers the body in growing buffers and copies it whole twice more.
    With the web worker's malloc settings (``gunicorn_config._tame_malloc``: blocks from 512
    KiB up are mappings of their own, returned when freed) each of its 1 MiB receives is a
    fresh mapping whose pages fault in: an 80 MB STOW-RS body took 235-292 ms that way and
    64-107 ms this way (benchmarks/README.md, "The request body straight from the socket").

    gunicorn documents ``gunicorn.socket``; the rest is how gunicorn 23-27 hold a body: the
    reader of a Content-Length body, its count of bytes left (set to 0 here, so that nothing
    is drained after the answer) and the bytes it read ahead (``take_buffered``). Anything
    else (another server, a chunked body, a body already partly read) is left to the
    portable way.
    """
    stream: Any = environ.get("wsgi.input")
    sock: Any = environ.get("gunicorn.socket")
    reader: Any = getattr(stream, "reader", None)
    unreader: Any = getattr(reader, "unreader", None)
    ahead: Any = getattr(stream, "buf", None)
    if sock is None or type(reader).__name__ != "LengthReader" or \
            getattr(reader, "length", None) != length or \
            not hasattr(unreader, "take_buffered") or not hasattr(unreader, "unread") or \
            not hasattr(ahead, "tell") or ahead.tell():
        return None
    held = unreader.take_buffered()
    body = bytearray(held[:length])
    if len(held) > length:
        unreader.unread(held[length:])  # the start of the next request on the connection
    reader.length = 0
    got = len(body)
    while got < length:
        if got == len(body):
            # Room for what comes next, twice what arrived so far (at least 1 MiB): memory
            # follows the bytes that came, not the Content-Length a sender announced (a
            # gigabyte, then silence). glibc grows a block this large in place (mremap).
            body.extend(bytes(min(length, max(2 * got, _FIRST_ROOM)) - got))
        try:
            with memoryview(body) as view, view[got:] as room:
                received = sock.recv_into(room)
        except OSError:
            received = 0
        if not received:
            stream.failed = True  # where the next request would start is unknown: close
            abort(400, "the request body ended before its Content-Length")
        got += received
    return body


def _read_declared(stream: Any, length: int) -> bytes:
    """Exactly ``length`` bytes of the WSGI input, asked for in one call (PEP 3333 allows
    reading up to CONTENT_LENGTH); 400 when the sender stops early.

    Not ``request.get_data``: Werkzeug reads 64 KiB at a time, and each of gunicorn's
    buffered reads copies what is left of its 1 MiB chunk, so an 80 MB STOW-RS body took
    190-610 ms to arrive against 70-110 ms for one call (benchmarks/README.md, "The request
    around the work").
    """
    pieces: list[bytes] = []
    got = 0
    while got < length:
        try:
            piece = stream.read(length - got)
        except (OSError, ValueError):
            piece = b""
        if not piece:
            abort(400, "the request body ended before its Content-Length")
        pieces.append(piece)
        got += len(piece)
    return pieces[0] if len(pieces) == 1 else b"".join(pieces)


def _same_origin(origin: str) -> bool:
    return origin == f"{request.scheme}://{request.host}"


def check_csrf() -> None:
    """Refuse cross-site state changes (docs/security.md 25): Fetch Metadata, Origin, token.

    A request without the session cookie acts only through its own credentials (an API
    call a browser cannot forge for someone); every request with the cookie needs the token.
    """
    if request.method not in UNSAFE_METHODS:
        return
    if request.headers.get("Sec-Fetch-Site") == "cross-site":
        abort(403, "cross-site requests cannot change anything here")
    origin = request.headers.get("Origin")
    if origin is not None and origin != "null" and not _same_origin(origin):
        abort(403, "requests from another origin cannot change anything here")
    if not has_session_cookie():
        return  # no session to ride on: the request acts as nobody, or as its credentials
    sent = request.headers.get("X-CSRF-Token") or request.form.get("csrf_token", "")
    expected = session.get("csrf")
    # Compared as bytes: compare_digest raises TypeError for text with non-ASCII characters.
    if not expected or not sent or not hmac.compare_digest(str(sent).encode(),
                                                           str(expected).encode()):
        abort(403, "the form has expired or did not come from this portal; please try again")


def _unstorable(value: Any) -> str | None:
    """What in a parsed JSON value no database column takes, in any string or key: a NUL
    character, or half of a UTF-16 surrogate pair (``"\\ud800"`` alone decodes to a string
    that UTF-8 cannot encode); None when there is neither."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return "a NUL character"
            if not item.isascii():
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError:
                    return "half of a surrogate pair (not a character)"
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return None


class StrictJSONProvider(DefaultJSONProvider):
    """Request JSON that is too deeply nested, or carries what no database column takes (a
    NUL character, a lone surrogate), is malformed: a ValueError, so callers answer 400
    instead of failing."""

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        try:
            value = super().loads(s, **kwargs)
        except RecursionError:
            raise ValueError("the JSON is nested too deeply") from None
        unstorable = _unstorable(value)
        if unstorable is not None:
            raise ValueError(f"the JSON holds {unstorable}")
        return value


_FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")


def reject_nul_characters() -> None:
    """A NUL in the path, the query or a form field is never meaningful here, and a database
    refuses it in a query (PostgreSQL): answer 400 before anything looks it up."""
    if "\x00" in request.path or "%00" in request.query_string.decode("latin-1"):
        abort(400, "the address holds a NUL character")
    if request.method in UNSAFE_METHODS and request.mimetype in _FORM_TYPES:
        values = request.form.to_dict(flat=False)
        if any("\x00" in k or any("\x00" in v for v in vs) for k, vs in values.items()):
            abort(400, "the form holds a NUL character")


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


TRANSPORT_SCHEME = "portal.transport_scheme"  # the WSGI environ key PublicHost fills


def arrived_over_https() -> bool:
    """True when this request came over TLS: to gunicorn itself, or to the trusted proxy
    that said so in X-Forwarded-Proto (PUBLIC_URL's scheme does not count)."""
    scheme: str = request.environ.get(TRANSPORT_SCHEME, request.scheme)
    return scheme == "https"


class PublicHost:
    """WSGI middleware: every request is taken to have come to ``PUBLIC_URL``'s scheme, host
    and path prefix, whatever Host header it carried, so no absolute URL the portal builds (DICOMweb
    RetrieveURL and BulkDataURI, STOW answers, sign-in redirect, invitation and share
    links) can be steered elsewhere by a forged Host header, and the Origin check compares
    with the public origin."""

    def __init__(self, wsgi_app: Any, public_url: str) -> None:
        parts = urlsplit(public_url)
        self.wsgi_app, self.scheme, self.host = wsgi_app, parts.scheme, parts.netloc
        self.prefix = parts.path.rstrip("/")  # a proxy that serves the portal below a path

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        # How the request really arrived (after a trusted proxy's X-Forwarded-Proto): the
        # public scheme below is for building URLs, not a claim that this hop was encrypted.
        environ[TRANSPORT_SCHEME] = environ.get("wsgi.url_scheme", "http")
        environ["HTTP_HOST"] = self.host
        environ["wsgi.url_scheme"] = self.scheme
        if self.prefix:
            environ["SCRIPT_NAME"] = self.prefix
        environ.pop("HTTP_X_FORWARDED_HOST", None)
        return self.wsgi_app(environ, start_response)


class TrustedProxies:
    """WSGI middleware: ``X-Forwarded-For``, ``-Proto`` and ``-Host`` are believed
    (through werkzeug's ProxyFix, ``hops`` deep) only when the connection comes from one of the
    configured proxy addresses; from anyone else they are dropped, so a client that reaches the
    portal around its proxy cannot choose the address that is logged, audited and rate-limited
    (docs/security.md 45)."""

    _HEADERS = ("HTTP_X_FORWARDED_FOR", "HTTP_X_FORWARDED_PROTO", "HTTP_X_FORWARDED_HOST",
                "HTTP_X_FORWARDED_PORT", "HTTP_X_FORWARDED_PREFIX")

    def __init__(self, wsgi_app: Any, hops: int, proxies: list[str]) -> None:
        from werkzeug.middleware.proxy_fix import ProxyFix

        self.wsgi_app = wsgi_app
        self.behind_proxy = ProxyFix(wsgi_app, x_for=hops, x_proto=hops, x_host=hops)
        self.proxies = [ipaddress.ip_network(p, strict=False) for p in proxies]

    def _from_proxy(self, peer: str) -> bool:
        try:
            address = ipaddress.ip_address(peer.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        return any(address in network for network in self.proxies)

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        if self._from_proxy(environ.get("REMOTE_ADDR") or ""):
            environ[FROM_TRUSTED_PROXY] = True  # its X-Request-Id is believed (portal/log.py)
            return self.behind_proxy(environ, start_response)
        for header in self._HEADERS:
            environ.pop(header, None)
        return self.wsgi_app(environ, start_response)


def init_app(app: Flask) -> None:
    """Register the header and CSRF hooks; expose ``csp_nonce`` and ``csrf_token``."""
    settings = app.config["PORTAL"]
    if settings["ENV"] == "production" and not settings["PUBLIC_URL"] and \
            not settings["TRUSTED_PROXIES"]:
        # gunicorn believes no X-Forwarded-Proto itself (gunicorn_config): behind a TLS
        # proxy the portal would take every request for plain HTTP (the sign-in's
        # redirect_uri, the Origin check of forms, HSTS).
        logging.getLogger(__name__).warning(
            "neither PORTAL_PUBLIC_URL nor PORTAL_TRUSTED_PROXIES is set: behind a TLS proxy "
            "set one of them (docs/operations.md, Behind nginx)")
    app.jinja_env.globals["csp_nonce"] = csp_nonce
    app.jinja_env.globals["csrf_token"] = csrf_token
    app.jinja_env.globals["has_session_cookie"] = has_session_cookie
    app.jinja_env.filters["dicom_date"] = dicom_date
    app.json = StrictJSONProvider(app)
    app.before_request(reject_nul_characters)
    app.before_request(check_csrf)

    issuer = app.config["PORTAL"]["OIDC_ISSUER"]
    # Sign-out is a form POST that ends in a redirect to the provider's logout page;
    # form-action also governs such redirects, so the provider's origin is allowed there.
    form_targets = "'self'" + (f" {_origin(issuer)}" if issuer else "")

    @app.after_request
    def _headers(response: Response) -> Response:
        nonce = csp_nonce()
        headers = response.headers
        headers["Content-Security-Policy"] = (
            f"default-src 'self'; script-src 'self' 'nonce-{nonce}'; "
            f"style-src 'self' 'nonce-{nonce}'; img-src 'self' data: blob:; "
            f"connect-src 'self'; object-src 'none'; base-uri 'none'; form-action {form_targets}; "
            "frame-ancestors 'none'")
        if arrived_over_https():
            # RFC 6797 7.2: over secure transport only. A browser ignores it on plain HTTP
            # (8.1), so sending it there would only make a plain-HTTP answer look protected.
            headers["Strict-Transport-Security"] = "max-age=31536000; includeSubDomains"
        headers["X-Content-Type-Options"] = "nosniff"
        headers["Referrer-Policy"] = "no-referrer"
        headers["Cross-Origin-Opener-Policy"] = "same-origin"
        headers["Cross-Origin-Resource-Policy"] = "same-origin"
        headers["X-Frame-Options"] = "DENY"
        headers["Permissions-Policy"] = "camera=(), microphone=(), geolocation=()"
        if "Cache-Control" not in headers:
            # Anything may carry PHI unless a view says otherwise.
            headers["Cache-Control"] = "no-store"
        if request.method == "TRACE":
            response.status_code = 405
        return response
