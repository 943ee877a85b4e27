"""What the viewer page needs to know about a series, in one small JSON document.

The page carries it inline, so the first image can be asked for without another round trip:
the frames in order, their geometry (PS3.3 C.7.6.2 Image Plane, C.8.11.4 DX detector), the
windows the file offers (C.11.2.1.2), the presets (``presets.presets_for``: those windows and
the usual ones for the modality and body part, each once) and the default window.
"""

from __future__ import annotations

from typing import Any

from portal.imaging.presets import presets_for
from portal.imaging.rendition import WIDTHS
from portal.imaging.service import forms_volume
from portal.index.models import Instance, Series, Study

MAX_FRAMES = 5000
# DICOM JSON tags (PS3.18 F.2) read from the middle image's header.
_TAGS = {
    "window_center": "00281050", "window_width": "00281051", "window_explanation": "00281055",
    "pixel_spacing": "00280030", "imager_pixel_spacing": "00181164",
    "frame_time": "00181063", "cine_rate": "00180040", "display_rate": "00082144",
    "orientation": "00200037", "shared_groups": "52009229", "pixel_measures": "00289110",
    "plane_orientation": "00209116", "spacing_calibration": "00280A02",
}


def _values(header: dict[str, Any], key: str) -> list[Any]:
    element = header.get(_TAGS[key]) or {}
    values = element.get("Value") or []
    return list(values) if isinstance(values, list) else []


def _numbers(header: dict[str, Any], key: str) -> list[float]:
    out = []
    for value in _values(header, key):
        try:
            out.append(float(value))
        except (TypeError, ValueError):
            return []
    return out


def _shared(header: dict[str, Any], group: str, key: str) -> list[float]:
    """A value from the Shared Functional Groups Sequence (enhanced multi-frame, C.7.6.16)."""
    for item in _values(header, "shared_groups"):
        if isinstance(item, dict):
            for inner in _values(item, group):
                if isinstance(inner, dict) and _numbers(inner, key):
                    return _numbers(inner, key)
    return []


def file_windows(header: dict[str, Any]) -> list[dict[str, Any]]:
    """The windows stored in the file (centre, width, name), first one first."""
    centers, widths = _numbers(header, "window_center"), _numbers(header, "window_width")
    names = [str(v) for v in _values(header, "window_explanation")]
    windows = []
    for index, (center, width) in enumerate(zip(centers, widths, strict=False)):
        if width > 0:
            name = names[index] if index < len(names) and names[index] else f"File {index + 1}"
            windows.append({"name": name[:32], "center": center, "width": width})
    return windows


def spacing_of(instance: Instance, header: dict[str, Any]) -> tuple[list[float] | None, str]:
    """Pixel spacing (row, column) in mm and where it came from.

    ``patient`` is PixelSpacing in the patient (CT, MR); ``detector`` is ImagerPixelSpacing
    at the detector, which overstates sizes by the magnification (PS3.3 C.8.11.4.1.1), so a
    measurement made with it is only approximate. Calibrated projection PixelSpacing counts
    as ``detector`` too unless PixelSpacingCalibrationType says GEOMETRY or FIDUCIAL.
    """
    spacing = (instance.pixel_spacing or _numbers(header, "pixel_spacing")
               or _shared(header, "pixel_measures", "pixel_spacing"))
    if spacing and len(spacing) == 2 and min(spacing) > 0:
        projection = not (instance.image_orientation_patient
                          or _numbers(header, "orientation")
                          or _shared(header, "plane_orientation", "orientation"))
        calibrated = bool(_values(header, "spacing_calibration"))
        return [float(spacing[0]), float(spacing[1])], (
            "detector" if projection and not calibrated else "patient")
    imager = _numbers(header, "imager_pixel_spacing")
    if len(imager) == 2 and min(imager) > 0:
        return imager, "detector"
    return None, ""


def describe_series(study: Study, series: Series, images: list[Instance],
                    header: dict[str, Any], default_window: tuple[float, float] | None,
                    signed: dict[str, str] | None = None) -> dict[str, Any]:
    """The viewer's description of a series (no patient name: the page shows that as text);
    ``signed``: each image's rendition token (``imaging/signed.py``), added to its URLs."""
    frames: list[list[Any]] = []
    for instance in images:
        for number in range(1, max(instance.number_of_frames, 1) + 1):
            frames.append([instance.sop_instance_uid, number])
            if len(frames) >= MAX_FRAMES:
                break
    middle = images[len(images) // 2] if images else None
    spacing, spacing_source = spacing_of(middle, header) if middle else (None, "")
    orientation = ((middle.image_orientation_patient if middle else None)
                   or _numbers(header, "orientation")
                   or _shared(header, "plane_orientation", "orientation") or None)
    windows = file_windows(header)
    monochrome = bool(middle and middle.photometric_interpretation.startswith("MONOCHROME"))
    if default_window is None and windows:
        default_window = (windows[0]["center"], windows[0]["width"])
    # One list: the file's windows and the usual ones for this modality and body part.
    presets = presets_for(series.modality, series.body_part_examined, windows)
    frame_time = _numbers(header, "frame_time")
    rate = (_numbers(header, "cine_rate") or _numbers(header, "display_rate"))
    fps = rate[0] if rate else (1000.0 / frame_time[0] if frame_time and frame_time[0] else 10)
    multiframe = any(i.number_of_frames > 1 for i in images)
    return {
        "study": study.study_instance_uid, "series": series.series_instance_uid,
        "modality": series.modality, "number": series.series_number,
        "description": series.series_description,
        "frames": frames,
        "rows": middle.rows if middle else None, "columns": middle.columns if middle else None,
        "spacing": spacing, "spacingSource": spacing_source,
        "orientation": orientation if orientation and len(orientation) == 6 else None,
        "monochrome": monochrome,
        "window": ({"center": default_window[0], "width": default_window[1]}
                   if default_window and monochrome else None),
        "fileWindows": windows if monochrome else [], "presets": presets if monochrome else [],
        "volume": forms_volume(images), "cine": multiframe,
        "fps": max(1.0, min(float(fps), 60.0)),
        "widths": list(WIDTHS),
        "signed": signed or {},
    }
