"""Share links end to end through the app: tokens, PINs, exchange, scope, expiry, revocation
(docs/security.md 13-21)."""

from __future__ import annotations

import hashlib
import inspect
import re
import sqlite3
import statistics
import time
from datetime import timedelta
from pathlib import Path

import pytest
from flask import Flask
from sqlalchemy import select, update

from portal import audit
from portal.access.models import AuditEvent
from portal.db import utcnow
from portal.sharing import service, sessions, tokens
from portal.sharing.models import ShareLink
from portal.sharing.routes import share_policy
from tests.sharing.conftest import World, link_row, make_share, open_link

DICOM_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'

# -- 13 and 19: tokens and PINs ---------------------------------------------------------------

def test_tokens_are_256_bit_unique_and_url_safe() -> None:
    made = {tokens.new_token() for _ in range(100_000)}
    assert len(made) == 100_000
    for token in list(made)[:1000]:
        assert len(token) == 43 and re.fullmatch(r"[A-Za-z0-9_-]{43}", token)
    assert tokens.TOKEN_BYTES * 8 == 256


def test_secrets_come_only_from_the_secrets_module() -> None:
    for module in (tokens, service):
        source = inspect.getsource(module)
        assert "import random" not in source and "from random" not in source
        assert "uuid1" not in source and "random.random" not in source
    assert "secrets.token_urlsafe" in inspect.getsource(tokens.new_token)
    assert "secrets.randbelow" in inspect.getsource(tokens.new_pin)
    with pytest.raises(ValueError):
        tokens.new_pin(5)
    pins = [tokens.new_pin(6) for _ in range(2000)]
    assert all(len(p) == 6 and p.isdigit() for p in pins)
    assert len({p[0] for p in pins}) == 10  # leading zeros are kept, every digit appears


def test_database_holds_no_token_and_no_pin(app: Flask, world: World) -> None:
    made = [make_share(world), make_share(world)]
    dump = "\n".join(sqlite3.connect(Path(app.instance_path) / "portal.db").iterdump())
    for share in made:
        assert share.pin and share.pin not in dump.replace(share.link.pin_hash, "")
        assert share.token not in dump
        assert hashlib.sha256(share.token.encode()).hexdigest() in dump
        scheme, n, _r, _p, salt, _digest = share.link.pin_hash.split("$")
        assert scheme == "scrypt" and int(n) >= 2**14 and len(salt) >= 20
    assert made[0].link.pin_hash.split("$")[4] != made[1].link.pin_hash.split("$")[4]
    # The pepper is not in the database: the same PIN and salt under another key differ.
    pin_hash = made[0].link.pin_hash
    assert tokens.verify_pin(made[0].pin or "", pin_hash, share_policy_of(app).pepper)
    assert not tokens.verify_pin(made[0].pin or "", pin_hash,
                                 tokens.pepper_from_secret("another-key"))


def share_policy_of(app: Flask) -> service.SharePolicy:
    with app.test_request_context():
        return share_policy()


def test_copy_never_calls_date_of_birth_a_factor() -> None:
    templates = Path(__file__).resolve().parents[2] / "templates" / "sharing"
    for page in templates.glob("*.html"):
        text = page.read_text().lower()
        assert "birth" not in text and "second factor" not in text, page.name


# -- 18: opening the link changes nothing --------------------------------------------------------

def test_preview_bots_change_nothing(app: Flask, world: World) -> None:
    made = make_share(world)
    before = link_row(app, made.link.public_id)
    client = app.test_client()
    for _ in range(50):
        assert client.get("/s").status_code == 200
    assert client.head("/s").status_code == 200
    assert client.get("/s", headers={"Range": "bytes=0-10"}).status_code in (200, 206)
    after = link_row(app, made.link.public_id)
    for field in ("failed_attempts", "locked_at", "use_count", "last_used_at",
                  "first_used_at", "revoked_at"):
        assert getattr(after, field) == getattr(before, field), field
    assert "Set-Cookie" not in client.get("/s").headers
    assert open_link(client, made.token, made.pin).status_code == 303


def test_landing_page_headers_and_no_third_party(app: Flask, world: World) -> None:
    made = make_share(world)
    client = app.test_client()
    page = client.get("/s")
    for response in (page, open_link(app.test_client(), "x" * 43),
                     open_link(client, made.token, made.pin)):
        assert response.headers["Referrer-Policy"] == "no-referrer"
        assert "no-store" in response.headers["Cache-Control"]
        assert "noindex" in response.headers["X-Robots-Tag"]
    html = page.get_data(as_text=True)
    for url in re.findall(r'(?:src|href|action)="([^"]+)"', html):
        assert url.startswith("/"), url
    study = client.get(f"/studies/{world.study}")
    assert study.status_code == 200
    assert "noindex" in study.headers["X-Robots-Tag"]
    assert study.headers["Referrer-Policy"] == "no-referrer"


# -- exchange, cookie, scope (14, 17) ------------------------------------------------------

def test_exchange_sets_a_strict_cookie_and_leaves_the_token_behind(app: Flask,
                                                                   world: World) -> None:
    made = make_share(world)
    client = app.test_client()
    response = open_link(client, made.token, made.pin)
    assert response.status_code == 303
    assert made.token not in response.headers["Location"]
    assert response.headers["Location"].endswith(f"/studies/{world.study}")
    cookie = response.headers["Set-Cookie"]
    assert cookie.startswith("share=") and made.token not in cookie
    for attribute in ("HttpOnly", "SameSite=Strict", "Path=/", "Max-Age=3600"):
        assert attribute in cookie
    page = client.get(response.headers["Location"])
    assert page.status_code == 200 and made.token not in page.get_data(as_text=True)


def test_secure_portals_use_a_host_prefixed_secure_cookie(tmp_path: Path) -> None:
    from tests.conftest import close_app, make_app
    from tests.sharing.conftest import build_world

    app = make_app(tmp_path / "secure", PUBLIC_URL="https://portal.example")
    try:
        world = build_world(app)
        made = make_share(world)
        response = open_link(app.test_client(), made.token, made.pin)
        cookie = response.headers["Set-Cookie"]
        assert cookie.startswith("__Host-share=") and "Secure" in cookie
        assert "SameSite=Strict" in cookie and "Domain" not in cookie
    finally:
        close_app(app)


def test_visitor_sees_only_the_shared_study(app: Flask, world: World) -> None:
    made = make_share(world)
    client = app.test_client()
    assert open_link(client, made.token, made.pin).status_code == 303
    found = client.get("/dicomweb/studies")
    assert found.status_code == 200
    assert [s["0020000D"]["Value"][0] for s in found.get_json()] == [world.study]
    assert client.get("/dicomweb/studies", query_string={"PatientID": "*"}).get_json()[0][
        "0020000D"]["Value"] == [world.study]
    assert client.get("/dicomweb/series").status_code == 200
    assert {s["0020000D"]["Value"][0] for s in client.get("/dicomweb/series").get_json()} \
        == {world.study}
    # Another patient's study, and the same patient's study that was not shared: not there.
    for uid, series, sop in ((world.other, world.other_series, world.other_sop),):
        assert client.get(f"/studies/{uid}").status_code == 404
        assert client.get(f"/dicomweb/studies/{uid}/metadata").status_code == 404
        assert client.get(f"/dicomweb/studies/{uid}/series/{series}/thumbnail"
                          ).status_code == 404
        assert client.get(f"/dicomweb/studies/{uid}/series/{series}/instances/{sop}/rendered"
                          ).status_code == 404
    assert client.get(f"/studies/{world.sibling}").status_code == 404
    # Hierarchy: the shared study in the URL with a foreign series.
    assert client.get(f"/dicomweb/studies/{world.study}/series/{world.other_series}/thumbnail"
                      ).status_code == 404
    # No study list, no console, no API, no changes.
    for path in ("/studies", "/admin/", "/api/users", "/shares"):
        assert client.get(path).status_code == 404, path
    assert client.post("/dicomweb/studies", data=b"x",
                       headers={"Content-Type": "application/dicom"}).status_code == 404
    # The shared study itself, its images, and no download without the permission.
    assert client.get(f"/studies/{world.study}").status_code == 200
    image = client.get(f"/dicomweb/studies/{world.study}/series/{world.series}/instances/"
                       f"{world.sop}/rendered", headers={"Accept": "image/jpeg"})
    assert image.status_code == 200 and image.data[:2] == b"\xff\xd8"
    assert client.get(f"/dicomweb/studies/{world.study}",
                      headers={"Accept": DICOM_ACCEPT}).status_code == 403
    frames = client.get(f"/dicomweb/studies/{world.study}/series/{world.series}/instances/"
                        f"{world.sop}/frames/1",
                        headers={"Accept": 'multipart/related; type="application/octet-stream"'})
    assert frames.status_code == 403  # raw pixels are a download
    page = client.get(f"/studies/{world.study}").get_data(as_text=True)
    assert world.other not in page and world.sibling not in page


def test_download_only_with_the_permission(app: Flask, world: World) -> None:
    made = make_share(world, can_download=True)
    client = app.test_client()
    open_link(client, made.token, made.pin)
    response = client.get(f"/dicomweb/studies/{world.study}/series/{world.series}/instances/"
                          f"{world.sop}",
                          headers={"Accept": DICOM_ACCEPT})
    assert response.status_code == 200 and b"DICM" in response.data
    assert "/download.zip" in client.get(f"/studies/{world.study}").get_data(as_text=True)
    # A view-only link shows no download button (the endpoint says 403 anyway).
    viewer = app.test_client()
    view_only = make_share(world, can_download=False)
    open_link(viewer, view_only.token, view_only.pin)
    assert viewer.get(f"/studies/{world.study}").status_code == 200
    assert "/download.zip" not in viewer.get(f"/studies/{world.study}").get_data(as_text=True)
    assert viewer.get(f"/studies/{world.study}/download.zip").status_code == 403


def test_whole_patient_link_opens_every_study_of_that_patient_the_sender_sees(
        app: Flask, world: World) -> None:
    made = make_share(world, whole_patient=True)
    assert sorted(s.study_instance_uid for s in made.link.studies) == sorted(
        [world.study, world.sibling])
    client = app.test_client()
    response = open_link(client, made.token, made.pin)
    assert response.headers["Location"].endswith("/shared")
    home = client.get("/shared").get_data(as_text=True)
    assert world.study in home and world.sibling in home and world.other not in home


def test_only_who_may_see_a_study_can_share_it(app: Flask, world: World) -> None:
    with pytest.raises(service.ShareError):
        make_share(world, study_uid=world.other)
    patient = service.Principal("user", 99, "p", roles=frozenset({"patient"}))
    with app.test_request_context(), app.extensions["db"].new_session() as session, \
            pytest.raises(service.ShareError):
        service.create_share(session, patient, share_policy(), study_uid=world.study)


# -- 15: expiry ----------------------------------------------------------------------------

@pytest.mark.parametrize("days", [0, -1, 31, 400])
def test_expiry_outside_the_limits_is_refused(world: World, days: int) -> None:
    with pytest.raises(service.ShareError):
        make_share(world, days=days)


def test_default_and_lowered_lifetimes(tmp_path: Path, world: World) -> None:
    made = make_share(world)
    lifetime = made.link.expires_at - made.link.created_at
    assert timedelta(days=7) - timedelta(seconds=5) < lifetime <= timedelta(days=7)
    assert make_share(world, days=30).link.expires_at > utcnow() + timedelta(days=29)
    from tests.conftest import close_app, make_app
    from tests.sharing.conftest import build_world

    lowered = make_app(tmp_path / "lowered", SHARE_MAX_DAYS=3, SHARE_DEFAULT_DAYS=2)
    try:
        small = build_world(lowered)
        assert make_share(small).link.expires_at < utcnow() + timedelta(days=2, minutes=1)
        with pytest.raises(service.ShareError):
            make_share(small, days=4)
    finally:
        close_app(lowered)


def _move_clock(monkeypatch: pytest.MonkeyPatch, delta: timedelta) -> None:
    """The share services see a later time (``portal.db.utcnow`` itself stays real)."""
    for module in (service, sessions):
        monkeypatch.setattr(module, "utcnow", lambda: utcnow() + delta)
    sessions.forget_cached_visits()


def test_expiry_by_moving_the_clock(app: Flask, world: World,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    made = make_share(world, days=1)
    viewer = app.test_client()
    assert open_link(viewer, made.token, made.pin).status_code == 303
    assert viewer.get(f"/studies/{world.study}").status_code == 200
    _move_clock(monkeypatch, timedelta(days=1, minutes=1))
    ended = viewer.get(f"/studies/{world.study}")
    assert ended.status_code == 401 and "viewing time has ended" in ended.get_data(as_text=True)
    assert viewer.get(f"/dicomweb/studies/{world.study}/series/{world.series}/thumbnail"
                      ).status_code == 401
    unknown = open_link(app.test_client(), tokens.new_token(), "123456")
    expired = open_link(app.test_client(), made.token, made.pin)
    assert expired.status_code == unknown.status_code == 404
    assert expired.data == unknown.data


def test_not_before_is_honoured(app: Flask, world: World) -> None:
    made = make_share(world, not_before=utcnow() + timedelta(hours=1))
    assert open_link(app.test_client(), made.token, made.pin).status_code == 404


def test_share_sessions_end_when_idle_and_after_an_hour(app: Flask, world: World,
                                                        monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    made = make_share(world)
    idle = app.test_client()
    assert open_link(idle, made.token, made.pin).status_code == 303
    _move_clock(monkeypatch, timedelta(minutes=16))
    assert idle.get(f"/studies/{world.study}").status_code == 401
    monkeypatch.undo()
    busy = app.test_client()
    assert open_link(busy, made.token, made.pin).status_code == 303
    for minutes in range(10, 70, 10):  # active every 10 minutes: still ends after an hour
        _move_clock(monkeypatch, timedelta(minutes=minutes))
        expected = 200 if minutes < 60 else 401
        assert busy.get(f"/studies/{world.study}").status_code == expected, minutes


# -- 16 and 20: uniform answers, counting wrong PINs -----------------------------------------

def _lock(app: Flask, made: service.NewShare) -> None:
    client = app.test_client()
    for _ in range(10):
        open_link(client, made.token, "000000" if made.pin != "000000" else "111111")


def _unknown_and_ended_links(app: Flask, world: World) -> dict[str, tuple[str, str | None]]:
    """(token, PIN) of an unknown, an expired, a revoked and a locked link."""
    expired, revoked, locked = make_share(world), make_share(world), make_share(world)
    with app.extensions["db"].write_transaction() as session:
        session.execute(update(ShareLink).where(ShareLink.id == expired.link.id).values(
            expires_at=utcnow() - timedelta(seconds=1)))
        service.revoke_link(session, world.doctor, revoked.link.public_id)
    _lock(app, locked)
    assert link_row(app, locked.link.public_id).locked_at is not None
    return {"unknown": (tokens.new_token(), "123456"), "expired": (expired.token, expired.pin),
            "revoked": (revoked.token, revoked.pin), "locked": (locked.token, locked.pin)}


def test_unknown_expired_revoked_and_locked_links_look_the_same(app: Flask,
                                                                world: World) -> None:
    cases = _unknown_and_ended_links(app, world)
    answers = {name: open_link(app.test_client(), token, pin)
               for name, (token, pin) in cases.items()}
    assert {a.status_code for a in answers.values()} == {404}
    assert len({a.data for a in answers.values()}) == 1
    assert len({a.headers.get("Content-Type") for a in answers.values()}) == 1
    timings: dict[str, list[float]] = {name: [] for name in cases}
    client = app.test_client()
    for _round in range(50):
        for name, (token, pin) in cases.items():
            start = time.perf_counter()
            client.post("/s/exchange", data={"token": token, "pin": pin})
            timings[name].append(time.perf_counter() - start)
    medians = [statistics.median(t) for t in timings.values()]
    assert max(medians) - min(medians) < 0.005, medians


@pytest.mark.parametrize("language", ["de", "fr", "es"])
def test_in_the_links_language_unknown_and_ended_links_still_look_the_same(
        app: Flask, world: World, language: str) -> None:
    """docs/security.md 16 with a link that names its language (``/s?lang=xx``, the
    landing form posts there too): one answer, in that language, for every kind of link."""
    cases = _unknown_and_ended_links(app, world)
    answers = {name: app.test_client().post(f"/s/exchange?lang={language}",
                                            data={"token": token, "pin": pin})
               for name, (token, pin) in cases.items()}
    assert {a.status_code for a in answers.values()} == {404}
    assert len({a.data for a in answers.values()}) == 1
    # The same headers, by name (their values differ only where they must: a CSP nonce, a
    # request id), and the same Content-Type.
    assert len({tuple(sorted(a.headers.keys())) for a in answers.values()}) == 1
    assert len({a.headers.get("Content-Type") for a in answers.values()}) == 1
    english = app.test_client().post("/s/exchange", data={"token": tokens.new_token(),
                                                          "pin": "123456"})
    page = answers["unknown"].get_data(as_text=True)
    assert english.status_code == 404 and answers["unknown"].data != english.data
    assert f'lang="{language}"' in page


def test_ten_wrong_pins_lock_the_link_and_the_right_one_then_fails(app: Flask,
                                                                   world: World) -> None:
    made = make_share(world)
    wrong = "000000" if made.pin != "000000" else "111111"
    client = app.test_client()
    statuses = [open_link(client, made.token, wrong).status_code for _ in range(10)]
    assert statuses == [401] * 9 + [403]
    row = link_row(app, made.link.public_id)
    assert row.failed_attempts == 10 and row.locked_at is not None
    assert open_link(client, made.token, made.pin).status_code == 404
    assert open_link(client, made.token, wrong).status_code == 404
    assert link_row(app, made.link.public_id).failed_attempts == 10


def test_wrong_pin_message_counts_down_and_a_success_resets(app: Flask, world: World) -> None:
    made = make_share(world)
    wrong = "000000" if made.pin != "000000" else "111111"
    client = app.test_client()
    first = open_link(client, made.token, wrong)
    assert "9 more times" in first.get_data(as_text=True)
    assert made.token in first.get_data(as_text=True)  # kept in the form, not in a URL
    assert open_link(client, made.token, "").status_code == 401  # missing PIN: not counted
    assert link_row(app, made.link.public_id).failed_attempts == 1
    assert open_link(client, made.token, made.pin).status_code == 303
    assert link_row(app, made.link.public_id).failed_attempts == 0


def test_link_without_pin_opens_with_the_button_alone(app: Flask, world: World) -> None:
    made = make_share(world, with_pin=False)
    assert made.pin is None and made.link.pin_hash == ""
    assert open_link(app.test_client(), made.token, "").status_code == 303


# -- 15: revocation ------------------------------------------------------------------------

def test_revocation_ends_open_sessions(app: Flask, world: World) -> None:
    made = make_share(world)
    viewer = app.test_client()
    open_link(viewer, made.token, made.pin)
    thumb = f"/dicomweb/studies/{world.study}/series/{world.series}/thumbnail"
    assert viewer.get(thumb).status_code == 200
    with app.extensions["db"].write_transaction() as session:
        service.revoke_link(session, world.doctor, made.link.public_id)
    assert viewer.get(thumb).status_code == 401
    assert open_link(app.test_client(), made.token, made.pin).status_code == 404


def test_revoke_every_link_of_a_study_or_patient(app: Flask, world: World) -> None:
    a, b = make_share(world), make_share(world)
    sibling = make_share(world, study_uid=world.sibling)
    with app.extensions["db"].write_transaction() as session:
        assert service.revoke_links_of_study(session, world.doctor, world.study) == 2
        assert service.revoke_links_of_patient(session, world.doctor, world.study) == 1
    for made in (a, b, sibling):
        assert link_row(app, made.link.public_id).revoked_at is not None


# -- 21: who opened the images ------------------------------------------------------------------

def test_accesses_are_audited_and_shown(app: Flask, world: World) -> None:
    made = make_share(world)
    who = f"share:{made.link.public_id}"
    first, second = app.test_client(), app.test_client()
    for client in (first, second):
        assert open_link(client, made.token, made.pin).status_code == 303
    assert first.get(f"/studies/{world.study}").status_code == 200
    with app.extensions["db"].new_session() as session:
        rows = list(session.scalars(select(AuditEvent).where(AuditEvent.who == who)))
    exchanges = [r for r in rows if r.event_id == "110114" and r.outcome == 0]
    views = [r for r in rows if r.event_id == "110103"]
    assert len(exchanges) == 2 and len(views) >= 1
    assert all(r.study_instance_uid == world.study for r in views)
    assert exchanges[0].details["device"] == "phone"
    page = second.get("/shared/accesses").get_data(as_text=True)
    assert page.count("opened the link") == 2 and "looked at the images" in page
    assert "Dr House" not in page  # he has not looked yet
    # Once the doctor looks, the visitor sees that he did, but not from where.
    with app.test_request_context():
        audit.record(app.extensions["db"], audit.INSTANCES_ACCESSED, action="R",
                     outcome=audit.OUTCOME_SUCCESS, who="machine:ward-viewer",
                     source_address="10.9.8.7", study_instance_uid=world.study)
    page = second.get("/shared/accesses").get_data(as_text=True)
    assert "An imaging system looked at the images" in page and "10.9.8.7" not in page
    with app.test_request_context(), app.extensions["db"].new_session() as session:
        link = session.scalars(select(ShareLink).where(ShareLink.id == made.link.id)).one()
        listed = service.accesses(session, link)
    assert sum(1 for a in listed if a.what == "opened the link") == 2
    assert {a.device for a in listed if a.what == "opened the link"} == {"phone"}
    assert link_row(app, made.link.public_id).use_count == 2


def test_a_link_made_for_a_patient_speaks_plainly(app: Flask, world: World) -> None:
    """A patient who opens his link reads plain words, as a signed-in patient does; a
    colleague's link keeps the clinical terms."""
    for audience, plain in (("patient", True), ("physician", False)):
        made = make_share(world, audience=audience)
        client = app.test_client()
        open_link(client, made.token, made.pin)
        page = client.get(f"/studies/{world.study}").get_data(as_text=True)
        assert ("Your scan" in page) is plain, audience
        assert ("Accession" in page) is not plain, audience
