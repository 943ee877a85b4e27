"""WADO-RS bulk data (PS3.18 8.7.3.4 and F.2.6): BulkDataURIs in metadata and their values.

The metadata of an instance names every large binary value (pixel data, encapsulated
documents, overlays, LUTs) by a BulkDataURI under the instance's ``/bulkdata/`` resource:
``bulkdata/7FE00010`` for a top-level value, ``bulkdata/00540016/0/00181072`` for one inside
a sequence item (tag, item index, tag, ...). Pixel data comes back as its frames would
(``frames.choose``): native little endian bytes by default, as stored when asked for.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pydicom
from pydicom.dataset import Dataset

from portal.archive.validate import NATIVE_TRANSFER_SYNTAXES
from portal.dicomweb.accept import parse_accept
from portal.dicomweb.frames import OCTET, Decoder, NotAcceptable, negotiate_and_extract
from portal.dicomweb.transcode import EXPLICIT_LE
from portal.index.models import Instance

PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})
BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
MAX_DEPTH = 8


def _walk(element_map: Mapping[str, Any], base: str, path: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for tag, element in element_map.items():
        if "BulkDataURI" in element:
            out[tag] = {"vr": element["vr"], "BulkDataURI": base + "/".join([*path, tag])}
        elif element.get("vr") == "SQ" and element.get("Value"):
            out[tag] = {**element, "Value": [_walk(item, base, [*path, tag, str(index)])
                                             for index, item in enumerate(element["Value"])]}
        else:
            out[tag] = element
    return out


def with_bulkdata_uris(header: Mapping[str, Any], base: str, instance: Instance
                       ) -> dict[str, Any]:
    """The stored header with a BulkDataURI (under ``base``) for every bulk value."""
    out = _walk(header, base, [])
    if instance.rows and not any(f"{tag:08X}" in out for tag in PIXEL_TAGS):
        native_wide = (instance.transfer_syntax_uid in NATIVE_TRANSFER_SYNTAXES
                       and (instance.bits_allocated or 8) > 8)
        out["7FE00010"] = {"vr": "OW" if native_wide else "OB",
                           "BulkDataURI": base + "7FE00010"}
    return out


def parse_path(text: str) -> list[tuple[int, int | None]]:
    """``7FE00010`` or ``00540016/0/00181072`` as [(tag, item index or None), ...]."""
    pieces = text.strip("/").split("/")
    if len(pieces) % 2 != 1 or len(pieces) > 2 * MAX_DEPTH + 1:
        raise ValueError("a bulk data path is tag[/item/tag]...")
    path: list[tuple[int, int | None]] = []
    for position in range(0, len(pieces), 2):
        tag = pieces[position]
        if len(tag) != 8 or any(c not in "0123456789abcdefABCDEF" for c in tag):
            raise ValueError(f"{tag[:16]!r} is not a tag")
        index = None
        if position + 1 < len(pieces):
            if not pieces[position + 1].isdigit():
                raise ValueError("an item index is a number")
            index = int(pieces[position + 1])
        path.append((int(tag, 16), index))
    return path


@dataclass(frozen=True)
class BulkParts:
    """What to send: (content type, payload) parts, and whether as one single-part body."""

    items: list[tuple[str, bytes]]
    single: bool


def _wants_single_part(accept: str) -> bool:
    """True when the client accepts no multipart answer (e.g. ``application/octet-stream``)."""
    ranges = parse_accept(accept)
    return bool(ranges) and not any(r.media_type in ("*/*", "multipart/*", "multipart/related")
                                    for r in ranges)


def _accepts_octets(accept: str) -> bool:
    ranges = parse_accept(accept)
    return not ranges or any(
        (r.part_type or r.media_type) in (OCTET, "*/*", "application/*", "multipart/related",
                                          "multipart/*")
        and r.transfer_syntax in ("", "*", EXPLICIT_LE)
        for r in ranges)


def _element(ds: Dataset, path: list[tuple[int, int | None]]) -> Any:
    current = ds
    for tag, index in path:
        if tag not in current:
            raise KeyError("no such bulk data")
        element = current[tag]
        if index is None:
            return element
        if element.VR != "SQ" or not 0 <= index < len(element.value):
            raise KeyError("no such bulk data")
        current = element.value[index]
    raise KeyError("no such bulk data")


def extract(data: bytes, path: list[tuple[int, int | None]], accept: str,
            decode: Decoder) -> BulkParts:
    """The value at ``path`` of a stored instance, negotiated against ``accept``.

    KeyError when there is no such binary value; NotAcceptable when no accepted media type
    can carry it. ``decode`` decodes pixel data frames (see ``frames.negotiate_and_extract``).
    """
    single = _wants_single_part(accept)
    ds = pydicom.dcmread(io.BytesIO(data))
    if len(path) == 1 and path[0][0] == 0x7FE00010:
        if "PixelData" not in ds:
            raise KeyError("this instance has no pixel data")
        count = int(ds.get("NumberOfFrames") or 1)
        content_type, payloads = negotiate_and_extract(
            lambda: ds, str(ds.file_meta.TransferSyntaxUID), range(1, count + 1), accept,
            decode)
        if content_type.startswith(OCTET):
            items = [(content_type, b"".join(payloads))]
        else:
            items = [(content_type, payload) for payload in payloads]
        if single and len(items) > 1:
            raise NotAcceptable("compressed frames need a multipart/related answer")
        return BulkParts(items, single)
    element = _element(ds, path)
    if element.VR not in BINARY_VRS or element.value is None:
        raise KeyError("no such bulk data")
    if not _accepts_octets(accept):
        raise NotAcceptable(f"bulk data is available as {OCTET}")
    return BulkParts([(OCTET, bytes(element.value))], single)
