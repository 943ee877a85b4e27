"""Index rows: what exists in the archive, never who may see it."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Connection,
    ForeignKey,
    Index,
    Integer,
    String,
    UniqueConstraint,
    event,
    func,
    inspect,
    update,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship, validates

from portal.db import Base, UTCDateTime
from portal.index.names import MATCH_LENGTH, SEARCH_LENGTH, name_match_text, name_search_text

# New rows go straight into the trigram indexes: GIN's pending list ("fastupdate") would
# make every search scan the unsorted backlog until autovacuum merges it.
TRIGRAM_INDEX_OPTIONS = {"fastupdate": "off"}


class Patient(Base):
    """A patient as identified by the archive: Patient ID within its issuer."""

    __tablename__ = "patient"
    __table_args__ = (UniqueConstraint("patient_id", "issuer_of_patient_id"),
                      # The study search's "contains" and word-start matches: trigram
                      # indexes on PostgreSQL (pg_trgm); plain, unused B-trees on SQLite.
                      Index("ix_patient_patient_id_trgm", "patient_id", postgresql_using="gin",
                            postgresql_ops={"patient_id": "gin_trgm_ops"},
                            postgresql_with=TRIGRAM_INDEX_OPTIONS),
                      Index("ix_patient_name_search_trgm", "name_search",
                            postgresql_using="gin",
                            postgresql_ops={"name_search": "gin_trgm_ops"},
                            postgresql_with=TRIGRAM_INDEX_OPTIONS),
                      # QIDO-RS and C-FIND name matches: any component group, anywhere.
                      Index("ix_patient_name_match_trgm", "name_match",
                            postgresql_using="gin",
                            postgresql_ops={"name_match": "gin_trgm_ops"},
                            postgresql_with=TRIGRAM_INDEX_OPTIONS))

    id: Mapped[int] = mapped_column(primary_key=True)
    patient_id: Mapped[str] = mapped_column(String(64))
    issuer_of_patient_id: Mapped[str] = mapped_column(String(64), default="")
    patient_name: Mapped[str] = mapped_column(String(324), default="", index=True)
    patient_birth_date: Mapped[str] = mapped_column(String(8), default="")
    patient_sex: Mapped[str] = mapped_column(String(16), default="")
    # The name's words folded for search (see names.name_search_text), kept with the name.
    name_search: Mapped[str] = mapped_column(String(SEARCH_LENGTH), default="")
    # Each component group folded, between "=" (see names.name_match_text): PN matching.
    name_match: Mapped[str] = mapped_column(String(MATCH_LENGTH), default="")

    studies: Mapped[list[Study]] = relationship(back_populates="patient")

    @validates("patient_name")
    def _keep_name_search(self, _key: str, value: str) -> str:
        """Whoever sets the name also sets what the study search matches."""
        self.name_search = name_search_text(value)
        self.name_match = name_match_text(value)
        return value


class Study(Base):
    """One imaging study with what a study list needs."""

    __tablename__ = "study"
    __table_args__ = (Index("ix_study_accession_number_trgm", "accession_number",
                            postgresql_using="gin",
                            postgresql_ops={"accession_number": "gin_trgm_ops"},
                            postgresql_with=TRIGRAM_INDEX_OPTIONS),
                      # Lists and QIDO answers are newest first: pages come off this index.
                      Index("ix_study_date_time_id", "study_date", "study_time", "id"),
                      # A person's visible studies (the access rules give their ids) are
                      # sorted, and joined to their patients, from this index alone: one
                      # index page per study instead of the index and the table's row.
                      Index("ix_study_id_date_time_patient", "id", "study_date", "study_time",
                            "patient_fk"))

    id: Mapped[int] = mapped_column(primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    patient_fk: Mapped[int] = mapped_column(ForeignKey("patient.id"), index=True)
    study_date: Mapped[str] = mapped_column(String(8), default="", index=True)
    study_time: Mapped[str] = mapped_column(String(16), default="")
    study_id: Mapped[str] = mapped_column(String(16), default="")
    study_description: Mapped[str] = mapped_column(String(64), default="")
    accession_number: Mapped[str] = mapped_column(String(64), default="", index=True)
    modalities_in_study: Mapped[str] = mapped_column(String(128), default="")
    referring_physician_name: Mapped[str] = mapped_column(String(324), default="")
    institution_name: Mapped[str] = mapped_column(String(64), default="")
    number_of_series: Mapped[int] = mapped_column(Integer, default=0)
    number_of_instances: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime,
                                                 server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime,
                                                 server_default=func.now(), index=True)

    patient: Mapped[Patient] = relationship(back_populates="studies")
    series: Mapped[list[Series]] = relationship(back_populates="study")


class Series(Base):
    """One series of a study."""

    __tablename__ = "series"
    # A study's series, and whether a visible study has a series of a modality (the study
    # list's and QIDO's modality match), from this index alone.
    __table_args__ = (Index("ix_series_study_fk_modality", "study_fk", "modality"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    study_fk: Mapped[int] = mapped_column(ForeignKey("study.id"))
    modality: Mapped[str] = mapped_column(String(16), default="")
    series_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    series_description: Mapped[str] = mapped_column(String(64), default="")
    body_part_examined: Mapped[str] = mapped_column(String(16), default="")
    series_date: Mapped[str] = mapped_column(String(8), default="")
    number_of_instances: Mapped[int] = mapped_column(Integer, default=0)

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")


class Instance(Base):
    """One SOP instance with its geometry and its header as DICOM JSON (no bulk data)."""

    __tablename__ = "instance"

    id: Mapped[int] = mapped_column(primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    series_fk: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    instance_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    number_of_frames: Mapped[int] = mapped_column(Integer, default=1)
    rows: Mapped[int | None] = mapped_column(Integer, nullable=True)
    columns: Mapped[int | None] = mapped_column(Integer, nullable=True)
    samples_per_pixel: Mapped[int | None] = mapped_column(Integer, nullable=True)
    bits_allocated: Mapped[int | None] = mapped_column(Integer, nullable=True)
    photometric_interpretation: Mapped[str] = mapped_column(String(16), default="")
    image_position_patient: Mapped[list[float] | None] = mapped_column(JSON, nullable=True)
    image_orientation_patient: Mapped[list[float] | None] = mapped_column(JSON, nullable=True)
    pixel_spacing: Mapped[list[float] | None] = mapped_column(JSON, nullable=True)
    slice_thickness: Mapped[float | None] = mapped_column(nullable=True)
    # DICOM JSON of the header, made on first use (metadata, includefield): converting every
    # element at ingest would cost more than storing the instance itself.
    header: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime,
                                                 server_default=func.now())

    series: Mapped[Series] = relationship(back_populates="instances")


class StudyReferrer(Base):
    """A normalised key under which a study names its referring physician (see referrer_keys)."""

    __tablename__ = "study_referrer"
    # (key, date, time, study_fk): the access rules find a physician's studies by his keys
    # from the index alone (an index-only scan), and his list's newest page comes off it in
    # order, key by key, without reading his other studies (see ``KEEPS_STUDY_DATE``).
    __table_args__ = (UniqueConstraint("study_fk", "key"),
                      Index("ix_study_referrer_key_date", "key", "study_date", "study_time",
                            "study_fk"))

    id: Mapped[int] = mapped_column(primary_key=True)
    study_fk: Mapped[int] = mapped_column(ForeignKey("study.id"), index=True)
    key: Mapped[str] = mapped_column(String(400))
    # The study's date and time, kept beside the key (a copy of the study's own).
    study_date: Mapped[str] = mapped_column(String(8), default="", server_default="")
    study_time: Mapped[str] = mapped_column(String(16), default="", server_default="")


class Order(Base):
    """An imaging order from the RIS: ordered -> scheduled -> performed -> reported.

    Kept with the index (what exists or is expected to), not with ``reports`` that receives
    it: the access policy reads it (an order opens its study to the physician who placed
    it) and access imports no domain (docs/architecture.md "What may import what")."""

    __tablename__ = "imaging_order"

    id: Mapped[int] = mapped_column(primary_key=True)
    placer_order_number: Mapped[str] = mapped_column(String(64), default="")
    filler_order_number: Mapped[str] = mapped_column(String(64), default="", index=True)
    accession_number: Mapped[str] = mapped_column(String(64), default="", index=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), default="", index=True)
    patient_id: Mapped[str] = mapped_column(String(64), default="", index=True)
    patient_name: Mapped[str] = mapped_column(String(324), default="")
    # The patient's language from the RIS (HL7 PID-15, ISO 639-1; '' = not given).
    patient_language: Mapped[str] = mapped_column(String(16), default="", server_default="")
    procedure: Mapped[str] = mapped_column(String(128), default="")
    modality: Mapped[str] = mapped_column(String(16), default="")
    ordering_provider: Mapped[str] = mapped_column(String(324), default="")
    # The referrer-matching key of the ordering provider (portal.index.referrers), so the
    # access policy can match the order's study to the physician who asked for it.
    ordering_provider_key: Mapped[str] = mapped_column(String(128), default="", index=True)
    status: Mapped[str] = mapped_column(String(16), default="ordered")
    scheduled_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    location: Mapped[str] = mapped_column(String(128), default="")
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, server_default=func.now())


class OrderStudy(Base):
    """A study an order names (same accession number, same Patient ID), resolved once when
    the order or the study arrives (``index.service.resolve_order``, ``_get_study``), with
    the order's ordering-provider key: one more referrer key of the study. The access rules
    find a physician's ordered studies from the (key, study_fk) index alone instead of
    joining orders, patients and studies on every request (benchmarks/README.md, "The index
    at 1,000,000 studies"). A cancelled order, or one without an ordering provider, has none.
    """

    __tablename__ = "order_study"
    __table_args__ = (Index("ix_order_study_key_date", "key", "study_date", "study_time",
                            "study_fk"),)

    order_fk: Mapped[int] = mapped_column(ForeignKey("imaging_order.id"), primary_key=True)
    study_fk: Mapped[int] = mapped_column(ForeignKey("study.id"), primary_key=True,
                                          index=True)
    key: Mapped[str] = mapped_column(String(128))
    # The study's date and time, kept beside the key (a copy of the study's own).
    study_date: Mapped[str] = mapped_column(String(8), default="", server_default="")
    study_time: Mapped[str] = mapped_column(String(16), default="", server_default="")


# The access keys that keep a copy of their study's (date, time): a person's list pages come
# off their (key, date, time, study_fk) indexes in the list's order, a few index entries per
# key instead of every visible study sorted (benchmarks/README.md, "The index at 1,000,000
# studies"). A study's date is written when it is first indexed; if it is ever corrected
# through the ORM, the copies follow in the same flush (``_study_date_copies``).
KEEPS_STUDY_DATE: tuple[type[StudyReferrer] | type[OrderStudy], ...] = (StudyReferrer, OrderStudy)


@event.listens_for(Study, "after_update")
def _study_date_copies(_mapper: Any, connection: Connection, study: Study) -> None:
    """A study whose date or time changed: its access keys' copies change with it."""
    state = inspect(study)
    if not (state.attrs.study_date.history.has_changes()
            or state.attrs.study_time.history.has_changes()):
        return
    for keys in KEEPS_STUDY_DATE:
        connection.execute(update(keys).where(keys.study_fk == study.id).values(
            study_date=study.study_date, study_time=study.study_time))
