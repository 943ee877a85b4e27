"""The viewer's JavaScript and CSS stay small, self-contained and installable."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

from PIL import Image

STATIC = Path(__file__).resolve().parents[2] / "static"
BUDGET = 60 * 1024  # issue 5: JS + CSS of a study page at most 60 KB compressed


def _modules(entry: Path) -> set[Path]:
    """An ES module and everything it imports (relative imports only: no other hosts)."""
    seen: set[Path] = set()
    todo = [entry]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        source = path.read_text()
        assert not re.search(r"""(import|from)\s*\(?\s*['"](https?:)?//""", source), path
        for target in re.findall(r"""from\s+['"](\.[^'"]+)['"]""", source):
            todo.append((path.parent / target).resolve())
    return seen


def test_study_and_viewer_pages_fit_the_budget() -> None:
    files = {STATIC / "css" / "portal.css", *_modules(STATIC / "js" / "viewer.js"),
             *_modules(STATIC / "js" / "studylist.js")}
    compressed = sum(len(gzip.compress(p.read_bytes(), 9)) for p in files)
    assert compressed <= BUDGET, f"{compressed} bytes gzip"
    assert {p.name for p in files} >= {"viewer.js", "gestures.js", "loader.js", "geometry.js"}


def test_no_inner_html_or_eval_in_scripts() -> None:
    for path in (STATIC / "js").rglob("*.js"):
        source = path.read_text()
        for forbidden in ("innerHTML", "outerHTML", "insertAdjacentHTML", "eval(",
                          "new Function", "document.write"):
            assert forbidden not in source, (path, forbidden)


def test_manifest_and_icons() -> None:
    manifest = json.loads((STATIC / "manifest.webmanifest").read_text())
    assert manifest["display"] == "standalone" and manifest["start_url"] == "/studies"
    for icon in manifest["icons"]:
        path = STATIC / icon["src"].removeprefix("/static/")
        with Image.open(path) as image:
            assert image.format == "PNG"
            assert f"{image.width}x{image.height}" == icon["sizes"]
    # One service worker, the app shell's (tests/test_assets.py checks what it keeps).
    assert [p.name for p in STATIC.rglob("*.js") if "serviceWorker" in p.read_text()] == [
        "shell.js"]
