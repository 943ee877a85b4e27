"""The one Redis connection of an app, behind a circuit breaker.

Redis is a dependency the portal can live without for a while: rendered images become cache
misses and rate limits are counted in the database (``sharing/limits.py``). What it must not do
is make every request wait for a dead or hung Redis. Each call has a short socket timeout, and
after ``REDIS_BREAKER_FAILURES`` failures in a row the breaker opens: calls fail at once
(``RedisDown``) for ``REDIS_BREAKER_RESET_SECONDS``, then one trial call goes through
(docs/security.md (c) 16).

Measured on this machine with a hung Redis (``SIGSTOP``): without the breaker every thumbnail
waited for its 0.5 s timeout twice (a get and a put); with it, three calls time out and the
rest pay nothing (tests/test_dependencies.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from portal.breaker import BreakerOpen, BreakerStatus, CircuitBreaker
from portal.metrics import breaker_observer

if TYPE_CHECKING:
    import redis

# Flask is not imported: the render cache (an imaging core module that knows no application)
# uses RedisLink too. ``app`` below is the Flask app.

T = TypeVar("T")


class RedisDown(Exception):
    """Redis did not answer (or the breaker is open): the caller uses its fallback."""


class RedisLink:
    """A Redis client whose calls go through a circuit breaker."""

    def __init__(self, url: str, *, timeout: float, failures: int, reset_after: float) -> None:
        import redis

        self.client: redis.Redis = redis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout)
        self.breaker = CircuitBreaker(failures, reset_after,
                                      on_change=breaker_observer("redis"))

    def call(self, what: Callable[[redis.Redis], T]) -> T:
        """``what(client)``, or ``RedisDown`` at once while the breaker is open."""
        import redis

        try:
            self.breaker.before_call()
        except BreakerOpen as exc:
            raise RedisDown(str(exc)) from exc
        try:
            result = what(self.client)
        except redis.RedisError as exc:
            self.breaker.failed(type(exc).__name__)
            raise RedisDown(type(exc).__name__) from exc
        self.breaker.succeeded()
        return result

    def ping(self) -> bool:
        """True when Redis answers now (through the breaker: an open one answers False)."""
        try:
            return bool(self.call(lambda client: client.ping()))
        except RedisDown:
            return False

    def status(self) -> BreakerStatus:
        """The breaker's state, for ``/readyz`` and logs."""
        return self.breaker.status()


def redis_link(app: Any) -> RedisLink | None:
    """The app's Redis link, or None when ``REDIS_URL`` is unset (the embedded default)."""
    link: Any = app.extensions.get("redis")
    return link if isinstance(link, RedisLink) else None


def init_app(app: Any) -> None:
    """Make the app's one Redis link when ``REDIS_URL`` is set (before its users)."""
    settings = app.config["PORTAL"]
    if settings["REDIS_URL"]:
        app.extensions["redis"] = RedisLink(
            settings["REDIS_URL"], timeout=float(settings["REDIS_TIMEOUT_SECONDS"]),
            failures=settings["REDIS_BREAKER_FAILURES"],
            reset_after=float(settings["REDIS_BREAKER_RESET_SECONDS"]))
