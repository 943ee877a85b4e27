"""Render each new series' thumbnail and middle image in the background after ingest, so the
first look at a study is a cache hit (a worker thread here; Redis shares the results), and
build the volume of each new CT or MR series that forms one into the volume folder, so its
first reformat is cut from a file in well under a second (every process shares the folder).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from flask import Flask, current_app
from sqlalchemy import select

from portal import failures
from portal.imaging.rendition import parse_rendition
from portal.index.models import Instance, Series
from portal.log import carry

if TYPE_CHECKING:
    from portal.archive.after import Arrival

log = logging.getLogger(__name__)

# Volumes a viewer is waiting for: their own thread, so they never queue behind an ingest's
# (and on this node: the viewer waits for this node's volume folder).
_on_demand = ThreadPoolExecutor(max_workers=1, thread_name_prefix="volume")
_building: set[str] = set()
_failed: dict[str, str] = {}
_building_lock = threading.Lock()
VOLUME_MODALITIES = frozenset({"CT", "MR"})
# Warm-ups queued on this process's pre-render lane and not started yet: a series is queued
# there once while it waits, however often it settles meanwhile (``Settling``; each run
# would render again and rebuild the growing series' volume).
_queued: set[tuple[str, bool]] = set()
_queued_lock = threading.Lock()


def _warm(app: Flask, series_uids: list[str]) -> None:
    """The thumbnail and the default rendition of each series' middle image, made by the
    imaging service as a viewer's first request would make them (same window, same keys)."""
    from portal.archive import current_archive
    from portal.imaging.service import rendered_image, series_middle_instance

    with app.app_context():
        archive = current_archive()
        renditions = [parse_rendition({}, "", thumbnail=True), parse_rendition({}, "")]
        for series_uid in series_uids:
            with archive.database.new_session() as session:
                series_id = session.scalars(select(Series.id).where(
                    Series.series_instance_uid == series_uid)).first()
                middle = series_middle_instance(session, series_id) if series_id else None
                if middle is None:
                    continue
                try:
                    for rendition in renditions:
                        rendered_image(session, middle, 1, rendition).body()
                except Exception:  # a background warm-up never fails anyone's request
                    if not sys.is_finalizing():
                        log.info("pre-rendering a series failed; it will render on first view")


def volume_images(session: Any, series_id: int) -> list[str]:
    """The SOP Instance UIDs of a series' images that may form a volume, in viewer order;
    empty when they cannot (too few, multi-frame, no geometry: ``service.forms_volume``)."""
    from portal.imaging.service import forms_volume

    images = [i for i in session.scalars(
        select(Instance).where(Instance.series_fk == series_id)
        .order_by(Instance.instance_number, Instance.id)) if i.rows]
    return [i.sop_instance_uid for i in images] if forms_volume(images) else []


def _build_volumes(app: Flask, series_uids: list[str]) -> None:
    """Build the volume of every CT or MR series here that forms one and is not built yet."""
    from portal.archive import current_archive
    from portal.imaging.service import prepare_volume, volume_files, volume_sources
    from portal.imaging.volume import NotAVolume

    with app.app_context():
        database = current_archive().database
        for series_uid in series_uids:
            with database.new_session() as session:
                series = session.scalars(select(Series).where(
                    Series.series_instance_uid == series_uid)).first()
                if series is None or series.modality not in VOLUME_MODALITIES:
                    continue
                uids = volume_images(session, series.id)
            try:
                found = volume_sources(uids) if uids else None
                if found is None or volume_files().state(found[0])[0] in ("ready", "refused"):
                    continue
                prepare_volume(*found)
            except NotAVolume:
                continue  # kept as refused: the viewer says why
            except Exception:  # a background build never fails anyone's request
                if not sys.is_finalizing():
                    log.info("building a series' volume failed; it is built on first view")


def _warm_all(app: Flask, series_uids: list[str], images: bool) -> None:
    if images:
        _warm(app, series_uids)
    _build_volumes(app, series_uids)


def warm_series(series_uids: list[str], images: bool) -> None:
    """The job ``prerender`` (portal/jobs.py): warm these series up in the current app, on
    a worker of the job queue or on this process's pre-render thread."""
    with _queued_lock:  # from now on, a new arrival queues the series again
        _queued.difference_update((uid, images) for uid in series_uids)
    _warm_all(current_app._get_current_object(), series_uids,  # type: ignore[attr-defined]
              images)


def prerender(series_uids: Iterable[str], app: Flask | None = None, *,
              wait: bool = False, images: bool = True) -> None:
    """Queue the warm-up of these series once each has settled (``Settling``: a second
    without a new instance of it), or now and return when done with ``wait``: their
    thumbnail and middle image unless ``images`` is false, and the volume of a CT or MR
    series. A job (``prerender``): on the job queue when it has workers (the render cache is
    Redis then, so the images serve every node), else on this process's pre-render thread.

    ``app`` is needed where no application context is active (DIMSE handler threads).
    """
    from portal import jobs

    uids = sorted(set(series_uids))
    if uids:
        app = app or current_app._get_current_object()  # type: ignore[attr-defined]
        if wait:
            jobs.enqueue("prerender", uids, images, wait=True, app=app)
        else:
            _settling.add(app, uids, images)


def _start(app: Flask, uids: list[str], images: bool) -> None:
    """Queue the warm-up of these settled series: on the job queue, or on this process's
    pre-render lane unless it already waits there."""
    from portal import jobs

    if not jobs.uses_queue(app):
        with _queued_lock:
            uids = [uid for uid in uids if (uid, images) not in _queued]
            _queued.update((uid, images) for uid in uids)
    if not uids:
        return  # already waiting on the lane: it will see these instances too
    try:
        job_id = jobs.enqueue("prerender", uids, images, app=app)
    except Exception:
        _unmark(uids, images)  # not queued: a later arrival may queue it again
        raise
    if job_id is not None:
        _unmark(uids, images)  # on the job queue after all (a worker came): not on the lane


def _unmark(uids: list[str], images: bool) -> None:
    with _queued_lock:
        _queued.difference_update((uid, images) for uid in uids)


class Settling:
    """Hands each series to ``start`` once it has settled: no instance of it arrived for
    ``quiet`` seconds, or ``longest`` seconds have passed since the first arrival that waits
    (a series that never stops arriving is still warmed that often). One thread, started at
    the first arrival (after a fork, again in the child); ``start`` runs on it, under the
    request id of the series' first waiting arrival.

    Issue 17: a series sent one instance a request arrives for seconds. Warmed on every
    arrival, the lane rendered its moving middle image and rebuilt its growing volume in the
    web worker meanwhile, and the senders' requests waited for the CPU and the GIL: 150 CT
    slices one a request took 9.9-11.3 ms each with that, 7.6-8.8 ms with this
    (benchmarks/README.md, "Pre-rendering once the series has arrived"). On the job queue,
    each arrival queued a job that rebuilt the volume on a worker.

    What waits here is lost if the process stops within that second, unless it calls
    ``finish_waiting`` first (``AfterIngest.finish``: ``flask dimse pull --with-scp``); such a
    series is rendered on first view, as after a failed warm-up.
    """

    def __init__(self, start: Callable[[Flask, list[str], bool], None], *, quiet: float,
                 longest: float) -> None:
        self._start, self.quiet, self.longest = start, quiet, longest
        self._reset()
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        # (series, images) -> first and last arrival, the app, the first arrival's start
        self._waiting: dict[tuple[str, bool],
                            tuple[float, float, Flask, Callable[[], None]]] = {}
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None

    def add(self, app: Flask, uids: Iterable[str], images: bool) -> None:
        now = time.monotonic()
        with self._changed:
            for uid in uids:
                waiting = self._waiting.get((uid, images))
                if waiting is None:
                    self._waiting[(uid, images)] = (now, now, app, carry(
                        self._start_one(app, uid, images)))
                else:
                    self._waiting[(uid, images)] = (waiting[0], now, *waiting[2:])
            if self._thread is None or not self._thread.is_alive():
                thread = threading.Thread(target=self._run, name="prerender-settle",
                                          daemon=True)
                thread.start()  # kept only once it runs: a failed start is tried again
                self._thread = thread
            self._changed.notify()

    def forget(self, app: Flask | None = None) -> None:
        """Drop what waits for ``app`` (every app: None) without starting it: an app being
        closed (the tests close theirs and their databases)."""
        with self._changed:
            for key in [key for key, waiting in self._waiting.items()
                        if app is None or waiting[2] is app]:
                del self._waiting[key]

    def take(self, app: Flask) -> list[tuple[str, bool]]:
        """Remove what waits for ``app`` and return it, (series, images) each, to be done
        by the caller now."""
        with self._changed:
            taken = [key for key, waiting in self._waiting.items() if waiting[2] is app]
            for key in taken:
                del self._waiting[key]
        return taken

    def _start_one(self, app: Flask, uid: str, images: bool) -> Callable[[], None]:
        return lambda: self._start(app, [uid], images)

    def _due(self, first: float, last: float) -> float:
        return min(last + self.quiet, first + self.longest)

    def _run(self) -> None:
        while True:
            with self._changed:
                now = time.monotonic()
                ready = [key for key, (first, last, *_) in self._waiting.items()
                         if self._due(first, last) <= now]
                if not ready:
                    soonest = min((self._due(first, last)
                                   for first, last, *_ in self._waiting.values()), default=None)
                    self._changed.wait(None if soonest is None else soonest - now)
                    continue
                starts = [self._waiting.pop(key)[3] for key in ready]
            self._start_each(starts)

    @staticmethod
    def _start_each(starts: list[Callable[[], None]]) -> None:
        for start in starts:
            try:
                start()
            except RuntimeError as exc:
                if "interpreter shutdown" not in str(exc):  # concurrent.futures' words
                    log.exception("could not queue the pre-rendering of a series")
                else:  # the process is exiting: its lanes take no more work
                    log.info("a series was not pre-rendered: the process is exiting "
                             "(it renders on first view)")
            except Exception:  # a background warm-up never fails anyone's request
                log.exception("could not queue the pre-rendering of a series")


_settling = Settling(_start, quiet=1.0, longest=10.0)


def finish_waiting() -> None:
    """Do now, in this thread, the warm-ups of the current app that wait for their series to
    settle (on the job queue, when it has workers, they are queued there instead): for a
    command that exits once it has stored (``AfterIngest.finish``)."""
    from portal import jobs

    app = current_app._get_current_object()  # type: ignore[attr-defined]
    on_queue = jobs.uses_queue(app)
    for uid, images in _settling.take(app):
        jobs.enqueue("prerender", [uid], images, wait=not on_queue, app=app)


def forget_waiting(app: Flask | None = None) -> None:
    """Drop the warm-ups that wait for their series to settle, of ``app`` or of every app."""
    _settling.forget(app)


def build_volume_soon(key: str, sources: list[Any]) -> None:
    """Build a series' volume in the background for a viewer that waits for it (once per
    process at a time; the volume folder tells the other processes it is under way)."""
    from portal.imaging.service import prepare_volume
    from portal.imaging.volume import NotAVolume

    app = current_app._get_current_object()  # type: ignore[attr-defined]
    with _building_lock:
        if key in _building:
            return
        _building.add(key)
    app.extensions["volume_files"].start(key)  # "building" for every worker from now on

    def build() -> None:
        try:
            with app.app_context():
                prepare_volume(key, sources)
            app.extensions["volume_files"].finish(key)  # also when it was built already
        except NotAVolume:
            pass  # kept as refused in the volume folder: the viewer says why
        except Exception as exc:  # told once to the viewer that waits; tried again after
            with _building_lock:  # in plain words: never an exception's name, text or path
                _failed[key] = exc.reason if isinstance(exc, failures.PortalError) else \
                    "the server ran into a problem; try again later"
                while len(_failed) > 64:
                    _failed.pop(next(iter(_failed)))
            app.extensions["volume_files"].finish(key)
            if not sys.is_finalizing():
                log.info("building a series' volume failed: %s", exc.__class__.__name__)
        finally:
            with _building_lock:
                _building.discard(key)

    _on_demand.submit(carry(build))  # under the request id of who asked (portal/log.py)


def volume_failure(key: str) -> str | None:
    """Why the last background build of this volume here failed (once), or None."""
    with _building_lock:
        return _failed.pop(key, None)


def shared_cache(app: Flask) -> bool:
    """True when rendered images are shared between processes (Redis): only then is it
    worth pre-rendering in a process that does not serve them (DIMSE, the CLI)."""
    return bool(app.config["PORTAL"]["REDIS_URL"])


def after_ingest(arrival: Arrival) -> None:
    """The after-ingest step (``portal.archive.after``): queue the warm-up of the new series.

    Rendered images go into this process's cache, so only a web worker (STOW-RS) or a shared
    cache makes them worth it elsewhere; volumes are files every process shares. A synced
    series is skipped: its bytes stay at the external archive until someone views it.
    """
    if arrival.via == "sync":
        return
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    images = arrival.via == "stow" or shared_cache(app)
    prerender(arrival.series, app, wait=arrival.wait, images=images)
