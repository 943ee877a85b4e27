"""Principals that are not people yet, and the audit trail."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Boolean, DateTime, String, func
from sqlalchemy.orm import Mapped, mapped_column

from portal.db import Base


class MachineClient(Base):
    """A modality, script or archive that authenticates to /dicomweb with HTTP Basic."""

    __tablename__ = "machine_client"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    secret_sha256: Mapped[str] = mapped_column(String(64))
    can_store: Mapped[bool] = mapped_column(Boolean, default=True)
    can_read: Mapped[bool] = mapped_column(Boolean, default=False)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True),
                                                 server_default=func.now())


class AuditEvent(Base):
    """One audit record with DICOM PS3.15 A.5 semantics (event id, action, outcome)."""

    __tablename__ = "audit_event"

    id: Mapped[int] = mapped_column(primary_key=True)
    occurred_at: Mapped[datetime] = mapped_column(DateTime(timezone=True),
                                                  server_default=func.now(), index=True)
    event_id: Mapped[str] = mapped_column(String(16))
    event_name: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(1))
    outcome: Mapped[int] = mapped_column(default=0)
    who: Mapped[str] = mapped_column(String(256), default="")
    source_address: Mapped[str] = mapped_column(String(64), default="")
    study_instance_uid: Mapped[str] = mapped_column(String(64), default="", index=True)
    patient_id: Mapped[str] = mapped_column(String(64), default="")
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
