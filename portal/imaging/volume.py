"""Reformats and a rotating maximum-intensity projection from a series that forms a volume.

A series forms a volume when its slices share one orientation (Image Orientation (Patient),
PS3.3 C.7.6.2.1.1), have the same size and pixel spacing, and lie along the slice normal at
(nearly) even steps. Positions come from Image Position (Patient) projected on the normal.
Pure functions, no Flask: the caller checks access and caches the encoded result.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pydicom
from PIL import Image
from pydicom.pixels import apply_modality_lut, pixel_array

from portal.imaging.render import encode, robust_window, window_to_8bit
from portal.imaging.rendition import Rendition, Window

MAX_VOXELS = 512 * 512 * 1200
VIEWS = ("sagittal", "coronal", "axial", "mip")


class NotAVolume(ValueError):
    """The series cannot be shown in 3D; the message says why."""


@dataclass(frozen=True)
class Volume:
    """Slices stacked along the normal (z, rows, columns) in modality units."""

    voxels: np.ndarray
    row_spacing: float
    column_spacing: float
    slice_spacing: float
    window: Window | None


def build_volume(files: Sequence[bytes], max_side: int = 256) -> Volume:
    """Decode and stack the slices; each is reduced to at most ``max_side`` pixels wide."""
    headers = [pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True) for data in files]
    if len(headers) < 3:
        raise NotAVolume("a volume needs at least three slices")
    try:
        orientation = np.array([float(v) for v in headers[0].ImageOrientationPatient])
        size = (int(headers[0].Rows), int(headers[0].Columns))
        spacing = [float(v) for v in headers[0].PixelSpacing]
    except (AttributeError, TypeError, ValueError) as exc:
        raise NotAVolume("the slices carry no geometry (orientation, spacing)") from exc
    if int(headers[0].get("NumberOfFrames") or 1) != 1:
        raise NotAVolume("multi-frame series are shown frame by frame")
    if size[0] * size[1] * len(headers) > MAX_VOXELS:
        raise NotAVolume("this series is too large to reformat")
    normal = np.cross(orientation[:3], orientation[3:])
    positions = []
    for header in headers:
        try:
            same = np.allclose([float(v) for v in header.ImageOrientationPatient],
                               orientation, atol=1e-3)
            if not same or (int(header.Rows), int(header.Columns)) != size:
                raise NotAVolume("the slices differ in orientation or size")
            positions.append(float(np.dot([float(v) for v in header.ImagePositionPatient],
                                          normal)))
        except (AttributeError, TypeError, ValueError) as exc:
            raise NotAVolume("a slice has no position") from exc
    order = np.argsort(positions)
    steps = np.diff(np.array(positions)[order])
    if np.any(steps <= 1e-3) or steps.max() > 1.1 * steps.min():
        raise NotAVolume("the slices are not evenly spaced")
    factor = max(1, int(np.ceil(max(size) / max_side)))
    slices = []
    for index in order:
        pixels = pixel_array(io.BytesIO(files[index]))
        values = apply_modality_lut(pixels, headers[index]).astype(np.float32)
        if factor > 1:
            values = values[::factor, ::factor]
        slices.append(values)
    first = headers[order[0]]
    center, width = first.get("WindowCenter"), first.get("WindowWidth")
    window = None
    if center is not None and width is not None:
        c = float(center[0] if isinstance(center, pydicom.multival.MultiValue) else center)
        w = float(width[0] if isinstance(width, pydicom.multival.MultiValue) else width)
        window = Window(c, w) if w > 0 else None
    return Volume(np.stack(slices), spacing[0] * factor, spacing[1] * factor,
                  float(steps.mean()), window)


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
    if kind == "mip":
        # Rotate each axial slice about the patient's vertical axis, project front to back.
        rows_out = []
        low = float(voxels.min())
        for plane in voxels:
            rotated = Image.fromarray(plane).rotate(angle, resample=Image.Resampling.BILINEAR,
                                                    fillcolor=low)
            rows_out.append(np.asarray(rotated).max(axis=0))
        return np.stack(rows_out)[::-1], volume.slice_spacing / volume.column_spacing
    raise NotAVolume(f"unknown view {kind!r}")


def render_volume_view(volume: Volume, kind: str, position: float, angle: float,
                       rendition: Rendition) -> bytes:
    """Cut or project a built volume, window and encode."""
    image, aspect = view(volume, kind, position=position, angle=angle)
    window = rendition.window or volume.window or robust_window(image)
    return encode(window_to_8bit(image, window), aspect, rendition)

