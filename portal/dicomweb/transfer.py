"""Which transfer syntax a WADO-RS instance is sent in (PS3.18 8.7.3.4, 8.7.3.5.2, 8.7.8).

Each media range of the Accept header that covers ``application/dicom`` (alone, as the
``type`` of ``multipart/related``, or through a wildcard) asks for one transfer syntax: the
one its ``transfer-syntax`` parameter names, ``*`` for any, or, without the parameter, the
default of the web, Explicit VR Little Endian (8.7.3.4, Table 8.7.3-2; 8.7.8.2). Ranges are
tried in order of preference (8.7.8.1), for each instance on its own (8.7.8.2 Note 1):

- ``*``: the stored bytes, unchanged and undecoded (8.7.3.5.2: the server need not transcode);
- the stored syntax itself: the stored bytes;
- Explicit VR Little Endian, asked or by default: the stored bytes when stored so, else the
  instance re-encoded (``transcode``); by default, pixel data too long for a 32-bit value
  once decoded stays as stored (8.7.3.4), while asked for explicitly it is not acceptable
  (8.7.8.1 Note 1);
- anything else (another compression; Implicit VR or big endian, never used on the web,
  8.7.3): not offered here, so 406 when no other range fits.
"""

from __future__ import annotations

from dataclasses import dataclass

from portal.dicomweb.accept import NOTHING, MediaRange
from portal.dicomweb.transcode import (
    EXPLICIT_BE,
    EXPLICIT_LE,
    IMPLICIT_LE,
    MAX_VALUE_LENGTH,
)
from portal.index.models import Instance

DICOM = "application/dicom"
_WILDCARDS = frozenset({"*/*", "application/*"})
_DICOM_PARTS = frozenset({"", DICOM, *_WILDCARDS})
NOT_ON_THE_WEB = frozenset({IMPLICIT_LE, EXPLICIT_BE})  # PS3.18 8.7.3


@dataclass(frozen=True)
class Representation:
    """How one instance is sent: in ``syntax``; re-encoded when ``convert``. ``strict`` when
    the client named Explicit VR Little Endian itself: then a failed conversion is an error,
    while by default the instance is sent as stored instead (its part says so)."""

    syntax: str
    convert: bool = False
    strict: bool = False
    # The range chosen was ``application/dicom`` itself, not inside ``multipart/related``:
    # one instance is then answered as a single part (PS3.18 after Supplement 183;
    # ``dicomweb-client`` reads either).
    bare: bool = False


def asked_syntax(media_range: MediaRange) -> str | None:
    """The transfer syntax a media range asks of ``application/dicom`` ("" for the default,
    "*" for any), or None when the range does not accept ``application/dicom``."""
    media = media_range.media_type
    if media in ("multipart/related", "multipart/*"):
        return media_range.transfer_syntax if media_range.part_type in _DICOM_PARTS else None
    if media == DICOM or media in _WILDCARDS:
        return media_range.transfer_syntax
    return None


def fits_explicit(instance: Instance) -> bool:
    """Whether the instance's pixel data, decoded, fits a 32-bit value length (PS3.5 7.1.1)."""
    bits = ((instance.rows or 0) * (instance.columns or 0) * (instance.samples_per_pixel or 1)
            * (instance.number_of_frames or 1) * (instance.bits_allocated or 8))
    return (bits + 7) // 8 <= MAX_VALUE_LENGTH


def representation(ranges: list[MediaRange], instance: Instance) -> Representation | None:
    """The representation of the most preferred range that can carry the instance, or None.

    No Accept header at all is read as ``*/*`` (RFC 9110 12.5.1): the default.
    """
    stored = instance.transfer_syntax_uid
    for media_range in ranges or [MediaRange("*/*")]:
        asked = asked_syntax(media_range)
        if asked is None:
            continue
        bare = media_range.media_type == DICOM
        if asked == "*":
            return Representation(stored, bare=bare)
        if asked == "":
            if stored == EXPLICIT_LE:
                return Representation(stored, bare=bare)
            if fits_explicit(instance):
                return Representation(EXPLICIT_LE, convert=True, bare=bare)
            return Representation(stored, bare=bare)
        if asked == stored and asked not in NOT_ON_THE_WEB:
            return Representation(stored, bare=bare)
        if asked == EXPLICIT_LE and fits_explicit(instance):
            return Representation(EXPLICIT_LE, convert=True, strict=True, bare=bare)
    return None


def refusal(ranges: list[MediaRange], instance: Instance) -> str:
    """Why no range fits the instance, for the 406 answer."""
    if ranges == [NOTHING]:
        return "the Accept header refuses every type (q=0)"
    asked = sorted({syntax for syntax in map(asked_syntax, ranges) if syntax})
    stored = instance.transfer_syntax_uid
    if any(syntax in NOT_ON_THE_WEB for syntax in asked):
        return ("Implicit VR Little Endian and Explicit VR Big Endian are not used in "
                "DICOMweb (PS3.18 8.7.3); ask for 1.2.840.10008.1.2.1 or transfer-syntax=*")
    if not fits_explicit(instance):
        return (f"an instance's pixel data is too long for {EXPLICIT_LE} once decoded; "
                f"ask with transfer-syntax=* (it is stored as {stored})")
    if not any(asked_syntax(r) is not None for r in ranges):
        return (f'instances are available as multipart/related; type="{DICOM}" '
                f"(transfer-syntax={EXPLICIT_LE} or *)")
    return (f"an instance stored as {stored} is available as {EXPLICIT_LE} (the default) or "
            f"as stored (transfer-syntax=*), not as {', '.join(asked)}")
