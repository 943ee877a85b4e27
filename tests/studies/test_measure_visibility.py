"""Who sees saved measurements (issue 20 item 4, portal/studies/measurements.py): the author,
the visitors of the share links he made, and a colleague who claimed his sign-in link; not
another physician with a grant to the same study, nor the visitor of that physician's link;
an office manager is told how many there are. A presentation state from elsewhere (the
hospital's) is shown to all who see its series; one of the portal's own without an author to
nobody. Text other than ASCII is written as UTF-8 (ISO_IR 192) and pydicom reads it back
equal, in the GSPS and in the Key Object Selection document."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from flask import Flask
from flask.testing import FlaskClient
from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import select

from portal.access.grants import create_grant
from portal.access.models import User
from portal.access.principal import user_principal
from portal.archive import current_archive
from portal.index.models import Instance, Series
from portal.retention.service import delete_study
from portal.sharing import service
from portal.sharing.routes import share_policy
from portal.studies.models import SavedMeasurements
from tests.browser import chromium, loopback_only, phone
from tests.conftest import (
    OIDC_SETTINGS,
    IdentityProvider,
    LiveServer,
    add_person,
    close_app,
    csrf_of,
    make_app,
    sign_in,
    signed_in,
)
from tests.factories import make_dataset, to_bytes
from tests.studies.support import PHYSICIAN, build_ct_site, sign_in_browser
from tests.studies.test_measure import ADMIN, SIZE, Site, build

NOTE = "Müller: Läsion 12 mm, Ø 9 mm, ≈ 30 € Δ"
DRAWN = [{"sop": "", "frame": 1, "kind": "length", "points": [[2, 2], [12, 2]], "text": NOTE},
         {"sop": "", "frame": 1, "kind": "ellipse", "points": [[24, 24], [40, 40]],
          "text": "mean 100.0 HU"}]


@pytest.fixture
def site(tmp_path: Path, idp: IdentityProvider, database_url: str) -> Iterator[Site]:
    """test_measure's site, on SQLite and on PostgreSQL."""
    app = make_app(tmp_path / "instance", database_url, OIDC_ISSUER=idp.issuer,
                   **OIDC_SETTINGS)
    yield build(app, idp)
    close_app(app)


def _post(client: FlaskClient, url: str, body: object) -> object:
    return client.post(url, json=body, headers={"X-CSRF-Token": csrf_of(client)})


def _save(client: FlaskClient, site: Site) -> str:
    drawn = [{**d, "sop": site.sop} for d in DRAWN]
    saved = _post(client, f"/studies/{site.study}/measurements", {"measurements": drawn})
    assert saved.status_code == 201, saved.data  # type: ignore[attr-defined]
    return str(saved.get_json()["sop"])  # type: ignore[attr-defined]


def _seen(client: FlaskClient, site: Site) -> dict[str, object]:
    answer = client.get(f"/studies/{site.study}/series/{site.series}/measurements")
    assert answer.status_code == 200, answer.data
    found: dict[str, object] = answer.get_json()
    return found


def _texts(found: dict[str, object]) -> set[str]:
    return {str(m["text"]) for m in found["measurements"]}  # type: ignore[attr-defined]


def _link(app: Flask, sub: str, study: str, *, sign_in: bool = False) -> tuple[str, str]:
    """Token and PIN of a link ``sub`` makes for ``study``."""
    with app.test_request_context(), app.extensions["db"].write_transaction() as session:
        user = session.scalars(select(User).where(User.subject == sub)).one()
        made = service.create_share(session, user_principal(user, "session"), share_policy(),
                                    study_uid=study, audience="physician",
                                    requires_sign_in=sign_in)
        return made.token, made.pin or ""


def _visitor(app: Flask, sub: str, study: str) -> FlaskClient:
    """A browser that opened a share link ``sub`` made for ``study``."""
    token, pin = _link(app, sub, study)
    visitor = app.test_client()
    assert visitor.post("/s/exchange", data={"token": token, "pin": pin}).status_code == 303
    return visitor


def _people(site: Site, idp: IdentityProvider) -> None:
    """A second physician of practice P1 with a grant to the same study, his practice's
    office manager, and a third physician without any grant."""
    second = add_person(site.app, idp, "second-doc", ["physician"], practice="P1",
                        name="Lisa Cuddy")
    add_person(site.app, idp, "manager", ["office_manager"], practice="P1")
    add_person(site.app, idp, "colleague-doc", ["physician"], name="James Wilson")
    with site.app.extensions["db"].write_transaction() as session:
        create_grant(session, ADMIN, user_id=second, study_uid=site.study)


def test_only_the_author_and_those_he_shared_with_see_his_measurements(
        site: Site, idp: IdentityProvider) -> None:
    _people(site, idp)
    author = signed_in(site.app, idp, "measure-doc")
    state = _save(author, site)
    mine = _seen(author, site)
    assert _texts(mine) == {NOTE, "mean 100.0 HU"} and "withheld" not in mine
    assert {m["state"] for m in mine["measurements"]} == {state}  # type: ignore[attr-defined]

    # Another physician with a grant to the same study: the study and its viewer, no marks.
    second = signed_in(site.app, idp, "second-doc")
    assert _seen(second, site)["measurements"] == []
    viewer = second.get(f"/studies/{site.study}/view/{site.series}")
    assert viewer.status_code == 200 and "Läsion" not in viewer.get_data(as_text=True)
    # Nor the visitor of his link, while the visitor of the author's link sees them.
    assert _seen(_visitor(site.app, "second-doc", site.study), site)["measurements"] == []
    assert _texts(_seen(_visitor(site.app, "measure-doc", site.study), site)) == \
        {NOTE, "mean 100.0 HU"}

    # The office manager manages: he is told that one set exists, and is not shown it.
    manager = _seen(signed_in(site.app, idp, "manager"), site)
    assert manager == {"measurements": [], "withheld": 1}

    # What the second physician saves is his own: the author does not see it either.
    _save(second, site)
    assert len(_seen(second, site)["measurements"]) == 2  # type: ignore[arg-type]
    assert {m["state"] for m in _seen(author, site)["measurements"]} == {state}  # type: ignore[attr-defined]
    assert _seen(signed_in(site.app, idp, "manager"), site)["withheld"] == 2

    # The object itself stays an instance of the study: DICOMweb lists it (docs/features.md).
    listed = second.get(f"/dicomweb/studies/{site.study}/instances",
                        headers={"Accept": "application/dicom+json"}).get_json()
    assert state in [i["00080018"]["Value"][0] for i in listed]

    # Who saved what goes with the study when retention deletes it.
    with site.app.app_context(), site.app.extensions["db"].write_transaction() as session:
        assert len(list(session.scalars(select(SavedMeasurements)))) == 2
        delete_study(session, site.study, who="test")
    with site.app.extensions["db"].new_session() as session:
        assert list(session.scalars(select(SavedMeasurements))) == []


def test_a_colleague_who_claimed_the_authors_sign_in_link_sees_them(
        site: Site, idp: IdentityProvider) -> None:
    _people(site, idp)
    _save(signed_in(site.app, idp, "measure-doc"), site)
    token, pin = _link(site.app, "measure-doc", site.study, sign_in=True)
    colleague = site.app.test_client()
    opened = colleague.post("/s/exchange", data={"token": token, "pin": pin})
    assert opened.status_code == 303 and opened.headers["Location"].endswith("/shared/claim")
    assert sign_in(colleague, idp, "colleague-doc", next_path="/shared/claim").status_code == 302
    assert colleague.get(f"/studies/{site.study}/series/{site.series}/measurements"
                         ).status_code == 404  # no grant yet
    accepted = colleague.post("/shared/claim", data={"csrf_token": csrf_of(colleague)})
    assert accepted.status_code == 303
    assert _texts(_seen(colleague, site)) == {NOTE, "mean 100.0 HU"}
    # Another physician's grant does not carry the author's marks (the one from the office).
    assert _seen(signed_in(site.app, idp, "second-doc"), site)["measurements"] == []


def test_presentation_states_from_elsewhere_are_the_hospitals_and_orphans_nobodys(
        site: Site, idp: IdentityProvider) -> None:
    _people(site, idp)
    with site.app.app_context():
        archive = current_archive()
        image = dcmread(io.BytesIO(archive.read(site.sop)), stop_before_pixels=True)
        for maker, text in [("ACME PACS", "from the PACS"), ("Referrer portal", "orphan")]:
            layer = hd.pr.GraphicLayer(layer_name="L", order=1)
            state = hd.pr.GrayscaleSoftcopyPresentationState(
                referenced_images=[image], series_instance_uid=generate_uid(),
                series_number=99, sop_instance_uid=generate_uid(), instance_number=1,
                manufacturer=maker, manufacturer_model_name="m", software_versions="1",
                device_serial_number="1", content_label="L",
                graphic_layers=[layer], graphic_annotations=[hd.pr.GraphicAnnotation(
                    referenced_images=[image], graphic_layer=layer,
                    graphic_objects=[hd.pr.GraphicObject(
                        "POLYLINE", np.array([[1.0, 1.0], [5.0, 5.0]]), "PIXEL")],
                    text_objects=[hd.pr.TextObject(text, "PIXEL", anchor_point=(5.0, 1.0))])])
            out = io.BytesIO()
            state.save_as(out, enforce_file_format=True)
            archive.ingest(out.getvalue(), who="test")
    for sub in ("second-doc", "measure-doc"):
        assert _texts(_seen(signed_in(site.app, idp, sub), site)) == {"from the PACS"}


def test_text_other_than_ascii_is_written_as_utf8_and_reads_back_equal(
        site: Site, idp: IdentityProvider) -> None:
    """The image says ISO_IR 100 (Latin-1) with a Latin-1 patient name; the GSPS and the
    KO say ISO_IR 192 and every text in them reads back as written."""
    latin = make_dataset(study=site.study, series=generate_uid(), rows=SIZE, columns=SIZE,
                         patient_name="Müller^Jürgen", SpecificCharacterSet="ISO_IR 100")
    with site.app.app_context():
        current_archive().ingest(to_bytes(latin), who="test")
    writer = add_person(site.app, idp, "umlaut-doc", ["physician"], name="Zoë Ångström-Šimić")
    with site.app.extensions["db"].write_transaction() as session:
        create_grant(session, ADMIN, user_id=writer, study_uid=site.study)
    doctor = signed_in(site.app, idp, "umlaut-doc")
    saved = _post(doctor, f"/studies/{site.study}/measurements", {"measurements": [
        {"sop": str(latin.SOPInstanceUID), "kind": "length", "points": [[1, 1], [9, 9]],
         "text": NOTE}]})
    assert saved.status_code == 201, saved.data  # type: ignore[attr-defined]
    marked = _post(doctor, f"/studies/{site.study}/key-images", {"sop": str(latin.SOPInstanceUID)})
    assert marked.status_code == 201, marked.data  # type: ignore[attr-defined]
    with site.app.app_context():
        gsps, ko = (dcmread(io.BytesIO(current_archive().read(answer.get_json()["sop"])))  # type: ignore[attr-defined]
                    for answer in (saved, marked))
    for ds in (gsps, ko):
        assert ds.SpecificCharacterSet == "ISO_IR 192"
        assert str(ds.PatientName) == "Müller^Jürgen"
    assert gsps.ContentCreatorName.family_name == "Zoë Ångström-Šimić"
    assert [t.UnformattedTextValue for a in gsps.GraphicAnnotationSequence
            for t in a.TextObjectSequence] == [NOTE]
    observer = next(item for item in ko.ContentSequence if item.ValueType == "PNAME")
    assert str(observer.PersonName) == "Zoë Ångström-Šimić^"
    # The bytes are UTF-8 (another viewer decodes them by the declared set).
    with site.app.app_context():
        stored = current_archive().read(str(gsps.SOPInstanceUID))
    assert NOTE.encode("utf-8") in stored and "Müller^Jürgen".encode() in stored
    # The viewer's endpoint gives the same words back.
    back = _seen(doctor, site.__class__(**{**site.__dict__,
                                           "series": str(latin.SeriesInstanceUID)}))
    assert _texts(back) == {NOTE}


def test_the_viewer_draws_them_for_the_author_and_not_for_another_physician(
        tmp_path: Path, idp: IdentityProvider) -> None:
    """In Chromium on an iPhone 13: the author's viewer draws his saved marks after loading;
    the viewer of another physician with a grant to the same study draws none."""
    ct = build_ct_site(tmp_path, idp, slices=6, size=128)
    try:
        second = add_person(ct.app, idp, "second-doc", ["physician"], name="Lisa Cuddy")
        with ct.app.extensions["db"].write_transaction() as session:
            create_grant(session, ADMIN, user_id=second, study_uid=ct.study)
        with ct.app.extensions["db"].new_session() as session:
            middle = session.scalars(
                select(Instance.sop_instance_uid).join(Series, Series.id == Instance.series_fk)
                .where(Series.series_instance_uid == ct.series)
                .order_by(Instance.instance_number)).first()
        assert middle is not None
        author = signed_in(ct.app, idp, PHYSICIAN)
        saved = _post(author, f"/studies/{ct.study}/measurements", {"measurements": [
            {**d, "sop": middle} for d in DRAWN]})
        assert saved.status_code == 201, saved.data  # type: ignore[attr-defined]
        url = f"/studies/{ct.study}/view/{ct.series}?image={middle}"
        errors: list[str] = []
        with LiveServer(ct.app) as server, chromium() as (playwright, browser):
            for sub, expected in (("second-doc", 0), (PHYSICIAN, 2)):
                context = browser.new_context(**phone(playwright, "iPhone 13"))
                loopback_only(context)
                page = context.new_page()
                page.on("pageerror", lambda e: errors.append(str(e)))
                sign_in_browser(page, server.url, sub=sub, next_path=url.split("?")[0])
                page.goto(f"{server.url}{url}")
                page.wait_for_function("() => document.querySelector('#viewer').dataset"
                                       ".savedShown !== undefined", timeout=30_000)
                shown = page.eval_on_selector("#viewer", "v => v.dataset.savedShown")
                assert shown == str(expected), (sub, shown)
                assert page.locator("svg.marks .shape.saved").count() == expected
                assert errors == []
                context.close()
    finally:
        close_app(ct.app)

