"""Domain exceptions mapped to HTTP answers in one place: JSON for machines, a page for people."""

from __future__ import annotations

import logging

from flask import Flask, Response, jsonify, render_template, request
from gunicorn.http.errors import NoMoreData, ParseException
from sqlalchemy.exc import DataError, OperationalError
from werkzeug.exceptions import (
    BadRequest,
    HTTPException,
    InternalServerError,
    MethodNotAllowed,
    NotFound,
)

from portal.failures import PortalError
from portal.fhir.outcome import FHIR_JSON, error_body, is_fhir_path
from portal.i18n import N_, reason_text

log = logging.getLogger(__name__)

_MACHINE_PREFIXES = ("/dicomweb", "/api", "/fhir", "/healthz", "/readyz")


def _wants_json() -> bool:
    if request.path.startswith(_MACHINE_PREFIXES):
        return True
    best = request.accept_mimetypes.best_match(["text/html", "application/json"])
    return best == "application/json"


# Werkzeug's own texts, which no catalog holds, said plainly for the error page (error.html
# translates them; the JSON answers keep Werkzeug's words, docs/i18n.md).
_PAGE_WORDS = {
    NotFound.description: N_("There is nothing at this address. Please check it, or start again "
                             "from the start page."),
    MethodNotAllowed.description: N_("This address does not answer that kind of request."),
    BadRequest.description: N_("The request could not be understood."),
}


def error_response(status: int, reason: str, headers: dict[str, str] | None = None,
                   page_reason: str | None = None) -> Response:
    """A clear error answer: ``{"error": reason}``, an OperationOutcome under ``/fhir``
    (FHIR R4 http.html: every error there is one), or the error page."""
    if is_fhir_path(request.path):
        response = Response(error_body(status, reason), mimetype=FHIR_JSON)
    elif _wants_json():
        response = jsonify(error=reason, status=status)
    else:
        # The language switch of an error page leads home: the page echoes nothing of the
        # request (its path may name a study the reader may not see).
        response = Response(render_template("error.html", status=status,
                                            reason=page_reason or reason,
                                            language_back="/"),
                            mimetype="text/html")
    response.status_code = status
    for key, value in (headers or {}).items():
        response.headers[key] = value
    return response


def register_error_handlers(app: Flask) -> None:
    """Install the handlers; nothing here ever shows a stack trace."""

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException) -> Response:
        reason = exc.description or exc.name
        response = error_response(exc.code or 500, reason, page_reason=_PAGE_WORDS.get(reason))
        # Added one by one: a 401 carries two WWW-Authenticate challenges (Bearer and Basic).
        for key, value in exc.get_headers() if exc.response is None else []:
            if key != "Content-Type":
                response.headers.add(key, value)
        return response

    @app.errorhandler(PortalError)
    def _portal(exc: PortalError) -> Response:
        """Every domain exception, mapped once (portal/failures.py): its status, its public
        reason and its headers (``Retry-After`` of an ``Unavailable``) in the face's format.
        Nothing the request wrote before it failed is kept."""
        from portal.db import db

        if exc.status >= 500:
            log.error("%s: %s", exc.__class__.__name__, exc.reason)
        try:
            db.session.rollback()
        except Exception:  # the session may be gone already; the answer is the same
            log.debug("no session to roll back")
        return error_response(exc.status, exc.reason, exc.headers(),
                              page_reason=reason_text(exc) if exc.params else None)

    @app.errorhandler(ParseException)
    @app.errorhandler(NoMoreData)
    def _malformed_body(exc: Exception) -> Response:
        """gunicorn found the body it was reading malformed (a chunk size that is no number,
        a chunked body cut short) while Flask or a route read it: the sender's fault, 400.
        gunicorn then closes the connection (where the next request starts is unknown)."""
        log.info("malformed request body: %s", exc.__class__.__name__)
        return error_response(400, "the request body is malformed (its chunked transfer "
                                   "coding or its length)")

    @app.errorhandler(OperationalError)
    def _database(exc: OperationalError) -> Response:
        log.error("database unavailable: %s", exc.__class__.__name__)
        return error_response(503, "the database is unavailable; try again shortly",
                              {"Retry-After": "5"})

    @app.errorhandler(DataError)
    @app.errorhandler(OverflowError)
    def _out_of_range(exc: Exception) -> Response:
        """A value the database cannot hold (PostgreSQL "integer out of range", SQLite's
        OverflowError for ints past 64 bits) is the request's fault: 400, nothing stored.
        Routes bound their numbers (portal.numbers); this is the net under them."""
        from portal.db import db

        log.warning("a request value is out of range: %s", exc.__class__.__name__)
        try:
            db.session.rollback()
        except Exception:  # the session may be gone already; the answer is the same
            log.debug("no session to roll back")
        return error_response(400, "a value in the request is out of the range this portal "
                                   "stores")

    @app.errorhandler(InternalServerError)
    def _internal(exc: InternalServerError) -> Response:
        original = getattr(exc, "original_exception", None)
        if original is not None:
            log.error("unhandled error", exc_info=original)
        return error_response(500, "something went wrong on our side; it has been logged")
