"""Where the archive keeps each instance's bytes."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Integer, String, func
from sqlalchemy.orm import Mapped, mapped_column

from portal.db import Base, UTCDateTime


class StoredObject(Base):
    """The stored file of one SOP instance: server-generated key, size and SHA-256."""

    __tablename__ = "stored_object"

    id: Mapped[int] = mapped_column(primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    storage_key: Mapped[str] = mapped_column(String(128), unique=True)
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    original_sha256: Mapped[str] = mapped_column(String(64), index=True)
    stored_at: Mapped[datetime] = mapped_column(UTCDateTime,
                                                server_default=func.now())


class ExternalInstance(Base):
    """An instance the index knows from an external archive (DICOMweb): where to fetch it.

    Its index rows exist from the sync; its bytes are local only while a ``CachedCopy`` of it
    exists.
    """

    __tablename__ = "external_instance"

    id: Mapped[int] = mapped_column(primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64))
    synced_at: Mapped[datetime] = mapped_column(UTCDateTime, server_default=func.now())


class CachedCopy(Base):
    """A stored object that is only a cached copy of an external instance (evictable, LRU).

    Instances ingested directly have no row here and are never evicted.
    """

    __tablename__ = "cached_copy"

    id: Mapped[int] = mapped_column(primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    size: Mapped[int] = mapped_column(BigInteger)
    fetched_at: Mapped[datetime] = mapped_column(UTCDateTime, server_default=func.now())
    last_used_at: Mapped[datetime] = mapped_column(UTCDateTime, server_default=func.now(),
                                                   index=True)


class SyncState(Base):
    """Progress of the index sync from one external archive, so an interrupted run resumes.

    ``next_offset`` is set while a run is in progress (the QIDO-RS offset after the last page
    whose studies are all committed) and cleared when the run completes.
    """

    __tablename__ = "archive_sync_state"

    id: Mapped[int] = mapped_column(primary_key=True)
    source: Mapped[str] = mapped_column(String(256), unique=True)
    run_since: Mapped[str] = mapped_column(String(8), default="")
    next_offset: Mapped[int | None] = mapped_column(Integer, nullable=True)
    run_started_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    studies_synced: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str] = mapped_column(String(256), default="")
