"""QIDO-RS and WADO-RS edge semantics (PS3.18, PS3.4 C.2.2.2) through the real
dicomweb-client over HTTP (plain requests where the client cannot say it): issue 18 item 5."""

from __future__ import annotations

import time
from typing import Any

import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from flask import Flask
from pydicom.dataset import Dataset

from tests.conftest import LiveServer, make_client
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

