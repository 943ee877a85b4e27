"""③ The one place that decides who may see what. Everything else asks it.

A denied object answers 404, exactly like a missing one, so nobody learns what exists.
Routes are default-deny: a view is reachable without a principal only when marked ``@public``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from flask import Flask, abort, current_app, request
from sqlalchemy import Select, false, select, true
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement
from werkzeug.datastructures import WWWAuthenticate
from werkzeug.exceptions import Unauthorized

from portal.access.principal import Principal, current_principal
from portal.index.models import Instance, Series, Study

F = TypeVar("F", bound=Callable[..., Any])


def public(view: F) -> F:
    """Mark a view as reachable without signing in (an explicit allow-list)."""
    view.portal_public = True  # type: ignore[attr-defined]
    return view


def is_public(endpoint: str | None) -> bool:
    """True when the endpoint's view is on the public allow-list."""
    if endpoint is None:
        return True  # no route matched: let the 404/405 handlers answer
    if endpoint == "static":
        return True
    view = current_app.view_functions.get(endpoint)
    return bool(getattr(view, "portal_public", False))


def study_filter(principal: Principal) -> ColumnElement[bool]:
    """A SQL condition on ``Study`` that keeps only what the principal may see."""
    return true() if principal.can_read_all else false()


def visible_studies(principal: Principal) -> Select[tuple[Study]]:
    """The studies this principal may see, as a query to refine."""
    return select(Study).where(study_filter(principal))


def require_study(session: Session, principal: Principal, study_uid: str) -> Study:
    """Load a study the principal may see, or answer 404."""
    study = session.scalars(visible_studies(principal)
                            .where(Study.study_instance_uid == study_uid)).first()
    if study is None:
        abort(404, "no such study")
    return study


def require_series(session: Session, principal: Principal, study_uid: str,
                   series_uid: str) -> Series:
    """Load a series that belongs to the named, visible study, or answer 404."""
    study = require_study(session, principal, study_uid)
    series = session.scalars(select(Series).where(
        Series.series_instance_uid == series_uid, Series.study_fk == study.id)).first()
    if series is None:
        abort(404, "no such series")
    return series


def require_instance(session: Session, principal: Principal, study_uid: str, series_uid: str,
                     sop_uid: str) -> Instance:
    """Load an instance of the named series and study, or answer 404."""
    series = require_series(session, principal, study_uid, series_uid)
    instance = session.scalars(select(Instance).where(
        Instance.sop_instance_uid == sop_uid, Instance.series_fk == series.id)).first()
    if instance is None:
        abort(404, "no such instance")
    return instance


def require_store(principal: Principal) -> None:
    """Only callers given the right to store may send instances."""
    if not principal.can_store:
        abort(403, "this client may not store instances")


def init_app(app: Flask) -> None:
    """Install the default-deny hook: every non-public route needs a principal."""

    @app.before_request
    def _default_deny() -> None:
        if is_public(request.endpoint):
            return
        if current_principal() is None:
            raise Unauthorized("sign in, or send the credentials of a registered client",
                               www_authenticate=WWWAuthenticate("basic", {"realm": "portal"}))
