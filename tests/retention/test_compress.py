"""The permanent tier (issue 19 item 4): embedded images re-encoded losslessly (JPEG-LS,
JPEG 2000), their pixels bit-identical after decoding, the new file's SHA-256 recorded, the
old file gone only after the swap, and WADO-RS still answering in Explicit VR Little Endian
when asked (dicomweb-client against the live portal)."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from flask import Flask
from sqlalchemy import select

from portal.archive import current_archive
from portal.archive.compress import UNCOMPRESSED, compress_stored, reencode
from portal.archive.models import StoredObject
from portal.archive.validate import Rejected
from portal.index.models import Instance
from tests.conftest import LiveServer, make_client, sample_paths
from tests.factories import make_dataset, to_bytes


def _uncompressed_samples() -> dict[str, bytes]:
    """Sample files with uncompressed pixel data that the archive takes, by SOP UID."""
    found: dict[str, bytes] = {}
    for path in sample_paths():
        data = path.read_bytes()
        try:
            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        except Exception:
            continue
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        if syntax in UNCOMPRESSED and "Rows" in ds and ds.get("BitsAllocated") in (8, 16):
            found.setdefault(str(ds.SOPInstanceUID), data)
    return found


def _stored(app: Flask) -> dict[str, tuple[str, str, str]]:
    with app.extensions["db"].new_session() as session:
        return {uid: (key, sha, ts) for uid, key, sha, ts in session.execute(
            select(StoredObject.sop_instance_uid, StoredObject.storage_key, StoredObject.sha256,
                   Instance.transfer_syntax_uid)
            .join(Instance, Instance.sop_instance_uid == StoredObject.sop_instance_uid))}


@pytest.mark.parametrize("syntax", ["jpeg-ls", "jpeg2000"])
def test_reencoded_samples_decode_to_the_same_pixels(app: Flask, syntax: str) -> None:
    samples = _uncompressed_samples()
    assert len(samples) >= 10
    with app.app_context():
        archive = current_archive()
        for data in samples.values():
            try:
                archive.ingest(data, who="test")
            except Rejected:
                continue  # refused files are covered by the validation tests
        before = _stored(app)
        originals = {uid: pydicom.dcmread(io.BytesIO(archive.store.read(key, sha))).pixel_array
                     for uid, (key, sha, _ts) in before.items()}
        result = compress_stored(archive.store, archive.database, older_than_days=0,
                                 syntax=syntax)
        after = _stored(app)
        assert result.done >= 5 and result.after < result.before
        changed = [uid for uid in after if after[uid][1] != before[uid][1]]
        assert len(changed) == result.done
        for uid in changed:
            key, sha, ts = after[uid]
            path = archive.store.path_of(key)
            data = path.read_bytes()
            assert hashlib.sha256(data).hexdigest() == sha  # the new file's SHA-256 recorded
            ds = pydicom.dcmread(io.BytesIO(data))
            assert ds.file_meta.TransferSyntaxUID == ts == (
                pydicom.uid.JPEGLSLossless if syntax == "jpeg-ls"
                else pydicom.uid.JPEG2000Lossless)
            decoded = ds.pixel_array
            assert decoded.dtype == originals[uid].dtype
            assert (decoded == originals[uid]).all(), uid  # bit-identical pixels
            assert not archive.store.path_of(before[uid][0]).exists()  # old file gone
        assert [problem for _uid, problem in archive.verify() if problem] == []
        # A second run finds nothing more to do (compressed files are not candidates).
        again = compress_stored(archive.store, archive.database, older_than_days=0,
                                syntax=syntax)
        assert again.done == 0


def test_two_runs_on_one_instance_swap_it_once(app: Flask) -> None:
    """A second run with the same stale listing finds the file swapped and changes
    nothing; the file the first one swapped in stays."""
    from portal.archive.compress import compress_one

    with app.app_context():
        archive = current_archive()
        archive.ingest(to_bytes(make_dataset(rows=64, columns=64)), who="test")
        [(uid, (key, sha, _ts))] = _stored(app).items()
        first = compress_one(archive.store, archive.database, uid, key, sha, "jpeg-ls")
        assert isinstance(first, tuple) and first[1] < first[0]
        assert compress_one(archive.store, archive.database, uid, key, sha,
                            "jpeg-ls") == "changed meanwhile"
        assert [problem for _uid, problem in archive.verify() if problem] == []


def test_only_old_enough_embedded_images_are_reencoded(app: Flask) -> None:
    with app.app_context():
        archive = current_archive()
        archive.ingest(to_bytes(make_dataset(rows=64, columns=64)), who="test")
        result = compress_stored(archive.store, archive.database, older_than_days=30,
                                 syntax="jpeg-ls")
        assert result.done == 0 and not result.skipped


def test_a_reencoding_that_changes_pixels_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    data = to_bytes(make_dataset(rows=32, columns=32))
    assert pydicom.dcmread(io.BytesIO(reencode(data, "jpeg-ls"))).pixel_array.shape == (32, 32)
    # The check itself: when the re-encoded file reads back as other pixels (here: signed
    # instead of unsigned), it is refused, not swapped.
    from portal.archive import compress

    real = pydicom.dcmread
    calls: list[int] = []

    def twisted(source: io.BytesIO, *args: object, **kwargs: object) -> pydicom.Dataset:
        read = real(source, *args, **kwargs)  # type: ignore[arg-type]
        calls.append(1)
        if len(calls) == 2:  # the re-encoded file as read back
            read.PixelRepresentation = 1 - int(read.PixelRepresentation)
        return read

    monkeypatch.setattr(compress.pydicom, "dcmread", twisted)
    with pytest.raises(compress.NotLossless):
        reencode(data, "jpeg-ls")


def test_wado_rs_round_trip_after_reencoding(app: Flask, live_server: LiveServer) -> None:
    """dicomweb-client: the stored syntax for ``*``, Explicit VR Little Endian when asked,
    the pixels of the original in both."""
    ds = make_dataset(rows=128, columns=128)
    import numpy as np

    ds.PixelData = (np.arange(128 * 128, dtype=np.uint16) % 4096).tobytes()
    ds.BitsStored, ds.HighBit = 12, 11
    data = to_bytes(ds)
    original = pydicom.dcmread(io.BytesIO(data)).pixel_array
    with app.app_context():
        archive = current_archive()
        archive.ingest(data, who="test")
        assert compress_stored(archive.store, archive.database, older_than_days=0,
                               syntax="jpeg-ls").done == 1
    name, secret = make_client(app, "viewer")
    session = requests.Session()
    session.auth = (name, secret)
    web = DICOMwebClient(url=f"{live_server.url}/dicomweb", session=session)
    stored = web.retrieve_instance(
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID,
        media_types=(("application/dicom", "*"),))
    assert stored.file_meta.TransferSyntaxUID == pydicom.uid.JPEGLSLossless
    assert (stored.pixel_array == original).all()
    plain = web.retrieve_instance(
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID,
        media_types=(("application/dicom", pydicom.uid.ExplicitVRLittleEndian),))
    assert plain.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert (plain.pixel_array == original).all()
    assert plain.PixelData == data_pixels(data)
    [frame] = web.retrieve_instance_frames(
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, frame_numbers=[1],
        media_types=(("application/octet-stream", pydicom.uid.ExplicitVRLittleEndian),))
    assert frame == data_pixels(data)  # the frame as stored before, byte for byte


def data_pixels(data: bytes) -> bytes:
    """The native pixel bytes of a Part 10 file."""
    return bytes(pydicom.dcmread(io.BytesIO(data)).PixelData)


def test_compress_cli(app: Flask, tmp_path: Path) -> None:
    with app.app_context():
        current_archive().ingest(to_bytes(make_dataset(rows=64, columns=64)), who="test")
    runner = app.test_cli_runner()
    refused = runner.invoke(args=["archive", "compress"])
    assert refused.exit_code == 1 and "ARCHIVE_COMPRESS_AFTER_DAYS" in refused.output
    done = runner.invoke(args=["archive", "compress", "--older-than-days", "0",
                               "--syntax", "jpeg2000"])
    assert done.exit_code == 0, done.output
    assert "1 instances re-encoded" in done.output
