"""The permanent tier: embedded images re-encoded losslessly once they are old enough.

Cached copies of an external archive are the temporary tier (``copies.py``: evicted by size,
least recently used first) and are never re-encoded here. An embedded instance stored with
uncompressed pixel data (Explicit or Implicit VR Little Endian) more than
``ARCHIVE_COMPRESS_AFTER_DAYS`` ago is re-encoded as JPEG-LS lossless (pyjpegls) or JPEG 2000
lossless (pylibjpeg-openjpeg) through pydicom's encoders, and swapped in only when

1. the new file decodes to exactly the pixels of the old one (same shape, type and values),
2. it is smaller,
3. it is durably written under its own SHA-256 (a content-addressed name of its own), and
4. the index row still names the old file when the swap commits (another process may have
   changed it meanwhile: then the new file goes and the old one stays).

Only after that commit is the old file removed; a crash in between leaves an unreferenced
file (``archive verify`` reports it, ``reap`` removes it), never a row without its file. The
row keeps ``original_sha256`` (what the sender sent), so the same instance sent again is
still "already stored". WADO-RS answers in the stored syntax for ``*`` and transcodes to
Explicit VR Little Endian when that is asked (``portal/dicomweb/transcode.py``).
"""

from __future__ import annotations

import hashlib
import io
import logging
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, cast

import numpy as np
import pydicom
from sqlalchemy import CursorResult, select, update
from sqlalchemy.orm import Session

from portal.archive.models import CachedCopy, StoredObject
from portal.archive.store import EmbeddedStore
from portal.db import Database, utcnow
from portal.index.models import Instance

log = logging.getLogger(__name__)

SYNTAXES = {"jpeg-ls": (pydicom.uid.JPEGLSLossless, "pyjpegls"),
            "jpeg2000": (pydicom.uid.JPEG2000Lossless, "pylibjpeg")}
UNCOMPRESSED = (pydicom.uid.ExplicitVRLittleEndian, pydicom.uid.ImplicitVRLittleEndian)
BATCH = 200


@dataclass
class Compressed:
    """What one run did: instances re-encoded, bytes before and after, and the skipped ones
    with the reason (no gain, an encoder that cannot take the image, ...)."""

    done: int = 0
    before: int = 0
    after: int = 0
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def saved(self) -> int:
        """Bytes saved by the instances re-encoded."""
        return self.before - self.after


class NotLossless(Exception):
    """The re-encoded pixels differ from the stored ones: the file is not swapped."""


def reencode(data: bytes, syntax: str) -> bytes:
    """The instance ``data`` with its pixel data re-encoded losslessly in ``syntax``
    (``SYNTAXES``); NotLossless unless it decodes to exactly the same pixels. ValueError,
    RuntimeError or NotImplementedError when the encoder cannot take this image."""
    uid, plugin = SYNTAXES[syntax]
    ds = pydicom.dcmread(io.BytesIO(data))
    before = ds.pixel_array
    ds.compress(uid, encoding_plugin=plugin, generate_instance_uid=False)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    new = buffer.getvalue()
    after = pydicom.dcmread(io.BytesIO(new)).pixel_array
    if after.shape != before.shape or after.dtype != before.dtype \
            or not np.array_equal(after, before):
        raise NotLossless("the decoded pixels differ")
    return new


def candidates(session: Session, older_than_days: int, limit: int) -> list[Any]:
    """Embedded instances (no cached copy of an external one) with uncompressed pixel data,
    stored more than ``older_than_days`` ago: (uid, key, sha256, size), oldest first."""
    cutoff = utcnow() - timedelta(days=older_than_days)
    return list(session.execute(
        select(StoredObject.sop_instance_uid, StoredObject.storage_key, StoredObject.sha256,
               StoredObject.size)
        .join(Instance, Instance.sop_instance_uid == StoredObject.sop_instance_uid)
        .outerjoin(CachedCopy, CachedCopy.sop_instance_uid == StoredObject.sop_instance_uid)
        .where(CachedCopy.id.is_(None), StoredObject.stored_at <= cutoff,
               Instance.transfer_syntax_uid.in_(UNCOMPRESSED), Instance.rows.is_not(None))
        .order_by(StoredObject.stored_at, StoredObject.id).limit(limit)).all())


def compress_one(store: EmbeddedStore, database: Database, uid: str, key: str, sha256: str,
                 syntax: str) -> tuple[int, int] | str:
    """Re-encode one instance; (old size, new size), or the reason it stays as it is."""
    try:
        data = store.read(key, sha256)  # hash-checked
    except FileNotFoundError:
        return "changed meanwhile"  # swapped or deleted by another run since it was listed
    try:
        new = reencode(data, syntax)
    except NotLossless as exc:
        log.error("instance %s: %s; kept uncompressed", uid, exc)
        return str(exc)
    except (ValueError, RuntimeError, NotImplementedError, AttributeError) as exc:
        return f"the encoder cannot take it ({exc.__class__.__name__})"
    if len(new) >= len(data):
        return "no smaller"
    new_sha = hashlib.sha256(new).hexdigest()
    new_key = store.write(new, new_sha)
    with database.write_transaction() as session:
        swapped = cast(CursorResult[Any], session.execute(
            update(StoredObject)
            .where(StoredObject.sop_instance_uid == uid, StoredObject.sha256 == sha256)
            .values(storage_key=new_key, sha256=new_sha, size=len(new)))).rowcount
        if swapped:
            session.execute(update(Instance).where(Instance.sop_instance_uid == uid)
                            .values(transfer_syntax_uid=SYNTAXES[syntax][0]))
    if not swapped:  # changed or deleted meanwhile
        with database.new_session() as session:
            named = session.scalar(select(StoredObject.id)
                                   .where(StoredObject.storage_key == new_key))
        if named is None:  # (another run may have swapped in the same new file)
            store.delete(new_key)
        return "changed meanwhile"
    store.delete(key)  # the index names the new, verified file now
    return len(data), len(new)


def compress_stored(store: EmbeddedStore, database: Database, *, older_than_days: int,
                    syntax: str, limit: int = 1_000_000) -> Compressed:
    """Re-encode every candidate (at most ``limit``), one instance per transaction."""
    result = Compressed()
    seen: set[str] = set()
    while len(seen) < limit:
        with database.new_session() as session:
            rows = [row for row in candidates(session, older_than_days,
                                              min(BATCH + len(seen), limit))
                    if row.sop_instance_uid not in seen]
        if not rows:
            break
        for uid, key, sha, _size in rows:
            seen.add(uid)
            outcome = compress_one(store, database, uid, key, sha, syntax)
            if isinstance(outcome, str):
                result.skipped[uid] = outcome
            else:
                result.done += 1
                result.before += outcome[0]
                result.after += outcome[1]
    return result


def compress_now() -> int:
    """The daily job: the images old enough, in the configured syntax (off when 0 days)."""
    from flask import current_app

    from portal.archive import current_archive

    settings = current_app.config["PORTAL"]
    days = settings["ARCHIVE_COMPRESS_AFTER_DAYS"]
    if not days:
        return 0
    archive = current_archive()
    result = compress_stored(archive.store, archive.database, older_than_days=days,
                             syntax=settings["ARCHIVE_COMPRESS_SYNTAX"])
    log.info("archive compress: %d instances re-encoded, %d bytes saved", result.done,
             result.saved)
    return result.done
