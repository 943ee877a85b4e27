"""A patient's share link and the study page in German and in Spanish on an iPhone 13 (issue 21):
a phone set to the language gets it from Accept-Language (the words looked for are the
catalog's, so a missing or wrong translation fails), axe finds nothing serious in light and dark,
nothing is wider than the screen; the language switch at the page's foot changes the language
and the choice is kept (a cookie for a share visitor). Screenshots in tests/artifacts."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pytest
from babel.messages.pofile import read_po
from flask import Flask
from playwright.sync_api import Page, expect

from tests.browser import chromium, loopback_only, phone
from tests.conftest import LiveServer
from tests.sharing.conftest import World, make_share
from tests.sharing.conftest import world as world  # the physician, his study, its images
from tests.studies.support import shot

TAGS = ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa"]


def _inspect(page: Page, name: str) -> None:
    from axe_playwright_python.sync_playwright import Axe

    for scheme in ("light", "dark"):
        page.emulate_media(color_scheme=scheme)
        results = Axe().run(page, options={"runOnly": {"type": "tag", "values": TAGS}})
        serious = [(v["id"], [n["target"] for n in v["nodes"]][:3])
                   for v in results.response["violations"]
                   if v["impact"] in ("serious", "critical")]
        assert serious == [], (name, scheme)
        assert page.evaluate("document.documentElement.scrollWidth - window.innerWidth") <= 0
        shot(page, f"{name}-{scheme}")
    page.emulate_media(color_scheme="light")


CATALOGS = Path(__file__).resolve().parents[2] / "portal" / "translations"
PHONE_LOCALES = {"de": "de-DE", "es": "es-ES"}


@cache
def _catalog(language: str) -> dict[str, str]:
    with open(CATALOGS / language / "LC_MESSAGES" / "messages.po", "rb") as po:
        return {str(m.id): str(m.string) for m in read_po(po) if isinstance(m.id, str)}


def _t(language: str, msgid: str) -> str:
    """The catalog's words for ``msgid`` (it must be translated: an empty one fails here)."""
    words = _catalog(language)[msgid]
    assert words and words != msgid, (language, msgid)
    return words


@pytest.mark.parametrize("language", sorted(PHONE_LOCALES))
def test_share_link_and_study_page_in_the_phones_language(app: Flask, world: World,
                                                          language: str) -> None:
    def t(msgid: str) -> str:
        return _t(language, msgid)

    made = make_share(world)
    assert made.pin
    with LiveServer(app) as live, chromium() as (playwright, browser):
        context = browser.new_context(**phone(playwright, "iPhone 13"),
                                      locale=PHONE_LOCALES[language])
        loopback_only(context)
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))

        page.goto(f"{live.url}/s#{made.token}")
        assert page.evaluate("document.documentElement.lang") == language
        pin = t("PIN, if you were given one (by text message or on paper)")
        expect(page.get_by_label(pin)).to_be_visible()
        _inspect(page, f"i18n-{language}-share-landing")

        page.get_by_label(pin).fill(made.pin or "")
        with page.expect_navigation():
            page.get_by_role("button", name=t("Show my images")).click()
        # A link to one study opens it: the study page, in the phone's language.
        assert page.url == f"{live.url}/studies/{world.study}"
        expect(page.get_by_role("heading", name=t("Images"), exact=True)).to_be_visible()
        expect(page.get_by_role("heading", name=t("Your report"))).to_be_visible()
        assert page.evaluate("document.documentElement.lang") == language
        _inspect(page, f"i18n-{language}-study")

        page.goto(f"{live.url}/shared")
        expect(page.get_by_role("heading", name=t("Your shared images"))).to_be_visible()
        # Times are written by the browser in the page's language (static/js/local_time.js).
        shared_until = t("Shared until %(when)s. Tap a study to see its images.")
        expect(page.get_by_text(shared_until.split("%(when)s")[0].strip())).to_be_visible()
        _inspect(page, f"i18n-{language}-shared-home")
        page.goto(f"{live.url}/studies/{world.study}")

        # The switch at the page's foot: English, kept on the next page; then back again.
        page.get_by_label(t("Language")).select_option("en")
        with page.expect_navigation():
            page.get_by_role("button", name=t("Change")).click()
        assert page.url == f"{live.url}/studies/{world.study}"
        assert page.evaluate("document.documentElement.lang") == "en"
        expect(page.get_by_role("heading", name="Images", exact=True)).to_be_visible()
        page.goto(f"{live.url}/shared")
        expect(page.get_by_role("heading", name="Your shared images")).to_be_visible()
        page.get_by_label("Language").select_option(language)
        with page.expect_navigation():
            page.get_by_role("button", name="Change").click()
        expect(page.get_by_role("heading", name=t("Your shared images"))).to_be_visible()
        assert errors == []
        context.close()
