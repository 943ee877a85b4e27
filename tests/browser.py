"""Debian Chromium driven by Playwright with phone profiles (never `playwright install`)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import Browser, BrowserContext, Playwright, Route, sync_playwright

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
PHONES = ("iPhone 13", "Pixel 7")


@contextmanager
def chromium() -> Iterator[tuple[Playwright, Browser]]:
    """A headless Debian Chromium."""
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            yield playwright, browser
        finally:
            browser.close()


def loopback_only(context: BrowserContext) -> None:
    """Abort every request that would leave this machine (e.g. a CDN stylesheet)."""

    def handle(route: Route) -> None:
        host = urlsplit(route.request.url).hostname or ""
        if route.request.url.startswith(("data:", "blob:")) or host in ("127.0.0.1",
                                                                         "localhost", "::1"):
            route.continue_()
        else:
            route.abort()

    context.route("**/*", handle)


def phone(playwright: Playwright, name: str) -> dict[str, Any]:
    """A device profile without its default browser type (we always use Chromium)."""
    profile = dict(playwright.devices[name])
    profile.pop("default_browser_type", None)
    return profile


@pytest.fixture(scope="session")
def shared_browser() -> Iterator[tuple[Playwright, Browser]]:
    """One Chromium for every test of the session that asks for it (each makes its own
    contexts and closes them): starting a browser costs seconds on a loaded machine."""
    with chromium() as launched:
        yield launched
