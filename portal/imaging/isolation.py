"""Decoding in separate processes with a memory cap and a time bound (SECURITY.md 32).

A hostile or broken file can make a decoder allocate without end, loop, or crash. Rendering
runs in a small pool of spawned processes whose address space is capped (RLIMIT_AS); a call
that takes too long or kills its process fails that request with a clear reason, the pool is
rebuilt, and the web worker keeps serving.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import multiprocessing
import resource
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from portal.archive.store import StoredFile
from portal.imaging.render import (
    FrameCache,
    FrameNotFound,
    RenderRefused,
    decode_frame,
    default_window,
    finish_frame,
    is_window_frame,
    prepare_decoded,
    prepare_frame,
    render_frame,
    warm_up,
    window_of_decoded,
)
from portal.imaging.rendition import Rendition, Window
from portal.imaging.volume import NotAVolume, Volume, build_volume, render_volume_view

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)


_frames: FrameCache | None = None


def use_frame_cache(max_bytes: int) -> None:
    """Keep up to ``max_bytes`` of prepared frames in this process (0: none)."""
    global _frames
    _frames = FrameCache(max_bytes) if max_bytes > 0 else None


def render_source(source: bytes | StoredFile, index: int, rendition: Rendition,
                  max_pixels: int, fallback: Window | None = None) -> bytes:
    """Render a frame of bytes or of a stored file (read and hash-checked here).

    A stored file's prepared frame is kept in the frame cache, keyed by its SHA-256, the
    frame and the output size, so the next window on the same image skips reading,
    verifying and decoding.
    """
    if isinstance(source, bytes):
        return render_frame(source, index, rendition, max_pixels, fallback)
    key = (source.sha256, index, rendition.width, rendition.height)
    prepared = _frames.get(key) if _frames is not None else None
    if prepared is None:
        prepared = prepare_frame(source.read(), index, rendition, max_pixels)
        if _frames is not None:
            prepared = _frames.put(key, prepared)
    return finish_frame(prepared, rendition, fallback)


_volumes: OrderedDict[str, Volume] = OrderedDict()
KEPT_VOLUMES = 2  # per process; a 150-slice CT reduced to 256 wide is about 40 MB


def render_volume_source(key: str, sources: list[bytes | StoredFile], kind: str,
                         position: float, angle: float, rendition: Rendition) -> bytes:
    """A reformat or MIP of the series whose content digest is ``key``.

    The built volume is kept (when this process keeps frames at all), so the next position
    or angle of the same series cuts it instead of reading and decoding every slice again.
    """
    volume = _volumes.get(key)
    if volume is None:
        volume = build_volume([s if isinstance(s, bytes) else s.read() for s in sources])
        if _frames is not None:
            _volumes[key] = volume
            while len(_volumes) > KEPT_VOLUMES:
                _volumes.popitem(last=False)
    else:
        _volumes.move_to_end(key)
    return render_volume_view(volume, kind, position, angle, rendition)


def default_window_of(source: bytes | StoredFile, max_pixels: int) -> Window | None:
    """``render.default_window`` of bytes or a stored file."""
    return default_window(source if isinstance(source, bytes) else source.read(), max_pixels)


def render_with_window(source: StoredFile, index: int, rendition: Rendition, max_pixels: int,
                       middle: StoredFile) -> tuple[bytes, Window | None]:
    """Render a frame of an image without its own window, and work out its series' default
    window (from the series' middle image) in the same call.

    When the frame is the one the series' window comes from (the middle image of the
    series, e.g. the only image of a radiograph's series), it is decoded once for both.
    """
    key = (source.sha256, index, rendition.width, rendition.height)
    if middle.sha256 == source.sha256 and (_frames is None or _frames.get(key) is None):
        frame, ds = decode_frame(source.read(), index, max_pixels)
        window = (window_of_decoded(frame, ds) if is_window_frame(ds, index)
                  else _series_default(middle, max_pixels))
        prepared = prepare_decoded(frame, ds, rendition)
        if _frames is not None:
            prepared = _frames.put(key, prepared)
        return finish_frame(prepared, rendition, window), window
    window = _series_default(middle, max_pixels)
    return render_source(source, index, rendition, max_pixels, window), window


def _series_default(middle: StoredFile, max_pixels: int) -> Window | None:
    try:
        return default_window_of(middle, max_pixels)
    except (RenderRefused, FrameNotFound):
        return None  # the frame itself will say why it cannot be shown


def _start_child(memory_bytes: int, frame_cache_bytes: int) -> None:
    """Runs first in every render process."""
    _limit_memory(memory_bytes)
    use_frame_cache(frame_cache_bytes)
    warm_up()


def _ready() -> bool:
    """A task that only proves a render process has started."""
    return True


def _limit_memory(memory_bytes: int) -> None:
    """Runs first in every render process: cap its address space, and keep freed image
    buffers in the heap for the next frame (glibc would otherwise map and fault in fresh
    pages for every array of a megabyte or more, which doubled the time of a render)."""
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
        libc.mallopt(_M_TRIM_THRESHOLD, 256 << 20)
    except (OSError, AttributeError):
        pass  # not glibc: only slower


class RenderPool:
    """Renders frames in capped child processes; ``render`` raises RenderRefused on failure."""

    def __init__(self, workers: int = 2, memory_bytes: int = 2 << 30,
                 timeout_seconds: float = 30.0, frame_cache_bytes: int = 0) -> None:
        self.workers = workers
        self.memory_bytes = memory_bytes
        self.frame_cache_bytes = frame_cache_bytes
        self.timeout = timeout_seconds
        self._executor: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()
        self.failures = 0

    def _pool(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._executor is None:
                # spawn, not fork: the web worker has threads, and a forked copy of a
                # threaded process can deadlock on a lock some other thread held.
                context = multiprocessing.get_context("spawn")
                self._executor = ProcessPoolExecutor(
                    max_workers=self.workers, mp_context=context,
                    initializer=_start_child,
                    initargs=(self.memory_bytes, self.frame_cache_bytes))
            return self._executor

    def start(self) -> None:
        """Start the render processes now (they load every decoder as they start), so the
        first images a web worker serves do not wait for that."""
        executor = self._pool()
        for _ in range(self.workers):
            executor.submit(_ready)

    def _reset(self, executor: ProcessPoolExecutor) -> None:
        with self._lock:
            if self._executor is executor:
                self._executor = None
        for process in list(getattr(executor, "_processes", {}).values()):
            process.kill()  # a looping decoder does not stop on its own
        executor.shutdown(wait=False, cancel_futures=True)

    def run(self, function: Callable[..., Any], *args: Any) -> Any:
        """Run a rendering function (a module-level one) in a child process."""
        executor = self._pool()
        try:
            future = executor.submit(function, *args)
        except BrokenProcessPool:
            # A child died while idle (killed, or out of memory elsewhere): start afresh.
            self._reset(executor)
            executor = self._pool()
            future = executor.submit(function, *args)
        try:
            return future.result(timeout=self.timeout)
        except (RenderRefused, FrameNotFound, NotAVolume):
            raise
        except MemoryError as exc:
            raise RenderRefused("the image needs more memory than rendering may use") from exc
        except FutureTimeout as exc:
            self.failures += 1
            log.error("render took longer than %.0f s; its process was stopped", self.timeout)
            self._reset(executor)
            raise RenderRefused("rendering took too long and was stopped") from exc
        except BrokenProcessPool as exc:
            self.failures += 1
            log.error("a render process died (decoder crash); the pool was rebuilt")
            self._reset(executor)
            raise RenderRefused("the image could not be decoded (the decoder failed)") from exc

    def close(self) -> None:
        """Stop the child processes."""
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
