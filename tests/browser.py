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


# One Playwright driver and one Chromium for the whole test session: Playwright's sync API
# refuses a second driver while one runs in the same thread, and a launch costs seconds on a
# loaded machine. Tests make their own contexts; `chromium()` closes the ones it saw made.
_shared: tuple[Playwright, Browser] | None = None


def _launched() -> tuple[Playwright, Browser]:
    global _shared
    if _shared is not None and not _shared[1].is_connected():  # crashed: start another
        _shared[0].stop()
        _shared = None
    if _shared is None:
        playwright = sync_playwright().start()
        try:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS,
                                                 headless=True)
        except BaseException:
            playwright.stop()
            raise
        _shared = (playwright, browser)
    return _shared


def close_shared() -> None:
    """Stop the session's Chromium and driver (from pytest_sessionfinish)."""
    global _shared
    if _shared is not None:
        playwright, browser = _shared
        _shared = None
        try:
            browser.close()
        finally:
            playwright.stop()


@contextmanager
def chromium() -> Iterator[tuple[Playwright, Browser]]:
    """The session's headless Debian Chromium; contexts made inside are closed after."""
    playwright, browser = _launched()
    before = set(browser.contexts)
    try:
        yield playwright, browser
    finally:
        for context in browser.contexts:
            if context not in before:
                context.close()


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
