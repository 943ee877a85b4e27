"""Render each new series' thumbnail and middle image in the background after ingest, so the
first look at a study is a cache hit (a worker thread here; Redis shares the results)."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

from flask import Flask, current_app
from sqlalchemy import select

from portal.imaging.rendition import parse_rendition
from portal.index.models import Instance, Series

log = logging.getLogger(__name__)

_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prerender")


def _warm(app: Flask, series_uids: list[str]) -> None:
    from portal.archive import current_archive
    from portal.imaging.cache import render, render_cache

    with app.app_context():
        archive, cache = current_archive(), render_cache()
        renditions = [parse_rendition({}, "", thumbnail=True), parse_rendition({}, "")]
        for series_uid in series_uids:
            with archive.database.new_session() as session:
                uids = list(session.scalars(
                    select(Instance.sop_instance_uid).join(Series, Instance.series_fk ==
                                                           Series.id)
                    .where(Series.series_instance_uid == series_uid, Instance.rows.is_not(None))
                    .order_by(Instance.instance_number, Instance.id)))
            if not uids:
                continue
            middle = uids[len(uids) // 2]
            try:
                digest, data = archive.sha256_of(middle), archive.read(middle)
                for rendition in renditions:
                    key = rendition.cache_key(digest, 1)
                    if cache.get(key) is None:
                        cache.put(key, render(data, 0, rendition))
            except Exception:  # a background warm-up never fails anyone's request
                log.info("pre-rendering a series failed; it will render on first view")


def prerender(series_uids: Iterable[str]) -> None:
    """Queue the warm-up of these series (returns at once)."""
    uids = sorted(set(series_uids))
    if uids:
        app = current_app._get_current_object()  # type: ignore[attr-defined]
        _executor.submit(_warm, app, uids)
