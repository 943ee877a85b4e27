"""Every page of the portal, as each kind of user sees it, on iPhone 13 and Pixel 7 in light
and dark (issue 13 items 11 and 12): axe-core finds nothing serious or critical, nothing is
wider than a 360 px screen, every control is at least 44 x 44 CSS px (inline links in prose
excepted), and no person name shows its DICOM carets.

The list of pages comes from the URL map: a new GET route that answers HTML fails this test
until it is added here, and so does a new page template that no visit renders."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from flask import Flask, template_rendered
from playwright.sync_api import Browser, BrowserContext, Page, Playwright
from pydicom.uid import generate_uid

from portal.access.grants import create_grant, link_patient
from portal.access.invitations import create_invitation
from portal.access.models import User
from portal.access.principal import Principal, user_principal
from portal.archive import current_archive
from portal.sharing import service
from portal.sharing.routes import share_policy
from tests.browser import PHONES, loopback_only, phone
from tests.browser import shared_browser as shared_browser  # the session's one Chromium
from tests.conftest import OIDC_SETTINGS, IdentityProvider, LiveServer, add_person, close_app
from tests.conftest import make_app as new_app
from tests.factories import make_instance
from tests.studies.support import ARTIFACTS

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"
ADMIN = Principal("user", 0, "t", roles=frozenset({"office_manager"}), issuer="t", subject="t")
PATIENT_NAME = "Doe^Jane^^Mrs"
TAGS = ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa", "wcag22aa"]
# GET routes that answer something other than a page (data, files, redirects to the
# provider, health), by endpoint or blueprint prefix.
NOT_PAGES = {"static", "auth.login", "auth.callback", "admin.audit_csv",
             "studies.download_study", "reports.report_pdf_view", "patients.my_home",
             "launch.smart_launch", "launch.smart_callback",
             "measurements.saved",  # JSON: a series' saved measurements
             "inbox.accept_progress"}  # JSON: how far a background accept is
NOT_PAGE_PREFIXES = ("api.", "dicomweb.", "health.", "fhir.", "monitoring.", "inbox_api.")
# Page templates no GET visit reaches; each is rendered by the POST or state named here.
NOT_VISITED_TEMPLATES = {
    "sharing/too_many.html": "the share landing after too many openings from one address",
    "inbox/accepting.html": "a study accepted by the background job (more than 64 files): "
                            "swept on iPhone 13 and Pixel 7 by tests/inbox/test_inbox_browser.py",
}

CHECKS = """(min) => {
  const out = {width: document.documentElement.scrollWidth, small: [], carets: []};
  const sel = 'a[href], button, input:not([type=hidden]), select, textarea, summary, '
            + '[role=button]';
  for (const el of document.querySelectorAll(sel)) {
    const style = getComputedStyle(el);
    let box = el.getBoundingClientRect();
    if (!box.width || !box.height || style.visibility === 'hidden' || box.right <= 0) continue;
    if (el.closest('[hidden], [inert]')) continue;
    // WCAG 2.5.8: a link inside a sentence keeps the line's height.
    const block = el.parentElement && el.parentElement.closest('p, li, dd, td, figcaption');
    if (el.tagName === 'A' && style.display === 'inline' && block
        && block.textContent.trim().length > el.textContent.trim().length) continue;
    if (el.type === 'checkbox' || el.type === 'radio') {  // the label is what one taps
      const label = el.closest('label')
        || (el.id && document.querySelector(`label[for="${el.id}"]`));
      if (label) box = label.getBoundingClientRect();
    }
    if (box.width < min - 0.5 || box.height < min - 0.5) {
      out.small.push(`${el.tagName.toLowerCase()}${el.className ? '.' + el.className : ''} `
        + `"${(el.textContent || el.value || el.name || '').trim().slice(0, 30)}" `
        + `${Math.round(box.width)}x${Math.round(box.height)}`);
    }
  }
  // Person names as people write them: no caret outside the viewer's raw DICOM value
  // (and <code>, where the console shows the format an identifier is typed in).
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    if (node.textContent.includes('^') && !node.parentElement.closest('.raw, code, script, style')
        && node.parentElement.getClientRects().length) out.carets.push(node.textContent.trim());
  }
  return out;
}"""


@dataclass
class Site:
    """The portal with one of everything, and the pages each kind of visitor opens."""

    app: Flask
    server: LiveServer
    study: str
    series: str
    share_token: str
    share_pin: str
    colleague_token: str
    lock_tokens: list[str]
    invitation: str
    doctor: int  # the physician's user id
    record: int  # the patient's record (patient.id)
    rendered: set[str] = field(default_factory=set)


def _ingest(app: Flask, study: str, series: list[str]) -> None:
    with app.app_context():
        archive = current_archive()
        for number, uid in enumerate(series, start=1):
            for n in (1, 2):
                archive.ingest(make_instance(
                    study=study, series=uid, patient_id="SWEEP-1", patient_name=PATIENT_NAME,
                    ReferringPhysicianName="House^Gregory^^Dr", rows=64, columns=64,
                    SeriesNumber=number, InstanceNumber=n, value=n * 40,
                    SeriesDescription=f"Axial {number}"), who="test")


def _report(app: Flask, study: str) -> None:
    from portal.reports.service import IncomingReport, receive_report

    with app.app_context(), app.extensions["db"].write_transaction() as session:
        receive_report(session, IncomingReport(
            source="hl7", source_id="SWEEP-ORD-1", status="final", study_instance_uid=study,
            findings="The lungs are clear.", impression="No acute findings.",
            author="Wilson^James^^Dr"))


def _retention(session: Any, study: str) -> None:
    """A retention rule of the practice (id 1), a study listed as due, a legal hold."""
    from sqlalchemy import select

    from portal.access.models import Practice
    from portal.index.models import Patient
    from portal.retention.models import LegalHold, RetentionDue, RetentionRule

    practice = session.scalars(select(Practice.id).where(Practice.name == "Clinic")).one()
    session.add(RetentionRule(practice_fk=practice, modality="CT", keep_years=10,
                              minors_until_age=28))
    session.add(RetentionDue(study_instance_uid=study, kept_until="20250101"))
    patient = session.scalars(select(Patient.id).where(Patient.patient_id == "SWEEP-1")).one()
    session.add(LegalHold(patient_fk=patient, reason="Court case 4711"))


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, idp: IdentityProvider) -> Iterator[Site]:
    """Studies, a report, a physician, an office manager, a patient, links and an
    invitation; the app served on loopback; every template rendered is noted."""
    app = new_app(tmp_path_factory.mktemp("sweep") / "instance", OIDC_ISSUER=idp.issuer,
                  SHARE_MAX_FAILED_PINS=2, **OIDC_SETTINGS)
    study, earlier = generate_uid(), generate_uid()
    series = [generate_uid(), generate_uid()]
    _ingest(app, study, series)
    _ingest(app, earlier, [generate_uid()])
    _report(app, study)
    doctor = add_person(app, idp, "sweep-doc", ["physician"], "Clinic", name="Dr Sweep")
    add_person(app, idp, "sweep-om", ["office_manager"], "Clinic", name="Office Manager")
    _inbox_upload(app, doctor)
    add_person(app, idp, "sweep-colleague", ["physician"], "Other", name="Dr Colleague")
    patient = add_person(app, idp, "sweep-patient", ["patient"], name="Jane Doe")
    with app.test_request_context(), app.extensions["db"].write_transaction() as session:
        for uid in (study, earlier):
            create_grant(session, ADMIN, user_id=doctor, study_uid=uid)
        link_patient(session, ADMIN, patient, "SWEEP-1")
        sender = user_principal(session.get(User, doctor), "session")
        shared = service.create_share(session, sender, share_policy(), study_uid=study,
                                      can_download=True)
        colleague = service.create_share(session, sender, share_policy(), study_uid=study,
                                         audience="physician", requires_sign_in=True,
                                         with_pin=False)
        # One link per phone to lock with wrong PINs.
        locks = [service.create_share(session, sender, share_policy(), study_uid=study).token
                 for _ in PHONES]
        invitation = create_invitation(session, ADMIN, email="new@clinic.test",
                                       roles=["physician"], practice="Clinic")
        _retention(session, earlier)
    from sqlalchemy import select

    from portal.index.models import Patient

    with app.extensions["db"].new_session() as session:
        record = session.scalars(select(Patient.id).where(Patient.patient_id == "SWEEP-1")).one()
    rendered: set[str] = set()

    def note(sender: Flask, template: Any, context: dict[str, Any], **extra: Any) -> None:
        rendered.add(template.name)

    template_rendered.connect(note, app)
    with LiveServer(app) as server:
        yield Site(app, server, study, series[0], shared.token, shared.pin or "",
                   colleague.token, locks, invitation, doctor, record, rendered)
    template_rendered.disconnect(note, app)
    close_app(app)


def _inbox_upload(app: Flask, doctor: int) -> None:
    """A study waiting in the Clinic's inbox, sent through an upload link."""
    from tests.inbox.conftest import make_upload_link, open_link, outside_instance, upload

    made = make_upload_link(app, doctor)
    uploader = app.test_client()
    assert open_link(uploader, made.token, made.pin).status_code == 303
    upload(uploader, "CD/IM1", outside_instance(name=PATIENT_NAME))


def _inbox_study(site: Site) -> str:
    from sqlalchemy import select

    from portal.inbox.models import InboxStudy

    with site.app.extensions["db"].new_session() as session:
        return str(session.scalars(select(InboxStudy.public_id)).first())


def _sign_in(page: Page, base: str, sub: str) -> None:
    page.goto(f"{base}/auth/login?next=/")
    page.fill("input[name=sub]", sub)
    page.get_by_role("button", name="Authorize").click()
    page.wait_for_url(f"{base}/")


def _open_link(context: BrowserContext, base: str, token: str, pin: str) -> None:
    answer = context.request.post(f"{base}/s/exchange", form={"token": token, "pin": pin},
                                  max_redirects=0)
    assert answer.status == 303, answer.status


def _visits(site: Site) -> dict[str, list[tuple[str, str, int]]]:
    """Who sees which page: kind -> [(endpoint, path, status)]."""
    s, v = site.study, site.series
    link = _public_id(site)
    return {
        "anonymous": [("studies.home", "/", 200), ("sharing.landing", "/s", 200),
                      ("auth.invitation", f"/auth/invitation?t={site.invitation}", 200),
                      ("sharing.closed", "/s/closed", 200),
                      ("inbox.link_landing", "/u", 200),
                      ("inbox.link_upload", "/u/upload", 401),  # no upload session: ended
                      ("(error)", "/no-such-page", 404)],
        "physician": [("studies.home", "/", 200), ("studies.study_list", "/studies", 200),
                      ("studies.study_page", f"/studies/{s}", 200),
                      ("studies.viewer", f"/studies/{s}/view/{v}", 200),
                      ("studies.compare", f"/studies/{s}/compare/{_earlier(site)}", 200),
                      ("sharing.share_form", f"/studies/{s}/share", 200),
                      ("sharing.my_links", "/shares", 200),
                      ("sharing.link_detail", f"/shares/{link}", 200),
                      ("reports.order_list", "/orders", 200),
                      ("inbox.upload_page", "/inbox/upload", 200),
                      ("inbox.link_list", "/inbox/links", 200),
                      # IHE IID from an EHR: a study opens the viewer; a patient's studies
                      # are listed at an opaque launch address (launch.launched).
                      ("launch.invoke_image_display",
                       f"/IHEInvokeImageDisplay?requestType=STUDY&studyUID={s}", 200),
                      ("launch.launched",
                       "/IHEInvokeImageDisplay?requestType=PATIENT&patientID=SWEEP-1", 200),
                      ("(unavailable)", "/shared/claim", 404)],
        "office_manager": [("admin.index", "/admin/", 200), ("admin.users", "/admin/users", 200),
                           ("admin.identifiers", "/admin/identifiers", 200),
                           ("admin.grants", "/admin/grants", 200),
                           ("admin.shares", "/admin/shares", 200),
                           ("admin.confirm_revoke_links", f"/admin/shares/revoke?link={link}",
                            200),
                           ("admin.audit_trail", "/admin/audit", 200),
                           ("admin.give", "/admin/give", 200),
                           ("admin.person", f"/admin/people/{site.doctor}", 200),
                           ("admin.confirm_take_away",
                            f"/admin/people/{site.doctor}/take-away", 200),
                           ("admin.patient", f"/admin/patients/{site.record}", 200),
                           ("admin.invite_form", "/admin/invite", 200),
                           ("inbox.index", "/inbox", 200),
                           ("inbox.study", f"/inbox/studies/{_inbox_study(site)}", 200),
                           ("retention.index", "/admin/retention/", 200),
                           ("retention.new_rule", "/admin/retention/rules/new", 200),
                           ("retention.edit_rule", "/admin/retention/rules/1", 200),
                           ("studies.study_list", "/studies", 200)],
        "patient": [("studies.study_list", "/studies", 200),
                    ("studies.study_page", f"/studies/{s}", 200),
                    ("patients.reports", "/my/reports", 200),
                    ("patients.appointment_list", "/my/appointments", 200),
                    ("patients.openings", "/my/openings", 200),
                    ("patients.links", "/my/links", 200),
                    ("sharing.share_form", f"/studies/{s}/share", 200)],
        "visitor": [("sharing.shared_home", "/shared", 200),
                    ("studies.study_page", f"/studies/{s}", 200),
                    ("studies.viewer", f"/studies/{s}/view/{v}", 200),
                    ("sharing.shared_accesses", "/shared/accesses", 200)],
        "colleague": [("sharing.claim", "/shared/claim", 200)],
    }


def _earlier(site: Site) -> str:
    """The patient's other study (the prior the compare page shows beside the current)."""
    from sqlalchemy import select

    from portal.index.models import Study

    with site.app.extensions["db"].new_session() as session:
        return str(session.scalars(select(Study.study_instance_uid).where(
            Study.study_instance_uid != site.study).order_by(Study.id)).first())


def _public_id(site: Site) -> str:
    from sqlalchemy import select

    from portal.sharing.models import ShareLink

    with site.app.extensions["db"].new_session() as session:
        return str(session.scalars(select(ShareLink.public_id).order_by(ShareLink.id)).first())


def _prepare(kind: str, context: BrowserContext, page: Page, site: Site) -> None:
    base = site.server.url
    if kind in ("physician", "office_manager", "patient"):
        _sign_in(page, base, {"physician": "sweep-doc", "office_manager": "sweep-om",
                              "patient": "sweep-patient"}[kind])
    elif kind == "visitor":
        _open_link(context, base, site.share_token, site.share_pin)
    elif kind == "colleague":
        _open_link(context, base, site.colleague_token, "")
        _sign_in(page, base, "sweep-colleague")


def _after(kind: str, device: str, context: BrowserContext, page: Page,
           site: Site) -> Iterator[str]:
    """Pages only a form or a state reaches; each step leaves one on screen to check."""
    base = site.server.url
    if kind == "anonymous":  # a wrong PIN, then the link locks (after 2 in this portal)
        page.goto(f"{base}/s#{site.lock_tokens[PHONES.index(device)]}")
        for label in ("wrong-pin", "locked"):
            page.fill("#pin", "000000")
            with page.expect_navigation():
                page.get_by_role("button", name="Show my images").click()
            yield label
        # A share session that ended (expired or closed elsewhere) on this phone.
        context.add_cookies([{"name": "share", "value": "ended-session-token",
                              "url": base}])
        page.goto(f"{base}/shared")
        yield "ended"
    elif kind == "physician":
        page.goto(f"{base}/studies/{site.study}/share")
        with page.expect_navigation():
            page.get_by_role("button", name="Make the link").click()
        yield "created"
        page.goto(f"{base}/inbox/links")
        page.fill("#for_whom", "Jane Doe")
        with page.expect_navigation():
            page.get_by_role("button", name="Make the upload link").click()
        yield "upload-link-created"
    elif kind == "visitor":
        page.goto(f"{base}/shared")
        with page.expect_navigation():
            page.locator("nav").get_by_role("button", name="Close").click()
        yield "closed"


AXE_RUN = """async (tags) => {
  const results = await axe.run(document, {runOnly: {type: 'tag', values: tags},
                                           resultTypes: ['violations']});
  return results.violations.filter(v => ['serious', 'critical'].includes(v.impact))
    .map(v => `${v.id} ${JSON.stringify(v.nodes.slice(0, 4).map(n => n.target))}`);
}"""


def _check_page(page: Page, label: str, problems: list[str], shots: bool) -> None:
    """axe in light and dark at the phone's own width; sizes, carets and width at 360 px."""
    from axe_playwright_python.base import AXE_SCRIPT

    page.evaluate(AXE_SCRIPT)  # once per page, then one run per colour scheme
    for scheme in ("light", "dark"):
        page.emulate_media(color_scheme=scheme)
        problems.extend(f"{label} {scheme}: axe {found}"
                        for found in page.evaluate(AXE_RUN, TAGS))
        if shots:
            page.screenshot(path=str(ARTIFACTS / f"sweep-{label}-{scheme}.png"),
                            full_page=True)
    size = page.viewport_size
    assert size is not None
    page.set_viewport_size({"width": 360, "height": size["height"]})
    found = page.evaluate(CHECKS, 44)
    page.set_viewport_size(size)
    if found["width"] > 360:
        problems.append(f"{label}: {found['width']} px wide at 360")
    problems.extend(f"{label}: small target {s}" for s in found["small"])
    problems.extend(f"{label}: caret in {c!r}" for c in found["carets"])


def _page_endpoints(app: Flask) -> set[str]:
    return {rule.endpoint for rule in app.url_map.iter_rules()
            if "GET" in (rule.methods or ()) and rule.endpoint not in NOT_PAGES
            and not rule.endpoint.startswith(NOT_PAGE_PREFIXES)}


def _page_templates() -> set[str]:
    """Templates that are whole pages (not layouts, includes or partials)."""
    names = set()
    for path in TEMPLATES.rglob("*.html"):
        name = path.relative_to(TEMPLATES).as_posix()
        if path.name.startswith("_") or path.name in ("base.html", "layout.html", "nav.html") \
                or "nav" in path.stem or name == "reports/card.html":
            continue
        names.add(name)
    return names


def test_every_page_for_every_kind_of_user(site: Site,
                                           shared_browser: tuple[Playwright, Browser]) -> None:
    playwright, browser = shared_browser
    visits = _visits(site)
    visited = {endpoint for pages in visits.values() for endpoint, _, _ in pages}
    missing = _page_endpoints(site.app) - visited
    assert not missing, f"pages not in the sweep (add them to _visits): {sorted(missing)}"

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    problems: list[str] = []
    for device in PHONES:
        for kind, pages in visits.items():
            context = browser.new_context(**phone(playwright, device))
            loopback_only(context)
            page = context.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e, errors=errors: errors.append(str(e)))
            _prepare(kind, context, page, site)
            for endpoint, path, status in pages:
                answer = page.goto(site.server.url + path, wait_until="load")
                assert answer is not None and answer.status == status, (kind, path)
                label = f"{device.replace(' ', '_')}-{kind}-{endpoint}"
                _check_page(page, label, problems, shots=device == "Pixel 7")
            for step in _after(kind, device, context, page, site):
                label = f"{device.replace(' ', '_')}-{kind}-{step}"
                _check_page(page, label, problems, shots=device == "Pixel 7")
            problems.extend(f"{device} {kind}: script error {e}" for e in errors)
            context.close()
    assert problems == [], "\n".join(problems)
    # Page templates reached only after a POST are rendered by the visits' own forms above
    # or named in NOT_VISITED_TEMPLATES.
    unvisited = _page_templates() - site.rendered - set(NOT_VISITED_TEMPLATES)
    assert not unvisited, f"page templates no visit rendered: {sorted(unvisited)}"

