"""Signed rendition URLs (issue 17 item 1; ``portal/imaging/signed.py``,
``portal/dicomweb/signed.py``): the viewer page's tokens answer a cached image in front of
the app without a query, with the same bytes and ETag as the route; a token made for other
cookies, another image, tampered with or expired is refused; sign-out and a revoked share
link stop the images within 10 s; the first read of a study still writes its record first.
Real parts: the OIDC provider, Redis for the render cache, SQLite, Chromium."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import delete, event, select

from portal import audit
from portal.auth.models import UserSession
from portal.imaging.signed import Signer, content_digests
from portal.index.models import Instance, Series
from portal.sharing import service
from tests.browser import chromium, loopback_only, phone
from tests.conftest import IdentityProvider, LiveServer, close_app, make_app, signed_in
from tests.sharing.conftest import build_world, make_share, open_link
from tests.studies.support import PHYSICIAN, CtSite, build_ct_site, sign_in_browser

IMAGE = {"Accept": "image/webp,image/png,image/*"}


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, idp: IdentityProvider,
         redis_url: str) -> Iterator[CtSite]:
    """A small CT the physician may see, the render cache in a real redis-server."""
    ct = build_ct_site(tmp_path_factory.mktemp("signed"), idp, slices=6, size=64)
    ct.app.extensions["render_cache"] = _redis_cache(redis_url)
    yield ct
    close_app(ct.app)


def _redis_cache(redis_url: str) -> Any:
    from portal.imaging.cache import RedisCache
    from portal.redis_link import RedisLink

    return RedisCache(RedisLink(redis_url, timeout=2.0, failures=5, reset_after=5.0))


def _viewer_data(client: FlaskClient, study: str, series: str) -> dict[str, Any]:
    page = client.get(f"/studies/{study}/view/{series}")
    assert page.status_code == 200
    found = re.search(r'<script type="application/json" id="viewer-data"[^>]*>(.*?)</script>',
                      page.get_data(as_text=True), re.S)
    assert found
    data: dict[str, Any] = json.loads(found.group(1))
    return data


def _url(study: str, series: str, sop: str, token: str | None, frame: int = 1) -> str:
    path = (f"/dicomweb/studies/{study}/series/{series}/instances/{sop}/frames/{frame}/"
            "rendered?width=64")
    return path + (f"&t={token}" if token else "")


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

    def __exit__(self, *_exc: Any) -> None:
        event.remove(self.engine, "before_cursor_execute", self._seen)


def test_a_signed_url_answers_the_routes_bytes_from_the_cache_without_a_query(
        site: CtSite, idp: IdentityProvider) -> None:
    browser = signed_in(site.app, idp, PHYSICIAN)
    data = _viewer_data(browser, site.study, site.series)
    sop = data["frames"][2][0]
    token = data["signed"][sop]
    assert set(data["signed"]) == {uid for uid, _ in data["frames"]}
    plain = browser.get(_url(site.study, site.series, sop, None), headers=IMAGE)
    assert plain.status_code == 200 and plain.mimetype == "image/webp"
    first = browser.get(_url(site.study, site.series, sop, token), headers=IMAGE)
    assert first.status_code == 200  # the full path: it lets this session's next ones through
    with Queries(site.app) as queries:
        fast = browser.get(_url(site.study, site.series, sop, token), headers=IMAGE)
        again = browser.get(_url(site.study, site.series, sop, token),
                            headers={**IMAGE, "If-None-Match": plain.headers["ETag"]})
    assert queries.count == 0
    assert fast.status_code == 200 and fast.data == plain.data
    assert fast.mimetype == "image/webp" and fast.headers["ETag"] == plain.headers["ETag"]
    for name in ("Cache-Control", "Vary", "X-Content-Type-Options",
                 "Cross-Origin-Resource-Policy"):
        assert fast.headers[name] == plain.headers[name], name
    assert "X-Request-Id" not in fast.headers  # answered in front of the app
    assert again.status_code == 304 and again.data == b""
    assert again.headers["ETag"] == plain.headers["ETag"]
    # Another rendition of the same image: the same token, the route's bytes again.
    png = browser.get(_url(site.study, site.series, sop, token) + "&quality=90",
                      headers={"Accept": "image/png"})
    assert png.status_code == 200 and png.mimetype == "image/png"
    with Queries(site.app) as queries:
        png_again = browser.get(_url(site.study, site.series, sop, token) + "&quality=90",
                                headers={"Accept": "image/png"})
    assert queries.count == 0 and png_again.data == png.data


def test_tampered_expired_and_other_sessions_tokens_get_no_image(
        site: CtSite, idp: IdentityProvider) -> None:
    browser = signed_in(site.app, idp, PHYSICIAN)
    other = signed_in(site.app, idp, PHYSICIAN)  # the same doctor on another phone
    data = _viewer_data(browser, site.study, site.series)
    (sop, _), (next_sop, _) = data["frames"][:2]
    token = data["signed"][sop]
    assert browser.get(_url(site.study, site.series, sop, token), headers=IMAGE).status_code \
        == 200
    expires, digest, mac = token.split(".")
    signer: Signer = site.app.extensions["rendition_signer"]
    cookie = browser.get_cookie("portal")
    assert cookie is not None
    identity = signer.identity({"portal": cookie.value})
    assert identity is not None
    expired = signer.sign(identity, site.study, site.series, sop, digest, time.time() - 7300)
    refused = {
        "tampered": (browser, _url(site.study, site.series, sop,
                                   f"{expires}.{digest}.{_flip(mac)}")),
        "later expiry": (browser, _url(site.study, site.series, sop,
                                       f"{int(expires) + 3600}.{digest}.{mac}")),
        "malformed": (browser, _url(site.study, site.series, sop, "x.y")),
        "expired": (browser, _url(site.study, site.series, sop, expired)),
        "another image": (browser, _url(site.study, site.series, next_sop, token)),
        "another session": (other, _url(site.study, site.series, sop, token)),
    }
    for name, (client, url) in refused.items():
        answer = client.get(url, headers=IMAGE)
        assert answer.status_code == 403, name
        assert not answer.mimetype.startswith("image/"), name
        assert b"\xff\xd8" not in answer.data and b"WEBP" not in answer.data, name
    assert "expired" in browser.get(refused["expired"][1]).get_data(as_text=True)


def _flip(mac: str) -> str:
    return mac[:-2] + ("AA" if mac[-2:] != "AA" else "BB")


def _until_refused(client: FlaskClient, url: str, since: float) -> tuple[float, int]:
    """Ask for the image every 50 ms until it is refused; when, and with what."""
    while time.monotonic() - since < 15:
        answer = client.get(url, headers=IMAGE)
        if answer.status_code != 200:
            return time.monotonic() - since, answer.status_code
        time.sleep(0.05)
    return time.monotonic() - since, 200


def test_an_ended_session_stops_the_images_within_ten_seconds(
        site: CtSite, idp: IdentityProvider) -> None:
    browser = signed_in(site.app, idp, PHYSICIAN)
    data = _viewer_data(browser, site.study, site.series)
    sop = data["frames"][3][0]
    url = _url(site.study, site.series, sop, data["signed"][sop])
    for _ in range(3):
        assert browser.get(url, headers=IMAGE).status_code == 200
    cookie = browser.get_cookie("portal")
    assert cookie is not None
    # Signed out elsewhere (or by an office manager): the row goes, a copied cookie stays.
    with site.app.extensions["db"].write_transaction() as session:
        session.execute(delete(UserSession))
    after, status = _until_refused(browser, url, time.monotonic())
    assert after < 10 and status == 401
    time.sleep(0.2)
    assert browser.get(url, headers=IMAGE).status_code == 401


def test_a_revoked_share_link_stops_the_images_within_ten_seconds(
        tmp_path: Path, redis_url: str) -> None:
    app = make_app(tmp_path / "share", REDIS_URL=redis_url)
    try:
        world = build_world(app)
        made = make_share(world)
        visitor = app.test_client()
        assert open_link(visitor, made.token, made.pin).status_code == 303
        data = _viewer_data(visitor, world.study, world.series)
        url = _url(world.study, world.series, world.sop, data["signed"][world.sop])
        assert visitor.get(url, headers=IMAGE).status_code == 200
        with Queries(app) as queries:
            assert visitor.get(url, headers=IMAGE).status_code == 200
        assert queries.count == 0
        with app.extensions["db"].write_transaction() as session:
            service.revoke_link(session, world.doctor, made.link.public_id)
        after, status = _until_refused(visitor, url, time.monotonic())
        assert after < 10 and status == 401
    finally:
        close_app(app)


def test_the_first_read_of_a_study_through_a_signed_url_is_recorded_before_the_image(
        site: CtSite, idp: IdentityProvider) -> None:
    browser = signed_in(site.app, idp, PHYSICIAN)
    cookie = browser.get_cookie("portal")
    assert cookie is not None
    signer: Signer = site.app.extensions["rendition_signer"]
    identity = signer.identity({"portal": cookie.value})
    assert identity is not None
    # A token as the viewer page makes it, without the page (which records a view itself).
    with site.app.extensions["db"].new_session() as session:
        sop = session.scalars(select(Instance.sop_instance_uid).join(Series).where(
            Series.series_instance_uid == site.series)).first()
        assert sop is not None
        digests = content_digests(session, [sop])
    token = signer.sign(identity, site.study, site.series, sop, digests[sop], time.time())

    def reads() -> int:
        with site.app.extensions["db"].new_session() as session:
            return sum(1 for e in audit.iter_events(session, study=site.study,
                                                    event_id=audit.INSTANCES_ACCESSED[0])
                       if (e.details or {}).get("what") == "instance")

    before = reads()
    answer = browser.get(_url(site.study, site.series, sop, token), headers=IMAGE)
    assert answer.status_code == 200
    assert reads() == before + 1  # written before the answer came back
    for _ in range(3):
        assert browser.get(_url(site.study, site.series, sop, token),
                           headers=IMAGE).status_code == 200
    assert reads() == before + 1  # once per study per session


def test_the_viewer_shows_its_images_through_signed_urls(
        tmp_path: Path, idp: IdentityProvider) -> None:
    ct = build_ct_site(tmp_path, idp, slices=12, size=128)
    try:
        with LiveServer(ct.app) as server, chromium() as (playwright, browser):
            context = browser.new_context(**phone(playwright, "Pixel 7"))
            loopback_only(context)
            page = context.new_page()
            answers: list[tuple[str, int]] = []
            page.on("response", lambda r: answers.append((r.url, r.status))
                    if "/rendered" in r.url else None)
            sign_in_browser(page, server.url)
            page.goto(f"{server.url}/studies/{ct.study}/view/{ct.series}")
            page.wait_for_function(
                "() => document.querySelector('#viewer').dataset.quality === 'full'",
                timeout=30_000)
            page.locator(".stage").focus()
            for _ in range(5):
                page.keyboard.press("ArrowDown")
            page.wait_for_function("() => document.querySelector('#viewer').dataset.frame "
                                   "=== '6'")
            page.wait_for_load_state("networkidle")
            # Back up: the same images again, now answered in front of the app.
            for _ in range(5):
                page.keyboard.press("ArrowUp")
            page.wait_for_load_state("networkidle")
            assert page.eval_on_selector("#viewer", "v => v.dataset.quality") == "full"
            context.close()
        full = [(url, status) for url, status in answers if "/frames/" in url]
        assert full, answers
        assert all("t=" in url for url, _ in full), full[:3]
        assert {status for _, status in full} <= {200, 304}
    finally:
        close_app(ct.app)
