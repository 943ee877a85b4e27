"""Reformats and a rotating maximum-intensity projection from a series that forms a volume.

A series forms a volume when its slices share one orientation (Image Orientation (Patient),
PS3.3 C.7.6.2.1.1), have the same size and a usable pixel spacing, and lie along the slice
normal at (nearly) even steps, no two at one position. Positions come from Image Position
(Patient) projected on the normal. ``assess`` checks this once, before anything is decoded (and
for the viewer, on the index's values), so a volume that was built can always be cut.
Pure functions, no Flask: the caller checks access and caches the encoded result.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pydicom
from pydicom.pixels.processing import apply_modality_lut

from portal import failures
from portal.imaging.render import (
    MAX_RENDER_PIXELS,
    RenderRefused,
    decode_frame,
    encode,
    robust_window,
    through_table,
    window_to_8bit,
)
from portal.imaging.render3d import Grid, grid, mip_bytes
from portal.imaging.rendition import Rendition, Window

MAX_VOXELS = 512 * 512 * 1200
VIEWS = ("sagittal", "coronal", "axial", "mip", "3d")
SAME_POSITION_MM = 1e-3  # slices closer than this along the normal lie at one position
# Pixel spacings outside this (mm) are no body's; a slice step more than MAX_ASPECT times a
# pixel's size (or less than its part) would stretch a reformat beyond any use.
SPACING_MM = (1e-3, 1e3)
MAX_ASPECT = 100.0


class NotAVolume(failures.Unprocessable, ValueError):
    """The series cannot be shown in 3D; the message says why."""


def not_in_3d(reason: str) -> NotAVolume:
    """What a reformat or 3D view of a series that forms no volume answers (422)."""
    return NotAVolume("these images cannot be shown in 3D: %(reason)s", reason=reason)


@dataclass(frozen=True)
class Geometry:
    """Where a series' slices lie, once ``assess`` found that they form a volume."""

    orientation: tuple[float, ...]  # Image Orientation (Patient): row, then column direction
    row_spacing: float  # mm, finite and positive
    column_spacing: float  # mm, finite and positive
    order: tuple[int, ...]  # the slices' indices along the normal
    slice_spacing: float  # mm between neighbouring slices, finite and positive


def assess(orientations: Sequence[Sequence[float]], spacing: Sequence[float],
           positions: Sequence[Sequence[float]]) -> Geometry:
    """Check that slices with these orientations and positions, and this pixel spacing (of
    the first slice), form a volume; NotAVolume with the reason in plain words if not.

    Everything a reformat or a 3D view divides by or steps along is checked here.
    """
    if len(positions) < 3:
        raise NotAVolume("a volume needs at least three slices")
    try:
        first = np.array(orientations[0], float)
        pixel = np.array(spacing, float)
        points = np.array(positions, float)
    except (TypeError, ValueError, IndexError) as exc:
        raise NotAVolume("the slices carry no geometry (orientation, spacing)") from exc
    try:  # one array for all: a 1,000-slice series is checked in well under a millisecond
        facing = np.array(orientations, float)
    except (TypeError, ValueError) as exc:
        raise NotAVolume("the slices differ in orientation or size") from exc
    with np.errstate(over="ignore", invalid="ignore"):  # huge or odd numbers: refused below
        normal = np.cross(first[:3], first[3:]) if first.shape == (6,) else np.zeros(3)
        length = np.linalg.norm(normal)
        if not np.all(np.isfinite(normal)) or not length >= 0.5:
            raise NotAVolume("the slices carry no geometry (orientation, spacing)")
        normal = normal / length
        if facing.shape != (len(positions), 6) or not np.allclose(facing, first, atol=1e-3):
            raise NotAVolume("the slices differ in orientation or size")
        if pixel.shape != (2,) or not np.all(np.isfinite(pixel)) or \
                np.any(pixel < SPACING_MM[0]) or np.any(pixel > SPACING_MM[1]):
            raise NotAVolume("the images have no usable pixel spacing")
        if points.shape != (len(positions), 3) or not np.all(np.isfinite(points)):
            raise NotAVolume("a slice has no position")
        along = points @ normal
        order = np.argsort(along, kind="stable")
        steps = np.diff(along[order])
        span = along[order[-1]] - along[order[0]]
    if not np.all(np.isfinite(steps)) or not np.isfinite(span):
        raise NotAVolume("a slice has no position")
    if span <= SAME_POSITION_MM:
        raise NotAVolume("the slices share one position")
    if np.any(steps <= SAME_POSITION_MM):
        raise NotAVolume("two or more slices share one position")
    if steps.max() > 1.1 * steps.min():
        raise NotAVolume("the slices are not evenly spaced")
    if not 1 / MAX_ASPECT <= float(steps.mean()) / float(pixel.min()) <= MAX_ASPECT:
        raise NotAVolume("the slices are too far apart or too close for their pixels")
    return Geometry(tuple(float(v) for v in first), float(pixel[0]), float(pixel[1]),
                    tuple(int(i) for i in order), float(steps.mean()))


@dataclass(frozen=True)
class Volume:
    """Slices stacked along the normal (z, rows, columns) in modality units."""

    voxels: np.ndarray
    row_spacing: float
    column_spacing: float
    slice_spacing: float
    window: Window | None
    mip_window: Window | None = None  # what a MIP is shown with unless a window is asked for
    # Image Orientation (Patient) of the slices (row, then column direction); None: axial.
    orientation: tuple[float, ...] | None = None
    is_ct: bool = False  # values in Hounsfield units (the 3D presets' ramps are in HU)

    def grid(self) -> Grid:
        """The voxels with their axes in the patient (portal/imaging/render3d.py)."""
        return grid(self.voxels, self.slice_spacing, self.row_spacing, self.column_spacing,
                    self.orientation)


def content_key(digests: Iterable[str]) -> str:
    """The name of a series' volume: a SHA-256 over its files' SHA-256s, in any order."""
    return hashlib.sha256("".join(sorted(digests)).encode()).hexdigest()


def mip_window(voxels: np.ndarray) -> Window:
    """A window for maximum-intensity projections of these voxels.

    A projection keeps the brightest voxel of every ray, so the window of a slice (e.g. soft
    tissue on a CT) leaves it white; this one spans the projection's own values (front to
    back, as the MIP first shows), from the darkest rays outside the body to the brightest.
    """
    projection = voxels.max(axis=1)
    low, high = np.percentile(projection, [1.0, 99.8])
    if not high > low:
        return robust_window(projection)
    return Window(float(low + high) / 2.0, float(high - low) + 1.0)


def _reduce(values: np.ndarray, factor: int) -> np.ndarray:
    """Average ``factor`` x ``factor`` blocks (less noise and aliasing than every n-th pixel)."""
    if factor <= 1:
        return values
    rows, columns = values.shape[0] // factor, values.shape[1] // factor
    trimmed = values[:rows * factor, :columns * factor]
    out = np.zeros((rows, columns), np.float32)
    for i in range(factor):
        for j in range(factor):
            out += trimmed[i::factor, j::factor]
    out /= factor * factor
    return out


def build_volume(files: Sequence[bytes], max_side: int = 256,
                 progress: Callable[[float], None] | None = None) -> Volume:
    """Decode and stack the slices; each is reduced to at most ``max_side`` pixels wide.

    ``progress`` hears the share of slices decoded so far (0..1), now and then.
    """
    headers = [pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True) for data in files]
    if len(headers) < 3:
        raise NotAVolume("a volume needs at least three slices")
    try:
        size = (int(headers[0].Rows), int(headers[0].Columns))
        spacing = [float(v) for v in headers[0].PixelSpacing]
        orientations = [[float(v) for v in h.ImageOrientationPatient] for h in headers]
    except (AttributeError, TypeError, ValueError) as exc:
        raise NotAVolume("the slices carry no geometry (orientation, spacing)") from exc
    if int(headers[0].get("NumberOfFrames") or 1) != 1:
        raise NotAVolume("multi-frame series are shown frame by frame")
    if size[0] * size[1] * len(headers) > MAX_VOXELS:
        raise NotAVolume("this series is too large to reformat")
    try:
        sizes = {(int(h.Rows), int(h.Columns)) for h in headers}
        positions = [[float(v) for v in h.ImagePositionPatient] for h in headers]
    except (AttributeError, TypeError, ValueError) as exc:
        raise NotAVolume("a slice has no position") from exc
    if sizes != {size}:
        raise NotAVolume("the slices differ in orientation or size")
    geometry = assess(orientations, spacing, positions)
    order = geometry.order
    factor = max(1, int(np.ceil(max(size) / max_side)))
    slices = []
    for count, index in enumerate(order):
        try:
            frame, _ds = decode_frame(files[index], 0, MAX_RENDER_PIXELS)
            if frame.pixels.ndim != 2:
                raise NotAVolume("colour series are shown slice by slice")
            values = through_table("Modality LUT", apply_modality_lut, frame.pixels,
                                   headers[index]).astype(np.float32)
        except RenderRefused as exc:
            raise NotAVolume(f"a slice cannot be decoded ({exc})") from exc
        slices.append(_reduce(values, factor))
        if progress is not None and (count % 8 == 7 or count == len(order) - 1):
            progress((count + 1) / len(order))
    first = headers[order[0]]
    center, width = first.get("WindowCenter"), first.get("WindowWidth")
    window = None
    if center is not None and width is not None:
        c = float(center[0] if isinstance(center, pydicom.multival.MultiValue) else center)
        w = float(width[0] if isinstance(width, pydicom.multival.MultiValue) else width)
        window = Window(c, w) if w > 0 else None
    voxels = np.stack(slices)
    return Volume(voxels, geometry.row_spacing * factor, geometry.column_spacing * factor,
                  geometry.slice_spacing, window, mip_window(voxels), geometry.orientation,
                  str(first.get("Modality", "")).upper() == "CT")


def view(volume: Volume, kind: str, *, position: float = 0.5,
         angle: float = 0.0) -> tuple[np.ndarray, float]:
    """A 2D image of the volume and its pixel aspect (vertical / horizontal).

    Sagittal and coronal images put the first slice at the bottom, as radiologists expect
    head-up for axial acquisitions ordered foot to head.
    """
    voxels = volume.voxels
    depth, rows, columns = voxels.shape
    if kind == "axial":
        return voxels[min(depth - 1, int(position * depth))], (
            volume.row_spacing / volume.column_spacing)
    if kind == "coronal":
        image = voxels[:, min(rows - 1, int(position * rows)), :][::-1]
        return image, volume.slice_spacing / volume.column_spacing
    if kind == "sagittal":
        image = voxels[:, :, min(columns - 1, int(position * columns))][::-1]
        return image, volume.slice_spacing / volume.row_spacing
    raise NotAVolume(f"unknown view {kind!r}")


def render_volume_view(volume: Volume, kind: str, position: float, angle: float,
                       rendition: Rendition) -> bytes:
    """Cut or project a built volume, window and encode. The MIP is the oblique one of
    render3d.py, turned about the vertical axis only (``render3d.render_turned`` turns it
    about two)."""
    if kind == "mip":
        return mip_bytes(volume.grid(), volume.mip_window, angle % 360, 0.0, 1.0, 0.0, "full",
                         rendition)
    image, aspect = view(volume, kind, position=position, angle=angle)
    default = volume.mip_window if kind == "mip" else volume.window
    window = rendition.window or default or robust_window(image)
    return encode(window_to_8bit(image, window), aspect, rendition)

