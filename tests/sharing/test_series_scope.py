"""A share link made for selected series of a study opens only those: every DICOMweb route,
QIDO, the study page, thumbnails, the ZIP and reformats hide the others (as 404 or absence)."""

from __future__ import annotations

import io
import zipfile

import pytest
from flask import Flask
from pydicom.uid import generate_uid

from portal.archive import current_archive
from portal.sharing import service
from tests.conftest import IdentityProvider
from tests.factories import make_instance
from tests.sharing.conftest import World, make_share, open_link

DICOM = 'multipart/related; type="application/dicom"'


def test_a_series_link_opens_only_its_series(app: Flask, world: World) -> None:
    hidden_series, hidden_sop = generate_uid(), generate_uid()
    with app.app_context():
        current_archive().ingest(make_instance(study=world.study, series=hidden_series,
                                               sop=hidden_sop, SeriesNumber=2), who="test")
    made = make_share(world, series_uids=[world.series], can_download=True)
    visitor = app.test_client()
    assert open_link(visitor, made.token, made.pin).status_code == 303
    base = f"/dicomweb/studies/{world.study}"
    shown, hidden = f"{base}/series/{world.series}", f"{base}/series/{hidden_series}"
    assert visitor.get(f"{shown}/instances/{world.sop}/rendered").status_code == 200
    for path in (f"{hidden}", f"{hidden}/metadata", f"{hidden}/rendered", f"{hidden}/thumbnail",
                 f"{hidden}/instances", f"{hidden}/instances/{hidden_sop}",
                 f"{hidden}/instances/{hidden_sop}/rendered",
                 f"{hidden}/instances/{hidden_sop}/frames/1",
                 f"{hidden}/volume/coronal"):
        answer = visitor.get(path, headers={"Accept": DICOM if path.endswith(
            (hidden_series, hidden_sop)) else "*/*"})
        assert answer.status_code == 404, path
    listed = visitor.get(f"{base}/series").get_json()
    assert [s["0020000E"]["Value"][0] for s in listed] == [world.series]
    everything = visitor.get(f"{base}/instances").get_json()
    assert {i["00080018"]["Value"][0] for i in everything} == {world.sop}
    metadata = visitor.get(f"{base}/metadata").get_json()
    assert {i["00080018"]["Value"][0] for i in metadata} == {world.sop}
    study_retrieve = visitor.get(base, headers={"Accept": DICOM})
    assert study_retrieve.status_code == 200 and hidden_sop.encode() not in study_retrieve.data
    page = visitor.get(f"/studies/{world.study}").get_data(as_text=True)
    assert world.series in page and hidden_series not in page
    archive = visitor.get(f"/studies/{world.study}/download.zip")
    assert archive.status_code == 200
    names = zipfile.ZipFile(io.BytesIO(archive.data)).namelist()
    assert len([n for n in names if n != "DICOMDIR"]) == 1


def test_selected_series_must_belong_to_the_study_and_stay_a_view_link(world: World) -> None:
    with pytest.raises(service.ShareError, match="not part of this study"):
        make_share(world, series_uids=[world.other_series])
    with pytest.raises(service.ShareError, match="view link only"):
        make_share(world, series_uids=[world.series], whole_patient=True)
    with pytest.raises(service.ShareError, match="view link only"):
        make_share(world, series_uids=[world.series], audience="physician",
                   requires_sign_in=True)


def test_a_physician_shares_one_series_from_a_phone(oidc_app: Flask,
                                                    idp: IdentityProvider) -> None:
    from sqlalchemy import select

    from portal.access.grants import create_grant
    from portal.access.principal import Principal
    from portal.sharing.models import ShareLinkStudy
    from tests.browser import chromium, loopback_only, phone
    from tests.conftest import LiveServer, add_person
    from tests.studies.support import shot, sign_in_browser

    study, first, second = generate_uid(), generate_uid(), generate_uid()
    with oidc_app.app_context():
        for number, series in ((1, first), (2, second)):
            current_archive().ingest(make_instance(study=study, series=series,
                                                   SeriesNumber=number,
                                                   SeriesDescription=f"Part {number}"),
                                     who="test")
    user = add_person(oidc_app, idp, "series-doc", ["physician"])
    admin = Principal("user", 0, "t", roles=frozenset({"office_manager"}), issuer="t",
                      subject="t")
    with oidc_app.extensions["db"].write_transaction() as session:
        create_grant(session, admin, user_id=user, study_uid=study)
    with LiveServer(oidc_app) as server, chromium() as (playwright, browser):
        context = browser.new_context(**phone(playwright, "iPhone 13"))
        loopback_only(context)
        page = context.new_page()
        sign_in_browser(page, server.url, "series-doc", f"/studies/{study}/share")
        page.get_by_label("Only some series of this study").check()
        page.get_by_label("2 · CT · Part 2", exact=False).check()
        assert page.evaluate("document.documentElement.scrollWidth - window.innerWidth") <= 0
        shot(page, "share-series-form-iPhone_13")
        page.get_by_role("button", name="Make the link").click()
        page.locator("#share-url").wait_for()
        assert "/s?lang=en#" in page.locator("#share-url").input_value()
        shot(page, "share-series-created-iPhone_13")
        context.close()
    with oidc_app.extensions["db"].new_session() as session:
        rows = list(session.scalars(select(ShareLinkStudy)))
    assert [(r.study_instance_uid, r.series_uids) for r in rows] == [(study, [second])]
