"""Where the archive keeps each instance's bytes."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, String, func
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
