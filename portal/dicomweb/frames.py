"""WADO-RS frame retrieval (PS3.18 8.7.3.4): pick a media type the client accepts and cut frames.

Compressed frames are sent as stored when the client accepts their media type (PS3.18 Table
8.7.3-5); otherwise they are decoded to native little endian bytes (application/octet-stream).
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.pixels import pixel_array
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from portal.archive.validate import NATIVE_TRANSFER_SYNTAXES
from portal.dicomweb.accept import parse_accept

OCTET = "application/octet-stream"
_MEDIA_BY_SYNTAX = {
    "1.2.840.10008.1.2.4.50": "image/jpeg",
    "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg",
    "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls",
    "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2",
    "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.4.201": "image/jphc",
    "1.2.840.10008.1.2.4.202": "image/jphc",
    "1.2.840.10008.1.2.4.203": "image/jphc",
    "1.2.840.10008.1.2.5": "image/dicom-rle",
}
MAX_FRAMES_PER_REQUEST = 1000


class NotAcceptable(Exception):
    """No media type the client accepts can carry these frames."""


def parse_frame_list(text: str, number_of_frames: int) -> list[int]:
    """Frame numbers from ``1,3,5`` (1-based, each within the instance)."""
    numbers: list[int] = []
    for item in text.split(","):
        if not item.strip().isdigit():
            raise ValueError(f"invalid frame number {item.strip()[:16]!r}")
        number = int(item)
        if not 1 <= number <= number_of_frames:
            raise ValueError(f"frame {number} is outside 1..{number_of_frames}")
        numbers.append(number)
    if len(numbers) > MAX_FRAMES_PER_REQUEST:
        raise ValueError(f"at most {MAX_FRAMES_PER_REQUEST} frames per request")
    return numbers


def _choose(accept: str, stored_syntax: str) -> tuple[str, bool]:
    """Return (part content type, send as stored?) for the first acceptable media range."""
    stored_media = _MEDIA_BY_SYNTAX.get(stored_syntax)
    native_le = stored_syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
    stored_type = stored_media or f"{OCTET}; transfer-syntax={ExplicitVRLittleEndian}"
    ranges = parse_accept(accept)
    if not ranges:
        return stored_type, True
    for media_range in ranges:
        mimetype = media_range.media_type
        if mimetype == "multipart/related":
            mimetype = media_range.part_type or OCTET
        if mimetype in ("*/*", "multipart/*"):
            return stored_type, stored_media is not None or native_le
        syntax = media_range.transfer_syntax
        if stored_media and mimetype == stored_media and syntax in ("", "*", stored_syntax):
            return stored_media, True
        if stored_media and mimetype == OCTET and syntax in ("*", stored_syntax):
            return f"{OCTET}; transfer-syntax={stored_syntax}", True
        if mimetype == OCTET and syntax in ("", "*", ExplicitVRLittleEndian):
            return f"{OCTET}; transfer-syntax={ExplicitVRLittleEndian}", native_le
    raise NotAcceptable("frames can be sent as application/octet-stream (explicit VR little "
                        f"endian){' or ' + stored_media if stored_media else ''}")


def _native_frames(ds: Dataset, numbers: Sequence[int]) -> list[bytes]:
    """Slice native little endian pixel data without decoding (whole bytes per frame)."""
    bits = int(ds.BitsAllocated)
    size = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1)) * bits // 8
    data = ds.PixelData
    return [bytes(data[(n - 1) * size:n * size]) for n in numbers]


def _decoded_frames(data: bytes, numbers: Sequence[int]) -> list[bytes]:
    out = []
    for n in numbers:
        array = pixel_array(io.BytesIO(data), index=n - 1, raw=True)
        out.append(np.ascontiguousarray(array.astype(array.dtype.newbyteorder("<"))).tobytes())
    return out


def negotiate_and_extract(data: bytes, numbers: Sequence[int],
                          accept: str) -> tuple[str, list[bytes]]:
    """Frames of one stored instance in the media type the client asked for."""
    ds = pydicom.dcmread(io.BytesIO(data))
    syntax = str(ds.file_meta.TransferSyntaxUID)
    content_type, as_stored = _choose(accept, syntax)
    if as_stored and syntax not in NATIVE_TRANSFER_SYNTAXES:
        count = int(ds.get("NumberOfFrames") or 1)
        frames = list(generate_frames(ds.PixelData, number_of_frames=count))
        return content_type, [frames[n - 1] for n in numbers]
    if as_stored and int(ds.BitsAllocated) % 8 == 0:
        return content_type, _native_frames(ds, numbers)
    return content_type, _decoded_frames(data, numbers)
