"""The imaging service (``portal.imaging.service``): one window rule, one set of keys, one
cache for the DICOMweb rendered routes, the viewer page and pre-rendering."""

from __future__ import annotations

import hashlib
import io
import json
import re

import numpy as np
import pydicom
import pytest
from flask import Flask
from PIL import Image
from pydicom.uid import generate_uid
from sqlalchemy import select

from portal.access.grants import create_grant
from portal.access.principal import Principal
from portal.archive import current_archive
from portal.db import db
from portal.imaging.render import FrameNotFound, default_window, render_frame
from portal.imaging.rendition import RENDER_VERSION, Rendition, Window, parse_rendition
from portal.imaging.service import (
    RenderedImage,
    render_cache,
    rendered_image,
    series_default_window,
    volume_image,
)
from portal.index.models import Instance
from tests.conftest import (
    IdentityProvider,
    add_person,
    basic_auth,
    make_client,
    signed_in,
    wait_for,
)
from tests.dicomweb.test_stow import headers, multipart
from tests.factories import make_dataset, to_bytes

ADMIN = Principal("user", 0, "t", roles=frozenset({"office_manager"}), issuer="t", subject="t")


def _slice(study: str, series: str, number: int, top: int) -> bytes:
    """A windowless monochrome slice whose values ramp from 0 to ``top``: each slice alone
    would get another window, so a shared one shows."""
    ds = make_dataset(study=study, series=series, rows=48, columns=40, InstanceNumber=number,
                      RescaleIntercept=0)
    ramp = (np.arange(48 * 40) * top // (48 * 40)).astype(np.uint16).reshape(48, 40)
    ds.PixelData = ramp.tobytes()
    return to_bytes(ds)


def _viewer_window(html: str) -> Window:
    found = re.search(r'<script type="application/json" id="viewer-data"[^>]*>(.*?)</script>',
                      html, re.S)
    assert found
    window = json.loads(found.group(1))["window"]
    return Window(window["center"], window["width"])


def test_viewer_rendered_and_prerendered_images_share_one_series_window(
        oidc_app: Flask, idp: IdentityProvider) -> None:
    """The three places that used to write the window rule each (the viewer page, DICOMweb
    /rendered, the pre-render after STOW-RS) now ask the service, and agree."""
    study, series = generate_uid(), generate_uid()
    files = [_slice(study, series, n + 1, top) for n, top in enumerate((99, 999, 3999))]
    uids = [str(pydicom.dcmread(io.BytesIO(f), stop_before_pixels=True).SOPInstanceUID)
            for f in files]
    modality = oidc_app.test_client()
    stored = modality.post("/dicomweb/studies", data=multipart(*files),
                           headers=headers(basic_auth(*make_client(oidc_app, "modality"))))
    assert stored.status_code == 200, stored.data
    expected = default_window(files[1])  # the core's robust window of the middle slice
    assert expected is not None and expected != default_window(files[0])

    # 1. Pre-rendered after STOW-RS: the middle slice's thumbnail, already in the cache.
    thumbnail = parse_rendition({}, "", thumbnail=True)
    with oidc_app.app_context():
        key = thumbnail.cache_key(current_archive().locate(uids[1]).sha256, 1)
        assert wait_for(lambda: render_cache().get(key) is not None, timeout=30)
        prerendered = render_cache().get(key)
    assert prerendered == render_frame(files[1], 0, thumbnail, fallback=expected)

    user = add_person(oidc_app, idp, "window-doc", ["physician"])
    with oidc_app.extensions["db"].write_transaction() as session:
        create_grant(session, ADMIN, user_id=user, study_uid=study)
    browser = signed_in(oidc_app, idp, "window-doc")

    # 2. The viewer page's default window.
    page = browser.get(f"/studies/{study}/view/{series}")
    assert page.status_code == 200
    shown_window = _viewer_window(page.get_data(as_text=True))
    assert shown_window == Window(expected.center, expected.width)

    # 3. DICOMweb /rendered of another slice: drawn with that same window, not its own.
    png = Rendition(format="png", quality=100)
    rendered = browser.get(f"/dicomweb/studies/{study}/series/{series}/instances/{uids[0]}"
                           "/rendered?quality=100", headers={"Accept": "image/png"})
    assert rendered.status_code == 200
    assert rendered.data == render_frame(files[0], 0, png, fallback=shown_window)
    assert rendered.data != render_frame(files[0], 0, png)  # its own window differs
    grey = np.asarray(Image.open(io.BytesIO(rendered.data)))
    assert int(grey.max()) < 64  # 0..99 under the middle slice's window of about 0..999

    # And the series thumbnail a viewer asks for is the pre-rendered bytes (a cache hit).
    answer = browser.get(f"/dicomweb/studies/{study}/series/{series}/thumbnail")
    assert answer.status_code == 200 and answer.data == prerendered


def _stored_row(app: Flask, data: bytes) -> str:
    with app.app_context():
        current_archive().ingest(data, who="test")
    return str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID)


def test_rendered_image_keys_name_content_and_rendition_only(app: Flask) -> None:
    study, series = generate_uid(), generate_uid()
    uid = _stored_row(app, _slice(study, series, 1, 999))
    with app.app_context():
        row = db.session.scalars(select(Instance).where(Instance.sop_instance_uid == uid)).one()
        sha256 = current_archive().locate(uid).sha256
        png = Rendition(format="png")
        image = rendered_image(db.session, row, 1, png)
        assert image.key == png.cache_key(sha256, 1) and image.key.startswith("render:")
        assert uid not in image.key and "PAT-1" not in image.key  # never a person or an object
        assert image.etag == hashlib.sha256(image.key.encode()).hexdigest()[:32]
        assert image.media_type == "image/png"
        # Another window, size or format is another key; the same rendition the same key.
        windowed = rendered_image(db.session, row, 1, Rendition(format="png",
                                                                window=Window(40, 400)))
        assert windowed.key != image.key
        assert rendered_image(db.session, row, 1, Rendition(format="png", width=128)).key \
            not in (image.key, windowed.key)
        assert rendered_image(db.session, row, 1, Rendition(format="png")).key == image.key
        for frame in (0, 2):
            with pytest.raises(FrameNotFound, match=r"outside 1\.\.1"):
                rendered_image(db.session, row, frame, png)

        # body() renders once and keeps the bytes under the key; the next asker hits it.
        assert render_cache().get(image.key) is None
        first = image.body()
        assert render_cache().get(image.key) == first

        def never() -> bytes:
            raise AssertionError("a cached image is not rendered again")

        assert RenderedImage(image.key, image.media_type, never).body() == first
        # The series' default window is kept too, under the middle image's content.
        window = series_default_window(db.session, row)
        assert window is not None and window == default_window(
            current_archive().read(uid))
        assert render_cache().get(f"window:v{RENDER_VERSION}:{sha256}") == (
            f"{window.center!r},{window.width!r}".encode())

        # Volume views are keyed by content key, rendition, view and place, and the version of
        # their drawing (v3 since the MIP is framed on the volume's diagonal, issue 20).
        view = volume_image("c" * 64, [], "axial", 0.5, 0.0, png)
        assert view.key == png.cache_key("c" * 64, 0) + ":axial:0.5:0.0:v3"


def test_colour_images_have_no_series_window(app: Flask) -> None:
    ds = make_dataset(rows=8, columns=8, SamplesPerPixel=3, PhotometricInterpretation="RGB",
                      BitsAllocated=8, BitsStored=8, HighBit=7, PlanarConfiguration=0)
    ds.PixelData = np.full((8, 8, 3), 120, dtype=np.uint8).tobytes()
    del ds.RescaleIntercept, ds.RescaleSlope
    uid = _stored_row(app, to_bytes(ds))
    with app.app_context():
        row = db.session.scalars(select(Instance).where(Instance.sop_instance_uid == uid)).one()
        assert series_default_window(db.session, row) is None
        image = rendered_image(db.session, row, 1, Rendition(format="png"))
        assert np.asarray(Image.open(io.BytesIO(image.body()))).shape == (8, 8, 3)
        sha256 = current_archive().locate(uid).sha256
        assert render_cache().get(f"window:v{RENDER_VERSION}:{sha256}") is None
