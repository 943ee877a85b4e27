"""Every console page on a phone, light and dark, with 50 grants and 200 audit records: axe
finds nothing serious or critical, nothing is wider than a 360 px screen, no bare UID shows
outside a details view, and controls are at least 44 x 44 CSS px."""

from __future__ import annotations

from typing import Any

import pytest
from playwright.sync_api import Page

from portal import audit
from portal.access.grants import create_grant
from portal.index.models import Patient
from tests.admin.conftest import SYSTEM, Practice
from tests.browser import PHONES, loopback_only, phone, shared_browser  # noqa: F401
from tests.conftest import LiveServer
from tests.studies.support import shot, sign_in_browser

AXE_TAGS = ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa"]


def _fill(practice: Practice) -> int:
    """50 grants and 200 audit records about Jane Doe's studies; her patient record id."""
    from sqlalchemy import select

    with practice.app.extensions["db"].write_transaction() as session:
        record = session.scalars(select(Patient).where(Patient.patient_id == "DOE-1")).one().id
        for n in range(50):
            create_grant(session, SYSTEM, user_id=practice.newcomer,
                         study_uid=practice.doe_studies[n % 2], reason=f"rota week {n}")
        for n in range(150):
            audit.append(session, audit.INSTANCES_ACCESSED, action="R",
                         outcome=audit.OUTCOME_SUCCESS, who="user:t|t",
                         study_instance_uid=practice.doe_studies[n % 2], patient_id="DOE-1",
                         details={"n": n})
    return record


def _share_and_failed_notice(practice: Practice) -> str:
    """A share link of Jane Doe's CT chest and a report notice that could not go; the link's
    public id (for its revoke confirmation)."""
    from portal.access.models import User
    from portal.access.principal import user_principal
    from portal.reports.notify import record_failed_notice
    from portal.sharing import service
    from portal.sharing.routes import share_policy

    app = practice.app
    with app.test_request_context(), app.extensions["db"].write_transaction() as session:
        doctor = user_principal(session.get(User, practice.house), "session")
        public_id = service.create_share(session, doctor, share_policy(),
                                         study_uid=practice.doe_studies[0]).link.public_id
    record_failed_notice(app, report_id=1, user_id=practice.house, channel="text",
                         study_uid=practice.doe_studies[0], patient_id="DOE-1")
    return public_id


def _check(page: Page, name: str) -> None:
    from axe_playwright_python.sync_playwright import Axe

    assert page.evaluate("document.documentElement.scrollWidth") <= 360, name
    results = Axe().run(page, options={"runOnly": {"type": "tag", "values": AXE_TAGS}})
    assert [(v["id"], [n["target"] for n in v["nodes"]][:3])
            for v in results.response["violations"]
            if v["impact"] in ("serious", "critical")] == [], name
    # A bare UID shows only inside a closed details view.
    visible = page.locator("main").inner_text()
    assert not any(len(word) > 40 and word.count(".") > 6 for word in visible.split()), name
    controls = "main a.button, main button, main input[type=checkbox], main summary, main select"
    small = page.evaluate("""(sel) => [...document.querySelectorAll(sel)]
        .filter(e => e.offsetParent !== null)
        .map(e => { const r = e.closest('label') || e; const b = r.getBoundingClientRect();
                    return [e.outerHTML.slice(0, 80), b.width, b.height]; })
        .filter(([, w, h]) => w < 44 || h < 44)""", controls)
    assert small == [], name


@pytest.mark.parametrize("device", PHONES)
@pytest.mark.parametrize("scheme", ("light", "dark"))
def test_console_pages_on_a_phone(practice: Practice, shared_browser: Any,  # noqa: F811
                                  device: str, scheme: str) -> None:
    record = _fill(practice)
    link = _share_and_failed_notice(practice)
    playwright, browser = shared_browser
    with LiveServer(practice.app) as server:
        context = browser.new_context(**{**phone(playwright, device),
                                         "viewport": {"width": 360, "height": 780}},
                                      color_scheme=scheme)
        loopback_only(context)
        page = context.new_page()
        sign_in_browser(page, server.url, sub=practice.manager, next_path="/admin/")
        pages = {"start": "/admin/?q=doe", "give": "/admin/give?q=doe&who=nina",
                 "emergency": "/admin/give?emergency=1&q=doe",
                 "grants": "/admin/grants", "person": f"/admin/people/{practice.newcomer}",
                 "take-away": f"/admin/people/{practice.newcomer}/take-away",
                 "patient": f"/admin/patients/{record}",
                 "audit": f"/admin/audit?patient={record}", "full-audit": "/admin/audit",
                 "invite": "/admin/invite", "shares": "/admin/shares",
                 "revoke-link": f"/admin/shares/revoke?link={link}",
                 "failed-notices": "/admin/audit?notices=failed",
                 "people": "/admin/users", "identifiers": "/admin/identifiers"}
        for name, path in pages.items():
            page.goto(server.url + path)
            page.wait_for_load_state()
            shot(page, f"console-{name}-{device.replace(' ', '-')}-{scheme}")
            _check(page, name)
        context.close()
