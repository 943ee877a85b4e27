"""Light on a poor network (issue 13 item 13): compressed text answers (never images, DICOM or
ZIPs, never where BREACH could read a secret), hashed static URLs cached for a year, an
app-shell service worker that keeps only static files and an offline page, and a download
button that says how big the ZIP is."""

from __future__ import annotations

import hashlib
import io
import re
import zipfile
from pathlib import Path

from flask import Flask
from pydicom.uid import generate_uid

from portal.access.grants import create_grant
from portal.access.principal import Principal
from portal.archive import current_archive
from portal.assets import IMMUTABLE, Fingerprints
from portal.studies.export import file_size
from tests.browser import chromium, loopback_only, phone
from tests.conftest import IdentityProvider, LiveServer, add_person, signed_in
from tests.factories import make_instance
from tests.studies.support import shot, sign_in_browser

STATIC = Path(__file__).resolve().parent.parent / "static"
ADMIN = Principal("user", 0, "t", roles=frozenset({"office_manager"}), issuer="t", subject="t")
ENCODINGS = {"Accept-Encoding": "zstd, br, gzip"}


def _granted_study(app: Flask, idp: IdentityProvider, sub: str, files: int = 3) -> tuple[str,
                                                                                          str]:
    """A small CT study of ``files`` images that ``sub`` (a physician) may see."""
    study, series = generate_uid(), generate_uid()
    with app.app_context():
        for n in range(1, files + 1):
            current_archive().ingest(make_instance(study=study, series=series, rows=128,
                                                   columns=128, InstanceNumber=n, value=n),
                                     who="test")
    doctor = add_person(app, idp, sub, ["physician"])
    with app.extensions["db"].write_transaction() as session:
        create_grant(session, ADMIN, user_id=doctor, study_uid=study)
    return study, series


def _static_url(html: str, name: str) -> str:
    found = re.search(rf'"(/static/{re.escape(name)}\?v=[0-9a-f]+)"', html)
    assert found, f"no hashed URL of {name}"
    return found.group(1)


def test_static_urls_carry_a_content_hash_and_are_immutable(client) -> None:
    html = client.get("/").get_data(as_text=True)
    css = _static_url(html, "css/portal.css")
    digest = hashlib.sha256((STATIC / "css" / "portal.css").read_bytes()).hexdigest()[:12]
    assert css.endswith(f"?v={digest}")
    answer = client.get(css)
    assert answer.status_code == 200 and answer.headers["Cache-Control"] == IMMUTABLE
    answer.close()
    # A stale or missing hash is revalidated: never a year of the wrong file.
    for url in ("/static/css/portal.css", "/static/css/portal.css?v=000000000000"):
        answer = client.get(url)
        assert answer.headers["Cache-Control"] == "no-cache", url
        answer.close()
    # ES modules import each other by plain URLs: the import map points them at hashed ones.
    imports = re.search(r'<script type="importmap"[^>]*>(.*?)</script>', html, re.S)
    assert imports and '"/static/js/viewer/loader.js": "/static/js/viewer/loader.js?v=' in \
        imports.group(1)


def test_fingerprint_follows_the_file(tmp_path: Path) -> None:
    (tmp_path / "a.css").write_text("a{}")
    prints = Fingerprints(tmp_path)
    first = prints.of("a.css")
    (tmp_path / "a.css").write_text("a{color:red}")
    assert first and prints.of("a.css") not in (None, first)
    assert prints.of("../etc/passwd") is None and prints.of("missing.css") is None


def test_text_is_compressed_images_and_dicom_are_not(oidc_app: Flask,
                                                     idp: IdentityProvider) -> None:
    study, series = _granted_study(oidc_app, idp, "assets-doc")
    client = signed_in(oidc_app, idp, "assets-doc")
    page = client.get("/studies", headers=ENCODINGS)
    assert page.status_code == 200 and page.headers["Content-Encoding"] == "zstd"
    assert "Accept-Encoding" in page.headers["Vary"]
    html = client.get("/studies").get_data(as_text=True)
    for name in ("css/portal.css", "js/studylist.js"):
        answer = client.get(_static_url(html, name), headers={"Accept-Encoding": "br"})
        assert answer.headers["Content-Encoding"] == "br", name
        answer.close()
    # BREACH: a page that echoes what was typed (a query), or answers a POST, stays plain,
    # since it also carries the CSRF token.
    searched = client.get("/studies?q=Doe", headers=ENCODINGS, follow_redirects=True)
    assert searched.status_code == 200 and "Content-Encoding" not in searched.headers
    assert 'value="Doe"' in searched.get_data(as_text=True)
    # Images, DICOM and ZIPs are compressed already or must stay byte-exact.
    for url in (f"/dicomweb/studies/{study}/series/{series}/thumbnail",
                f"/dicomweb/studies/{study}/series/{series}",
                f"/studies/{study}/download.zip",
                "/static/icons/icon-192.png"):
        answer = client.get(url, headers={**ENCODINGS, "Accept": "*/*"})
        assert answer.status_code == 200, (url, answer.status_code)
        assert "Content-Encoding" not in answer.headers, url
        answer.get_data()
        answer.close()


def test_service_worker_header_and_offline_page(client) -> None:
    answer = client.get("/static/sw.js")
    assert answer.headers["Service-Worker-Allowed"] == "/"
    assert answer.headers["Cache-Control"] == "no-cache"
    source = answer.get_data(as_text=True)
    answer.close()
    assert "caches" in source and "offline.html" in source
    offline = client.get("/static/offline.html")
    assert offline.status_code == 200 and b"No connection" in offline.get_data()
    offline.close()
    html = client.get("/").get_data(as_text=True)
    assert 'data-worker="/static/sw.js"' in html and 'data-scope="/"' in html


def test_download_button_says_how_big_the_zip_is(oidc_app: Flask,
                                                 idp: IdentityProvider) -> None:
    study, _ = _granted_study(oidc_app, idp, "size-doc", files=4)
    client = signed_in(oidc_app, idp, "size-doc")
    html = client.get(f"/studies/{study}").get_data(as_text=True)
    shown = re.search(r"Download study \(ZIP, ([\d.]+) (KB|MB), 4 files\)", html)
    assert shown, re.findall(r"Download study[^<]*", html)
    download = client.get(f"/studies/{study}/download.zip")
    body = download.get_data()
    assert len(zipfile.ZipFile(io.BytesIO(body)).namelist()) == 5  # DICOMDIR and 4 images
    # The size shown is the download's, as rounded for reading.
    assert f"{shown.group(1)} {shown.group(2)}" == file_size(len(body)) or \
        abs(float(shown.group(1)) * 1000 - len(body)) <= 0.05 * len(body)


def test_file_size_reads_like_a_phone() -> None:
    assert [file_size(n) for n in (300, 640_000, 4_200_000, 23_400_000, 1_300_000_000)] == [
        "1 KB", "640 KB", "4.2 MB", "23 MB", "1.3 GB"]


def test_offline_the_shell_loads_and_no_patient_data_is_kept(oidc_app: Flask,
                                                              idp: IdentityProvider) -> None:
    study, series = _granted_study(oidc_app, idp, "sw-doc")
    with LiveServer(oidc_app) as server, chromium() as (playwright, browser):
        context = browser.new_context(**phone(playwright, "Pixel 7"))
        loopback_only(context)
        page = context.new_page()
        sign_in_browser(page, server.url, sub="sw-doc")
        # The worker takes control (clients.claim) once it is active.
        page.wait_for_function("() => navigator.serviceWorker.controller !== null",
                               timeout=15000)
        for path in (f"/studies/{study}", f"/studies/{study}/view/{series}", "/studies"):
            page.goto(server.url + path, wait_until="networkidle")
        api = page.evaluate("fetch('/api/grants').then(r => r.status)")
        assert api in (200, 403)
        css = _static_url(page.content(), "css/portal.css")
        cached = page.evaluate("""async () => {
            const urls = [];
            for (const name of await caches.keys()) {
                const cache = await caches.open(name);
                for (const request of await cache.keys()) urls.push(request.url);
            }
            return urls;
        }""")
        paths = [u.removeprefix(server.url) for u in cached]
        assert paths and all(p.startswith("/static/") for p in paths), paths
        assert not [p for p in paths if re.search(r"/(dicomweb|studies|api|shared)\b", p)]
        assert "/static/offline.html" in paths and css in paths

        context.set_offline(True)
        status = page.evaluate(f"fetch('{css}').then(r => r.status)")
        assert status == 200  # from the worker's cache
        page.goto(server.url + "/studies")
        assert page.locator("h1").inner_text() == "No connection"
        assert page.evaluate("getComputedStyle(document.querySelector('.bar')).display") \
            == "flex"  # its stylesheet came from the cache too
        shot(page, "offline-Pixel_7")
        context.set_offline(False)
        page.goto(server.url + "/studies")
        assert page.locator("h1").first.inner_text() != "No connection"
        context.close()
