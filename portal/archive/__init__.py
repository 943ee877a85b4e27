"""① The archive: where DICOM bytes live, and every way they arrive."""

from __future__ import annotations

from pathlib import Path

from flask import Flask, current_app

from portal.archive.ingest import Archive
from portal.archive.store import EmbeddedStore
from portal.archive.validate import Limits


def init_app(app: Flask) -> None:
    """Attach the embedded archive under the instance folder."""
    settings = app.config["PORTAL"]
    store = EmbeddedStore(Path(settings["INSTANCE_PATH"]).resolve() / "archive")
    app.extensions["archive"] = Archive(store=store, database=app.extensions["db"],
                                        limits=Limits.from_config(settings))


def current_archive() -> Archive:
    """The archive of the running app."""
    archive: Archive = current_app.extensions["archive"]
    return archive
