"""Every page in the two test-only pseudo-locales (portal/i18n.py, docs/i18n.md), on an
iPhone 13 at 360 px:

- ``eo`` (every translated string accented, bracketed and about 40 % longer): each visible
  text a person reads carries the pseudo-locale's marks, so a string left unmarked for
  translation fails here (data excepted: names, dates, identifiers, numbers, the sample's
  own words); and no page grows wider than 360 px with longer words;
- ``yi`` (the same, right to left): every page says ``dir="rtl"`` and still fits 360 px.

The pages are the page sweep's (tests/test_page_sweep.py), in the same site."""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import Browser, Playwright

from portal.i18n import PSEUDO_LONG, PSEUDO_RTL
from tests.browser import loopback_only, phone
from tests.browser import shared_browser as shared_browser  # the session's one Chromium
from tests.studies.support import ARTIFACTS
from tests.test_page_sweep import Site, _prepare, _visits
from tests.test_page_sweep import site as site  # the sweep's portal with one of everything

# Texts of the sweep's sample data (names, descriptions, report words, places) and of
# things that are not words of the portal (modalities, units, the languages' own names).
DATA = {"Jane Doe", "Doe", "Jane", "Mrs", "Gregory House", "James Wilson", "Dr Sweep",
        "Office Manager", "Dr Colleague", "Clinic", "Other", "The lungs are clear.",
        "No acute findings.", "Court case 4711", "new@clinic.test", "English", "Deutsch",
        "Français", "Español", "CT", "MR", "OT", "SR", "PR", "SEG", "KO", "DX", "CR", "US",
        "NM", "PT", "XA", "MG", "ZIP", "PIN", "DICOM", "SWEEP-1", "SWEEP-ORD-1", "Axial",
        "mm", "HU", "px", "W", "L", "Sweep", "Wilson", "House", "Gregory", "James", "GREGORY",
        "HOUSE", "Dr", "CT chest", "ACC1", "Anna Müller", "sweep-doc"}
MARKS = re.compile(r"[⟦⟧·àçéîñöŕšûýÀÇÉÎÑÖŔŠÛÝž]")
WORD = re.compile(r"[A-Za-z]{2,}")

TEXTS = """() => {
  const out = [];
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    const parent = node.parentElement;
    const text = node.textContent.trim();
    if (!text || !parent || !parent.getClientRects().length) continue;
    if (parent.closest('script, style, code, time, .raw, option, [data-i18n-data], '
                       + '[aria-hidden=true]')) continue;
    out.push(text);
  }
  for (const el of document.querySelectorAll('[aria-label], [placeholder], [title], img[alt]')) {
    for (const name of ['aria-label', 'placeholder', 'title', 'alt']) {
      const value = (el.getAttribute(name) || '').trim();
      if (value && !el.closest('[data-i18n-data]')) out.push(value);
    }
  }
  return {texts: out, width: document.documentElement.scrollWidth,
          lang: document.documentElement.lang, dir: document.documentElement.dir};
}"""


def unmarked(text: str) -> bool:
    """True for a text of the portal's own words that the pseudo-locale did not reach."""
    if MARKS.search(text):
        return False
    rest = text
    rest = re.sub(r"\b\d{1,2}\.? [A-Za-z]{3,5}\.? \d{4}\b", " ", rest)  # a date: 2 Jan 2026
    for data in sorted(DATA, key=len, reverse=True):
        rest = rest.replace(data, " ")
    rest = re.sub(r"\b[0-9][0-9.\-:/ ]*\b|\b[A-Z0-9]+(?:-[A-Z0-9]+)+\b|\S+@\S+|https?://\S+"
                  r"|\b(?:user|share|machine):\S+",
                  " ", rest)
    return bool(WORD.search(rest))


@pytest.mark.parametrize("code", [PSEUDO_LONG, PSEUDO_RTL])
def test_every_page_in_the_pseudo_locales(site: Site, code: str,
                                          shared_browser: tuple[Playwright, Browser]) -> None:
    playwright, browser = shared_browser
    problems: list[str] = []
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for kind, pages in _visits(site).items():
        context = browser.new_context(**phone(playwright, "iPhone 13"))
        loopback_only(context)
        context.add_cookies([{"name": "portal_lang", "value": code, "url": site.server.url}])
        page = context.new_page()
        _prepare(kind, context, page, site)
        for endpoint, path, status in pages:
            answer = page.goto(site.server.url + path, wait_until="load")
            assert answer is not None and answer.status == status, (kind, path)
            size = page.viewport_size
            assert size is not None
            page.set_viewport_size({"width": 360, "height": size["height"]})
            found = page.evaluate(TEXTS)
            label = f"{code} {kind} {endpoint}"
            if found["width"] > 360:
                problems.append(f"{label}: {found['width']} px wide at 360")
            if found["lang"] != code:
                problems.append(f"{label}: lang={found['lang']!r}")
            if found["dir"] != ("rtl" if code == PSEUDO_RTL else "ltr"):
                problems.append(f"{label}: dir={found['dir']!r}")
            if code == PSEUDO_LONG:
                problems.extend(f"{label}: not marked for translation: {text!r}"
                                for text in found["texts"] if unmarked(text))
            page.screenshot(path=str(ARTIFACTS / f"i18n-{code}-{kind}-{endpoint}.png"),
                            full_page=True)
            page.set_viewport_size(size)
        context.close()
    assert not problems, "\n".join(sorted(set(problems)))


def test_unmarked_tells_data_from_words() -> None:
    assert unmarked("Share with a doctor")
    assert unmarked("3 studies")
    assert not unmarked("⟦Šĥàŕé⟧")
    assert not unmarked("Jane Doe · 2024-05-01")
    assert not unmarked("2 Jan 2026 · CT")
    assert not unmarked("1.2.840.10008.5.1.4.1.1.2")
