"""The ROI endpoint and saved measurements over HTTP (portal/studies/measurements.py): a
synthetic CT with known values (a disc of 100 HU on -1000), access like the frame's, bad
shapes refused with a reason, and a Grayscale Softcopy Presentation State that pydicom reads
back from WADO-RS, that QIDO-RS lists, and that a share-link visitor sees."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import pytest
from flask import Flask
from flask.testing import FlaskClient
from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import select

from portal.access.grants import create_grant
from portal.access.models import User
from portal.access.principal import Principal, user_principal
from portal.archive import current_archive
from portal.sharing import service
from portal.sharing.routes import share_policy
from tests.conftest import IdentityProvider, add_person, csrf_of, signed_in
from tests.factories import make_dataset, to_bytes

ADMIN = Principal("user", 0, "t", roles=frozenset({"office_manager"}), issuer="t", subject="t")
SIZE = 64


def disc_pixels(hu: int = 100, background: int = -1000, intercept: int = -1024) -> np.ndarray:
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] + 0.5
    inside = (xx - 32) ** 2 + (yy - 32) ** 2 <= 14 ** 2
    return np.where(inside, hu - intercept, background - intercept).astype(np.uint16)


@dataclass
class Site:
    app: Flask
    study: str
    series: str
    sop: str
    dx_study: str
    dx_series: str
    dx_sop: str
    stranger_study: str


def build(app: Flask, idp: IdentityProvider) -> Site:
    study, series, dx_study, dx_series = (generate_uid() for _ in range(4))
    ct = make_dataset(study=study, series=series, rows=SIZE, columns=SIZE,
                      PixelSpacing=[0.5, 0.5], ImageOrientationPatient=[1, 0, 0, 0, 1, 0],
                      ImagePositionPatient=[0, 0, 0])
    ct.PixelData = disc_pixels().tobytes()
    dx = make_dataset(study=dx_study, series=dx_series, rows=SIZE, columns=SIZE,
                      modality="DX", ImagerPixelSpacing=[0.2, 0.2])
    dx.SOPClassUID = dx.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    stranger = make_dataset(patient_id="PAT-9", rows=SIZE, columns=SIZE)
    with app.app_context():
        for ds in (ct, dx, stranger):
            current_archive().ingest(to_bytes(ds), who="test")
    doctor = add_person(app, idp, "measure-doc", ["physician"], name="Gregory House")
    add_person(app, idp, "stranger-doc", ["physician"])
    with app.extensions["db"].write_transaction() as session:
        for uid in (study, dx_study):
            create_grant(session, ADMIN, user_id=doctor, study_uid=uid)
    return Site(app, study, series, str(ct.SOPInstanceUID), dx_study, dx_series,
                str(dx.SOPInstanceUID), str(stranger.StudyInstanceUID))


@pytest.fixture
def site(oidc_app: Flask, idp: IdentityProvider) -> Site:
    return build(oidc_app, idp)


def roi_url(study: str, series: str, sop: str, frame: int = 1) -> str:
    return f"/studies/{study}/series/{series}/instances/{sop}/frames/{frame}/roi"


def post(client: FlaskClient, url: str, body: object) -> object:
    return client.post(url, json=body, headers={"X-CSRF-Token": csrf_of(client)})


def test_a_region_of_the_disc_reads_100_hu_with_its_area_in_mm2(site: Site,
                                                                idp: IdentityProvider) -> None:
    doctor = signed_in(site.app, idp, "measure-doc")
    url = roi_url(site.study, site.series, site.sop)
    inside = post(doctor, url, {"kind": "ellipse", "points": [[24, 24], [40, 40]]})
    assert inside.status_code == 200, inside.data  # type: ignore[attr-defined]
    found = inside.get_json()  # type: ignore[attr-defined]
    assert found["unit"] == "HU" and found["mean"] == pytest.approx(100.0)
    assert found["sd"] == pytest.approx(0.0) and (found["min"], found["max"]) == (100, 100)
    assert found["calibration"] == "patient" and not found["approximate"]
    assert found["areaUnit"] == "mm2" and found["area"] == pytest.approx(np.pi * 8 * 8 * 0.25)
    # Half in, half out: the mean is numpy's over the same pixel centres.
    edge = post(doctor, url, {"kind": "polygon",
                              "points": [[32, 10], [60, 10], [60, 54], [32, 54]]}).get_json()  # type: ignore[attr-defined]
    hu = disc_pixels().astype(float) - 1024
    expected = hu[10:54, 32:60]
    assert edge["mean"] == pytest.approx(float(expected.mean()))
    assert edge["sd"] == pytest.approx(float(expected.std()))
    assert (edge["min"], edge["max"]) == (-1000, 100)


def test_detector_spacing_is_approximate_and_bad_shapes_are_400(site: Site,
                                                                 idp: IdentityProvider) -> None:
    doctor = signed_in(site.app, idp, "measure-doc")
    dx = post(doctor, roi_url(site.dx_study, site.dx_series, site.dx_sop),
              {"kind": "ellipse", "points": [[0, 0], [10, 10]]}).get_json()  # type: ignore[attr-defined]
    assert dx["calibration"] == "detector" and dx["approximate"] is True
    assert dx["unit"] == "" and dx["area"] == pytest.approx(np.pi * 25 * 0.04)
    url = roi_url(site.study, site.series, site.sop)
    for body, reason in [({"kind": "square", "points": []}, b"kind must be"),
                         ({"kind": "polygon", "points": [[1, 1]]}, b"3 to"),
                         ({"kind": "ellipse", "points": [[500, 500], [600, 600]]}, b"no pixel"),
                         ("not json", b"JSON object")]:
        refused = post(doctor, url, body)
        assert refused.status_code == 400 and reason in refused.data  # type: ignore[attr-defined]
    missing_frame = post(doctor, roi_url(site.study, site.series, site.sop, 2),
                         {"kind": "ellipse", "points": [[0, 0], [4, 4]]})
    assert missing_frame.status_code == 404  # type: ignore[attr-defined]


def test_a_stranger_cannot_measure_an_image_he_may_not_see(site: Site,
                                                            idp: IdentityProvider) -> None:
    stranger = signed_in(site.app, idp, "stranger-doc")
    refused = post(stranger, roi_url(site.study, site.series, site.sop),
                   {"kind": "ellipse", "points": [[24, 24], [40, 40]]})
    assert refused.status_code == 404  # type: ignore[attr-defined]
    assert b"mean" not in refused.data  # type: ignore[attr-defined]


def test_saved_measurements_are_a_gsps_others_read(site: Site, idp: IdentityProvider) -> None:
    doctor = signed_in(site.app, idp, "measure-doc")
    drawn = [{"sop": site.sop, "frame": 1, "kind": "ellipse", "points": [[24, 24], [40, 40]],
              "text": "mean 100.0 HU"},
             {"sop": site.sop, "frame": 1, "kind": "length", "points": [[2, 2], [12, 2]],
              "text": "5.0 mm"},
             {"sop": site.sop, "frame": 1, "kind": "angle",
              "points": [[10, 30], [20, 30], [20, 40]], "text": "90°"},
             {"sop": site.sop, "frame": 1, "kind": "polygon",
              "points": [[30, 10], [40, 10], [35, 20]], "text": ""}]
    saved = post(doctor, f"/studies/{site.study}/measurements", {"measurements": drawn})
    assert saved.status_code == 201, saved.data  # type: ignore[attr-defined]
    state_uid = saved.get_json()["sop"]  # type: ignore[attr-defined]
    # QIDO-RS lists it in the study; WADO-RS gives a file pydicom reads as a GSPS.
    listed = doctor.get(f"/dicomweb/studies/{site.study}/instances",
                        headers={"Accept": "application/dicom+json"}).get_json()
    assert state_uid in [i["00080018"]["Value"][0] for i in listed]
    with site.app.app_context():
        ds = dcmread(io.BytesIO(current_archive().read(state_uid)))
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.11.1" and ds.Modality == "PR"
    assert ds.StudyInstanceUID == site.study
    assert ds.ContentCreatorName.family_name == "Gregory House"
    objects = [g for a in ds.GraphicAnnotationSequence for g in a.GraphicObjectSequence]
    assert [g.GraphicType for g in objects] == ["ELLIPSE", "POLYLINE", "POLYLINE", "POLYLINE"]
    assert list(objects[0].GraphicData) == [24, 32, 40, 32, 32, 24, 32, 40]
    texts = [t.UnformattedTextValue for a in ds.GraphicAnnotationSequence
             for t in a.get("TextObjectSequence", [])]
    assert texts == ["mean 100.0 HU", "5.0 mm", "90°"]
    # Read back by the viewer's endpoint, shapes as drawn.
    back = doctor.get(f"/studies/{site.study}/series/{site.series}/measurements").get_json()
    assert {m["author"] for m in back["measurements"]} == {"Gregory House"}
    shapes = {(m["kind"], str(m["points"])) for m in back["measurements"]}
    assert shapes == {(d["kind"], str([[float(v) for v in p] for p in d["points"]]))
                      for d in drawn}
    # A share-link visitor of the study sees them; a stranger gets 404.
    with site.app.test_request_context(), \
            site.app.extensions["db"].write_transaction() as session:
        user = session.scalars(select(User).where(User.subject == "measure-doc")).one()
        made = service.create_share(session, user_principal(user, "session"),
                                    share_policy(), study_uid=site.study, audience="physician")
        token, pin = made.token, made.pin
    visitor = site.app.test_client()
    assert visitor.post("/s/exchange", data={"token": token, "pin": pin or ""}).status_code == 303
    seen = visitor.get(f"/studies/{site.study}/series/{site.series}/measurements")
    assert seen.status_code == 200 and len(seen.get_json()["measurements"]) == 4
    assert visitor.post(f"/studies/{site.study}/measurements",
                        json={"measurements": drawn}).status_code == 404  # not his view
    stranger = signed_in(site.app, idp, "stranger-doc")
    assert stranger.get(f"/studies/{site.study}/series/{site.series}/measurements"
                        ).status_code == 404
    assert post(stranger, f"/studies/{site.study}/measurements",
                {"measurements": drawn}).status_code == 404  # type: ignore[attr-defined]


def test_saving_refuses_what_is_not_a_measurement_of_the_study(site: Site,
                                                               idp: IdentityProvider) -> None:
    doctor = signed_in(site.app, idp, "measure-doc")
    url = f"/studies/{site.study}/measurements"
    for body, reason in [({"measurements": []}, b"1 to 50"),
                         ({"measurements": [{"sop": site.dx_sop, "kind": "length",
                                             "points": [[0, 0], [1, 1]]}]}, b"no image"),
                         ({"measurements": [{"sop": site.sop, "kind": "angle",
                                             "points": [[0, 0], [1, 1]]}]}, b"3 points"),
                         ({"measurements": [{"sop": site.sop, "kind": "length", "frame": 3,
                                             "points": [[0, 0], [1, 1]]}]}, b"no frame 3")]:
        refused = post(doctor, url, body)
        assert refused.status_code == 400 and reason in refused.data, refused.data  # type: ignore[attr-defined]
    with site.app.app_context():
        listed = doctor.get(f"/dicomweb/studies/{site.study}/instances",
                            headers={"Accept": "application/dicom+json"}).get_json()
    assert len(listed) == 1  # nothing half-stored


def test_an_image_highdicom_cannot_annotate_is_a_400_with_its_reason(site: Site,
                                                                     idp: IdentityProvider) -> None:
    """A colour image (a GSPS is for grayscale ones): 400 with the reason, nothing stored."""
    colour = make_dataset(study=site.dx_study, series=generate_uid(), rows=SIZE, columns=SIZE,
                          modality="XC", SamplesPerPixel=3, PhotometricInterpretation="RGB",
                          PlanarConfiguration=0, BitsAllocated=8, BitsStored=8, HighBit=7,
                          PixelRepresentation=0)
    colour.SOPClassUID = colour.file_meta.MediaStorageSOPClassUID = \
        "1.2.840.10008.5.1.4.1.1.77.1.4"  # VL Photographic Image Storage
    colour.PixelData = bytes(SIZE * SIZE * 3)
    with site.app.app_context():
        current_archive().ingest(to_bytes(colour), who="test")
    doctor = signed_in(site.app, idp, "measure-doc")
    refused = post(doctor, f"/studies/{site.dx_study}/measurements",
                   {"measurements": [{"sop": str(colour.SOPInstanceUID), "kind": "length",
                                      "points": [[1, 1], [9, 9]]}]})
    assert refused.status_code == 400, refused.data  # type: ignore[attr-defined]
    assert b"cannot carry measurements" in refused.data  # type: ignore[attr-defined]
    with site.app.app_context():
        listed = doctor.get(f"/dicomweb/studies/{site.dx_study}/instances",
                            headers={"Accept": "application/dicom+json"}).get_json()
    assert len(listed) == 2  # the radiograph and the photograph: nothing half-stored
