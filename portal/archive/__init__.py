"""① The archive: where DICOM bytes live, and every way they arrive."""

from __future__ import annotations

from pathlib import Path

from flask import Flask, current_app

from portal.archive.after import AfterIngest, audit_step, header_step
from portal.archive.ingest import Archive
from portal.archive.space import SpaceRule
from portal.archive.store import EmbeddedStore
from portal.archive.validate import Limits


def init_app(app: Flask) -> None:
    """Attach the embedded archive under the instance folder, and the external archive
    (``PORTAL_ARCHIVE_URL``) whose instances it fetches on first use. No network call here."""
    settings = app.config["PORTAL"]
    store = EmbeddedStore(Path(settings["INSTANCE_PATH"]).resolve() / "archive",
                          SpaceRule(settings["ARCHIVE_MIN_FREE"], settings["ARCHIVE_WARN_FREE"]))
    database = app.extensions["db"]
    limits = Limits.from_config(settings)
    remote = None
    if settings["ARCHIVE_URL"]:
        from portal.archive.copies import RemoteCopies
        from portal.archive.external import DicomWebArchive, ExternalSettings

        client = DicomWebArchive(ExternalSettings.from_config(settings))
        remote = RemoteCopies(store, database, limits, client,
                              cache_bytes=settings["ARCHIVE_CACHE_MB"] << 20,
                              write_through=settings["ARCHIVE_WRITE_THROUGH"])
    after = AfterIngest(app)
    archive = Archive(store=store, database=database, limits=limits, remote=remote, after=after)
    # The archive's own after-ingest steps; create_app adds those of the packages above it.
    after.add("audit", audit_step(archive.database), required=True)
    after.add("headers", header_step(archive.database, archive.headers))
    app.extensions["archive"] = archive


def current_archive() -> Archive:
    """The archive of the running app."""
    archive: Archive = current_app.extensions["archive"]
    return archive
