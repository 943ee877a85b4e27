"""Whether two files under one SOP Instance UID hold the same instance.

PS3.5 10 (and PS3.4 C.6.1.1.5): the transfer syntax is how an instance travels, not what it
is. The same instance sent again in another transfer syntax (a lossless compression, implicit
instead of explicit VR), with a File Meta group another tool wrote, or re-encoded by a C-MOVE
after it arrived by STOW-RS, is the same instance; only different content is a conflict.

So the data sets are compared without their File Meta, element by element (values as decoded,
sequences item by item), group lengths and trailing padding ignored, and Pixel Data decoded
to pixels. A lossy compression changes the pixels, so it is different content (and PS3.3
C.7.6.1.1.5 wants it under a new SOP Instance UID anyway). Anything that cannot be compared
with certainty (a file that does not parse, pixels no decoder reads, a value of unknown
VR) counts as different: the old, safe answer.
"""

from __future__ import annotations

import io
import logging
from typing import Any

import numpy as np
import pydicom
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag, Tag

log = logging.getLogger(__name__)

PIXEL_DATA = Tag(0x7FE0, 0x0010)
_TRAILING_PADDING = Tag(0xFFFC, 0xFFFC)
# Attributes a lossless transcoder may set on the way: planar configuration (PS3.5 8.2 fixes
# it for JPEG-family streams) and a derivation description naming the compression (DCMTK's
# dcmcjpeg writes one even for lossless); the pixels, compared decoded, decide instead. Lossy
# Image Compression is not among them: a lossy transcode stays different content.
_ENCODING_ONLY = frozenset({Tag(0x0028, 0x0006),  # PlanarConfiguration
                            Tag(0x0008, 0x2111)})  # DerivationDescription
_MAX_DEPTH = 16


class _Different(Exception):
    """Raised deep in the comparison at the first difference."""


def same_instance(first: bytes, second: bytes) -> bool:
    """True when two Part 10 files encode the same data set and the same decoded pixels."""
    try:
        # (A sender's quirks are judged by validation; the readers' warnings: portal.quiet.)
        a = pydicom.dcmread(io.BytesIO(first))
        b = pydicom.dcmread(io.BytesIO(second))
        _compare(a, b, 0)
        _compare_pixels(a, b)
    except _Different:
        return False
    except Exception as exc:  # cannot be compared: treated as different content
        log.info("instances not comparable (%s): treated as different",
                 exc.__class__.__name__)
        return False
    return True


def _meaningful(tag: BaseTag) -> bool:
    """Elements that carry content (not group lengths, padding or the File Meta)."""
    return tag.group != 0x0002 and tag.element != 0 and tag != _TRAILING_PADDING


def _compare(a: Dataset, b: Dataset, depth: int) -> None:
    """Raise _Different unless both data sets have equal elements (Pixel Data aside at the
    top level, where it is compared decoded)."""
    if depth > _MAX_DEPTH:
        raise _Different
    skip = {PIXEL_DATA, *_ENCODING_ONLY} if depth == 0 else set()
    tags_a = {tag for tag in set(a.keys()) if _meaningful(tag) and tag not in skip}
    tags_b = {tag for tag in set(b.keys()) if _meaningful(tag) and tag not in skip}
    if tags_a != tags_b:
        raise _Different
    for tag in sorted(tags_a):
        _compare_element(a[tag], b[tag], depth)


def _compare_element(a: DataElement, b: DataElement, depth: int) -> None:
    """Raise _Different unless the two elements hold the same value."""
    if a.VR == "SQ" or b.VR == "SQ":
        if a.VR != b.VR or len(a.value) != len(b.value):
            raise _Different
        for item_a, item_b in zip(a.value, b.value, strict=True):
            _compare(item_a, item_b, depth + 1)
        return
    if a.VR == "UN" or b.VR == "UN":
        # Implicit VR leaves unknown private elements undecoded; explicit VR names them.
        # Their bytes are equal only when both sides hold the same raw little-endian value.
        if _raw(a) != _raw(b):
            raise _Different
        return
    if not _equal_values(a.value, b.value):
        raise _Different


def _raw(element: DataElement) -> bytes:
    """The value as bytes when it is bytes, else its text (for a UN/named pair)."""
    value = element.value
    if isinstance(value, bytes):
        return value.rstrip(b"\0 ")
    return str(value).encode("utf-8", errors="replace").rstrip(b"\0 ")


def _equal_values(a: Any, b: Any) -> bool:
    """Equal decoded values; bytes compared without the trailing pad byte."""
    if isinstance(a, bytes) and isinstance(b, bytes):
        return a.rstrip(b"\0") == b.rstrip(b"\0") and abs(len(a) - len(b)) <= 1
    return bool(a == b)


def _compare_pixels(a: Dataset, b: Dataset) -> None:
    """Pixel Data equal as decoded pixels (same shape, type and values)."""
    has_a, has_b = PIXEL_DATA in a, PIXEL_DATA in b
    if has_a != has_b:
        raise _Different
    if not has_a:
        return  # no pixels, or float pixels (native only, compared as values above)
    if a.PixelData == b.PixelData and a.file_meta.TransferSyntaxUID == \
            b.file_meta.TransferSyntaxUID:
        return  # the same bytes in the same syntax: nothing to decode
    pixels_a, pixels_b = a.pixel_array, b.pixel_array
    if pixels_a.shape != pixels_b.shape or not np.array_equal(pixels_a, pixels_b):
        raise _Different
