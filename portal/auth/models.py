"""Server-side sessions: the cookie carries only a random id; everything else lives here."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, ForeignKey, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from portal.db import Base, UTCDateTime


class UserSession(Base):
    """One browser session; found by the SHA-256 of its cookie value."""

    __tablename__ = "user_session"

    id: Mapped[int] = mapped_column(primary_key=True)
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    data: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    user_fk: Mapped[int | None] = mapped_column(ForeignKey("portal_user.id"), nullable=True,
                                                index=True)
    security_epoch: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    last_seen_at: Mapped[datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    auth_time: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    source_address: Mapped[str] = mapped_column(String(64), default="")
