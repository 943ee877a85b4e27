"""Radiology reports with their versions, orders and appointments, and patient release rules.

A report or an order names its study by Study Instance UID when the sender knows it, else by
accession number and patient ID; it is matched to the index when it is read, so one that
arrives before its images is kept unmatched and found as soon as the study is there.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ForeignKey, Integer, LargeBinary, String, Text, UniqueConstraint, func
from sqlalchemy.orm import Mapped, mapped_column, relationship

from portal.db import Base, UTCDateTime

REPORT_STATUSES = ("preliminary", "final", "amended", "cancelled")
ORDER_STATUSES = ("ordered", "scheduled", "performed", "reported", "cancelled")


class Report(Base):
    """The current state of one report; every received version is kept in ReportVersion."""

    __tablename__ = "report"
    __table_args__ = (UniqueConstraint("source", "source_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    source: Mapped[str] = mapped_column(String(8))  # hl7 | fhir | sr | pdf
    source_id: Mapped[str] = mapped_column(String(128))  # filler order no., FHIR id, SOP UID
    study_instance_uid: Mapped[str] = mapped_column(String(64), default="", index=True)
    accession_number: Mapped[str] = mapped_column(String(64), default="", index=True)
    patient_id: Mapped[str] = mapped_column(String(64), default="")
    # The patient's language as the sender gives it (HL7 PID-15, ISO 639-1; '' = not given):
    # what a share link for the patient is written in, unless his own account chose one.
    patient_language: Mapped[str] = mapped_column(String(16), default="", server_default="")
    status: Mapped[str] = mapped_column(String(16))
    title: Mapped[str] = mapped_column(String(128), default="")
    findings: Mapped[str] = mapped_column(Text, default="")
    impression: Mapped[str] = mapped_column(Text, default="")
    author: Mapped[str] = mapped_column(String(324), default="")
    signed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    final_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # When the sender says the current version was made (HL7 OBR-22 or MSH-7, FHIR issued):
    # a version made earlier never replaces it, however late it arrives.
    observed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # The clinically relevant time the sender names (HL7 OBR-7 observation date/time, FHIR
    # effectiveDateTime or effectivePeriod.start): FHIR's effectiveDateTime when known.
    clinical_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    version: Mapped[int] = mapped_column(Integer, default=1)
    pdf: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    notified_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, server_default=func.now())

    versions: Mapped[list[ReportVersion]] = relationship(
        back_populates="report", order_by="ReportVersion.version")


class ReportVersion(Base):
    """One received version of a report, never changed afterwards."""

    __tablename__ = "report_version"
    __table_args__ = (UniqueConstraint("report_fk", "version"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    report_fk: Mapped[int] = mapped_column(ForeignKey("report.id"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16))
    findings: Mapped[str] = mapped_column(Text, default="")
    impression: Mapped[str] = mapped_column(Text, default="")
    author: Mapped[str] = mapped_column(String(324), default="")
    signed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    observed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    clinical_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # The message that brought this version (HL7 MSH-10), to trace it back to the sender.
    message_id: Mapped[str] = mapped_column(String(64), default="")
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, server_default=func.now())

    report: Mapped[Report] = relationship(back_populates="versions")


class ReceivedMessage(Base):
    """An HL7 message that was stored, by sender, control ID (MSH-10) and content, so that a
    retransmission is acknowledged again without being applied a second time."""

    __tablename__ = "hl7_received_message"
    __table_args__ = (UniqueConstraint("sender", "control_id", "digest"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    sender: Mapped[str] = mapped_column(String(64))  # MSH-3, upper case
    control_id: Mapped[str] = mapped_column(String(64))
    # SHA-256 of the message with MSH-7 blanked: a resend may carry a new send time, while
    # another message under a reused control ID (a counter reset) is not taken for a resend.
    digest: Mapped[str] = mapped_column(String(64))
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, server_default=func.now())


class ReleaseRule(Base):
    """How long after a report is final a patient may read it, for a practice and/or a
    modality (empty: any); the longest matching rule and PORTAL_REPORT_PATIENT_DELAY_HOURS
    apply."""

    __tablename__ = "report_release_rule"
    __table_args__ = (UniqueConstraint("practice_fk", "modality"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    practice_fk: Mapped[int | None] = mapped_column(ForeignKey("practice.id"), nullable=True)
    modality: Mapped[str] = mapped_column(String(16), default="")
    delay_hours: Mapped[int] = mapped_column(Integer)


class ReportRead(Base):
    """A person has read a report up to a version (for "new report" badges and filters)."""

    __tablename__ = "report_read"
    __table_args__ = (UniqueConstraint("user_fk", "report_fk"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    user_fk: Mapped[int] = mapped_column(ForeignKey("portal_user.id"), index=True)
    report_fk: Mapped[int] = mapped_column(ForeignKey("report.id"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    read_at: Mapped[datetime] = mapped_column(UTCDateTime, server_default=func.now())
