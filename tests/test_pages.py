"""Pages in a phone-sized Chromium: they fit the screen, obey the CSP, show clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.browser import PHONES, chromium, loopback_only, phone
from tests.conftest import LiveServer

SCREENSHOTS = Path(__file__).resolve().parent.parent / "instance" / "screenshots"


@pytest.mark.parametrize("device", PHONES)
@pytest.mark.parametrize("path", ["/", "/no-such-page"])
def test_pages_fit_a_phone(live_server: LiveServer, device: str, path: str) -> None:
    with chromium() as (playwright, browser):
        context = browser.new_context(**phone(playwright, device))
        loopback_only(context)
        page = context.new_page()
        problems: list[str] = []
        page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(str(e)))
        response = page.goto(live_server.url + path)
        assert response is not None
        assert response.status == (200 if path == "/" else 404)
        # Nothing wider than the screen: no sideways scrolling on a phone.
        overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0
        assert page.locator("h1").first.is_visible()
        problems = [p for p in problems if "404" not in p]
        assert problems == []
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        name = f"{device.replace(' ', '_')}{path.replace('/', '_') or '_home'}.png"
        page.screenshot(path=str(SCREENSHOTS / name), full_page=True)
        context.close()
