"""Key images: a Key Object Selection document (PS3.3 A.35.4) in the study puts the images it
flags on the study page, and each opens the viewer at that image (Debian Chromium, iPhone 13)."""

from __future__ import annotations

from flask import Flask
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from portal.access.grants import create_grant
from portal.access.principal import Principal
from portal.archive import current_archive
from tests.browser import chromium, loopback_only, phone
from tests.conftest import IdentityProvider, LiveServer, add_person, signed_in
from tests.factories import make_dataset, to_bytes
from tests.studies.support import shot, sign_in_browser

ADMIN = Principal("user", 0, "t", roles=frozenset({"office_manager"}), issuer="t", subject="t")
KO = "1.2.840.10008.5.1.4.1.1.88.59"


def key_object(study: str, series: str, flagged: list[tuple[str, str]]) -> bytes:
    """A KO document whose evidence names ``flagged`` (SOP class, SOP instance) of a series."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = KO
    ds.SOPClassUID, ds.SOPInstanceUID = KO, generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, generate_uid()
    ds.PatientID, ds.PatientName, ds.Modality = "PAT-1", "Doe^Jane", "KO"
    ds.SeriesNumber, ds.InstanceNumber, ds.ValueType = 90, 1, "CONTAINER"
    title = Dataset()
    title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning = \
        "113000", "DCM", "Of Interest"
    ds.ConceptNameCodeSequence = Sequence([title])
    references = []
    for sop_class, sop in flagged:
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = sop_class, sop
        references.append(item)
    series_item = Dataset()
    series_item.SeriesInstanceUID = series
    series_item.ReferencedSOPSequence = Sequence(references)
    study_item = Dataset()
    study_item.StudyInstanceUID = study
    study_item.ReferencedSeriesSequence = Sequence([series_item])
    ds.CurrentRequestedProcedureEvidenceSequence = Sequence([study_item])
    return to_bytes(ds)


def build(app: Flask, idp: IdentityProvider) -> tuple[str, str, list[str]]:
    study, series = generate_uid(), generate_uid()
    images = [make_dataset(study=study, series=series, InstanceNumber=n, rows=64, columns=64,
                           value=n * 300) for n in range(1, 6)]
    with app.app_context():
        archive = current_archive()
        for ds in images:
            archive.ingest(to_bytes(ds), who="test")
        archive.ingest(key_object(study, series, [(images[3].SOPClassUID,
                                                   images[3].SOPInstanceUID)]), who="test")
    user = add_person(app, idp, "key-doc", ["physician"])
    with app.extensions["db"].write_transaction() as session:
        create_grant(session, ADMIN, user_id=user, study_uid=study)
    return study, series, [str(ds.SOPInstanceUID) for ds in images]


def test_flagged_images_are_listed_and_open_the_viewer_there(oidc_app: Flask,
                                                            idp: IdentityProvider) -> None:
    study, series, sops = build(oidc_app, idp)
    page = signed_in(oidc_app, idp, "key-doc").get(f"/studies/{study}").get_data(as_text=True)
    # The section by its heading (the page's script words mention key images too).
    assert 'id="key-heading"' in page
    assert page.index('id="key-heading"') < page.index('id="series-heading"')
    assert f"image={sops[3]}" in page and f"/instances/{sops[3]}/thumbnail" in page
    assert f"instances/{sops[0]}/thumbnail" not in page
    with LiveServer(oidc_app) as server, chromium() as (playwright, browser):
        context = browser.new_context(**phone(playwright, "iPhone 13"))
        loopback_only(context)
        tab = context.new_page()
        sign_in_browser(tab, server.url, "key-doc", f"/studies/{study}")
        tab.get_by_role("link", name="Key image 1", exact=False).click()
        tab.wait_for_url(f"**/studies/{study}/view/{series}?image={sops[3]}")
        tab.wait_for_function("() => document.querySelector('#viewer').dataset.frame === '4'")
        shot(tab, "key-image-viewer-iPhone_13")
        context.close()


def test_a_study_without_key_objects_has_no_key_image_section(oidc_app: Flask,
                                                              idp: IdentityProvider) -> None:
    study = generate_uid()
    with oidc_app.app_context():
        current_archive().ingest(to_bytes(make_dataset(study=study)), who="test")
    user = add_person(oidc_app, idp, "plain-doc-k", ["physician"])
    with oidc_app.extensions["db"].write_transaction() as session:
        create_grant(session, ADMIN, user_id=user, study_uid=study)
    page = signed_in(oidc_app, idp, "plain-doc-k").get(f"/studies/{study}")
    assert page.status_code == 200 and 'id="key-heading"' not in page.get_data(as_text=True)
