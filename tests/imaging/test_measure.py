"""Region measurements on the stored values (portal/imaging/measure.py): masks, statistics and
units checked against numpy on synthetic frames with known values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from portal.imaging.measure import (
    BadShape,
    Shape,
    measure_source,
    parse_shape,
    region_mask,
    shape_area,
)
from portal.imaging.render import RenderRefused
from tests.factories import make_dataset, to_bytes


def disc_ct(size: int = 64, radius: float = 12.0, hu: int = 100, background: int = -1000,
            slope: float = 1.0, intercept: float = -1024.0) -> tuple[bytes, np.ndarray]:
    """A CT slice: a disc of ``hu`` on ``background`` (stored = (HU - intercept) / slope)."""
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    inside = (xx - size / 2) ** 2 + (yy - size / 2) ** 2 <= radius ** 2
    hus = np.where(inside, hu, background).astype(np.float64)
    stored = np.round((hus - intercept) / slope).astype(np.uint16)
    ds = make_dataset(rows=size, columns=size, RescaleIntercept=intercept, RescaleSlope=slope)
    ds.PixelData = stored.tobytes()
    return to_bytes(ds), stored.astype(np.float64) * slope + intercept


def test_an_ellipse_inside_the_disc_reads_its_value_in_hu() -> None:
    data, _hu = disc_ct()
    shape = parse_shape({"kind": "ellipse", "points": [[24, 24], [40, 40]]})
    found = measure_source(data, 0, shape, 10**6)
    assert found.unit == "HU"
    assert found.mean == pytest.approx(100.0) and found.sd == pytest.approx(0.0)
    assert (found.minimum, found.maximum) == (100.0, 100.0)
    assert found.pixel_area == pytest.approx(math.pi * 64)


def test_statistics_equal_numpy_over_the_same_pixels_with_a_slope() -> None:
    data, hu = disc_ct(slope=0.5, intercept=-1024.0)
    shape = parse_shape({"kind": "polygon",
                         "points": [[10, 10], [50, 14], [44, 52], [20, 40.5]]})
    found = measure_source(data, 0, shape, 10**6)
    mask = region_mask(shape, 64, 64)
    assert found.pixels == int(mask.sum()) > 100
    assert found.mean == pytest.approx(float(hu[mask].mean()))
    assert found.sd == pytest.approx(float(hu[mask].std()))
    assert (found.minimum, found.maximum) == (-1000.0, 100.0)


def test_masks_take_pixels_whose_centres_are_inside() -> None:
    square = Shape("polygon", ((2.0, 2.0), (6.0, 2.0), (6.0, 5.0), (2.0, 5.0)))
    mask = region_mask(square, 8, 8)
    assert mask.sum() == 12 and mask[2:5, 2:6].all()
    assert shape_area(square) == 12
    # A concave outline (a U): the notch stays outside (even-odd rule).
    u = Shape("polygon", ((0.0, 0.0), (6.0, 0.0), (6.0, 6.0), (4.0, 6.0), (4.0, 2.0),
                          (2.0, 2.0), (2.0, 6.0), (0.0, 6.0)))
    mask = region_mask(u, 8, 8)
    assert not mask[3, 3] and mask[3, 1] and mask[3, 5] and mask[1, 3]
    # An ellipse's pixel count is close to its area.
    ellipse = Shape("ellipse", ((10.0, 20.0), (90.0, 60.0)))
    assert abs(region_mask(ellipse, 100, 100).sum() - shape_area(ellipse)) < 30


@pytest.mark.parametrize(("body", "reason"), [
    ([1, 2], "JSON object"),
    ({"kind": "star", "points": []}, "kind must be"),
    ({"kind": "ellipse", "points": [[1, 2]]}, "two opposite corners"),
    ({"kind": "polygon", "points": [[1, 2], [3, 4]]}, "3 to"),
    ({"kind": "polygon", "points": [[1, "a"], [3, 4], [5, 6]]}, "[x, y] numbers"),
    ({"kind": "polygon", "points": [[1, True], [3, 4], [5, 6]]}, "[x, y] numbers"),
    ({"kind": "ellipse", "points": [[1, float("nan")], [3, 4]]}, "finite"),
])
def test_bad_shapes_are_refused_with_a_reason(body: object, reason: str) -> None:
    with pytest.raises(BadShape, match=reason.replace("[", r"\[").replace("]", r"\]")):
        parse_shape(body)


def test_a_region_outside_the_image_and_a_colour_image_are_refused() -> None:
    data, _hu = disc_ct()
    with pytest.raises(BadShape, match="no pixel"):
        measure_source(data, 0, parse_shape({"kind": "ellipse",
                                             "points": [[100, 100], [120, 130]]}), 10**6)
    ds = make_dataset(rows=4, columns=4)
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = bytes(4 * 4 * 3)
    with pytest.raises(RenderRefused, match="colour"):
        measure_source(to_bytes(ds), 0, parse_shape({"kind": "ellipse",
                                                     "points": [[0, 0], [4, 4]]}), 10**6)


def test_units_follow_rescale_type_and_modality() -> None:
    data, _ = disc_ct()
    assert measure_source(data, 0, Shape("ellipse", ((0, 0), (8, 8))), 10**6).unit == "HU"
    mr = make_dataset(rows=8, columns=8, modality="MR")
    del mr.RescaleIntercept, mr.RescaleSlope
    assert measure_source(to_bytes(mr), 0, Shape("ellipse", ((0, 0), (8, 8))), 10**6).unit == ""
