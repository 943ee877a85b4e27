"""Volumes for reformats: built after ingest into the volume folder (so the first reformat is
cut from a file), their build state and progress for the viewer, the folder's bound, and a
MIP shown with a window that suits a projection."""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from flask import Flask
from flask.testing import FlaskClient
from PIL import Image
from sqlalchemy import select

from portal.archive import current_archive
from portal.imaging.service import volume_files, volume_sources
from portal.imaging.volume import Volume, content_key
from portal.imaging.volume_files import VolumeFiles
from tests.conftest import wait_for
from tests.dicomweb.test_stow import headers, multipart


def _ct(folder: Path, slices: int = 40, size: int = 128, seed: str = "volumes") -> list[bytes]:
    from demo.studies import write_ct_series

    return [p.read_bytes() for p in write_ct_series(folder, slices=slices, size=size,
                                                     uid_seed=seed)]


def _base(files: list[bytes]) -> str:
    ds = pydicom.dcmread(io.BytesIO(files[0]), stop_before_pixels=True)
    return f"/dicomweb/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/volume"


def _key(app: Flask, files: list[bytes]) -> str:
    uids = [str(pydicom.dcmread(io.BytesIO(f), stop_before_pixels=True).SOPInstanceUID)
            for f in files]
    with app.app_context():
        found = volume_sources(uids)
    assert found is not None
    return found[0]


def test_a_stored_ct_has_its_volume_built_and_the_first_reformat_needs_no_slice(
        app: Flask, client: FlaskClient, auth: dict[str, str], tmp_path: Path) -> None:
    files = _ct(tmp_path / "ct")
    assert client.post("/dicomweb/studies", data=multipart(*files),
                       headers=headers(auth)).status_code == 200
    key = _key(app, files)
    with app.app_context():
        kept = volume_files()
        assert wait_for(lambda: kept.state(key)[0] == "ready", timeout=60)
        stored = volume_sources([str(pydicom.dcmread(io.BytesIO(f)).SOPInstanceUID)
                                 for f in files])
    assert stored is not None
    for source in stored[1]:  # the slices cannot be read any more: only the built volume helps
        Path(source.path).write_bytes(b"gone")
    state = client.get(_base(files), headers={**auth, "Accept": "application/json"})
    assert state.status_code == 200 and state.get_json()["state"] == "ready"
    started = time.monotonic()
    sagittal = client.get(f"{_base(files)}/sagittal", headers={**auth, "Accept": "image/png"})
    assert sagittal.status_code == 200, sagittal.data[:200]
    assert time.monotonic() - started < 1.0
    image = np.asarray(Image.open(io.BytesIO(sagittal.data)))
    assert image.shape[0] > 50 and image.std() > 10  # a real cut, not an empty picture


def test_the_viewer_is_told_the_build_progress_then_ready(app: Flask, client: FlaskClient,
                                                          auth: dict[str, str],
                                                          tmp_path: Path) -> None:
    files = _ct(tmp_path / "ct", slices=60, size=256, seed="progress")
    with app.app_context():  # stored without the after-ingest build: nobody has built it
        current_archive().ingest_many(files, who="test")
    accept = {**auth, "Accept": "application/json"}
    first = client.get(_base(files), headers=accept)
    assert first.status_code == 202, first.data
    assert first.headers["Retry-After"] == "1" and first.headers["Cache-Control"] == "no-store"
    assert first.get_json()["state"] == "building"
    seen = [first.get_json()["progress"]]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        answer = client.get(_base(files), headers=accept)
        if answer.status_code == 200:
            break
        assert answer.status_code == 202 and answer.get_json()["state"] == "building"
        seen.append(answer.get_json()["progress"])
        time.sleep(0.02)
    assert answer.status_code == 200, "the volume was not built within a minute"
    body = answer.get_json()
    assert body["state"] == "ready" and body["mipWindow"]["width"] > 400
    assert seen == sorted(seen) and all(0 <= p < 1 for p in seen)
    assert any(0 < p < 1 for p in seen)  # a share in between: the viewer shows it grow


def test_a_build_reports_its_progress_to_every_worker(tmp_path: Path) -> None:
    from portal.imaging import isolation

    heard: list[float] = []

    class Listening(VolumeFiles):
        def report(self, key: str, done: float) -> None:
            heard.append(done)
            super().report(key, done)
            assert self.state(key)[:2] == ("building", pytest.approx(done, abs=1e-3))

    files = _ct(tmp_path / "ct", slices=30, size=64, seed="listen")
    kept = Listening(tmp_path / "volumes")
    key = content_key(str(i) for i in range(30))
    isolation._built(key, list(files), kept)
    assert heard[0] == 0 and heard[-1] == pytest.approx(0.95) and heard == sorted(heard)
    assert len(heard) >= 4
    assert kept.state(key) == ("ready", 1.0, "")
    assert not (tmp_path / "volumes" / f"{key}.building").exists()


def test_a_series_that_forms_no_volume_says_why(app: Flask, client: FlaskClient,
                                               auth: dict[str, str], tmp_path: Path) -> None:
    files = _ct(tmp_path / "ct", slices=12, size=64, seed="gap")
    del files[5]  # a missing slice: uneven steps along the normal
    with app.app_context():
        current_archive().ingest_many(files, who="test")
    accept = {**auth, "Accept": "application/json"}
    deadline = time.monotonic() + 30
    answer = client.get(_base(files), headers=accept)
    while answer.status_code == 202 and time.monotonic() < deadline:
        time.sleep(0.05)
        answer = client.get(_base(files), headers=accept)
    assert answer.status_code == 422
    assert "evenly spaced" in answer.get_json()["error"]


def test_kept_volumes_stay_within_their_bound_and_damaged_ones_are_rebuilt(
        tmp_path: Path) -> None:
    kept = VolumeFiles(tmp_path / "volumes", max_bytes=300_000)
    volume = Volume(np.arange(20 * 64 * 64, dtype=np.float32).reshape(20, 64, 64) % 3000 - 1000,
                    1.0, 1.0, 2.0, None)
    keys = [content_key([str(i)]) for i in range(4)]
    for key in keys:  # each about 160 kB as int16: only one fits beside the newest
        kept.save(key, volume)
        time.sleep(0.01)
    assert [kept.state(k)[0] for k in keys] == ["missing", "missing", "missing", "ready"]
    loaded = kept.load(keys[-1])
    assert loaded is not None and np.array_equal(loaded.voxels, volume.voxels)
    (tmp_path / "volumes" / f"{keys[-1]}.npz").write_bytes(b"not a volume")
    assert kept.load(keys[-1]) is None and kept.state(keys[-1])[0] == "missing"
    with pytest.raises(ValueError, match="SHA-256"):
        kept.load("../../etc/passwd")


def test_a_mip_without_a_window_is_not_white(app: Flask, client: FlaskClient,
                                             auth: dict[str, str], tmp_path: Path) -> None:
    files = _ct(tmp_path / "ct", seed="mip")
    with app.app_context():
        current_archive().ingest_many(files, who="test")
    png = client.get(f"{_base(files)}/mip?angle=0", headers={**auth, "Accept": "image/png"})
    assert png.status_code == 200
    grey = np.asarray(Image.open(io.BytesIO(png.data))).astype(float)
    body = grey[grey > 10]  # the patient, not the air around
    # In the file's soft-tissue window nearly every ray of the body hits something brighter
    # than 240 HU and shows white; a projection's own window leaves the body grey.
    assert (body >= 250).mean() < 0.2 and body.std() > 20


def test_a_volume_kept_in_memory_but_pruned_from_the_folder_is_written_again(
        tmp_path: Path) -> None:
    from portal.imaging import isolation

    files = _ct(tmp_path / "ct", slices=12, size=64, seed="pruned")
    kept = VolumeFiles(tmp_path / "volumes")
    key = content_key(["pruned"])
    isolation.use_frame_cache(8 << 20)  # a render process that keeps built volumes
    try:
        isolation.prepare_volume(key, list(files), kept)
        (tmp_path / "volumes" / f"{key}.npz").unlink()  # pruned by another process
        isolation.prepare_volume(key, [], kept)  # no slices needed: it is still in memory
        assert kept.state(key)[0] == "ready"
    finally:
        isolation._volumes.clear()
        isolation.use_frame_cache(0)


# -- series whose geometry forms no volume: refused once, in plain words ---------------------

def _edited(folder: Path, seed: str, **values: object) -> list[bytes]:
    """A small CT series with the same header values set on every slice."""
    edited = []
    for data in _ct(folder, slices=6, size=32, seed=seed):
        ds = pydicom.dcmread(io.BytesIO(data))
        for keyword, value in values.items():
            setattr(ds, keyword, value)
        out = io.BytesIO()
        ds.save_as(out)
        edited.append(out.getvalue())
    return edited


def _plain(reason: str) -> bool:
    """True when a reason names no Python exception and quotes none of their texts."""
    return not any(word in reason.lower() for word in ("error", "division", "exception",
                                                       "singular", "nan", "traceback"))


@pytest.mark.parametrize(("values", "reason"), [
    ({"ImagePositionPatient": [-200.0, -200.0, 100.0]}, "the slices share one position"),
    ({"PixelSpacing": [0, 0]}, "the images have no usable pixel spacing"),
], ids=["one-position", "zero-pixel-spacing"])
def test_a_series_without_usable_spacing_is_not_offered_or_cut_in_3d(
        app: Flask, client: FlaskClient, auth: dict[str, str], tmp_path: Path,
        values: dict[str, object], reason: str) -> None:
    from portal.imaging.service import forms_volume
    from portal.index.models import Instance, Series

    files = _edited(tmp_path / "ct", f"flat-{reason[:12]}", **values)
    series_uid = pydicom.dcmread(io.BytesIO(files[0])).SeriesInstanceUID
    with app.app_context():  # stored without the after-ingest build: nobody has built it
        archive = current_archive()
        archive.ingest_many(files, who="test")
        with archive.database.new_session() as session:
            images = list(session.scalars(
                select(Instance).join(Series).where(Series.series_instance_uid == series_uid)))
            assert len(images) == 6 and forms_volume(images) is False  # the viewer offers none
    image = {**auth, "Accept": "image/png"}
    accept = {**auth, "Accept": "application/json"}
    for kind in ("sagittal", "mip", "3d"):  # asked directly, before and after the status
        for _ in range(2):
            answer = client.get(f"{_base(files)}/{kind}", headers=image)
            assert answer.status_code == 422, (kind, answer.data[:200])
            error = answer.get_json()["error"]
            assert error == f"these images cannot be shown in 3D: {reason}" and _plain(error)
        deadline = time.monotonic() + 30
        state = client.get(_base(files), headers=accept)
        while state.status_code == 202 and time.monotonic() < deadline:
            time.sleep(0.05)
            state = client.get(_base(files), headers=accept)
        assert state.status_code == 422, state.data[:200]
        assert state.get_json()["state"] == "refused" and state.get_json()["error"] == reason


@pytest.mark.parametrize(("change", "reason"), [
    ({"positions": [[0.0, 0.0, 5.0]] * 4}, "the slices share one position"),
    ({"positions": [[0.0, 0.0, z] for z in (0.0, 2.0, 2.0, 4.0)]},
     "two or more slices share one position"),
    ({"positions": [[0.0, 0.0, z] for z in (0.0, 2.0, float("nan"), 6.0)]},
     "a slice has no position"),
    ({"spacing": [0.0, 0.7]}, "the images have no usable pixel spacing"),
    ({"spacing": [float("nan"), 0.7]}, "the images have no usable pixel spacing"),
    ({"spacing": [-0.7, -0.7]}, "the images have no usable pixel spacing"),
    ({"spacing": [1e308, 1e308]}, "the images have no usable pixel spacing"),
    ({"spacing": [1e-30, 1e-30]}, "the images have no usable pixel spacing"),
    ({"positions": [[0.0, 0.0, z] for z in (0.0, 500.0, 1000.0, 1500.0)]},
     "the slices are too far apart or too close for their pixels"),
    ({"orientations": [[1.0, 0.0, 0.0, 1.0, 0.0, 0.0]] * 4},
     "the slices carry no geometry (orientation, spacing)"),
])
def test_the_geometry_is_assessed_before_anything_is_decoded(change: dict[str, list],
                                                             reason: str) -> None:
    from portal.imaging.volume import NotAVolume, assess

    geometry = {"orientations": [[1.0, 0.0, 0.0, 0.0, 1.0, 0.0]] * 4, "spacing": [0.7, 0.7],
                "positions": [[0.0, 0.0, z] for z in (6.0, 0.0, 4.0, 2.0)]}
    good = assess(**geometry)
    assert good.order == (1, 3, 2, 0) and good.slice_spacing == pytest.approx(2.0)
    with pytest.raises(NotAVolume) as refused:
        assess(**{**geometry, **change})
    assert str(refused.value) == reason


def test_a_volume_kept_before_its_spacing_was_checked_is_refused_at_once(
        app: Flask, client: FlaskClient, auth: dict[str, str], tmp_path: Path) -> None:
    """A volume file kept by an older portal from slices without usable spacing: the first
    status request already answers "refused" with the reason, as every later one."""
    files = _edited(tmp_path / "ct", "kept-zero-spacing", PixelSpacing=[0, 0])
    with app.app_context():
        current_archive().ingest_many(files, who="test")
        kept = volume_files()
    accept = {**auth, "Accept": "application/json"}

    def status() -> dict[str, object]:
        answer = client.get(_base(files), headers=accept)
        deadline = time.monotonic() + 30
        while answer.status_code == 202 and time.monotonic() < deadline:
            time.sleep(0.05)
            answer = client.get(_base(files), headers=accept)
        assert answer.status_code == 422, answer.data[:200]
        body: dict[str, object] = answer.get_json()
        return body

    assert status()["state"] == "refused"
    [marker] = list(kept.folder.glob("*.refused"))  # as an older portal left it: a volume
    marker.unlink()
    kept.save(marker.stem, Volume(np.zeros((6, 32, 32), np.float32), 0.0, 0.0, 2.0, None))
    assert kept.state(marker.stem)[0] == "ready"
    assert status() == {"state": "refused", "status": 422,
                        "error": "the images have no usable pixel spacing"}


def test_a_kept_volume_with_zero_spacing_is_built_again(tmp_path: Path) -> None:
    kept = VolumeFiles(tmp_path / "volumes")
    key = content_key(["kept before its spacing was checked"])
    kept.save(key, Volume(np.zeros((4, 8, 8), np.float32), 0.0, 0.7, 2.0, None))
    assert kept.load(key) is None and kept.state(key)[0] == "missing"
