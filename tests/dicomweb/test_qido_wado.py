"""A real client (the PyPI dicomweb-client) stores, searches and retrieves over real HTTP."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from flask import Flask
from flask.testing import FlaskClient
from pydicom.uid import generate_uid

from portal.archive.validate import preamble_is_inert
from tests.conftest import LiveServer, basic_auth, make_client, sample_paths
from tests.factories import make_dataset, make_instance

Datasets = list[pydicom.Dataset]


def dicomweb(server: LiveServer, name: str, secret: str) -> DICOMwebClient:
    session = requests.Session()
    session.auth = (name, secret)
    return DICOMwebClient(url=f"{server.url}/dicomweb", session=session)


@pytest.fixture
def web(app: Flask, live_server: LiveServer) -> DICOMwebClient:
    return dicomweb(live_server, *make_client(app, "web-client"))


@pytest.fixture
def two_studies(web: DICOMwebClient) -> tuple[Datasets, Datasets]:
    """Two patients' studies stored through STOW-RS by dicomweb-client."""
    a_study, a_series = generate_uid(), generate_uid()
    first = [make_dataset(study=a_study, series=a_series, patient_id="P-ALPHA",
                          patient_name="Alpha^Anna", StudyDate="20250310", AccessionNumber="A1",
                          InstanceNumber=i + 1, value=i) for i in range(3)]
    b_study = generate_uid()
    second = [make_dataset(study=b_study, patient_id="P-BETA", patient_name="Beta^Bob",
                           StudyDate="20260105", AccessionNumber="B7", modality="MR")]
    web.store_instances(first)
    web.store_instances(second)
    return first, second


def uids(results: list[dict[str, Any]], tag: str = "0020000D") -> set[str]:
    return {r[tag]["Value"][0] for r in results}


def test_search_for_studies_with_matching(web: DICOMwebClient,
                                          two_studies: tuple[Datasets, Datasets]) -> None:
    first, second = two_studies
    a, b = first[0].StudyInstanceUID, second[0].StudyInstanceUID
    assert uids(web.search_for_studies()) == {a, b}
    assert uids(web.search_for_studies(search_filters={"PatientID": "P-ALPHA"})) == {a}
    assert uids(web.search_for_studies(search_filters={"PatientName": "alpha*"})) == {a}
    assert uids(web.search_for_studies(search_filters={"PatientName": "B?ta^Bob"})) == {b}
    assert uids(web.search_for_studies(search_filters={"StudyDate": "20260101-"})) == {b}
    assert uids(web.search_for_studies(search_filters={"StudyDate": "-20251231"})) == {a}
    assert uids(web.search_for_studies(search_filters={"ModalitiesInStudy": "MR"})) == {b}
    both = web.search_for_studies(search_filters={"StudyInstanceUID": f"{a},{b}"})
    assert uids(both) == {a, b}
    assert web.search_for_studies(search_filters={"AccessionNumber": "none"}) == []
    [study] = web.search_for_studies(search_filters={"AccessionNumber": "A1"})
    assert study["00201208"]["Value"] == [3]
    assert study["00100010"]["Value"] == [{"Alphabetic": "Alpha^Anna"}]
    assert study["00081190"]["Value"][0].endswith(f"/dicomweb/studies/{a}")


def test_paging_and_includefield(web: DICOMwebClient,
                                 two_studies: tuple[Datasets, Datasets]) -> None:
    page1 = web.search_for_studies(limit=1)
    page2 = web.search_for_studies(limit=1, offset=1)
    assert len(page1) == len(page2) == 1
    assert uids(page1) != uids(page2)
    [study] = web.search_for_studies(search_filters={"PatientID": "P-BETA"},
                                     fields=["PatientBirthDate", "00080090", "StudyID"])
    assert study["00100030"]["Value"] == ["19700101"]
    assert study["00080090"]["Value"] == [{"Alphabetic": "House^Gregory"}]
    [full] = web.search_for_studies(search_filters={"PatientID": "P-BETA"}, fields=["all"])
    assert full["00100040"]["Value"] == ["F"]


def test_series_and_instance_searches(web: DICOMwebClient,
                                      two_studies: tuple[Datasets, Datasets]) -> None:
    first, _second = two_studies
    study, series = first[0].StudyInstanceUID, first[0].SeriesInstanceUID
    [found] = web.search_for_series(study)
    assert found["0020000E"]["Value"] == [series]
    assert found["00201209"]["Value"] == [3]
    instances = web.search_for_instances(study, series)
    assert uids(instances, "00080018") == {d.SOPInstanceUID for d in first}
    assert len(web.search_for_instances(search_filters={"InstanceNumber": "2"})) == 1
    mr = web.search_for_series(search_filters={"Modality": "MR"})
    assert len(mr) == 1


def test_retrieve_instance_series_study_and_metadata(web: DICOMwebClient,
                                                     two_studies: tuple[Datasets, Datasets]
                                                     ) -> None:
    first, _second = two_studies
    original = first[1]
    study, series = original.StudyInstanceUID, original.SeriesInstanceUID
    got = web.retrieve_instance(study, series, original.SOPInstanceUID)
    assert got.SOPInstanceUID == original.SOPInstanceUID
    assert got.PixelData == original.PixelData
    assert len(web.retrieve_series(study, series)) == 3
    assert len(web.retrieve_study(study)) == 3
    metadata = web.retrieve_instance_metadata(study, series, original.SOPInstanceUID)
    assert metadata["00100020"]["Value"] == ["P-ALPHA"]
    assert set(metadata["7FE00010"]) == {"vr", "BulkDataURI"}  # never inline, by reference
    assert len(web.retrieve_series_metadata(study, series)) == 3


def test_metadata_keeps_a_sequence_holding_a_value_its_vr_would_refuse(
        web: DICOMwebClient) -> None:
    """Scanners write a decimal string one digit too long or a frame number as ``1.0``: the
    sequences holding them stay in /metadata and QIDO-RS, with the rest of their items."""
    measures = pydicom.Dataset()
    measures.add_new(0x00280030, "DS", "0.48828125000000001\\0.48828125000000001")
    measures.SliceThickness = "5"
    groups = pydicom.Dataset()
    groups.PixelMeasuresSequence = pydicom.Sequence([measures])
    source = pydicom.Dataset()
    source.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    source.ReferencedSOPInstanceUID = generate_uid()
    source.add_new(0x00081160, "IS", "1.0")
    ds = make_dataset(SharedFunctionalGroupsSequence=pydicom.Sequence([groups]),
                      SourceImageSequence=pydicom.Sequence([source]))
    web.store_instances([ds])
    metadata = web.retrieve_instance_metadata(ds.StudyInstanceUID, ds.SeriesInstanceUID,
                                              ds.SOPInstanceUID)
    [shared] = metadata["52009229"]["Value"]
    [pixel_measures] = shared["00289110"]["Value"]
    assert pixel_measures["00280030"]["Value"] == [0.48828125, 0.48828125]
    assert pixel_measures["00180050"]["Value"] == [5]
    [item] = metadata["00082112"]["Value"]
    assert item["00081155"]["Value"] == [source.ReferencedSOPInstanceUID]
    [found] = web.search_for_instances(ds.StudyInstanceUID, ds.SeriesInstanceUID,
                                       fields=["00082112"])
    assert found["00082112"]["Value"][0]["00081155"]["Value"] == \
        [source.ReferencedSOPInstanceUID]


def test_retrieve_frames(web: DICOMwebClient, two_studies: tuple[Datasets, Datasets]) -> None:
    first, _second = two_studies
    original = first[0]
    [frame] = web.retrieve_instance_frames(original.StudyInstanceUID,
                                           original.SeriesInstanceUID,
                                           original.SOPInstanceUID, frame_numbers=[1])
    assert frame == original.PixelData


def test_hierarchy_is_enforced(web: DICOMwebClient, live_server: LiveServer, app: Flask,
                               two_studies: tuple[Datasets, Datasets]) -> None:
    first, second = two_studies
    name, secret = "web-client-2", make_client(app, "web-client-2")[1]
    # A series or instance named under a study it does not belong to is not found.
    url = (f"{live_server.url}/dicomweb/studies/{second[0].StudyInstanceUID}/series/"
           f"{first[0].SeriesInstanceUID}/instances/{first[0].SOPInstanceUID}")
    assert requests.get(url, auth=(name, secret), timeout=10).status_code == 404
    assert requests.get(url + "/metadata", auth=(name, secret), timeout=10).status_code == 404


def test_a_client_without_the_read_right_sees_nothing(app: Flask, client: FlaskClient,
                                                      auth: dict[str, str]) -> None:
    study = generate_uid()
    from tests.dicomweb.test_stow import headers, multipart

    stored = client.post("/dicomweb/studies", data=multipart(make_instance(study=study)),
                         headers=headers(auth))
    assert stored.status_code == 200
    modality = basic_auth(*make_client(app, "modality", can_read=False))
    assert client.get("/dicomweb/studies", headers=modality).status_code == 204
    assert client.get(f"/dicomweb/studies/{study}", headers=modality).status_code == 404
    missing = client.get(f"/dicomweb/studies/{generate_uid()}", headers=modality)
    denied = client.get(f"/dicomweb/studies/{study}", headers=modality)
    assert missing.get_json() == denied.get_json()  # no existence oracle
    assert client.get("/dicomweb/studies").status_code == 401


def test_bad_query_parameters_answer_400(client: FlaskClient, auth: dict[str, str]) -> None:
    assert client.get("/dicomweb/studies?limit=abc", headers=auth).status_code == 400
    assert client.get("/dicomweb/studies?NotAnAttribute=1", headers=auth).status_code == 400
    assert client.get("/dicomweb/studies?StudyDate=2020-x", headers=auth).status_code == 400
    # A single date must be one too (a VR value the attribute cannot hold: 400 with why).
    for day in ("abc", "20041301", "2004", "20040230-"):
        answer = client.get(f"/dicomweb/studies?StudyDate={day}", headers=auth)
        assert answer.status_code == 400, (day, answer.status_code)
        assert "invalid date" in answer.get_json()["error"]
    assert client.get("/dicomweb/studies?StudyDate=20040229", headers=auth).status_code == 204


def test_every_shipped_sample_comes_back_byte_identical(app: Flask, live_server: LiveServer,
                                                        auth: dict[str, str]) -> None:
    """Store each pydicom / pydicom-data file with STOW-RS and read it back with WADO-RS."""
    name, secret = make_client(app, "roundtrip")
    web = dicomweb(live_server, name, secret)
    session = requests.Session()
    session.auth = (name, secret)
    compared = 0
    first: dict[str, bytes] = {}  # SOP Instance UID -> the bytes stored for it first
    for path in sample_paths():
        data = path.read_bytes()
        boundary = "sample-boundary"
        body = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + data
                + f"\r\n--{boundary}--\r\n".encode())
        response = session.post(
            f"{live_server.url}/dicomweb/studies", data=body, timeout=60,
            headers={"Content-Type": f'multipart/related; type="application/dicom"; '
                                     f"boundary={boundary}"})
        if response.status_code != 200:
            continue  # refused files are covered by the validation tests
        ds = pydicom.dcmread(io.BytesIO(data))
        raw = web.retrieve_instance(ds.StudyInstanceUID, ds.SeriesInstanceUID,
                                    ds.SOPInstanceUID)
        again = session.get(
            f"{live_server.url}/dicomweb/studies/{ds.StudyInstanceUID}/series/"
            f"{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}", timeout=60,
            headers={"Accept": 'multipart/related; type="application/dicom"; '
                               "transfer-syntax=*"})
        assert again.status_code == 200
        # Byte-identical, except that an executable-looking preamble comes back zeroed.
        kept = preamble_is_inert(data[:128])
        expected = data if kept else bytes(128) + data[128:]
        # Some samples are one instance in several transfer syntaxes (OBXXXX1A and its RLE
        # copy): the later one is "already stored" and the first one's bytes come back.
        expected = first.setdefault(ds.SOPInstanceUID, expected)
        assert expected in again.content, path.name
        assert raw.SOPInstanceUID == ds.SOPInstanceUID
        compared += 1
    assert compared >= 80


def test_frames_of_compressed_instances_are_served(app: Flask, live_server: LiveServer) -> None:
    name, secret = make_client(app, "frames")
    web = dicomweb(live_server, name, secret)
    path = next(p for p in sample_paths() if p.name == "MR_small_RLE.dcm")
    ds = pydicom.dcmread(path)
    web.store_instances([ds])
    expected = ds.pixel_array
    [raw] = web.retrieve_instance_frames(
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, frame_numbers=[1],
        media_types=(("application/octet-stream", "1.2.840.10008.1.2.1"),))
    decoded = np.frombuffer(raw, dtype=expected.dtype).reshape(expected.shape)
    assert np.array_equal(decoded, expected)
    [compressed] = web.retrieve_instance_frames(
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, frame_numbers=[1],
        media_types=(("image/dicom-rle", "1.2.840.10008.1.2.5"),))
    assert compressed != raw and len(compressed) > 0
