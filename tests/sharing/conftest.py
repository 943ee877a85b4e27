"""Share-link fixtures: a physician with a granted study, links made through the service,
and a helper that exchanges a link the way the landing page's form does."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from pydicom.uid import generate_uid

from portal.access.grants import create_grant
from portal.access.models import User
from portal.access.principal import Principal, user_principal
from portal.archive import current_archive
from portal.sharing import service
from portal.sharing.routes import share_policy
from tests.conftest import close_app, make_app
from tests.factories import make_instance


@dataclass
class World:
    """A physician who may see ``study`` (patient PAT-1); ``other`` belongs to PAT-2."""

    app: Flask
    doctor: Principal
    study: str
    series: str
    sop: str
    other: str
    other_series: str
    other_sop: str
    sibling: str  # another study of PAT-1 the doctor may see


def _ingest(app: Flask, patient: str, study: str, series: str, sop: str) -> None:
    with app.app_context():
        current_archive().ingest(make_instance(study=study, series=series, sop=sop,
                                               patient_id=patient, rows=64, columns=64),
                                 who="test")


def build_world(app: Flask) -> World:
    """Studies in the archive, a physician with grants on two of PAT-1's studies."""
    uids = {k: generate_uid() for k in ("study", "series", "sop", "other", "other_series",
                                        "other_sop", "sibling", "sibling_series",
                                        "sibling_sop")}
    _ingest(app, "PAT-1", uids["study"], uids["series"], uids["sop"])
    _ingest(app, "PAT-2", uids["other"], uids["other_series"], uids["other_sop"])
    _ingest(app, "PAT-1", uids["sibling"], uids["sibling_series"], uids["sibling_sop"])
    database = app.extensions["db"]
    with database.write_transaction() as session:
        user = User(issuer="https://idp.test", subject="house", email="house@clinic.test",
                    display_name="Dr House", roles=["physician"], active=True,
                    security_epoch=0)
        session.add(user)
        session.flush()
        doctor = user_principal(user, "session")
        admin = Principal("user", 0, "setup", roles=frozenset({"office_manager"}))
        for uid in (uids["study"], uids["sibling"]):
            create_grant(session, admin, user_id=user.id, study_uid=uid)
    return World(app, doctor, uids["study"], uids["series"], uids["sop"], uids["other"],
                 uids["other_series"], uids["other_sop"], uids["sibling"])


@pytest.fixture
def world(app: Flask) -> World:
    """The default app (SQLite) with a physician and his studies."""
    return build_world(app)


@pytest.fixture
def redis_app(tmp_path: Path, redis_url: str) -> Iterator[Flask]:
    """The app with rate limits (and the render cache) in a real redis-server."""
    application = make_app(tmp_path / "instance", REDIS_URL=redis_url)
    yield application
    close_app(application)


def make_share(world: World, **options: Any) -> service.NewShare:
    """Make a link as the world's physician would (committed)."""
    app = world.app
    with app.test_request_context():
        database = app.extensions["db"]
        with database.write_transaction() as session:
            options.setdefault("study_uid", world.study)
            made = service.create_share(session, world.doctor, share_policy(), **options)
            session.flush()
            session.expunge_all()
    return made


def open_link(client: FlaskClient, token: str, pin: str | None = "",
              **headers: str) -> Any:
    """POST the token (and PIN) as the landing page's form does."""
    return client.post("/s/exchange", data={"token": token, "pin": pin or ""},
                       headers={"User-Agent": "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like "
                                              "Mac OS X) Mobile/15E148", **headers})


def link_row(app: Flask, public_id: str) -> Any:
    """The stored link, read fresh."""
    from sqlalchemy import select

    from portal.sharing.models import ShareLink

    with app.extensions["db"].new_session() as session:
        return session.scalars(select(ShareLink).where(
            ShareLink.public_id == public_id)).one()
