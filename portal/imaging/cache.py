"""Rendered bytes, keyed by content and rendition: Redis when configured, else in-process.

Keys name a SHA-256 of stored content and a rendition, never a person or a patient; access
is checked before the cache is asked, so one cached image serves everyone allowed to see it.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, cast

from flask import Flask, current_app

from portal.archive.store import StoredFile
from portal.imaging.render import FrameNotFound, RenderRefused
from portal.imaging.rendition import RENDER_VERSION, Rendition, Window
from portal.imaging.volume_files import VolumeFiles

log = logging.getLogger(__name__)


class RenderCache(Protocol):
    """Get and put encoded images."""

    def get(self, key: str) -> bytes | None:
        """The bytes for a key, or None."""

    def put(self, key: str, value: bytes) -> None:
        """Keep the bytes (the cache may drop them later)."""


class MemoryCache:
    """A least-recently-used cache bounded by total bytes (the embedded default)."""

    def __init__(self, max_bytes: int = 256 << 20) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def get(self, key: str) -> bytes | None:
        """The bytes for a key, marking them recently used."""
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: str, value: bytes) -> None:
        """Keep the bytes, dropping the least recently used beyond the bound."""
        if len(value) > self.max_bytes // 4:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._size -= len(old)
            self._items[key] = value
            self._size += len(value)
            while self._size > self.max_bytes:
                _key, dropped = self._items.popitem(last=False)
                self._size -= len(dropped)


class RedisCache:
    """Rendered bytes in Redis with an expiry; a Redis outage only means a cache miss."""

    def __init__(self, url: str, ttl_seconds: int = 7 * 86400) -> None:
        import redis

        self.client = redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
        self.ttl = ttl_seconds

    def get(self, key: str) -> bytes | None:
        """The bytes for a key, or None (also when Redis is down)."""
        import redis

        try:
            value = self.client.get(key)
        except redis.RedisError:
            log.warning("render cache unavailable; rendering without it")
            return None
        return value if isinstance(value, bytes) else None

    def put(self, key: str, value: bytes) -> None:
        """Keep the bytes for the TTL (best effort)."""
        import redis

        try:
            self.client.set(key, value, ex=self.ttl)
        except redis.RedisError:
            log.warning("render cache unavailable; result not kept")


def make_cache(redis_url: str | None, memory_bytes: int = 128 << 20) -> RenderCache:
    """Redis when a URL is configured, otherwise an in-process cache of ``memory_bytes``."""
    return RedisCache(redis_url) if redis_url else MemoryCache(memory_bytes)


def init_app(app: Flask) -> None:
    """Attach the cache and, when isolation is on, the pool of render processes."""
    from portal.imaging.isolation import RenderPool, use_frame_cache

    settings = app.config["PORTAL"]
    app.extensions["render_cache"] = make_cache(settings["REDIS_URL"],
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


def run_isolated(function: Callable[..., Any], *args: Any) -> Any:
    """Run a rendering or decoding function (a module-level one) in the isolated render
    processes when configured, else here."""
    pool = current_app.extensions.get("render_pool")
    return pool.run(function, *args) if pool is not None else function(*args)


def _max_pixels() -> int:
    return int(current_app.config["PORTAL"]["MAX_RENDER_PIXELS"])


def render(source: Any, index: int, rendition: Rendition,
           fallback: Window | None = None) -> bytes:
    """Render bytes or a stored file through the isolated pool when configured, else here.

    ``fallback`` is the window for images that carry none (``series_window``).
    """
    from portal.imaging.isolation import render_source

    result: bytes = run_isolated(render_source, source, index, rendition, _max_pixels(), fallback)
    return result

def _known_series_window(middle: StoredFile) -> tuple[bool, Window | None]:
    """(True, the window) when the series' default window is cached, else (False, None)."""
    cached = render_cache().get(f"window:v{RENDER_VERSION}:{middle.sha256}")
    if cached is None:
        return False, None
    center, _, width = cached.decode().partition(",")
    return True, (Window(float(center), float(width)) if width else None)


def _remember_series_window(middle: StoredFile, window: Window | None) -> None:
    render_cache().put(f"window:v{RENDER_VERSION}:{middle.sha256}",
                       f"{float(window.center)!r},{float(window.width)!r}".encode()
                       if window else b"-")


def series_window(middle: StoredFile | None) -> Window | None:
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
    except (RenderRefused, FrameNotFound):
        window = None  # the frame itself will say why it cannot be shown
    _remember_series_window(middle, window)
    return window


def render_in_series(stored: StoredFile, index: int, rendition: Rendition,
                     middle: StoredFile | None) -> bytes:
    """Render a frame that shows with its series' default window when it has none of its
    own; when that window is not known yet, the same render call works it out."""
    from portal.imaging.isolation import render_with_window

    if middle is None:
        return render(stored, index, rendition)
    known, window = _known_series_window(middle)
    if known:
        return render(stored, index, rendition, window)
    # What render_with_window returns; the isolated pool hands back whatever it returned.
    body, window = cast(tuple[bytes, Window | None], run_isolated(
        render_with_window, stored, index, rendition, _max_pixels(), middle))
    _remember_series_window(middle, window)
    return body


def render_volume(key: str, sources: list[Any], kind: str, position: float, angle: float,
                  rendition: Rendition) -> bytes:
    """A reformat or MIP of bytes or stored files, through the isolated pool when configured
    (``key`` names the series' content; render processes keep recent volumes by it, and the
    volume folder keeps them for every process)."""
    from portal.imaging.isolation import render_volume_source

    result: bytes = run_isolated(render_volume_source, key, sources, kind, position, angle,
                                 rendition, volume_files())
    return result


def prepare_volume(key: str, sources: list[Any]) -> Window | None:
    """Build a series' volume into the volume folder now (in the isolated pool when
    configured) unless it is there; its MIP window. NotAVolume when there is none."""
    from portal.imaging import isolation

    window: Window | None = run_isolated(isolation.prepare_volume, key, sources,
                                         volume_files())
    return window


def volume_files() -> VolumeFiles:
    """The running app's folder of built volumes."""
    files: VolumeFiles = current_app.extensions["volume_files"]
    return files


def render_cache() -> RenderCache:
    """The running app's render cache."""
    cache: RenderCache = current_app.extensions["render_cache"]
    return cache


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
