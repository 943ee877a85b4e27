"""QIDO-RS and WADO-RS edge semantics (PS3.18, PS3.4 C.2.2.2) through the real
dicomweb-client over HTTP (plain requests where the client cannot say it): issue 18 item 5."""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from flask import Flask
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from tests.conftest import LiveServer, make_client, sample_paths
from tests.dicomweb.test_conformance_clients import parts_of
from tests.factories import make_dataset, to_bytes


class Peer:
    """A reading and storing client of a live portal, as a DICOMweb peer sees it."""

    def __init__(self, app: Flask, server: LiveServer) -> None:
        self.http = requests.Session()
        self.http.auth = make_client(app, "edge")
        self.base = f"{server.url}/dicomweb"
        self.web = DICOMwebClient(url=self.base, session=self.http)

    def get(self, path: str, accept: str | None = None, **params: Any) -> requests.Response:
        headers = {"Accept": accept} if accept else {}
        return self.http.get(f"{self.base}{path}", params=params, headers=headers, timeout=60)

    def stow(self, data: bytes) -> requests.Response:
        """STOW-RS of one file's bytes as they are (the client would re-encode a data set)."""
        boundary = "edge-boundary"
        body = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + data
                + f"\r\n--{boundary}--\r\n".encode())
        return self.http.post(f"{self.base}/studies", data=body, timeout=60, headers={
            "Content-Type": f'multipart/related; type="application/dicom"; '
                            f"boundary={boundary}"})


@pytest.fixture
def peer(app: Flask, live_server: LiveServer) -> Peer:
    return Peer(app, live_server)


def study_uids(results: list[dict[str, Any]]) -> set[str]:
    return {r["0020000D"]["Value"][0] for r in results}


def value(result: dict[str, Any], tag: str) -> Any:
    return result.get(tag, {}).get("Value", [None])[0]


@pytest.fixture
def three(peer: Peer) -> dict[str, Dataset]:
    """Three studies: OFFIS (CT, "Chest"), another institution (MR, "chest"), none (US)."""
    made = {
        "offis": make_dataset(patient_id="P-1", InstitutionName="OFFIS",
                              StudyDescription="Chest", StationName="CT01",
                              TimezoneOffsetFromUTC="+0100", Manufacturer="ACME",
                              SeriesDescription="Axial"),
        "other": make_dataset(patient_id="P-2", InstitutionName="Other Hospital",
                              StudyDescription="chest", modality="MR", StationName="MR02",
                              Manufacturer="acme", SeriesDescription="axial"),
        "none": make_dataset(patient_id="P-3", StudyDescription="", modality="US",
                             Manufacturer="Zeta"),
    }
    peer.web.store_instances(list(made.values()))
    return made


# -- 1. any attribute matches, from the index or the stored headers -----------------------------

def test_an_attribute_the_index_does_not_hold_is_matched_not_ignored(
        peer: Peer, three: dict[str, Dataset]) -> None:
    offis, other = three["offis"].StudyInstanceUID, three["other"].StudyInstanceUID
    found = peer.web.search_for_studies(search_filters={"InstitutionName": "OFFIS"})
    assert study_uids(found) == {offis}  # was: every study, with a Warning
    assert value(found[0], "00080080") == "OFFIS"
    # An attribute only the stored headers hold, at every level, wildcards included.
    assert study_uids(peer.web.search_for_studies(
        search_filters={"StationName": "MR*"})) == {other}
    series = peer.web.search_for_series(search_filters={"Manufacturer": "ACME"})
    assert [value(s, "0020000E") for s in series] == [three["offis"].SeriesInstanceUID]
    plain = peer.get("/studies", StationName="CT01")
    assert plain.status_code == 200 and "Warning" not in plain.headers
    # Paging applies to what matched.
    assert len(peer.web.search_for_studies(search_filters={"Manufacturer": "*"},
                                           limit=1, offset=1)) == 1
    # What cannot be matched is refused with the reason, never widened.
    nested = peer.get("/studies", **{"00081032.00080100": "X"})
    assert nested.status_code == 400 and "sequence" in nested.text
    assert peer.get("/studies", ProcedureCodeSequence="X").status_code == 400
    assert peer.get("/studies", PatientWeight="heavy").status_code == 400


def test_header_matching_stays_fast_and_refuses_too_many_candidates(
        peer: Peer, monkeypatch: pytest.MonkeyPatch, three: dict[str, Dataset]) -> None:
    from portal.dicomweb import qido

    more = [make_dataset(patient_id=f"P-M{i}", StationName=f"S{i}") for i in range(30)]
    peer.web.store_instances(more)
    started = time.perf_counter()
    found = peer.web.search_for_studies(search_filters={"StationName": "S2*"})
    elapsed = time.perf_counter() - started
    assert {value(f, "00081010") for f in found} == {f"S{i}" for i in range(30)
                                                     if str(i).startswith("2")}
    assert elapsed < 5, elapsed  # 33 candidates' headers, most made at ingest
    monkeypatch.setattr(qido, "MAX_HEADER_SCAN", 10)
    refused = peer.get("/studies", StationName="S2*")
    assert refused.status_code == 400 and "narrow the search" in refused.text
    assert peer.get("/studies", StationName="S2*", PatientID="P-M2").status_code == 200


# -- 2. emptyvaluematching and multiplevaluematching ---------------------------------------------

def test_empty_and_multiple_value_matching_are_supported(
        peer: Peer, three: dict[str, Dataset]) -> None:
    uid = {k: d.StudyInstanceUID for k, d in three.items()}
    asked = peer.web.search_for_studies(search_filters={
        "StudyDescription": "Chest", "emptyvaluematching": "true"})
    assert study_uids(asked) == {uid["offis"], uid["none"]}
    assert study_uids(peer.web.search_for_studies(search_filters={
        "InstitutionName": "OFFIS", "emptyvaluematching": "true"})) == {uid["offis"],
                                                                        uid["none"]}
    # From the headers alike.
    assert study_uids(peer.web.search_for_studies(search_filters={
        "StationName": "CT01", "emptyvaluematching": "true"})) == {uid["offis"], uid["none"]}
    # Two quotation marks: only the empty ones (PS3.4 C.2.2.2.1).
    assert study_uids(peer.web.search_for_studies(
        search_filters={"StudyDescription": '""'})) == {uid["none"]}
    multiple = peer.web.search_for_studies(search_filters={
        "PatientID": "P-1\\P-3", "multiplevaluematching": "true"})
    assert study_uids(multiple) == {uid["offis"], uid["none"]}
    assert study_uids(peer.web.search_for_studies(search_filters={
        "Manufacturer": "ACME\\Zeta", "multiplevaluematching": "true"})) == {uid["offis"],
                                                                            uid["none"]}
    # Without the flag a backslash is part of the value.
    assert peer.get("/studies", PatientID="P-1\\P-3").status_code == 204
    bad = peer.get("/studies", emptyvaluematching="maybe")
    assert bad.status_code == 400 and "emptyvaluematching" in bad.text


# -- 3. series and instance answers carry the study's (and series') attributes ------------------

@pytest.mark.parametrize("scoped", [True, False])
def test_series_and_instance_answers_carry_the_upper_levels(
        peer: Peer, three: dict[str, Dataset], scoped: bool) -> None:
    ds = three["offis"]
    if scoped:
        series = peer.web.search_for_series(study_instance_uid=ds.StudyInstanceUID)
        instances = peer.web.search_for_instances(study_instance_uid=ds.StudyInstanceUID,
                                                  series_instance_uid=ds.SeriesInstanceUID)
    else:
        series = peer.web.search_for_series(search_filters={"PatientID": "P-1"})
        instances = peer.web.search_for_instances(search_filters={"PatientID": "P-1"})
    [one_series], [one_instance] = series, instances
    for result in (one_series, one_instance):
        assert value(result, "00100020") == "P-1"
        assert value(result, "00100010") == {"Alphabetic": "Doe^Jane"}
        assert value(result, "00080020") == "20260102"
        assert value(result, "00080050") == "ACC1"
        assert value(result, "00081030") == "Chest"
        assert value(result, "00201206") == 1  # Number of Study Related Series
    assert value(one_instance, "0020000E") == ds.SeriesInstanceUID
    assert value(one_instance, "00080060") == "CT"
    assert value(one_instance, "00200011") == 1


# -- 4. Timezone Offset From UTC ---------------------------------------------------------------

def test_the_timezone_offset_is_returned_by_default_when_known(
        peer: Peer, three: dict[str, Dataset]) -> None:
    by_uid = {r["0020000D"]["Value"][0]: r for r in peer.web.search_for_studies()}
    assert by_uid[three["offis"].StudyInstanceUID]["00080201"] == {"vr": "SH",
                                                                   "Value": ["+0100"]}
    assert "00080201" not in by_uid[three["other"].StudyInstanceUID]
    [series] = peer.web.search_for_series(search_filters={"PatientID": "P-1"})
    assert value(series, "00080201") == "+0100"


# -- 5. legacy dates ----------------------------------------------------------------------------

def test_a_legacy_date_is_answered_as_stored_and_matches_ranges(peer: Peer) -> None:
    ds = make_dataset(patient_id="P-OLD", StudyDate="1997.04.24",
                      PatientBirthDate="1950.01.02", SeriesDate="1997.04.24")
    assert peer.stow(to_bytes(ds)).status_code == 200
    [found] = peer.web.search_for_studies(search_filters={"PatientID": "P-OLD"})
    assert value(found, "00080020") == "1997.04.24"  # was "1997.04." (cut to 8)
    assert value(found, "00100030") == "1950.01.02"
    for asked in ("19970424", "19970101-19971231", "1997.04.24", "-19970424", "19970424-"):
        assert study_uids(peer.web.search_for_studies(
            search_filters={"StudyDate": asked})) == {ds.StudyInstanceUID}, asked
    assert peer.get("/studies", StudyDate="19970425-").status_code == 204
    [series] = peer.web.search_for_series(search_filters={"SeriesDate": "19970101-"})
    assert value(series, "00080021") == "1997.04.24"


# -- 6. case: exact and wildcard matching agree ----------------------------------------------

def test_exact_and_wildcard_matching_agree_on_case(peer: Peer,
                                                   three: dict[str, Dataset]) -> None:
    uid = {k: d.StudyInstanceUID for k, d in three.items()}
    for key in ("StudyDescription", "InstitutionName"):
        text = value(next(r for r in peer.web.search_for_studies(search_filters={key: "*"})
                          if r["0020000D"]["Value"][0] == uid["offis"]), "00081030")
        assert text == "Chest"
    # Non-PN attributes are case-sensitive, exact and wildcard alike (PS3.4 C.2.2.2.4).
    assert study_uids(peer.web.search_for_studies(
        search_filters={"StudyDescription": "Chest"})) == {uid["offis"]}
    assert study_uids(peer.web.search_for_studies(
        search_filters={"StudyDescription": "Ch*"})) == {uid["offis"]}
    assert study_uids(peer.web.search_for_studies(
        search_filters={"StudyDescription": "ch?st"})) == {uid["other"]}
    assert study_uids(peer.web.search_for_studies(
        search_filters={"InstitutionName": "offis*"})) == set()
    assert study_uids(peer.web.search_for_studies(
        search_filters={"Manufacturer": "AC*"})) == {uid["offis"]}
    assert study_uids(peer.web.search_for_series(
        search_filters={"Modality": "c*"})) == set()
    # Person names stay case-insensitive.
    assert len(peer.web.search_for_studies(search_filters={"PatientName": "doe*"})) == 3
    assert len(peer.web.search_for_studies(search_filters={"PatientName": "DOE^JANE"})) == 3



# -- 7. retrieved files are byte-identical to what was stored ---------------------------------

AS_STORED = 'multipart/related; type="application/dicom"; transfer-syntax=*'


def _retrieved(peer: Peer, ds: Dataset) -> bytes:
    response = peer.get(f"/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
                        f"/instances/{ds.SOPInstanceUID}", AS_STORED)
    assert response.status_code == 200, response.text
    [(_kind, payload)] = parts_of(response)
    return payload


def test_a_benign_preamble_comes_back_byte_identical_an_executable_one_zeroed(
        peer: Peer) -> None:
    benign = bytearray(to_bytes(make_dataset(patient_id="P-PRE")))
    benign[16:24] = b"\x01\x02\x80\xff\x00\x10\x1f\xfe"  # a vendor's binary marks, no text
    sample = next(p for p in sample_paths() if p.name == "2062")  # pydicom-data: one 0x01
    for data in (bytes(benign), sample.read_bytes()):
        assert any(data[:128])
        assert peer.stow(data).status_code == 200
        ds = pydicom.dcmread(io.BytesIO(data))
        assert _retrieved(peer, ds) == data  # was: the preamble zeroed
        assert peer.web.retrieve_instance(ds.StudyInstanceUID, ds.SeriesInstanceUID,
                                          ds.SOPInstanceUID).SOPInstanceUID == ds.SOPInstanceUID
    for head in (b"MZ\x90\x00", b"\x7fELF", b"#!/bin/sh\n"):
        hostile = bytearray(to_bytes(make_dataset(patient_id="P-EXE")))
        hostile[:len(head)] = head
        assert peer.stow(bytes(hostile)).status_code == 200
        ds = pydicom.dcmread(io.BytesIO(bytes(hostile)))
        assert _retrieved(peer, ds) == bytes(128) + bytes(hostile[128:])
    # Text after zeros could be a script run by a shell: zeroed too.
    script = bytearray(to_bytes(make_dataset(patient_id="P-SH")))
    text = b"\ncurl x | sh;"
    script[16:16 + len(text)] = text
    stored = peer.stow(bytes(script))
    assert stored.status_code == 200, stored.headers.get("Warning")
    ds = pydicom.dcmread(io.BytesIO(bytes(script)))
    assert _retrieved(peer, ds)[:128] == bytes(128)


# -- 8. frames as the metadata describes them -------------------------------------------------

NATIVE = (("application/octet-stream", "1.2.840.10008.1.2.1"),)


def _frames(peer: Peer, ds: Dataset, numbers: list[int]) -> list[bytes]:
    return list(peer.web.retrieve_instance_frames(
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, frame_numbers=numbers,
        media_types=NATIVE))


def _stored(peer: Peer, name: str) -> Dataset:
    path = get_testdata_file(name)
    assert path is not None, name
    response = peer.stow(Path(path).read_bytes())
    assert response.status_code == 200, (response.headers.get("Warning"), response.text)
    return pydicom.dcmread(path)


def _metadata(peer: Peer, ds: Dataset) -> dict[str, Any]:
    found: dict[str, Any] = peer.web.retrieve_instance_metadata(
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    return found


def test_single_bit_frames_are_packed_as_stored(peer: Peer) -> None:
    ds = _stored(peer, "liver.dcm")  # a 3-frame segmentation, 1 bit per pixel
    size = ds.Rows * ds.Columns // 8
    assert _frames(peer, ds, [2, 3]) == [ds.PixelData[size:2 * size],
                                         ds.PixelData[2 * size:3 * size]]  # was: 8x, unpacked
    big = _stored(peer, "liver_expb.dcm")  # the same in Explicit VR Big Endian: decoded
    [frame] = _frames(peer, big, [1])
    assert len(frame) == size
    assert np.array_equal(np.unpackbits(np.frombuffer(frame, np.uint8), bitorder="little"),
                          big.pixel_array[0].ravel())


def test_colour_frames_follow_the_planar_configuration_of_the_metadata(peer: Peer) -> None:
    big = _stored(peer, "ExplVR_BigEnd.dcm")  # RGB, Planar Configuration 1, big endian
    # The same picture in little endian, planes as stored: served as they are.
    planar = make_dataset(patient_id="P-PL", rows=big.Rows, columns=big.Columns,
                          SamplesPerPixel=3, PhotometricInterpretation="RGB",
                          PlanarConfiguration=1, BitsAllocated=8, BitsStored=8, HighBit=7)
    planar.PixelData = np.ascontiguousarray(big.pixel_array.transpose(2, 0, 1)).tobytes()
    assert peer.stow(to_bytes(planar)).status_code == 200
    assert _metadata(peer, planar)["00280006"]["Value"] == [1]
    assert _frames(peer, planar, [1]) == [planar.PixelData]
    assert _metadata(peer, big)["00280006"]["Value"] == [1]
    [frame] = _frames(peer, big, [1])
    # Decoded, and laid out as the metadata says: all red, then green, then blue.
    assert frame == np.ascontiguousarray(big.pixel_array.transpose(2, 0, 1)).tobytes()


def test_ybr_full_422_frames_are_consistent_with_their_metadata(peer: Peer) -> None:
    native = _stored(peer, "SC_ybr_full_422_uncompressed.dcm")
    two_per_pixel = native.Rows * native.Columns * 2  # PS3.3 C.7.6.3.1.2
    assert _frames(peer, native, [1]) == [native.PixelData[:two_per_pixel]]
    jpeg = _stored(peer, "SC_rgb_dcmtk_+eb+cy+np.dcm")  # JPEG baseline, YBR_FULL_422
    metadata = _metadata(peer, jpeg)
    assert metadata["00280004"]["Value"] == ["YBR_FULL_422"]
    [frame] = _frames(peer, jpeg, [1])
    assert len(frame) == jpeg.Rows * jpeg.Columns * 2  # was 3 bytes a pixel
    # Y0 Y1 Cb Cr per pair of pixels: the luminance is the decoder's.
    luminance = np.frombuffer(frame, np.uint8).reshape(jpeg.Rows, jpeg.Columns // 2, 4)
    from pydicom.pixels import pixel_array

    decoded = pixel_array(jpeg, raw=True)
    assert np.array_equal(luminance[:, :, :2].reshape(jpeg.Rows, jpeg.Columns),
                          decoded[:, :, 0])


# -- 9. rendered: viewport exactly, linear-exact ----------------------------------------------

def test_viewport_is_honoured_exactly_and_linear_exact_is_accepted(peer: Peer) -> None:
    from PIL import Image

    ds = make_dataset(patient_id="P-VP", rows=512, columns=512)
    peer.web.store_instances([ds])
    path = (f"/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/"
            f"{ds.SOPInstanceUID}/rendered")
    for size in ((300, 300), (100, 100), (257, 257)):
        response = peer.get(path, "image/png", viewport=f"{size[0]},{size[1]}")
        assert response.status_code == 200, response.text
        assert Image.open(io.BytesIO(response.content)).size == size  # was snapped to 512
    for function in ("linear-exact", "LINEAR_EXACT", "linear_exact"):
        response = peer.get(path, "image/png", window=f"40,400,{function}")
        assert response.status_code == 200, (function, response.text)
    refused = peer.get(path, "image/png", window="40,400,cubic")
    assert refused.status_code == 400 and "linear-exact" in refused.text
