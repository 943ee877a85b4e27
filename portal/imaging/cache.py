"""Rendered bytes, keyed by content and rendition: Redis when configured, else in-process.

Keys name a SHA-256 of stored content and a rendition, never a person or a patient; access
is checked before the cache is asked, so one cached image serves everyone allowed to see it.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import Any, Protocol

from flask import Flask, current_app

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


def make_cache(redis_url: str | None) -> RenderCache:
    """Redis when a URL is configured, otherwise the in-process cache."""
    return RedisCache(redis_url) if redis_url else MemoryCache()


def init_app(app: Flask) -> None:
    """Attach the cache and, when isolation is on, the pool of render processes."""
    from portal.imaging.isolation import RenderPool

    settings = app.config["PORTAL"]
    app.extensions["render_cache"] = make_cache(settings["REDIS_URL"])
    app.extensions["render_pool"] = RenderPool(
        workers=settings["RENDER_WORKERS"], memory_bytes=settings["RENDER_MEMORY_MB"] << 20,
        timeout_seconds=float(settings["RENDER_TIMEOUT_SECONDS"])
    ) if settings["RENDER_ISOLATION"] else None


def render(data: bytes, index: int, rendition: Any) -> bytes:
    """Render through the isolated pool when configured, else in this process."""
    from portal.imaging.render import render_frame

    pool = current_app.extensions.get("render_pool")
    max_pixels = current_app.config["PORTAL"]["MAX_RENDER_PIXELS"]
    if pool is not None:
        result: bytes = pool.render(data, index, rendition, max_pixels)
        return result
    return render_frame(data, index, rendition, max_pixels)


def render_volume(files: list[bytes], kind: str, position: float, angle: float,
                  rendition: Any) -> bytes:
    """A reformat or MIP, through the isolated pool when configured."""
    from portal.imaging.volume import render_view

    pool = current_app.extensions.get("render_pool")
    if pool is not None:
        result: bytes = pool.run(render_view, files, kind, position, angle, rendition)
        return result
    return render_view(files, kind, position, angle, rendition)


def render_cache() -> RenderCache:
    """The running app's render cache."""
    cache: RenderCache = current_app.extensions["render_cache"]
    return cache
