"""The study ZIP past 4 GB or 65,535 files: ZIP64 records (APPNOTE.TXT 6.3.x), only when needed.

Writing 4 GB is too slow for a test, so most tests lower the threshold at which ZIP64 records are
used; the 65,535-file limit is tested for real. The readers are real too: Python's zipfile,
Info-ZIP unzip and 7-Zip when it is installed.
"""

from __future__ import annotations

import hashlib
import io
import shutil
import struct
import subprocess
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient
from pydicom import dcmread
from pydicom.fileset import FileSet
from pydicom.uid import generate_uid

from portal.access.grants import create_grant
from portal.access.principal import Principal
from portal.archive import current_archive
from portal.studies import export
from portal.studies.export import Entry, Zip64Threshold, check_size, stream_zip, zip_length
from tests.conftest import IdentityProvider, add_person, signed_in
from tests.factories import make_instance

END64, LOCATOR, END = b"PK\x06\x06", b"PK\x06\x07", b"PK\x05\x06"
SEVEN_ZIP = shutil.which("7z") or shutil.which("7zz") or shutil.which("7za")
ADMIN = Principal("user", 0, "t", roles=frozenset({"office_manager"}), issuer="t", subject="t")

# Below, at and above a 1000-byte threshold, so entries get no ZIP64 field, only an offset
# (they start beyond the threshold), or sizes and offset.
SIZES = [300, 10, 999, 1000, 5000, 0, 3, 1500]
THRESHOLDS = {
    "sizes-offsets-count": Zip64Threshold(size=1000, entries=4),
    "sizes-offsets": Zip64Threshold(size=1000),
    "count": Zip64Threshold(entries=len(SIZES)),
    "everything": Zip64Threshold(size=1, entries=1),
}
forced = pytest.mark.parametrize("threshold", THRESHOLDS.values(), ids=THRESHOLDS.keys())


def _content(seed: int, size: int) -> bytes:
    block = hashlib.sha256(str(seed).encode()).digest()
    return (block * (size // len(block) + 1))[:size]


def _entries(sizes: list[int]) -> list[Entry]:
    entries = []
    for n, size in enumerate(sizes):
        data = _content(n, size)
        name = "DICOMDIR" if n == 0 else f"PT000000/ST000000/SE000000/IM{n:06d}"
        entries.append(Entry(name, size, lambda data=data: data))
    return entries


def _write(entries: list[Entry], threshold: Zip64Threshold, path: Path) -> bytes:
    with path.open("wb") as out:
        for chunk in stream_zip(entries, threshold):
            out.write(chunk)
    return path.read_bytes()


def _end(body: bytes) -> tuple[int, int, int]:
    """Entry count, central directory size and offset from the plain end record."""
    assert body[-22:-18] == END
    _sig, _disk, _start, _here, count, size, offset, _comment = struct.unpack(
        "<IHHHHIIH", body[-22:])
    return count, size, offset


def _zip64_end(body: bytes) -> tuple[int, int, int] | None:
    """Entry count, central directory size and offset from the ZIP64 record, if there is one."""
    if body[-42:-38] != LOCATOR:
        return None
    _sig, disk, where, disks = struct.unpack("<IIQI", body[-42:-22])
    assert (disk, disks) == (0, 1) and where == len(body) - 42 - 56
    sig, rest, made, needed, _d, _ds, here, count, size, offset = struct.unpack(
        "<IQHHIIQQQQ", body[where:where + 56])
    assert (sig, rest, made, needed, here) == (0x06064B50, 44, 45, 45, count)
    return count, size, offset


def _unzip_test(path: Path) -> str:
    assert shutil.which("unzip"), "Info-ZIP unzip is needed (Debian package unzip)"
    done = subprocess.run(["unzip", "-t", str(path)], capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "No errors detected" in done.stdout
    return done.stdout


@forced
def test_zipfile_reads_forced_zip64_back(threshold: Zip64Threshold, tmp_path: Path) -> None:
    entries = _entries(SIZES)
    body = _write(entries, threshold, tmp_path / "study.zip")
    assert _zip64_end(body) is not None and END64 in body
    with zipfile.ZipFile(tmp_path / "study.zip") as archive:
        assert archive.testzip() is None
        infos = archive.infolist()
        assert [i.filename for i in infos] == [e.name for e in entries]
        for entry, info in zip(entries, infos, strict=True):
            assert archive.read(info) == entry.read()
            assert info.compress_type == zipfile.ZIP_STORED and info.file_size == entry.size
            # Only the fields that reach the threshold move into a ZIP64 extra field.
            big = entry.size >= threshold.size or info.header_offset >= threshold.size
            assert info.extra.startswith(b"\x01\x00") == big, entry.name
            assert info.extract_version == (45 if big else 20)


@forced
def test_unzip_tests_forced_zip64(threshold: Zip64Threshold, tmp_path: Path) -> None:
    entries = _entries(SIZES)
    _write(entries, threshold, tmp_path / "study.zip")
    report = _unzip_test(tmp_path / "study.zip")
    assert report.count(" OK") == len(entries)
    subprocess.run(["unzip", "-qq", str(tmp_path / "study.zip"), "-d", str(tmp_path / "out")],
                   check=True)
    for entry in entries:
        assert (tmp_path / "out" / entry.name).read_bytes() == entry.read()


@forced
def test_7zip_tests_forced_zip64(threshold: Zip64Threshold, tmp_path: Path) -> None:
    assert SEVEN_ZIP, "7-Zip is needed (Debian package 7zip)"
    _write(_entries(SIZES), threshold, tmp_path / "study.zip")
    done = subprocess.run([SEVEN_ZIP, "t", str(tmp_path / "study.zip")], capture_output=True,
                          text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Everything is Ok" in done.stdout and "WARNING" not in done.stdout.upper()
    assert "Zip64" in done.stdout


def _logged(entry: Entry, log: list[str]) -> Entry:
    def read() -> bytes:
        log.append(entry.name)
        return entry.read()
    return Entry(entry.name, entry.size, read)


@pytest.mark.parametrize("threshold", [Zip64Threshold(), *THRESHOLDS.values()],
                         ids=["real-limits", *THRESHOLDS.keys()])
@pytest.mark.parametrize("sizes", [SIZES, [0], [1000, 1000, 1000], list(range(0, 3000, 97))],
                         ids=["mixed", "one-empty", "at-threshold", "many"])
def test_streamed_length_is_the_content_length(threshold: Zip64Threshold,
                                               sizes: list[int]) -> None:
    log: list[str] = []
    entries = [_logged(e, log) for e in _entries(sizes)]
    length = check_size(entries, threshold)
    assert zip_length(entries, threshold) == length
    stream = stream_zip(entries, threshold)
    chunks = [next(stream), next(stream)]  # a local header and its file: one file read so far
    assert log == [entries[0].name]
    chunks += stream
    assert log == [e.name for e in entries]
    assert sum(map(len, chunks)) == length
    assert max(map(len, chunks)) < length  # a file at a time, never the whole ZIP at once


@pytest.mark.parametrize("count", [65_535, 65_600])
def test_more_than_65535_entries_get_a_zip64_end_record(count: int, tmp_path: Path) -> None:
    """0xFFFF is the marker for "see the ZIP64 record", so 65,535 files already need one."""
    entries = [Entry(f"F{n:06d}", len(str(n)), lambda n=n: str(n).encode())
               for n in range(count)]
    path = tmp_path / "many.zip"
    body = _write(entries, Zip64Threshold(), path)
    assert len(body) == zip_length(entries)
    plain_count, size, offset = _end(body)
    assert plain_count == 0xFFFF
    assert _zip64_end(body) == (count, size, offset)  # sizes and offsets still fit 32 bits
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() is None
        infos = archive.infolist()
        assert len(infos) == count and not any(i.extra for i in infos)
        assert all(archive.read(i) == str(n).encode() for n, i in enumerate(infos))
    assert _unzip_test(path).count(" OK") == count


def test_a_normal_study_zip_is_unchanged() -> None:
    """Below the threshold the bytes are those written before ZIP64 existed here."""
    entries = _entries([300, 2048, 0, 5000])
    body = b"".join(stream_zip(entries))
    assert body == b"".join(stream_zip(entries, Zip64Threshold()))
    # The same entries through the writer as it was, before ZIP64 records were added.
    assert hashlib.sha256(body).hexdigest() == \
        "ee32d9b82c9d4afdccf49982a7d2371b726c27dc998fb7870223ce861976dc67"
    names = sum(len(e.name.encode()) for e in entries)
    assert len(body) == zip_length(entries) == sum(76 + e.size for e in entries) + 2 * names + 22
    assert END64 not in body and LOCATOR not in body and _zip64_end(body) is None
    assert _end(body) == (len(entries), 4 * 46 + names, sum(30 + e.size for e in entries)
                          + names)
    with zipfile.ZipFile(io.BytesIO(body)) as archive:
        assert all(i.extra == b"" and i.extract_version == 20 for i in archive.infolist())


@dataclass
class Site:
    """A physician signed in, with a granted CT study of three slices."""

    app: Flask
    client: FlaskClient
    study: str
    sops: list[str]


@pytest.fixture
def site(oidc_app: Flask, idp: IdentityProvider) -> Iterator[Site]:
    study, series = generate_uid(), generate_uid()
    files = [make_instance(study=study, series=series, rows=32, columns=32, InstanceNumber=n)
             for n in (1, 2, 3)]
    with oidc_app.app_context():
        for data in files:
            current_archive().ingest(data, who="test")
    user = add_person(oidc_app, idp, "zip64-doc", ["physician"])
    with oidc_app.extensions["db"].write_transaction() as session:
        create_grant(session, ADMIN, user_id=user, study_uid=study)
    sops = [str(dcmread(io.BytesIO(f), stop_before_pixels=True).SOPInstanceUID) for f in files]
    yield Site(oidc_app, signed_in(oidc_app, idp, "zip64-doc"), study, sops)


def _download(site: Site) -> tuple[bytes, int, int]:
    """The study ZIP as streamed by the route, its Content-Length and how many chunks came."""
    response = site.client.get(f"/studies/{site.study}/download.zip", buffered=False)
    try:
        assert response.status_code == 200 and response.is_streamed
        chunks = list(response.response)
    finally:
        response.close()
    return b"".join(chunks), int(response.headers["Content-Length"]), len(chunks)


def test_route_streams_a_plain_zip_for_a_normal_study(site: Site) -> None:
    body, length, _chunks = _download(site)
    assert len(body) == length and _zip64_end(body) is None
    with zipfile.ZipFile(io.BytesIO(body)) as archive:
        assert all(i.extra == b"" and i.extract_version == 20 for i in archive.infolist())


def test_route_streams_zip64_when_the_threshold_is_lowered(
        site: Site, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(export, "ZIP64_THRESHOLD", Zip64Threshold(size=1024, entries=2))
    body, length, chunks = _download(site)
    assert len(body) == length and chunks > 4
    zip64 = _zip64_end(body)
    assert zip64 is not None and zip64[0] == 4 and _end(body)[0] == 0xFFFF
    (tmp_path / "study.zip").write_bytes(body)
    _unzip_test(tmp_path / "study.zip")
    with zipfile.ZipFile(tmp_path / "study.zip") as archive:
        assert archive.testzip() is None
        assert archive.namelist()[0] == "DICOMDIR"
        assert any(i.extra.startswith(b"\x01\x00") for i in archive.infolist())
        archive.extractall(tmp_path / "out")
    fileset = FileSet(dcmread(tmp_path / "out" / "DICOMDIR"))
    assert sorted(i.SOPInstanceUID for i in fileset) == sorted(site.sops)
    with site.app.app_context():
        for instance in fileset:
            assert (tmp_path / "out" / instance.FileID.replace("\\", "/")).read_bytes() == \
                current_archive().read(instance.SOPInstanceUID)
