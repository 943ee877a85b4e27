"""Who saved which measurements (issue 20 item 4; portal/studies/measurements.py)."""

from __future__ import annotations

from sqlalchemy import ForeignKey
from sqlalchemy.orm import Mapped, mapped_column

from portal.db import Base


class SavedMeasurements(Base):
    """The author of a presentation state saved in the portal: the viewer shows its
    measurements to him and to the visitors of the links he made (docs/features.md), never
    by the Content Creator's Name of the object, which anyone could write and many share.

    The row goes with its instance (retention deletes the rows that refer to the study's
    instances) and with its author.
    """

    __tablename__ = "saved_measurements"

    id: Mapped[int] = mapped_column(primary_key=True)
    instance_fk: Mapped[int] = mapped_column(ForeignKey("instance.id", ondelete="CASCADE"),
                                             unique=True)
    author_fk: Mapped[int] = mapped_column(ForeignKey("portal_user.id", ondelete="CASCADE"),
                                           index=True)
