"""WADO-RS transfer syntax negotiation (PS3.18 8.7.3.4, 8.7.3.5.2, 8.7.8) judged by real clients:
dicomweb-client and plain HTTP against a live portal, with JPEG-LS and JPEG 2000 instances
stored next to an uncompressed one, and DCMTK reading what comes back."""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests
from flask import Flask
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.uid import generate_uid

from portal.archive import current_archive
from portal.dicomweb import routes
from tests.conftest import LiveServer, sample_paths
from tests.dicomweb.test_conformance_clients import OHIF_FRAMES, Portal, instance_path, parts_of

EXPLICIT_LE = "1.2.840.10008.1.2.1"
JPEG_LS = "1.2.840.10008.1.2.4.80"
J2K = "1.2.840.10008.1.2.4.90"
DICOM_ANY = 'multipart/related; type="application/dicom"; transfer-syntax=*'


def sample(name: str) -> Path:
    return next(p for p in sample_paths() if p.name == name)


def stow(portal: Portal, name: str, study: str) -> tuple[Dataset, bytes]:
    """A sample re-identified into ``study``, stored over HTTP as exactly these bytes."""
    ds = pydicom.dcmread(sample(name))
    ds.PatientID, ds.PatientName = "TS-1", "Syntax^Transfer"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()
    body = (b"--stored\r\nContent-Type: application/dicom\r\n\r\n" + data
            + b"\r\n--stored--\r\n")
    response = portal.http.post(f"{portal.base}/studies", data=body, timeout=30, headers={
        "Content-Type": 'multipart/related; type="application/dicom"; boundary=stored',
        "Accept": "application/dicom+json"})
    assert response.status_code == 200, response.text
    return pydicom.dcmread(io.BytesIO(data)), data


class Stored:
    """One study: a JPEG-LS lossless MR, the same MR uncompressed, a 10-frame JPEG-LS MR."""

    def __init__(self, portal: Portal) -> None:
        self.study = generate_uid()
        self.jls, self.jls_bytes = stow(portal, "MR_small_jpeg_ls_lossless.dcm", self.study)
        self.plain, self.plain_bytes = stow(portal, "MR_small.dcm", self.study)
        self.frames, self.frames_bytes = stow(portal, "emri_small_jpeg_ls_lossless.dcm",
                                              self.study)


@pytest.fixture
def portal(app: Flask, live_server: LiveServer) -> Portal:
    return Portal(app, live_server)


@pytest.fixture
def stored(portal: Portal) -> Stored:
    return Stored(portal)


def retrieve(portal: Portal, ds: Dataset, **kwargs: object) -> Dataset:
    return portal.web.retrieve_instance(ds.StudyInstanceUID, ds.SeriesInstanceUID,
                                        ds.SOPInstanceUID, **kwargs)


# dicomweb-client's retrieve_instance asks for transfer-syntax=* unless told otherwise (its
# retrieve_study and retrieve_series name no syntax); this is how it asks for the default.
NO_SYNTAX = ("application/dicom",)


# -- instances (PS3.18 8.7.3.4, Table 8.7.3-2) ------------------------------------------------

def test_default_retrieve_decompresses_to_explicit_vr_little_endian(portal: Portal,
                                                                    stored: Stored) -> None:
    got = retrieve(portal, stored.jls, media_types=NO_SYNTAX)
    assert got.file_meta.TransferSyntaxUID == EXPLICIT_LE
    assert got.SOPInstanceUID == stored.jls.SOPInstanceUID  # a lossless re-encoding
    assert not got["PixelData"].is_undefined_length
    assert len(got.PixelData) == got.Rows * got.Columns * 2
    assert np.array_equal(got.pixel_array, stored.jls.pixel_array)
    assert np.array_equal(got.pixel_array, stored.plain.pixel_array)
    # The answer names the syntax actually sent, in the part and (one part) overall.
    response = portal.get(instance_path(stored.jls), 'multipart/related; type="application/dicom"')
    assert f"transfer-syntax={EXPLICIT_LE}" in response.headers["Content-Type"]
    [(kind, payload)] = parts_of(response)
    assert kind == f"application/dicom; transfer-syntax={EXPLICIT_LE}"
    assert payload[128:132] == b"DICM"
    # An uncompressed instance is served as stored, byte for byte (nothing decoded).
    [(kind, payload)] = parts_of(portal.get(instance_path(stored.plain),
                                            'multipart/related; type="application/dicom"'))
    assert kind == f"application/dicom; transfer-syntax={EXPLICIT_LE}"
    assert payload == stored.plain_bytes
    # No Accept header, or any wildcard, means the same default.
    for accept in (None, "*/*", "multipart/related; type=*/*"):
        [(kind, _)] = parts_of(portal.get(instance_path(stored.jls), accept))
        assert kind == f"application/dicom; transfer-syntax={EXPLICIT_LE}", accept


def test_an_instance_asked_for_as_application_dicom_comes_as_one_part(portal: Portal,
                                                                      stored: Stored) -> None:
    """PS3.18 since Supplement 183 names ``application/dicom`` itself for one instance: asked
    that way (not inside multipart/related), the body is the Part 10 file, its Content-Type
    naming the syntax sent; anything with several instances, or a client preferring
    multipart, still gets multipart/related."""
    as_stored = portal.get(instance_path(stored.jls), "application/dicom; transfer-syntax=*")
    assert as_stored.status_code == 200
    assert as_stored.headers["Content-Type"] == f"application/dicom; transfer-syntax={JPEG_LS}"
    assert as_stored.content == stored.jls_bytes
    assert int(as_stored.headers["Content-Length"]) == len(stored.jls_bytes)
    default = portal.get(instance_path(stored.jls), "application/dicom")
    assert default.headers["Content-Type"] == f"application/dicom; transfer-syntax={EXPLICIT_LE}"
    got = pydicom.dcmread(io.BytesIO(default.content))
    assert got.file_meta.TransferSyntaxUID == EXPLICIT_LE
    assert np.array_equal(got.pixel_array, stored.jls.pixel_array)
    preferring = portal.get(instance_path(stored.plain),
                            'multipart/related; type="application/dicom", application/dicom;q=0.5')
    [(_kind, payload)] = parts_of(preferring)
    assert payload == stored.plain_bytes
    series = f"/studies/{stored.study}/series/{stored.plain.SeriesInstanceUID}"
    [(_kind, payload)] = parts_of(portal.get(series, "application/dicom"))
    assert payload == stored.plain_bytes


def test_an_accept_header_refusing_everything_is_not_acceptable(portal: Portal,
                                                                stored: Stored) -> None:
    """Ranges of ``q=0`` only accept nothing (RFC 9110 12.4.2): 406, where no header at
    all would have been served the default."""
    refused = "application/dicom+json;q=0"
    for path, accept in (("/studies", refused), (instance_path(stored.plain) + "/metadata",
                                                 refused),
                         (instance_path(stored.plain), "application/dicom;q=0, */*;q=0"),
                         (instance_path(stored.plain) + "/frames/1",
                          "multipart/related; type=application/octet-stream;q=0"),
                         (instance_path(stored.plain) + "/rendered", "image/jpeg;q=0")):
        answer = portal.get(path, accept)
        assert answer.status_code == 406, (path, answer.status_code, answer.text[:200])
        assert portal.get(path).status_code == 200, path


def test_explicit_vr_little_endian_asked_by_name(portal: Portal, stored: Stored) -> None:
    got = retrieve(portal, stored.frames, media_types=(("application/dicom", EXPLICIT_LE),))
    assert got.file_meta.TransferSyntaxUID == EXPLICIT_LE
    assert got.NumberOfFrames == 10
    original = pydicom.dcmread(sample("emri_small.dcm")).pixel_array
    assert np.array_equal(got.pixel_array, original)


def test_any_transfer_syntax_returns_the_stored_bytes(portal: Portal, stored: Stored) -> None:
    for got in (retrieve(portal, stored.jls),  # dicomweb-client's own default is "*"
                retrieve(portal, stored.jls, media_types=(("application/dicom", "*"),))):
        assert got.file_meta.TransferSyntaxUID == JPEG_LS
        assert got.PixelData == stored.jls.PixelData
    response = portal.get(instance_path(stored.jls), DICOM_ANY)
    [(kind, payload)] = parts_of(response)
    assert payload == stored.jls_bytes  # byte-identical, never decoded
    assert kind == f"application/dicom; transfer-syntax={JPEG_LS}"
    assert f"transfer-syntax={JPEG_LS}" in response.headers["Content-Type"]
    # Naming the stored syntax itself does the same.
    got = retrieve(portal, stored.jls, media_types=(("application/dicom", JPEG_LS),))
    assert got.file_meta.TransferSyntaxUID == JPEG_LS


def test_a_study_is_negotiated_part_by_part(portal: Portal, stored: Stored) -> None:
    by_default = portal.web.retrieve_study(stored.study)
    assert len(by_default) == 3
    assert {d.file_meta.TransferSyntaxUID for d in by_default} == {EXPLICIT_LE}
    as_stored = portal.get(f"/studies/{stored.study}", DICOM_ANY)
    assert as_stored.status_code == 200
    # Each part names its own syntax; the whole answer names none, as they differ.
    assert "transfer-syntax" not in as_stored.headers["Content-Type"]
    parts = dict(parts_of(as_stored)[i][::-1] for i in range(3))
    assert parts[stored.jls_bytes] == f"application/dicom; transfer-syntax={JPEG_LS}"
    assert parts[stored.plain_bytes] == f"application/dicom; transfer-syntax={EXPLICIT_LE}"
    assert parts[stored.frames_bytes] == f"application/dicom; transfer-syntax={JPEG_LS}"


def test_a_large_re_encoded_instance_streams_from_a_file_that_is_then_deleted(
        app: Flask, portal: Portal, stored: Stored, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(routes, "SPILL_OVER", 0)
    got = portal.web.retrieve_study(stored.study)
    assert {d.file_meta.TransferSyntaxUID for d in got} == {EXPLICIT_LE}
    frames = next(d for d in got if d.SOPInstanceUID == stored.frames.SOPInstanceUID)
    assert np.array_equal(frames.pixel_array, stored.frames.pixel_array)
    with app.app_context():
        spill = current_archive().store.tmp
    assert spill.is_dir() and not list(spill.glob("*.part"))


def test_implicit_vr_is_re_encoded_by_default_and_kept_with_any(portal: Portal) -> None:
    implicit, data = stow(portal, "MR_small_implicit.dcm", generate_uid())
    got = retrieve(portal, implicit, media_types=NO_SYNTAX)
    assert got.file_meta.TransferSyntaxUID == EXPLICIT_LE
    assert np.array_equal(got.pixel_array, implicit.pixel_array)
    [(kind, payload)] = parts_of(portal.get(instance_path(implicit), DICOM_ANY))
    assert payload == data and kind.endswith("transfer-syntax=1.2.840.10008.1.2")


def test_dcmtk_reads_the_re_encoded_instance(portal: Portal, stored: Stored,
                                            tmp_path: Path) -> None:
    if shutil.which("dcmdump") is None:
        pytest.skip("DCMTK is not installed")
    [(_, payload)] = parts_of(portal.get(instance_path(stored.jls),
                                         'multipart/related; type="application/dicom"'))
    path = tmp_path / "received.dcm"
    path.write_bytes(payload)
    dump = subprocess.run(["dcmdump", "+E", "-q", str(path)], capture_output=True, text=True,
                          timeout=30, check=True).stdout
    assert "=LittleEndianExplicit" in dump
    assert "(7fe0,0010) OW" in dump and "PixelData" in dump


# -- frames and bulk data (PS3.18 8.7.3.3, Tables 8.7.3-4 and 8.7.3-5) ------------------------

def test_frames_without_a_syntax_are_decoded(portal: Portal, stored: Stored) -> None:
    ds = stored.frames
    decoded = ds.pixel_array
    frame_bytes = ds.Rows * ds.Columns * 2
    for media_types in (None, ("application/octet-stream",),
                        (("application/octet-stream", EXPLICIT_LE),)):
        kwargs = {} if media_types is None else {"media_types": media_types}
        first, third = portal.web.retrieve_instance_frames(
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID,
            frame_numbers=[1, 3], **kwargs)
        assert len(first) == frame_bytes, media_types
        assert np.array_equal(np.frombuffer(first, decoded.dtype).reshape(decoded[0].shape),
                              decoded[0])
        assert np.array_equal(np.frombuffer(third, decoded.dtype).reshape(decoded[2].shape),
                              decoded[2])
    [(kind, _)] = parts_of(portal.get(instance_path(ds) + "/frames/2",
                                      "multipart/related; type=application/octet-stream"))
    assert kind == f"application/octet-stream; transfer-syntax={EXPLICIT_LE}"


def test_frames_with_any_syntax_go_as_stored(portal: Portal, stored: Stored) -> None:
    ds = stored.frames
    compressed = list(generate_frames(ds.PixelData, number_of_frames=10))
    response = portal.get(instance_path(ds) + "/frames/1,3", OHIF_FRAMES)
    assert response.status_code == 200
    assert [p for _, p in parts_of(response)] == [compressed[0], compressed[2]]
    assert {k for k, _ in parts_of(response)} == {
        f"application/octet-stream; transfer-syntax={JPEG_LS}"}
    assert f"transfer-syntax={JPEG_LS}" in response.headers["Content-Type"]
    # image/jls without a syntax means JPEG-LS lossless (Table 8.7.3-5): the stored frames.
    [jls] = portal.web.retrieve_instance_frames(
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, frame_numbers=[2],
        media_types=(("image/jls", JPEG_LS),))
    assert jls == compressed[1]
    [(kind, _)] = parts_of(portal.get(instance_path(ds) + "/frames/2",
                                      "multipart/related; type=image/jls"))
    assert kind == f"image/jls; transfer-syntax={JPEG_LS}"


def test_bulk_pixel_data_defaults_to_decoded_bytes(portal: Portal, stored: Stored) -> None:
    [metadata] = portal.get(instance_path(stored.jls) + "/metadata").json()
    uri = metadata["7FE00010"]["BulkDataURI"]
    [value] = portal.web.retrieve_bulkdata(uri)
    assert value == stored.plain.PixelData
    single = portal.get(uri, "application/octet-stream")
    assert single.content == stored.plain.PixelData
    assert single.headers["Content-Type"] == \
        f"application/octet-stream; transfer-syntax={EXPLICIT_LE}"
    [(kind, payload)] = parts_of(portal.get(uri, OHIF_FRAMES))
    assert kind == f"application/octet-stream; transfer-syntax={JPEG_LS}"
    assert payload == next(generate_frames(stored.jls.PixelData, number_of_frames=1))


# -- what cannot be produced (PS3.18 8.7.8.1: 406) --------------------------------------------

def test_a_syntax_that_cannot_be_produced_is_not_acceptable(portal: Portal,
                                                            stored: Stored) -> None:
    with pytest.raises(requests.HTTPError) as refused:
        retrieve(portal, stored.jls, media_types=(("application/dicom", J2K),))
    assert refused.value.response.status_code == 406
    assert "transfer-syntax=*" in refused.value.response.json()["error"]
    with pytest.raises(requests.HTTPError) as refused:
        retrieve(portal, stored.plain, media_types=(("application/dicom", JPEG_LS),))
    assert refused.value.response.status_code == 406
    with pytest.raises(requests.HTTPError) as refused:
        portal.web.retrieve_instance_frames(
            stored.jls.StudyInstanceUID, stored.jls.SeriesInstanceUID,
            stored.jls.SOPInstanceUID, frame_numbers=[1], media_types=(("image/jp2", J2K),))
    assert refused.value.response.status_code == 406
    # Implicit VR Little Endian is never used on the web (PS3.18 8.7.3).
    implicit = 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2'
    assert portal.get(instance_path(stored.plain), implicit).status_code == 406
    # One instance of the study that cannot go in the only syntax asked refuses the study.
    study = portal.get(f"/studies/{stored.study}",
                       f'multipart/related; type="application/dicom"; transfer-syntax={JPEG_LS}')
    assert study.status_code == 406
    # A less preferred range that can be produced is used instead (8.7.8.1).
    both = (f'multipart/related; type="application/dicom"; transfer-syntax={J2K}, '
            f'multipart/related; type="application/dicom"; transfer-syntax=*; q=0.5')
    [(kind, payload)] = parts_of(portal.get(instance_path(stored.jls), both))
    assert kind.endswith(JPEG_LS) and payload == stored.jls_bytes


def test_undecodable_pixel_data(portal: Portal) -> None:
    """A stream no decoder here reads: by default the instance still goes, as stored and
    saying so; asked for in Explicit VR Little Endian by name, it is not acceptable."""
    broken, data = stow(portal, "JPEG2000-embedded-sequence-delimiter.dcm", generate_uid())
    syntax = broken.file_meta.TransferSyntaxUID
    [(kind, payload)] = parts_of(portal.get(instance_path(broken),
                                            'multipart/related; type="application/dicom"'))
    assert kind == f"application/dicom; transfer-syntax={syntax}" and payload == data
    named = portal.get(instance_path(broken), 'multipart/related; type="application/dicom"; '
                                              f"transfer-syntax={EXPLICIT_LE}")
    assert named.status_code == 406
    assert "cannot be decoded" in named.json()["error"]
    frames = portal.get(instance_path(broken) + "/frames/1",
                        "multipart/related; type=application/octet-stream")
    assert frames.status_code == 406
