"""Study list, study page, viewer page and the study ZIP: content, headers and access."""

from __future__ import annotations

import io
import json
import re
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from flask import Flask
from flask.testing import FlaskClient
from pydicom import dcmread
from pydicom.fileset import FileSet
from pydicom.uid import generate_uid

from portal.access.grants import create_grant
from portal.access.models import AuditEvent
from portal.access.principal import Principal
from portal.archive import current_archive
from tests.conftest import IdentityProvider, add_person, signed_in
from tests.factories import make_instance

EVIL_NAME = 'Evil"; filename=evil.html^<b>x</b>'
ADMIN = Principal("user", 0, "t", roles=frozenset({"office_manager"}), issuer="t", subject="t")


@dataclass
class World:
    """A physician's granted CT study (3 slices), a hidden study of the same patient and a
    study of somebody else."""

    app: Flask
    client: FlaskClient
    study: str
    series: str
    sops: list[str]
    hidden_same_patient: str
    other: str


def _ct(study: str, series: str, number: int, **extra: object) -> bytes:
    return make_instance(study=study, series=series, patient_id="EVIL-1", patient_name=EVIL_NAME,
                         rows=32, columns=32, InstanceNumber=number, PixelSpacing=[0.7, 0.7],
                         ImageOrientationPatient=[1, 0, 0, 0, 1, 0],
                         ImagePositionPatient=[0, 0, number * 2.5], WindowCenter=40,
                         WindowWidth=400, **extra)


@pytest.fixture
def world(oidc_app: Flask, idp: IdentityProvider) -> Iterator[World]:
    study, series = generate_uid(), generate_uid()
    hidden, other = generate_uid(), generate_uid()
    files = [_ct(study, series, n) for n in (1, 2, 3)]
    sops = [str(dcmread(io.BytesIO(f), stop_before_pixels=True).SOPInstanceUID) for f in files]
    with oidc_app.app_context():
        archive = current_archive()
        for data in files:
            archive.ingest(data, who="test")
        archive.ingest(make_instance(study=hidden, patient_id="EVIL-1", patient_name=EVIL_NAME,
                                     StudyDate="20200101"), who="test")
        archive.ingest(make_instance(study=other, patient_id="OTHER-1"), who="test")
    user = add_person(oidc_app, idp, "routes-doc", ["physician"])
    with oidc_app.extensions["db"].write_transaction() as session:
        create_grant(session, ADMIN, user_id=user, study_uid=study)
    yield World(oidc_app, signed_in(oidc_app, idp, "routes-doc"), study, series, sops, hidden,
                other)


def _viewer_data(html: str) -> dict:
    found = re.search(r'<script type="application/json" id="viewer-data"[^>]*>(.*?)</script>',
                      html, re.S)
    assert found
    return json.loads(found.group(1))


def test_viewer_page_describes_the_series(world: World) -> None:
    response = world.client.get(f"/studies/{world.study}/view/{world.series}")
    assert response.status_code == 200
    html = response.get_data(as_text=True)
    data = _viewer_data(html)
    assert [f[0] for f in data["frames"]] == world.sops  # instance-number order
    assert data["spacing"] == [0.7, 0.7] and data["spacingSource"] == "patient"
    assert data["window"] == {"center": 40.0, "width": 400.0}
    # The file's unnamed 400/40 is the soft-tissue window; no brain window on a body CT.
    assert [p["name"] for p in data["presets"]] == ["Soft tissue", "Lung", "Bone"]
    assert data["volume"] is True and data["cine"] is False
    # The patient's name is text in the page, never inside the JSON or a URL.
    # (As people write it: the alphabetic group of the hostile PN, escaped; the rest is not
    # shown, and nothing of it unescaped.)
    assert "Evil&#34;; filename" in html and "<b>x</b>" not in html
    assert "EVIL" not in json.dumps(data)
    # Every script is an external module or inert JSON carrying the response's nonce.
    nonce = re.search(r"'nonce-([^']+)'", response.headers["Content-Security-Policy"])
    assert nonce
    for tag in re.findall(r"<script[^>]*>", html):
        assert f'nonce="{nonce.group(1)}"' in tag


def test_study_page_shows_report_slot_series_and_only_visible_history(world: World) -> None:
    html = world.client.get(f"/studies/{world.study}").get_data(as_text=True)
    assert html.index('id="report"') < html.index('id="series-heading"')
    assert f"/studies/{world.study}/view/{world.series}" in html
    assert f"/studies/{world.study}/download.zip" in html
    assert world.hidden_same_patient not in html  # same patient, but not granted
    with world.app.extensions["db"].write_transaction() as session:
        from portal.access.models import User

        user = session.query(User).filter_by(subject="routes-doc").one()
        create_grant(session, ADMIN, user_id=user.id, study_uid=world.hidden_same_patient)
    html = world.client.get(f"/studies/{world.study}").get_data(as_text=True)
    assert f"/studies/{world.hidden_same_patient}" in html and "2020-01-01" in html


@pytest.mark.parametrize("path", ["/studies/{s}", "/studies/{s}/view/{se}",
                                  "/studies/{s}/download.zip"])
def test_foreign_and_missing_studies_answer_404(world: World, path: str) -> None:
    for study, series in ((world.other, world.series), (generate_uid(), generate_uid()),
                          (world.study, generate_uid())):
        if "{se}" not in path and study == world.study:
            continue
        response = world.client.get(path.format(s=study, se=series))
        assert response.status_code == 404, (path, study)


def test_study_zip_holds_every_file_and_a_dicomdir(world: World, tmp_path) -> None:
    response = world.client.get(f"/studies/{world.study}/download.zip")
    assert response.status_code == 200
    headers = response.headers
    assert headers["Content-Type"] == "application/zip"
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert "no-store" in headers["Cache-Control"]
    # docs/security.md 27: the name is made by the server; nothing of the patient's name gets in.
    disposition = headers["Content-Disposition"]
    assert re.fullmatch(r'attachment; filename="study-\d{8}-\d{1,8}\.zip"', disposition)
    assert "evil" not in disposition.lower()
    body = response.get_data()
    assert int(headers["Content-Length"]) == len(body)
    archive = zipfile.ZipFile(io.BytesIO(body))
    assert archive.testzip() is None
    names = archive.namelist()
    assert names[0] == "DICOMDIR" and len(names) == 4
    archive.extractall(tmp_path)
    fileset = FileSet(dcmread(tmp_path / "DICOMDIR"))
    assert sorted(i.SOPInstanceUID for i in fileset) == sorted(world.sops)
    with world.app.app_context():
        stored = current_archive()
        for instance in fileset:
            assert (tmp_path / instance.FileID.replace("\\", "/")).read_bytes() == \
                stored.read(instance.SOPInstanceUID)
    with world.app.extensions["db"].new_session() as session:
        exports = session.query(AuditEvent).filter_by(event_id="110106",
                                                      study_instance_uid=world.study).all()
    assert len(exports) == 1 and exports[0].patient_id == "EVIL-1"


def test_study_list_pages_for_infinite_scroll(oidc_app: Flask, idp: IdentityProvider) -> None:
    user = add_person(oidc_app, idp, "list-doc", ["physician"])
    studies = [generate_uid() for _ in range(27)]
    with oidc_app.app_context():
        for n, uid in enumerate(studies):
            date = f"2025{(n % 12) + 1:02d}{n % 28 + 1:02d}"
            current_archive().ingest(make_instance(study=uid, patient_id=f"P{n}",
                                                   patient_name=f"Pat^{n:02d}", StudyDate=date,
                                                   modality="MR" if n % 2 else "CT"),
                                     who="test")
    with oidc_app.extensions["db"].write_transaction() as session:
        for uid in studies:
            create_grant(session, ADMIN, user_id=user, study_uid=uid)
    client = signed_in(oidc_app, idp, "list-doc")
    first = client.get("/studies").get_data(as_text=True)
    assert first.count('class="study"') == 25
    # The next page starts after the last row's place (keyset paging), its number kept.
    assert 'rel="next" href="?s=&amp;from=&amp;to=&amp;modality=&amp;page=2&amp;after=' in first
    assert 'id="study-rows"' in first and "js/studylist.js" in first
    after = first.split('rel="next" href="')[1].split('"')[0].replace("&amp;", "&")
    second = client.get(f"/studies{after}").get_data(as_text=True)
    assert second.count('class="study"') == 2 and 'rel="next"' not in second
    assert client.get("/studies?page=2").get_data(as_text=True).count('class="study"') == 2
    only_mr = client.get("/studies?modality=MR").get_data(as_text=True)
    assert only_mr.count('class="study"') == 13
    dated = client.get("/studies?from=2025-12-01&to=2025-12-31").get_data(as_text=True)
    assert dated.count('class="study"') == 2  # n = 11 and 23


def test_detector_spacing_is_marked_approximate_and_multiframe_plays() -> None:
    """A radiograph measured with ImagerPixelSpacing is approximate (PS3.3 C.8.11.4.1.1);
    a multi-frame series offers cine at the file's rate."""
    from portal.index.models import Instance, Series, Study
    from portal.studies.viewer import describe_series, spacing_of

    radiograph = Instance(sop_instance_uid="1.2.3", number_of_frames=1, rows=100, columns=80,
                          photometric_interpretation="MONOCHROME1", pixel_spacing=None,
                          image_orientation_patient=None)
    header = {"00181164": {"vr": "DS", "Value": [0.15, 0.15]}}
    assert spacing_of(radiograph, header) == ([0.15, 0.15], "detector")
    radiograph.pixel_spacing = [0.14, 0.14]
    assert spacing_of(radiograph, header) == ([0.14, 0.14], "detector")
    header["00280A02"] = {"vr": "CS", "Value": ["GEOMETRY"]}
    assert spacing_of(radiograph, header) == ([0.14, 0.14], "patient")

    cine = Instance(sop_instance_uid="1.2.4", number_of_frames=30, rows=64, columns=64,
                    photometric_interpretation="YBR_FULL_422", pixel_spacing=None,
                    image_orientation_patient=None, image_position_patient=None)
    data = describe_series(Study(study_instance_uid="1.2"), Series(
        series_instance_uid="1.2.5", modality="US", series_number=1, series_description=""),
        [cine], {"00181063": {"vr": "DS", "Value": [40.0]}}, None)
    assert data["cine"] is True and data["fps"] == 25.0 and len(data["frames"]) == 30
    assert data["frames"][-1] == ["1.2.4", 30]
    assert data["window"] is None and data["presets"] == [] and data["volume"] is False


def test_a_searched_name_is_never_in_a_url(oidc_app: Flask, idp: IdentityProvider) -> None:
    """docs/security.md 28: the study search posts the text (a name, an ID, an accession number);
    the list it leads to, and its next pages, name it only by an opaque key of the session."""
    user = add_person(oidc_app, idp, "search-doc", ["physician"])
    uids = {name: generate_uid() for name in ("Smith^Anna", "Jones^Bob")}
    with oidc_app.app_context():
        for n, (name, uid) in enumerate(uids.items()):
            current_archive().ingest(make_instance(study=uid, patient_id=f"S{n}",
                                                   patient_name=name), who="test")
    with oidc_app.extensions["db"].write_transaction() as session:
        for uid in uids.values():
            create_grant(session, ADMIN, user_id=user, study_uid=uid)
    client = signed_in(oidc_app, idp, "search-doc")
    page = client.get("/studies").get_data(as_text=True)
    assert 'method="post"' in page and 'name="csrf_token"' in page
    token = page.split('name="csrf_token" value="', 1)[1].split('"', 1)[0]
    found = client.post("/studies", data={"q": "smith", "modality": "CT",
                                          "csrf_token": token})
    assert found.status_code == 303
    where = found.headers["Location"]
    assert "smith" not in where.lower() and "s=" in where and "modality=CT" in where
    listing = client.get(where).get_data(as_text=True)
    assert uids["Smith^Anna"] in listing and uids["Jones^Bob"] not in listing
    assert 'value="smith"' in listing  # the box still shows what was typed
    # An old link with the text in it is moved out of the address at once.
    moved = client.get("/studies?q=jones")
    assert moved.status_code == 303 and "jones" not in moved.headers["Location"].lower()
    assert uids["Jones^Bob"] in client.get(moved.headers["Location"]).get_data(as_text=True)
    # Another browser cannot use the key; without its session it searches nothing.
    other = signed_in(oidc_app, idp, "search-doc")
    unfiltered = other.get(where).get_data(as_text=True)
    assert uids["Smith^Anna"] in unfiltered and uids["Jones^Bob"] in unfiltered
    assert client.post("/studies", data={"q": "smith"}).status_code == 403  # no CSRF token
