"""The 3D view and the oblique MIP over HTTP: turned images of a stored CT series, and every
bad angle, style, zoom, slab or detail refused with a 400 and its reason; a series that
forms no volume answers 422 with why."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from flask import Flask
from flask.testing import FlaskClient
from PIL import Image

from tests.dicomweb.test_stow import headers, multipart
from tests.imaging.test_render import make_instance, store


@pytest.fixture
def ct_base(client: FlaskClient, auth: dict[str, str], tmp_path: Path) -> str:
    from demo.studies import write_ct_series

    files = [p.read_bytes() for p in write_ct_series(tmp_path / "ct", slices=40, size=128,
                                                      uid_seed="turned-3d")]
    assert client.post("/dicomweb/studies", data=multipart(*files),
                       headers=headers(auth)).status_code == 200
    ds = pydicom.dcmread(io.BytesIO(files[0]), stop_before_pixels=True)
    return f"/dicomweb/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/volume"


def _image(client: FlaskClient, auth: dict[str, str], url: str) -> np.ndarray:
    answer = client.get(url, headers={**auth, "Accept": "image/png"})
    assert answer.status_code == 200, (url, answer.data[:300])
    assert answer.headers["Cache-Control"].startswith("private")
    return np.asarray(Image.open(io.BytesIO(answer.data)))


def test_a_ct_turns_in_3d_with_each_preset_and_the_mip_turns_about_two_axes(
        client: FlaskClient, auth: dict[str, str], ct_base: str) -> None:
    front = _image(client, auth, f"{ct_base}/3d?style=bone&width=256")
    assert front.shape == (256, 256, 3) and front.std() > 5
    turned = _image(client, auth, f"{ct_base}/3d?style=bone&angle=90&elevation=30&width=256")
    assert not np.array_equal(front, turned)
    skin = _image(client, auth, f"{ct_base}/3d?style=skin&width=256")
    assert np.abs(skin.astype(int) - front.astype(int)).mean() > 5
    low = _image(client, auth, f"{ct_base}/3d?style=bone&detail=low&width=256")
    assert low.shape == front.shape  # smaller render, the same size on screen
    zoomed = _image(client, auth, f"{ct_base}/3d?style=bone&zoom=2&width=256")
    assert (zoomed.max(axis=2) > 30).sum() > (front.max(axis=2) > 30).sum()
    mip = _image(client, auth, f"{ct_base}/mip?angle=0&width=256")
    tilted = _image(client, auth, f"{ct_base}/mip?angle=0&elevation=45&width=256")
    slab = _image(client, auth, f"{ct_base}/mip?angle=0&slab=10&width=256")
    assert not np.array_equal(mip, tilted) and not np.array_equal(mip, slab)
    assert slab.mean() < mip.mean()  # a thin slab projects fewer bright voxels


BAD = [
    ("3d?style=lungs", "3D styles are bone, vessels, soft, skin"),
    ("3d?angle=7", "steps of 5"),
    ("3d?angle=360", "0..355"),
    ("3d?elevation=95", "elevation is -90..90"),
    ("3d?elevation=12", "steps of 5"),
    ("3d?elevation=up", "are numbers"),
    ("3d?zoom=9", "zoom is 1..4"),
    ("3d?zoom=1.1", "zoom of 0.25"),
    ("3d?detail=best", "detail is low or full"),
    ("mip?slab=-3", "slab is 0"),
    ("mip?slab=2.5", "slab of 1 mm"),
    ("mip?style=bone", "slab is a MIP's"),
    ("3d?slab=10", "slab is a MIP's"),
    ("mip?angle=nan", "0..355"),
]


def test_bad_views_are_refused_with_a_reason(client: FlaskClient, auth: dict[str, str],
                                             ct_base: str) -> None:
    for query, reason in BAD:
        answer = client.get(f"{ct_base}/{query}", headers={**auth, "Accept": "image/png"})
        assert answer.status_code == 400, (query, answer.data[:200])
        assert reason in answer.get_json()["error"], query


def test_a_series_that_forms_no_volume_says_why(app: Flask, client: FlaskClient,
                                                auth: dict[str, str]) -> None:
    single = store(app, make_instance())
    answer = client.get(f"/dicomweb/studies/{single.StudyInstanceUID}/series/"
                        f"{single.SeriesInstanceUID}/volume/3d?style=bone",
                        headers={**auth, "Accept": "image/png"})
    assert answer.status_code == 422 and "three slices" in answer.get_json()["error"]
