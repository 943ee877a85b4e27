"""A patient on an iPhone 13 (Debian Chromium): opens the link, types the PIN, sees the study
and its first image; the token never reaches another origin; revocation cuts him off."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
from flask import Flask

from portal.sharing import service
from tests.browser import chromium, loopback_only, phone
from tests.conftest import LiveServer
from tests.sharing.conftest import World, make_share

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"


class SecondOrigin(BaseHTTPRequestHandler):
    """Another site on 127.0.0.1 that records what browsers send it."""

    seen: ClassVar[list[dict[str, str]]] = []

    def do_GET(self) -> None:
        SecondOrigin.seen.append({"line": self.requestline, **dict(self.headers.items())})
        body = b"<!doctype html><title>elsewhere</title><h1>elsewhere</h1>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args: Any) -> None:
        """Quiet."""


@pytest.fixture
def second_origin() -> Iterator[str]:
    """The other origin's base URL."""
    SecondOrigin.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), SecondOrigin)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join(timeout=10)


def _fits(page: Any) -> None:
    assert page.evaluate("document.documentElement.scrollWidth - window.innerWidth") <= 0


def test_patient_opens_a_link_on_a_phone(app: Flask, world: World,
                                         second_origin: str) -> None:
    made = make_share(world)
    assert made.pin
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with LiveServer(app) as live, chromium() as (playwright, browser):
        context = browser.new_context(**phone(playwright, "iPhone 13"))
        loopback_only(context)
        page = context.new_page()
        problems: list[str] = []
        page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(str(e)))
        link = f"{live.url}/s#{made.token}"

        # A page of the portal navigating to another site sends it no Referer and no token.
        page.goto(link)
        assert page.url == f"{live.url}/s"  # the token left the address bar at once
        page.evaluate(f"window.location.href = '{second_origin}/probe'")
        page.wait_for_url(f"{second_origin}/probe")
        assert SecondOrigin.seen and "Referer" not in SecondOrigin.seen[0]
        assert made.token not in str(SecondOrigin.seen)

        page.goto(link)
        assert page.url == f"{live.url}/s"
        assert page.get_by_role("heading", name="Images shared with you").is_visible()
        _fits(page)
        page.screenshot(path=str(ARTIFACTS / "share_1_landing_iphone13.png"), full_page=True)

        page.get_by_label("PIN, if you were given one").fill("000000" if made.pin != "000000"
                                                             else "111111")
        page.get_by_role("button", name="Show my images").click()
        page.wait_for_load_state()
        assert "9 more times" in page.content()
        page.screenshot(path=str(ARTIFACTS / "share_2_wrong_pin_iphone13.png"), full_page=True)

        page.get_by_label("PIN, if you were given one").fill(made.pin)
        page.get_by_role("button", name="Show my images").click()
        page.wait_for_url(f"{live.url}/studies/{world.study}")
        assert made.token not in page.url
        thumb = page.locator("img.thumb").first
        thumb.scroll_into_view_if_needed()
        page.wait_for_function(
            "() => { const i = document.querySelector('img.thumb');"
            " return i && i.complete && i.naturalWidth > 0; }", timeout=30_000)
        assert "/dicomweb/studies/" in (thumb.get_attribute("src") or "")
        assert page.get_by_role("navigation", name="Shared images").is_visible()
        _fits(page)
        page.screenshot(path=str(ARTIFACTS / "share_3_study_iphone13.png"), full_page=True)
        cookies = {c["name"]: c for c in context.cookies()}
        assert cookies["share"]["httpOnly"] and cookies["share"]["sameSite"] == "Strict"
        assert made.token not in str(cookies)

        page.get_by_role("link", name="Who opened them").click()
        page.wait_for_url(f"{live.url}/shared/accesses")
        assert "opened the link" in page.content()
        _fits(page)
        page.screenshot(path=str(ARTIFACTS / "share_4_accesses_iphone13.png"), full_page=True)

        # The physician revokes: the next image request of this phone fails.
        image = (f"/dicomweb/studies/{world.study}/series/{world.series}/instances/"
                 f"{world.sop}/rendered")
        fetch = f"fetch('{image}', {{headers: {{Accept: 'image/jpeg'}}}}).then(r => r.status)"
        assert page.evaluate(fetch) == 200
        with app.extensions["db"].write_transaction() as session:
            service.revoke_link(session, world.doctor, made.link.public_id)
        assert page.evaluate(fetch) == 401
        page.goto(f"{live.url}/studies/{world.study}")
        assert "viewing time has ended" in page.content()
        _fits(page)
        page.screenshot(path=str(ARTIFACTS / "share_5_ended_iphone13.png"), full_page=True)

        page.goto(link)
        page.get_by_label("PIN, if you were given one").fill(made.pin)
        page.get_by_role("button", name="Show my images").click()
        page.wait_for_load_state()
        assert "This link cannot be opened" in page.content()
        _fits(page)
        page.screenshot(path=str(ARTIFACTS / "share_6_unavailable_iphone13.png"),
                        full_page=True)
        assert [p for p in problems if "401" not in p and "404" not in p] == []
        history = page.evaluate("performance.getEntriesByType('navigation')[0].name")
        assert made.token not in history
        context.close()
