"""Upload links, the sessions they are exchanged for, uploaded files and quarantined studies.

Nothing here is part of the archive's index: a quarantined study is invisible to every access
rule until an office manager accepts it (docs/inbox.md).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from sqlalchemy import JSON, BigInteger, ForeignKey, Integer, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column, relationship

from portal.db import Base, UTCDateTime, utcnow


class UploadLink(Base):
    """A capability URL through which a patient uploads images into a practice's inbox.

    Tokens and PINs are made and kept as share links' are (``portal.sharing.tokens``): only
    the SHA-256 of the token and the peppered scrypt of the PIN are stored. It never opens a
    view of anything."""

    __tablename__ = "inbox_upload_link"

    id: Mapped[int] = mapped_column(primary_key=True)
    public_id: Mapped[str] = mapped_column(String(36), unique=True)
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    practice_fk: Mapped[int] = mapped_column(ForeignKey("practice.id"), index=True)
    # Whom the link was made for, as the sender wrote it (a name, never shown to visitors).
    for_whom: Mapped[str] = mapped_column(String(200), default="")
    created_by: Mapped[str] = mapped_column(String(256), default="")
    created_by_fk: Mapped[int | None] = mapped_column(ForeignKey("portal_user.id"),
                                                      nullable=True, index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    revoked_by: Mapped[str] = mapped_column(String(256), default="")
    pin_hash: Mapped[str] = mapped_column(String(256), default="")
    failed_attempts: Mapped[int] = mapped_column(Integer, default=0)
    locked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    use_count: Mapped[int] = mapped_column(Integer, default=0)


class UploadSession(Base):
    """What an upload link is exchanged for: a short session named by its cookie's SHA-256."""

    __tablename__ = "inbox_upload_session"

    id: Mapped[int] = mapped_column(primary_key=True)
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    link_fk: Mapped[int] = mapped_column(ForeignKey("inbox_upload_link.id"), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)

    link: Mapped[UploadLink] = relationship()


class InboxFile(Base):
    """One file being uploaded in chunks (a DICOM file, a DICOMDIR, a ZIP), and what became
    of it."""

    __tablename__ = "inbox_file"

    id: Mapped[int] = mapped_column(primary_key=True)
    public_id: Mapped[str] = mapped_column(String(36), unique=True)
    practice_fk: Mapped[int] = mapped_column(ForeignKey("practice.id"), index=True)
    link_fk: Mapped[int | None] = mapped_column(ForeignKey("inbox_upload_link.id"),
                                                nullable=True, index=True)
    uploaded_by: Mapped[str] = mapped_column(String(256), default="")
    name: Mapped[str] = mapped_column(String(500), default="")
    size: Mapped[int] = mapped_column(BigInteger, default=0)
    received: Mapped[int] = mapped_column(BigInteger, default=0)
    # receiving, done (every result is in ``results``), abandoned (never finished in time)
    state: Mapped[str] = mapped_column(String(16), default="receiving")
    # [{"name", "outcome": "kept"|"refused"|"skipped", "reason"}]
    results: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


StudyState = Literal["waiting", "accepted", "rejected"]


class InboxStudy(Base):
    """A study waiting in a practice's inbox (quarantine), with what its files say."""

    __tablename__ = "inbox_study"

    id: Mapped[int] = mapped_column(primary_key=True)
    public_id: Mapped[str] = mapped_column(String(36), unique=True)
    practice_fk: Mapped[int] = mapped_column(ForeignKey("practice.id"), index=True)
    link_fk: Mapped[int | None] = mapped_column(ForeignKey("inbox_upload_link.id"),
                                                nullable=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    patient_name: Mapped[str] = mapped_column(String(324), default="")
    patient_id: Mapped[str] = mapped_column(String(64), default="")
    issuer_of_patient_id: Mapped[str] = mapped_column(String(64), default="")
    patient_birth_date: Mapped[str] = mapped_column(String(8), default="")
    patient_sex: Mapped[str] = mapped_column(String(16), default="")
    accession_number: Mapped[str] = mapped_column(String(64), default="")
    study_date: Mapped[str] = mapped_column(String(8), default="")
    study_description: Mapped[str] = mapped_column(String(200), default="")
    modalities: Mapped[str] = mapped_column(String(64), default="")
    uploaded_by: Mapped[str] = mapped_column(String(256), default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    state: Mapped[str] = mapped_column(String(16), default="waiting", index=True)
    decided_by: Mapped[str] = mapped_column(String(256), default="")
    decided_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    local_patient_id: Mapped[str] = mapped_column(String(64), default="")
    local_accession_number: Mapped[str] = mapped_column(String(64), default="")

    instances: Mapped[list[InboxInstance]] = relationship(
        back_populates="study", cascade="all, delete-orphan", order_by="InboxInstance.id")


class InboxInstance(Base):
    """One quarantined file of a waiting study: kept under ``instance/inbox/``, apart from the
    archive, by its SHA-256."""

    __tablename__ = "inbox_instance"
    __table_args__ = (UniqueConstraint("study_fk", "sop_instance_uid"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    study_fk: Mapped[int] = mapped_column(ForeignKey("inbox_study.id"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    series_instance_uid: Mapped[str] = mapped_column(String(64), default="")
    sha256: Mapped[str] = mapped_column(String(64))
    label: Mapped[str] = mapped_column(String(500), default="")

    study: Mapped[InboxStudy] = relationship(back_populates="instances")
