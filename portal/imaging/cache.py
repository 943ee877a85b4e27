"""Rendered bytes, keyed by content and rendition: Redis when configured, else in-process.

Keys name a SHA-256 of stored content and a rendition, never a person or a patient; access
is checked before the cache is asked, so one cached image serves everyone allowed to see it.
The keys are made, and the cache is asked, by ``portal.imaging.service`` only; this module
knows no application (its settings are passed to ``make_cache``).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import Protocol

from portal.redis_link import RedisDown, RedisLink

log = logging.getLogger(__name__)


class RenderCache(Protocol):
    """Get and put encoded images."""

    def get(self, key: str) -> bytes | None:
        """The bytes for a key, or None."""

    def put(self, key: str, value: bytes) -> None:
        """Keep the bytes (the cache may drop them later)."""


# What an entry costs beyond its key's and value's characters: the bytes and str object
# headers, the ordered dict's slot, link and hash table, which keeps its size as entries come
# and go (95 bytes an entry growing, up to about 190 under churn, measured with tracemalloc on
# CPython 3.11; rounded up). Counted so the bound holds for small entries too, e.g. the
# series windows the service keeps here (about 20 bytes each).
ENTRY_OVERHEAD = 256


def entry_cost(key: str, value: bytes) -> int:
    """The memory an entry holds, as ``MemoryCache`` counts it against its bound."""
    return len(key) + len(value) + ENTRY_OVERHEAD


class MemoryCache:
    """A least-recently-used cache bounded by the memory its entries hold, keys included
    (the embedded default): ``max_bytes`` is the most it keeps, whatever the entries' sizes."""

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
        if entry_cost(key, value) > self.max_bytes // 4:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._size -= entry_cost(key, old)
            self._items[key] = value
            self._size += entry_cost(key, value)
            while self._size > self.max_bytes:
                dropped_key, dropped = self._items.popitem(last=False)
                self._size -= entry_cost(dropped_key, dropped)

    @property
    def size(self) -> int:
        """The memory the entries hold now, as counted against ``max_bytes``."""
        return self._size


class RedisCache:
    """Rendered bytes in Redis with an expiry; a Redis outage only means a cache miss, and
    while its breaker is open not even a wait (``portal/redis_link.py``)."""

    def __init__(self, link: RedisLink, ttl_seconds: int = 7 * 86400) -> None:
        self.link = link
        self.ttl = ttl_seconds

    def get(self, key: str) -> bytes | None:
        """The bytes for a key, or None (also when Redis is down)."""
        try:
            value = self.link.call(lambda client: client.get(key))
        except RedisDown:
            log.warning("render cache unavailable; rendering without it")
            return None
        return value if isinstance(value, bytes) else None

    def put(self, key: str, value: bytes) -> None:
        """Keep the bytes for the TTL (best effort)."""
        try:
            self.link.call(lambda client: client.set(key, value, ex=self.ttl))
        except RedisDown:
            log.warning("render cache unavailable; result not kept")


def make_cache(redis: RedisLink | None, memory_bytes: int = 128 << 20) -> RenderCache:
    """Redis when the app has a Redis link, otherwise an in-process cache of ``memory_bytes``."""
    return RedisCache(redis) if redis is not None else MemoryCache(memory_bytes)
