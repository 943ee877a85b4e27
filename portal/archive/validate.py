"""One validation function for every way a DICOM file arrives (upload, STOW-RS, C-STORE, CLI).

Nothing is stored unless ``validate_part10`` accepts it. The checks run cheapest first and bound
every cost before paying it: size, Part 10 header, a structural walk of every element length
(pydicom silently accepts truncated values), inflation of deflated data sets up to a cap, then
pydicom parsing, identifiers (PS3.5 9.1), allow-listed SOP classes and transfer syntaxes (PS3.5
10), and pixel geometry (PS3.3 C.7.6.3) against the real pixel data length.
"""

from __future__ import annotations

import hashlib
import io
import re
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom.presentation import AllStoragePresentationContexts

# DICOM failure status codes (PS3.4 Annex B.2.3, PS3.18 Table 10.5.3-1) used for every path.
OUT_OF_RESOURCES = 0xA700
DATA_SET_DOES_NOT_MATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000
SOP_CLASS_NOT_SUPPORTED = 0x0122
TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122
DUPLICATE_CONFLICT = 0x0111
PROCESSING_FAILURE = 0x0110

ACCEPTED_TRANSFER_SYNTAXES: frozenset[str] = frozenset({
    ImplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
    "1.2.840.10008.1.2.5",  # RLE Lossless
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51",  # JPEG Extended
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.4.201",  # HTJ2K Lossless
    "1.2.840.10008.1.2.4.202",  # HTJ2K Lossless RPCL
    "1.2.840.10008.1.2.4.203",  # HTJ2K
})
NATIVE_TRANSFER_SYNTAXES = frozenset({ImplicitVRLittleEndian, ExplicitVRLittleEndian,
                                      ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian})
ACCEPTED_SOP_CLASSES: frozenset[str] = frozenset(
    str(cx.abstract_syntax) for cx in AllStoragePresentationContexts
)

_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_TIFF_PREAMBLES = (b"II*\x00", b"MM\x00*")
# Bytes of text: a preamble holding any could be a script (with or without "#!") or markup.
_TEXT_BYTES = frozenset(b"\t\n\r" + bytes(range(0x20, 0x7F)))
_UNDEFINED = 0xFFFFFFFF
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR",
                       b"UT", b"SV", b"UV"})
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_MAX_DEPTH = 16


class Rejected(Exception):
    """An incoming file is refused; ``reason`` is for people, ``status`` for DICOM peers."""

    def __init__(self, reason: str, status: int = CANNOT_UNDERSTAND, http_status: int = 400,
                 sop_class_uid: str = "", sop_instance_uid: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.http_status = http_status
        self.sop_class_uid = sop_class_uid
        self.sop_instance_uid = sop_instance_uid


@dataclass(frozen=True)
class Limits:
    """Bounds applied before parsing and before any pixel allocation."""

    max_instance_bytes: int = 512 << 20
    max_inflated_bytes: int = 64 << 20
    max_pixel_bytes: int = 1 << 30
    max_frames: int = 10_000

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Limits:
        """Read the limits from the app configuration."""
        return cls(config["MAX_INSTANCE_BYTES"], config["MAX_INFLATED_BYTES"],
                   config["MAX_PIXEL_BYTES"], config["MAX_FRAMES"])


@dataclass(frozen=True)
class ValidInstance:
    """A file that passed validation, with the bytes to store and the parsed header."""

    data: bytes
    sha256: str
    original_sha256: str
    preamble_zeroed: bool
    dataset: Dataset
    transfer_syntax_uid: str
    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str


def is_valid_uid(value: object) -> bool:
    """True for a UID per PS3.5 9.1: digits and dots, no leading zeros, at most 64 characters."""
    return isinstance(value, str) and 0 < len(value) <= 64 and bool(_UID.match(value))


# -- structural walk -------------------------------------------------------------------------

class _Malformed(Exception):
    pass


def _walk_items(buf: memoryview, pos: int, end: int, explicit: bool, little: bool,
                undefined: bool, raw_items: bool, depth: int) -> int:
    """Walk sequence items (or encapsulated fragments) until the delimiter or ``end``."""
    u32 = "<I" if little else ">I"
    tag_fmt = "<HH" if little else ">HH"
    while pos < end or undefined:
        if pos + 8 > end:
            raise _Malformed("sequence is not closed" if undefined else "truncated item")
        group, elem = struct.unpack_from(tag_fmt, buf, pos)
        tag = (group << 16) | elem
        (length,) = struct.unpack_from(u32, buf, pos + 4)
        pos += 8
        if tag == _SEQ_END:
            if not undefined:
                raise _Malformed("unexpected sequence delimiter")
            return pos
        if tag != _ITEM:
            raise _Malformed(f"expected an item, found ({group:04X},{elem:04X})")
        if length == _UNDEFINED:
            if raw_items:
                raise _Malformed("fragment of undefined length")
            pos = _walk_dataset(buf, pos, end, explicit, little, True, depth + 1)
        else:
            if pos + length > end:
                raise _Malformed("item runs past the end of the data")
            if not raw_items:
                _walk_dataset(buf, pos, pos + length, explicit, little, False, depth + 1)
            pos += length
    return pos


def _walk_dataset(buf: memoryview, pos: int, end: int, explicit: bool, little: bool,
                  until_item_end: bool, depth: int) -> int:
    """Check that every element's declared length fits; return the position after the set."""
    if depth > _MAX_DEPTH:
        raise _Malformed("sequences nested too deeply")
    u16, u32 = ("<H", "<I") if little else (">H", ">I")
    tag_fmt = "<HH" if little else ">HH"
    while pos < end:
        if pos + 8 > end:
            raise _Malformed("truncated element header")
        group, elem = struct.unpack_from(tag_fmt, buf, pos)
        tag = (group << 16) | elem
        if tag == _ITEM_END:
            if not until_item_end:
                raise _Malformed("unexpected item delimiter")
            return pos + 8
        if group == 0xFFFE:
            raise _Malformed(f"unexpected delimiter ({group:04X},{elem:04X})")
        vr = bytes(buf[pos + 4:pos + 6]) if explicit else b""
        if explicit and vr in _LONG_VRS:
            if pos + 12 > end:
                raise _Malformed("truncated element header")
            (length,) = struct.unpack_from(u32, buf, pos + 8)
            pos += 12
        elif explicit:
            if not vr.isalpha() or not vr.isupper():
                raise _Malformed(f"invalid VR at ({group:04X},{elem:04X})")
            (length,) = struct.unpack_from(u16, buf, pos + 6)
            pos += 8
        else:
            (length,) = struct.unpack_from(u32, buf, pos + 4)
            pos += 8
        if length == _UNDEFINED:
            pixel = tag in (0x7FE00010, 0x7FE00008, 0x7FE00009)
            if explicit and vr not in (b"SQ", b"UN", b"OB", b"OW"):
                raise _Malformed(f"undefined length for VR {vr.decode(errors='replace')}")
            # UN of undefined length holds an implicit little endian sequence (PS3.5 6.2.2)
            item_explicit = explicit and vr != b"UN"
            item_little = little or vr == b"UN"
            pos = _walk_items(buf, pos, end, item_explicit, item_little, True, pixel, depth)
            continue
        if pos + length > end:
            raise _Malformed(f"({group:04X},{elem:04X}) runs past the end of the data")
        if explicit and vr == b"SQ":
            _walk_items(buf, pos, pos + length, explicit, little, False, False, depth)
        pos += length
    if until_item_end:
        raise _Malformed("item is not closed")
    return pos


def _meta_end(buf: memoryview) -> tuple[int, str]:
    """Walk the File Meta group (always explicit VR little endian); return its end and TS."""
    pos, end, syntax = 132, len(buf), ""
    while pos + 8 <= end:
        group, elem = struct.unpack_from("<HH", buf, pos)
        if group != 0x0002:
            break
        vr = bytes(buf[pos + 4:pos + 6])
        if vr in _LONG_VRS:
            if pos + 12 > end:
                raise _Malformed("truncated File Meta")
            (length,) = struct.unpack_from("<I", buf, pos + 8)
            pos += 12
        else:
            (length,) = struct.unpack_from("<H", buf, pos + 6)
            pos += 8
        if length == _UNDEFINED or pos + length > end:
            raise _Malformed("truncated File Meta")
        if elem == 0x0010:
            syntax = bytes(buf[pos:pos + length]).rstrip(b"\x00 ").decode("ascii", "replace")
        pos += length
    if not syntax:
        raise _Malformed("File Meta has no Transfer Syntax UID")
    return pos, syntax


def _inflate(data: memoryview, cap: int) -> bytes:
    """Raw-inflate a deflated data set (PS3.5 A.5) without ever producing more than ``cap``."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        out = inflater.decompress(data, cap + 1)
    except zlib.error as exc:
        raise Rejected(f"deflated data set is corrupt: {exc}") from exc
    if len(out) > cap or inflater.unconsumed_tail:
        raise Rejected(f"deflated data set inflates beyond the {cap >> 20} MiB limit",
                       OUT_OF_RESOURCES, 413)
    return out


# -- semantic checks -------------------------------------------------------------------------

def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    return "" if value is None else str(value).strip()


def _check_pixels(ds: Dataset, syntax: str, limits: Limits) -> None:
    """Bound the declared geometry and compare it with the pixel data actually present."""
    tag = next((t for t in (0x7FE00010, 0x7FE00008, 0x7FE00009) if t in ds), None)
    if tag is None:
        return
    rows = int(ds.get("Rows") or 0)
    columns = int(ds.get("Columns") or 0)
    samples = int(ds.get("SamplesPerPixel") or 1)
    frames_value = ds.get("NumberOfFrames") or 1
    try:
        frames = int(frames_value)
    except (TypeError, ValueError) as exc:
        raise Rejected("Number of Frames is not a number", DATA_SET_DOES_NOT_MATCH) from exc
    bits = {0x7FE00008: 32, 0x7FE00009: 64}.get(tag) or int(ds.get("BitsAllocated") or 0)
    if rows <= 0 or columns <= 0:
        raise Rejected("pixel data without Rows and Columns", DATA_SET_DOES_NOT_MATCH)
    if samples not in (1, 3):
        raise Rejected(f"Samples per Pixel {samples} is not 1 or 3", DATA_SET_DOES_NOT_MATCH)
    allowed_bits = (1, 8, 16, 32) if tag == 0x7FE00010 else (bits,)
    if bits not in allowed_bits:
        raise Rejected(f"Bits Allocated {bits} is not supported", DATA_SET_DOES_NOT_MATCH)
    if not 1 <= frames <= limits.max_frames:
        raise Rejected(f"Number of Frames {frames} is outside 1..{limits.max_frames}",
                       DATA_SET_DOES_NOT_MATCH)
    stored_samples = samples
    if samples == 3 and syntax in NATIVE_TRANSFER_SYNTAXES and \
            _text(ds, "PhotometricInterpretation") == "YBR_FULL_422":
        # Native YBR_FULL_422 keeps two luminance samples and one chrominance pair per two
        # pixels (PS3.3 C.7.6.3.1.2): two samples a pixel.
        stored_samples = 2
    expected = (rows * columns * frames * stored_samples * bits + 7) // 8
    value = ds[tag].value
    if syntax in NATIVE_TRANSFER_SYNTAXES:
        # Compare with the bytes actually present first: a tiny file that claims a huge
        # image is malformed (A900), not a reason to retry later (A700).
        actual = len(value) if value is not None else 0
        if actual < expected:
            raise Rejected(f"pixel data has {actual} bytes but {rows}x{columns}x{frames} "
                           f"needs {expected}", DATA_SET_DOES_NOT_MATCH)
    if expected > limits.max_pixel_bytes:
        raise Rejected(f"pixel data of {rows}x{columns}x{frames} would need "
                       f"{expected >> 20} MiB, over the {limits.max_pixel_bytes >> 20} MiB limit",
                       OUT_OF_RESOURCES, 413)
    if syntax not in NATIVE_TRANSFER_SYNTAXES:
        if not ds[tag].is_undefined_length:
            raise Rejected("compressed pixel data is not encapsulated", DATA_SET_DOES_NOT_MATCH)
        from pydicom.encaps import parse_basic_offsets, parse_fragments

        stream = io.BytesIO(value)
        try:
            parse_basic_offsets(stream)
            fragments, _offsets = parse_fragments(stream)
        except (ValueError, struct.error) as exc:
            raise Rejected(f"encapsulated pixel data is malformed: {exc}") from exc
        # PS3.5 A.4: every frame is one or more fragments, so fragments >= frames.
        if fragments < frames:
            raise Rejected(f"{frames} frames but {fragments} fragments", DATA_SET_DOES_NOT_MATCH)


def _parse(data: bytes, syntax: str, body_start: int, limits: Limits) -> Dataset:
    view = memoryview(data)
    explicit = syntax != ImplicitVRLittleEndian
    little = syntax != ExplicitVRBigEndian
    try:
        if syntax == DeflatedExplicitVRLittleEndian:
            inflated = _inflate(view[body_start:], limits.max_inflated_bytes)
            _walk_dataset(memoryview(inflated), 0, len(inflated), True, True, False, 0)
        else:
            _walk_dataset(view, body_start, len(view), explicit, little, False, 0)
    except (_Malformed, struct.error) as exc:
        raise Rejected(f"malformed DICOM: {exc}") from exc
    try:
        # Lenient reading of odd but harmless values is fine (its warnings: portal.quiet);
        # the structure was checked above.
        return pydicom.dcmread(io.BytesIO(data), force=False)
    except (InvalidDicomError, ValueError, KeyError, EOFError, NotImplementedError,
            OverflowError, struct.error, zlib.error) as exc:
        raise Rejected(f"not a readable DICOM file: {exc}") from exc


def preamble_is_inert(preamble: bytes) -> bool:
    """Whether a file's 128-byte preamble is kept as it came (docs/security.md 35).

    An allow-list of forms nothing can run, never a list of known-bad ones: all zeros; a TIFF
    header (the allow-listed dual format); or one whose first 8 bytes are zero (where every
    executable's magic number sits: PE ``MZ``, ELF, Mach-O, ``#!``) holding no byte of text
    (so no script, with or without ``#!``, and no markup). Anything else is zeroed.
    """
    if not any(preamble) or preamble.startswith(_TIFF_PREAMBLES):
        return True
    return not any(preamble[:8]) and not any(byte in _TEXT_BYTES for byte in preamble)


def validate_part10(data: bytes, limits: Limits, digest: str | None = None) -> ValidInstance:
    """Accept a DICOM Part 10 file or raise ``Rejected`` with a clear reason and status.

    ``digest`` is the SHA-256 of ``data`` when the caller has computed it already.
    """
    if len(data) > limits.max_instance_bytes:
        raise Rejected(f"file is larger than {limits.max_instance_bytes >> 20} MiB",
                       OUT_OF_RESOURCES, 413)
    original_sha256 = digest or hashlib.sha256(data).hexdigest()
    prefixed = False
    if data[:2] == b"\x02\x00" and data[4:6].isalpha() and data[4:6].isupper():
        # File Meta without the preamble and prefix, as pydicom.dcmwrite (and so
        # dicomweb-client) writes a data set made in memory: give it the standard header.
        data = bytes(128) + b"DICM" + data
        prefixed = True
    if len(data) < 132 or data[128:132] != b"DICM":
        raise Rejected("not a DICOM Part 10 file (no 'DICM' prefix after the preamble)")
    preamble_zeroed = False
    if not preamble_is_inert(data[:128]):
        # An executable preamble turns the file into a polyglot (CVE-2019-11687); zero it.
        data = bytes(128) + data[128:]
        preamble_zeroed = True
    try:
        body_start, syntax = _meta_end(memoryview(data))
    except (_Malformed, struct.error) as exc:
        raise Rejected(f"malformed File Meta: {exc}") from exc
    if syntax not in ACCEPTED_TRANSFER_SYNTAXES:
        raise Rejected(f"transfer syntax {syntax[:64]} is not accepted",
                       TRANSFER_SYNTAX_NOT_SUPPORTED, 415)
    ds = _parse(data, syntax, body_start, limits)
    meta = ds.file_meta
    sop_class = _text(ds, "SOPClassUID")
    sop_instance = _text(ds, "SOPInstanceUID")
    study = _text(ds, "StudyInstanceUID")
    series = _text(ds, "SeriesInstanceUID")
    for name, value in (("SOP Class UID", sop_class), ("SOP Instance UID", sop_instance),
                        ("Study Instance UID", study), ("Series Instance UID", series)):
        if not value:
            raise Rejected(f"{name} is missing", DATA_SET_DOES_NOT_MATCH,
                           sop_class_uid=sop_class if is_valid_uid(sop_class) else "")
        if not is_valid_uid(value):
            raise Rejected(f"{name} is not a valid UID", DATA_SET_DOES_NOT_MATCH,
                           sop_class_uid=sop_class if is_valid_uid(sop_class) else "")
    if _text(meta, "MediaStorageSOPInstanceUID") != sop_instance:
        raise Rejected("File Meta SOP Instance UID differs from the data set's",
                       DATA_SET_DOES_NOT_MATCH, sop_class_uid=sop_class,
                       sop_instance_uid=sop_instance)
    if sop_class not in ACCEPTED_SOP_CLASSES:
        raise Rejected(f"SOP class {sop_class} is not a supported storage class",
                       SOP_CLASS_NOT_SUPPORTED, 400, sop_class, sop_instance)
    try:
        _check_pixels(ds, syntax, limits)
    except Rejected as exc:
        exc.sop_class_uid, exc.sop_instance_uid = sop_class, sop_instance
        raise
    return ValidInstance(
        data=data, sha256=hashlib.sha256(data).hexdigest() if preamble_zeroed or prefixed
        else original_sha256, original_sha256=original_sha256, preamble_zeroed=preamble_zeroed,
        dataset=ds, transfer_syntax_uid=syntax, sop_class_uid=sop_class,
        sop_instance_uid=sop_instance, study_instance_uid=study, series_instance_uid=series)
