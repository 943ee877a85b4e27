"""3D views (portal/imaging/render3d.py): geometry checked against synthetic volumes whose
objects sit at known places in the patient, at known angles.

The volumes are CT-like (air -1000 HU, a bone-bright sphere and rod) with anisotropic
spacing; each object's projected centre and extent must land where the camera's geometry
says, within a pixel or two, for the volume rendering and the MIP, from axial and sagittal
acquisitions alike; left stays left (nothing mirrored), and the letters at the edges name
the side the objects appear on.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from portal.imaging import render3d
from portal.imaging.render3d import BadView, Turn, camera, letters
from portal.imaging.rendition import Rendition, Window
from portal.imaging.volume import Volume
from portal.imaging.volume_files import VolumeFiles

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)  # rows go posterior, columns go down; slices R->L
SIZE = 200


def _positions(shape: tuple[int, int, int], spacing: tuple[float, float, float],
               orientation: tuple[float, ...]) -> np.ndarray:
    """Each voxel's place in the patient (mm from the volume's centre), shape (*shape, 3)."""
    axes = render3d.grid(np.zeros((1, 1, 1), np.float32), *spacing, orientation).axes
    index = np.stack(np.meshgrid(*(np.arange(n, dtype=np.float64) for n in shape),
                                 indexing="ij"), axis=-1)
    centre = (np.array(shape, float) - 1.0) / 2.0
    rel: np.ndarray = (index - centre) @ axes.T
    return rel


SPHERE = np.array([-30.0, 10.0, 15.0])  # on the patient's right, a little behind and up
RADIUS = 12.0


def _phantom(shape: tuple[int, int, int] = (60, 128, 128),
             spacing: tuple[float, float, float] = (2.0, 0.9, 0.9),
             orientation: tuple[float, ...] = AXIAL, rod: bool = False,
             sphere: np.ndarray = SPHERE) -> render3d.Grid:
    p = _positions(shape, spacing, orientation)
    voxels = np.full(shape, -1000.0, np.float32)
    voxels[np.linalg.norm(p - sphere, axis=-1) <= RADIUS] = 800.0
    if rod:  # along x (the patient's right to left), 4 mm thick, at the front, 60 mm long
        voxels[(np.abs(p[..., 0]) <= 30.0) & (np.abs(p[..., 1] + 25.0) <= 2.0)
               & (np.abs(p[..., 2]) <= 2.0)] = 800.0
    return render3d.grid(voxels, *spacing, orientation)


def _expected(g: render3d.Grid, point: np.ndarray, azimuth: float, elevation: float,
              size: int = SIZE) -> tuple[float, float, float]:
    """Where a patient point (mm from the centre) lands on the image, and mm per pixel."""
    cam = camera(azimuth, elevation)
    extent = np.abs(g.axes) @ (np.array(g.voxels.shape, float) - 1.0)
    pixel_mm = float(np.linalg.norm(extent)) / size
    middle = (size - 1) / 2.0
    return (middle + float(point @ cam.right) / pixel_mm,
            middle - float(point @ cam.up) / pixel_mm, pixel_mm)


def _centroid(mask: np.ndarray) -> tuple[float, float, float, float]:
    """Centre (x, y) and extent (across, down) in pixels of a mask's pixels."""
    ys, xs = np.nonzero(mask)
    assert xs.size, "nothing was drawn"
    return (float(xs.mean()), float(ys.mean()), float(xs.max() - xs.min() + 1),
            float(ys.max() - ys.min() + 1))


ANGLES = [(0, 0), (90, 0), (180, 0), (270, 0), (30, 45), (300, -30), (0, 90), (135, -90),
          (215, 60)]


@pytest.mark.parametrize(("azimuth", "elevation"), ANGLES)
@pytest.mark.parametrize("orientation", [AXIAL, SAGITTAL], ids=["axial", "sagittal"])
def test_the_sphere_lands_where_the_geometry_says(azimuth: int, elevation: int,
                                                  orientation: tuple[float, ...]) -> None:
    shape = (60, 128, 128) if orientation == AXIAL else (128, 128, 60)
    spacing = (2.0, 0.9, 0.9) if orientation == AXIAL else (0.9, 0.9, 2.0)
    g = _phantom(shape, spacing, orientation)
    x, y, pixel_mm = _expected(g, SPHERE, azimuth, elevation)
    shown = render3d.render_3d(g, "bone", True, None, azimuth, elevation, SIZE)
    cx, cy, across, down = _centroid(shown.max(axis=2) > 40)
    assert abs(cx - x) <= 1.5 and abs(cy - y) <= 1.5, (cx, cy, x, y)
    diameter = 2 * RADIUS / pixel_mm
    assert abs(across - diameter) <= 2.5 and abs(down - diameter) <= 2.5
    mip = render3d.render_mip(g, azimuth, elevation, SIZE)
    mx, my, m_across, _ = _centroid(mip > 0)
    assert abs(mx - x) <= 1.5 and abs(my - y) <= 1.5
    assert abs(m_across - diameter) <= 2.5


def test_an_axial_and_a_sagittal_acquisition_of_one_patient_look_the_same() -> None:
    axial = render3d.render_3d(_phantom(rod=True), "bone", True, None, 40, 20, SIZE)
    sagittal = render3d.render_3d(
        _phantom((128, 128, 60), (0.9, 0.9, 2.0), SAGITTAL, rod=True), "bone", True, None,
        40, 20, SIZE)
    a, s = axial.max(axis=2) > 40, sagittal.max(axis=2) > 40
    assert (a ^ s).sum() <= 0.1 * a.sum()  # the same shapes, edges aside


def test_the_rod_lies_across_from_the_front_and_is_a_dot_from_the_side() -> None:
    g = _phantom(rod=True, sphere=np.array([0.0, 0.0, 200.0]))  # the sphere out of the box
    front = render3d.render_3d(g, "bone", True, None, 0, 0, SIZE)
    _, _, across, down = _centroid(front.max(axis=2) > 40)
    pixel_mm = _expected(g, SPHERE, 0, 0)[2]
    assert abs(across - 60.0 / pixel_mm) <= 2.5 and down <= 4.0 / pixel_mm + 2.5
    side = render3d.render_3d(g, "bone", True, None, 90, 0, SIZE)
    x, y, across, down = _centroid(side.max(axis=2) > 40)
    ex, ey, _ = _expected(g, np.array([0.0, -25.0, 0.0]), 90, 0)
    assert across <= 4.0 / pixel_mm + 2.5 and abs(x - ex) <= 1.5 and abs(y - ey) <= 1.5


@pytest.mark.parametrize(("azimuth", "elevation"), [*ANGLES, (45, 0), (225, 10)])
def test_left_is_not_mirrored_and_the_letters_name_the_side(azimuth: int,
                                                           elevation: int) -> None:
    # A sphere on the patient's left (+x): the letter on the side it shows on says L.
    left = np.array([35.0, 0.0, 0.0])
    g = _phantom(sphere=left)
    x, _, _, _ = _centroid(render3d.render_mip(g, azimuth, elevation, SIZE) > 0)
    marks = letters(azimuth, elevation)
    middle = (SIZE - 1) / 2.0
    if x > middle + 5:
        assert "L" in marks["right"] and "R" in marks["left"]
    elif x < middle - 5:
        assert "L" in marks["left"] and "R" in marks["right"]
    else:  # seen end-on: left/right is not across the image
        assert "L" not in marks["left"] + marks["right"]


def test_letters_at_the_usual_angles() -> None:
    assert letters(0, 0) == {"top": "H", "right": "L", "bottom": "F", "left": "R"}
    assert letters(90, 0) == {"top": "H", "right": "P", "bottom": "F", "left": "A"}
    assert letters(180, 0) == {"top": "H", "right": "R", "bottom": "F", "left": "L"}
    assert letters(270, 0) == {"top": "H", "right": "A", "bottom": "F", "left": "P"}
    assert letters(0, 90) == {"top": "P", "right": "L", "bottom": "A", "left": "R"}
    assert letters(0, -90) == {"top": "A", "right": "L", "bottom": "P", "left": "R"}
    assert letters(45, 0)["right"] in ("LP", "PL")  # oblique: two letters, never none
    assert letters(30, 30)["top"] == "HP"


def test_a_thin_slab_leaves_out_what_lies_outside_it() -> None:
    g = _phantom(sphere=np.array([0.0, 30.0, 0.0]))  # 30 mm behind the centre
    whole = render3d.render_mip(g, 0, 0, SIZE)
    assert (whole > 0).sum() > 100
    thin = render3d.render_mip(g, 0, 0, SIZE, slab_mm=20.0)
    assert (thin > 0).sum() == 0
    through = render3d.render_mip(g, 0, 0, SIZE, slab_mm=80.0)
    assert (through > 0).sum() == (whole > 0).sum()
    side = render3d.render_mip(g, 90, 0, SIZE, slab_mm=20.0)  # the slab turns with the view
    assert (side > 0).sum() > 100


def test_presets_differ_and_an_mr_volume_uses_its_window() -> None:
    g = _phantom(rod=True)
    shots = {p: render3d.render_3d(g, p, True, None, 20, 10, 96) for p in render3d.PRESETS}
    assert all(image.max() > 60 for image in shots.values())
    assert not np.array_equal(shots["bone"], shots["skin"])
    mr = render3d.grid(np.clip(g.voxels + 1000.0, 0, None) / 4.0, 2.0, 0.9, 0.9, None)
    image = render3d.render_3d(mr, "vessels", False, Window(100.0, 200.0), 20, 10, 96)
    assert image.max() > 60 and (image.max(axis=2) > 40).sum() > 50


def test_low_quality_is_the_same_view_smaller() -> None:
    g = _phantom()
    rendition = Rendition(width=256, format="png")
    for preset in ("bone", None):
        turn = Turn(60, 20, preset=preset, quality="low")
        low = Image.open(io.BytesIO(render3d.render_turned(
            g, render3d.halved(g), True, None, Window(0, 1000), turn, rendition)))
        full = Image.open(io.BytesIO(render3d.render_turned(
            g, render3d.halved(g), True, None, Window(0, 1000),
            Turn(60, 20, preset=preset, quality="full"), rendition)))
        assert low.size == full.size == (256, 256)
        a = _centroid(np.asarray(low.convert("L")) > 60)
        b = _centroid(np.asarray(full.convert("L")) > 60)
        assert math.dist(a[:2], b[:2]) <= 3.0


@pytest.mark.parametrize("bad", [
    {"azimuth": 360.0}, {"azimuth": -5.0}, {"elevation": 95.0}, {"zoom": 0.5},
    {"zoom": float("nan")}, {"slab_mm": -1.0}, {"preset": "lungs"}, {"quality": "best"},
])
def test_views_out_of_range_are_refused_with_a_reason(bad: dict[str, object]) -> None:
    with pytest.raises(BadView) as refused:
        Turn(**bad)  # type: ignore[arg-type]
    assert str(refused.value)


def test_a_kept_volume_keeps_its_orientation_and_modality(tmp_path: Path) -> None:
    files = VolumeFiles(tmp_path)
    voxels = np.zeros((3, 4, 5), np.float32)
    files.save("a" * 64, Volume(voxels, 0.5, 0.6, 2.0, None, None, SAGITTAL, True))
    kept = files.load("a" * 64)
    assert kept is not None and kept.orientation == SAGITTAL and kept.is_ct
    files.save("b" * 64, Volume(voxels, 0.5, 0.6, 2.0, None, None, None, False))
    kept = files.load("b" * 64)
    assert kept is not None and kept.orientation == AXIAL and not kept.is_ct
