"""Debian Chromium driven by Playwright with phone profiles (never `playwright install`)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from playwright.sync_api import Browser, Playwright, sync_playwright

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


def phone(playwright: Playwright, name: str) -> dict[str, Any]:
    """A device profile without its default browser type (we always use Chromium)."""
    profile = dict(playwright.devices[name])
    profile.pop("default_browser_type", None)
    return profile
