"""Rendering: the pure pipeline against independent references, DCMTK, and the HTTP rules."""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from flask import Flask
from flask.testing import FlaskClient
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import RLELossless, generate_uid

from portal.archive import current_archive
from portal.archive.validate import Rejected
from portal.imaging.render import RenderRefused, render_frame, window_to_8bit
from portal.imaging.rendition import InvalidRendition, Rendition, Window, parse_rendition
from tests.conftest import sample_paths
from tests.factories import make_dataset, make_instance, to_bytes


def test_linear_window_follows_ps3_3() -> None:
    # PS3.3 C.11.2.1.2.1: below c - 0.5 - (w-1)/2 -> 0, above c - 0.5 + (w-1)/2 -> max.
    values = np.array([-1000, -161, 40, 239, 240, 3000], dtype=np.float32)
    out = window_to_8bit(values, Window(40.0, 400.0))
    reference = np.clip(((values - 39.5) / 399.0 + 0.5) * 255.0, 0, 255).astype(np.uint8)
    assert out.tolist() == reference.tolist()
    assert out[0] == 0 and out[-1] == 255
    sigmoid = window_to_8bit(np.array([40.0]), Window(40.0, 400.0, "sigmoid"))
    assert abs(int(sigmoid[0]) - 127) <= 1


@pytest.mark.parametrize(("args", "accept", "message"), [
    ({"window": "40,0"}, "", "greater than 0"), ({"window": "40,-5"}, "", "greater than 0"),
    ({"window": "a,b"}, "", "numbers"), ({"window": "1,2,cubic"}, "", "function"),
    ({"width": "333"}, "", "width must be"), ({"quality": "0"}, "", "quality"),
    ({"viewport": "0,10"}, "", "viewport"), ({}, "image/gif", "image/jpeg"),
    ({"preset": "mystery"}, "", "preset")])
def test_renditions_outside_the_allow_list_are_refused(args: dict[str, str], accept: str,
                                                       message: str) -> None:
    with pytest.raises(InvalidRendition, match=message):
        parse_rendition(args, accept)


def test_monochrome1_is_inverted_and_rescale_applied() -> None:
    ds = make_dataset(rows=4, columns=4)
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.PixelData = np.full((4, 4), 1024 + 40, dtype=np.uint16).tobytes()  # 40 HU after rescale
    png = render_frame(to_bytes(ds), 0, Rendition(format="png", window=Window(40, 400)))
    grey = np.asarray(Image.open(io.BytesIO(png)))
    expected = 255 - int(((40 - 39.5) / 399 + 0.5) * 255)
    assert np.all(grey == expected)


def test_pixel_aspect_ratio_is_honoured() -> None:
    ds = make_dataset(rows=100, columns=100, PixelSpacing=[2.0, 1.0])
    png = render_frame(to_bytes(ds), 0, Rendition(format="png"))
    assert Image.open(io.BytesIO(png)).size == (100, 200)


@pytest.mark.parametrize(("name", "center", "width"), [
    ("CT_small.dcm", 40, 400), ("CT_small.dcm", -600, 1500), ("MR_small.dcm", 600, 1200),
    ("MR_small_RLE.dcm", 600, 1200), ("JPEG-LL.dcm", 600, 1200),
    ("JPEG-lossy.dcm", 130, 260)])  # decoded by DCMTK's dcmdjpeg: no Python decoder reads it
def test_renders_match_dcmtk_within_two_grey_levels(tmp_path: Path, name: str, center: int,
                                                    width: int) -> None:
    source = next(p for p in sample_paths() if p.name == name)
    ours = np.asarray(Image.open(io.BytesIO(render_frame(
        source.read_bytes(), 0, Rendition(format="png", window=Window(center, width)))))
    ).astype(int)
    pgm = tmp_path / "out.pgm"
    subprocess.run(["/usr/bin/dcmj2pnm", "+Ww", str(center), str(width), "+on", str(source),
                    str(pgm)], check=True, capture_output=True, timeout=60)
    theirs = np.asarray(Image.open(pgm)).astype(int)
    assert theirs.shape == ours.shape
    difference = np.abs(theirs - ours)
    assert difference.max() <= 2, difference.max()
    mse = float(np.mean(difference.astype(float) ** 2))
    psnr = 99.0 if mse == 0 else 10 * np.log10(255**2 / mse)
    assert psnr > 40


def store(app: Flask, data: bytes) -> pydicom.Dataset:
    with app.app_context():
        current_archive().ingest(data, who="test")
    return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)


def url(ds: pydicom.Dataset, tail: str) -> str:
    return (f"/dicomweb/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
            f"/instances/{ds.SOPInstanceUID}/{tail}")


def test_rendered_with_etag_cache_and_formats(app: Flask, client: FlaskClient,
                                              auth: dict[str, str]) -> None:
    ds = store(app, make_instance(rows=600, columns=600))
    first = client.get(url(ds, "rendered?window=40,400&viewport=512,512"), headers=auth)
    assert first.status_code == 200 and first.mimetype == "image/jpeg"
    assert "private" in first.headers["Cache-Control"] and "max-age" in first.headers[
        "Cache-Control"]
    assert Image.open(io.BytesIO(first.data)).size == (512, 512)
    again = client.get(url(ds, "rendered?window=40,400&viewport=512,512"),
                       headers={**auth, "If-None-Match": first.headers["ETag"]})
    assert again.status_code == 304 and not again.data
    webp = client.get(url(ds, "rendered"), headers={**auth, "Accept": "image/webp"})
    assert webp.mimetype == "image/webp" and Image.open(io.BytesIO(webp.data)).format == "WEBP"
    thumb = client.get(url(ds, "thumbnail"), headers=auth)
    assert max(Image.open(io.BytesIO(thumb.data)).size) == 128
    series = client.get(f"/dicomweb/studies/{ds.StudyInstanceUID}/series/"
                        f"{ds.SeriesInstanceUID}/thumbnail", headers=auth)
    assert series.status_code == 200
    study = client.get(f"/dicomweb/studies/{ds.StudyInstanceUID}/thumbnail", headers=auth)
    assert study.status_code == 200


def test_bad_requests_get_clear_errors(app: Flask, client: FlaskClient,
                                       auth: dict[str, str]) -> None:
    ds = store(app, make_instance())
    assert client.get(url(ds, "frames/2/rendered"), headers=auth).status_code == 404
    assert client.get(url(ds, "rendered?window=40,0"), headers=auth).status_code == 400
    gif = client.get(url(ds, "rendered"), headers={**auth, "Accept": "image/gif"})
    assert gif.status_code == 406 and "image/jpeg" in gif.get_json()["error"]  # PS3.18 8.7.4
    other = client.get(f"/dicomweb/studies/{generate_uid()}/series/{ds.SeriesInstanceUID}"
                       f"/instances/{ds.SOPInstanceUID}/rendered", headers=auth)
    assert other.status_code == 404


def test_corrupt_and_oversized_compressed_frames_fail_one_request(
        app: Flask, client: FlaskClient, auth: dict[str, str]) -> None:
    ds = make_dataset(rows=64, columns=64)
    ds.compress(RLELossless, generate_instance_uid=False)
    data = bytearray(to_bytes(ds))
    # Scribble over the RLE segment offsets in the frame's header: the decoder must fail.
    header = data.index(b"\xfe\xff\x00\xe0", data.index(b"\xe0\x7f\x10\x00") + 12 + 8)
    data[header + 8:header + 72] = b"\xff" * 64
    corrupt = store(app, bytes(data))
    broken = client.get(url(corrupt, "rendered"), headers=auth)
    assert broken.status_code == 422 and "cannot be decoded" in broken.get_json()["error"]
    big = make_dataset(rows=8, columns=8)
    big.BitsAllocated, big.BitsStored, big.HighBit = 8, 8, 7
    big.PixelData = bytes(64)
    big.compress(RLELossless, generate_instance_uid=False)
    big.Rows = big.Columns = 30000
    huge = store(app, to_bytes(big))
    refused = client.get(url(huge, "rendered"), headers=auth)
    assert refused.status_code == 422 and "too large" in refused.get_json()["error"]
    assert client.get(url(huge, "metadata"), headers=auth).status_code == 200  # still serving


def _short_table() -> Dataset:
    """A lookup table item whose data is shorter than its descriptor says (4096 entries)."""
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.add_new(0x00283006, "US", list(range(10)))  # LUT Data: 10 entries
    return item


@pytest.mark.parametrize("size", [64, 320])  # tried in the web worker first, or not
def test_malformed_lookup_tables_are_refused_with_a_reason(
        app: Flask, client: FlaskClient, auth: dict[str, str], size: int) -> None:
    """A file's Modality or VOI LUT shorter than its descriptor made pydicom raise
    IndexError in the render process, which reached the viewer as a 500."""
    modality = make_dataset(rows=size, columns=size,
                            ModalityLUTSequence=Sequence([_short_table()]))
    voi = make_dataset(rows=size, columns=size, VOILUTSequence=Sequence([_short_table()]))
    for ds, table in ((modality, "Modality LUT"), (voi, "VOI LUT")):
        stored = store(app, to_bytes(ds))
        for rendition in ("rendered", "thumbnail", "rendered?viewport=128,128"):
            answer = client.get(url(stored, rendition), headers=auth)
            assert answer.status_code == 422, (table, rendition, answer.status_code)
            assert f"{table} cannot be applied" in answer.get_json()["error"]
        assert client.get(url(stored, "metadata"), headers=auth).status_code == 200
    fine = store(app, make_instance(rows=size, columns=size))
    assert client.get(url(fine, "rendered"), headers=auth).status_code == 200  # pool serves


@pytest.mark.parametrize("isolated", [True, False])
def test_an_unexpected_error_in_a_render_process_is_refused_not_a_500(
        tmp_path: Path, isolated: bool) -> None:
    """The safety net under the named cases: whatever else a stored file makes a renderer
    raise is refused with its kind (422), in the render processes or without them; our own
    errors keep their status."""
    from portal.imaging.service import RenderFailed, run_isolated
    from tests.conftest import close_app, make_app

    app = make_app(tmp_path / "instance", RENDER_ISOLATION=isolated)
    try:
        with app.app_context():
            assert (app.extensions.get("render_pool") is not None) is isolated
            with pytest.raises(RenderFailed, match=r"could not be rendered \(ZeroDivisionError\)"):
                run_isolated(divmod, 1, 0)
            with pytest.raises(InvalidRendition):  # a PortalError: 400 as before
                run_isolated(parse_rendition, {"quality": "x"}, "")
            assert run_isolated(divmod, 7, 2) == (3, 1)
    finally:
        close_app(app)


def test_every_shipped_sample_renders_or_is_refused_with_a_reason(
        app: Flask, client: FlaskClient, auth: dict[str, str]) -> None:
    rendered, refused = 0, []
    for path in sample_paths():
        data = path.read_bytes()
        try:
            with app.app_context():
                current_archive().ingest(data, who="test")
        except Rejected:
            continue
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        if "Rows" not in ds:
            continue
        response = client.get(url(ds, "rendered?viewport=512,512"), headers=auth)
        if response.status_code == 200:
            Image.open(io.BytesIO(response.data)).verify()
            rendered += 1
        else:
            assert response.status_code in (404, 422), (path.name, response.status_code)
            assert response.get_json()["error"], path.name
            refused.append(f"{path.name}: {response.get_json()['error']}")
    assert rendered >= 80, rendered
    # Every sample renders; JPEG-lossy.dcm (a 12-bit JPEG Extended stream with a misplaced
    # marker, which libjpeg refuses) only through DCMTK's dcmdjpeg, the last resort.
    assert refused == [], refused


def test_renditions_are_cached_in_a_real_redis(tmp_path: Path, redis_url: str) -> None:
    import redis

    from tests.conftest import basic_auth, make_app, make_client

    app = make_app(tmp_path / "instance", REDIS_URL=redis_url)
    auth = basic_auth(*make_client(app, "redis-reader"))
    ds = store(app, make_instance(rows=64, columns=64))
    client = app.test_client()
    first = client.get(url(ds, "rendered?quality=70"), headers=auth)
    assert first.status_code == 200
    keys = [k.decode() for k in redis.Redis.from_url(redis_url).keys("render:*")]
    assert len(keys) >= 1
    assert all(ds.SOPInstanceUID not in k and "Doe" not in k for k in keys)  # no PHI in keys
    assert first.data in [redis.Redis.from_url(redis_url).get(k) for k in keys]
    redis.Redis.from_url(redis_url).flushall()
    assert client.get(url(ds, "rendered?quality=70"), headers=auth).data == first.data


def test_a_frame_that_needs_too_much_memory_fails_alone(tmp_path: Path) -> None:
    """Decoding runs in capped processes: the big frame gets a 422, the next one renders."""
    from tests.conftest import basic_auth, close_app, make_app, make_client

    app = make_app(tmp_path / "instance", RENDER_MEMORY_MB=400, RENDER_WORKERS=1)
    try:
        auth = basic_auth(*make_client(app, "mem"))
        big = make_dataset(rows=7000, columns=7000)
        big.PixelData = np.zeros((7000, 7000), dtype=np.uint16).tobytes()
        huge = store(app, to_bytes(big))
        del big
        # Rendered by the (replaced) render process, not the web worker (SMALL_PIXELS).
        small = store(app, make_instance(rows=320, columns=320))
        client = app.test_client()
        refused = client.get(url(huge, "rendered"), headers=auth)
        assert refused.status_code == 422
        assert "memory" in refused.get_json()["error"]
        assert client.get(url(small, "rendered"), headers=auth).status_code == 200
    finally:
        close_app(app)


def test_reformats_and_a_turning_mip_from_a_ct_series(app: Flask, client: FlaskClient,
                                                      auth: dict[str, str],
                                                      tmp_path: Path) -> None:
    from demo.studies import write_ct_series

    paths = write_ct_series(tmp_path / "ct", slices=40, size=128, uid_seed="volume-test")
    first = None
    for path in paths:
        first = first or store(app, path.read_bytes())
        if first is not None and path != paths[0]:
            store(app, path.read_bytes())
    assert first is not None
    base = (f"/dicomweb/studies/{first.StudyInstanceUID}/series/{first.SeriesInstanceUID}"
            "/volume")
    images = {}
    for view in ("sagittal", "coronal", "axial", "mip?angle=0", "mip?angle=90"):
        response = client.get(f"{base}/{view}", headers={**auth, "Accept": "image/png"})
        assert response.status_code == 200, (view, response.data[:200])
        images[view] = np.asarray(Image.open(io.BytesIO(response.data)))
    # 40 slices of 375 mm over a 400 mm field: the reformat is about 0.94 times as tall as wide.
    height, width = images["sagittal"].shape
    assert abs(height / width - 375 / 400) < 0.1
    # The MIP's square spans the volume's diagonal; the body in it shows, not washed out.
    mip = images["mip?angle=0"]
    assert (mip > 0).mean() > 0.2 and (mip == 255).mean() < 0.1
    assert not np.array_equal(images["mip?angle=0"], images["mip?angle=90"])
    assert client.get(f"{base}/mip?angle=7", headers=auth).status_code == 400
    assert client.get(f"{base}/oblique", headers=auth).status_code == 404
    single = store(app, make_instance())
    flat = client.get(f"/dicomweb/studies/{single.StudyInstanceUID}/series/"
                      f"{single.SeriesInstanceUID}/volume/sagittal", headers=auth)
    assert flat.status_code == 422 and "three slices" in flat.get_json()["error"]


def test_large_images_reduced_before_the_window_stay_faithful() -> None:
    """3000x2500 shown 1024 wide: block-averaging first stays within a couple of levels."""
    rng = np.random.default_rng(7)
    y, x = np.mgrid[0:2500, 0:3000]
    smooth = (2000 + 1200 * np.sin(x / 300.0) * np.cos(y / 250.0)).astype(np.uint16)
    pixels = smooth + rng.integers(0, 20, smooth.shape, dtype=np.uint16)
    ds = make_dataset(rows=2500, columns=3000, RescaleIntercept=0)
    ds.PixelData = pixels.tobytes()
    window = Window(2000, 2400)
    ours = np.asarray(Image.open(io.BytesIO(render_frame(
        to_bytes(ds), 0, Rendition(width=1024, format="png", window=window))))).astype(float)
    reference = Image.fromarray(window_to_8bit(pixels.astype(np.float32), window)).resize(
        (ours.shape[1], ours.shape[0]), Image.Resampling.BOX)
    difference = np.abs(ours - np.asarray(reference).astype(float))
    assert ours.shape == (853, 1024)
    assert difference.mean() < 1.0 and np.percentile(difference, 99) <= 3


def test_new_series_are_prerendered_after_stow(app: Flask, client: FlaskClient,
                                               auth: dict[str, str]) -> None:
    from portal.imaging.rendition import parse_rendition
    from portal.imaging.service import render_cache
    from tests.conftest import wait_for
    from tests.dicomweb.test_stow import headers, multipart

    study, series = generate_uid(), generate_uid()
    files = [make_instance(study=study, series=series, InstanceNumber=i + 1, value=i)
             for i in range(3)]
    assert client.post("/dicomweb/studies", data=multipart(*files),
                       headers=headers(auth)).status_code == 200
    middle = pydicom.dcmread(io.BytesIO(files[1]), stop_before_pixels=True)
    with app.app_context():
        key = parse_rendition({}, "", thumbnail=True).cache_key(
            current_archive().locate(middle.SOPInstanceUID).sha256, 1)
        assert wait_for(lambda: render_cache().get(key) is not None, timeout=30)
        cached = render_cache().get(key)
    thumbnail = client.get(f"/dicomweb/studies/{study}/series/{series}/thumbnail", headers=auth)
    assert thumbnail.status_code == 200 and thumbnail.data == cached


def test_rendered_series_and_study_are_multipart(app: Flask, live_server: object,
                                                 auth: dict[str, str]) -> None:
    from dicomweb_client.api import DICOMwebClient

    from tests.conftest import make_client

    study, series = generate_uid(), generate_uid()
    for i in range(3):
        store(app, make_instance(study=study, series=series, InstanceNumber=i + 1, value=i))
    import requests

    session = requests.Session()
    session.auth = make_client(app, "rendering-client")
    web = DICOMwebClient(url=f"{live_server.url}/dicomweb", session=session)  # type: ignore[attr-defined]
    single = web.retrieve_series_rendered(study, series, media_types=("image/png",))
    assert Image.open(io.BytesIO(single)).format == "PNG"  # one representative image
    study_image = session.get(f"{live_server.url}/dicomweb/studies/{study}/rendered",  # type: ignore[attr-defined]
                              timeout=30)
    assert Image.open(io.BytesIO(study_image.content)).format == "JPEG"
    response = session.get(f"{live_server.url}/dicomweb/studies/{study}/series/{series}"  # type: ignore[attr-defined]
                           "/rendered", headers={"Accept": 'multipart/related; type="image/png"'},
                           timeout=30)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith('multipart/related; type="image/png"')
    assert response.content.count(b"\x89PNG") == 3


def test_every_demo_series_renders(app: Flask, client: FlaskClient, auth: dict[str, str],
                                   tmp_path_factory: pytest.TempPathFactory) -> None:
    """The demo set (CT, MONOCHROME1 radiographs, colour US cine, MR; RLE, JPEG-LS, JPEG 2000,
    JPEG lossless, JPEG baseline): the middle image of every series, and every cine frame."""
    from demo.studies import generate_demo_set

    paths = generate_demo_set(tmp_path_factory.mktemp("demo"))
    by_series: dict[str, list[pydicom.Dataset]] = {}
    for path in paths:
        by_series.setdefault(path.parent.as_posix(), []).append(store(app, path.read_bytes()))
    assert len(by_series) >= 7
    for items in by_series.values():
        items.sort(key=lambda d: int(d.InstanceNumber))
        middle = items[len(items) // 2]
        frames = int(middle.get("NumberOfFrames") or 1)
        for frame in range(1, frames + 1, max(1, frames // 8)):
            response = client.get(url(middle, f"frames/{frame}/rendered?viewport=512,512"),
                                  headers=auth)
            assert response.status_code == 200, (middle.SeriesDescription, frame)
            image = Image.open(io.BytesIO(response.data))
            assert max(image.size) <= 512 and image.getextrema() != (0, 0)


def test_the_render_pool_recovers_when_a_child_dies(app: Flask, client: FlaskClient,
                                                    auth: dict[str, str]) -> None:
    import os
    import signal

    # Larger than the frames a web worker renders itself (isolation.SMALL_PIXELS).
    ds = store(app, make_instance(rows=320, columns=320))
    assert client.get(url(ds, "rendered?quality=50"), headers=auth).status_code == 200
    pool = app.extensions["render_pool"]
    killed = pool.processes()
    assert killed
    for process in killed:
        os.kill(process.pid, signal.SIGKILL)  # a decoder crash, or the kernel's OOM killer
    from tests.conftest import wait_for

    assert wait_for(lambda: all(not p.is_alive() for p in killed), timeout=10)
    assert client.get(url(ds, "rendered?quality=60"), headers=auth).status_code == 200
    assert client.get(url(ds, "rendered?quality=70"), headers=auth).status_code == 200
    assert not {p.pid for p in killed} & {p.pid for p in pool.processes()}


def test_a_render_that_outlives_its_time_is_stopped_and_the_pool_goes_on() -> None:
    """docs/security.md 32: a call past the wall-clock limit fails alone, its process is killed
    and replaced; the other process of the pool was never disturbed."""
    import threading
    import time

    from portal.imaging.isolation import RenderPool, _ready

    pool = RenderPool(workers=2, memory_bytes=1 << 30, timeout_seconds=1.5)
    try:
        pool.start()
        assert pool.run(_ready) is True
        others: list[object] = []
        worker = threading.Thread(target=lambda: others.append(pool.run(sum, [1, 2, 3])))
        started = time.monotonic()
        with pytest.raises(RenderRefused, match="too long"):
            worker.start()
            pool.run(time.sleep, 120)
        assert time.monotonic() - started < 60  # (a process may still be starting up)
        worker.join(timeout=30)
        assert others == [6]
        assert pool.failures == 1
        assert pool.run(pow, 2, 10) == 1024  # a fresh process took the stopped one's place
        assert len(pool.processes()) == 2 and all(p.is_alive() for p in pool.processes())
        with pytest.raises(ZeroDivisionError):  # an error in the call is the caller's
            pool.run(divmod, 1, 0)
        assert pool.failures == 1
    finally:
        pool.close()
    assert not pool.processes()


def test_dcmtk_runs_once_for_the_frames_of_one_file(monkeypatch: pytest.MonkeyPatch) -> None:
    """The last resort is slow (a process per call): a file it decoded is not handed to it
    again, nor a file it failed on."""
    from pydicom.data import get_testdata_file

    import portal.imaging.render as render_module

    data = Path(str(get_testdata_file("JPEG-lossy.dcm"))).read_bytes()  # only DCMTK reads it
    runs: list[int] = []
    real = render_module._run_dcmtk

    def counted(tool: str, payload: bytes) -> bytes | None:
        runs.append(len(payload))
        return real(tool, payload)

    monkeypatch.setattr(render_module, "_run_dcmtk", counted)
    monkeypatch.setattr(render_module, "_DCMTK_KEPT", type(render_module._DCMTK_KEPT)())
    syntax = "1.2.840.10008.1.2.4.51"
    first = render_module.dcmtk_decompressed(data, syntax)
    assert first is not None and render_module.dcmtk_decompressed(data, syntax) == first
    broken = data[:-4000]
    assert render_module.dcmtk_decompressed(broken, syntax) is None
    assert render_module.dcmtk_decompressed(broken, syntax) is None
    assert runs == [len(data), len(broken)]


def _process_of(_stored: object) -> int:
    """(Runs in a render process.) Which process took the call."""
    import os

    return os.getpid()


def test_calls_about_one_image_go_to_one_process() -> None:
    """The same stored image (its digest) goes to the same render process while that one is
    free, so a window drag finds its decoded frame; different images spread over the pool."""
    from portal.archive.store import StoredFile
    from portal.imaging.isolation import RenderPool

    pool = RenderPool(workers=3, memory_bytes=1 << 30, timeout_seconds=60)
    try:
        import hashlib

        images = [StoredFile(f"/nonexistent/{n}", hashlib.sha256(bytes([n])).hexdigest())
                  for n in range(30)]
        first = {image.sha256: pool.run(_process_of, image) for image in images}
        again = {image.sha256: pool.run(_process_of, image) for image in reversed(images)}
        assert again == first
        assert len(set(first.values())) == 3
    finally:
        pool.close()


def test_closing_the_pool_under_running_calls_fails_them_cleanly() -> None:
    """A web worker stopping (or a test tearing its app down) while background renders run:
    each running call ends with RenderRefused, no pipe is closed twice, no process is left."""
    import threading
    import time

    from portal.imaging.isolation import RenderPool

    pool = RenderPool(workers=2, memory_bytes=1 << 30, timeout_seconds=30)
    pool.start()
    assert pool.run(pow, 3, 2) == 9
    started = pool.processes()
    outcomes: list[str] = []

    def keep_rendering() -> None:
        for _ in range(200):
            try:
                pool.run(time.sleep, 0.02)
            except RenderRefused:
                outcomes.append("refused")
                return
            except Exception as exc:  # anything else is the bug this test is about
                outcomes.append(repr(exc))
                return
        outcomes.append("never stopped")

    threads = [threading.Thread(target=keep_rendering) for _ in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    pool.close()
    for thread in threads:
        thread.join(timeout=30)
    assert outcomes == ["refused"] * 4
    assert not any(p.is_alive() for p in started) and not pool.processes()


def test_nearby_windows_do_not_share_a_cache_entry() -> None:
    a = Rendition(window=Window(2000.0, 400.0)).cache_key("0" * 64, 1)
    b = Rendition(window=Window(2000.001, 400.0)).cache_key("0" * 64, 1)
    assert a != b


def test_images_without_a_window_share_the_series_default(app: Flask, client: FlaskClient,
                                                          auth: dict[str, str]) -> None:
    # Three slices without a window: the faint first slice (values 0..99) must be shown with
    # the window of the series (percentiles of its middle slice, values 0..999), not
    # stretched to full contrast on its own, so scrolling does not flicker.
    study, series = generate_uid(), generate_uid()
    datasets = []
    for number, top in enumerate((100, 1000, 1000), start=1):
        ds = make_dataset(study=study, series=series, rows=64, columns=64,
                          InstanceNumber=number)
        ds.RescaleIntercept = 0
        ramp = (np.arange(64 * 64) * top // (64 * 64)).astype(np.uint16).reshape(64, 64)
        ds.PixelData = ramp.tobytes()
        store(app, to_bytes(ds))
        datasets.append(ds)
    faint = client.get(url(datasets[0], "rendered") + "?quality=100", headers={
        **auth, "Accept": "image/png"})
    assert faint.status_code == 200, faint.data
    grey = np.asarray(Image.open(io.BytesIO(faint.data)))
    # Series window from the middle slice: about 0..999, so 99 maps to about 25.
    assert 15 <= int(grey.max()) <= 35
    middle = np.asarray(Image.open(io.BytesIO(client.get(
        url(datasets[1], "rendered"), headers={**auth, "Accept": "image/png"}).data)))
    assert int(middle.max()) >= 250
    # An explicit window still wins.
    explicit = np.asarray(Image.open(io.BytesIO(client.get(
        url(datasets[0], "rendered") + "?window=50,100", headers={
            **auth, "Accept": "image/png"}).data)))
    assert int(explicit.max()) >= 250



def test_a_single_image_series_is_decoded_once_for_its_window_and_its_image(
        app: Flask, client: FlaskClient, auth: dict[str, str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A radiograph without a window is its series' middle image: its first view works out
    the series window from the same decode, and shows exactly what two passes would."""
    from sqlalchemy import select

    import portal.imaging.isolation as isolation
    import portal.imaging.render as render_module
    from portal.db import db
    from portal.imaging.render import default_window
    from portal.imaging.service import series_default_window
    from portal.index.models import Instance

    ds = make_dataset(rows=96, columns=80)
    ds.RescaleIntercept = 0
    ramp = (np.arange(96 * 80) * 999 // (96 * 80)).astype(np.uint16).reshape(96, 80)
    ramp[0, :16] = 4000  # a few outliers the percentiles leave out
    ds.PixelData = ramp.tobytes()
    data = to_bytes(ds)
    store(app, data)
    window = default_window(data)
    assert window is not None and window.width < 2000
    expected = render_frame(data, 0, Rendition(format="png", quality=100), fallback=window)
    shown = client.get(url(ds, "rendered") + "?quality=100",
                       headers={**auth, "Accept": "image/png"})
    assert shown.status_code == 200 and shown.data == expected
    with app.app_context():
        stored = current_archive().locate(str(ds.SOPInstanceUID))
        row = db.session.scalars(select(Instance).where(
            Instance.sop_instance_uid == str(ds.SOPInstanceUID))).one()
        assert series_default_window(db.session, row) == window  # remembered by the first view

    decodes: list[int] = []
    original = render_module.decode_frame

    def counted(*args: object, **kwargs: object) -> object:
        decodes.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(isolation, "decode_frame", counted)
    monkeypatch.setattr(render_module, "decode_frame", counted)
    body, found = isolation.render_with_window(stored, 0, Rendition(format="png", quality=100),
                                               64_000_000, stored)
    assert (body, found) == (expected, window) and len(decodes) == 1


def _thumbnail_key(app: Flask, sop_instance_uid: str) -> str:
    from portal.imaging.rendition import parse_rendition

    with app.app_context():
        return parse_rendition({}, "", thumbnail=True).cache_key(
            current_archive().locate(sop_instance_uid).sha256, 1)


def test_cli_import_prerenders_into_a_shared_cache(tmp_path: Path, redis_url: str) -> None:
    import redis

    from tests.conftest import make_app

    app = make_app(tmp_path / "instance", REDIS_URL=redis_url)
    study, series = generate_uid(), generate_uid()
    datasets = [make_dataset(study=study, series=series, InstanceNumber=i + 1, value=i * 7)
                for i in range(3)]
    folder = tmp_path / "in"
    folder.mkdir()
    for number, ds in enumerate(datasets):
        (folder / f"{number}.dcm").write_bytes(to_bytes(ds))
    result = app.test_cli_runner().invoke(args=["archive", "import", str(folder)])
    assert result.exit_code == 0, result.output
    assert "pre-rendering 1 new series" in result.output
    key = _thumbnail_key(app, datasets[1].SOPInstanceUID)
    assert redis.Redis.from_url(redis_url).get(key) is not None


def test_c_store_prerenders_new_series_into_a_shared_cache(tmp_path: Path,
                                                           redis_url: str) -> None:
    import redis
    from pynetdicom import AE

    from portal.archive.dimse import serve
    from tests.conftest import free_port, make_app, wait_for

    port = free_port()
    app = make_app(tmp_path / "instance", REDIS_URL=redis_url, DIMSE_PORT=port,
                   DIMSE_HOST="127.0.0.1", DIMSE_ALLOWED_PEERS=["MODALITY@127.0.0.1"])
    with app.app_context():
        server = serve(current_archive(), app.config["PORTAL"], block=False)
    assert server is not None
    try:
        study, series = generate_uid(), generate_uid()
        datasets = [make_dataset(study=study, series=series, InstanceNumber=i + 1)
                    for i in range(3)]
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(datasets[0].SOPClassUID, datasets[0].file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", port, ae_title=app.config["PORTAL"]["DIMSE_AE_TITLE"])
        assert assoc.is_established
        for ds in datasets:
            assert assoc.send_c_store(ds).Status == 0
        assoc.release()
        key = _thumbnail_key(app, datasets[1].SOPInstanceUID)
        assert wait_for(lambda: redis.Redis.from_url(redis_url).get(key) is not None,
                        timeout=30)
    finally:
        server.shutdown()


def test_a_new_window_on_the_same_image_reuses_the_decoded_frame(tmp_path: Path) -> None:
    import hashlib

    from portal.archive.store import StoredFile
    from portal.imaging import isolation

    data = make_instance(rows=256, columns=256)
    path = tmp_path / "one.dcm"
    path.write_bytes(data)
    stored = StoredFile(str(path), hashlib.sha256(data).hexdigest())
    narrow, wide = Rendition(window=Window(40, 400)), Rendition(window=Window(1000, 3000))
    isolation.use_frame_cache(8 << 20)
    try:
        first = isolation.render_source(stored, 0, narrow, 10**8)
        assert first == render_frame(data, 0, narrow)
        path.unlink()  # the next window must come from the kept frame, not the file
        second = isolation.render_source(stored, 0, wide, 10**8)
        assert second == render_frame(data, 0, wide) and second != first
        with pytest.raises(FileNotFoundError):  # another size is another prepared frame
            isolation.render_source(stored, 0, Rendition(width=64, window=Window(40, 400)),
                                    10**8)
    finally:
        isolation.use_frame_cache(0)


def test_the_frame_cache_stays_within_its_bound() -> None:
    from portal.imaging.render import FrameCache, prepare_frame

    cache = FrameCache(max_bytes=4 * 128 * 128 * 2)
    for number in range(10):
        data = make_instance(rows=128, columns=128, value=number)
        cache.put((str(number),), prepare_frame(data, 0, Rendition()))
    kept = [n for n in range(10) if cache.get((str(n),)) is not None]
    assert kept == [6, 7, 8, 9]
    assert all(cache.get((str(n),)).frame.pixels.base is None for n in kept)  # private copies


def test_the_next_cut_of_a_series_reuses_its_built_volume(tmp_path: Path) -> None:
    import hashlib

    from demo.studies import write_ct_series
    from portal.archive.store import StoredFile
    from portal.imaging import isolation

    paths = write_ct_series(tmp_path / "ct", slices=12, size=64, uid_seed="kept-volume")
    files = [StoredFile(str(p), hashlib.sha256(p.read_bytes()).hexdigest()) for p in paths]
    rendition = Rendition(format="png", window=Window(40, 400))
    isolation.use_frame_cache(8 << 20)
    try:
        coronal = isolation.render_volume_source("series-a", files, "coronal", 0.5, 0, rendition)
        for path in paths:
            path.unlink()  # further cuts must come from the kept volume
        sagittal = isolation.render_volume_source("series-a", files, "sagittal", 0.3, 0,
                                                  rendition)
        turned = isolation.render_volume_source("series-a", files, "mip", 0.5, 45, rendition)
        assert len({coronal, sagittal, turned}) == 3
        with pytest.raises(FileNotFoundError):  # another series is built from its files
            isolation.render_volume_source("series-b", files, "coronal", 0.5, 0, rendition)
    finally:
        isolation.use_frame_cache(0)
        isolation._volumes.clear()
