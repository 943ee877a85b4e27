"""A portal with a demo CT study, a physician who may see it, and sign-in in a browser."""

from __future__ import annotations

import io
import tempfile
from dataclasses import dataclass
from pathlib import Path

from flask import Flask
from playwright.sync_api import Page
from pydicom import dcmread

from demo.studies import write_ct_series
from portal.access.grants import create_grant
from portal.access.principal import Principal
from portal.archive import current_archive
from tests.conftest import OIDC_SETTINGS, IdentityProvider, add_person, make_app
from tests.factories import make_instance

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
PHYSICIAN = "viewer-doc"


@dataclass
class CtSite:
    """The app, the CT study and series UIDs, and an earlier study of the same patient."""

    app: Flask
    study: str
    series: str
    earlier: str
    slices: int


def build_ct_site(folder: Path, idp: IdentityProvider, *, slices: int = 150,
                  size: int = 512) -> CtSite:
    """Ingest a demo CT (``demo.studies.write_ct_series``) and an older study; grant both."""
    app = make_app(folder / "instance", OIDC_ISSUER=idp.issuer, **OIDC_SETTINGS)
    with tempfile.TemporaryDirectory() as scratch:
        paths = write_ct_series(Path(scratch), slices=slices, size=size, uid_seed="viewer")
        files = [p.read_bytes() for p in paths]
    header = dcmread(io.BytesIO(files[0]), stop_before_pixels=True)
    earlier = make_instance(patient_id=str(header.PatientID), patient_name=str(header.PatientName),
                            StudyDate="20190304", StudyDescription="CT CHEST (earlier)",
                            IssuerOfPatientID=str(header.get("IssuerOfPatientID", "")),
                            rows=64, columns=64)
    with app.app_context():
        archive = current_archive()
        archive.ingest_many(files, who="test")
        archive.ingest(earlier, who="test")
    earlier_uid = dcmread(io.BytesIO(earlier), stop_before_pixels=True).StudyInstanceUID
    user = add_person(app, idp, PHYSICIAN, ["physician"], name="Dr Viewer")
    admin = Principal("user", 0, "t", roles=frozenset({"office_manager"}), issuer="t",
                      subject="t")
    with app.extensions["db"].write_transaction() as session:
        create_grant(session, admin, user_id=user, study_uid=str(header.StudyInstanceUID))
        create_grant(session, admin, user_id=user, study_uid=str(earlier_uid))
    return CtSite(app, str(header.StudyInstanceUID), str(header.SeriesInstanceUID),
                  str(earlier_uid), slices)


def sign_in_browser(page: Page, base_url: str, sub: str = PHYSICIAN,
                    next_path: str = "/studies") -> None:
    """Sign in through the mock provider with the browser's own cookies."""
    page.goto(f"{base_url}/auth/login?next={next_path}")
    page.fill("input[name=sub]", sub)
    page.get_by_role("button", name="Authorize").click()
    page.wait_for_url(f"{base_url}{next_path}")


def shot(page: Page, name: str) -> None:
    """Save a screenshot under tests/artifacts/ (git-ignored)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"))
