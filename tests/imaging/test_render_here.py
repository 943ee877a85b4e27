"""Small plain frames rendered in the web worker (issue 17 item 2; ``render_here`` in
``portal/imaging/isolation.py``): a small uncompressed greyscale frame never waits for a
render process, and its answer is byte for byte the one a render process makes; compressed,
colour, large or broken files still go to the render processes, which answer as before.
Real parts: SQLite, the isolated render processes, pydicom, Pillow."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from flask import Flask
from flask.testing import FlaskClient
from PIL import Image
from pydicom.uid import RLELossless

from portal.imaging import isolation
from portal.imaging.cache import MemoryCache
from portal.imaging.isolation import RenderPool
from tests.factories import make_dataset, to_bytes
from tests.imaging.test_render import store, url

JPEG = {"Accept": "image/jpeg"}


class PoolCalls:
    """Counts the calls that reach the app's render processes."""

    def __init__(self, pool: RenderPool) -> None:
        self.pool, self.calls = pool, 0
        self._run = pool.run

    def run(self, function: Any, *args: Any) -> Any:
        self.calls += 1
        return self._run(function, *args)


@pytest.fixture
def pool_calls(app: Flask, monkeypatch: pytest.MonkeyPatch) -> Iterator[PoolCalls]:
    pool = app.extensions["render_pool"]
    assert pool is not None  # the default: renders isolated
    calls = PoolCalls(pool)
    monkeypatch.setattr(pool, "run", calls.run)
    monkeypatch.setattr(isolation, "_small_frames", isolation.FrameCache(
        isolation.SMALL_CACHE_BYTES))
    monkeypatch.setattr(isolation, "_small_unsuited", type(isolation._small_unsuited)())
    yield calls


def _ramp(rows: int, columns: int, **extra: Any) -> bytes:
    ds = make_dataset(rows=rows, columns=columns, **extra)
    ds.PixelData = (np.arange(rows * columns, dtype=np.uint16) % 4096).reshape(
        rows, columns).tobytes()
    return to_bytes(ds)


def _compressed(rows: int, columns: int) -> bytes:
    ds = make_dataset(rows=rows, columns=columns)
    ds.compress(RLELossless, generate_instance_uid=False)
    return to_bytes(ds)


def _pool_bytes(app: Flask, client: FlaskClient, auth: dict[str, str], path: str,
                monkeypatch: pytest.MonkeyPatch) -> bytes:
    """What the render processes make for ``path`` (the web worker's own path turned off,
    the cache emptied)."""
    with monkeypatch.context() as patch:
        patch.setattr(isolation, "render_here", lambda *args, **kw: None)
        patch.setitem(app.extensions, "render_cache", MemoryCache())
        answer = client.get(path, headers={**auth, **JPEG})
    assert answer.status_code == 200
    return answer.data


def test_a_small_plain_frame_is_rendered_here_as_the_pool_renders_it(
        app: Flask, client: FlaskClient, auth: dict[str, str], pool_calls: PoolCalls,
        monkeypatch: pytest.MonkeyPatch) -> None:
    ds = store(app, _ramp(256, 256, RescaleSlope=1, RescaleIntercept=-1024))
    path = url(ds, "rendered?window=40,400&quality=90")
    here = client.get(path, headers={**auth, **JPEG})
    assert here.status_code == 200 and pool_calls.calls == 0
    assert Image.open(io.BytesIO(here.data)).size == (256, 256)
    # Another window on the same frame: the prepared frame is kept, still no render process.
    other = client.get(url(ds, "rendered?window=300,1500"), headers={**auth, **JPEG})
    assert other.status_code == 200 and other.data != here.data and pool_calls.calls == 0
    assert _pool_bytes(app, client, auth, path, monkeypatch) == here.data
    assert pool_calls.calls == 1


@pytest.mark.parametrize("make", [
    pytest.param(lambda: _ramp(512, 512), id="more pixels than 256x256"),
    pytest.param(lambda: _compressed(64, 64), id="compressed"),
    pytest.param(lambda: to_bytes(make_dataset(
        rows=64, columns=64, PhotometricInterpretation="RGB", SamplesPerPixel=3,
        PlanarConfiguration=0, BitsAllocated=8, BitsStored=8, HighBit=7,
        PixelData=bytes(64 * 64 * 3))), id="colour"),
])
def test_other_frames_go_to_the_render_processes_once_and_are_remembered(
        app: Flask, client: FlaskClient, auth: dict[str, str], pool_calls: PoolCalls,
        make: Any) -> None:
    ds = store(app, make())
    for centre in (40, 50):
        answer = client.get(url(ds, f"rendered?window={centre},400"), headers={**auth, **JPEG})
        assert answer.status_code == 200
    assert pool_calls.calls == 2
    assert ds.SOPInstanceUID and len(isolation._small_unsuited) == 1


def test_whatever_fails_here_is_left_to_the_render_processes(
        app: Flask, client: FlaskClient, auth: dict[str, str], pool_calls: PoolCalls,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A surprise while decoding or encoding here (a hostile header, a bug) costs this
    request a trip to the render processes, whose isolation and reasons then apply."""
    ds = store(app, _ramp(128, 128))

    def hostile(*_args: Any) -> Any:
        raise RecursionError("a header built to exhaust the parser")

    with monkeypatch.context() as patch:
        patch.setattr(isolation, "decode_native_frame", hostile)
        answer = client.get(url(ds, "rendered?window=40,400"), headers={**auth, **JPEG})
    assert answer.status_code == 200 and pool_calls.calls == 1
    other = store(app, _ramp(64, 64))
    with monkeypatch.context() as patch:
        patch.setattr(isolation, "finish_frame", hostile)
        answer = client.get(url(other, "rendered?window=40,400"), headers={**auth, **JPEG})
    assert answer.status_code == 200 and pool_calls.calls == 2
    # The frame that failed to encode here was prepared, and is still rendered here later.
    answer = client.get(url(other, "rendered?window=41,400"), headers={**auth, **JPEG})
    assert answer.status_code == 200 and pool_calls.calls == 2


def test_a_large_header_is_left_to_the_render_processes(
        app: Flask, client: FlaskClient, auth: dict[str, str], pool_calls: PoolCalls) -> None:
    """A parsed header holds about 15 times its bytes: one past SMALL_HEADER_BYTES (a file
    full of private elements) is not kept in a web worker."""
    ds = make_dataset(rows=64, columns=64)
    for number in range(2500):
        ds.add_new((0x0011, 0x1000 + number), "LT", "x" * 30)
    data = to_bytes(ds)
    assert isolation.SMALL_HEADER_BYTES < len(data) <= isolation.SMALL_FILE_BYTES
    stored = store(app, data)
    answer = client.get(url(stored, "rendered?window=40,400"), headers={**auth, **JPEG})
    assert answer.status_code == 200 and pool_calls.calls == 1


def test_the_frame_cache_counts_what_a_kept_header_holds() -> None:
    from portal.imaging.render import HEADER_COST, FrameCache, Prepared, decode_native_frame

    decoded = decode_native_frame(_ramp(32, 32), 0, isolation.SMALL_PIXELS)
    assert decoded is not None
    frame, header, header_bytes = decoded
    prepared = Prepared(frame, header)
    entry = prepared.nbytes + HEADER_COST * header_bytes
    cache = FrameCache(entry * 10)
    for number in range(50):
        cache.put(("frame", number), prepared, header_bytes)
    assert len(cache._items) == 10  # not the 10 x (1 + 16 x header / pixels) the pixels allow
    assert cache._size == 10 * entry
    assert header.buffer is None  # the file's bytes are not kept with the header


def test_sequence_items_count_in_a_kept_header() -> None:
    """Empty sequence items hold about 1.4 KB each whatever their few bytes in the file:
    a header of many of them fills the bound with few entries."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    from portal.imaging.render import ITEM_COST, FrameCache, Prepared, decode_native_frame

    ds = make_dataset(rows=16, columns=16)
    ds.ReferencedImageSequence = Sequence([Dataset() for _ in range(300)])
    decoded = decode_native_frame(to_bytes(ds), 0, isolation.SMALL_PIXELS)
    assert decoded is not None
    frame, header, header_bytes = decoded
    from portal.imaging.render import sequence_items

    assert sequence_items(header) == 300
    cache = FrameCache(8 * ITEM_COST * 300)
    for number in range(20):
        cache.put(("frame", number), Prepared(frame, header), header_bytes, 300)
    assert len(cache._items) < 8
