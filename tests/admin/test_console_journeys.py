"""The office manager's common tasks on an iPhone 13, each in three taps or fewer from /admin
(issue 15 item 2): typing into a search box is not a tap; choosing, following and confirming
are."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import date, timedelta
from typing import Any

import pytest
from playwright.sync_api import Page, expect
from sqlalchemy import select

from portal.access.models import AuditEvent, Grant, Invitation, User
from portal.access.principal import user_principal
from portal.db import utcnow
from portal.sharing import service
from portal.sharing.models import ShareLink
from portal.sharing.routes import share_policy
from tests.admin.conftest import Practice
from tests.browser import loopback_only, phone, shared_browser  # noqa: F401
from tests.conftest import IdentityProvider, LiveServer, signed_in
from tests.studies.support import shot, sign_in_browser


class Taps:
    """Counts taps (clicks, checks) the manager makes."""

    def __init__(self, page: Page) -> None:
        self.page, self.count = page, 0

    def tap(self, selector: str) -> None:
        """Tap the one visible element the selector names."""
        self.count += 1
        self.page.locator(selector).first.click()


@pytest.fixture
def console(practice: Practice, shared_browser: Any) -> Iterator[tuple[Page, str]]:  # noqa: F811
    """The manager signed in on an iPhone 13, on /admin."""
    playwright, browser = shared_browser
    with LiveServer(practice.app) as server:
        context = browser.new_context(**phone(playwright, "iPhone 13"))
        loopback_only(context)
        page = context.new_page()
        sign_in_browser(page, server.url, sub=practice.manager, next_path="/admin/")
        yield page, server.url
        context.close()


def _find(page: Page, text: str, expected: str, field: str = "q",
          results: str = "#find-results") -> None:
    """Type into a search box and wait for the results (they come as people type; the
    Enter key, no tap, also asks in case the page's script was not running yet)."""
    page.wait_for_load_state()
    page.fill(f"input[name={field}]", text)
    page.press(f"input[name={field}]", "Enter")
    expect(page.locator(results)).to_contain_text(expected)


def _db(practice: Practice) -> Any:
    return practice.app.extensions["db"].new_session()


def test_give_every_study_of_a_patient_until_a_date(practice: Practice,
                                                    console: tuple[Page, str]) -> None:
    page, _url = console
    taps = Taps(page)
    _find(page, "jane do", "Jane Doe")
    shot(page, "console-find-patient")
    taps.tap("#find-results a:has-text('Give all studies')")
    expect(page.locator("#chosen-studies")).to_contain_text("Every study of Jane Doe")
    _find(page, "nina", "Nina Newcomer", "who", "#people-results")
    taps.tap(f"#people-results input[value='{practice.newcomer}']")
    until = (date.today() + timedelta(days=10)).isoformat()
    page.fill("input[name=until]", until)
    page.fill("textarea[name=reason]", "covering for Dr House")
    shot(page, "console-give-filled")
    taps.tap("button:has-text('Give access')")
    expect(page.locator(".flash")).to_contain_text("Access given: 1 grant")
    shot(page, "console-give-done")
    assert taps.count <= 3
    with _db(practice) as session:
        grants = list(session.scalars(select(Grant)))
    assert len(grants) == 1 and grants[0].user_fk == practice.newcomer
    assert grants[0].patient_fk is not None and grants[0].study_instance_uid is None
    assert grants[0].expires_at is not None and grants[0].expires_at.date().isoformat() == until
    assert grants[0].reason == "covering for Dr House"


def test_give_one_study_then_take_everything_away_and_undo(practice: Practice,
                                                           console: tuple[Page, str]) -> None:
    page, url = console
    taps = Taps(page)
    _find(page, "ACC-D1", "MR knee")
    taps.tap("#find-results a:has-text('Give access')")
    expect(page.locator("#chosen-studies")).to_contain_text("MR knee")
    _find(page, "newcomer", "Nina Newcomer", "who", "#people-results")
    taps.tap(f"#people-results input[value='{practice.newcomer}']")
    taps.tap("button:has-text('Give access')")
    expect(page.locator(".flash")).to_contain_text("Access given: 1 grant")
    assert taps.count <= 3

    # Take away everything Dr Newcomer was given: one confirmation.
    page.goto(url + "/admin/")
    taps = Taps(page)
    _find(page, "nina", "Nina Newcomer")
    taps.tap("#find-results a:has-text('Access')")
    taps.tap("a:has-text('Take away everything')")
    expect(page.locator("main")).to_contain_text("loses this grant")
    shot(page, "console-take-away-confirm")
    taps.tap("button:has-text('Take away 1 grant')")
    expect(page.locator(".flash")).to_contain_text("Took away 1 grant")
    shot(page, "console-take-away-done")
    assert taps.count <= 3
    with _db(practice) as session:
        assert all(g.revoked_at is not None for g in session.scalars(select(Grant)))

    # Undo within the page: one tap gives it back.
    page.locator("button:has-text('Undo')").click()
    expect(page.locator(".flash")).to_contain_text("Given back: 1 grant")
    with _db(practice) as session:
        live = [g for g in session.scalars(select(Grant)) if g.revoked_at is None]
    assert len(live) == 1 and live[0].study_instance_uid == practice.doe_studies[1]


def test_who_saw_a_patients_studies_this_month(practice: Practice, console: tuple[Page, str],
                                               idp: IdentityProvider) -> None:
    page, _url = console
    house = signed_in(practice.app, idp, _subject(practice, practice.house))
    assert house.get(f"/studies/{practice.doe_studies[0]}").status_code == 200
    assert house.get(f"/studies/{practice.roe_study}").status_code == 200  # another patient
    taps = Taps(page)
    _find(page, "doe", "Jane Doe")
    taps.tap("#find-results a:has-text('Who saw them this month')")
    rows = page.locator("main ul.studies > li")
    expect(rows.first).to_contain_text("Opened the images")
    shot(page, "console-who-saw")
    assert taps.count <= 3
    text = page.locator("main").inner_text()
    assert "Who saw the studies of Jane Doe" in text and "Gregory House" in text
    assert "Richard Roe" not in text
    assert page.input_value("input[name=from]") == utcnow().date().replace(day=1).isoformat()


def test_open_links_of_a_patient_revoked_in_one_step(practice: Practice,
                                                     console: tuple[Page, str]) -> None:
    page, _url = console
    with practice.app.test_request_context(), \
            practice.app.extensions["db"].write_transaction() as session:
        doctor = user_principal(session.get(User, practice.house), "session")
        for uid in practice.doe_studies:
            service.create_share(session, doctor, share_policy(), study_uid=uid)
        service.create_share(session, doctor, share_policy(), study_uid=practice.roe_study)
    taps = Taps(page)
    _find(page, "doe", "Jane Doe")
    taps.tap("#find-results a:has-text('Open links')")
    expect(page.locator("#links ~ form li")).to_have_count(2)
    shot(page, "console-open-links")
    taps.tap("button:has-text('Revoke the ticked links')")
    expect(page.locator(".flash")).to_contain_text("Revoked 2 links")
    assert taps.count <= 3
    with _db(practice) as session:
        links = list(session.scalars(select(ShareLink)))
        revoked = sorted(link.revoked_at is not None for link in links)
        records = session.scalars(select(AuditEvent).where(
            AuditEvent.event_id == "110113")).all()
    assert revoked == [False, True, True]  # Richard Roe's link stays open
    assert sum(1 for r in records if r.details.get("share") and r.details.get("revoked")) == 2


def test_invite_a_physician_with_identifiers_picked_from_suggestions(
        practice: Practice, console: tuple[Page, str]) -> None:
    page, _url = console
    taps = Taps(page)
    taps.tap("a:has-text('Invite a physician')")
    page.fill("input[name=email]", "james.wilson@example.org")
    label = page.locator("label.check", has_text="JAMES WILSON")
    expect(label).to_be_visible()
    taps.tap("label.check:has-text('JAMES WILSON') input")
    shot(page, "console-invite")
    taps.tap("button:has-text('Make an invitation link')")
    expect(page.locator(".flash")).to_contain_text("/auth/invitation")
    assert taps.count <= 3
    with _db(practice) as session:
        invitation = session.scalars(select(Invitation)).one()
    assert invitation.email == "james.wilson@example.org"
    assert invitation.referrer_keys == ["name:WILSON^JAMES"]
    assert invitation.roles == ["physician"]


def _subject(practice: Practice, user_id: int) -> str:
    with _db(practice) as session:
        return str(session.get(User, user_id).subject)


def test_nothing_is_chosen_at_first(practice: Practice, console: tuple[Page, str]) -> None:
    page, url = console
    page.goto(url + "/admin/give")
    assert page.locator("input[name=user]").count() == 0
    assert page.locator("input[name=study], input[name=patient]").count() == 0
    assert page.locator("input[name=study_uid]").count() == 0  # no UID is typed anywhere
