"""Issue 13 item 6, report first for real: on a phone the study page shows the patient in one
line and then the report, whose impression is on the first screen; the report's heading
carries its status, the radiologist and the report's own date and time in the reader's zone
(not when it was received); its PDF opens in the browser instead of downloading. Debian
Chromium with the iPhone 13 and Pixel 7 profiles, light and dark."""

from __future__ import annotations

from typing import Any

import pytest
from flask import Flask
from playwright.sync_api import Page
from pydicom.uid import generate_uid

from tests.browser import PHONES, chromium, loopback_only, phone
from tests.conftest import IdentityProvider, LiveServer
from tests.reports.test_hl7 import CR, Ris, msa, people, send, store_study
from tests.reports.test_hl7 import ris as ris
from tests.studies.support import shot, sign_in_browser

ZONE = "America/New_York"  # the reader's zone: 10:10 UTC on 1 March is 05:10 there


def signed_oru(accession: str, impression: str, findings: str, *, patient: str = "P-R",
               status: str = "F") -> str:
    """An ORU^R01 whose OBR-22 (result time) is 2026-03-01 10:10 UTC and whose OBR-32 (the
    principal result interpreter) is Robert Chase."""
    obr = ["OBR", "1", f"PL{accession}", f"FI{accession}", "CTCHEST^CT chest^L", "", "",
           "20260301100000"] + [""] * 25
    obr[18], obr[22], obr[24], obr[25] = accession, "20260301101000+0000", "CT", status
    obr[32] = "1234&Chase&Robert"
    return CR.join([
        f"MSH|^~\\&|RIS|HOSP|PORTAL|HOSP|20260301101500||ORU^R01|{generate_uid()[-12:]}|P|"
        "2.5.1", f"PID|||{patient}^^^HOSP^MR||Roe^Richard||19600101|M", "|".join(obr),
        f"OBX|1|TX|&GDT||{findings}||||||{status}",
        f"OBX|2|TX|&IMP||{impression}||||||{status}"]) + CR


def page_problems(page: Page, width: int) -> list[str]:
    """What a phone page must not have: a document wider than the screen, controls smaller
    than 44 x 44 CSS px, serious or critical axe findings."""
    from axe_playwright_python.sync_playwright import Axe

    problems: list[str] = []
    wide = page.evaluate("document.documentElement.scrollWidth")
    if wide > width:
        problems.append(f"document {wide} px wide on a {width} px screen")
    small: list[Any] = page.evaluate("""() => [...document.querySelectorAll(
        'main a.button, main button, .nav a, .nav button, main a.study')]
        .filter(e => e.offsetParent !== null)
        .map(e => [e.textContent.trim().slice(0, 40), e.getBoundingClientRect()])
        .filter(([, r]) => r.width < 44 || r.height < 44)
        .map(([t, r]) => `${t}: ${Math.round(r.width)}x${Math.round(r.height)}`)""")
    problems += [f"small control {s}" for s in small]
    results = Axe().run(page, options={"runOnly": {"type": "tag", "values": [
        "wcag2a", "wcag2aa", "wcag21a", "wcag21aa"]}})
    problems += [f"axe {v['id']}: {[n['target'] for n in v['nodes']][:3]}"
                 for v in results.response["violations"]
                 if v["impact"] in ("serious", "critical")]
    return problems


@pytest.mark.parametrize("scheme", ("light", "dark"))
@pytest.mark.parametrize("device", PHONES)
def test_the_report_fills_the_first_screen_with_its_status_author_and_own_time(
        ris: Ris, idp: IdentityProvider, device: str, scheme: str) -> None:
    app: Flask = ris.app
    subjects = people(app, idp)
    accession = "F" + generate_uid()[-8:]
    study = store_study(app, accession)
    # OBR-22 (result time) 2026-03-01 10:10 UTC; OBR-32 the radiologist, Robert Chase.
    (ack,) = send(ris.port, signed_oru(accession, "Small left pleural effusion, no "
                                       "pneumothorax.", "Small left pleural effusion."))
    assert msa(ack)[0] == "AA"
    with LiveServer(app) as server, chromium() as (playwright, browser):
        context = browser.new_context(**phone(playwright, device), color_scheme=scheme,
                                      timezone_id=ZONE, locale="en-US", accept_downloads=True)
        loopback_only(context)
        page = context.new_page()
        errors: list[str] = []
        downloads: list[Any] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("download", lambda d: downloads.append(d))
        sign_in_browser(page, server.url, subjects["doctor"], f"/studies/{study}")
        card = page.locator("#report")
        impression = card.locator(".impression")
        impression.wait_for()
        when = card.locator(".report-by time")
        page.wait_for_function("() => document.querySelector('#report .report-by time')"
                               ".textContent.indexOf('UTC') < 0")  # the zone is the reader's

        # The patient in one line above; the impression is whole on the first screen.
        height = page.evaluate("window.innerHeight")
        box = impression.bounding_box()
        assert box is not None and box["y"] + box["height"] <= height, (box, height)
        assert box["y"] < height * 0.5, (box, height)
        header = page.locator(".patient-line h1").bounding_box()
        assert header is not None and header["height"] < 60  # one line
        assert header["y"] < card.bounding_box()["y"]

        # One heading carries the status; right under it the radiologist and the time the
        # report was signed, in New York time; never when the portal received it.
        heading = card.locator("h2.report-title")
        assert heading.locator(".report-status").inner_text() == "Final"
        assert card.locator(".report-by .radiologist").inner_text() == "Robert Chase"
        assert when.get_attribute("datetime") == "2026-03-01T10:10:00Z"
        assert "05:10" in when.inner_text() and "Mar" in when.inner_text()
        assert "received" not in card.inner_text().lower()
        assert page_problems(page, page.viewport_size["width"]) == []
        shot(page, f"report-first-{device.replace(' ', '_')}-{scheme}")

        # The PDF opens in the phone's browser instead of downloading.
        with page.expect_response(lambda r: r.url.endswith(".pdf")) as answer:
            card.get_by_role("link", name="Open the report (PDF)").click()
        assert answer.value.status == 200
        assert answer.value.headers["content-disposition"].startswith("inline;")
        page.wait_for_url("**/reports/*.pdf")
        assert downloads == []

        # A 360 px wide phone too.
        page.set_viewport_size({"width": 360, "height": 780})
        page.goto(f"{server.url}/studies/{study}")
        impression.wait_for()
        assert page_problems(page, 360) == []
        assert errors == []
        context.close()
