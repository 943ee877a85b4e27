"""Free space on the archive's file system: uploads are refused before the disk is full.

``ARCHIVE_MIN_FREE`` is kept free: an upload that would leave less is refused (HTTP 507,
C-STORE 0xA700 "Out of resources", the CLI import stops with exit status 1), while reads go on.
Below ``ARCHIVE_WARN_FREE`` the disk is "nearly full": ``/readyz`` and the office manager's
console say so before uploads are refused (docs/operations.md "Disk space").
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from portal.config import free_space_bytes

State = Literal["ok", "nearly full", "full"]


@dataclass(frozen=True)
class DiskSpace:
    """One look at the archive's file system (bytes)."""

    free: int
    total: int
    min_free: int
    warn_free: int
    block: int = 1  # the file system's allocation unit: a file takes whole blocks

    @property
    def state(self) -> State:
        """``full``: uploads are refused now; ``nearly full``: they soon will be."""
        if self.free <= self.min_free:
            return "full"
        return "nearly full" if self.free <= self.warn_free else "ok"

    def room_for(self, size: int) -> bool:
        """Whether a file of ``size`` bytes (whole blocks of it) leaves the minimum free."""
        return self.free - self.on_disk(size) >= self.min_free

    def on_disk(self, size: int) -> int:
        """What a file of ``size`` bytes takes from the free space: whole blocks."""
        return -(-size // self.block) * self.block

    def describe(self) -> str:
        """In words, for a refusal or the console."""
        text = f"{_size(self.free)} free of {_size(self.total)}"
        return f"{text}; uploads are refused below {_size(self.min_free)}" if self.min_free \
            else text

    def to_json(self) -> dict[str, object]:
        """For /readyz (sizes only)."""
        return {"state": self.state, "free_bytes": self.free, "total_bytes": self.total,
                "min_free_bytes": self.min_free, "warn_free_bytes": self.warn_free}


def _size(count: int) -> str:
    for unit, factor in (("GB", 1 << 30), ("MB", 1 << 20)):
        if count >= factor:
            return f"{count / factor:.1f} {unit}"
    return f"{count / 1024:.0f} KB"


@dataclass(frozen=True)
class SpaceRule:
    """The configured thresholds (``config._as_free_space`` values)."""

    min_free: str = "0mb"
    warn_free: str = "0mb"

    def look(self, folder: Path) -> DiskSpace:
        """Free space (for an unprivileged process: ``f_bavail``) where ``folder`` lives; an
        existing parent is asked while the folder is not made yet."""
        while not folder.exists() and folder.parent != folder:
            folder = folder.parent
        stat = os.statvfs(folder)
        total = stat.f_blocks * stat.f_frsize
        min_free = free_space_bytes(self.min_free, total)
        warn_free = max(free_space_bytes(self.warn_free, total), min_free)
        return DiskSpace(stat.f_bavail * stat.f_frsize, total, min_free, warn_free,
                         max(stat.f_frsize, 1))


class Budget:
    """The free space as the files of one batch (a STOW-RS request) see it.

    Each file takes its size, in whole blocks, from the batch's view instead of asking the file
    system (a ``statvfs`` per file, whose return waits for the GIL behind the other writers).
    The file system is asked again after ``REFRESH_BYTES`` taken or ``REFRESH_SECONDS``; the
    view then keeps the smaller of the two, so what other uploads wrote meanwhile counts, and
    this batch's files still being written are not counted as free again.
    """

    REFRESH_BYTES = 32 << 20
    REFRESH_SECONDS = 0.25

    def __init__(self, look: Callable[[], DiskSpace]) -> None:
        self._look = look
        self._lock = threading.Lock()
        self._space = look()
        self._free = self._space.free
        self._since = 0
        self._at = time.monotonic()

    def take(self, size: int) -> DiskSpace | None:
        """Take ``size`` bytes when they leave the minimum free (None); else nothing is taken
        and the answer is the space as the batch sees it, for the refusal's reason."""
        with self._lock:
            if self._since >= self.REFRESH_BYTES or \
                    time.monotonic() - self._at >= self.REFRESH_SECONDS:
                self._space = self._look()
                self._free = min(self._free, self._space.free)
                self._since, self._at = 0, time.monotonic()
            seen = replace(self._space, free=self._free)
            need = seen.on_disk(size)
            if not seen.room_for(need):
                return seen
            self._free -= need
            self._since += need
            return None
