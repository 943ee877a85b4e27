"""Render each new series' thumbnail and middle image in the background after ingest, so the
first look at a study is a cache hit (a worker thread here; Redis shares the results)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

from flask import Flask, current_app
from sqlalchemy import select

from portal.imaging.rendition import parse_rendition
from portal.index.models import Series
from portal.index.service import middle_image

log = logging.getLogger(__name__)

_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prerender")


def _warm(app: Flask, series_uids: list[str]) -> None:
    from portal.archive import current_archive
    from portal.imaging.cache import render_cache, render_in_series

    with app.app_context():
        archive, cache = current_archive(), render_cache()
        renditions = [parse_rendition({}, "", thumbnail=True), parse_rendition({}, "")]
        for series_uid in series_uids:
            with archive.database.new_session() as session:
                series_id = session.scalars(select(Series.id).where(
                    Series.series_instance_uid == series_uid)).first()
                middle = middle_image(session, series_id) if series_id else None
            if middle is None:
                continue
            try:
                stored = archive.locate(middle)
                for rendition in renditions:
                    key = rendition.cache_key(stored.sha256, 1)
                    if cache.get(key) is None:
                        cache.put(key, render_in_series(stored, 0, rendition, stored))
            except Exception:  # a background warm-up never fails anyone's request
                if not sys.is_finalizing():
                    log.info("pre-rendering a series failed; it will render on first view")


def prerender(series_uids: Iterable[str], app: Flask | None = None, *,
              wait: bool = False) -> None:
    """Queue the warm-up of these series (returns at once unless ``wait``).

    ``app`` is needed where no application context is active (DIMSE handler threads).
    """
    uids = sorted(set(series_uids))
    if uids:
        app = app or current_app._get_current_object()  # type: ignore[attr-defined]
        future = _executor.submit(_warm, app, uids)
        if wait:
            future.result()


def shared_cache(app: Flask) -> bool:
    """True when rendered images are shared between processes (Redis): only then is it
    worth pre-rendering in a process that does not serve them (DIMSE, the CLI)."""
    return bool(app.config["PORTAL"]["REDIS_URL"])
