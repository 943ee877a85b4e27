"""Import files, folders and zip files into the archive (the CLI's engine)."""

from __future__ import annotations

import zipfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from portal import failures
from portal.archive.after import Stored
from portal.archive.ingest import Archive
from portal.archive.store import ArchiveUnavailable
from portal.archive.validate import Rejected
from portal.audit import IMPORT


class UnsafeZip(failures.Invalid):
    """A zip file is refused as a whole (unsafe names, too many entries, a bomb)."""


@dataclass
class ImportSummary:
    """Counts per outcome and the reason for every rejected file."""

    counts: Counter[str] = field(default_factory=Counter)
    rejected: list[tuple[str, str]] = field(default_factory=list)
    new_series: set[str] = field(default_factory=set)
    stored: list[Stored] = field(default_factory=list)  # the new ones, for after_ingest

    def describe(self) -> str:
        """A short report for people."""
        lines = [f"stored: {self.counts['stored']}, already stored: "
                 f"{self.counts['already_stored']}, rejected: {len(self.rejected)}"]
        lines += [f"  rejected {label}: {reason}" for label, reason in self.rejected[:200]]
        if len(self.rejected) > 200:
            lines.append(f"  ... and {len(self.rejected) - 200} more")
        return "\n".join(lines)


@dataclass(frozen=True)
class Source:
    """One thing to import: a label for messages and a way to get its bytes."""

    label: str
    read: Callable[[], bytes]


def _is_zip(path: Path) -> bool:
    with path.open("rb") as fh:
        return fh.read(4) == b"PK\x03\x04"


def _unsafe_name(name: str) -> bool:
    parts = PurePosixPath(name.replace("\\", "/")).parts
    return name.startswith(("/", "\\")) or ".." in parts or ":" in name or "\x00" in name


class _ZipStream:
    """The entries of one checked ZIP, read in order through ONE open ``ZipFile``.

    Opening a ``ZipFile`` parses the whole central directory, so opening it again for every
    entry made a ZIP of n entries cost n * n (issue 19). The file is opened on the first read
    (a folder of many ZIPs holds no descriptor for those not read yet) and closed after the
    last entry was read; one that is never read to the end is closed with this object."""

    def __init__(self, path: Path, count: int, max_entry_bytes: int) -> None:
        self.path, self.max_entry_bytes = path, max_entry_bytes
        self._left = set(range(count))
        self._zip: zipfile.ZipFile | None = None

    def read(self, number: int, info: zipfile.ZipInfo) -> bytes:
        try:
            if self._zip is None:
                self._zip = zipfile.ZipFile(self.path)
            with self._zip.open(info) as fh:
                # The declared size may lie; never read more than the limit allows.
                data = fh.read(self.max_entry_bytes + 1)
        except RuntimeError as exc:  # an encrypted entry
            raise Rejected(f"the ZIP entry cannot be read ({exc})") from exc
        except NotImplementedError as exc:  # Deflate64 and other methods
            raise Rejected("the ZIP entry is compressed in a way that cannot be read "
                           f"({exc})") from exc
        except (zipfile.BadZipFile, zlib.error, EOFError) as exc:  # bad CRC, cut short
            raise Rejected(f"the ZIP entry is damaged ({exc})") from exc
        finally:
            self._left.discard(number)
            if not self._left:
                self.close()
        if len(data) > self.max_entry_bytes:
            raise Rejected("entry is larger than the limit", http_status=413)
        return data

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()
            self._zip = None


def zip_sources(path: Path, *, max_entries: int, max_ratio: int,
                max_entry_bytes: int, max_total_bytes: int | None = None) -> list[Source]:
    """Check a zip file as a whole before anything in it is read, then list its entries.

    Entry names are never used as paths; they only label messages. A zip with an unsafe
    name, too many entries, an oversized entry, an extreme compression ratio or (with
    ``max_total_bytes``) too much in all is refused. The sources read the entries in order
    through one open ZipFile (``_ZipStream``).
    """
    try:
        with zipfile.ZipFile(path) as archive:
            every = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile) as exc:
        raise UnsafeZip(f"not a readable zip file: {exc}") from exc
    infos = [i for i in every if not i.is_dir()]
    if len(infos) > max_entries:
        raise UnsafeZip(f"more than {max_entries} entries")
    for info in infos:
        if _unsafe_name(info.filename):
            raise UnsafeZip(f"unsafe entry name {info.filename[:80]!r} (path traversal)")
        if info.file_size > max_entry_bytes:
            raise UnsafeZip(f"entry {info.filename[:80]!r} is larger than the limit")
        if info.file_size > max(info.compress_size, 1) * max_ratio:
            raise UnsafeZip(f"entry {info.filename[:80]!r} is compressed more than "
                            f"{max_ratio}:1 (a zip bomb?)")
    if max_total_bytes is not None and sum(i.file_size for i in every) > max_total_bytes:
        raise UnsafeZip(f"it would unpack to more than {max_total_bytes >> 20} MiB")
    stream = _ZipStream(path, len(infos), max_entry_bytes)

    def reader(number: int, info: zipfile.ZipInfo) -> Callable[[], bytes]:
        return lambda: stream.read(number, info)

    return [Source(f"{path.name}:{info.filename}", reader(number, info))
            for number, info in enumerate(infos)]


def _bounded_reader(path: Path, limit: int) -> Callable[[], bytes]:
    def read() -> bytes:
        with path.open("rb") as fh:
            data = fh.read(limit + 1)
        if len(data) > limit:
            raise Rejected("file is larger than the instance size limit", http_status=413)
        return data
    return read


def expand(paths: list[Path], **zip_limits: int) -> tuple[list[Source], list[tuple[str, str]]]:
    """Turn files, folders and zips into sources; refused zips and missing paths are listed."""
    sources: list[Source] = []
    problems: list[tuple[str, str]] = []

    def files_of(path: Path) -> Iterator[Path]:
        if path.is_dir():
            for child in sorted(path.rglob("*")):
                if child.is_file() and not child.name.startswith("."):
                    yield child
        else:
            yield path

    for root in paths:
        if not root.exists():
            problems.append((str(root), "no such file or folder"))
            continue
        for path in files_of(root):
            try:
                if _is_zip(path):
                    sources.extend(zip_sources(path, **zip_limits))
                else:
                    sources.append(Source(str(path), _bounded_reader(
                        path, zip_limits["max_entry_bytes"])))
            except UnsafeZip as exc:
                problems.append((str(path), str(exc)))
            except OSError as exc:
                problems.append((str(path), f"cannot read: {exc.strerror}"))
    return sources, problems


def import_sources(archive: Archive, sources: list[Source], who: str,
                   progress: Callable[[int], None] | None = None,
                   summary: ImportSummary | None = None) -> ImportSummary:
    """Ingest each source, counting outcomes into ``summary`` (kept by a caller that must
    finish what was stored even when this raises); stop only if the archive is unavailable.

    The caller runs ``archive.after_ingest`` for ``summary.stored`` afterwards.
    """
    summary = ImportSummary() if summary is None else summary
    for number, source in enumerate(sources, start=1):
        try:
            try:
                data = source.read()
                if len(data) > archive.limits.max_instance_bytes:
                    raise Rejected("file is larger than the instance size limit",
                                   http_status=413)
            except Rejected as exc:  # refused before ingest, which audits its own refusals
                archive.record_rejections([(exc, None)], who=who, source_address="cli")
                raise
            # Its 110107 record is committed with its index row (docs/security.md 40).
            result = archive.ingest(data, who=who, source_address="cli", recorded_as=IMPORT)
            summary.counts[result.outcome] += 1
            if result.outcome == "stored":
                summary.new_series.add(result.series_instance_uid)
                summary.stored.append(result)
        except Rejected as exc:
            summary.rejected.append((source.label, exc.reason))
            if exc.http_status == 507:  # no room: every further file would be refused too
                if number < len(sources):
                    summary.rejected.append((f"{len(sources) - number} more file(s)",
                                             "not imported: the archive has no room"))
                break
        except OSError as exc:
            summary.rejected.append((source.label, f"cannot read: {exc.strerror}"))
        except ArchiveUnavailable as exc:
            summary.rejected.append((source.label, str(exc)))
            raise
        finally:
            if progress is not None:
                progress(1)
    return summary
