"""A share link keeps its language (issue 21 item 3, docs/i18n.md): the form offers it,
chosen beforehand as the patient's own language when his account has one, else the sender's;
the link's text messages and e-mail are written in it, its landing page and the visitor's pages
open in it unless the visitor switched, and the sender's own notices stay in his language. The
offline page speaks the language of the last page. Real SMTP (aiosmtpd) and SMS webhook
receivers on 127.0.0.1, the real identity provider, Debian Chromium on two phones."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import closing
from email.header import decode_header, make_header
from email.message import Message
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from babel.messages.pofile import read_po
from flask import Flask
from flask.testing import FlaskClient
from playwright.sync_api import Page, expect
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from portal.access.grants import create_grant, link_patient
from portal.access.models import User
from portal.access.principal import Principal
from portal.archive import current_archive
from portal.index.models import Order
from portal.sharing.models import ShareLink
from portal.sharing.routes import PORTAL_NAME
from tests.browser import PHONES, chromium, loopback_only, phone
from tests.conftest import IdentityProvider, LiveServer, add_person, csrf_of, signed_in, wait_for
from tests.factories import make_instance
from tests.sharing.conftest import link_row
from tests.sharing.test_delivery import Mailbox
from tests.sharing.test_delivery import mailbox as mailbox  # a real SMTP server
from tests.sharing.test_delivery import portal as portal  # e-mail and SMS configured
from tests.sharing.test_delivery import sms as sms  # a real SMS webhook receiver
from tests.studies.support import shot, sign_in_browser
from tests.test_page_sweep import _check_page

CATALOGS = Path(__file__).resolve().parents[2] / "portal" / "translations"
SETUP = Principal("user", 0, "setup", roles=frozenset({"office_manager"}))


@cache
def _catalog(language: str) -> dict[str, str]:
    with open(CATALOGS / language / "LC_MESSAGES" / "messages.po", "rb") as po:
        return {str(m.id): str(m.string) for m in read_po(po) if isinstance(m.id, str)}


def de(msgid: str) -> str:
    """The German catalog's words (an empty or missing translation fails here)."""
    words = _catalog("de")[msgid]
    assert words and words != msgid, msgid
    return words


def _granted(app: Flask, idp: IdentityProvider, **instance: Any) -> tuple[str, str]:
    """A physician (English, no language chosen) granted a new study made of ``instance``'s
    values: (his subject, the study's UID)."""
    sub = f"doc-{generate_uid()[-8:]}"
    doctor_id = add_person(app, idp, sub, ["physician"], "Clinic", name="Dr Wilson")
    study = generate_uid()
    with app.app_context():
        current_archive().ingest(make_instance(study=study, **instance), who="t")
    with app.extensions["db"].write_transaction() as session:
        create_grant(session, SETUP, user_id=doctor_id, study_uid=study)
    return sub, study


def _share_forms(app: Flask, sub: str, study: str) -> Iterator[tuple[str, Page]]:
    """The study's share form on each phone in turn, signed in as ``sub`` (close it, e.g.
    with ``contextlib.closing``, to stop the server and the browser when a check fails)."""
    with LiveServer(app) as server, chromium() as (playwright, browser):
        for device in PHONES:
            context = browser.new_context(**phone(playwright, device))
            try:
                loopback_only(context)
                page = context.new_page()
                sign_in_browser(page, server.url, sub=sub)
                page.goto(f"{server.url}/studies/{study}/share")
                yield device, page
            finally:
                context.close()


def _study(app: Flask, idp: IdentityProvider, *,
           reader: str | None = None) -> tuple[FlaskClient, str]:
    """A physician (English, no language chosen) signed in, with a granted study; with
    ``reader``, the study's patient has a portal account that chose that language ('': none)."""
    patient_id = f"PAT-{generate_uid()[-6:]}"
    sub, study = _granted(app, idp, patient_id=patient_id)
    with app.extensions["db"].write_transaction() as session:
        if reader is not None:
            patient = User(issuer=idp.issuer, subject=f"pat-{patient_id}", roles=["patient"],
                           display_name="Anna", language=reader, active=True,
                           security_epoch=0)
            session.add(patient)
            session.flush()
            link_patient(session, SETUP, patient.id, patient_id)
    return signed_in(app, idp, sub), study


def _selected_language(html: str) -> str:
    select_html = re.search(r'<select id="share-language".*?</select>', html, re.S)
    assert select_html, "the share form has no language choice"
    chosen = re.findall(r'<option value="(\w+)"[^>]*\bselected\b', select_html.group(0))
    assert len(chosen) == 1, chosen
    return chosen[0]


def _make(doctor: FlaskClient, study: str, language: str, **extra: str) -> dict[str, str]:
    page = doctor.post(f"/studies/{study}/share", data={
        "csrf_token": csrf_of(doctor), "days": "5", "pin": "on", "language": language,
        **extra})
    assert page.status_code == 201, page.status_code
    html = page.get_data(as_text=True)
    found = {key: re.search(pattern, html) for key, pattern in (
        ("token", r'name="token" value="([^"]+)"'), ("pin", r'id="share-pin">(\d+)<'),
        ("public_id", r'/shares/([0-9a-f-]{36})"'),
        ("url", r'id="share-url"[^>]*value="([^"]+)"'))}
    assert all(found.values()), found
    return {key: match.group(1) for key, match in found.items() if match}


def _send(doctor: FlaskClient, made: dict[str, str], **form: str) -> Any:
    return doctor.post(f"/shares/{made['public_id']}/send", data={
        "csrf_token": csrf_of(doctor), "token": made["token"], "pin": made["pin"], **form})


def _lang(html: str) -> str:
    found = re.search(r'<html lang="([^"]+)"', html)
    assert found
    return found.group(1)


def _subject(message: Message) -> str:
    return str(make_header(decode_header(message["Subject"])))


def _body(message: Message) -> str:
    payload = message.get_payload(decode=True)
    assert isinstance(payload, bytes)
    return payload.decode()


def test_a_share_for_a_patient_who_reads_german(portal: Flask, idp: IdentityProvider,
                                                mailbox: tuple[Mailbox, int],
                                                sms: tuple[list[dict[str, Any]], int]) -> None:
    doctor, study = _study(portal, idp, reader="de")
    form = doctor.get(f"/studies/{study}/share", headers={"Accept-Language": "en"})
    html = form.get_data(as_text=True)
    assert _lang(html) == "en"  # the doctor's page stays English
    assert _selected_language(html) == "de"  # the patient's language, chosen beforehand
    assert "The patient chose Deutsch in the portal." in html

    # The API (no language given) takes the patient's language too.
    api = doctor.post("/api/shares", json={"study_uid": study},
                      headers={"X-CSRF-Token": csrf_of(doctor)})
    assert api.status_code == 201 and "/s?lang=de#" in api.get_json()["link"]

    made = _make(doctor, study, _selected_language(html), notify="on")
    assert made["url"].endswith(f"/s?lang=de#{made['token']}")
    assert link_row(portal, made["public_id"]).language == "de"

    # The link by e-mail and by text message, the PIN by text message: German words.
    assert _send(doctor, made, what="link", channel="email",
                 to="anna@example.test").status_code == 200
    assert _send(doctor, made, what="link", channel="sms", to="+491700000011").status_code \
        == 200
    assert _send(doctor, made, what="pin", channel="sms", to="+491700000012").status_code \
        == 200
    assert wait_for(lambda: len(mailbox[0].messages) == 1)
    email = mailbox[0].messages[0]
    assert _subject(email) == de("Images shared with you")
    body = _body(email)
    assert de("If you did not expect this message, you can ignore it.") in body
    assert made["url"] in body
    texts = [call["json"]["text"] for call in sms[0]]
    assert texts == [
        de("%(portal)s: images were shared with you. Open: %(link)s")
        % {"portal": PORTAL_NAME, "link": made["url"]},
        de("%(portal)s: the PIN for the images shared with you is %(pin)s")
        % {"portal": PORTAL_NAME, "pin": made["pin"]}]
    # The doctor's own page after sending stays in his language.
    assert "The link was sent." in _send(doctor, made, what="link", channel="email",
                                         to="anna2@example.test").get_data(as_text=True)

    # The visitor's phone asks for English: the landing page is German all the same.
    visitor = portal.test_client()
    url = urlsplit(made["url"])
    landing = visitor.get(f"{url.path}?{url.query}", headers={"Accept-Language": "en"})
    page = landing.get_data(as_text=True)
    assert _lang(page) == "de"
    assert de("PIN, if you were given one (by text message or on paper)") in page
    assert 'action="/s/exchange?lang=de"' in page
    # A wrong PIN answers in German too (the form posts to the link's language).
    wrong = visitor.post("/s/exchange?lang=de", data={"token": made["token"], "pin": "0"},
                         headers={"Accept-Language": "en"})
    assert wrong.status_code == 401 and _lang(wrong.get_data(as_text=True)) == "de"
    opened = visitor.post("/s/exchange?lang=de", data={"token": made["token"],
                                                       "pin": made["pin"]},
                          headers={"Accept-Language": "en"})
    assert opened.status_code == 303
    shown = visitor.get(opened.headers["Location"], headers={"Accept-Language": "en"})
    assert shown.status_code == 200 and _lang(shown.get_data(as_text=True)) == "de"
    home = visitor.get("/shared", headers={"Accept-Language": "en"}).get_data(as_text=True)
    assert _lang(home) == "de" and de("Your shared images") in home

    # The sender asked to hear of the first use: in his language, not in the link's.
    assert wait_for(lambda: len(mailbox[0].messages) == 3)
    notice = mailbox[0].messages[2]
    assert _subject(notice) == "Your share link was opened"

    # The switch still wins: French from now on, on the visitor's pages and the landing.
    switched = visitor.post("/language", data={"language": "fr", "next": "/shared"})
    assert switched.status_code == 303
    assert _lang(visitor.get("/shared").get_data(as_text=True)) == "fr"
    assert _lang(visitor.get("/s?lang=de").get_data(as_text=True)) == "fr"


def test_the_form_chooses_the_senders_language_when_the_recipients_is_unknown(
        portal: Flask, idp: IdentityProvider) -> None:
    doctor, study = _study(portal, idp, reader="")
    english = doctor.get(f"/studies/{study}/share").get_data(as_text=True)
    assert _selected_language(english) == "en" and "The patient chose" not in english
    # A patient account without a chosen language tells nothing either; the sender's own
    # language (here from his browser) is chosen.
    french = doctor.get(f"/studies/{study}/share", headers={"Accept-Language": "fr-CH, fr"})
    assert _selected_language(french.get_data(as_text=True)) == "fr"
    made = _make(doctor, study, "es")
    assert made["url"].endswith(f"/s?lang=es#{made['token']}")
    assert link_row(portal, made["public_id"]).language == "es"


def test_a_language_the_portal_does_not_offer_is_refused(portal: Flask,
                                                         idp: IdentityProvider) -> None:
    doctor, study = _study(portal, idp)
    for language in ("xx", "eo", "de-DE", "<b>"):
        refused = doctor.post(f"/studies/{study}/share", data={
            "csrf_token": csrf_of(doctor), "days": "5", "pin": "on", "language": language})
        assert refused.status_code == 400, language
        assert "that language is not offered for the message" in refused.get_data(as_text=True)
    api = doctor.post("/api/shares", json={"study_uid": study, "language": "xx"},
                      headers={"X-CSRF-Token": csrf_of(doctor)})
    assert api.status_code == 400
    assert "that language is not offered for the message" in api.get_json()["error"]
    with portal.extensions["db"].new_session() as session:
        assert session.scalar(select(func.count()).select_from(ShareLink)) == 0


def test_share_form_language_choice_on_phones(oidc_app: Flask, idp: IdentityProvider) -> None:
    sub, study = _granted(oidc_app, idp, patient_id="PAT-PHONE")
    with closing(_share_forms(oidc_app, sub, study)) as forms:
        for device, page in forms:
            choice = page.get_by_label("Language of the message")
            expect(choice).to_have_value("en")
            box = choice.bounding_box()
            assert box and box["height"] >= 44 and box["width"] >= 44
            choice.select_option("de")
            problems: list[str] = []
            _check_page(page, f"share-language-{device.replace(' ', '_')}", problems, True)
            assert problems == []
            with page.expect_navigation():
                page.get_by_role("button", name="Make the link").click()
            assert "/s?lang=de#" in page.locator("#share-url").input_value()


def test_the_language_from_the_records_is_said_on_phones(oidc_app: Flask,
                                                         idp: IdentityProvider) -> None:
    """The share form names the patient's language the RIS gave (an order's PID-15),
    chosen beforehand; checked on both phones in light and dark (axe, 360 px, 44 px)."""
    sub, study = _granted(oidc_app, idp, patient_id="PAT-REC", AccessionNumber="ACC-REC")
    with oidc_app.extensions["db"].write_transaction() as session:
        session.add(Order(accession_number="ACC-REC", patient_id="PAT-REC",
                          patient_language="es", status="performed"))
    with closing(_share_forms(oidc_app, sub, study)) as forms:
        for device, page in forms:
            expect(page.get_by_label("Language of the message")).to_have_value("es")
            expect(page.locator("#language-hint")).to_contain_text(
                "Español is the patient's language in the hospital's records.")
            problems: list[str] = []
            _check_page(page, f"share-records-{device.replace(' ', '_')}", problems, True)
            assert problems == []


def test_the_offline_page_speaks_the_last_pages_language(portal: Flask,
                                                         idp: IdentityProvider) -> None:
    doctor, study = _study(portal, idp)
    made = _make(doctor, study, "de")
    with LiveServer(portal) as server, chromium() as (playwright, browser):
        context = browser.new_context(**phone(playwright, "iPhone 13"), locale="en-US")
        loopback_only(context)
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        url = urlsplit(made["url"])
        page.goto(f"{server.url}{url.path}?{url.query}#{made['token']}")
        assert page.evaluate("() => document.documentElement.lang") == "de"
        page.wait_for_function("() => navigator.serviceWorker.controller !== null",
                               timeout=15000)
        context.set_offline(True)
        page.goto(f"{server.url}/shared")
        expect(page.locator("h1")).to_have_text("Keine Verbindung")
        assert page.evaluate("() => document.documentElement.lang") == "de"
        expect(page.locator(".brand")).to_have_text(de("Referrer portal"))
        problems: list[str] = []
        _check_page(page, "offline-de-iPhone_13", problems, True)
        assert problems == []
        shot(page, "offline-de-iPhone_13")
        # A browser that never showed a portal page: the phone's own language.
        page.evaluate("() => localStorage.clear()")
        page.goto(f"{server.url}/studies")
        expect(page.locator("h1")).to_have_text("No connection")
        context.set_offline(False)
        assert errors == []
        context.close()
