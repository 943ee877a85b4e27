"""A study as a ZIP of DICOM files with a DICOMDIR (PS3.10 file-set, PS3.3 F.2 records).

The ZIP is written by hand, uncompressed ("stored": DICOM pixels barely compress and phones
unpack faster), so its exact length is known before the first byte and the browser shows
progress; entries are streamed one file at a time, so memory stays at one instance.
"""

from __future__ import annotations

import os
import re
import struct
import tempfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.fileset import FileSet

from portal.index.models import Instance, Study

ZIP_LIMIT = (1 << 32) - 1  # no ZIP64 here: a larger study is refused with a clear message
MAX_ENTRIES = 65_000
_DOS_DATE = (2000 - 1980) << 9 | 1 << 5 | 1  # 2000-01-01: no time of day leaks from files


class ExportTooLarge(ValueError):
    """The study is too large for one ZIP download; the message says why."""


@dataclass(frozen=True)
class Entry:
    """One file in the ZIP: its name, size and how to read its bytes (hash-checked)."""

    name: str
    size: int
    read: Callable[[], bytes]


def download_name(study: Study) -> str:
    """A filename made by the server from the study date and UID only (never patient text)."""
    date = re.sub(r"[^0-9]", "", study.study_date or "")[:8] or "undated"
    tail = re.sub(r"[^0-9]", "", study.study_instance_uid)[-8:] or "study"
    return f"study-{date}-{tail}.zip"


def _header_dataset(instance: Instance, header: dict[str, Any]) -> Dataset:
    """A pixel-less data set from the stored DICOM JSON header, enough for a directory record."""
    clean = {tag: element for tag, element in header.items()
             if isinstance(element, dict) and "BulkDataURI" not in element}
    ds = Dataset.from_json(clean)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = instance.sop_class_uid
    ds.file_meta.MediaStorageSOPInstanceUID = instance.sop_instance_uid
    ds.file_meta.TransferSyntaxUID = instance.transfer_syntax_uid
    ds.SOPClassUID, ds.SOPInstanceUID = instance.sop_class_uid, instance.sop_instance_uid
    if "InstanceNumber" not in ds:  # Type 1 in IMAGE records; the index keeps an order
        ds.InstanceNumber = instance.instance_number or 0
    return ds


def dicomdir_entries(instances: list[Instance], headers: list[dict[str, Any]]
                     ) -> tuple[bytes, dict[str, str]]:
    """The DICOMDIR bytes and each instance's File ID (``PT000000/ST000000/...``).

    pydicom's FileSet makes the records from header-only copies; the real files are then
    streamed under the same File IDs. Instances whose SOP class has no directory record
    are left out of the DICOMDIR and stored beside it.
    """
    fileset = FileSet()
    fileset.ID = "PORTAL"
    for instance, header in zip(instances, headers, strict=True):
        try:
            fileset.add(_header_dataset(instance, header))
        except (ValueError, KeyError, AttributeError, TypeError):
            continue
    with tempfile.TemporaryDirectory(prefix="portal-dicomdir-") as folder:
        fileset.write(folder)
        with open(os.path.join(folder, "DICOMDIR"), "rb") as handle:
            dicomdir = handle.read()
        ids = {item.SOPInstanceUID: str(item.FileID).replace("\\", "/") for item in fileset}
    return dicomdir, ids


def _local_header(name: bytes, crc: int, size: int) -> bytes:
    return struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 0, 0, _DOS_DATE, crc, size, size,
                       len(name), 0) + name


def _central_header(name: bytes, crc: int, size: int, offset: int) -> bytes:
    return struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, 0, 0, _DOS_DATE, crc, size,
                       size, len(name), 0, 0, 0, 0, 0, offset) + name


def zip_length(entries: list[Entry]) -> int:
    """The exact length of the ZIP ``stream_zip`` writes for these entries."""
    names = sum(len(e.name.encode()) for e in entries)
    return sum(30 + 46 + e.size for e in entries) + 2 * names + 22


def check_size(entries: list[Entry]) -> int:
    """The ZIP length, or ExportTooLarge beyond what a plain (non-ZIP64) ZIP can hold."""
    length = zip_length(entries)
    if len(entries) > MAX_ENTRIES or length > ZIP_LIMIT:
        raise ExportTooLarge("this study is larger than one download can hold (4 GB or "
                             f"{MAX_ENTRIES} files); download its series one by one")
    return length


def stream_zip(entries: list[Entry]) -> Iterator[bytes]:
    """The ZIP, one entry at a time (each file read, CRC-32 computed, then sent)."""
    central, offset = [], 0
    for entry in entries:
        data = entry.read()
        if len(data) != entry.size:
            raise RuntimeError("a stored file changed size during the download")
        name = entry.name.encode()
        crc = zlib.crc32(data)
        header = _local_header(name, crc, len(data))
        yield header
        yield data
        central.append(_central_header(name, crc, len(data), offset))
        offset += len(header) + len(data)
    directory = b"".join(central)
    yield directory
    yield struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(entries), len(entries),
                      len(directory), offset, 0)


def study_entries(instances: list[Instance], headers: list[dict[str, Any]],
                  locate: Callable[[str], Any]) -> list[Entry]:
    """The ZIP entries of a study: DICOMDIR first, then every instance under its File ID."""
    dicomdir, ids = dicomdir_entries(instances, headers)
    entries = [Entry("DICOMDIR", len(dicomdir), lambda: dicomdir)]
    extra = 0
    for instance in instances:
        stored = locate(instance.sop_instance_uid)
        name = ids.get(instance.sop_instance_uid)
        if name is None:
            extra += 1
            name = f"OTHER/F{extra:06d}"
        entries.append(Entry(name, os.path.getsize(stored.path), stored.read))
    return entries


