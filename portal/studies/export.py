"""A study as a ZIP of DICOM files with a DICOMDIR (PS3.10 file-set, PS3.3 F.2 records).

The ZIP is written by hand, uncompressed ("stored": DICOM pixels barely compress and phones
unpack faster), so its exact length is known before the first byte and the browser shows
progress; entries are streamed one file at a time, so memory stays at one instance. A study
of 4 GB or more, or of 65,535 files or more, gets ZIP64 records (APPNOTE.TXT 6.3.x) where a
plain field would overflow; smaller studies get a plain ZIP without them.
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
from pydicom.uid import UID

from portal import failures
from portal.index.models import Instance, Study

_MARK32, _MARK16 = 0xFFFF_FFFF, 0xFFFF  # "the value is in the ZIP64 record" (APPNOTE 4.4.1.4)
_END64_LENGTH, _LOCATOR_LENGTH = 56, 20  # APPNOTE 4.3.14 (no extensible data), 4.3.15
ZIP64_MAX = (1 << 64) - 1  # the largest length or count a ZIP64 file can describe
_DOS_DATE = (2000 - 1980) << 9 | 1 << 5 | 1  # 2000-01-01: no time of day leaks from files


@dataclass(frozen=True)
class Zip64Threshold:
    """From which value a size or offset (``size``) or the entry count (``entries``) is
    written in ZIP64 records (APPNOTE 6.3.x, 4.5.3 and 4.3.14) instead of the plain fields.

    The defaults are the format's own limits: 0xFFFFFFFF and 0xFFFF are the markers that
    send a reader to the ZIP64 record, so a value equal to them already needs one. Tests
    lower them to exercise ZIP64 without writing 4 GB.
    """

    size: int = _MARK32
    entries: int = _MARK16


# What the download route uses; tests may lower it.
ZIP64_THRESHOLD = Zip64Threshold()


class ExportTooLarge(failures.TooLarge, ValueError):
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
    ds.file_meta.MediaStorageSOPClassUID = UID(instance.sop_class_uid)
    ds.file_meta.MediaStorageSOPInstanceUID = UID(instance.sop_instance_uid)
    ds.file_meta.TransferSyntaxUID = UID(instance.transfer_syntax_uid)
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
        ids = {str(item.SOPInstanceUID): str(item.FileID).replace("\\", "/") for item in fileset}
    return dicomdir, ids


@dataclass(frozen=True)
class _Slot:
    """Where one entry's local header starts and which of its fields go to ZIP64 records."""

    name: bytes
    size: int
    offset: int
    big_size: bool
    big_offset: bool

    @property
    def version(self) -> int:
        # "Version needed to extract" 4.5 marks ZIP64 extensions (APPNOTE 4.4.3.2); plain
        # entries keep 2.0 so a study below the threshold is the same ZIP as before ZIP64.
        return 45 if self.big_size or self.big_offset else 20

    def local_extra(self) -> bytes:
        # APPNOTE 4.5.3: a local header with ZIP64 sizes carries both of them, never an offset.
        return _zip64_extra([self.size, self.size] if self.big_size else [])

    def central_extra(self) -> bytes:
        return _zip64_extra(([self.size, self.size] if self.big_size else [])
                            + ([self.offset] if self.big_offset else []))

    def local_length(self) -> int:
        return 30 + len(self.name) + (4 + 16 if self.big_size else 0)

    def central_length(self) -> int:
        fields = (2 if self.big_size else 0) + (1 if self.big_offset else 0)
        return 46 + len(self.name) + (4 + 8 * fields if fields else 0)


def _zip64_extra(values: list[int]) -> bytes:
    """The ZIP64 extended information extra field 0x0001 (APPNOTE 4.5.3), empty if no values.

    Its fields keep a fixed order (original size, compressed size, local header offset) and
    appear only for the header fields that hold the 0xFFFFFFFF marker.
    """
    if not values:
        return b""
    return struct.pack(f"<HH{len(values)}Q", 0x0001, 8 * len(values), *values)


def _local_header(slot: _Slot, crc: int) -> bytes:
    extra = slot.local_extra()
    size = _MARK32 if slot.big_size else slot.size
    return struct.pack("<IHHHHHIIIHH", 0x04034B50, slot.version, 0, 0, 0, _DOS_DATE, crc,
                       size, size, len(slot.name), len(extra)) + slot.name + extra


def _central_header(slot: _Slot, crc: int) -> bytes:
    extra = slot.central_extra()
    size = _MARK32 if slot.big_size else slot.size
    offset = _MARK32 if slot.big_offset else slot.offset
    return struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, slot.version, slot.version, 0, 0, 0,
                       _DOS_DATE, crc, size, size, len(slot.name), len(extra), 0, 0, 0, 0,
                       offset) + slot.name + extra


@dataclass(frozen=True)
class _Layout:
    """Every entry's slot, where the central directory starts and how long it is."""

    slots: list[_Slot]
    start: int
    size: int
    threshold: Zip64Threshold

    @property
    def zip64_end(self) -> bool:
        """Whether the end needs the ZIP64 end of central directory record and locator."""
        return (len(self.slots) >= self.threshold.entries or self.start >= self.threshold.size
                or self.size >= self.threshold.size)

    @property
    def length(self) -> int:
        end = 22 + (_END64_LENGTH + _LOCATOR_LENGTH if self.zip64_end else 0)
        return self.start + self.size + end

    def end_records(self) -> bytes:
        """The end of central directory record, after the ZIP64 record and locator if needed.

        APPNOTE 4.3.14-4.3.16 and 4.4.1.4: a field too small for its value holds 0xFFFF or
        0xFFFFFFFF and readers take the value from the ZIP64 end of central directory record.
        """
        count, limit = len(self.slots), self.threshold
        records = b""
        if self.zip64_end:
            records = struct.pack("<IQHHIIQQQQ", 0x06064B50, _END64_LENGTH - 12, 45, 45, 0, 0,
                                  count, count, self.size, self.start)
            records += struct.pack("<IIQI", 0x07064B50, 0, self.start + self.size, 1)
        count16 = _MARK16 if count >= limit.entries else count
        return records + struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, count16, count16,
                                     _MARK32 if self.size >= limit.size else self.size,
                                     _MARK32 if self.start >= limit.size else self.start, 0)


def _layout(entries: list[Entry], threshold: Zip64Threshold) -> _Layout:
    """Place the entries; ``zip_length`` and ``stream_zip`` both use this, so the
    Content-Length and the bytes sent cannot disagree."""
    slots: list[_Slot] = []
    offset = directory = 0
    for entry in entries:
        slot = _Slot(entry.name.encode(), entry.size, offset, entry.size >= threshold.size,
                     offset >= threshold.size)
        slots.append(slot)
        offset += slot.local_length() + entry.size
        directory += slot.central_length()
    return _Layout(slots, offset, directory, threshold)


def zip_length(entries: list[Entry], threshold: Zip64Threshold = ZIP64_THRESHOLD) -> int:
    """The exact length of the ZIP ``stream_zip`` writes for these entries and threshold."""
    return _layout(entries, threshold).length


def check_size(entries: list[Entry], threshold: Zip64Threshold = ZIP64_THRESHOLD) -> int:
    """The ZIP length, or ExportTooLarge beyond what even a ZIP64 file can describe."""
    length = zip_length(entries, threshold)
    if len(entries) > ZIP64_MAX or length > ZIP64_MAX:
        raise ExportTooLarge("this study is larger than one ZIP file can hold; download its "
                             "series one by one")
    return length


def stream_zip(entries: list[Entry], threshold: Zip64Threshold = ZIP64_THRESHOLD
               ) -> Iterator[bytes]:
    """The ZIP, one entry at a time (each file read, CRC-32 computed, then sent).

    ZIP64 records are written only where a size, an offset or the entry count reaches
    ``threshold``; below it the bytes are those of a plain ZIP.
    """
    layout = _layout(entries, threshold)
    central = []
    for entry, slot in zip(entries, layout.slots, strict=True):
        data = entry.read()
        if len(data) != entry.size:
            raise RuntimeError("a stored file changed size during the download")
        crc = zlib.crc32(data)
        yield _local_header(slot, crc)
        yield data
        central.append(_central_header(slot, crc))
    yield b"".join(central)
    yield layout.end_records()


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


# What the ZIP adds to each file, about: its local and central headers and its DICOMDIR record.
ENTRY_OVERHEAD = 512


def study_zip_bytes(session: Any, principal: Any, study: Study) -> int | None:
    """About how many bytes the study's ZIP has for this principal (from the stored sizes, one
    query), or None when some of its files are only in an external archive (size unknown)."""
    from sqlalchemy import func, select

    from portal.access.policy import instance_filter
    from portal.archive.models import StoredObject
    from portal.index.models import Series

    count, stored, total = session.execute(
        select(func.count(Instance.id), func.count(StoredObject.id),
               func.coalesce(func.sum(StoredObject.size), 0))
        .select_from(Instance).join(Series, Instance.series_fk == Series.id)
        .outerjoin(StoredObject, StoredObject.sop_instance_uid == Instance.sop_instance_uid)
        .where(Series.study_fk == study.id, instance_filter(principal))).one()
    if not count or stored < count:
        return None
    return int(total) + ENTRY_OVERHEAD * (int(count) + 1)


def file_size(size: int) -> str:
    """A size as phones show them (decimal units): '640 KB', '4.2 MB', '23 MB', '1.3 GB'."""
    for unit, scale in (("GB", 10**9), ("MB", 10**6)):
        if size >= scale:
            value = size / scale
            return f"{value:.1f} {unit}" if value < 10 else f"{value:.0f} {unit}"
    return f"{max(1, round(size / 1000))} KB"
