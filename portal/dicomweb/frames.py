"""WADO-RS frame retrieval (PS3.18 8.7.3.3): pick a media type the client accepts and cut frames.

Media ranges are tried in order of preference (8.7.8.1). ``application/octet-stream``
without a ``transfer-syntax`` parameter, or with Explicit VR Little Endian, means native
little endian bytes (Table 8.7.3-4): compressed frames are decoded for it, in the isolated
render processes. With ``transfer-syntax=*`` (what OHIF / Cornerstone send) or the stored
syntax itself, frames go as stored, undecoded. A compressed media type (``image/jls`` ...)
takes the stored frames when its ``transfer-syntax`` is ``*`` or the stored one, or, without
the parameter, when the stored syntax is that media type's default (Table 8.7.3-5) or a lossy
one (8.7.3.3: the server then has the pixel data only in that form). A wildcard range means
the default: native bytes. Every part names the transfer syntax it is in.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames

from portal import failures
from portal.dicomweb.accept import MediaRange, parse_accept
from portal.dicomweb.transcode import DEFLATED, EXPLICIT_LE, IMPLICIT_LE

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
# PS3.18 Table 8.7.3-5: the transfer syntax a compressed media type means without the parameter.
_DEFAULT_BY_MEDIA = {
    "image/jpeg": "1.2.840.10008.1.2.4.70",
    "image/jls": "1.2.840.10008.1.2.4.80",
    "image/jp2": "1.2.840.10008.1.2.4.90",
    "image/jphc": "1.2.840.10008.1.2.4.201",
    "image/dicom-rle": "1.2.840.10008.1.2.5",
}
LOSSY_SYNTAXES = frozenset({"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51",
                            "1.2.840.10008.1.2.4.81", "1.2.840.10008.1.2.4.91",
                            "1.2.840.10008.1.2.4.203"})
# Pixel data that is little endian native bytes once read (a deflated file is inflated).
_NATIVE_LE = frozenset({EXPLICIT_LE, IMPLICIT_LE, DEFLATED})
_WILDCARDS = frozenset({"*/*", "multipart/*", "application/*"})
Decoder = Callable[[list[int]], list[bytes]]
MAX_FRAMES_PER_REQUEST = 1000


class NotAcceptable(failures.NotAcceptable):
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


def _stored_acceptable(media_range: MediaRange, stored: str) -> bool:
    """Whether a compressed media type's range takes frames stored in ``stored``."""
    asked = media_range.transfer_syntax
    if asked in ("*", stored):
        return True
    media = _MEDIA_BY_SYNTAX[stored]
    return asked == "" and (_DEFAULT_BY_MEDIA.get(media) == stored or stored in LOSSY_SYNTAXES)


def choose(accept: str, stored: str) -> tuple[str, bool]:
    """(part content type, send as stored?) for the most preferred range that can carry
    frames stored in ``stored`` (PS3.18 8.7.8); NotAcceptable when none can."""
    stored_media = _MEDIA_BY_SYNTAX.get(stored)
    native = (f"{OCTET}; transfer-syntax={EXPLICIT_LE}", stored in _NATIVE_LE)
    for media_range in parse_accept(accept) or [MediaRange("*/*")]:
        media, asked = media_range.media_type, media_range.transfer_syntax
        if media == "multipart/related":
            media = media_range.part_type or OCTET
        if media in _WILDCARDS and asked == "*" and stored_media:
            return f"{stored_media}; transfer-syntax={stored}", True
        if media in _WILDCARDS or media == OCTET:
            if asked in ("", EXPLICIT_LE) or (asked == "*" and not stored_media):
                return native
            if stored_media and asked in ("*", stored):
                return f"{OCTET}; transfer-syntax={stored}", True
            continue
        if stored_media and media in (stored_media, "image/*") and \
                _stored_acceptable(media_range, stored):
            return f"{stored_media}; transfer-syntax={stored}", True
    stored_form = f" or as stored ({stored_media}; transfer-syntax={stored})" \
        if stored_media else ""
    raise NotAcceptable(f"frames are available as {OCTET} (transfer-syntax={EXPLICIT_LE}, "
                        f"the default){stored_form}")


def frame_bits(ds: Dataset) -> int:
    """Bits of one native frame as the metadata describes it (PS3.5 8.1.1; PS3.3 C.7.6.3.1.2:
    YBR_FULL_422 keeps two luminance and one pair of chrominance samples per two pixels)."""
    samples = int(ds.get("SamplesPerPixel", 1))
    if str(ds.get("PhotometricInterpretation", "")) == "YBR_FULL_422" and samples == 3:
        samples = 2
    return int(ds.Rows) * int(ds.Columns) * samples * int(ds.BitsAllocated)


def _native_frames(ds: Dataset, numbers: Sequence[int]) -> list[bytes]:
    """Slice native little endian pixel data without decoding, as stored: the planar
    configuration kept, YBR_FULL_422 subsampled, single-bit frames packed (a frame that
    starts inside a byte is shifted to start at bit 0 of its first byte)."""
    size = frame_bits(ds)
    data = ds.PixelData
    if size % 8 == 0:
        step = size // 8
        return [bytes(data[(n - 1) * step:n * step]) for n in numbers]
    bits = np.unpackbits(np.frombuffer(data, np.uint8), bitorder="little")
    return [np.packbits(bits[(n - 1) * size:n * size], bitorder="little").tobytes()
            for n in numbers]


def read_dataset(data: bytes) -> Dataset:
    """A stored instance, parsed whole."""
    return pydicom.dcmread(io.BytesIO(data))


def negotiate_and_extract(load: Callable[[], Dataset], syntax: str, numbers: Sequence[int],
                          accept: str, decode: Decoder) -> tuple[str, list[bytes]]:
    """Frames of one stored instance (stored in ``syntax``) in the media type the client
    asked for.

    ``decode`` turns frame numbers into native little endian bytes (in the render processes,
    which read the file themselves); ``load`` gives the parsed instance and is called only
    when the frames go as they are stored, so a decoded answer reads the file once.
    """
    content_type, as_stored = choose(accept, syntax)
    if not as_stored:
        return content_type, decode(list(numbers))
    ds = load()
    if syntax in _MEDIA_BY_SYNTAX:
        count = int(ds.get("NumberOfFrames") or 1)
        frames = list(generate_frames(ds.PixelData, number_of_frames=count))
        return content_type, [frames[n - 1] for n in numbers]
    return content_type, _native_frames(ds, numbers)
