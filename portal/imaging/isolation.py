"""Decoding in separate processes with a memory cap and a time bound (docs/security.md 32).

A hostile or broken file can make a decoder allocate without end, loop, or crash. Rendering
runs in a small pool of spawned processes whose address space is capped (RLIMIT_AS); a call
that takes too long or kills its process fails that request with a clear reason, the pool is
rebuilt, and the web worker keeps serving.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import multiprocessing
import os
import resource
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

from portal import metrics
from portal.archive.store import StoredFile
from portal.imaging.render import (
    PIXEL_DATA_TAG,
    FrameCache,
    FrameNotFound,
    RenderRefused,
    decode_frame,
    decode_native_frame,
    default_window,
    finish_frame,
    is_window_frame,
    prepare_decoded,
    prepare_frame,
    render_frame,
    sequence_items,
    warm_up,
    window_of_decoded,
)
from portal.imaging.render3d import Grid, Turn, halved, render_turned
from portal.imaging.rendition import Rendition, Window
from portal.imaging.volume import NotAVolume, Volume, build_volume, render_volume_view
from portal.imaging.volume_files import VolumeFiles

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


# Small plain frames are rendered in the web worker itself (issue 17 item 2). For a 256x256
# greyscale frame the hop to a render process and back (pickling, two processes woken, the
# wait for them) costs more than the render (a table lookup and a JPEG of 64 K pixels, about
# 0.2 ms): benchmarks/README.md "Small frames in the web worker" has the numbers. Only what
# no third-party decoder touches qualifies: uncompressed little-endian greyscale data read by
# ``_native_frame`` (numpy over the file's bytes), at most SMALL_PIXELS a frame, from a file
# of at most SMALL_FILE_BYTES whose header (Pixel Data's tag looked for before parsing) is at
# most SMALL_HEADER_BYTES. The cache counts each entry's parsed header and sequence items.
# Memory and time stay bounded by those sizes, and anything that goes wrong here sends the
# request to the render processes, which answer it as before (docs/security.md 32).
SMALL_PIXELS = 256 * 256
SMALL_HEADER_BYTES = 16 << 10  # typical single-frame CT and MR headers: 2-12 KB
SMALL_FILE_BYTES = 2 * SMALL_PIXELS + SMALL_HEADER_BYTES  # one 16-bit frame and its header
SMALL_CACHE_BYTES = 16 << 20  # per web worker: about 100 prepared 16-bit 256x256 frames
_SMALL_UNSUITED_KEPT = 4096
_small_lock = threading.Lock()
_small_frames = FrameCache(SMALL_CACHE_BYTES)
_small_unsuited: OrderedDict[str, None] = OrderedDict()  # digests the render processes take


def render_here(source: StoredFile, index: int, rendition: Rendition, max_pixels: int,
                fallback: Window | None = None) -> bytes | None:
    """A small plain frame of a stored file rendered in this process, or None when the
    render processes must do it (too large, compressed, colour, or anything unexpected)."""
    if source.sha256 in _small_unsuited:
        return None
    key = (source.sha256, index, rendition.width, rendition.height)
    with _small_lock:
        prepared = _small_frames.get(key)
    if prepared is None:
        header_bytes = items = 0
        try:
            decoded = None
            if os.stat(source.path).st_size <= SMALL_FILE_BYTES:
                data = source.read()
                # Pixel Data's tag past the bound: a long header, not parsed here at all.
                if 0 <= data.find(PIXEL_DATA_TAG) <= SMALL_HEADER_BYTES:
                    decoded = decode_native_frame(data, index, min(max_pixels, SMALL_PIXELS))
            if decoded is not None and decoded[2] <= SMALL_HEADER_BYTES:
                header_bytes, items = decoded[2], sequence_items(decoded[1])
                prepared = prepare_decoded(decoded[0], decoded[1], rendition)
        except Exception:  # too large, not an image, a missing or corrupt file: the pool's
            prepared = None
        with _small_lock:
            if prepared is None:
                _small_unsuited[source.sha256] = None
                while len(_small_unsuited) > _SMALL_UNSUITED_KEPT:
                    _small_unsuited.popitem(last=False)
                return None
            prepared = _small_frames.put(key, prepared, header_bytes, items)
    try:
        with timed_render(render_here):
            return finish_frame(prepared, rendition, fallback)
    except Exception:  # the render processes answer it, with their reason if they refuse
        return None


_volumes: OrderedDict[str, Volume] = OrderedDict()
KEPT_VOLUMES = 2  # per process; a 150-slice CT reduced to 256 wide is about 40 MB
READ_SHARE, DECODED_SHARE = 0.3, 0.95  # of a volume build's progress; the rest is saving


def _keep(key: str, volume: Volume) -> None:
    if _frames is not None:
        _volumes[key] = volume
        while len(_volumes) > KEPT_VOLUMES:
            _volumes.popitem(last=False)


def _built(key: str, sources: list[bytes | StoredFile], files: VolumeFiles | None) -> Volume:
    """Build a series' volume, telling ``files`` how far it got and keeping the result there
    (or, when it forms no volume, why)."""
    if files is None:
        return build_volume([s if isinstance(s, bytes) else s.read() for s in sources])
    files.start(key)
    try:
        data: list[bytes] = []
        for count, source in enumerate(sources, start=1):
            data.append(source if isinstance(source, bytes) else source.read())
            if count % 8 == 0:  # reading takes about a third of a build
                files.report(key, READ_SHARE * count / len(sources))
        volume = build_volume(data, progress=lambda done: files.report(
            key, READ_SHARE + (DECODED_SHARE - READ_SHARE) * done))
    except NotAVolume as exc:
        files.finish(key, refused=str(exc))
        raise
    except BaseException:
        files.finish(key)
        raise
    files.save(key, volume)
    files.finish(key)
    return volume


def render_volume_source(key: str, sources: list[bytes | StoredFile], kind: str,
                         position: float, angle: float, rendition: Rendition,
                         files: VolumeFiles | None = None) -> bytes:
    """A reformat or MIP of the series whose content digest is ``key``.

    The built volume is kept (when this process keeps frames at all), so the next position
    or angle of the same series cuts it instead of reading and decoding every slice again;
    with ``files`` it is loaded from (or, once built, written to) the volume folder.
    """
    return render_volume_view(_volume(key, sources, files), kind, position, angle, rendition)


def _volume(key: str, sources: list[bytes | StoredFile], files: VolumeFiles | None) -> Volume:
    """The series' volume: kept in this process, else loaded from the folder, else built."""
    volume = _volumes.get(key)
    if volume is None:
        volume = files.load(key) if files is not None else None
        if volume is None:
            volume = _built(key, sources, files)
        _keep(key, volume)
    else:
        _volumes.move_to_end(key)
    return volume


_grids: dict[str, tuple[Grid, Grid]] = {}  # the last turned volume: full and halved


def render_turned_source(key: str, sources: list[bytes | StoredFile], turn: Turn,
                         rendition: Rendition, files: VolumeFiles | None = None) -> bytes:
    """A 3D view or oblique MIP of the series whose content digest is ``key``, turned as
    ``turn`` says (portal/imaging/render3d.py); the halved volume for quick views while a
    finger turns it is made once and kept beside the volume."""
    volume = _volume(key, sources, files)
    grids = _grids.get(key)
    if grids is None:
        full = volume.grid()
        grids = (full, halved(full))
        _grids.clear()  # one at a time: a 150-slice CT's pair is about 45 MB
        if _frames is not None:
            _grids[key] = grids
    return render_turned(grids[0], grids[1], volume.is_ct, volume.window, volume.mip_window,
                         turn, rendition)


def prepare_volume(key: str, sources: list[bytes | StoredFile],
                   files: VolumeFiles) -> Window | None:
    """Build a series' volume into the volume folder unless it is there; its MIP window.

    NotAVolume when the slices form none (the reason is kept for the viewer too).
    """
    volume = _volumes.get(key)
    if volume is not None and files.state(key)[0] != "ready":
        files.save(key, volume)  # pruned from the folder, still here: the others need it too
    volume = volume or files.load(key) or _built(key, sources, files)
    _keep(key, volume)
    return volume.mip_window


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


STARTUP_SECONDS = 120.0  # a render process loading its decoders on a busy machine


class _Child:
    """One render process and the pipe to it; used by one request thread at a time."""

    def __init__(self, context: Any, memory_bytes: int, frame_cache_bytes: int) -> None:
        self.conn, theirs = context.Pipe()
        self.process = context.Process(target=_serve, args=(theirs, memory_bytes,
                                                            frame_cache_bytes),
                                       name="portal-render", daemon=True)
        self.process.start()
        theirs.close()
        self.ready = False  # it says so once its decoders are loaded
        self._stopped = False
        self._stop_lock = threading.Lock()

    def stop(self) -> None:
        """Kill the process (a looping decoder does not stop on its own), reap it and close
        the pipe; only the thread using the child (or the pool, for an idle one) calls this,
        and a second call does nothing."""
        with self._stop_lock:
            if self._stopped:
                return
            self._stopped = True
        self.process.kill()
        self.process.join(timeout=5)
        with contextlib.suppress(OSError):
            self.conn.close()


def _serve(conn: Any, memory_bytes: int, frame_cache_bytes: int) -> None:
    """A render process: capped, decoders loaded, then one call after another from the pipe."""
    _start_child(memory_bytes, frame_cache_bytes)
    conn.send(("ready", None))
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            return  # the web worker is gone
        if task is None:
            return
        function, args = task
        try:
            answer: tuple[str, Any] = ("ok", function(*args))
        except Exception as exc:  # MemoryError from the cap included: the caller decides
            answer = ("error", exc)
        try:
            conn.send(answer)
        except Exception as exc:  # an answer that cannot be pickled
            conn.send(("error", RenderRefused(f"the render failed ({exc.__class__.__name__})")))


def _affinity(args: tuple[Any, ...]) -> str | None:
    """What a call is about, so the same image (or series volume) goes to the same process
    and finds its decoded frame (or built volume) there: a stored file's digest, or the
    volume key a reformat names first."""
    if not args:
        return None
    first = args[0]
    if isinstance(first, StoredFile):
        return first.sha256
    return first if isinstance(first, str) else None


@contextlib.contextmanager
def timed_render(function: Callable[..., Any]) -> Iterator[None]:
    """Count a render call's time in ``portal_render_seconds`` (outcome: answered, or
    failed: raised, timed out or crashed)."""
    started = time.perf_counter()
    outcome = "failed"
    try:
        yield
        outcome = "answered"
    finally:
        metrics.RENDER_SECONDS.labels(getattr(function, "__name__", "other"), outcome).observe(
            time.perf_counter() - started)


class RenderPool:
    """Renders frames in capped child processes; ``run`` raises RenderRefused on failure.

    Each process sits in a slot and is reached through its own pipe, held by one request
    thread for one call: a round trip costs about 0.06-0.09 ms here, a third of what a
    ProcessPoolExecutor's queues and helper threads cost. A call about a stored image goes to
    the slot its digest picks when that one is free, so window changes and rescrolls find the
    decoded frame, and the processes' frame caches add up instead of holding the same frames.
    A call that outlives ``timeout_seconds`` or whose process dies has that process killed
    and replaced; the other processes keep working.
    """

    def __init__(self, workers: int = 2, memory_bytes: int = 2 << 30,
                 timeout_seconds: float = 30.0, frame_cache_bytes: int = 0) -> None:
        self.workers = max(1, workers)
        self.memory_bytes = memory_bytes
        self.frame_cache_bytes = frame_cache_bytes
        self.timeout = timeout_seconds
        self._slots: list[_Child | None] = [None] * self.workers
        self._busy: set[int] = set()
        self._free = threading.Condition()
        self._closed = False
        self.failures = 0

    def _new_child(self) -> _Child:
        # spawn, not fork: the web worker has threads, and a forked copy of a threaded
        # process can deadlock on a lock some other thread held.
        return _Child(multiprocessing.get_context("spawn"), self.memory_bytes,
                      self.frame_cache_bytes)

    def processes(self) -> list[Any]:
        """The render processes now in the pool (multiprocessing.Process objects)."""
        with self._free:
            return [child.process for child in self._slots if child is not None]

    def start(self) -> None:
        """Start the render processes now (they load every decoder as they start), so the
        first images a web worker serves do not wait for that."""
        with self._free:
            for slot, child in enumerate(self._slots):
                if child is None and slot not in self._busy and not self._closed:
                    self._slots[slot] = self._new_child()

    def _checkout(self, key: str | None) -> tuple[int, _Child]:
        """A free slot (the key's own when it is free) with a live process in it."""
        wanted = zlib.crc32(key.encode()) % self.workers if key else None
        started = time.monotonic()
        deadline = started + self.timeout
        queue = metrics.RENDER_PROCESSES.labels("queue")
        with self._free:
            queue.inc()  # the render queue: calls waiting for a process (portal/metrics.py)
            try:
                while True:
                    if self._closed:
                        raise RenderRefused("the image renderers have stopped (shutting down)")
                    free = [i for i in range(self.workers) if i not in self._busy]
                    if free:
                        slot = wanted if wanted in free else free[-1]
                        break
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise RenderRefused("the image renderers are busy; try again")
                    self._free.wait(timeout=min(left, 0.25))
            finally:
                queue.dec()
            self._busy.add(slot)
            metrics.RENDER_PROCESSES.labels("busy").set(len(self._busy))
            child = self._slots[slot]
        metrics.RENDER_WAIT_SECONDS.labels("render").observe(time.monotonic() - started)
        if child is None or not child.process.is_alive():
            if child is not None:  # it died while idle (killed, or out of memory elsewhere)
                child.stop()
            child = self._new_child()
            with self._free:
                if not self._closed:
                    self._slots[slot] = child
            if self._closed:  # closed meanwhile: this process would outlive the pool
                self._checkin(slot, child, failed=True)
                raise RenderRefused("the image renderers have stopped (shutting down)")
        return slot, child

    def _checkin(self, slot: int, child: _Child, *, failed: bool = False) -> None:
        """Give the slot back; a failed process is killed and replaced at once (the new
        one loads its decoders while the pool goes on)."""
        if failed or self._closed:
            child.stop()
        with self._free:
            if failed and not self._closed and self._slots[slot] is child:
                self._slots[slot] = self._new_child()
            self._busy.discard(slot)
            metrics.RENDER_PROCESSES.labels("busy").set(len(self._busy))
            self._free.notify()

    def run(self, function: Callable[..., Any], *args: Any) -> Any:
        """Run a rendering function (a module-level one) in a child process."""
        slot, child = self._checkout(_affinity(args))
        try:
            with timed_render(function):
                answer = self._call(child, function, args)
        except (EOFError, OSError):
            closing = self._closed
            self._checkin(slot, child, failed=True)
            if closing:  # the pool stopped its process under this call
                raise RenderRefused("the image renderers have stopped (shutting down)") from None
            self.failures += 1
            metrics.RENDER_FAILURES.labels("crash").inc()
            log.error("a render process died (decoder crash); it was replaced")
            raise RenderRefused("the image could not be decoded (the decoder failed)") from None
        except BaseException:
            self._checkin(slot, child, failed=True)  # timed out, or arguments that cannot
            raise                                    # be pickled: a clean slate
        self._checkin(slot, child)
        status, value = answer
        if status == "ok":
            return value
        if isinstance(value, MemoryError):
            raise RenderRefused("the image needs more memory than rendering may use") from value
        raise value

    def _call(self, child: _Child, function: Callable[..., Any],
              args: tuple[Any, ...]) -> tuple[str, Any]:
        if not child.ready:  # starting up is not part of the call's time
            if not child.conn.poll(STARTUP_SECONDS):
                raise RenderRefused("the image renderer did not start in time")
            child.conn.recv()
            child.ready = True
        child.conn.send((function, args))
        if not child.conn.poll(self.timeout):
            self.failures += 1
            metrics.RENDER_FAILURES.labels("timeout").inc()
            log.error("render took longer than %.0f s; its process was stopped", self.timeout)
            raise RenderRefused("rendering took too long and was stopped")
        answer: tuple[str, Any] = child.conn.recv()
        return answer

    def close(self) -> None:
        """Stop the child processes: idle ones are asked to end, busy ones are killed and the
        thread that was using each closes its pipe (never two threads on one pipe)."""
        with self._free:
            self._closed = True
            slots = [(slot in self._busy, child) for slot, child in enumerate(self._slots)
                     if child is not None]
            self._slots = [None] * self.workers
            self._free.notify_all()
        for busy, child in slots:
            if busy:
                child.process.kill()
                continue
            with contextlib.suppress(OSError):
                child.conn.send(None)
            child.process.join(timeout=2)
            child.stop()
