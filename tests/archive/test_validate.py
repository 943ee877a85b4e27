"""Bad input is refused with a clear reason before anything is stored (docs/security.md E)."""

from __future__ import annotations

import io
import struct
import time
import zlib

import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO, DicomFileLike
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.sequence import Sequence
from pydicom.uid import DeflatedExplicitVRLittleEndian, RLELossless

from portal.archive.validate import (
    CANNOT_UNDERSTAND,
    DATA_SET_DOES_NOT_MATCH,
    OUT_OF_RESOURCES,
    TRANSFER_SYNTAX_NOT_SUPPORTED,
    Limits,
    Rejected,
    is_valid_uid,
    validate_part10,
)
from tests.conftest import sample_paths
from tests.factories import make_dataset, make_instance, to_bytes

LIMITS = Limits()


def rejected(data: bytes, limits: Limits = LIMITS) -> Rejected:
    with pytest.raises(Rejected) as info:
        validate_part10(data, limits)
    return info.value


def test_a_valid_instance_is_accepted_unchanged() -> None:
    data = make_instance()
    valid = validate_part10(data, LIMITS)
    assert valid.data == data
    assert not valid.preamble_zeroed
    assert valid.sop_class_uid == "1.2.840.10008.5.1.4.1.1.2"


@pytest.mark.parametrize("fraction", [0.05, 0.2, 0.5, 0.8, 0.99])
def test_truncated_files_are_refused(fraction: float) -> None:
    data = make_instance(rows=64, columns=64)
    problem = rejected(data[: int(len(data) * fraction)])
    assert problem.status in (CANNOT_UNDERSTAND, DATA_SET_DOES_NOT_MATCH)
    assert problem.reason


def test_truncated_at_every_kilobyte_of_a_real_file() -> None:
    real = next(p for p in sample_paths() if p.name == "CT_small.dcm").read_bytes()
    for cut in range(1024, len(real) - 1, 1024):
        started = time.perf_counter()
        with pytest.raises(Rejected):
            validate_part10(real[:cut], LIMITS)
        assert time.perf_counter() - started < 1.0


def test_a_text_file_is_refused() -> None:
    problem = rejected(b"patient list\n" * 40)
    assert "DICM" in problem.reason


@pytest.mark.parametrize("keyword", ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
                                     "SOPClassUID"])
def test_missing_identifiers_are_refused(keyword: str) -> None:
    ds = make_dataset()
    delattr(ds, keyword)
    problem = rejected(to_bytes(ds))
    assert "missing" in problem.reason or "differs" in problem.reason


@pytest.mark.parametrize("uid", ["1.2.3/../../x", "../../etc/passwd", "1.2.03", "1.2.3.",
                                 "1." + "2" * 70, "/tmp/pwn"])
def test_invalid_uids_are_refused(uid: str) -> None:
    ds = make_dataset(sop=uid)
    problem = rejected(to_bytes(ds))
    assert "not a valid UID" in problem.reason
    assert not is_valid_uid(uid)


def test_pixel_geometry_larger_than_the_pixel_data_is_refused() -> None:
    ds = make_dataset()
    ds.Rows = ds.Columns = 65535
    ds.PixelData = b"\x00" * 10
    started = time.perf_counter()
    problem = rejected(to_bytes(ds))
    assert time.perf_counter() - started < 1.0
    assert problem.status in (DATA_SET_DOES_NOT_MATCH, OUT_OF_RESOURCES)


@pytest.mark.parametrize(("keyword", "value"), [("NumberOfFrames", 2**31 - 1),
                                                 ("BitsAllocated", 64),
                                                 ("SamplesPerPixel", 4)])
def test_absurd_geometry_is_refused(keyword: str, value: int) -> None:
    ds = make_dataset()
    setattr(ds, keyword, value)
    problem = rejected(to_bytes(ds))
    assert problem.status in (DATA_SET_DOES_NOT_MATCH, OUT_OF_RESOURCES)


def _deflated_bomb(inflated_size: int) -> bytes:
    """A Deflated Explicit VR LE file whose data set inflates to ``inflated_size`` bytes."""
    ds = make_dataset()
    del ds.PixelData
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    head = io.BytesIO()
    head.write(bytes(128) + b"DICM")
    write_file_meta_info(DicomFileLike(head), ds.file_meta, enforce_standard=True)
    plain = DicomBytesIO()
    plain.is_little_endian, plain.is_implicit_VR = True, False
    write_dataset(plain, ds)
    body = zlib.compressobj(9, zlib.DEFLATED, -15)
    out = [head.getvalue(), body.compress(plain.getvalue())]
    # Then a private OB value of the full size, all zeros: about 1000:1 after deflate.
    out.append(body.compress(b"\x09\x00\x10\x00OB\x00\x00" + struct.pack("<I", inflated_size)))
    chunk = bytes(1 << 24)
    for _ in range(inflated_size // len(chunk)):
        out.append(body.compress(chunk))
    out.append(body.flush())
    return b"".join(out)


def test_deflate_bomb_is_refused_without_inflating_it() -> None:
    bomb = _deflated_bomb(1 << 30)
    assert len(bomb) < 2 << 20  # about a megabyte that would become a gigabyte
    started = time.perf_counter()
    problem = rejected(bomb)
    assert time.perf_counter() - started < 2.0
    assert problem.status in (OUT_OF_RESOURCES, CANNOT_UNDERSTAND)
    assert problem.http_status in (400, 413)


def test_unknown_transfer_syntax_is_refused() -> None:
    data = make_instance()
    # Same length as the real UID, so the meta group length stays right.
    patched = data.replace(b"1.2.840.10008.1.2.1\x00", b"1.2.840.10008.1.2.9\x00", 1)
    assert patched != data
    problem = rejected(patched)
    assert problem.status == TRANSFER_SYNTAX_NOT_SUPPORTED


def test_an_executable_preamble_is_zeroed() -> None:
    data = bytearray(make_instance())
    data[0:4] = b"MZ\x90\x00"  # a PE header: a DICOM/EXE polyglot (CVE-2019-11687)
    valid = validate_part10(bytes(data), LIMITS)
    assert valid.preamble_zeroed
    assert valid.data[:128] == bytes(128)
    assert valid.data[128:] == bytes(data[128:])
    assert valid.original_sha256 != valid.sha256


def test_a_tiff_preamble_is_kept() -> None:
    data = bytearray(make_instance())
    data[0:4] = b"II*\x00"
    assert not validate_part10(bytes(data), LIMITS).preamble_zeroed


def test_a_sequence_that_is_never_closed_is_refused() -> None:
    ds = make_dataset()
    item = Dataset()
    item.CodeValue = "X"
    ds.ProcedureCodeSequence = Sequence([item])
    ds["ProcedureCodeSequence"].is_undefined_length = True
    data = to_bytes(ds)
    marker = data.index(b"\xfe\xff\xdd\xe0")  # the sequence delimiter
    broken = data[:marker] + data[marker + 8:]
    # Without its delimiter the sequence swallows the rest of the file.
    assert rejected(broken).reason


def test_file_larger_than_the_limit_is_refused_before_parsing() -> None:
    problem = rejected(make_instance(rows=64, columns=64), Limits(max_instance_bytes=1024))
    assert problem.http_status == 413


def test_pixel_budget_is_enforced() -> None:
    problem = rejected(make_instance(rows=64, columns=64), Limits(max_pixel_bytes=1000))
    assert problem.status == OUT_OF_RESOURCES


def test_encapsulated_pixel_data_with_fewer_fragments_than_frames_is_refused() -> None:
    ds = make_dataset(rows=8, columns=8)
    ds.compress(RLELossless)
    ds.NumberOfFrames = 5
    problem = rejected(to_bytes(ds))
    assert "fragments" in problem.reason


def test_every_shipped_sample_is_either_accepted_or_refused_with_a_reason() -> None:
    accepted = 0
    for path in sample_paths():
        try:
            validate_part10(path.read_bytes(), LIMITS)
            accepted += 1
        except Rejected as exc:
            assert exc.reason, path.name
    assert accepted >= 100
