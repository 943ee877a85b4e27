"""Pure rendering: DICOM frame -> modality LUT -> VOI LUT / window -> 8 bit -> resize -> encode.

No Flask here. The steps follow PS3.3: Modality LUT (C.11.1: rescale slope and intercept, or
the Modality LUT Sequence), VOI LUT (C.11.2: window centre and width with LINEAR, LINEAR_EXACT
or SIGMOID, or a VOI LUT Sequence), MONOCHROME1 shown inverted (C.7.6.3.1.2), PALETTE COLOR
through its lookup tables (C.7.6.3.1.5), YBR converted to RGB by the decoder. Enhanced
multi-frame objects take rescale and window from their per-frame functional groups (C.7.6.16).
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, pixel_array

from portal.imaging.rendition import Rendition, Window

MAX_RENDER_PIXELS = 64_000_000  # one frame; larger frames are refused before decoding
# Decoders measured fastest here for a syntax (JPEG-LS: pyjpegls about 1.5-2x pylibjpeg);
# the others use pydicom's default order.
PREFERRED_DECODERS = {"1.2.840.10008.1.2.4.80": "pyjpegls", "1.2.840.10008.1.2.4.81": "pyjpegls"}


class RenderRefused(ValueError):
    """The frame cannot be rendered (too large, corrupt, unsupported); 422 with the reason."""


class FrameNotFound(LookupError):
    """The frame number is past the end of the instance."""


@dataclass(frozen=True)
class Frame:
    """A decoded frame with the attributes rendering needs."""

    pixels: np.ndarray
    photometric: str
    rescale: tuple[float, float] | None  # (slope, intercept) from a functional group
    window: Window | None  # the file's own window for this frame
    aspect: float  # vertical / horizontal pixel size


def _functional(ds: Dataset, index: int, sequence: str) -> Dataset | None:
    """The item of a functional-group sequence for one frame (per-frame, else shared)."""
    for groups_name, pick in (("PerFrameFunctionalGroupsSequence", index),
                              ("SharedFunctionalGroupsSequence", 0)):
        groups = ds.get(groups_name)
        if groups and len(groups) > pick:
            item = groups[pick].get(sequence)
            if item:
                return item[0]  # type: ignore[no-any-return]
    return None


def _first(value: Any) -> float:
    if isinstance(value, list | tuple) or (hasattr(value, "__len__")
                                          and not isinstance(value, str | bytes)):
        return float(value[0])
    return float(value)


def _file_window(ds: Dataset, index: int) -> Window | None:
    source = _functional(ds, index, "FrameVOILUTSequence") or ds
    center, width = source.get("WindowCenter"), source.get("WindowWidth")
    if center is None or width is None:
        return None
    try:
        c, w = _first(center), _first(width)
    except (TypeError, ValueError, IndexError):
        return None
    if not w > 0:
        return None
    function = str(source.get("VOILUTFunction", "LINEAR")).strip().lower()
    return Window(c, w, function if function in ("linear", "linear_exact", "sigmoid")
                  else "linear")  # type: ignore[arg-type]


def _aspect(ds: Dataset, index: int) -> float:
    ratio = ds.get("PixelAspectRatio")
    try:
        if ratio and len(ratio) == 2 and float(ratio[1]) > 0:
            return float(ratio[0]) / float(ratio[1])
        measures = _functional(ds, index, "PixelMeasuresSequence")
        spacing = (measures.get("PixelSpacing") if measures else None) or ds.get(
            "PixelSpacing") or ds.get("ImagerPixelSpacing")
        if spacing and len(spacing) == 2 and float(spacing[1]) > 0:
            value = float(spacing[0]) / float(spacing[1])
            return value if 0.1 <= value <= 10 else 1.0
    except (TypeError, ValueError):
        pass
    return 1.0


def _decode(data: bytes, index: int | None, plugin: str) -> np.ndarray:
    """Decode with the preferred plugin, falling back to pydicom's own choice."""
    try:
        return pixel_array(io.BytesIO(data), index=index, decoding_plugin=plugin)
    except (RuntimeError, ValueError):
        if not plugin:
            raise
        return pixel_array(io.BytesIO(data), index=index)


def decode_frame(data: bytes, index: int,
                 max_pixels: int = MAX_RENDER_PIXELS) -> tuple[Frame, Dataset]:
    """Decode one frame (0-based), after checking its size, and say how to display it."""
    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    rows, columns = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    frames = int(ds.get("NumberOfFrames") or 1)
    if rows <= 0 or columns <= 0:
        raise RenderRefused("this instance has no image")
    if rows * columns > max_pixels:
        raise RenderRefused(f"a {columns}x{rows} frame is too large to render")
    if not 0 <= index < frames:
        raise FrameNotFound(f"frame {index + 1} is outside 1..{frames}")
    plugin = PREFERRED_DECODERS.get(str(ds.file_meta.get("TransferSyntaxUID", "")), "")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pixels = _decode(data, index if frames > 1 else None, plugin)
    except MemoryError:
        raise  # the render process's memory cap: reported as such by the caller
    except Exception as exc:  # every decoder has its own errors: all mean "cannot decode"
        raise RenderRefused(f"the image data cannot be decoded: {exc.__class__.__name__}"
                            ) from exc
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    if photometric == "PALETTE COLOR":
        full = pydicom.dcmread(io.BytesIO(data))
        pixels = apply_color_lut(pixels, full)
        photometric = "RGB"
    rescale = None
    transform = _functional(ds, index, "PixelValueTransformationSequence")
    if transform is not None and "RescaleSlope" in transform:
        rescale = (float(transform.RescaleSlope), float(transform.get("RescaleIntercept", 0)))
    return Frame(pixels=pixels, photometric=photometric, rescale=rescale,
                 window=_file_window(ds, index), aspect=_aspect(ds, index)), ds


def window_to_8bit(values: np.ndarray, window: Window) -> np.ndarray:
    """Apply a VOI window (PS3.3 C.11.2.1.2-3) and map to 0..255."""
    c, w = window.center, window.width
    x = values.astype(np.float32, copy=False)
    if window.function == "sigmoid":
        out = 255.0 / (1.0 + np.exp(-4.0 * (x - c) / w))
    elif window.function == "linear_exact":
        out = ((x - c) / w + 0.5) * 255.0
    else:
        width = max(w - 1.0, 1.0)
        out = ((x - (c - 0.5)) / width + 0.5) * 255.0
    return np.clip(out, 0, 255).astype(np.uint8)


def robust_window(values: np.ndarray) -> Window:
    """A default window from the 0.5th and 99.5th percentiles, not the raw extremes."""
    sample = values[::4, ::4] if values.ndim == 2 and values.size > 1_000_000 else values
    low, high = np.percentile(sample, [0.5, 99.5])
    if not math.isfinite(low) or not math.isfinite(high) or high <= low:
        low, high = float(np.min(sample)), float(np.max(sample))
        if high <= low:
            high = low + 1.0
    return Window((low + high) / 2.0, high - low + 1.0, "linear")


def to_display(frame: Frame, ds: Dataset, rendition: Rendition) -> np.ndarray:
    """Grey or RGB 8-bit pixels ready to resize and encode."""
    pixels = frame.pixels
    if frame.photometric in ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT"):
        if pixels.dtype != np.uint8:
            top = float(2 ** int(ds.get("BitsStored", 8)) - 1)
            pixels = np.clip(pixels.astype(np.float32) / top * 255.0, 0, 255).astype(np.uint8)
        return pixels
    if frame.rescale is not None:
        values = pixels.astype(np.float32) * frame.rescale[0] + frame.rescale[1]
    else:
        values = apply_modality_lut(pixels, ds)
    window = rendition.window
    if window is None and rendition.preset == "auto":
        window = frame.window
        if window is None and "VOILUTSequence" in ds:
            lut = apply_voi_lut(values, ds, index=0)
            top = float(2 ** int(ds.VOILUTSequence[0].LUTDescriptor[2]) - 1)
            out = np.clip(lut.astype(np.float32) / max(top, 1.0) * 255.0, 0, 255)
            grey = out.astype(np.uint8)
            return 255 - grey if frame.photometric == "MONOCHROME1" else grey
    grey = window_to_8bit(values, window or robust_window(values))
    return 255 - grey if frame.photometric == "MONOCHROME1" else grey


def _target_size(width: int, height: int, aspect: float, rendition: Rendition
                 ) -> tuple[int, int]:
    out_w, out_h = float(width), float(height) * aspect
    scale = 1.0
    if rendition.width is not None:
        scale = min(scale, rendition.width / out_w)
    if rendition.height is not None:
        scale = min(scale, rendition.height / out_h)
    return max(1, round(out_w * scale)), max(1, round(out_h * scale))


def encode(pixels: np.ndarray, aspect: float, rendition: Rendition) -> bytes:
    """Resize (never up, honouring the pixel aspect ratio) and encode."""
    mode = "RGB" if pixels.ndim == 3 else "L"
    image = Image.fromarray(np.ascontiguousarray(pixels), mode=mode)
    size = _target_size(image.width, image.height, aspect, rendition)
    if size != image.size:
        image = image.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)
    buffer = io.BytesIO()
    if rendition.format == "jpeg":
        image.save(buffer, "JPEG", quality=rendition.quality)
    elif rendition.format == "webp":
        image.save(buffer, "WEBP", quality=rendition.quality, method=4)
    else:
        image.save(buffer, "PNG", compress_level=3)
    return buffer.getvalue()


def prereduce(pixels: np.ndarray, aspect: float, rendition: Rendition) -> np.ndarray:
    """Average blocks of pixels when the output is at most half the size.

    The window is a monotonic point operation, so averaging first and windowing after is
    close to the reverse order (within a grey level or two on smooth images) and much faster
    for a 3000-pixel radiograph shown 1024 wide.
    """
    rows, columns = pixels.shape[:2]
    width, height = _target_size(columns, rows, aspect, rendition)
    factor = min(columns // max(width, 1), int(rows * aspect) // max(height, 1))
    if factor < 2:
        return pixels
    rows_out, columns_out = rows // factor, columns // factor
    trimmed = pixels[:rows_out * factor, :columns_out * factor]
    # Summing strided views is several times faster than reshape(...).mean() here.
    total = np.zeros((rows_out, columns_out, *pixels.shape[2:]), dtype=np.float32)
    for i in range(factor):
        for j in range(factor):
            total += trimmed[i::factor, j::factor]
    total /= factor * factor
    return total.astype(np.uint8) if pixels.dtype == np.uint8 else total


def render_frame(data: bytes, index: int, rendition: Rendition,
                 max_pixels: int = MAX_RENDER_PIXELS) -> bytes:
    """One stored instance's frame (0-based) as an encoded web image."""
    frame, ds = decode_frame(data, index, max_pixels)
    if frame.pixels.ndim == 3 and frame.photometric.startswith("MONOCHROME"):
        raise RenderRefused("unexpected multi-sample monochrome data")
    lookup_tables = "ModalityLUTSequence" in ds or "VOILUTSequence" in ds
    if not lookup_tables:  # tables index by stored value: averaged values would not fit
        frame = Frame(prereduce(frame.pixels, frame.aspect, rendition), frame.photometric,
                      frame.rescale, frame.window, frame.aspect)
    return encode(to_display(frame, ds, rendition), frame.aspect, rendition)
