"""Revoking share links from the console's shares page on an iPhone 13 (issue 15 item 6): one
confirmation that says what happens (the link stops at once and cannot be reopened), at most
three taps, and afterwards the link answers exactly like one that never existed."""

from __future__ import annotations

import re
import secrets

import requests
from playwright.sync_api import Page, expect
from sqlalchemy import select

from portal.access.models import AuditEvent, User
from portal.access.principal import user_principal
from portal.sharing import service
from portal.sharing.models import ShareLink
from portal.sharing.routes import share_policy
from tests.admin.conftest import Practice
from tests.admin.test_console_journeys import Taps, console  # noqa: F401
from tests.browser import shared_browser  # noqa: F401
from tests.studies.support import shot


def _share(practice: Practice, study_uid: str) -> service.NewShare:
    with practice.app.test_request_context(), \
            practice.app.extensions["db"].write_transaction() as session:
        doctor = user_principal(session.get(User, practice.house), "session")
        made = service.create_share(session, doctor, share_policy(), study_uid=study_uid)
        made.link.public_id  # noqa: B018 - loaded before the session closes
        return made


def _answer(base: str, token: str, pin: str) -> tuple[int, str]:
    """What opening a link answers to someone who has it (no cookies): status and the
    page's words (nonces aside)."""
    response = requests.post(f"{base}/s/exchange", data={"token": token, "pin": pin},
                             allow_redirects=False, timeout=30)
    main = re.search(r"<main.*?</main>", response.text, re.S)
    return response.status_code, main.group(0) if main else response.text


def test_revoke_a_link_from_the_shares_page_with_one_confirmation(
        practice: Practice, console: tuple[Page, str]) -> None:  # noqa: F811
    page, url = console
    doe = _share(practice, practice.doe_studies[0])  # Jane Doe's CT chest
    roe = _share(practice, practice.roe_study)
    assert _answer(url, doe.token, doe.pin or "")[0] == 303  # it opens now
    page.goto(url + "/admin/shares")
    taps = Taps(page)
    row = page.locator("li.study", has_text="Jane Doe\u2019s CT chest")
    taps.tap("li.study:has-text('Jane Doe\u2019s CT chest') a:has-text('Revoke')")
    expect(page.locator("main")).to_contain_text(
        "The link to Jane Doe\u2019s CT chest of 2026-01-05 stops working at once for everyone "
        "who has it; it cannot be reopened \u2014 send a new link instead.")
    assert "Richard Roe" not in page.locator("main").inner_text()
    shot(page, "console-revoke-link-confirm")
    taps.tap("button:has-text('Revoke the link now')")
    expect(page.locator(".flash")).to_contain_text("Revoked 1 link")
    shot(page, "console-revoke-link-done")
    assert taps.count <= 3
    expect(row.locator(".state")).to_have_text("revoked")
    expect(row.locator("a:has-text('Revoke')")).to_have_count(0)  # nothing to reopen it

    revoked = _answer(url, doe.token, doe.pin or "")
    unknown = _answer(url, secrets.token_urlsafe(32), "123456")
    assert revoked == unknown and revoked[0] != 303
    with practice.app.extensions["db"].new_session() as session:
        states = {link.public_id: link.revoked_at is not None
                  for link in session.scalars(select(ShareLink))}
        records = [e for e in session.scalars(select(AuditEvent).where(
            AuditEvent.event_id == "110113")) if e.details.get("revoked")]
    assert states == {doe.link.public_id: True, roe.link.public_id: False}
    assert [r.details.get("share") for r in records] == [doe.link.public_id]


def test_bulk_revoke_goes_through_the_same_confirmation(
        practice: Practice, console: tuple[Page, str]) -> None:  # noqa: F811
    page, url = console
    made = [_share(practice, uid) for uid in practice.doe_studies]
    _share(practice, practice.roe_study)
    page.goto(url + "/admin/shares")
    page.locator("li.study:has-text('Jane Doe\u2019s CT chest') input[name=link]").check()
    page.locator("li.study:has-text('MR knee') input[name=link]").check()
    page.locator("button:has-text('Revoke the ticked links')").click()
    main = page.locator("main")
    expect(main).to_contain_text("Revoke 2 links?")
    expect(main).to_contain_text("The link to Jane Doe\u2019s MR knee of 2026-03-01 stops "
                                 "working at once")
    assert main.inner_text().count("it cannot be reopened") == 2
    page.locator("a:has-text('Cancel')").click()  # cancelling changes nothing
    expect(page.locator("h1")).to_have_text("Share links")
    with practice.app.extensions["db"].new_session() as session:
        assert all(link.revoked_at is None for link in session.scalars(select(ShareLink)))
    page.go_back()
    page.locator("button:has-text('Revoke 2 links now')").click()
    expect(page.locator(".flash")).to_contain_text("Revoked 2 links")
    with practice.app.extensions["db"].new_session() as session:
        revoked = {link.public_id for link in session.scalars(select(ShareLink))
                   if link.revoked_at is not None}
    assert revoked == {m.link.public_id for m in made}


def test_confirmation_refuses_nothing_chosen_and_unknown_links(
        practice: Practice, console: tuple[Page, str]) -> None:  # noqa: F811
    page, url = console
    nothing = page.goto(url + "/admin/shares/revoke")
    assert nothing is not None and nothing.ok  # back to the list, with the reason
    expect(page.locator(".flash")).to_contain_text("tick at least one link")
    unknown = page.request.get(url + "/admin/shares/revoke?link=" + "0" * 36)
    assert unknown.status == 404


