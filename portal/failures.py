"""The portal's own exceptions: one base, and each class says once what HTTP status it means.

Nothing here imports Flask or another portal module, so every room (the index and the archive
included) may raise these. ``portal/errors.py`` maps every ``PortalError`` that leaves a view
to the answer of the face that asked, in one handler: ``{"error": reason, "status": status}``
for machines (DICOMweb, the JSON API, FHIR, probes), the error page for people
(docs/architecture.md, "The rooms", flat modules).

``reason`` is the text a caller may see: safe to show, no stack, no path of this machine.
Command-line, DIMSE and HL7 paths catch these classes themselves and keep their own meaning
there (an exit message, a DICOM failure status, an HL7 AE or AR); ``status`` is only what an
HTTP answer says.
"""

from __future__ import annotations

from typing import ClassVar


class PortalError(Exception):
    """A failure the portal knows how to explain: ``status`` (HTTP) and a public ``reason``.

    Raised with a message, the message is the reason; without one, or when the class's
    messages are not ``public`` (they name files or internals), the class's ``default_reason``.
    A reason with variable parts names them as placeholders, filled from keywords:
    ``Invalid("a link lasts 1 to %(days)d days", days=30)``: ``reason`` is the English
    sentence (JSON answers, logs), ``template`` and ``params`` let the error page translate
    the sentence and fill it in the reader's language (docs/i18n.md).
    """

    status: int = 500
    default_reason: ClassVar[str] = "something went wrong on our side; it has been logged"
    public: ClassVar[bool] = True
    reason: str
    template: str
    params: dict[str, object]

    def __init__(self, *args: object, **params: object) -> None:
        super().__init__(*args)
        text = str(args[0]) if args and self.public else ""
        self.template = text or self.default_reason
        self.params = params if text else {}
        self.reason = self.template % self.params if self.params else self.template

    def __str__(self) -> str:
        """The English reason, its placeholders filled."""
        return self.reason if self.params else super().__str__()

    def headers(self) -> dict[str, str]:
        """Headers the HTTP answer carries besides the body (e.g. ``Retry-After``)."""
        return {}


class Invalid(PortalError):
    """The request cannot be used as sent (a parameter, a body, a value)."""

    status = 400
    default_reason = "the request cannot be used as sent"


class NotFound(PortalError):
    """What was asked for does not exist (or may not be seen: the same answer)."""

    status = 404
    default_reason = "not found"


class NotAcceptable(PortalError):
    """Nothing the caller accepts can carry the answer."""

    status = 406
    default_reason = "the answer cannot be sent in a form the request accepts"


class Conflict(PortalError):
    """The request contradicts what is already stored."""

    status = 409
    default_reason = "the request contradicts what is already stored"


class TooLarge(PortalError):
    """The request, or what it asks for, is larger than the portal handles."""

    status = 413
    default_reason = "too large"


class Unprocessable(PortalError):
    """Well-formed, but the portal cannot do it with this content."""

    status = 422
    default_reason = "the content cannot be processed"


class Unavailable(PortalError):
    """A resource the answer needs cannot be used now; the caller should retry later."""

    status = 503
    default_reason = "the service is unavailable; try again shortly"
    retry_after: float = 5.0

    def headers(self) -> dict[str, str]:
        """``Retry-After`` in whole seconds, at least one."""
        return {"Retry-After": str(max(1, round(self.retry_after)))}
