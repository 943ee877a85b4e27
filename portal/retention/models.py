"""Retention rules, legal holds and the list of studies due (with their approval)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ForeignKey, Integer, String, func
from sqlalchemy.orm import Mapped, mapped_column

from portal.db import Base, UTCDateTime
from portal.i18n import N_

# What a rule counts its years from: the patient's newest study, or the study itself.
BASES = {"last_study": N_("the patient's last study"), "study": N_("the study")}


class RetentionRule(Base):
    """How long a practice keeps its studies of one modality (or of every modality)."""

    __tablename__ = "retention_rule"

    id: Mapped[int] = mapped_column(primary_key=True)
    practice_fk: Mapped[int] = mapped_column(ForeignKey("practice.id"), index=True)
    modality: Mapped[str] = mapped_column(String(16), default="")  # "": every modality
    keep_years: Mapped[int] = mapped_column(Integer)
    basis: Mapped[str] = mapped_column(String(16), default="last_study")
    # Studies made before the patient's 18th birthday stay at least until this birthday.
    minors_until_age: Mapped[int | None] = mapped_column(Integer, nullable=True)
    changed_by: Mapped[str] = mapped_column(String(256), default="")
    changed_at: Mapped[datetime] = mapped_column(UTCDateTime, server_default=func.now())


class LegalHold(Base):
    """A patient whose studies are kept whatever the rules say, until it is released."""

    __tablename__ = "legal_hold"

    id: Mapped[int] = mapped_column(primary_key=True)
    patient_fk: Mapped[int] = mapped_column(ForeignKey("patient.id"), index=True)
    reason: Mapped[str] = mapped_column(String(500), default="")
    placed_by: Mapped[str] = mapped_column(String(256), default="")
    placed_at: Mapped[datetime] = mapped_column(UTCDateTime, server_default=func.now())
    released_by: Mapped[str] = mapped_column(String(256), default="")
    released_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class RetentionDue(Base):
    """A study the rules no longer keep: listed by the daily run, deleted once approved."""

    __tablename__ = "retention_due"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    kept_until: Mapped[str] = mapped_column(String(8))  # YYYYMMDD, the day it became due
    listed_at: Mapped[datetime] = mapped_column(UTCDateTime, server_default=func.now())
    approved_by: Mapped[str] = mapped_column(String(256), default="")
    approved_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
