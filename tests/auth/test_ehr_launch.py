"""Launch from the EHR (issue 18 item 6): IHE Invoke Image Display against the app, signed in
through the test OpenID provider; SMART App Launch v2 (EHR launch) against a real
authorization server, npm ``oidc-provider`` made a SMART EHR (tests/support/oidc-provider:
``.well-known/smart-configuration``, the ``launch`` parameter and scope, ``patient`` and
``encounter`` in the token response, a Patient read); the IID page on an iPhone 13 in Debian
Chromium with axe-core. Every server binds 127.0.0.1 and stops afterwards."""

from __future__ import annotations

import html
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, quote, urljoin, urlsplit

import pytest
import requests
from flask import Flask
from flask.testing import FlaskClient
from pydicom.uid import generate_uid

from portal.access.grants import create_grant
from portal.access.principal import Principal
from portal.archive import current_archive
from tests.conftest import (
    OIDC_SETTINGS,
    IdentityProvider,
    LiveServer,
    add_person,
    close_app,
    free_port,
    make_app,
    wait_for,
)
from tests.factories import make_instance

PROVIDER = Path(__file__).resolve().parents[1] / "support" / "oidc-provider"
ADMIN = Principal("user", 0, "t", roles=frozenset({"office_manager"}), issuer="t", subject="t")
CLIENT = ("portal-smart", "a-long-test-secret-of-the-portal-at-the-ehr-0123456789")
SYSTEM = "urn:oid:1.2.3.999.1"  # the EHR's medical record numbers: our Patient IDs of HOSP
EHR_USERS = {"dr-ehr": {"password": "ehr password 1234", "email": "ehr@demo.example",
                        "name": "Dr Ehr", "fhirUser": "Practitioner/pr-7"}}
PATIENTS = {
    "pat-1": {"resourceType": "Patient", "id": "pat-1", "birthDate": "1970-01-01",
              "identifier": [{"system": "urn:other", "value": "MRN-2"},
                             {"system": SYSTEM, "value": "MRN-1"}]},
    "pat-2": {"resourceType": "Patient", "id": "pat-2", "birthDate": "1980-02-02",
              "identifier": [{"system": SYSTEM, "value": "MRN-2"}]},
}
LAUNCHES = {"launch-1": {"patient": "pat-1", "encounter": "enc-1"},
            "launch-2": {"patient": "pat-2", "encounter": "enc-2"}}


@dataclass
class Setup:
    """The portal served on loopback, the SMART EHR, and the studies (by role)."""

    app: Flask
    server: LiveServer
    ehr: str  # the EHR's issuer; its FHIR base is ehr + "/fhir"
    uids: dict[str, str]
    series: dict[str, str]


def _ingest(app: Flask, name: str, patient_id: str, issuer: str, patient_name: str,
            date: str, modality: str, accession: str, born: str = "19700101") -> tuple[str, str]:
    study, series = generate_uid(), generate_uid()
    extra = {"IssuerOfPatientID": issuer} if issuer else {}
    with app.app_context():
        current_archive().ingest(make_instance(
            study=study, series=series, patient_id=patient_id, patient_name=patient_name,
            modality=modality, StudyDate=date, AccessionNumber=accession,
            StudyDescription=name, PatientBirthDate=born, **extra), who="test")
    return study, series


class _Issuer:
    """``add_person`` needs only an issuer; the EHR's users live in the Node provider."""

    def __init__(self, issuer: str) -> None:
        self.issuer = issuer

    def set_user(self, sub: str, **claims: object) -> None:
        """Users are configured when the provider starts."""


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, idp: IdentityProvider) -> Iterator[Setup]:
    assert shutil.which("node"), "Node.js is needed for the npm oidc-provider EHR"
    if not (PROVIDER / "node_modules" / "oidc-provider").is_dir():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=PROVIDER, check=True,
                       capture_output=True, timeout=300)
    port = free_port()
    ehr = f"http://localhost:{port}"
    app = make_app(tmp_path_factory.mktemp("launch") / "instance", OIDC_ISSUER=idp.issuer,
                   SMART_ISSUERS=f"{ehr}/fhir|{CLIENT[0]}|{CLIENT[1]}",
                   SMART_PATIENT_SYSTEMS=f"{SYSTEM}|HOSP", **OIDC_SETTINGS)
    uids: dict[str, str] = {}
    series: dict[str, str] = {}
    for key, args in {
            "ct": ("CT chest one", "MRN-1", "HOSP", "One^Patient", "20240110", "CT", "ACC-1"),
            "mr": ("MR knee one", "MRN-1", "HOSP", "One^Patient", "20230501", "MR", "ACC-2"),
            "other-issuer": ("CT head of another hospital's MRN-1", "MRN-1", "OTHER",
                             "Namesake^Other", "20240301", "CT", "ACC-3"),
            "hidden": ("MR spine two", "MRN-2", "HOSP", "Two^Hidden", "20240201", "MR",
                       "ACC-4")}.items():
        uids[key], series[key] = _ingest(app, *args, born="19800202" if key == "hidden"
                                         else "19700101")
    for sub, who in (("iid-doc", idp), ("dr-ehr", _Issuer(ehr))):
        doctor = add_person(app, who, sub, ["physician"], name=sub)  # type: ignore[arg-type]
        with app.test_request_context(), app.extensions["db"].write_transaction() as session:
            for key in ("ct", "mr", "other-issuer"):
                create_grant(session, ADMIN, user_id=doctor, study_uid=uids[key])
    add_person(app, idp, "iid-other", ["physician"], name="Dr Other")
    with LiveServer(app) as server:
        env = {**os.environ, "PORT": str(port), "USERS": json.dumps(EHR_USERS),
               "CLIENT_ID": CLIENT[0], "CLIENT_SECRET": CLIENT[1],
               "REDIRECT_URI": f"{server.url}/smart/callback",
               "POST_LOGOUT_URI": f"{server.url}/", "SMART_LAUNCHES": json.dumps(LAUNCHES),
               "FHIR_PATIENTS": json.dumps(PATIENTS)}
        node = subprocess.Popen(["node", "server.mjs"], cwd=PROVIDER, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            def ready() -> bool:
                try:
                    return requests.get(f"{ehr}/fhir/.well-known/smart-configuration",
                                        timeout=1).ok
                except requests.ConnectionError:
                    return False

            assert wait_for(ready, timeout=30), "the SMART EHR did not start"
            yield Setup(app, server, ehr, uids, series)
        finally:
            node.terminate()
            node.wait(timeout=10)
            close_app(app)


# -- IHE Invoke Image Display ------------------------------------------------------------------

def _iid(**params: str) -> str:
    return "/IHEInvokeImageDisplay?" + "&".join(f"{k}={quote(v, safe=',')}"
                                                for k, v in params.items())


def _signed_in(setup: Setup, idp: IdentityProvider, sub: str,
               path: str = "/studies") -> tuple[FlaskClient, object]:
    """A browser that asked for ``path`` before signing in, then signed in at the provider
    (the default-deny hook's redirect, the real code flow); the callback's answer."""
    client = setup.app.test_client()
    first = client.get(path)
    assert first.status_code == 302, first.status_code
    login = urlsplit(first.headers["Location"])
    assert login.path == "/auth/login"
    start = client.get(f"{login.path}?{login.query}")
    chosen = requests.post(start.headers["Location"], data={"sub": sub},
                           allow_redirects=False, timeout=10)
    callback = urlsplit(chosen.headers["Location"])
    return client, client.get(f"{callback.path}?{callback.query}")


def test_iid_not_signed_in_goes_through_sign_in_and_back_to_the_same_request(
        setup: Setup, idp: IdentityProvider) -> None:
    path = _iid(requestType="STUDY", studyUID=setup.uids["ct"])
    client, back = _signed_in(setup, idp, "iid-doc", path)
    assert back.status_code == 302  # type: ignore[attr-defined]
    assert back.headers["Location"] == path  # type: ignore[attr-defined]
    opened = client.get(path)
    assert opened.status_code == 302
    assert opened.headers["Location"] == \
        f"/studies/{setup.uids['ct']}/view/{setup.series['ct']}"  # the viewer
    assert client.get(opened.headers["Location"]).status_code == 200


def test_iid_study_by_accession_and_several_uids(setup: Setup, idp: IdentityProvider) -> None:
    client, _ = _signed_in(setup, idp, "iid-doc")
    by_accession = client.get(_iid(requestType="STUDY", accessionNumber="ACC-2"))
    assert by_accession.headers["Location"].startswith(f"/studies/{setup.uids['mr']}/view/")
    several = client.get(_iid(requestType="STUDY", studyUID=",".join(
        setup.uids[k] for k in ("ct", "mr", "hidden"))))
    assert several.status_code == 200
    page = several.get_data(as_text=True)
    assert "CT chest one" in page and "MR knee one" in page
    assert "MR spine two" not in page and "MRN-2" not in page and "Hidden" not in page


def test_iid_a_study_the_user_may_not_see_is_the_unknown_study_404(
        setup: Setup, idp: IdentityProvider) -> None:
    client, _ = _signed_in(setup, idp, "iid-doc")
    hidden = client.get(_iid(requestType="STUDY", studyUID=setup.uids["hidden"]))
    unknown = client.get(_iid(requestType="STUDY", studyUID=generate_uid()))
    plain = client.get(f"/studies/{generate_uid()}")
    assert hidden.status_code == unknown.status_code == plain.status_code == 404

    def main(answer: object) -> str:
        text = answer.get_data(as_text=True)  # type: ignore[attr-defined]
        return text.split("<main", 1)[1].split("</main>", 1)[0]

    assert main(hidden) == main(unknown) == main(plain)
    assert "MRN-2" not in hidden.get_data(as_text=True)
    # Neither the study's patient nor its accession number opens it either.
    assert client.get(_iid(requestType="STUDY", accessionNumber="ACC-4")).status_code == 404
    assert client.get(_iid(requestType="STUDY", studyUID=setup.uids["ct"],
                           patientID="MRN-2^^^&HOSP")).status_code == 404


def _patient_page(client: FlaskClient, **params: str) -> str:
    answer = client.get(_iid(requestType="PATIENT", **params))
    assert answer.status_code == 302, answer.get_data(as_text=True)[:300]
    target = answer.headers["Location"]
    assert target.startswith("/launch/") and "MRN" not in target  # no Patient ID kept
    page = client.get(target)
    assert page.status_code == 200
    return page.get_data(as_text=True)


def test_iid_patient_lists_that_patients_visible_studies(setup: Setup,
                                                         idp: IdentityProvider) -> None:
    client, _ = _signed_in(setup, idp, "iid-doc")
    page = _patient_page(client, patientID="MRN-1^^^&HOSP")
    assert "Studies of Patient One" in page
    assert "CT chest one" in page and "MR knee one" in page
    assert "another hospital" not in page  # the same ID of another issuer is another patient
    # The universal-id form of the assigning authority names the same issuer field.
    assert "CT chest one" in _patient_page(client, patientID="MRN-1^^^&HOSP&ISO")
    assert "another hospital" in _patient_page(client, patientID="MRN-1^^^&OTHER")
    newest = _patient_page(client, patientID="MRN-1^^^&HOSP", mostRecentResults="1")
    assert "CT chest one" in newest and "MR knee one" not in newest
    mr = _patient_page(client, patientID="MRN-1^^^&HOSP", modalitiesInStudy="MR,XA")
    assert "MR knee one" in mr and "CT chest one" not in mr
    recent = _patient_page(client, patientID="MRN-1^^^&HOSP",
                           lowerDateTime="2024-01-01T00:00:00Z",
                           upperDateTime="2024-12-31T23:59:59+01:00",
                           viewerType="IHE_BIR", diagnosticQuality="true",
                           keyImagesOnly="false")
    assert "CT chest one" in recent and "MR knee one" not in recent
    # Without an assigning authority only patients recorded without an issuer match.
    assert "No studies to show" in _patient_page(client, patientID="MRN-1")


def test_iid_patient_the_user_may_not_see_shows_nothing_of_him(
        setup: Setup, idp: IdentityProvider) -> None:
    client, _ = _signed_in(setup, idp, "iid-doc")
    hidden = _patient_page(client, patientID="MRN-2^^^&HOSP")
    unknown = _patient_page(client, patientID="NO-SUCH^^^&HOSP")
    for page in (hidden, unknown):
        assert "No studies to show" in page
    assert "Hidden" not in hidden and "MR spine two" not in hidden and "1980" not in hidden
    other, _ = _signed_in(setup, idp, "iid-other")
    assert "One^Patient" not in _patient_page(other, patientID="MRN-1^^^&HOSP")
    assert "CT chest one" not in _patient_page(other, patientID="MRN-1^^^&HOSP")


@pytest.mark.parametrize(("params", "reason"), [
    ({}, "requestType: STUDY or PATIENT"),
    ({"requestType": "SERIES", "studyUID": "1.2"}, "requestType: STUDY or PATIENT"),
    ({"requestType": "STUDY"}, "by studyUID or by accessionNumber"),
    ({"requestType": "STUDY", "studyUID": "1.2", "accessionNumber": "A"}, "one of them"),
    ({"requestType": "STUDY", "studyUID": "1.2.abc"}, "is not a DICOM UID"),
    ({"requestType": "STUDY", "studyUID": ",".join(["1.2"] * 101)}, "at most 100"),
    ({"requestType": "PATIENT"}, "patientID: required"),
    ({"requestType": "PATIENT", "patientID": "X^Y^^&HOSP"}, "ID^^^&ISSUER"),
    ({"requestType": "PATIENT", "patientID": "X^^^&HOSP", "mostRecentResults": "0"},
     "mostRecentResults"),
    ({"requestType": "PATIENT", "patientID": "X^^^&HOSP", "lowerDateTime": "yesterday"},
     "lowerDateTime: not an ISO 8601"),
    ({"requestType": "PATIENT", "patientID": "X^^^&HOSP", "lowerDateTime": "2025-01-01",
      "upperDateTime": "2024-01-01"}, "later than upperDateTime"),
    ({"requestType": "PATIENT", "patientID": "X^^^&HOSP", "modalitiesInStudy": "C T"},
     "not a modality code"),
    ({"requestType": "STUDY", "studyUID": "1.2", "keyImagesOnly": "maybe"},
     "keyImagesOnly: true or false"),
])
def test_iid_bad_parameters_answer_400_with_the_reason(
        setup: Setup, idp: IdentityProvider, params: dict[str, str], reason: str) -> None:
    client, _ = _signed_in(setup, idp, "iid-doc")
    answer = client.get(_iid(**params))
    assert answer.status_code == 400
    assert reason in html.unescape(answer.get_data(as_text=True))


# -- SMART App Launch v2, EHR launch ----------------------------------------------------------

def _launch(setup: Setup, launch: str, *, browser: requests.Session | None = None,
            iss: str | None = None, tamper: bool = False) -> requests.Response:
    """The EHR opens the portal with ``iss`` and ``launch``; the doctor signs in at the
    EHR's form; the browser comes back to the portal's callback. Its final answer."""
    browser = browser or requests.Session()
    response = browser.get(f"{setup.server.url}/smart/launch", allow_redirects=False,
                           timeout=10, params={"iss": iss or f"{setup.ehr}/fhir",
                                               "launch": launch})
    for _ in range(12):
        if response.status_code not in (302, 303):
            return response
        location = urljoin(response.url, response.headers["Location"])
        if location.startswith(f"{setup.server.url}/smart/callback") and tamper:
            query = parse_qs(urlsplit(location).query)
            location = (f"{setup.server.url}/smart/callback?code={query['code'][0]}"
                        "&state=not-the-state-the-portal-sent")
        if not location.startswith(setup.ehr) and not location.startswith(
                f"{setup.server.url}/smart/callback"):
            return response  # back at the portal, past the callback
        response = browser.get(location, allow_redirects=False, timeout=10)
        if response.status_code == 200 and "/interaction/" in location:  # the login form
            user = EHR_USERS["dr-ehr"]
            response = browser.post(f"{location}/login", allow_redirects=False, timeout=10,
                                    data={"username": "dr-ehr", "password": user["password"]})
    raise AssertionError("the launch never came back to the portal")


def test_smart_launch_lands_on_that_patients_studies(setup: Setup) -> None:
    browser = requests.Session()
    landed = _launch(setup, "launch-1", browser=browser)
    assert landed.status_code == 302, landed.text[:300]
    target = landed.headers["Location"]
    assert target.startswith("/launch/")
    page = browser.get(f"{setup.server.url}{target}", timeout=10)
    assert page.status_code == 200
    assert "Studies of Patient One" in page.text
    assert "CT chest one" in page.text and "MR knee one" in page.text
    # pat-1's "urn:other" identifier MRN-2 is not a Patient ID: only the configured system is.
    assert "MR spine two" not in page.text and "another hospital" not in page.text
    assert "for the current visit" in page.text  # the encounter came with the launch
    # Signed in as the EHR's user (issuer + subject), in a session like any sign-in.
    studies = browser.get(f"{setup.server.url}/studies", timeout=10)
    assert studies.status_code == 200 and "CT chest one" in studies.text
    from sqlalchemy import select

    from portal.access.models import User
    from portal.audit import iter_events

    with setup.app.extensions["db"].new_session() as session:
        users = session.scalars(select(User).where(User.subject == "dr-ehr")).all()
        assert [u.issuer for u in users] == [setup.ehr]
        logins = [e for e in iter_events(session, who=f"user:{setup.ehr}|dr-ehr")
                  if e.event_id == "110114" and (e.details or {}).get("launch") == "SMART"]
        assert logins and logins[0].details["encounter"] == "enc-1"
        assert logins[0].details["fhirUser"] == "Practitioner/pr-7"


def test_smart_launch_from_an_unknown_iss_is_refused(setup: Setup) -> None:
    browser = requests.Session()
    refused = browser.get(f"{setup.server.url}/smart/launch", allow_redirects=False,
                          timeout=10, params={"iss": "http://localhost:9/fhir",
                                              "launch": "launch-1"})
    assert refused.status_code == 400
    assert "not one this portal accepts launches from" in refused.text
    missing = browser.get(f"{setup.server.url}/smart/launch", allow_redirects=False,
                          timeout=10, params={"iss": f"{setup.ehr}/fhir"})
    assert missing.status_code == 400 and "iss and launch" in missing.text
    assert browser.get(f"{setup.server.url}/studies", allow_redirects=False,
                       timeout=10).status_code == 302  # nobody signed in


def test_smart_state_mismatch_is_refused(setup: Setup) -> None:
    browser = requests.Session()
    refused = _launch(setup, "launch-1", browser=browser, tamper=True)
    assert refused.status_code == 400
    assert "state mismatch" in refused.text
    assert browser.get(f"{setup.server.url}/studies", allow_redirects=False,
                       timeout=10).status_code == 302  # nobody signed in


def test_smart_callback_in_another_browser_is_refused(setup: Setup) -> None:
    """A code and state sent to another browser (a login CSRF) sign nobody in there."""
    victim = requests.Session()
    begun = victim.get(f"{setup.server.url}/smart/launch", allow_redirects=False, timeout=10,
                       params={"iss": f"{setup.ehr}/fhir", "launch": "launch-1"})
    state = parse_qs(urlsplit(begun.headers["Location"]).query)["state"][0]
    answer = victim.get(f"{setup.server.url}/smart/callback", timeout=10,
                        params={"code": "x", "state": state + "x"})
    assert answer.status_code == 400 and "state mismatch" in answer.text


def test_smart_launch_for_a_patient_the_doctor_may_not_see_shows_nothing_of_him(
        setup: Setup) -> None:
    browser = requests.Session()
    landed = _launch(setup, "launch-2", browser=browser)
    assert landed.status_code == 302
    page = browser.get(f"{setup.server.url}{landed.headers['Location']}", timeout=10)
    assert page.status_code == 200
    assert "No studies to show" in page.text
    for trace in ("MR spine two", "Hidden", "MRN-2", "1980"):
        assert trace not in page.text


# -- the IID page on a phone -------------------------------------------------------------------

def test_iid_landing_page_on_an_iphone_passes_axe(setup: Setup) -> None:
    from axe_playwright_python.base import AXE_SCRIPT

    from tests.browser import chromium, loopback_only, phone

    base = setup.server.url
    with chromium() as (playwright, browser):
        context = browser.new_context(**phone(playwright, "iPhone 13"))
        loopback_only(context)
        page = context.new_page()
        page.goto(base + _iid(requestType="PATIENT", patientID="MRN-1^^^&HOSP"))
        page.fill("input[name=sub]", "iid-doc")  # the test provider's form
        page.get_by_role("button", name="Authorize").click()
        page.wait_for_url(f"{base}/launch/**")
        assert "Studies of Patient One" in page.locator("h1").inner_text()
        page.evaluate(AXE_SCRIPT)
        for scheme in ("light", "dark"):
            page.emulate_media(color_scheme=scheme)
            found = page.evaluate("""async () => {
              const r = await axe.run(document, {resultTypes: ['violations']});
              return r.violations.filter(v => ['serious', 'critical'].includes(v.impact))
                .map(v => v.id);
            }""")
            assert found == [], (scheme, found)
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        context.close()
