"""The imaging service: the one way to a rendered image (docs/architecture.md "The path of an
image", ④ and ⑤).

The pure core (``render``, ``rendition``, ``volume``, ``isolation``) turns bytes into an image
and knows no application, database or request. This module owns what lies between that core
and the faces:

- the window choice: an image asked for without a window (``preset=auto``) that is
  monochrome shows with its series' default window (``series_default_window``) unless it
  carries its own, so every slice of a scroll shares one window;
- the cache keys (content digest and rendition, never a person: docs/security.md 28) and the
  render cache (``cache.make_cache``);
- the isolated render processes (docs/security.md 32) and the folder of built volumes.

The DICOMweb rendered, thumbnail and volume routes, the viewer page and pre-rendering ask it;
they parse, authorise and answer. Access is checked before anything here is asked.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any, cast

from flask import Flask, current_app
from sqlalchemy import select
from sqlalchemy.orm import Session

from portal import failures
from portal.archive.store import StoredFile
from portal.imaging.cache import RenderCache, make_cache
from portal.imaging.render import FrameNotFound, RenderRefused
from portal.imaging.render3d import Turn
from portal.imaging.rendition import RENDER_VERSION, Rendition, Window
from portal.imaging.volume_files import VolumeFiles
from portal.index.models import Instance
from portal.index.service import middle_image
from portal.metrics import CACHE_REQUESTS
from portal.redis_link import redis_link

log = logging.getLogger(__name__)
_AUTO = Rendition()  # no window asked for: the file's own, else the series default


def init_app(app: Flask) -> None:
    """Attach the render cache, the folder of built volumes and, when isolation is on, the
    pool of render processes (its settings read here; the core is handed them)."""
    from portal.imaging.isolation import RenderPool, use_frame_cache

    settings = app.config["PORTAL"]
    app.extensions["render_cache"] = make_cache(redis_link(app),
                                                settings["RENDER_CACHE_MB"] << 20)
    frame_cache_bytes = settings["RENDER_FRAME_CACHE_MB"] << 20
    app.extensions["render_pool"] = RenderPool(
        workers=settings["RENDER_WORKERS"], memory_bytes=settings["RENDER_MEMORY_MB"] << 20,
        timeout_seconds=float(settings["RENDER_TIMEOUT_SECONDS"]),
        frame_cache_bytes=frame_cache_bytes) if settings["RENDER_ISOLATION"] else None
    if not settings["RENDER_ISOLATION"]:
        use_frame_cache(frame_cache_bytes)
    app.extensions["volume_files"] = VolumeFiles(
        Path(settings["INSTANCE_PATH"]).resolve() / "volumes")


def render_cache() -> RenderCache:
    """The running app's render cache."""
    cache: RenderCache = current_app.extensions["render_cache"]
    return cache


def volume_files() -> VolumeFiles:
    """The running app's folder of built volumes."""
    files: VolumeFiles = current_app.extensions["volume_files"]
    return files


class RenderFailed(RenderRefused):
    """A render failed in a way no check names yet (``run_isolated``): refused (422) like
    any file that cannot be shown, but never remembered, so a fix takes effect at once."""


def run_isolated(function: Callable[..., Any], *args: Any) -> Any:
    """Run a rendering or decoding function (a module-level one) in the isolated render
    processes when configured, else here.

    Its input is a stored file, so any error but ours (a ``PortalError``, memory, the file
    system, pickling) is a file the renderer met unprepared: refused with a reason
    (``RenderFailed``, 422), never a 500, and logged with its traceback so that it can be
    handled by name (as malformed lookup tables are)."""
    from portal.imaging.isolation import timed_render

    pool = current_app.extensions.get("render_pool")
    try:
        if pool is not None:
            return pool.run(function, *args)  # timed there, without its wait for a process
        with timed_render(function):
            return function(*args)
    except (failures.PortalError, MemoryError, OSError, pickle.PickleError):
        raise  # ours (with its status), or the server's own trouble (a vanished file)
    except Exception as exc:
        log.error("rendering failed on an unexpected %s; refused as undecodable",
                  exc.__class__.__name__, exc_info=True)
        raise RenderFailed(f"the image could not be rendered ({exc.__class__.__name__})"
                           ) from exc


def _max_pixels() -> int:
    return int(current_app.config["PORTAL"]["MAX_RENDER_PIXELS"])


@dataclass(frozen=True)
class RenderedImage:
    """A rendered image, named before it is made: its cache key, media type and ETag.

    ``body()`` answers from the render cache, else renders (the core's ``FrameNotFound``,
    ``RenderRefused`` or ``NotAVolume`` say why it cannot) and keeps the bytes.
    """

    key: str
    media_type: str
    produce: Callable[[], bytes] = field(repr=False, compare=False)
    # The stored file a single frame comes from (None for volumes): what the front door of
    # known readers (portal/dicomweb/signed.py) keeps to render that file again.
    stored: StoredFile | None = field(default=None, repr=False, compare=False)

    @property
    def etag(self) -> str:
        """A strong ETag: the key's digest (it names content and rendition only)."""
        return hashlib.sha256(self.key.encode()).hexdigest()[:32]

    def body(self) -> bytes:
        """The encoded image: from the cache, or rendered now and kept there."""
        cache = render_cache()
        value = cache.get(self.key)
        CACHE_REQUESTS.labels("miss" if value is None else "hit").inc()
        if value is None:
            value = self.produce()
            cache.put(self.key, value)
        return value


def _shows_series_window(instance: Instance, rendition: Rendition) -> bool:
    """The window rule: an image asked for without a window or named preset, and monochrome,
    shows with its series' default window when it carries none of its own."""
    return rendition.window is None and rendition.preset == "auto" and \
        instance.photometric_interpretation.startswith("MONOCHROME")


def _series_middle(session: Session, series_id: int) -> StoredFile | None:
    """The stored file of a series' middle image (``index.service.middle_image``), the one
    its default window is worked out from."""
    from portal.archive import current_archive

    uid = middle_image(session, series_id)
    return current_archive().locate(uid) if uid else None


def rendered_image(session: Session, instance: Instance, frame: int,
                   rendition: Rendition) -> RenderedImage:
    """Frame ``frame`` (1-based) of an instance the caller may see, in ``rendition``.

    FrameNotFound when the instance has no such frame. The stored file is located now (with
    an external archive it is fetched first), since the key names its content; the series'
    middle image is looked up only when the image has to be rendered.
    """
    from portal.archive import current_archive

    if not 1 <= frame <= instance.number_of_frames:
        raise FrameNotFound(f"frame {frame} is outside 1..{instance.number_of_frames}")
    stored = current_archive().locate(instance.sop_instance_uid)

    def produce() -> bytes:
        if _shows_series_window(instance, rendition):
            return _render_in_series(stored, frame - 1, rendition,
                                     _series_middle(session, instance.series_fk))
        return _render(stored, frame - 1, rendition)

    return RenderedImage(rendition.cache_key(stored.sha256, frame), rendition.media_type,
                         produce, stored)


def stored_image(stored: StoredFile, frame: int, rendition: Rendition) -> RenderedImage:
    """Frame ``frame`` (1-based) of a stored file that ``rendered_image`` located for the
    same reader moments ago, in a rendition that needs no series window: the same key and
    bytes as ``rendered_image``, without the database (the front door of known readers,
    portal/dicomweb/signed.py; access was checked by the full path)."""
    if rendition.window is None and rendition.preset == "auto":
        raise ValueError("a rendition without a window may need the series' default window")
    return RenderedImage(rendition.cache_key(stored.sha256, frame), rendition.media_type,
                         partial(_render, stored, frame - 1, rendition), stored)


def series_default_window(session: Session, instance: Instance) -> Window | None:
    """The window ``rendered_image`` gives this instance's series' images that carry none of
    their own when no window is asked for (None: colour images, or none could be found)."""
    if not _shows_series_window(instance, _AUTO):
        return None
    return _series_window(_series_middle(session, instance.series_fk))


def _run_volume(function: Callable[..., Any], *args: Any) -> Any:
    """``run_isolated`` for a volume's build or view: a failure no check names is refused in
    plain words, without the exception's name (the log keeps it)."""
    try:
        return run_isolated(function, *args)
    except RenderFailed as exc:
        raise RenderFailed("something in these images could not be handled") from exc


def _volume_view(function: Callable[..., bytes], *args: Any) -> bytes:
    """A reformat or 3D view; a series that forms no volume is refused as one that cannot
    be shown in 3D, with the reason ``volume.assess`` gave."""
    from portal.imaging.volume import NotAVolume, not_in_3d

    try:
        result: bytes = _run_volume(function, *args)
    except NotAVolume as exc:
        raise not_in_3d(str(exc)) from exc
    return result


def volume_image(content: str, sources: list[StoredFile], kind: str, position: float,
                 angle: float, rendition: Rendition) -> RenderedImage:
    """A reformat (sagittal, coronal, axial) or MIP of the series whose content key
    (``volume.content_key``) is ``content``; ``volume_sources`` gives both."""
    key = rendition.cache_key(content, 0) + f":{kind}:{position!r}:{angle!r}:v3"

    def produce() -> bytes:
        from portal.imaging.isolation import render_volume_source

        return _volume_view(render_volume_source, content, sources, kind, position, angle,
                            rendition, volume_files())

    return RenderedImage(key, rendition.media_type, produce)


def turned_image(content: str, sources: list[StoredFile], turn: Turn,
                 rendition: Rendition) -> RenderedImage:
    """A 3D view (``turn.preset``) or oblique MIP of the series whose content key is
    ``content``, turned about two axes (portal/imaging/render3d.py)."""
    key = rendition.cache_key(content, 0) + f":turned:{turn.key()}:v1"

    def produce() -> bytes:
        from portal.imaging.isolation import render_turned_source

        return _volume_view(render_turned_source, content, sources, turn, rendition,
                            volume_files())

    return RenderedImage(key, rendition.media_type, produce)


def prepare_volume(key: str, sources: list[Any]) -> Window | None:
    """Build a series' volume into the volume folder now (in the isolated pool when
    configured) unless it is there; its MIP window. NotAVolume when there is none."""
    from portal.imaging import isolation

    window: Window | None = _run_volume(isolation.prepare_volume, key, sources,
                                        volume_files())
    return window


def volume_sources(instance_uids: list[str]) -> tuple[str, list[StoredFile]] | None:
    """The volume key (``volume.content_key``) and stored files of a series' images, in the
    order given; None when some of them cannot be reached right now."""
    from portal.archive import current_archive
    from portal.imaging.volume import content_key

    stored = current_archive().locate_many(instance_uids)
    if len(stored) != len(set(instance_uids)):
        return None
    files = [stored[uid] for uid in instance_uids]
    return content_key(f.sha256 for f in files), files


def series_middle_instance(session: Session, series_id: int) -> Instance | None:
    """The instance row of a series' middle image (what pre-rendering warms)."""
    uid = middle_image(session, series_id)
    if uid is None:
        return None
    return session.scalars(select(Instance).where(
        Instance.series_fk == series_id, Instance.sop_instance_uid == uid)).first()


# -- rendering through the isolated processes, and the series window's memo -----------------

def _render(stored: StoredFile, index: int, rendition: Rendition,
            fallback: Window | None = None) -> bytes:
    """Render a frame of a stored file; ``fallback`` is the window for images without one."""
    from portal.imaging.isolation import render_here, render_source

    if current_app.extensions.get("render_pool") is not None:
        here = render_here(stored, index, rendition, _max_pixels(), fallback)  # small, plain
        if here is not None:
            return here
    result: bytes = run_isolated(render_source, stored, index, rendition, _max_pixels(),
                                 fallback)
    return result


def _window_key(middle: StoredFile) -> str:
    return f"window:v{RENDER_VERSION}:{middle.sha256}"


def _known_series_window(middle: StoredFile) -> tuple[bool, Window | None]:
    """(True, the window) when the series' default window is cached, else (False, None)."""
    cached = render_cache().get(_window_key(middle))
    if cached is None:
        return False, None
    center, _, width = cached.decode().partition(",")
    return True, (Window(float(center), float(width)) if width else None)


def _remember_series_window(middle: StoredFile, window: Window | None) -> None:
    render_cache().put(_window_key(middle),
                       f"{float(window.center)!r},{float(window.width)!r}".encode()
                       if window else b"-")


def _series_window(middle: StoredFile | None) -> Window | None:
    """The default window of a series without windows in its files: robust percentiles of its
    middle image, so every slice of a scroll shares one window (cached like an image)."""
    from portal.imaging.isolation import default_window_of

    if middle is None:
        return None
    known, window = _known_series_window(middle)
    if known:
        return window
    try:
        window = run_isolated(default_window_of, middle, _max_pixels())
    except RenderFailed:
        return None  # unnamed: not remembered, so a fix takes effect at once
    except (RenderRefused, FrameNotFound):
        window = None  # the frame itself will say why it cannot be shown
    _remember_series_window(middle, window)
    return window


def _render_in_series(stored: StoredFile, index: int, rendition: Rendition,
                      middle: StoredFile | None) -> bytes:
    """Render a frame that shows with its series' default window when it has none of its
    own; when that window is not known yet, the same render call works it out."""
    from portal.imaging.isolation import render_with_window

    if middle is None:
        return _render(stored, index, rendition)
    known, window = _known_series_window(middle)
    if known:
        return _render(stored, index, rendition, window)
    # What render_with_window returns; the isolated pool hands back whatever it returned.
    body, window = cast(tuple[bytes, Window | None], run_isolated(
        render_with_window, stored, index, rendition, _max_pixels(), middle))
    _remember_series_window(middle, window)
    return body


def forms_volume(images: list[Instance]) -> bool:
    """True when the slices form a volume by the geometry the index holds (``volume.assess``,
    the check the build makes): the viewer offers reformats and 3D views for these only."""
    from portal.imaging.volume import NotAVolume, assess

    if len(images) < 3:
        return False
    first = images[0]
    if not all(i.number_of_frames == 1 and (i.rows, i.columns) == (first.rows, first.columns)
               for i in images):
        return False
    try:  # a missing orientation, spacing or position is refused there too
        assess([i.image_orientation_patient or [] for i in images], first.pixel_spacing or [],
               [i.image_position_patient or [] for i in images])
    except NotAVolume:
        return False
    return True


# -- many images in one answer (a series' stack) -------------------------------------------

def rendered_frames(session: Session, frames: list[tuple[Instance, int]], rendition: Rendition,
                    ahead: int = 0) -> Iterator[bytes | None]:
    """Each (instance, 1-based frame) in ``rendition``, in the order given, as soon as it is
    ready: from the render cache, else rendered, up to ``ahead`` images ahead in threads (the
    render pool runs them side by side; 0: as many as it has processes). None for an image
    that cannot be rendered (the reason is logged): one bad file loses its own part only.

    Everything that needs the database (where the files are, each series' middle image for
    the default window) is read now, before the first image; the threads touch only files
    and the cache, each inside its own application context. Access is checked before this is
    asked.
    """
    from portal.archive import current_archive

    if not frames:
        return iter(())
    ahead = ahead or int(current_app.config["PORTAL"]["RENDER_WORKERS"])
    app = cast(Flask, current_app._get_current_object())  # type: ignore[attr-defined]
    archive = current_archive()
    stored = archive.locate_many(sorted({i.sop_instance_uid for i, _ in frames}))
    middles = {fk: _series_middle(session, fk) for fk in
               {i.series_fk for i, _ in frames if _shows_series_window(i, rendition)}}
    jobs = [(stored.get(i.sop_instance_uid), number, middles.get(i.series_fk, False))
            for i, number in frames]

    def one(source: StoredFile | None, number: int, middle: StoredFile | bool | None
            ) -> bytes | None:
        if source is None:
            return None
        try:
            with app.app_context():
                return RenderedImage(
                    rendition.cache_key(source.sha256, number), rendition.media_type,
                    partial(_render, source, number - 1, rendition) if middle is False else
                    partial(_render_in_series, source, number - 1, rendition,
                            cast(StoredFile | None, middle))).body()
        except Exception:  # e.g. FrameNotFound, RenderRefused, a corrupt or vanished file
            log.warning("an image of a stack could not be rendered; its part is left out",
                        exc_info=True)
            return None

    return _in_order(one, jobs, ahead)


def _in_order(one: Callable[..., bytes | None], jobs: list[tuple[Any, ...]], ahead: int
              ) -> Iterator[bytes | None]:
    """``one(*job)`` for every job, yielded in order, at most ``ahead`` running ahead."""
    with ThreadPoolExecutor(max_workers=max(1, ahead),
                            thread_name_prefix="stack") as threads:
        pending: deque[Future[bytes | None]] = deque()
        queued = iter(jobs)
        try:
            for job in islice(queued, ahead + 1):
                pending.append(threads.submit(one, *job))
            while pending:
                done = pending.popleft().result()
                for job in islice(queued, 1):
                    pending.append(threads.submit(one, *job))
                yield done
        finally:  # a reader who went away: nothing more is started
            for future in pending:
                future.cancel()
