"""The study list pages by keyset: an "Older" link names the last row's study, a "Newer" link
the first row's, and the next page starts right beside it in the list's order (study date,
time, id). Page 39 then costs what page 1 costs (benchmarks/index_scale.py), and studies that
arrive while someone scrolls neither repeat a row nor hide one. The page number stays in the
link; the link carries the study's row id only, never its date (docs/security.md 28)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient
from pydicom.uid import generate_uid

from portal.access.grants import create_grant
from portal.access.principal import Principal
from portal.archive import current_archive
from portal.index.models import Study
from portal.studies import service
from tests.conftest import (
    OIDC_SETTINGS,
    IdentityProvider,
    add_person,
    close_app,
    make_app,
    signed_in,
)
from tests.factories import make_instance

ADMIN = Principal("user", 0, "t", roles=frozenset({"office_manager"}), issuer="t", subject="t")
PAGE = 4


@pytest.fixture
def list_app(tmp_path: Path, database_url: str, idp: IdentityProvider) -> Iterator[Flask]:
    """The app signing people in at the mock provider, on SQLite and on PostgreSQL."""
    application = make_app(tmp_path / "instance", database_url, OIDC_ISSUER=idp.issuer,
                           **OIDC_SETTINGS)
    yield application
    close_app(application)


def _add(app: Flask, n: int, date: str, time: str, *, visible: bool, user: int) -> str:
    uid = generate_uid()
    with app.app_context():
        current_archive().ingest(make_instance(
            study=uid, patient_id=f"K{n}", patient_name=f"Keyset^{n:02d}", StudyDate=date,
            StudyTime=time, modality="MR" if n % 3 else "CT"), who="test")
    if visible:
        with app.extensions["db"].write_transaction() as session:
            create_grant(session, ADMIN, user_id=user, study_uid=uid)
    return uid


def _fill(app: Flask, user: int) -> list[str]:
    """19 studies the doctor sees, in the list's order (newest first; same date and time:
    the later row first), and 5 he does not see between them."""
    made: list[tuple[str, str, str]] = []
    for n in range(24):
        # Groups of four share a date, pairs within them a time: the id breaks the ties.
        date, time = f"202503{n // 4 + 1:02d}", f"1{n % 4 // 2}0000"
        uid = _add(app, n, date, time, visible=n % 5 != 2, user=user)
        if n % 5 != 2:
            made.append((date, time, uid))
    with app.extensions["db"].new_session() as session:
        ids = {uid: i for uid, i in session.query(Study.study_instance_uid, Study.id)}
    made.sort(key=lambda m: (m[0], m[1], ids[m[2]]), reverse=True)
    return [uid for _date, _time, uid in made]


def _rows(html: str) -> list[str]:
    return re.findall(r'class="study" href="/studies/([0-9.]+)"', html)


def _link(html: str, rel: str) -> str | None:
    found = re.search(rf'rel="{rel}" href="([^"]*)"', html)
    return found.group(1).replace("&amp;", "&") if found else None


def _walk(client: FlaskClient, start: str, rel: str) -> tuple[list[list[str]], list[str]]:
    """Follow ``rel`` links from ``start``: each page's rows, and each link followed."""
    pages, links = [], []
    html = client.get(start).get_data(as_text=True)
    pages.append(_rows(html))
    while (link := _link(html, rel)) is not None:
        links.append(link)
        answer = client.get(f"/studies{link}")
        assert answer.status_code == 200, (link, answer.status_code)
        html = answer.get_data(as_text=True)
        pages.append(_rows(html))
        assert len(pages) < 20, "the links go round in circles"
    return pages, links


def test_older_and_newer_links_walk_the_list_by_keyset(list_app: Flask, idp: IdentityProvider,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    user = add_person(list_app, idp, "keyset-doc", ["physician"])
    expected = _fill(list_app, user)
    monkeypatch.setattr(service, "PAGE_SIZE", PAGE)
    client = signed_in(list_app, idp, "keyset-doc")

    pages, links = _walk(client, "/studies", "next")
    assert [uid for page in pages for uid in page] == expected  # each once, in order
    assert [len(page) for page in pages] == [4, 4, 4, 4, 3]
    with list_app.extensions["db"].new_session() as session:
        ids = {uid: i for uid, i in session.query(Study.study_instance_uid, Study.id)}
    for number, (link, page) in enumerate(zip(links, pages, strict=False), start=2):
        # The page's number is kept; the place is the last row's study id, not an offset.
        assert f"page={number}" in link and f"after={ids[page[-1]]}" in link, link
        assert "before=" not in link and "2025" not in link, link
    # And back up from the last page, "Newer" after "Newer", to a first page without one.
    last = f"/studies{links[-1]}"
    back, back_links = _walk(client, last, "prev")
    assert back == pages[::-1]
    assert all(f"before={ids[page[0]]}" in link
               for link, page in zip(back_links, back, strict=False))
    first = client.get(f"/studies{back_links[-1]}").get_data(as_text=True)
    assert _link(first, "prev") is None and "page=2&" in (_link(first, "next") or "")

    # The same filter stays on every page (here: the MR studies only).
    mr_pages, mr_links = _walk(client, "/studies?modality=MR", "next")
    with list_app.extensions["db"].new_session() as session:
        mr = {uid for (uid,) in session.query(Study.study_instance_uid)
              .filter(Study.modalities_in_study == "MR")}
    assert [u for page in mr_pages for u in page] == [u for u in expected if u in mr]
    assert mr_links and all("modality=MR" in link for link in mr_links)


def test_studies_arriving_while_scrolling_neither_repeat_nor_hide_a_row(
        list_app: Flask, idp: IdentityProvider, monkeypatch: pytest.MonkeyPatch) -> None:
    """With offsets, three newer studies pushed page 1's last three rows onto page 2."""
    user = add_person(list_app, idp, "arrival-doc", ["physician"])
    expected = _fill(list_app, user)
    monkeypatch.setattr(service, "PAGE_SIZE", PAGE)
    client = signed_in(list_app, idp, "arrival-doc")
    html = client.get("/studies").get_data(as_text=True)
    seen = _rows(html)
    for n in range(3):  # newer than everything listed
        _add(list_app, 100 + n, "20251231", "235900", visible=True, user=user)
    while (link := _link(html, "next")) is not None:
        html = client.get(f"/studies{link}").get_data(as_text=True)
        seen += _rows(html)
    assert seen == expected


def test_a_place_the_reader_may_not_see_or_no_number_is_a_400(
        list_app: Flask, idp: IdentityProvider) -> None:
    user = add_person(list_app, idp, "place-doc", ["physician"])
    _fill(list_app, user)
    hidden = _add(list_app, 99, "20250315", "120000", visible=False, user=user)
    with list_app.extensions["db"].new_session() as session:
        hidden_id = session.query(Study.id).filter_by(study_instance_uid=hidden).scalar()
    client = signed_in(list_app, idp, "place-doc")
    # Another person's study may not place his list: its date would show between the rows.
    for query, reason in ((f"after={hidden_id}", "no longer in your list"),
                          (f"before={hidden_id}", "no longer in your list"),
                          ("after=99999", "no longer in your list"),
                          ("after=abc", "after must be an integer"),
                          ("before=-1", "before must be an integer"),
                          ("after=99999999999999", "after must be an integer")):
        answer = client.get(f"/studies?page=2&{query}")
        assert answer.status_code == 400, query
        assert reason in answer.get_data(as_text=True), query
    # A bookmark of the old kind (page=N, an offset) still opens its page.
    assert len(_rows(client.get("/studies?page=1").get_data(as_text=True))) == 19
