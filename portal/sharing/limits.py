"""Fixed-window rate limits: in Redis when configured, else (or while Redis is down) in the
database, so every worker and node counts the same hits (docs/security.md 51).

These limits are a second line only. The count of wrong PINs that locks a link lives in the
database, so flushing or losing Redis never resets it (docs/security.md 20, fault table).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from flask import Flask, current_app
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from portal.db import Database
from portal.redis_link import RedisDown, RedisLink, redis_link
from portal.sharing.models import RateLimitCount

log = logging.getLogger(__name__)

# Longest window a limit may use: older rows are swept, so a longer one would lose its count.
MAX_WINDOW = 86_400
_SWEEP_EVERY = 600.0  # seconds between sweeps of ended windows, per process


def _upsert(session: Session, key: str, start: int, add: int) -> int:
    """Add ``add`` to the row (key, start) in one atomic statement; return its new count."""
    if session.get_bind().dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert  # type: ignore[assignment]
    statement = insert(RateLimitCount).values(
        key=key, window_start=start, hits=add).on_conflict_do_update(
        index_elements=[RateLimitCount.key, RateLimitCount.window_start],
        set_={"hits": RateLimitCount.hits + add}).returning(RateLimitCount.hits)
    return int(session.execute(statement).scalar_one())


class RateLimiter:
    """Count hits per key and window; ``hit`` says whether the caller is still within the limit."""

    def __init__(self, redis: RedisLink | None, database: Database) -> None:
        self._redis = redis
        self._database = database
        self._next_sweep = 0.0
        self._sweep_lock = threading.Lock()

    def _sweep_due(self) -> bool:
        """True once every _SWEEP_EVERY seconds in this process."""
        with self._sweep_lock:
            now = time.monotonic()
            if now < self._next_sweep:
                return False
            self._next_sweep = now + _SWEEP_EVERY
            return True

    def _in_database(self, key: str, start: int, add: int, session: Session | None) -> int:
        """The count in the database: in the caller's transaction when ``session`` is given
        (undone with it), else in a short write transaction of its own."""
        if add == 0:
            look = select(RateLimitCount.hits).where(RateLimitCount.key == key,
                                                     RateLimitCount.window_start == start)
            if session is not None:
                return int(session.scalar(look) or 0)
            with self._database.new_session() as reader:  # no snapshot left open
                return int(reader.scalar(look) or 0)
        if session is not None:
            return _upsert(session, key, start, add)
        with self._database.write_transaction() as own:
            count = _upsert(own, key, start, add)
            if self._sweep_due():
                own.execute(delete(RateLimitCount).where(
                    RateLimitCount.window_start < int(time.time()) - MAX_WINDOW))
            return count

    def count(self, key: str, *, window: int, add: int = 1,
              session: Session | None = None) -> int:
        """Add ``add`` hits (0: only look) to the key's count in this ``window`` (seconds)
        and return the count. Without Redis, ``session`` makes the count part of the caller's
        database transaction (a SQLite writer must not wait for a second one it started)."""
        if not 0 < window <= MAX_WINDOW:
            raise ValueError(f"rate-limit windows are 1 to {MAX_WINDOW} seconds")
        start = int(time.time()) // window * window
        if self._redis is not None:
            name = f"ratelimit:v1:{key}:{start // window}"

            def counted(client: Any) -> int:
                pipe = client.pipeline()
                pipe.incrby(name, add)
                pipe.expire(name, window + 1)
                return int(pipe.execute()[0])

            try:
                return self._redis.call(counted)
            except RedisDown:
                # While the breaker is open this costs nothing; the database keeps the count.
                log.warning("rate limits fall back to the database: Redis unavailable")
        # The window's length is part of the key: one name never mixes two windows.
        return self._in_database(f"{key}/{window}"[:200], start, add, session)

    def hit(self, key: str, *, limit: int, window: int, session: Session | None = None) -> bool:
        """Count one hit; False when the key went over ``limit`` in this ``window`` (seconds)."""
        return self.count(key, window=window, session=session) <= limit


def init_app(app: Flask) -> None:
    """Attach the limiter (one per app; after the database)."""
    app.extensions["rate_limiter"] = RateLimiter(redis_link(app), app.extensions["db"])


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
