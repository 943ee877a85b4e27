"""Fixed-window rate limits: in Redis when configured, else (or while Redis is down) in-process.

These limits are a second line only. The count of wrong PINs that locks a link lives in the
database, so flushing or losing Redis never resets it (SECURITY.md 20, fault table).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from flask import Flask, current_app

log = logging.getLogger(__name__)


class RateLimiter:
    """Count hits per key and window; ``hit`` says whether the caller is still within the limit."""

    def __init__(self, redis_url: str | None) -> None:
        self._client: Any = None
        if redis_url:
            import redis

            self._client = redis.Redis.from_url(redis_url, socket_timeout=0.5,
                                                socket_connect_timeout=0.5)
        self._counts: dict[str, tuple[float, int]] = {}
        self._lock = threading.Lock()

    def _local(self, key: str, window: int, add: int) -> int:
        now = time.monotonic()
        with self._lock:
            if len(self._counts) > 100_000:
                self._counts = {k: v for k, v in self._counts.items() if v[0] > now}
            until, count = self._counts.get(key, (0.0, 0))
            if until <= now:
                until, count = now + window, 0
            count += add
            self._counts[key] = (until, count)
            return count

    def count(self, key: str, *, window: int, add: int = 1) -> int:
        """Add ``add`` hits (0: only look) to the key's count in this ``window`` (seconds)
        and return the count."""
        name = f"ratelimit:v1:{key}:{int(time.time()) // window}"
        if self._client is not None:
            import redis

            try:
                pipe = self._client.pipeline()
                pipe.incrby(name, add)
                pipe.expire(name, window + 1)
                return int(pipe.execute()[0])
            except redis.RedisError:
                log.warning("rate limits fall back to this process: Redis unavailable")
        return self._local(name, window, add)

    def hit(self, key: str, *, limit: int, window: int) -> bool:
        """Count one hit; False when the key went over ``limit`` in this ``window`` (seconds)."""
        return self.count(key, window=window) <= limit


def init_app(app: Flask) -> None:
    """Attach the limiter (one per app)."""
    app.extensions["rate_limiter"] = RateLimiter(app.config["PORTAL"]["REDIS_URL"])


def address_key(address: str) -> str:
    """What a per-address limit counts: an IPv4 address, or the /64 network of an IPv6 one
    (one subscriber usually holds a whole /64 and could otherwise rotate addresses)."""
    import ipaddress

    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return address[:64]
    if isinstance(parsed, ipaddress.IPv6Address):
        if parsed.ipv4_mapped is not None:
            return str(parsed.ipv4_mapped)
        return str(ipaddress.ip_network(f"{parsed}/64", strict=False))
    return str(parsed)


def rate_limiter() -> RateLimiter:
    """The app's limiter."""
    limiter: RateLimiter = current_app.extensions["rate_limiter"]
    return limiter
