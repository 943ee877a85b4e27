"""The front door of known readers (issue 17 item 2; ``portal/dicomweb/signed.py``): once the
full path (authentication, access, the durable read record) has answered a machine client's
rendered request for an instance, its next renditions of that instance within a few seconds
are rendered without Flask or a query, byte for byte what the route makes; other or wrong
credentials, a client taken away, a frame past the end, a rendition the route would refuse
and a file that cannot be decoded all still get the route's answer.
Real parts: SQLite, the isolated render processes, pydicom, Pillow."""

from __future__ import annotations

import io
import time
from typing import Any

import pydicom
from flask import Flask
from flask.testing import FlaskClient
from PIL import Image
from pydicom.uid import RLELossless
from sqlalchemy import event, func, select

from portal.access.clients import deactivate_client
from portal.access.models import AuditEvent
from portal.dicomweb.signed import SignedRenditions
from portal.imaging.cache import MemoryCache
from tests.conftest import basic_auth, make_client
from tests.factories import make_dataset, to_bytes
from tests.imaging.test_render import store, url

JPEG = {"Accept": "image/jpeg"}


class Queries:
    """Counts the SQL statements the app's engine runs while it is open."""

    def __init__(self, app: Flask) -> None:
        self.engine = app.extensions["db"].engine
        self.count = 0

    def _seen(self, *_args: Any) -> None:
        self.count += 1

    def __enter__(self) -> Queries:
        event.listen(self.engine, "before_cursor_execute", self._seen)
        return self

    def __exit__(self, *exc: object) -> None:
        event.remove(self.engine, "before_cursor_execute", self._seen)


def _door(app: Flask) -> SignedRenditions:
    door = app.wsgi_app
    while not isinstance(door, SignedRenditions):
        door = door.app  # type: ignore[attr-defined]  # the proxy and host wrappers
    return door


def _reads(app: Flask) -> int:
    with app.extensions["db"].new_session() as session:
        return int(session.scalar(select(func.count()).select_from(AuditEvent).where(
            AuditEvent.event_id == "110103")) or 0)


def _ct(app: Flask, frames: int = 1) -> pydicom.Dataset:
    ds = make_dataset(rows=96, columns=96)
    if frames > 1:
        ds.NumberOfFrames = frames
        ds.PixelData = ds.PixelData * frames
    return store(app, to_bytes(ds))


def test_a_known_reader_gets_the_routes_bytes_without_a_query(app: Flask,
                                                              client: FlaskClient) -> None:
    ds = _ct(app)
    auth = {**basic_auth(*make_client(app, "viewer", can_store=False)), **JPEG}
    first = client.get(url(ds, "rendered?window=40,400"), headers=auth)
    assert first.status_code == 200
    reads = _reads(app)
    assert reads >= 1  # the full path recorded the read before the first image left
    with Queries(app) as queries:
        fast = [client.get(url(ds, f"rendered?window={40 + i},400&quality=80"), headers=auth)
                for i in range(1, 4)]
        frame = client.get(url(ds, "frames/1/rendered?window=41,400&quality=80"),
                           headers=auth)
        again = client.get(url(ds, "rendered?window=41,400&quality=80"),
                           headers={**auth, "If-None-Match": fast[0].headers["ETag"]})
    assert queries.count == 0  # no authentication, access or audit query: the pass
    assert [r.status_code for r in fast] == [200, 200, 200] and again.status_code == 304
    assert frame.data == fast[0].data and frame.headers["ETag"] == fast[0].headers["ETag"]
    assert Image.open(io.BytesIO(fast[0].data)).size == (96, 96)
    assert fast[0].headers["Cache-Control"] == "private, max-age=86400"
    assert fast[0].headers["X-Content-Type-Options"] == "nosniff"
    assert _reads(app) == reads

    # The same renditions from the route itself, with an empty cache and no pass: the same
    # bytes and ETags (the front door names and renders exactly what the route does).
    app.extensions["render_cache"] = MemoryCache()
    for response, centre in zip(fast, (41, 42, 43), strict=True):
        _door(app)._readers.clear()
        with Queries(app) as queries:
            routed = client.get(url(ds, f"rendered?window={centre},400&quality=80"),
                                headers=auth)
        assert queries.count > 0 and routed.status_code == 200
        assert routed.data == response.data and routed.headers["ETag"] == response.headers["ETag"]


def test_a_known_readers_default_window_comes_from_the_cache(app: Flask,
                                                             client: FlaskClient) -> None:
    """A rendition without a window (the series' default, which only the route can find):
    once the route made it, the same image again, as the instance or as its frame, comes from
    the cache without a query, with the route's bytes and ETag (304 on that ETag); once the
    cache has lost it the route answers again, byte for byte the same."""
    ds = _ct(app)
    auth = {**basic_auth(*make_client(app, "viewer", can_store=False)), **JPEG}
    first = client.get(url(ds, "rendered"), headers=auth)
    assert first.status_code == 200
    with Queries(app) as queries:
        again = client.get(url(ds, "rendered"), headers=auth)
        frame = client.get(url(ds, "frames/1/rendered"), headers=auth)
        unchanged = client.get(url(ds, "rendered"),
                               headers={**auth, "If-None-Match": first.headers["ETag"]})
    assert queries.count == 0
    assert [again.status_code, frame.status_code, unchanged.status_code] == [200, 200, 304]
    for answer in (again, frame):
        assert answer.data == first.data and answer.headers["ETag"] == first.headers["ETag"]
    app.extensions["render_cache"] = MemoryCache()
    with Queries(app) as queries:
        routed = client.get(url(ds, "rendered"), headers=auth)
    assert queries.count > 0 and routed.status_code == 200
    assert routed.data == first.data and routed.headers["ETag"] == first.headers["ETag"]


def test_other_or_wrong_credentials_never_ride_on_a_pass(app: Flask,
                                                         client: FlaskClient) -> None:
    ds = _ct(app)
    name, secret = make_client(app, "viewer", can_store=False)
    good = {**basic_auth(name, secret), **JPEG}
    assert client.get(url(ds, "rendered?window=40,400"), headers=good).status_code == 200
    wrong = {**basic_auth(name, secret + "x"), **JPEG}
    assert client.get(url(ds, "rendered?window=50,400"), headers=wrong).status_code == 401
    storer = {**basic_auth(*make_client(app, "storer", can_read=False)), **JPEG}
    assert client.get(url(ds, "rendered?window=50,400"), headers=storer).status_code in (403,
                                                                                         404)
    # the good reader's pass still answers, and the refusals left no pass behind
    with Queries(app) as queries:
        assert client.get(url(ds, "rendered?window=51,400"), headers=good).status_code == 200
        assert client.get(url(ds, "rendered?window=52,400"), headers=wrong).status_code == 401
    assert queries.count > 0  # the wrong password went the full way (and was refused)


def test_a_client_taken_away_stops_within_the_pass(app: Flask, client: FlaskClient) -> None:
    ds = _ct(app)
    name, secret = make_client(app, "viewer", can_store=False)
    auth = {**basic_auth(name, secret), **JPEG}
    assert client.get(url(ds, "rendered?window=40,400"), headers=auth).status_code == 200
    with app.extensions["db"].new_session() as session:
        assert deactivate_client(session, name)
        session.commit()
    since, status, step = time.monotonic(), 200, 0
    while status == 200 and time.monotonic() - since < 15:
        step += 1
        status = client.get(url(ds, f"rendered?window={40 + step},400"),
                            headers=auth).status_code
        time.sleep(0.05)
    assert status == 401
    assert time.monotonic() - since <= _door(app).alive_seconds + 1.0


def test_what_the_route_refuses_is_still_refused_with_its_reason(app: Flask,
                                                                 client: FlaskClient) -> None:
    ds = _ct(app, frames=3)
    auth = {**basic_auth(*make_client(app, "viewer", can_store=False)), **JPEG}
    assert client.get(url(ds, "frames/2/rendered?window=40,400"), headers=auth).status_code == 200
    past = client.get(url(ds, "frames/4/rendered?window=40,400"), headers=auth)
    assert past.status_code == 404 and "frame" in past.get_json()["error"]
    bad = client.get(url(ds, "frames/2/rendered?window=40,400&quality=500"), headers=auth)
    assert bad.status_code == 400 and bad.get_json()["error"]
    unacceptable = client.get(url(ds, "frames/2/rendered?window=40,400"),
                              headers={**auth, "Accept": "application/pdf"})
    assert unacceptable.status_code == 406
    assert client.get(url(ds, "frames/3/rendered?window=41,400"), headers=auth).status_code == 200


def test_an_image_that_cannot_be_decoded_fails_alone_and_gets_no_pass(
        app: Flask, client: FlaskClient) -> None:
    ds = _ct(app)
    broken = make_dataset(rows=64, columns=64)
    broken.compress(RLELossless, generate_instance_uid=False)
    data = bytearray(to_bytes(broken))
    # Scribble over the RLE segment offsets in the frame's header: the decoder must fail.
    header = data.index(b"\xfe\xff\x00\xe0", data.index(b"\xe0\x7f\x10\x00") + 12 + 8)
    data[header + 8:header + 72] = b"\xff" * 64
    hostile = store(app, bytes(data))
    auth = {**basic_auth(*make_client(app, "viewer", can_store=False)), **JPEG}
    for centre in (40, 41):
        refused = client.get(url(hostile, f"rendered?window={centre},400"), headers=auth)
        assert refused.status_code == 422 and refused.get_json()["error"]
    assert not any(key[3] == hostile.SOPInstanceUID for key in _door(app)._readers)
    assert client.get(url(ds, "rendered?window=40,400"), headers=auth).status_code == 200
    assert client.get(url(ds, "rendered?window=41,400"), headers=auth).status_code == 200
