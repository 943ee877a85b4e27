"""A full archive disk: on a small tmpfs the test mounts under the instance folder, uploads fail
cleanly (STOW-RS 507 with the Failed SOP Sequence, C-STORE A700 through DCMTK storescu, the CLI
import's message and exit status), nothing is half-stored, reads go on, and ARCHIVE_MIN_FREE
refuses uploads before the disk is full while /readyz and the console say so first."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from flask import Flask
from pydicom.uid import generate_uid
from sqlalchemy import select

from portal.archive.dimse import serve
from portal.archive.ingest import Archive
from portal.archive.models import StoredObject
from tests.admin.test_console_pages import _check as check_console_page
from tests.browser import PHONES, loopback_only, phone, shared_browser  # noqa: F401
from tests.conftest import (
    OIDC_SETTINGS,
    IdentityProvider,
    LiveServer,
    add_person,
    close_app,
    free_port,
    make_app,
    make_client,
    signed_in,
)
from tests.factories import make_dataset, to_bytes
from tests.studies.support import shot, sign_in_browser

STORESCU = "/usr/bin/storescu"  # Debian's DCMTK, not pynetdicom's look-alike in .venv/bin
OUT_OF_RESOURCES = 0xA700
SIDE = 512  # 512 x 512 x 16 bits: about 512 KiB an instance, some 15 fit into 8 MiB


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """An instance folder whose archive folder is an 8 MiB tmpfs (unmounted afterwards)."""
    archive = tmp_path / "instance" / "archive"
    archive.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,mode=0700", "tmpfs", str(archive)],
                   check=True, capture_output=True)
    try:
        yield tmp_path / "instance"
    finally:
        subprocess.run(["umount", str(archive)], check=True, capture_output=True)


@pytest.fixture
def disk_app(small_disk: Path) -> Iterator[Callable[..., Flask]]:
    made: list[Flask] = []

    def make(**overrides: Any) -> Flask:
        app = make_app(small_disk, **overrides)
        made.append(app)
        return app

    yield make
    for app in made:
        close_app(app)


def big_instance(study: str | None = None) -> bytes:
    ds = make_dataset(study=study, rows=SIDE, columns=SIDE)
    return to_bytes(ds)


def assert_nothing_half_stored(app: Flask) -> list[str]:
    """Every index row has its whole file, every file has its row, no temp file is left;
    returns the stored SOP Instance UIDs."""
    archive: Archive = app.extensions["archive"]
    problems = [(uid, problem) for uid, problem in archive.verify() if problem]
    assert problems == []
    assert list((archive.store.tmp).glob("*")) == []
    with app.extensions["db"].new_session() as session:
        uids = list(session.scalars(select(StoredObject.sop_instance_uid)))
    assert len(uids) == len(list(archive.store.keys()))
    return uids


def stow(http: requests.Session, base: str, files: list[bytes]) -> requests.Response:
    """One STOW-RS request of these files as they are."""
    boundary = "b0undary"
    body = b"".join(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
                    + data + b"\r\n" for data in files) + f"--{boundary}--\r\n".encode()
    return http.post(f"{base}/dicomweb/studies", data=body, timeout=60, headers={
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'})


def readyz(app: Flask) -> dict[str, Any]:
    answer = app.test_client().get("/readyz")
    assert answer.status_code == 200  # reads still work: never taken out of the balancer
    body: dict[str, Any] = answer.get_json()
    return body


def test_stow_on_a_full_disk_answers_507_and_reads_go_on(
        disk_app: Callable[..., Flask]) -> None:
    # No threshold: the file system itself runs out (ENOSPC while the file is written).
    app = disk_app(ARCHIVE_MIN_FREE="0", ARCHIVE_WARN_FREE="2MB")
    assert readyz(app)["archive_disk"]["state"] == "ok"
    with LiveServer(app) as server:
        http = requests.Session()
        http.auth = make_client(app, "modality")
        web = DICOMwebClient(url=f"{server.url}/dicomweb", session=http)
        study = generate_uid()
        # Close to full, one request of six: those that fit are stored (202), the others fail
        # with A700 each, and nothing of them is left half-written.
        while app.extensions["archive"].store.space().free > 2_500_000:
            web.store_instances([make_dataset(study=study, rows=SIDE, columns=SIDE)])
        batch = stow(http, server.url, [big_instance(study) for _ in range(6)])
        assert batch.status_code == 202, batch.text
        codes = [f["00081197"]["Value"][0] for f in batch.json()["00081198"]["Value"]]
        assert codes and set(codes) == {OUT_OF_RESOURCES}
        assert len(batch.json()["00081199"]["Value"]) == 6 - len(codes)
        assert_nothing_half_stored(app)
        refused = None
        for _ in range(10):
            ds = make_dataset(study=study, rows=SIDE, columns=SIDE)
            try:
                web.store_instances([ds])
            except requests.HTTPError as exc:
                refused = (ds, exc.response)
                break
        assert refused is not None, "the 8 MiB disk never filled"
        ds, response = refused
        assert response.status_code == 507
        failed = response.json()["00081198"]["Value"]
        assert [f["00081155"]["Value"][0] for f in failed] == [ds.SOPInstanceUID]
        assert failed[0]["00081197"]["Value"] == [OUT_OF_RESOURCES]
        assert "no room" in response.headers["Warning"]
        stored = assert_nothing_half_stored(app)
        assert len(stored) >= 5 and ds.SOPInstanceUID not in stored
        # Reads keep working.
        for uid in stored[:3]:
            got = web.search_for_instances(search_filters={"SOPInstanceUID": uid})
            assert len(got) == 1
            series = got[0]["0020000E"]["Value"][0]
            back = web.retrieve_instance(study, series, uid)
            assert back.SOPInstanceUID == uid
            assert back.pixel_array.shape == (SIDE, SIDE)
    ready = readyz(app)
    assert ready["status"] == "degraded"
    assert ready["archive_disk"]["state"] in ("nearly full", "full")
    assert ready["checks"]["database"] == ready["checks"]["archive"] == "ok"


def test_one_request_of_many_files_shares_one_look_at_the_free_space(
        disk_app: Callable[..., Flask]) -> None:
    """A STOW-RS request's files are written by several threads from one look at the disk
    (space.Budget): exactly those that fit above ARCHIVE_MIN_FREE are stored, in whole blocks,
    and no two of them count the same free bytes."""
    app = disk_app(ARCHIVE_MIN_FREE="3MB")
    store = app.extensions["archive"].store
    study = generate_uid()
    files = [big_instance(study) for _ in range(12)]
    before = store.space()
    fits = (before.free - (3 << 20)) // max(before.on_disk(len(data)) for data in files)
    assert 0 < fits < len(files)
    with LiveServer(app) as server:
        http = requests.Session()
        http.auth = make_client(app, "modality")
        batch = stow(http, server.url, files)
    assert batch.status_code == 202, batch.text
    assert len(batch.json()["00081199"]["Value"]) == fits
    codes = [f["00081197"]["Value"][0] for f in batch.json()["00081198"]["Value"]]
    assert codes == [OUT_OF_RESOURCES] * (len(files) - fits)
    assert "uploads are refused below 3.0 MB" in batch.headers["Warning"]
    assert store.space().free >= 3 << 20
    assert len(assert_nothing_half_stored(app)) == fits


def test_cstore_gets_a700_before_the_disk_is_full_and_the_console_warns_first(
        disk_app: Callable[..., Flask], idp: IdentityProvider, tmp_path: Path) -> None:
    port = free_port()
    app = disk_app(ARCHIVE_MIN_FREE="3MB", ARCHIVE_WARN_FREE="5MB", DIMSE_HOST="127.0.0.1",
                   DIMSE_PORT=port, DIMSE_AE_TITLE="PORTAL",
                   DIMSE_ALLOWED_PEERS=["STORESCU@127.0.0.1"], OIDC_ISSUER=idp.issuer,
                   **OIDC_SETTINGS)
    add_person(app, idp, "om-disk", ["office_manager"], "Clinic", name="Olivia Manager")
    console = signed_in(app, idp, "om-disk")
    assert "Archive disk" not in console.get("/admin/").get_data(as_text=True)

    study = generate_uid()
    files = []
    for n in range(16):
        path = tmp_path / f"img{n:02d}.dcm"
        path.write_bytes(big_instance(study))
        files.append(path)
    # Two instances first: the disk is then "nearly full" (below 5 MB free), not yet refusing.
    server = serve(app.extensions["archive"], app.config["PORTAL"], block=False)
    assert server is not None
    try:
        run = subprocess.run([STORESCU, "-v", "-aet", "STORESCU", "-aec", "PORTAL",
                              "-to", "10", "-ta", "10", "-td", "30", "127.0.0.1", str(port),
                              *map(str, files[:6])], capture_output=True, text=True, timeout=60,
                             check=False)
        assert run.returncode == 0, run.stdout + run.stderr
        assert readyz(app)["archive_disk"]["state"] == "nearly full"
        page = console.get("/admin/").get_data(as_text=True)
        assert "Archive disk nearly full" in page and "New images will be refused" in page

        run = subprocess.run([STORESCU, "-v", "-aet", "STORESCU", "-aec", "PORTAL",
                              "-to", "10", "-ta", "10", "-td", "30", "127.0.0.1", str(port),
                              *map(str, files[6:])], capture_output=True, text=True,
                             timeout=60, check=False)
    finally:
        server.shutdown()
    output = run.stdout + run.stderr
    # DCMTK names status A700 "Refused: OutOfResources" and stops sending.
    assert "Received Store Response (Refused: OutOfResources)" in output, output
    stored = assert_nothing_half_stored(app)
    assert 6 <= len(stored) < 16
    # Refused before the disk was full: the minimum is still free.
    stat = os.statvfs(app.extensions["archive"].store.root)
    assert stat.f_bavail * stat.f_frsize >= 3 << 20
    # STOW-RS is refused too, with the reason.
    with LiveServer(app) as live:
        http = requests.Session()
        http.auth = make_client(app, "modality")
        answer = stow(http, live.url, [big_instance()])
    assert answer.status_code == 507
    assert "no room for this instance now" in answer.headers["Warning"]
    assert "uploads are refused below 3.0 MB" in answer.headers["Warning"]
    assert answer.json()["00081198"]["Value"][0]["00081197"]["Value"] == [OUT_OF_RESOURCES]
    assert_nothing_half_stored(app)


def test_cli_import_stops_with_a_message_and_exit_1_on_a_full_disk(
        disk_app: Callable[..., Flask], tmp_path: Path) -> None:
    app = disk_app(ARCHIVE_MIN_FREE="0")
    folder = tmp_path / "cd"
    folder.mkdir()
    study = generate_uid()
    for n in range(30):
        (folder / f"{n:02d}.dcm").write_bytes(big_instance(study))
    result = app.test_cli_runner().invoke(args=["archive", "import", str(folder)])
    assert result.exit_code == 1
    assert "the archive has no room for this instance now" in result.output
    assert "more file(s): not imported: the archive has no room" in result.output
    stored = assert_nothing_half_stored(app)
    assert 5 <= len(stored) < 30
    assert f"stored: {len(stored)}," in result.output


@pytest.mark.parametrize("device", PHONES)
@pytest.mark.parametrize("scheme", ("light", "dark"))
def test_the_console_warning_on_a_phone(tmp_path: Path, idp: IdentityProvider,
                                        shared_browser: Any,  # noqa: F811
                                        device: str, scheme: str) -> None:
    """Thresholds above what any disk has free: the console says the disk is full, and the
    page still passes axe, fits 360 px and keeps its controls 44 px."""
    app = make_app(tmp_path / "instance", ARCHIVE_MIN_FREE="99.5%", ARCHIVE_WARN_FREE="99.9%",
                   OIDC_ISSUER=idp.issuer, **OIDC_SETTINGS)
    try:
        add_person(app, idp, "om-phone", ["office_manager"], "Clinic", name="Olivia Manager")
        playwright, browser = shared_browser
        with LiveServer(app) as server:
            context = browser.new_context(**{**phone(playwright, device),
                                             "viewport": {"width": 360, "height": 780}},
                                          color_scheme=scheme)
            loopback_only(context)
            page = context.new_page()
            sign_in_browser(page, server.url, sub="om-phone", next_path="/admin/")
            warning = page.locator("li.disk-warning")
            assert "Archive disk full" in warning.inner_text()
            assert "New images are refused now; viewing goes on." in warning.inner_text()
            warning.scroll_into_view_if_needed()
            shot(page, f"console-disk-full-{device.replace(' ', '-')}-{scheme}")
            check_console_page(page, "console with the disk warning")
            context.close()
    finally:
        close_app(app)
