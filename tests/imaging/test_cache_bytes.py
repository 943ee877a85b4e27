"""The in-process caches hold at most their byte caps (issue 17 item 5: a web worker's peak
stays within 300 MB with its caches full): the render cache counts what its entries really
hold, keys included, so many small entries cannot outgrow it; the render processes' frame
cache keeps its prepared frames within its cap. Real parts: the render pipeline (pydicom,
numpy, Pillow) making the cached images, tracemalloc measuring what is held."""

from __future__ import annotations

import tracemalloc

from portal.imaging.cache import MemoryCache
from portal.imaging.render import FrameCache, prepare_frame, render_frame
from portal.imaging.rendition import Rendition, Window
from tests.factories import make_instance


def _held_by(fill: object) -> int:
    """Bytes still allocated after ``fill()`` ran (what the filled cache holds)."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        assert callable(fill)
        fill()
        return tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


def test_the_render_cache_holds_at_most_its_cap_of_real_images() -> None:
    data = make_instance(rows=256, columns=256)
    images = [render_frame(data, 0, Rendition(window=Window(40 + i, 400), quality=90))
              for i in range(40)]
    cap = 4 * sum(len(i) for i in images[:4])  # room for about 16 of the 40
    cache = MemoryCache(cap)

    def fill() -> None:
        for number, image in enumerate(images * 3):
            cache.put(f"r:v7:{number}:{'0' * 64}:1:jpeg:q90", bytes(image))

    held = _held_by(fill)
    assert cache.size <= cap
    assert held <= cap * 1.05, (held, cap)  # the count is what the entries really hold
    assert cache.get(f"r:v7:{119}:{'0' * 64}:1:jpeg:q90") is not None  # newest kept
    assert cache.get(f"r:v7:{0}:{'0' * 64}:1:jpeg:q90") is None  # oldest dropped


def test_many_small_entries_cannot_outgrow_the_render_cache() -> None:
    cap = 1 << 20
    cache = MemoryCache(cap)

    def fill() -> None:  # the series windows the service keeps beside the images
        for number in range(50_000):
            cache.put(f"window:v7:{number:064d}", f"{40.0 + number!r},400.0".encode())

    held = _held_by(fill)
    assert cache.size <= cap
    # Counting values only, 50,000 windows (about 1 MB of values) would have held 12 MB.
    assert held <= cap * 1.1, (held, cap)


def test_an_entry_larger_than_a_quarter_of_the_cap_is_not_kept() -> None:
    cache = MemoryCache(1 << 20)
    cache.put("big", bytes(300_000))
    cache.put("small", bytes(1000))
    assert cache.get("big") is None and cache.get("small") is not None


def test_the_frame_cache_keeps_its_prepared_frames_within_its_cap() -> None:
    cap = 6 * 128 * 128 * 2  # six 128x128 16-bit frames
    frames = FrameCache(cap)
    data = [make_instance(rows=128, columns=128, value=i) for i in range(12)]
    rendition = Rendition(window=Window(40, 400))

    def fill() -> None:
        for number, one in enumerate(data):
            frames.put(("sha", number, None, None), prepare_frame(one, 0, rendition))

    held = _held_by(fill)
    assert frames._size <= cap
    assert held <= cap * 1.5, (held, cap)  # pixels plus each frame's parsed header
