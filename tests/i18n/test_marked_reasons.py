"""Reasons people read are marked for translation (issue 21 item 1, docs/i18n.md).

A reason built with an f-string is no msgid: no catalog can hold it, so the error page, a
flash message or the upload page shows it in English whatever the reader's language. The
scan below reads the person-facing rooms and fails on ``raise X(f"...")``, ``flash(f"...")``
and ``abort(4xx, f"...")``; variable parts go into placeholders
(``raise Invalid("... %(days)d ...", days=n)``, ``_("... %(x)s", x=...)``). Then a German
uploader sees his refused files' reasons in German: on the JSON the upload page reads, and
on the page itself in Chromium.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from playwright.sync_api import Browser, Playwright
from sqlalchemy import select

from portal.inbox.models import InboxFile
from tests.browser import loopback_only, phone
from tests.browser import shared_browser as shared_browser  # the session's one Chromium
from tests.conftest import OIDC_SETTINGS, IdentityProvider, LiveServer, close_app, make_app
from tests.inbox.conftest import (
    Inbox,
    build_inbox,
    make_upload_link,
    open_link,
    outside_instance,
    upload,
)
from tests.studies.support import ARTIFACTS

ROOT = Path(__file__).resolve().parents[2]
# The rooms whose words reach a person's page (docs/architecture.md, "The rooms").
PERSON_FACING = ("auth", "studies", "sharing", "inbox", "admin", "retention", "launch",
                 "access")
GETTEXT = {"_", "gettext", "ngettext", "_l", "lazy_gettext", "N_"}
# Reasons kept as f-strings on purpose, each with why: (path, the function holding the call,
# how many such calls it holds). By function, not line, so an edit above does not stale it.
ALLOWED = {
    # The viewer's measurement API answers its script in JSON (English, docs/i18n.md); the
    # viewer shows its own translated words ("The measurements could not be saved...").
    ("portal/studies/measurements.py", "region", 1),
    ("portal/studies/measurements.py", "_checked", 3),
    ("portal/studies/measurements.py", "save", 3),
    ("portal/studies/measurements.py", "_refused_as_bad_input", 1),
    # The command line stays English (docs/i18n.md).
    ("portal/access/cli.py", "deactivate_command", 1), ("portal/access/cli.py", "_one_user", 2),
    # Client names are made on the command line (portal/access/cli.py).
    ("portal/access/clients.py", "create_client", 1),
    # A programming error (a window out of range), never a request's.
    ("portal/sharing/limits.py", "count", 1),
    # require_role refuses API clients too (JSON, English); no domain error maps 403.
    ("portal/access/policy.py", "require_role", 1),
}


def _name(func: ast.expr) -> str:
    if isinstance(func, ast.Name):
        return func.id
    return func.attr if isinstance(func, ast.Attribute) else ""


def _unmarked(tree: ast.AST) -> Iterator[tuple[int, str]]:
    """(line, what) of every reason a person may read that is an f-string."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and node.exc.args \
                and isinstance(node.exc.args[0], ast.JoinedStr):
            yield node.exc.lineno, f"raise {_name(node.exc.func)}(f...)"
        if not isinstance(node, ast.Call):
            continue
        name = _name(node.func)
        if name == "flash" and node.args and isinstance(node.args[0], ast.JoinedStr):
            yield node.lineno, "flash(f...)"
        if name == "abort" and len(node.args) > 1 and isinstance(node.args[1], ast.JoinedStr):
            status = node.args[0]
            if isinstance(status, ast.Constant) and 400 <= int(status.value) < 500:
                yield node.lineno, "abort(4xx, f...)"
        # A msgid must be a literal: an f-string inside gettext never matches the catalog.
        if name in GETTEXT and node.args and isinstance(node.args[0], ast.JoinedStr):
            yield node.lineno, f"{name}(f...)"


def _function_at(tree: ast.AST, line: int) -> str:
    """The innermost function holding ``line`` ("" at module level)."""
    holders = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)
               and n.lineno <= line <= (n.end_lineno or n.lineno)]
    return max(holders, key=lambda n: n.lineno).name if holders else ""


def _found(rooms: tuple[str, ...]) -> dict[tuple[str, str], list[tuple[int, str]]]:
    """Unmarked reasons by (path, function)."""
    found: dict[tuple[str, str], list[tuple[int, str]]] = {}
    for path, tree in _sources(rooms):
        for line, what in _unmarked(tree):
            found.setdefault((path, _function_at(tree, line)), []).append((line, what))
    return found


def _sources(rooms: tuple[str, ...]) -> Iterator[tuple[str, ast.AST]]:
    for room in rooms:
        for path in sorted((ROOT / "portal" / room).rglob("*.py")):
            yield path.relative_to(ROOT).as_posix(), ast.parse(path.read_text(), str(path))


def test_person_facing_reasons_are_marked_not_built_with_f_strings() -> None:
    found = _found(PERSON_FACING)
    allowed = {(path, function): count for path, function, count in ALLOWED}
    unmarked = [(path, function, calls) for (path, function), calls in sorted(found.items())
                if len(calls) != allowed.get((path, function), 0)]
    assert unmarked == [], ("reasons a person reads must be translatable: put the variable "
                            "parts in placeholders (docs/i18n.md); or ALLOWED is stale")
    # Every allowed exception still exists where it is listed (else the list is stale).
    assert set(allowed) <= set(found), sorted(set(allowed) - set(found))


def test_the_scan_finds_what_it_is_for() -> None:
    """The scan fails on each form it forbids and passes their marked versions."""
    bad = ast.parse('raise Invalid(f"a link lasts 1 to {n} days")\n'
                    'flash(f"{n} images moved")\nabort(400, f"{name} is not a date")\n'
                    '_(f"Hello {name}")\n')
    assert [what for _line, what in _unmarked(bad)] == [
        "raise Invalid(f...)", "flash(f...)", "abort(4xx, f...)", "_(f...)"]
    good = ast.parse('raise Invalid("a link lasts 1 to %(days)d days", days=n)\n'
                     'flash(_("%(num)d images moved", num=n))\n'
                     'abort(400, _("%(name)s is not a date", name=name))\n'
                     'abort(500, f"{x}")\n')
    assert list(_unmarked(good)) == []


def test_placeholders_of_raised_reasons_match_their_keywords() -> None:
    """``raise X("... %(days)d ...", days=n)``: every placeholder has its keyword and back,
    so the English reason and every translation can be filled."""
    wrong = []
    for path, tree in _sources(PERSON_FACING):
        for node in ast.walk(tree):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) \
                    and node.exc.keywords and node.exc.args \
                    and isinstance(node.exc.args[0], ast.Constant) \
                    and isinstance(node.exc.args[0].value, str):
                names = set(re.findall(r"%\((\w+)\)", node.exc.args[0].value))
                given = {k.arg for k in node.exc.keywords if k.arg}
                if names and names != given:
                    wrong.append((path, node.lineno, sorted(names), sorted(given)))
    assert wrong == []


# -- a German uploader ----------------------------------------------------------------------

@pytest.fixture
def inbox(tmp_path: Path, idp: IdentityProvider) -> Iterator[Inbox]:
    application = make_app(tmp_path / "instance", OIDC_ISSUER=idp.issuer, **OIDC_SETTINGS)
    yield build_inbox(application, idp)
    close_app(application)


def _visitor(app: Flask, inbox: Inbox, language: str) -> FlaskClient:
    made = make_upload_link(app, inbox.doctor)
    client = app.test_client()
    client.set_cookie("portal_lang", language)
    assert open_link(client, made.token, made.pin).status_code == 303
    return client


def _unknown_syntax() -> bytes:
    """An image whose transfer syntax the archive does not take (an unknown UID)."""
    data = outside_instance()
    explicit = b"1.2.840.10008.1.2.1\x00"
    assert data.count(explicit) == 1
    return data.replace(explicit, b"1.2.840.10008.1.2.99")


def test_a_german_uploader_reads_the_refusals_in_german(inbox: Inbox) -> None:
    app = inbox.app
    german = _visitor(app, inbox, "de")
    exe = upload(german, "CD/viewer.exe", b"MZ\x90\x00" + bytes(300))["results"][0]
    assert exe["outcome"] == "refused"
    assert exe["reason"].startswith("keine medizinische Bilddatei (eine CD enthält")
    # The technical reason stays as the archive said it, inside the German sentence.
    syntax = upload(german, "IM9", _unknown_syntax())["results"][0]
    assert syntax["outcome"] == "refused"
    assert syntax["reason"] == ("das Bild ist auf eine Weise komprimiert, die das Portal nicht "
                                "annimmt (transfer syntax 1.2.840.10008.1.2.99 is not "
                                "accepted)")
    skipped = upload(german, "CD/DICOMDIR", b"\x00" * 200)["results"][0]
    assert skipped["reason"].startswith("das Inhaltsverzeichnis der CD (DICOMDIR)")
    # The same stored refusal read by an English reader, and what is stored: the sentence
    # and its parameters, the English reason beside them (the audit trail's words).
    english = app.test_client()
    for cookie in german.get_cookie("upload"), german.get_cookie("__Host-upload"):
        if cookie is not None:
            english.set_cookie(cookie.key, cookie.value)
    english.set_cookie("portal_lang", "en")
    with app.extensions["db"].new_session() as session:
        stored = {f.name: (f.public_id, f.results) for f in session.scalars(select(InboxFile))}
    public_id, [kept] = stored["IM9"]
    assert kept["message"] == ("the image is compressed in a way the portal does not take "
                               "(%(detail)s)")
    assert kept["params"] == {"detail": "transfer syntax 1.2.840.10008.1.2.99 is not accepted"}
    assert kept["reason"] == ("the image is compressed in a way the portal does not take "
                              "(transfer syntax 1.2.840.10008.1.2.99 is not accepted)")
    seen = english.get(f"/inbox/api/files/{public_id}").json["results"][0]
    assert seen == {"name": "IM9", "outcome": "refused", "reason": kept["reason"]}
    # A result stored before reasons were kept as messages (plain English) still shows:
    # translated when the catalog knows the sentence, as it was otherwise.
    old_id, _results = stored["CD/viewer.exe"]
    with app.extensions["db"].write_transaction() as session:
        row = session.scalars(select(InboxFile).where(InboxFile.public_id == old_id)).one()
        row.results = [{"name": "a", "outcome": "skipped", "reason": "already in the inbox"},
                       {"name": "b", "outcome": "refused", "reason": "cannot read: I/O error"}]
    assert [r["reason"] for r in german.get(f"/inbox/api/files/{old_id}").json["results"]] \
        == ["bereits im Eingang", "cannot read: I/O error"]


def test_a_refused_announcement_carries_the_reason_in_both_languages(inbox: Inbox) -> None:
    """The chunk API's own refusals: ``error`` in English as every JSON answer,
    ``message`` in the uploader's language for his page."""
    german = _visitor(inbox.app, inbox, "de")
    limit = inbox.app.extensions["inbox"].max_upload_bytes
    answer = german.post("/inbox/api/files", json={"name": "huge.zip", "size": limit + 1},
                         headers={"Accept": "application/json"})
    assert answer.status_code == 400
    body: dict[str, Any] = answer.json or {}
    assert body["error"] == f"the file is larger than {limit >> 20} MiB"
    assert body["message"] == f"die Datei ist größer als {limit >> 20} MiB"
    # Nothing was stored for it.
    with inbox.app.extensions["db"].new_session() as session:
        assert session.scalars(select(InboxFile)).all() == []


def test_the_error_page_says_a_reason_with_placeholders_in_german(inbox: Inbox,
                                                                   idp: IdentityProvider
                                                                   ) -> None:
    """A domain error raised with placeholders: the page translates the sentence, then fills
    it; the JSON answer keeps the English."""
    from tests.conftest import signed_in

    doctor = signed_in(inbox.app, idp, "doc")
    doctor.set_cookie("portal_lang", "de")
    page = doctor.get("/studies?after=999999")
    assert page.status_code == 400
    assert "after: diese Untersuchung ist nicht mehr in Ihrer Liste" in page.text
    machine = doctor.get("/studies?after=999999", headers={"Accept": "application/json"})
    assert machine.status_code == 400
    assert (machine.json or {})["error"] == ("after: that study is no longer in your list, "
                                             "open the list again")


def test_a_german_patient_sees_a_refused_file_in_german_on_the_upload_page(
        inbox: Inbox, shared_browser: tuple[Playwright, Browser], tmp_path: Path) -> None:
    playwright, browser = shared_browser
    made = make_upload_link(inbox.app, inbox.doctor)
    exe = tmp_path / "viewer.exe"
    exe.write_bytes(b"MZ\x90\x00" + bytes(4000))
    image = tmp_path / "IM1"
    image.write_bytes(outside_instance())
    with LiveServer(inbox.app) as server:
        context = browser.new_context(**phone(playwright, "iPhone 13"), locale="de-DE")
        loopback_only(context)
        context.add_cookies([{"name": "portal_lang", "value": "de", "url": server.url}])
        try:
            page = context.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"{server.url}/u#{made.token}")
            page.fill("#pin", made.pin)
            with page.expect_navigation():
                page.locator("form button[type=submit]").first.click()
            assert page.url.endswith("/u/upload")
            assert page.evaluate("() => document.documentElement.lang") == "de"
            page.set_input_files("#pick-files", [str(exe), str(image)])
            page.wait_for_function(
                "() => document.querySelectorAll('.upload-file[data-state=done]').length === 2",
                timeout=60_000)
            refused = page.locator(".upload-file[data-outcome=refused]").inner_text()
            assert "Abgelehnt: keine medizinische Bilddatei" in refused
            kept = page.locator(".upload-file[data-outcome=kept]").inner_text()
            assert "erhalten, wartet auf die Praxis" in kept
            total = page.locator("#total-line").inner_text()
            assert total.startswith("Alle Dateien gesendet (2) · Bilder übernommen: 1, "
                                    "abgelehnt: 1"), total
            page.screenshot(path=str(ARTIFACTS / "inbox-upload-german.png"), full_page=True)
            assert errors == []
        finally:
            context.close()

