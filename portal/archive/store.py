"""The embedded store: DICOM files under the instance folder, content-addressed and durable.

A file's name is the SHA-256 of its bytes, made by the server; no UID or client file name ever
reaches a path. Writing is: temp file in the same file system -> fsync -> rename -> fsync the
folder. The caller commits the index row only after that, and acknowledges only after the commit.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import logging
import os
import secrets
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

from portal import failures
from portal.archive.space import Budget, DiskSpace, SpaceRule

log = logging.getLogger(__name__)

_HEX = frozenset("0123456789abcdef")
_TEMP_NAME = [secrets.token_hex(8)]  # the temp files' prefix in this process
_TEMP_NUMBERS = itertools.count()  # next() is atomic under the GIL


def _new_temp_prefix() -> None:
    _TEMP_NAME[0] = secrets.token_hex(8)


os.register_at_fork(after_in_child=_new_temp_prefix)


class ArchiveUnavailable(failures.Unavailable):
    """The database or the disk cannot take the instance now; the sender should retry
    (503 with ``Retry-After``). Here, below ``ingest`` and ``external``, so that the external
    client need not import ingest (which imports the copies, which import the client)."""


class StorageFull(failures.PortalError):
    """The file system has no room (or quota) for the object (507 Insufficient Storage)."""

    status = 507
    default_reason = "the archive has no room for this instance now"


class CorruptObject(failures.PortalError):
    """A stored file no longer matches the SHA-256 recorded when it was stored (a 500: its
    message names the file, so the public reason is the base class's)."""

    public = False


class StoredFile(NamedTuple):
    """Where one object's bytes are and the SHA-256 they must have (picklable, so a render
    process can read the file itself instead of receiving the bytes through a pipe)."""

    path: str
    sha256: str

    def read(self) -> bytes:
        """The bytes, hash-verified; CorruptObject when they differ."""
        data = Path(self.path).read_bytes()
        if hashlib.sha256(data).hexdigest() != self.sha256:
            log.error("stored object %s fails its SHA-256 check", Path(self.path).name)
            raise CorruptObject(Path(self.path).name)
        return data


# ``map`` or a thread pool's ``map`` over one function of one argument.
Mapper = Callable[[Callable[[Path], None], Iterable[Path]], Iterable[None]]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class EmbeddedStore:
    """Content-addressed files under ``root``: ``objects/ab/<sha256>.dcm`` and ``tmp/``.

    The 256 fan-out folders are made (and made durable) once, so a write touches only its
    file and one folder: no mkdir, no stat, two fsyncs.
    """

    def __init__(self, root: Path, space: SpaceRule | None = None) -> None:
        self.root = root
        self.space_rule = space or SpaceRule()
        self.objects = root / "objects"
        self.tmp = root / "tmp"
        self._ready = False

    def ensure(self) -> None:
        """Create the folders (private to the service user) and make their entries durable."""
        for folder in (self.root, self.objects, self.tmp):
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        made = False
        for number in range(256):
            fan = self.objects / f"{number:02x}"
            if not fan.is_dir():
                fan.mkdir(mode=0o700, exist_ok=True)
                made = True
        if made:
            _fsync_dir(self.objects)
            _fsync_dir(self.root)
        self._ready = True

    @staticmethod
    def key_for(sha256: str) -> str:
        """The storage key of content with this hash (a relative path we generate)."""
        if len(sha256) != 64 or not set(sha256) <= _HEX:
            raise ValueError("not a SHA-256 hex digest")
        return f"{sha256[:2]}/{sha256}.dcm"

    def path_of(self, key: str) -> Path:
        """Absolute path of a key; keys are only ever made by ``key_for``."""
        sha = key.rsplit("/", 1)[-1].removesuffix(".dcm")
        if self.key_for(sha) != key:
            raise ValueError("invalid storage key")
        return self.objects / key

    def space(self) -> DiskSpace:
        """Free space on the archive's file system and the configured thresholds."""
        return self.space_rule.look(self.root)

    def check_room(self, size: int, budget: Budget | None = None) -> None:
        """Refuse (StorageFull, 507) an upload of ``size`` bytes that would leave less than
        ARCHIVE_MIN_FREE free: new uploads stop before the disk is full, reads go on.
        ``budget``: the view of a whole batch (``Budget``) instead of a look of its own."""
        if budget is not None:
            refused = budget.take(size)
        else:
            space = self.space()
            refused = None if space.room_for(size) else space
        if refused is not None:
            raise StorageFull("the archive has no room for this instance now (%(detail)s)",
                              detail=refused.describe())

    def write(self, data: bytes, sha256: str, *, sync_folder: bool = True) -> str:
        """Durably write ``data`` and return its key; an existing identical file is kept.

        ``sync_folder=False`` leaves the fsync of the fan-out folder (which makes the new
        name durable) to the caller: ``sync_folders`` once for a whole batch, before its
        index rows are committed (a group commit: one folder fsync per folder and batch).
        """
        key = self.key_for(sha256)
        final = self.objects / key
        if not self._ready:
            self.ensure()
        # Unique: a random prefix per process (made again in a forked child), the process id
        # and a counter. Not a random name per file: that is a system call each time, which
        # hands the GIL to the other writers of a batch.
        temp = self.tmp / f"{_TEMP_NAME[0]}-{os.getpid()}-{next(_TEMP_NUMBERS)}.part"
        made = False
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            made = True
            try:
                view = memoryview(data)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                # A failed fsync is a failed write (the fsyncgate lesson): never retry it.
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temp, final)
            if sync_folder:
                _fsync_dir(final.parent)
        except OSError as exc:
            if made:  # never another writer's file of the same name
                temp.unlink(missing_ok=True)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StorageFull("no space left for the object") from exc
            raise
        return key

    def sync_folders(self, keys: Iterable[str], each: Mapper = map) -> None:
        """Make the names of files written with ``sync_folder=False`` durable: one fsync of
        each folder they are in, run by ``each`` (``map``, or a thread pool's)."""
        for _done in each(_fsync_dir, sorted({self.path_of(key).parent for key in keys})):
            pass

    def read(self, key: str, sha256: str) -> bytes:
        """Read a stored file and verify its hash; raise CorruptObject when it differs."""
        return self.locate(key, sha256).read()

    def locate(self, key: str, sha256: str) -> StoredFile:
        """The file of a key and the hash its bytes must have."""
        return StoredFile(str(self.path_of(key)), sha256)

    def delete(self, key: str) -> None:
        """Remove a stored file (used when its index row could not be committed)."""
        self.path_of(key).unlink(missing_ok=True)

    def reap_temp(self, older_than: float = 0.0) -> int:
        """Remove temp files left by a crash; return how many were removed."""
        if not self.tmp.is_dir():
            return 0
        now, removed = time.time(), 0
        for temp in self.tmp.glob("*.part"):
            try:
                if now - temp.stat().st_mtime >= older_than:
                    temp.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        return removed

    def keys(self) -> Iterator[str]:
        """Every key present on disk."""
        if not self.objects.is_dir():
            return
        for path in self.objects.glob("??/*.dcm"):
            yield path.relative_to(self.objects).as_posix()
