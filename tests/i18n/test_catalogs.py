"""The catalogs (portal/translations, docs/i18n.md): every language listed as complete in
portal/i18n.py translates every message of the template, placeholders kept; a message a
catalog leaves empty shows in English; the pages and e-mails come out in the language."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from babel.messages.catalog import Catalog
from babel.messages.pofile import read_po
from flask import Flask
from flask_babel import force_locale

from portal.i18n import COMPLETE, SUPPORTED, TRANSLATIONS
from portal.reports.notify import message, sms_text
from portal.sharing.messages import first_use_email, link_email, link_sms, locked_email, pin_sms

PLACEHOLDER = re.compile(r"%\(\w+\)[sd]")


def _catalog(path: Path, locale: str | None = None) -> Catalog:
    with path.open("rb") as handle:
        return read_po(handle, locale=locale)


def _ids(catalog: Catalog) -> set[object]:
    return {m.id for m in catalog if m.id}


def test_every_supported_language_has_a_catalog_with_every_message() -> None:
    template = _ids(_catalog(TRANSLATIONS / "messages.pot"))
    assert len(template) > 300
    for code in SUPPORTED:
        if code == "en":
            continue
        po = TRANSLATIONS / code / "LC_MESSAGES" / "messages.po"
        assert po.exists(), code
        missing = template - _ids(_catalog(po, code))
        assert not missing, f"{code}: run make i18n; missing {sorted(map(str, missing))[:5]}"


@pytest.mark.parametrize("code", COMPLETE)
def test_complete_languages_translate_every_message(code: str) -> None:
    catalog = _catalog(TRANSLATIONS / code / "LC_MESSAGES" / "messages.po", code)
    empty, fuzzy, lost = [], [], []
    for m in catalog:
        if not m.id:
            continue
        strings = m.string if isinstance(m.string, (tuple, list)) else (m.string,)
        ids = m.id if isinstance(m.id, (tuple, list)) else (m.id,)
        if not all(strings):
            empty.append(m.id)
        if m.fuzzy:
            fuzzy.append(m.id)
        wanted = set(PLACEHOLDER.findall(" ".join(ids)))
        if not all(set(PLACEHOLDER.findall(s)) <= wanted and
                   (not wanted or set(PLACEHOLDER.findall(s)) & wanted) for s in strings if s):
            lost.append(m.id)
    assert not empty, f"{code}: {len(empty)} untranslated, e.g. {empty[:5]}"
    assert not fuzzy, f"{code}: fuzzy {fuzzy[:5]}"
    assert not lost, f"{code}: placeholders changed in {lost[:5]}"


def test_empty_translation_falls_back_to_english(app: Flask) -> None:
    with app.test_request_context(headers={"Accept-Language": "de"}):
        from flask_babel import gettext

        assert gettext("Skip to content") != "Skip to content"  # German is complete
        assert gettext("a sentence no catalog holds") == "a sentence no catalog holds"


@pytest.mark.parametrize("code", COMPLETE)
def test_messages_people_receive_are_in_the_language(app: Flask, code: str) -> None:
    english: list[str] = []
    translated: list[str] = []
    for locale, out in (("en", english), (code, translated)):
        with app.app_context(), force_locale(locale):
            out.extend(link_email("Portal", "https://x.test/s#t", 3, True))
            out.extend(locked_email("Portal", "https://x.test/shares/1"))
            out.extend(first_use_email("Portal", "https://x.test/shares/1"))
            out.extend(message("https://x.test"))
            out += [link_sms("Portal", "https://x.test/s#t"), pin_sms("Portal", "123456"),
                    sms_text("https://x.test")]
    for en, other in zip(english, translated, strict=True):
        assert en != other, (code, en)
    assert "https://x.test/s#t" in translated[1] and "123456" in " ".join(translated)


def test_pages_answer_in_the_language_of_the_browser_and_of_the_switch(app: Flask) -> None:
    client = app.test_client()
    page = client.get("/no-such-page", headers={"Accept-Language": "de-DE,de;q=0.9,en;q=0.5"})
    text = page.get_data(as_text=True)
    assert '<html lang="de" dir="ltr">' in text and "Nicht gefunden" in text
    english = client.get("/no-such-page", headers={"Accept-Language": "sv, en;q=0.1"})
    assert '<html lang="en"' in english.get_data(as_text=True)
    chosen = client.post("/language", data={"language": "de", "next": "/no-such-page"},
                         headers={"Sec-Fetch-Site": "same-origin", "Accept-Language": "en"})
    assert chosen.status_code == 303 and chosen.headers["Location"] == "/no-such-page"
    again = client.get("/no-such-page", headers={"Accept-Language": "en"})
    assert '<html lang="de"' in again.get_data(as_text=True)
    refused = client.post("/language", data={"language": "xx"},
                          headers={"Sec-Fetch-Site": "same-origin"})
    assert refused.status_code == 400
    outside = client.post("/language", data={"language": "de", "next": "https://evil.test/"},
                          headers={"Sec-Fetch-Site": "same-origin"})
    assert outside.headers["Location"] == "/"


def test_a_reason_on_the_error_page_is_escaped_in_every_language(app: Flask) -> None:
    """The error page translates a reason it is given; a reason that carries the request's
    words (an unknown attribute, a name) is still escaped, in any language."""
    from portal.access.policy import public
    from portal.failures import Invalid

    @public
    def probe() -> str:
        from flask import request

        raise Invalid(f"unknown attribute {request.args.get('x', '')}")

    app.add_url_rule("/_i18n_probe", "i18n_probe", probe)
    for language in ("en", *COMPLETE):
        page = app.test_client().get("/_i18n_probe?x=<b>bold</b>",
                                     headers={"Accept": "text/html",
                                              "Accept-Language": language})
        assert page.status_code == 400
        text = page.get_data(as_text=True)
        assert "<b>bold</b>" not in text and "&lt;b&gt;bold&lt;/b&gt;" in text


@pytest.mark.parametrize(("code", "language"), [
    ("es", "es"), ("es-MX", "es"), ("SPA", "es"), ("ger", "de"), ("fra", "fr"), ("EN", "en"),
    ("iw", "he"), ("und", ""), ("mul", ""), ("zz", ""), ("", ""), ("<b>", ""), ("x" * 40, "")])
def test_a_language_code_from_the_ris_is_read_in_every_form(code: str, language: str) -> None:
    """HL7 PID-15 and FHIR carry ISO 639-1, BCP 47, HL7 table 0296 or ISO 639-2 codes."""
    from portal.i18n import spoken_language

    assert spoken_language(code) == language
