"""Built volumes kept on disk, so any web worker's render process cuts a first reformat from
a compact file in well under a second instead of decoding every slice again.

One folder (``<instance>/volumes``) holds ``<key>.npz`` (the voxels, int16 when the values
allow, and the geometry), ``<key>.building`` while a build runs (its share done, so every
worker can report progress) and ``<key>.refused`` when the series forms no volume (the
reason). ``key`` is ``volume.content_key`` of the series' files: a digest of content, never
a name. The folder stays within a byte bound, the least recently used volumes going first.
Pure file handling, no Flask: it runs in the render processes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

from portal.imaging.rendition import Window
from portal.imaging.volume import Volume

log = logging.getLogger(__name__)

FORMAT = 2  # bumped when the file's layout changes; older files are then rebuilt
MAX_BYTES = 2 << 30  # about a hundred 150-slice CTs
STALE_SECONDS = 60.0  # a build marker this old belongs to a build that died
_KEY = re.compile(r"[0-9a-f]{64}")


class VolumeFiles:
    """The volume folder of one portal instance (picklable: a render process gets a copy)."""

    def __init__(self, folder: str | Path, max_bytes: int = MAX_BYTES) -> None:
        self.folder = Path(folder)
        self.max_bytes = max_bytes

    def _path(self, key: str, suffix: str) -> Path:
        if not _KEY.fullmatch(key):
            raise ValueError("a volume key is a SHA-256 in hex")
        return self.folder / f"{key}{suffix}"

    def load(self, key: str) -> Volume | None:
        """The kept volume, or None (also for a damaged or older-format file, then removed,
        and for one kept before ``volume.assess`` refused unusable spacing: built again, it
        is refused with the reason)."""
        path = self._path(key, ".npz")
        try:
            with np.load(path, allow_pickle=False) as stored:
                meta = stored["meta"]
                voxels = stored["voxels"]
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            log.warning("a kept volume could not be read; it will be built again")
            path.unlink(missing_ok=True)
            return None
        if meta.shape != (15,) or int(meta[0]) != FORMAT or voxels.ndim != 3 or \
                not np.all(np.isfinite(meta[1:4])) or np.any(meta[1:4] <= 0):
            path.unlink(missing_ok=True)  # format 1 had no orientation: built again
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # recently used: pruned last
        return Volume(voxels.astype(np.float32), float(meta[1]), float(meta[2]),
                      float(meta[3]), _window(meta[4], meta[5]), _window(meta[6], meta[7]),
                      tuple(float(v) for v in meta[9:15]), bool(meta[8]))

    def save(self, key: str, volume: Volume) -> None:
        """Keep a built volume (written whole, then renamed: readers never see half a file)."""
        voxels = volume.voxels
        whole = np.rint(voxels)
        if np.array_equal(whole, voxels) and voxels.size and \
                whole.min() >= -32768 and whole.max() <= 32767:
            voxels = whole.astype(np.int16)  # CT and most MR: half the bytes, exactly
        meta = np.array([FORMAT, volume.row_spacing, volume.column_spacing,
                         volume.slice_spacing, *_numbers(volume.window),
                         *_numbers(volume.mip_window), float(volume.is_ct),
                         *(volume.orientation or (1.0, 0.0, 0.0, 0.0, 1.0, 0.0))], np.float64)
        self.folder.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=self.folder, suffix=".tmp")
        try:
            with os.fdopen(handle, "wb") as out:
                np.savez(out, voxels=voxels, meta=meta)
            os.replace(temporary, self._path(key, ".npz"))
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        self.prune()

    def start(self, key: str) -> None:
        """Say a build of this volume has begun (progress 0)."""
        self.report(key, 0.0)

    def report(self, key: str, done: float) -> None:
        """Write the share of the build done so far, for every worker to read."""
        with contextlib.suppress(OSError):
            self.folder.mkdir(parents=True, exist_ok=True)
            # Written aside and renamed: a reader never sees an empty marker.
            temporary = self._path(key, f".{os.getpid()}.tmp")
            temporary.write_text(f"{max(0.0, min(done, 1.0)):.3f}")
            os.replace(temporary, self._path(key, ".building"))

    def finish(self, key: str, refused: str | None = None) -> None:
        """End a build: drop the progress marker; keep the reason when it formed no volume."""
        with contextlib.suppress(OSError):
            if refused is not None:
                self._path(key, ".refused").write_text(refused[:300])
            self._path(key, ".building").unlink(missing_ok=True)

    def state(self, key: str) -> tuple[str, float, str]:
        """("ready", 1, ""), ("building", share done, ""), ("refused", 0, reason) or
        ("missing", 0, "") when nobody is building it (or the build died)."""
        if self._path(key, ".npz").is_file():
            return "ready", 1.0, ""
        with contextlib.suppress(OSError):
            return "refused", 0.0, self._path(key, ".refused").read_text()
        marker = self._path(key, ".building")
        try:
            if time.time() - marker.stat().st_mtime < STALE_SECONDS:
                return "building", float(marker.read_text() or 0), ""
        except (OSError, ValueError):
            pass
        return "missing", 0.0, ""

    def prune(self) -> None:
        """Remove the least recently used files beyond the bound (and stale leftovers)."""
        try:
            entries = [(entry.stat(), entry) for entry in self.folder.iterdir()]
        except OSError:
            return
        now = time.time()
        total = 0
        for info, entry in sorted(entries, key=lambda item: -item[0].st_mtime):
            stale = entry.suffix in (".tmp", ".building") and \
                now - info.st_mtime > STALE_SECONDS * 10
            total += info.st_size
            if stale or total > self.max_bytes:
                with contextlib.suppress(OSError):
                    entry.unlink()


def _numbers(window: Window | None) -> tuple[float, float]:
    return (window.center, window.width) if window else (float("nan"), float("nan"))


def _window(center: float, width: float) -> Window | None:
    return Window(float(center), float(width)) if np.isfinite(width) and width > 0 else None
