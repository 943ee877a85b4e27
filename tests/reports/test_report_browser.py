"""The report card on a phone: a physician signs in in Debian Chromium (iPhone 13, Pixel 7),
opens a study whose ORU arrived over MLLP, and reads the report above the images; the orders
page lists the appointment. Screenshots go to tests/artifacts/."""

from __future__ import annotations

import pytest
from flask import Flask
from pydicom.uid import generate_uid

from tests.browser import PHONES, chromium, loopback_only, phone
from tests.conftest import IdentityProvider, LiveServer
from tests.reports.test_hl7 import Ris, orm, oru, people, send, siu, store_study
from tests.reports.test_hl7 import ris as ris
from tests.studies.support import shot, sign_in_browser


@pytest.mark.parametrize("device", PHONES)
def test_physician_reads_the_report_first_on_a_phone(ris: Ris, idp: IdentityProvider,
                                                     device: str) -> None:
    app: Flask = ris.app
    subjects = people(app, idp)
    accession = "W" + generate_uid()[-8:]
    study = store_study(app, accession)
    send(ris.port, oru(accession, "P", "IMP:Probable small effusion."),
         oru(accession, "C", "Small left pleural effusion. <b>No</b> pneumothorax.",
             "IMP:Small left pleural effusion."),
         orm("N" + accession, "NW", "", "^Wilson^James"),
         siu("N" + accession, "S12", "202612011030"))
    with LiveServer(app) as server, chromium() as (playwright, browser):
        context = browser.new_context(**phone(playwright, device))
        loopback_only(context)
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        sign_in_browser(page, server.url, subjects["doctor"], f"/studies/{study}")
        card = page.locator("#report")
        card.get_by_text("Small left pleural effusion.", exact=True).wait_for()
        assert card.get_by_text("Amended").is_visible()
        assert "<b>No</b> pneumothorax" in card.inner_text()  # markup shown as text
        images = page.locator("#series-heading")
        assert card.bounding_box()["y"] < images.bounding_box()["y"]  # report first
        assert page.evaluate("document.documentElement.scrollWidth - window.innerWidth") <= 0
        shot(page, f"report-card-{device.replace(' ', '_')}")
        card.get_by_text("Earlier versions").click()
        assert card.get_by_text("Probable small effusion.").is_visible()
        page.goto(f"{server.url}/orders")
        assert page.locator("h1").inner_text() == "Orders and appointments"
        order = page.locator("li.order").filter(has_text="N" + accession)
        assert "scheduled" in order.inner_text() and "2026-12-01 10:30" in order.inner_text()
        assert page.evaluate("document.documentElement.scrollWidth - window.innerWidth") <= 0
        shot(page, f"orders-{device.replace(' ', '_')}")
        assert errors == []
        context.close()
