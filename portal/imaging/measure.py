"""Measurements of a region of a stored frame, in the modality's units (pure numpy, no Flask).

A region is an ellipse (its bounding box) or a closed polygon (a freehand outline) in image
pixel coordinates: x to the right along a row, y down along a column, (0, 0) the top-left
corner of the top-left pixel, so a pixel's centre is at (column + 0.5, row + 0.5). A pixel
belongs to the region when its centre is inside.

The values are the stored pixel values through the Modality LUT (PS3.3 C.11.1: Rescale Slope
and Intercept, per frame for enhanced objects, C.7.6.16.2.9; or the Modality LUT Sequence):
Hounsfield units for CT, never the windowed 8-bit picture the phone shows. Decoding runs in
the isolated render processes like every other decode (docs/security.md 32).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels.processing import apply_modality_lut

from portal import failures
from portal.archive.store import StoredFile
from portal.imaging.render import Frame, RenderRefused, decode_frame, through_table

MAX_POINTS = 1000  # of a freehand outline; a finger drawing a minute sends a few hundred
KINDS = ("ellipse", "polygon")


class BadShape(failures.Invalid, ValueError):
    """The shape asked for cannot be measured (400 with the reason)."""


@dataclass(frozen=True)
class Shape:
    """An ellipse (two opposite corners of its bounding box) or a closed polygon."""

    kind: str
    points: tuple[tuple[float, float], ...]


@dataclass(frozen=True)
class RegionValues:
    """What the pixels of a region hold (values in ``unit``)."""

    pixels: int
    mean: float
    sd: float
    minimum: float
    maximum: float
    unit: str
    pixel_area: float  # the shape's own area in square pixels (not the count of pixels)


def parse_shape(body: Any) -> Shape:
    """A shape from its JSON form ``{"kind": "ellipse"|"polygon", "points": [[x, y], ...]}``;
    BadShape with the reason when it is not one."""
    if not isinstance(body, dict):
        raise BadShape("the body must be a JSON object with kind and points")
    kind, points = body.get("kind"), body.get("points")
    if kind not in KINDS:
        raise BadShape(f"kind must be one of {', '.join(KINDS)}")
    if not isinstance(points, list) or not all(
            isinstance(p, list) and len(p) == 2
            and all(isinstance(v, int | float) and not isinstance(v, bool) for v in p)
            for p in points):
        raise BadShape("points must be a list of [x, y] numbers")
    pairs = tuple((float(p[0]), float(p[1])) for p in points)
    if not all(math.isfinite(v) for pair in pairs for v in pair):
        raise BadShape("points must be finite numbers")
    if kind == "ellipse" and len(pairs) != 2:
        raise BadShape("an ellipse is given by two opposite corners of its bounding box")
    if kind == "polygon" and not 3 <= len(pairs) <= MAX_POINTS:
        raise BadShape(f"a freehand region has 3 to {MAX_POINTS} points")
    return Shape(kind, pairs)


def shape_area(shape: Shape) -> float:
    """The shape's area in square pixels (an ellipse's pi*a*b, a polygon's shoelace sum)."""
    if shape.kind == "ellipse":
        (x0, y0), (x1, y1) = shape.points
        return math.pi * abs(x1 - x0) / 2 * abs(y1 - y0) / 2
    xs = np.array([p[0] for p in shape.points])
    ys = np.array([p[1] for p in shape.points])
    return float(abs(np.dot(xs, np.roll(ys, -1)) - np.dot(ys, np.roll(xs, -1))) / 2)


def region_mask(shape: Shape, rows: int, columns: int) -> np.ndarray:
    """A boolean rows x columns mask of the pixels whose centres lie inside the shape."""
    mask = np.zeros((rows, columns), dtype=bool)
    centres_x = np.arange(columns) + 0.5
    if shape.kind == "ellipse":
        (x0, y0), (x1, y1) = shape.points
        cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, abs(x1 - x0) / 2, abs(y1 - y0) / 2
        if rx <= 0 or ry <= 0:
            return mask
        top, bottom = max(0, math.floor(cy - ry)), min(rows, math.ceil(cy + ry) + 1)
        ys = np.arange(top, bottom)[:, None] + 0.5
        inside = ((centres_x[None, :] - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1.0
        mask[top:bottom] = inside
        return mask
    # A polygon, even-odd rule, one scan line per pixel row: where the edges cross the row's
    # centre line, sorted, pairs of crossings bound the inside.
    xs = np.array([p[0] for p in shape.points])
    ys = np.array([p[1] for p in shape.points])
    x2, y2 = np.roll(xs, -1), np.roll(ys, -1)
    top = max(0, math.floor(float(ys.min())))
    bottom = min(rows, math.ceil(float(ys.max())) + 1)
    for row in range(top, bottom):
        y = row + 0.5
        crossing = (ys > y) != (y2 > y)
        if not crossing.any():
            continue
        xa, ya, xb, yb = xs[crossing], ys[crossing], x2[crossing], y2[crossing]
        cuts = np.sort(xa + (y - ya) * (xb - xa) / (yb - ya))
        for start, end in zip(cuts[0::2], cuts[1::2], strict=False):
            mask[row] |= (centres_x >= start) & (centres_x < end)
    return mask


def modality_values(frame: Frame, ds: Dataset) -> tuple[np.ndarray, str]:
    """The frame's values after the Modality LUT, as float64, and their unit."""
    if frame.photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise RenderRefused("a colour image holds no values to measure")
    pixels = frame.pixels
    if frame.rescale is not None:
        values = pixels.astype(np.float64) * frame.rescale[0] + frame.rescale[1]
    elif "ModalityLUTSequence" in ds:
        values = np.asarray(through_table("Modality LUT", apply_modality_lut, pixels, ds),
                            dtype=np.float64)
    else:
        try:
            slope = float(ds.get("RescaleSlope", 1) or 1)
            intercept = float(ds.get("RescaleIntercept", 0) or 0)
        except (TypeError, ValueError):
            slope, intercept = 1.0, 0.0
        values = pixels.astype(np.float64) * slope + intercept
    return values, value_unit(ds)


def value_unit(ds: Dataset) -> str:
    """The unit of the modality values: Rescale Type (C.11.1.1.2; US, unspecified, says
    nothing), else HU for CT (its rescale gives Hounsfield units, C.8.2.1.1.2), else
    PET's Units (C.8.9.1.1.3), else '' (stored values of no stated unit)."""
    rescale_type = str(ds.get("RescaleType", "") or "").strip()
    if rescale_type and rescale_type != "US":
        return rescale_type
    modality = str(ds.get("Modality", "") or "").strip()
    if modality == "CT":
        return "HU"
    if modality == "PT":
        return str(ds.get("Units", "") or "").strip()
    return ""


def region_values(values: np.ndarray, shape: Shape, unit: str) -> RegionValues:
    """Statistics of the values inside the shape; BadShape when no pixel centre is inside."""
    rows, columns = values.shape[:2]
    mask = region_mask(shape, rows, columns)
    inside = values[mask]
    if inside.size == 0:
        raise BadShape("the region holds no pixel of the image")
    return RegionValues(pixels=int(inside.size), mean=float(inside.mean()),
                        sd=float(inside.std()), minimum=float(inside.min()),
                        maximum=float(inside.max()), unit=unit, pixel_area=shape_area(shape))


def measure_source(source: bytes | StoredFile, index: int, shape: Shape,
                   max_pixels: int) -> RegionValues:
    """Decode frame ``index`` (0-based) of bytes or a stored file (read and hash-checked
    here, in the render process) and measure the region: the function run isolated."""
    data = source if isinstance(source, bytes) else source.read()
    frame, ds = decode_frame(data, index, max_pixels)
    values, unit = modality_values(frame, ds)
    return region_values(values, shape, unit)
