"""Decoding in separate processes with a memory cap and a time bound (SECURITY.md 32).

A hostile or broken file can make a decoder allocate without end, loop, or crash. Rendering
runs in a small pool of spawned processes whose address space is capped (RLIMIT_AS); a call
that takes too long or kills its process fails that request with a clear reason, the pool is
rebuilt, and the web worker keeps serving.
"""

from __future__ import annotations

import logging
import multiprocessing
import resource
import threading
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from portal.imaging.render import FrameNotFound, RenderRefused, render_frame
from portal.imaging.rendition import Rendition
from portal.imaging.volume import NotAVolume

log = logging.getLogger(__name__)


def _limit_memory(memory_bytes: int) -> None:
    """Runs first in every render process: cap its address space."""
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))


class RenderPool:
    """Renders frames in capped child processes; ``render`` raises RenderRefused on failure."""

    def __init__(self, workers: int = 2, memory_bytes: int = 2 << 30,
                 timeout_seconds: float = 30.0) -> None:
        self.workers = workers
        self.memory_bytes = memory_bytes
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
                    initializer=_limit_memory, initargs=(self.memory_bytes,))
            return self._executor

    def _reset(self, executor: ProcessPoolExecutor) -> None:
        with self._lock:
            if self._executor is executor:
                self._executor = None
        for process in list(getattr(executor, "_processes", {}).values()):
            process.kill()  # a looping decoder does not stop on its own
        executor.shutdown(wait=False, cancel_futures=True)

    def render(self, data: bytes, index: int, rendition: Rendition, max_pixels: int) -> bytes:
        """Render one frame in a child process."""
        return self.run(render_frame, data, index, rendition, max_pixels)

    def run(self, function: Callable[..., bytes], *args: Any) -> bytes:
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
            result: bytes = future.result(timeout=self.timeout)
            return result
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
