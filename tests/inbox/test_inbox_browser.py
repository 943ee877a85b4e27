"""The upload inbox in Debian Chromium (issue 19 "Must show"): a patient's upload link on an
iPhone 13 and on a desktop, with the connection dropping mid-upload (one chunk's answer lost,
then the browser offline for a while): the upload completes, every file's outcome is listed
in plain words, and the server holds exactly the bytes sent. Then an office manager reconciles
one study and rejects another; the accepted one is visible to its physician with the local
patient ID, the rejected one is gone with its files. The pages pass the sweep's checks."""

from __future__ import annotations

import hashlib
import io
import re
from pathlib import Path

import pydicom
import pytest
from playwright.sync_api import Browser, Page, Playwright, Route
from pydicom.uid import generate_uid
from sqlalchemy import select, update

from portal.inbox.models import InboxInstance, InboxStudy
from portal.index.models import Study
from tests.browser import loopback_only, phone
from tests.browser import shared_browser as shared_browser  # the session's one Chromium
from tests.conftest import IdentityProvider, LiveServer, signed_in
from tests.inbox.conftest import (
    LOCAL_ID,
    Inbox,
    make_upload_link,
    open_link,
    outside_instance,
    upload,
)
from tests.studies.support import ARTIFACTS
from tests.test_page_sweep import _check_page

DESKTOP = {"viewport": {"width": 1280, "height": 800}, "device_scale_factor": 1,
           "is_mobile": False, "has_touch": False}


def _context(playwright: Playwright, browser: Browser, device: str):  # type: ignore[no-untyped-def]
    options = phone(playwright, device) if device != "desktop" else DESKTOP
    context = browser.new_context(**options)
    loopback_only(context)
    return context


@pytest.mark.parametrize("device", ["iPhone 13", "desktop"])
def test_a_patient_uploads_a_cd_through_a_dropping_connection(
        inbox: Inbox, shared_browser: tuple[Playwright, Browser], tmp_path: Path,
        device: str) -> None:
    playwright, browser = shared_browser
    app = inbox.app
    made = make_upload_link(app, inbox.doctor)
    study = generate_uid()
    cd = tmp_path / "CD"
    (cd / "DICOM").mkdir(parents=True)
    big = outside_instance(study=study, rows=512, columns=512, InstanceNumber=1)  # 512 KiB
    small = outside_instance(study=study, InstanceNumber=2)
    (cd / "DICOM" / "IM1").write_bytes(big)
    (cd / "DICOM" / "IM2").write_bytes(small)
    (cd / "DICOMDIR").write_bytes(b"\x00" * 300)
    (cd / "viewer.exe").write_bytes(b"MZ\x90\x00" + bytes(4000))
    lost: list[str] = []

    def lose_one_answer(route: Route) -> None:
        # The second piece reaches the server, but its answer never reaches the phone.
        if route.request.method == "PUT" and not lost and "bytes 262144-" in (
                route.request.headers.get("content-range") or ""):
            route.fetch()
            lost.append(route.request.url)
            route.abort("connectionreset")
        else:
            route.fallback()

    with LiveServer(app) as server:
        context = _context(playwright, browser, device)
        context.route("**/inbox/api/files/*", lose_one_answer)
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(f"{server.url}/u#{made.token}")
        assert page.evaluate("() => location.hash") == ""  # the code left the address bar
        page.fill("#pin", made.pin)
        with page.expect_navigation():
            page.get_by_role("button", name="Continue").click()
        assert page.url.endswith("/u/upload")
        problems: list[str] = []
        _check_page(page, f"inbox-upload-{device}", problems, shots=False)
        if device == "desktop":  # the CD's folder, through the folder picker
            page.set_input_files("#pick-folder", str(cd))
            names = {"IM1": "CD/DICOM/IM1", "IM2": "CD/DICOM/IM2", "DICOMDIR": "CD/DICOMDIR",
                     "viewer.exe": "CD/viewer.exe"}
        else:  # the files, through the file picker
            files = [cd / "DICOM" / "IM1", cd / "DICOM" / "IM2", cd / "DICOMDIR",
                     cd / "viewer.exe"]
            page.set_input_files("#pick-files", [str(f) for f in files])
            names = {n: n for n in ("IM1", "IM2", "DICOMDIR", "viewer.exe")}
        # The lost answer shows the network note; then the phone goes offline for a while.
        page.locator("#network").wait_for(state="visible", timeout=30_000)
        context.set_offline(True)
        page.wait_for_timeout(1500)
        assert page.locator("#network").is_visible()
        context.set_offline(False)
        page.wait_for_function(
            "() => document.querySelectorAll('.upload-file[data-state=done]').length === 4",
            timeout=90_000)
        assert lost, "no chunk's answer was lost: the drop was not exercised"
        outcome = {row.locator(".name").inner_text(): row.get_attribute("data-outcome")
                   for row in page.locator(".upload-file").all()}
        assert outcome == {names["IM1"]: "kept", names["IM2"]: "kept",
                           names["DICOMDIR"]: "skipped", names["viewer.exe"]: "refused"}
        assert "not a medical image file" in page.locator(
            ".upload-file[data-outcome=refused]").inner_text()
        assert page.locator("#total-line").inner_text().startswith("All files sent (4)")
        assert page.locator("#network").is_hidden()
        page.screenshot(path=str(ARTIFACTS / f"inbox-upload-{device}.png"), full_page=True)
        # An upload link shows nothing: no image was asked for, no study page opens.
        assert page.locator("img").count() == 0
        answer = page.goto(f"{server.url}/studies/{inbox.local_study}")
        assert answer is not None
        # Sent to sign in at the identity provider: the upload session is nobody here.
        assert "/oauth2/authorize" in page.url or answer.status in (401, 404)
        assert errors == [] and problems == [], errors + problems
        context.close()
    with app.extensions["db"].new_session() as session:
        [waiting] = session.scalars(select(InboxStudy)).all()
        hashes = set(session.scalars(select(InboxInstance.sha256)))
    assert waiting.study_instance_uid == study and waiting.link_fk == made.link.id
    # Byte for byte what the phone sent (the preamble was already zero).
    assert hashes == {hashlib.sha256(big).hexdigest(), hashlib.sha256(small).hexdigest()}


def _sign_in(page: Page, base: str, sub: str, next_path: str) -> None:
    page.goto(f"{base}/auth/login?next={next_path}")
    page.fill("input[name=sub]", sub)
    page.get_by_role("button", name="Authorize").click()
    page.wait_for_url(f"{base}{next_path}")


@pytest.mark.parametrize("device", ["desktop", "iPhone 13", "Pixel 7"])
def test_an_office_manager_reconciles_one_study_and_rejects_another(
        inbox: Inbox, idp: IdentityProvider, shared_browser: tuple[Playwright, Browser],
        device: str, monkeypatch: pytest.MonkeyPatch) -> None:
    playwright, browser = shared_browser
    app = inbox.app
    phone_run = device != "desktop"
    if phone_run:  # on the phones the accept is the background job, its page polled
        from portal.inbox import reconcile

        monkeypatch.setattr(reconcile, "ACCEPT_INLINE_MAX", 1)
    made = make_upload_link(app, inbox.manager)
    patient = app.test_client()
    assert open_link(patient, made.token, made.pin).status_code == 303
    ours, stranger = generate_uid(), generate_uid()
    for n in (1, 2):
        upload(patient, f"IM{n}", outside_instance(study=ours, InstanceNumber=n))
    upload(patient, "X1", outside_instance(study=stranger, patient_id="NOBODY-1",
                                           name="Stranger^Sam", birth="19990101"))
    kept_root = app.extensions["inbox"].root / "kept"
    assert len(list(kept_root.rglob("*.dcm"))) == 3
    with LiveServer(app) as server:
        context = _context(playwright, browser, device)
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        _sign_in(page, server.url, "om", "/inbox")
        problems: list[str] = []
        _check_page(page, f"inbox-index-{device}", problems, shots=False)
        page.locator("a.inbox-item", has_text=re.compile("mueller", re.I)).click()
        page.wait_for_url(re.compile(r".*/inbox/studies/.*"))
        _check_page(page, f"inbox-study-{device}", problems, shots=False)
        first = page.locator("input[name=patient]").first
        assert first.is_checked()
        assert LOCAL_ID in page.locator("fieldset").inner_text()
        page.fill("#accession", "LOC-9")
        page.select_option("#give_to", label="Dr Gregory")
        page.screenshot(path=str(ARTIFACTS / f"inbox-reconcile-{device}.png"), full_page=True)
        with page.expect_navigation():
            page.get_by_role("button", name="Accept into the archive").click()
        if phone_run:
            # The study's page follows the move and shows the final state, in words.
            assert "Accepting 2 images" in page.locator(".flash").inner_text()
            page.wait_for_function(
                "() => document.body.innerText.includes('Accepted into the archive as patient')",
                timeout=60_000)
            assert "2 images moved." in page.inner_text("main")
            _check_page(page, f"inbox-accepted-{device}", problems, shots=False)
            page.screenshot(path=str(ARTIFACTS / f"inbox-accepted-{device}.png"),
                            full_page=True)
            page.get_by_role("link", name="Back to the inbox").click()
            page.wait_for_url(re.compile(r".*/inbox$"))
        else:
            assert "Accepted: 2 images" in page.locator(".flash").inner_text()
        page.locator("a.inbox-item", has_text=re.compile("stranger", re.I)).click()
        page.wait_for_url(re.compile(r".*/inbox/studies/.*"))
        if phone_run:  # its move stopped, the plan lost: Continue and Reject are offered
            with app.extensions["db"].write_transaction() as session:
                session.execute(update(InboxStudy).where(
                    InboxStudy.study_instance_uid == stranger).values(state="accepting"))
            page.reload()
            assert "Moving stopped." in page.inner_text("main")
            _check_page(page, f"inbox-stopped-{device}", problems, shots=False)
            page.screenshot(path=str(ARTIFACTS / f"inbox-stopped-{device}.png"),
                            full_page=True)
        else:
            page.fill("#reason", "not a patient of ours")
        with page.expect_navigation():
            page.get_by_role("button", name="Reject and delete the files").click()
        assert "Rejected" in page.locator(".flash").inner_text()
        assert "Nothing waits in the inbox." in page.inner_text("main")
        _check_page(page, f"inbox-decided-{device}", problems, shots=False)
        page.screenshot(path=str(ARTIFACTS / f"inbox-decided-{device}.png"), full_page=True)
        assert errors == [] and problems == [], errors + problems
        context.close()
    assert list(kept_root.rglob("*.dcm")) == []
    doctor = signed_in(app, idp, "doc")
    shown = doctor.get(f"/studies/{ours}")
    assert shown.status_code == 200 and LOCAL_ID in shown.data.decode()
    assert doctor.get(f"/studies/{stranger}").status_code == 404
    with app.extensions["db"].new_session() as session:
        accepted = session.scalars(select(Study).where(Study.study_instance_uid == ours)).one()
        assert accepted.accession_number == "LOC-9"
        assert session.scalars(select(Study).where(
            Study.study_instance_uid == stranger)).first() is None
    with app.app_context():
        from portal.archive import current_archive

        sop = doctor.get(f"/dicomweb/studies/{ours}/instances",
                         headers={"Accept": "application/dicom+json"}).json[0]["00080018"][
            "Value"][0]
        ds = pydicom.dcmread(io.BytesIO(current_archive().read(sop)))
    assert ds.PatientID == LOCAL_ID and ds.OtherPatientIDsSequence[0].PatientID == "EXT-991"


def test_files_dropped_on_the_upload_page_are_sent(
        inbox: Inbox, shared_browser: tuple[Playwright, Browser]) -> None:
    """Drag and drop: a drop event whose DataTransfer carries two images and a stray file, as
    a desktop's file manager gives them, sends each and lists what became of it."""
    playwright, browser = shared_browser
    app = inbox.app
    study = generate_uid()
    dropped = {"IM1": outside_instance(study=study, InstanceNumber=1),
               "IM2": outside_instance(study=study, InstanceNumber=2),
               "notes.txt": b"not an image\n" * 20}
    with LiveServer(app) as server:
        context = _context(playwright, browser, "desktop")
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        _sign_in(page, server.url, "doc", "/inbox/upload")
        files = [{"name": name, "bytes": list(data)} for name, data in dropped.items()]
        transfer = page.evaluate_handle("""(files) => {
            const dt = new DataTransfer();
            for (const f of files) {
                dt.items.add(new File([new Uint8Array(f.bytes)], f.name,
                                      {type: 'application/octet-stream'}));
            }
            return dt;
        }""", files)
        page.dispatch_event("#uploader", "dragover", {"dataTransfer": transfer})
        assert "over" in (page.get_attribute("#uploader", "class") or "")
        page.dispatch_event("#uploader", "drop", {"dataTransfer": transfer})
        page.wait_for_function(
            "() => document.querySelectorAll('.upload-file[data-state=done]').length === 3",
            timeout=60_000)
        outcome = {row.locator(".name").inner_text(): row.get_attribute("data-outcome")
                   for row in page.locator(".upload-file").all()}
        assert outcome == {"IM1": "kept", "IM2": "kept", "notes.txt": "refused"}
        assert "over" not in (page.get_attribute("#uploader", "class") or "")
        page.screenshot(path=str(ARTIFACTS / "inbox-dropped.png"), full_page=True)
        assert errors == [], errors
        context.close()
    with app.extensions["db"].new_session() as session:
        [waiting] = session.scalars(select(InboxStudy)).all()
        hashes = set(session.scalars(select(InboxInstance.sha256)))
    assert waiting.study_instance_uid == study
    assert hashes == {hashlib.sha256(dropped[n]).hexdigest() for n in ("IM1", "IM2")}
