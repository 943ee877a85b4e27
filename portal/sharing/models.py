"""Share links, the studies each one opens, and the short sessions they are exchanged for."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from sqlalchemy import JSON, BigInteger, Boolean, ForeignKey, Integer, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column, relationship

from portal.db import Base, UTCDateTime, utcnow


class ShareLink(Base):
    """A capability URL for a set of studies: only the SHA-256 of its token is stored."""

    __tablename__ = "share_link"

    id: Mapped[int] = mapped_column(primary_key=True)
    # The public name of the link in management pages, audit records and share sessions.
    public_id: Mapped[str] = mapped_column(String(36), unique=True)
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    audience: Mapped[str] = mapped_column(String(16), default="patient")
    # A colleague link may ask its visitor to sign in; the visitor then gets a grant.
    requires_sign_in: Mapped[bool] = mapped_column(Boolean, default=False)
    can_download: Mapped[bool] = mapped_column(Boolean, default=False)
    note: Mapped[str] = mapped_column(String(500), default="")
    # A note for the person the link is made for, shown with the images (issue 20 item 5).
    message: Mapped[str] = mapped_column(String(1000), default="", server_default="")
    # The language of every message about the link and of its visitor's pages (a code of
    # portal.i18n.SUPPORTED; '' for links made before it was kept: the sender's language).
    language: Mapped[str] = mapped_column(String(16), default="", server_default="")
    patient_fk: Mapped[int | None] = mapped_column(ForeignKey("patient.id"), nullable=True,
                                                   index=True)
    created_by: Mapped[str] = mapped_column(String(256), default="")
    created_by_fk: Mapped[int | None] = mapped_column(ForeignKey("portal_user.id"),
                                                      nullable=True, index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    not_before: Mapped[datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    revoked_by: Mapped[str] = mapped_column(String(256), default="")
    # "scrypt$n$r$p$salt$hash" of HMAC(pepper, PIN); empty when the link has no PIN.
    pin_hash: Mapped[str] = mapped_column(String(256), default="")
    failed_attempts: Mapped[int] = mapped_column(Integer, default=0)
    locked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    use_count: Mapped[int] = mapped_column(Integer, default=0)
    first_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    notify_sender: Mapped[bool] = mapped_column(Boolean, default=False)
    # Channels the link or PIN went out by: [{"what", "channel", "to_sha256", "at"}].
    deliveries: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)

    studies: Mapped[list[ShareLinkStudy]] = relationship(
        back_populates="link", cascade="all, delete-orphan", order_by="ShareLinkStudy.id")


class ShareLinkStudy(Base):
    """One study a share link opens (fixed when the link is made: a link never widens)."""

    __tablename__ = "share_link_study"
    __table_args__ = (UniqueConstraint("share_fk", "study_instance_uid"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    share_fk: Mapped[int] = mapped_column(ForeignKey("share_link.id"), index=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    # Series Instance UIDs the link opens in this study; empty: the whole study.
    series_uids: Mapped[list[str]] = mapped_column(JSON, default=list)

    link: Mapped[ShareLink] = relationship(back_populates="studies")


class ShareSession(Base):
    """What a link is exchanged for: a short session named by the SHA-256 of its cookie."""

    __tablename__ = "share_session"

    id: Mapped[int] = mapped_column(primary_key=True)
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    share_fk: Mapped[int] = mapped_column(ForeignKey("share_link.id"), index=True)
    # "view": the visitor sees the studies; "claim": a colleague link waiting for sign-in.
    purpose: Mapped[str] = mapped_column(String(8), default="view")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    last_seen_at: Mapped[datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    source_address: Mapped[str] = mapped_column(String(64), default="")
    device_class: Mapped[str] = mapped_column(String(16), default="")


class RateLimitCount(Base):
    """Hits of one rate-limit key in one fixed window, where every worker and node sees them
    (when there is no Redis, or while it is down; docs/security.md 51)."""

    __tablename__ = "rate_limit_count"

    # The limit's key and its window length, e.g. "share-exchange:192.0.2.7/600".
    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    # Start of the window, in seconds since the epoch (a multiple of the window length).
    window_start: Mapped[int] = mapped_column(BigInteger, primary_key=True, index=True)
    hits: Mapped[int] = mapped_column(Integer, default=0)


LinkState = Literal["active", "pending", "expired", "revoked", "locked"]


def link_state(link: ShareLink, now: datetime | None = None) -> LinkState:
    """active, pending (before ``not_before``), expired, revoked or locked."""
    now = now or utcnow()
    if link.revoked_at is not None:
        return "revoked"
    if link.locked_at is not None:
        return "locked"
    if link.expires_at <= now:
        return "expired"
    if link.not_before > now:
        return "pending"
    return "active"
