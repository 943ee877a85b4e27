"""The viewer while a reformat's volume is built and while the network comes and goes, in a
real Chromium with phone profiles in light and dark schemes: "Building 3D view… n %" until
the volume is there, presets each once with a MIP window of its own, "Offline, retrying…"
while the network is gone and images that come back with it. Screenshots go to
tests/artifacts/."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from axe_playwright_python.sync_playwright import Axe
from flask import Flask
from playwright.sync_api import BrowserContext, Page

from portal.imaging.service import volume_files, volume_sources
from portal.index.models import Instance, Series
from tests.browser import PHONES, chromium, loopback_only, phone
from tests.conftest import IdentityProvider, LiveServer, close_app
from tests.studies.support import CtSite, build_ct_site, shot, sign_in_browser

SCHEMES = [(device, scheme) for device in PHONES for scheme in ("light", "dark")]
IDS = [f"{d}-{s}" for d, s in SCHEMES]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, idp: IdentityProvider) -> Iterator[Any]:
    """A demo CT stored without the after-ingest build (its volume is built on demand)."""
    ct = build_ct_site(tmp_path_factory.mktemp("network"), idp, slices=60, size=256)
    with LiveServer(ct.app) as server:
        yield ct, server
    close_app(ct.app)


def _context(playwright: Any, browser: Any, device: str, scheme: str,
             width: int | None = None) -> BrowserContext:
    options = phone(playwright, device)
    if width:
        options["viewport"] = {"width": width, "height": options["viewport"]["height"]}
    context = browser.new_context(**options, color_scheme=scheme)
    loopback_only(context)
    return context


def _volume_key(app: Flask, series_uid: str) -> tuple[str, Path]:
    """The series' volume key and the folder its build markers are in."""
    from sqlalchemy import select

    with app.app_context():
        session = app.extensions["db"].new_session()
        try:
            uids = list(session.scalars(
                select(Instance.sop_instance_uid).join(Series, Instance.series_fk == Series.id)
                .where(Series.series_instance_uid == series_uid)
                .order_by(Instance.instance_number, Instance.id)))
        finally:
            session.close()
        found = volume_sources(uids)
        assert found is not None
        return found[0], volume_files().folder


def _viewer(page: Page, key: str) -> str:
    return str(page.eval_on_selector("#viewer", f"v => v.dataset.{key} || ''"))


def _open(page: Page, ct: CtSite, server: LiveServer) -> None:
    sign_in_browser(page, server.url, next_path=f"/studies/{ct.study}/view/{ct.series}")
    page.wait_for_function("() => document.querySelector('#viewer').dataset.quality === 'full'",
                           timeout=30_000)


def _choose(page: Page, name: str, value: str | None = None, label: str | None = None) -> None:
    """Pick a view or preset as a person would: through "More" when the bar has one."""
    more = page.locator("button[data-action=more]")
    if more.is_visible() and more.get_attribute("aria-expanded") != "true":
        more.click()
    page.locator(f"select[name={name}]").select_option(value=value, label=label)


def _fits(page: Page) -> None:
    """No sideways scrolling; every visible control at least 44 x 44 CSS px."""
    assert page.evaluate("document.documentElement.scrollWidth - window.innerWidth") <= 0
    small = page.evaluate("""() => [...document.querySelectorAll('button, select, a')]
        .filter(e => e.offsetParent && !e.closest('[hidden]'))
        .map(e => [e.textContent.trim() || e.name, e.getBoundingClientRect()])
        .filter(([, r]) => r.width < 44 || r.height < 44).map(([n]) => n)""")
    assert small == []


def _axe(page: Page) -> list[Any]:
    results = Axe().run(page, options={"runOnly": {"type": "tag", "values": [
        "wcag2a", "wcag2aa", "wcag21a", "wcag21aa"]}})
    assert len(results.response["passes"]) > 10
    return [(v["id"], [n["target"] for n in v["nodes"]][:3])
            for v in results.response["violations"] if v["impact"] in ("serious", "critical")]


@pytest.mark.parametrize(("device", "scheme"), SCHEMES, ids=IDS)
def test_a_reformat_shows_its_build_progress_then_the_image(site: tuple[CtSite, LiveServer],
                                                            device: str, scheme: str) -> None:
    ct, server = site
    key, folder = _volume_key(ct.app, ct.series)
    folder.mkdir(parents=True, exist_ok=True)
    for leftover in folder.glob(f"{key}.*"):  # every case starts with no volume built
        leftover.unlink()
    marker = folder / f"{key}.building"
    # Another worker is building this volume and is 42 % done: this one waits for it.
    marker.write_text("0.420")
    tag = f"{device.replace(' ', '_')}-{scheme}"
    with chromium() as (playwright, browser):
        context = _context(playwright, browser, device, scheme)
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        _open(page, ct, server)
        _choose(page, "view", "sagittal")
        progress = page.get_by_role("progressbar", name="Building 3D view")
        progress.wait_for(state="visible", timeout=10_000)
        page.wait_for_function("() => document.querySelector('#viewer').dataset.building"
                               " === '42'", timeout=10_000)
        assert progress.inner_text() == "Building 3D view… 42 %"
        assert progress.get_attribute("aria-valuenow") == "42"
        assert _viewer(page, "quality") == "none"  # nothing asked for before it is built
        marker.write_text("0.800")
        page.wait_for_function("() => document.querySelector('#viewer').dataset.building"
                               " === '80'", timeout=10_000)
        _fits(page)
        assert _axe(page) == []
        shot(page, f"{tag}-volume-building")
        # That build died (its marker is gone): this worker builds the volume itself.
        marker.unlink()
        page.wait_for_function(
            "() => { const v = document.querySelector('#viewer').dataset;"
            " return v.src.includes('/volume/sagittal?') && v.quality === 'full'; }",
            timeout=60_000)
        assert not progress.is_visible() and _viewer(page, "building") == ""
        assert (folder / f"{key}.npz").is_file()
        shot(page, f"{tag}-volume-sagittal")
        assert errors == []
        context.close()


@pytest.mark.parametrize(("device", "scheme"), SCHEMES, ids=IDS)
def test_presets_are_offered_once_and_a_mip_gets_its_own_window(
        site: tuple[CtSite, LiveServer], device: str, scheme: str) -> None:
    ct, server = site
    with chromium() as (playwright, browser):
        context = _context(playwright, browser, device, scheme)
        page = context.new_page()
        _open(page, ct, server)
        labels = page.eval_on_selector_all("select[name=preset] option:not([hidden])",
                                           "os => os.map(o => o.textContent)")
        # The demo CT (chest, abdomen and pelvis) names SOFT TISSUE, LUNG and BONE itself.
        assert labels[:5] == ["Default", "Soft tissue (400/40)", "Lung (1500/-600)",
                              "Bone (1800/400)", "Liver (160/60)"]
        values = [label.split("(")[1] for label in labels[1:]]
        assert len(values) == len(set(values)) and not any("Brain" in x for x in labels)
        _choose(page, "view", "mip")
        page.wait_for_function(
            "() => { const v = document.querySelector('#viewer').dataset;"
            " return v.src.includes('/volume/mip?') && v.quality === 'full'; }",
            timeout=60_000)
        window = _viewer(page, "window")
        assert window not in ("40,400", "auto")  # not the slices' soft-tissue window
        width = float(window.split(",")[1])
        assert width > 1000 and f"window={window}" in _viewer(page, "src").replace("%2C", ",")
        assert page.locator("select[name=preset]").input_value() == "mip"
        shot(page, f"{device.replace(' ', '_')}-{scheme}-mip-window")
        # Back to the slices: their own default window again.
        _choose(page, "view", "stack")
        page.wait_for_function("() => document.querySelector('#viewer').dataset.window"
                               " === '40,400'", timeout=10_000)
        shot(page, f"{device.replace(' ', '_')}-{scheme}-presets")
        context.close()


@pytest.mark.parametrize(("device", "scheme"), SCHEMES, ids=IDS)
def test_offline_says_so_and_images_come_back_with_the_network(
        site: tuple[CtSite, LiveServer], device: str, scheme: str) -> None:
    ct, server = site
    tag = f"{device.replace(' ', '_')}-{scheme}"
    with chromium() as (playwright, browser):
        context = _context(playwright, browser, device, scheme, width=360)
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        _open(page, ct, server)
        notice = page.locator(".netstate")
        assert notice.inner_text() == "" and not notice.is_visible()
        context.set_offline(True)
        page.wait_for_function("() => document.querySelector('#viewer').dataset.offline"
                               " === 'yes'", timeout=10_000)
        # A new window needs new images: they fail while offline and wait for the network.
        _choose(page, "preset", label="Lung (1500/-600)")
        page.wait_for_function("() => document.querySelector('#viewer').dataset.window"
                               " === '-600,1500'")
        started = time.monotonic()
        while time.monotonic() - started < 1.5:  # a few failed loads and tries meanwhile
            page.wait_for_timeout(100)
        assert notice.is_visible() and notice.inner_text() == "Offline, retrying…"
        assert page.get_by_role("status").filter(has_text="Offline, retrying…").count() == 1
        assert "…" in page.locator(".wl").inner_text()  # the exact image has not come
        _fits(page)
        assert _axe(page) == []
        shot(page, f"{tag}-offline")
        context.set_offline(False)
        page.wait_for_function(
            "() => { const v = document.querySelector('#viewer');"
            " return v.dataset.offline === '' && v.dataset.quality === 'full'"
            " && v.dataset.src.includes('window=-600,1500')"
            " && !document.querySelector('.wl').textContent.includes('…'); }",
            timeout=40_000)
        assert notice.inner_text() == "" and not notice.is_visible()
        shot(page, f"{tag}-back-online")
        assert errors == []
        context.close()
