"""Who may see what: people, practices, referrer identifiers, grants, and the audit trail."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Boolean, ForeignKey, Integer, String, UniqueConstraint, func
from sqlalchemy.orm import Mapped, mapped_column, relationship

from portal.db import Base, UTCDateTime


class MachineClient(Base):
    """A modality, script or archive that authenticates to /dicomweb with HTTP Basic."""

    __tablename__ = "machine_client"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    secret_sha256: Mapped[str] = mapped_column(String(64))
    can_store: Mapped[bool] = mapped_column(Boolean, default=True)
    can_read: Mapped[bool] = mapped_column(Boolean, default=False)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime,
                                                 server_default=func.now())


class AuditEvent(Base):
    """One audit record with DICOM PS3.15 A.5 semantics (event id, action, outcome)."""

    __tablename__ = "audit_event"

    id: Mapped[int] = mapped_column(primary_key=True)
    occurred_at: Mapped[datetime] = mapped_column(UTCDateTime,
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
    # Tamper evidence: each record's hash covers its content and the previous record's hash.
    # Writers leave these empty; the one sealer (portal/audit.py) sets them and ``seq``, the
    # record's place in the chain (1, 2, ...; NULL until sealed), in the order it seals.
    previous_hash: Mapped[str] = mapped_column(String(64), default="")
    record_hash: Mapped[str] = mapped_column(String(64), default="")
    seq: Mapped[int | None] = mapped_column(Integer, nullable=True, unique=True, index=True)


class Practice(Base):
    """A referring practice: its office managers see what its physicians may see."""

    __tablename__ = "practice"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)


class User(Base):
    """A person, keyed by (issuer, subject) from the identity provider, never by e-mail."""

    __tablename__ = "portal_user"
    __table_args__ = (UniqueConstraint("issuer", "subject"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    issuer: Mapped[str] = mapped_column(String(256))
    subject: Mapped[str] = mapped_column(String(256))
    email: Mapped[str] = mapped_column(String(256), default="", index=True)
    display_name: Mapped[str] = mapped_column(String(256), default="")
    roles: Mapped[list[str]] = mapped_column(JSON, default=list)
    # The roles the identity provider asserted at the last sign-in (a subset of ``roles``): the
    # ones it takes away again by no longer asserting them.
    idp_roles: Mapped[list[str]] = mapped_column(JSON, default=list)
    practice_fk: Mapped[int | None] = mapped_column(ForeignKey("practice.id"), nullable=True)
    # A mobile number for notices, in international form (``notify.clean_phone``): from the
    # provider's verified ``phone_number`` claim at sign-in, or set by an office manager.
    phone_number: Mapped[str] = mapped_column(String(32), default="")
    # "Report ready" notices also by text message (SMS webhook); off unless chosen.
    notify_by_sms: Mapped[bool] = mapped_column(Boolean, default=False)
    # The language chosen with the switch (portal/i18n.py): pages and notices; '' = browser's.
    language: Mapped[str] = mapped_column(String(16), default="", server_default="")
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    # Bumped on deactivation and role changes: sessions made before it are dead.
    security_epoch: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime,
                                                 server_default=func.now())
    last_login_at: Mapped[datetime | None] = mapped_column(UTCDateTime,
                                                           nullable=True)

    practice: Mapped[Practice | None] = relationship()


class ReferrerIdentifier(Base):
    """An identifier under which studies name a physician as referrer (NPI, ID, name)."""

    __tablename__ = "referrer_identifier"
    __table_args__ = (UniqueConstraint("key"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    user_fk: Mapped[int] = mapped_column(ForeignKey("portal_user.id"), index=True)
    key: Mapped[str] = mapped_column(String(400))
    created_by: Mapped[str] = mapped_column(String(256), default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime,
                                                 server_default=func.now())


class Grant(Base):
    """Access to one study or to every study of one patient, optionally until a time."""

    __tablename__ = "access_grant"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_fk: Mapped[int] = mapped_column(ForeignKey("portal_user.id"), index=True)
    study_instance_uid: Mapped[str | None] = mapped_column(String(64), nullable=True,
                                                           index=True)
    patient_fk: Mapped[int | None] = mapped_column(ForeignKey("patient.id"), nullable=True,
                                                   index=True)
    reason: Mapped[str] = mapped_column(String(1000), default="")
    break_glass: Mapped[bool] = mapped_column(Boolean, default=False)
    granted_by: Mapped[str] = mapped_column(String(256), default="")
    # A grant of every study of a patient by a practice's manager covers that practice's
    # studies of the patient only (its physicians referred or ordered them); None: all.
    practice_fk: Mapped[int | None] = mapped_column(ForeignKey("practice.id"), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime,
                                                 server_default=func.now())
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime,
                                                        nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime,
                                                        nullable=True)
    revoked_by: Mapped[str] = mapped_column(String(256), default="")


class Delegation(Base):
    """A physician lets a colleague of the same practice see what he may see."""

    __tablename__ = "delegation"
    __table_args__ = (UniqueConstraint("from_user_fk", "to_user_fk"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    from_user_fk: Mapped[int] = mapped_column(ForeignKey("portal_user.id"), index=True)
    to_user_fk: Mapped[int] = mapped_column(ForeignKey("portal_user.id"), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime,
                                                 server_default=func.now())


class PatientLink(Base):
    """A patient account linked by an office manager to a patient record of the archive."""

    __tablename__ = "patient_link"
    __table_args__ = (UniqueConstraint("user_fk", "patient_fk"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    user_fk: Mapped[int] = mapped_column(ForeignKey("portal_user.id"), index=True)
    patient_fk: Mapped[int] = mapped_column(ForeignKey("patient.id"), index=True)


class AuditHead(Base):
    """The sealed end of the audit chain (one row, locked by the sealer while it seals):
    the newest sealed record's hash and how many records are sealed."""

    __tablename__ = "audit_head"

    id: Mapped[int] = mapped_column(primary_key=True)
    last_hash: Mapped[str] = mapped_column(String(64), default="")
    count: Mapped[int] = mapped_column(Integer, default=0)


class AuditForward(Base):
    """How far the audit trail has been sent to the separate repository (one row)."""

    __tablename__ = "audit_forward"

    id: Mapped[int] = mapped_column(primary_key=True)
    last_id: Mapped[int] = mapped_column(Integer, default=0)
    # The chain position (AuditEvent.seq) sent last: records are sent in chain order.
    last_seq: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    forwarded_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class Invitation(Base):
    """A one-time link an office manager sends; whoever signs in through it gets its roles."""

    __tablename__ = "invitation"

    id: Mapped[int] = mapped_column(primary_key=True)
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    email: Mapped[str] = mapped_column(String(256), default="")
    roles: Mapped[list[str]] = mapped_column(JSON, default=list)
    practice_fk: Mapped[int | None] = mapped_column(ForeignKey("practice.id"), nullable=True)
    # Referrer identifier keys (normalised) linked to whoever redeems it (a new physician).
    referrer_keys: Mapped[list[str]] = mapped_column(JSON, default=list)
    created_by: Mapped[str] = mapped_column(String(256), default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    used_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    used_by_fk: Mapped[int | None] = mapped_column(ForeignKey("portal_user.id"), nullable=True)
