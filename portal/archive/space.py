"""Free space on the archive's file system: uploads are refused before the disk is full.

``ARCHIVE_MIN_FREE`` is kept free: an upload that would leave less is refused (HTTP 507,
C-STORE 0xA700 "Out of resources", the CLI import stops with exit status 1), while reads go on.
Below ``ARCHIVE_WARN_FREE`` the disk is "nearly full": ``/readyz`` and the office manager's
console say so before uploads are refused (docs/operations.md "Disk space").
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
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
    """One look at the free space, shared by the files of one batch (a STOW-RS request):
    each file takes its size from it, so the batch asks the file system once instead of once
    per file, and two files of the batch never count the same free bytes."""

    def __init__(self, space: DiskSpace) -> None:
        self.space = space
        self._taken = 0
        self._lock = threading.Lock()

    def take(self, size: int) -> bool:
        """Take ``size`` bytes when they leave the minimum free; False (nothing taken) if not."""
        with self._lock:
            if not self.space.room_for(self._taken + self.space.on_disk(size)):
                return False
            self._taken += self.space.on_disk(size)
            return True
