"""Deterministic, realistic-looking synthetic DICOM demo studies for the referrer portal.

Everything here is computed with numpy from fixed seeds: no data is downloaded and
running the generator twice yields the same UIDs (so importing twice is idempotent).
The pictures are analytic phantoms, not patient data; every instance carries
``SyntheticData = YES``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import pathlib
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence

import numpy as np
import pydicom
import pydicom.uid
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

__all__ = [
    "DEMO_PATIENTS",
    "DEMO_PHYSICIANS",
    "DemoPatient",
    "DemoPhysician",
    "generate_demo_set",
    "sample_files",
    "write_ct_series",
]

_log = logging.getLogger(__name__)

FloatArray = np.ndarray
Progress = Callable[[int], None]


# --------------------------------------------------------------------------------------
# People
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class DemoPhysician:
    """A referring physician who receives studies in the demo set."""

    name: str  # DICOM PN: Family^Given^Middle^Prefix^Suffix
    npi: str  # 10-digit US National Provider Identifier with a valid Luhn check digit
    email: str

    @property
    def display_name(self) -> str:
        """Human-readable name, e.g. ``Dr Gregory House``."""
        family, given, _middle, prefix = (self.name.split("^") + [""] * 4)[:4]
        return " ".join(part for part in (prefix, given, family) if part)


@dataclasses.dataclass(frozen=True, slots=True)
class DemoPatient:
    """A fictitious patient of the demo set."""

    patient_id: str
    name: str  # DICOM PN
    birth_date: str  # YYYYMMDD
    sex: str  # M, F or O


DEMO_PHYSICIANS: tuple[DemoPhysician, ...] = (
    DemoPhysician("House^Gregory^^Dr", "1234567893", "house@demo.example"),
    DemoPhysician("Quinn^Michaela^^Dr", "1987654328", "quinn@demo.example"),
    DemoPhysician("Grey^Meredith^^Dr", "1547298368", "grey@demo.example"),
    DemoPhysician("Carter^John^^Dr", "1672839408", "carter@demo.example"),
)

DEMO_PATIENTS: tuple[DemoPatient, ...] = (
    DemoPatient("DEMO-0001", "Doe^John", "19580412", "M"),
    DemoPatient("DEMO-0002", "Rossi^Maria", "19790823", "F"),
    DemoPatient("DEMO-0003", "Okafor^Adaeze", "19910117", "F"),
    DemoPatient("DEMO-0004", "Tanaka^Hiroshi", "19470305", "M"),
    # A non-ASCII name keeps the portal honest about SpecificCharacterSet handling.
    DemoPatient("DEMO-0005", "Müller^Jürgen", "19660929", "M"),
)


@dataclasses.dataclass(frozen=True, slots=True)
class _Study:
    """Study-level attributes shared by all instances of one demo study."""

    key: str  # seed for every UID of the study
    patient: DemoPatient
    physician: DemoPhysician
    date: str
    time: str
    accession: str
    study_id: str
    description: str
    body_part: str


@dataclasses.dataclass(frozen=True, slots=True)
class _Series:
    """Series-level attributes of one demo series."""

    study: _Study
    number: int
    modality: str
    description: str
    sop_class_uid: str
    manufacturer: str
    model: str
    time: str


_CT_BODY_STUDY = _Study(
    "ct", DEMO_PATIENTS[0], DEMO_PHYSICIANS[0], "20241118", "094210", "DEMO24CT0117",
    "4117", "CT CHEST ABDOMEN PELVIS WITH IV CONTRAST", "CHEST",
)
_XR_CHEST_STUDY = _Study(
    "xr-chest", DEMO_PATIENTS[0], DEMO_PHYSICIANS[0], "20250304", "081530", "DEMO25DX0042",
    "5042", "XR CHEST 2 VIEWS PA AND LATERAL", "CHEST",
)
_MR_BRAIN_STUDY = _Study(
    "mr-brain", DEMO_PATIENTS[1], DEMO_PHYSICIANS[1], "20230621", "141005", "DEMO23MR0388",
    "3388", "MRI BRAIN WITHOUT CONTRAST", "HEAD",
)
_US_LIVER_STUDY = _Study(
    "us-liver", DEMO_PATIENTS[2], DEMO_PHYSICIANS[2], "20250512", "103344", "DEMO25US0210",
    "5210", "US ABDOMEN LIMITED LIVER WITH DOPPLER", "ABDOMEN",
)
_CT_HEAD_STUDY = _Study(
    "ct-head", DEMO_PATIENTS[3], DEMO_PHYSICIANS[3], "20220930", "223917", "DEMO22CT0951",
    "2951", "CT HEAD WITHOUT CONTRAST", "HEAD",
)
_XR_CHEST_PA_STUDY = _Study(
    "xr-chest-pa", DEMO_PATIENTS[4], DEMO_PHYSICIANS[1], "20211207", "160248", "DEMO21DX0733",
    "1733", "XR CHEST 1 VIEW PA", "CHEST",
)

_INSTITUTION = "Demo General Hospital"
_INSTITUTION_ADDRESS = "1 Example Way, Springfield"
_UID_NAMESPACE = "referrer-portal-demo-v1"
# US NPI registry OID, declared so the private-looking "NPI" designator stays valid DICOM.
_NPI_CODING_SCHEME_UID = "2.16.840.1.113883.4.6"


def _uid(*parts: object) -> str:
    """Return a UID that depends only on ``parts`` (so regeneration is idempotent)."""
    return pydicom.uid.generate_uid(entropy_srcs=[_UID_NAMESPACE, *map(str, parts)])


_IMPLEMENTATION_CLASS_UID = _uid("implementation-class")


# --------------------------------------------------------------------------------------
# Common DICOM attributes and Part 10 writing
# --------------------------------------------------------------------------------------


def _patient_age(birth_date: str, on_date: str) -> str:
    """Return a DICOM AS age string such as ``066Y``."""
    by, bm, bd = int(birth_date[:4]), int(birth_date[4:6]), int(birth_date[6:])
    sy, sm, sd = int(on_date[:4]), int(on_date[4:6]), int(on_date[6:])
    years = sy - by - ((sm, sd) < (bm, bd))
    return f"{years:03d}Y"


def _referring_physician_item(physician: DemoPhysician) -> Dataset:
    """Build the Person Identification Macro item that carries the NPI."""
    code = Dataset()
    code.CodeValue = physician.npi
    code.CodingSchemeDesignator = "NPI"
    code.CodeMeaning = physician.display_name
    item = Dataset()
    item.PersonIdentificationCodeSequence = DicomSequence([code])
    item.PersonTelecomInformation = physician.email
    item.InstitutionName = _INSTITUTION  # Type 1C: required without an institution code
    return item


def _npi_coding_scheme() -> Dataset:
    """Declare the ``NPI`` coding scheme designator used for referring physicians."""
    scheme = Dataset()
    scheme.CodingSchemeDesignator = "NPI"
    scheme.CodingSchemeRegistry = "HL7"
    scheme.CodingSchemeUID = _NPI_CODING_SCHEME_UID
    scheme.CodingSchemeName = "US National Provider Identifier"
    return scheme


def _base_dataset(series: _Series, instance_number: int) -> Dataset:
    """Return the patient, study, series, equipment and SOP attributes of one instance."""
    study = series.study
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = series.sop_class_uid
    ds.SOPInstanceUID = _uid(study.key, "series", series.number, "instance", instance_number)
    ds.InstanceCreationDate = study.date
    ds.InstanceCreationTime = series.time
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = study.date
    ds.StudyTime = study.time
    ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = series.time
    ds.AccessionNumber = study.accession
    ds.Modality = series.modality
    ds.Manufacturer = series.manufacturer
    ds.InstitutionName = _INSTITUTION
    ds.InstitutionAddress = _INSTITUTION_ADDRESS
    ds.ReferringPhysicianName = study.physician.name
    ds.ReferringPhysicianIdentificationSequence = DicomSequence(
        [_referring_physician_item(study.physician)]
    )
    ds.CodingSchemeIdentificationSequence = DicomSequence([_npi_coding_scheme()])
    ds.StationName = f"DEMO{series.modality}01"
    ds.StudyDescription = study.description
    ds.SeriesDescription = series.description
    ds.ManufacturerModelName = series.model
    ds.SyntheticData = "YES"
    ds.PatientName = study.patient.name
    ds.PatientID = study.patient.patient_id
    ds.IssuerOfPatientID = "DEMO"
    ds.PatientBirthDate = study.patient.birth_date
    ds.PatientSex = study.patient.sex
    ds.PatientAge = _patient_age(study.patient.birth_date, study.date)
    ds.BodyPartExamined = study.body_part
    ds.DeviceSerialNumber = "DEMO-0001"
    ds.SoftwareVersions = "portal-demo 1"
    ds.StudyInstanceUID = _uid(study.key, "study")
    ds.SeriesInstanceUID = _uid(study.key, "series", series.number)
    ds.StudyID = study.study_id
    ds.SeriesNumber = series.number
    ds.InstanceNumber = instance_number
    ds.BurnedInAnnotation = "NO"
    return ds


def _set_monochrome_pixels(ds: Dataset, pixels: np.ndarray, bits_stored: int, photometric: str) -> None:
    """Store an unsigned 16-bit greyscale image as native pixel data."""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<u2").tobytes()


_PYDICOM_ENCODERS = frozenset({RLELossless, JPEG2000Lossless, JPEGLSLossless})
_NATIVE_SYNTAXES = frozenset({ExplicitVRLittleEndian, ImplicitVRLittleEndian})
_dcmcjpeg_warned = False


def _file_meta(ds: Dataset, transfer_syntax_uid: str) -> FileMetaDataset:
    """Return complete File Meta Information for ``ds``."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = transfer_syntax_uid
    meta.ImplementationClassUID = _IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = "PORTAL_DEMO_1"
    return meta


def _write_part10(ds: Dataset, path: pathlib.Path, transfer_syntax_uid: str) -> pathlib.Path:
    """Encode ``ds`` (native pixels, or already encapsulated for JPEG Baseline) and write it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.preamble = bytes(128)
    uid = pydicom.uid.UID(transfer_syntax_uid)
    if uid == JPEGLosslessSV1:
        if _write_with_dcmcjpeg(ds, path):
            return path
        uid = ExplicitVRLittleEndian
    if uid in _NATIVE_SYNTAXES or uid == JPEGBaseline8Bit:
        ds.file_meta = _file_meta(ds, uid)
    elif uid in _PYDICOM_ENCODERS:
        ds.file_meta = _file_meta(ds, ExplicitVRLittleEndian)
        ds.compress(uid)
    else:
        raise ValueError(f"demo generator cannot encode transfer syntax {uid}")
    ds.save_as(path, enforce_file_format=True)
    return path


def _write_with_dcmcjpeg(ds: Dataset, path: pathlib.Path) -> bool:
    """Write ``ds`` as JPEG Lossless SV1 using DCMTK; return False when DCMTK is missing."""
    global _dcmcjpeg_warned
    executable = shutil.which("dcmcjpeg")
    if executable is None:
        if not _dcmcjpeg_warned:
            _log.warning("dcmcjpeg not found: writing JPEG Lossless SV1 series uncompressed")
            _dcmcjpeg_warned = True
        return False
    ds.file_meta = _file_meta(ds, ExplicitVRLittleEndian)
    fd, tmp_name = tempfile.mkstemp(suffix=".dcm", dir=path.parent)
    os.close(fd)
    tmp = pathlib.Path(tmp_name)
    try:
        ds.save_as(tmp, enforce_file_format=True)
        # +e1: lossless process 14 selection value 1; +un: keep our deterministic SOP UID.
        subprocess.run(
            [executable, "+e1", "+un", str(tmp), str(path)],
            check=True, capture_output=True, timeout=120,
        )
    finally:
        tmp.unlink(missing_ok=True)
    return True


# --------------------------------------------------------------------------------------
# Small image helpers
# --------------------------------------------------------------------------------------


def _smoothstep(x: float | FloatArray, edge0: float, edge1: float) -> float | FloatArray:
    """Hermite step from 0 at ``edge0`` to 1 at ``edge1``."""
    t = np.clip((np.asarray(x, dtype=np.float32) - edge0) / (edge1 - edge0), 0.0, 1.0)
    result = t * t * (3.0 - 2.0 * t)
    return float(result) if np.ndim(result) == 0 else result


def _profile(level: float, start: float, end: float) -> float:
    """Radius factor of an ellipsoidal organ spanning ``start..end`` along z (0 outside)."""
    if not start < level < end:
        return 0.0
    t = (2.0 * level - start - end) / (end - start)
    return math.sqrt(max(0.0, 1.0 - t * t))


def _lerp(a: float, b: float, t: float) -> float:
    """Linear interpolation between ``a`` and ``b``."""
    return a + (b - a) * t


def _box3(image: FloatArray) -> FloatArray:
    """3x3 mean filter; mimics the reconstruction kernel's partial-volume blur."""
    padded = np.pad(image, 1, mode="edge")
    rows = padded[:-2] + padded[1:-1] + padded[2:]
    return (rows[:, :-2] + rows[:, 1:-1] + rows[:, 2:]) / np.float32(9.0)


def _box_blur(image: FloatArray, radius: int, passes: int = 3) -> FloatArray:
    """Approximate a Gaussian blur with repeated separable running means."""
    out = image.astype(np.float32, copy=True)
    if radius < 1:
        return out
    width = 2 * radius + 1
    for _ in range(passes):
        for axis in (0, 1):
            pad = [(0, 0), (0, 0)]
            pad[axis] = (radius + 1, radius)
            summed = np.cumsum(np.pad(out, pad, mode="edge"), axis=axis, dtype=np.float64)
            hi = np.take(summed, np.arange(width, summed.shape[axis]), axis=axis)
            lo = np.take(summed, np.arange(0, summed.shape[axis] - width), axis=axis)
            out = ((hi - lo) / width).astype(np.float32)
    return out


def _resize(image: FloatArray, shape: tuple[int, int]) -> FloatArray:
    """Bilinear resize of a float image to ``(rows, columns)``."""
    resized = Image.fromarray(image.astype(np.float32)).resize(
        (shape[1], shape[0]), Image.Resampling.BILINEAR
    )
    return np.asarray(resized, dtype=np.float32)


def _rng(*parts: object) -> np.random.Generator:
    """A numpy generator seeded from text, so pixel data is reproducible too."""
    seed = int.from_bytes(_uid(*parts).encode()[-16:], "little") % (2**63)
    return np.random.default_rng(seed)


# --------------------------------------------------------------------------------------
# Axial slice painter (CT body phantom)
# --------------------------------------------------------------------------------------


class _AxialSlice:
    """One axial slice in patient millimetres (x toward patient left, y posterior)."""

    def __init__(self, size: int, pixel_spacing: float, fill: float) -> None:
        """Create a ``size`` x ``size`` slice filled with ``fill`` HU."""
        self.size = size
        self.spacing = pixel_spacing
        self.origin = -(size - 1) / 2.0 * pixel_spacing
        self.coords = (self.origin + np.arange(size) * pixel_spacing).astype(np.float32)
        self.hu = np.full((size, size), fill, np.float32)

    def _index(self, mm: float) -> int:
        """Pixel index of a coordinate, clipped to the image."""
        return int(min(max(round((mm - self.origin) / self.spacing), 0), self.size))

    def window(self, x0: float, x1: float, y0: float, y1: float) -> tuple[slice, slice] | None:
        """Row/column slices covering the box, or None if it is outside the image."""
        rows = slice(self._index(y0), self._index(y1) + 1)
        cols = slice(self._index(x0), self._index(x1) + 1)
        if rows.start >= min(rows.stop, self.size) or cols.start >= min(cols.stop, self.size):
            return None
        return rows, cols

    def ellipse_mask(
        self, cx: float, cy: float, rx: float, ry: float, angle_deg: float = 0.0, power: float = 2.0
    ) -> tuple[tuple[slice, slice], np.ndarray] | None:
        """Mask of a (super)ellipse, restricted to its bounding window."""
        if rx <= 0.0 or ry <= 0.0:
            return None
        reach = max(rx, ry) if angle_deg else None
        win = self.window(cx - (reach or rx), cx + (reach or rx), cy - (reach or ry), cy + (reach or ry))
        if win is None:
            return None
        dx = self.coords[win[1]][None, :] - cx
        dy = self.coords[win[0]][:, None] - cy
        if angle_deg:
            c, s = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
            dx, dy = dx * c + dy * s, dy * c - dx * s
        if power == 2.0:
            mask = (dx / rx) ** 2 + (dy / ry) ** 2 <= 1.0
        else:
            mask = np.abs(dx / rx) ** power + np.abs(dy / ry) ** power <= 1.0
        return win, mask

    def capsule_mask(
        self, p0: tuple[float, float], p1: tuple[float, float], radius: float
    ) -> tuple[tuple[slice, slice], np.ndarray] | None:
        """Mask of all points within ``radius`` of the segment p0-p1 (a vessel or bone)."""
        if radius <= 0.0:
            return None
        win = self.window(
            min(p0[0], p1[0]) - radius, max(p0[0], p1[0]) + radius,
            min(p0[1], p1[1]) - radius, max(p0[1], p1[1]) + radius,
        )
        if win is None:
            return None
        px = self.coords[win[1]][None, :] - p0[0]
        py = self.coords[win[0]][:, None] - p0[1]
        sx, sy = p1[0] - p0[0], p1[1] - p0[1]
        length2 = sx * sx + sy * sy or 1e-6
        t = np.clip((px * sx + py * sy) / length2, 0.0, 1.0)
        return win, (px - t * sx) ** 2 + (py - t * sy) ** 2 <= radius * radius

    def paint(
        self,
        shape: tuple[tuple[slice, slice], np.ndarray] | None,
        value: float | FloatArray,
        within: np.ndarray | None = None,
    ) -> None:
        """Set HU inside ``shape`` (optionally only where the full-size ``within`` is true)."""
        if shape is None:
            return
        (rows, cols), mask = shape
        mask = mask[: self.hu[rows, cols].shape[0], : self.hu[rows, cols].shape[1]]
        if within is not None:
            mask = mask & within[rows, cols]
        target = self.hu[rows, cols]
        if isinstance(value, np.ndarray):
            target[mask] = value[rows, cols][mask]
        else:
            target[mask] = value

    def full_superellipse(self, cx: float, cy: float, rx: float, ry: float, power: float) -> FloatArray:
        """Normalised superellipse radius for every pixel (1.0 on the outline)."""
        dx = np.abs(self.coords[None, :] - cx) / rx
        dy = np.abs(self.coords[:, None] - cy) / ry
        return (dx**power + dy**power) ** (1.0 / power)


# Anatomical levels are millimetres below the lung apices (L); the scan spans L -20..355.
_BODY_COVERAGE_MM = 375.0
_BODY_FIRST_LEVEL_MM = -20.0
_CT_FOV_MM = 400.0
_VERTEBRA_PITCH_MM = 27.0


@dataclasses.dataclass(frozen=True, slots=True)
class _BodyPhantom:
    """Pre-computed random but fixed 3-D structures of the torso phantom."""

    lung_vessels: FloatArray  # rows of (x, y, level, radius) sample points
    bowel_loops: FloatArray  # rows of (x, y, level, radius, content HU)


def _lung_vessel_points(rng: np.random.Generator) -> FloatArray:
    """Sample points of two branching pulmonary vessel trees starting at the hila."""
    points: list[FloatArray] = []

    def grow(start: FloatArray, direction: FloatArray, length: float, radius: float, depth: int) -> None:
        end = start + direction * length
        count = max(2, int(length / max(0.6, radius)))
        t = np.linspace(0.0, 1.0, count, dtype=np.float32)[:, None]
        samples = start + (end - start) * t
        points.append(np.column_stack([samples, np.full(count, radius, np.float32)]))
        if depth == 0:
            return
        for _ in range(2):
            turned = direction + rng.normal(0.0, 0.5, 3)
            grow(end, turned / np.linalg.norm(turned), length * 0.8, radius * 0.74, depth - 1)

    for side in (-1.0, 1.0):
        hilum = np.array([side * 42.0, 8.0, 100.0])
        for d in ((0.35, 0.1, -1.0), (1.0, -0.35, -0.2), (0.8, 0.4, 0.35), (0.45, 0.3, 1.0), (0.6, -0.7, 0.5)):
            direction = np.array([side * d[0], d[1], d[2]])
            grow(hilum, direction / np.linalg.norm(direction), 36.0, 5.0, 6)
    return np.concatenate(points).astype(np.float32)


def _bowel_loop_spheres(rng: np.random.Generator) -> FloatArray:
    """Small-bowel loops as spheres with fluid, gas or positive oral contrast contents."""
    count = 48
    x = rng.uniform(-80, 80, count)
    y = rng.uniform(-75, 5, count)
    level = rng.uniform(268, 372, count)
    radius = rng.uniform(10, 17, count)
    content = rng.choice([15.0, 15.0, 25.0, 260.0, -1000.0], count)
    return np.column_stack([x, y, level, radius, content]).astype(np.float32)


def _body_phantom() -> _BodyPhantom:
    """Return the fixed random structures of the torso phantom."""
    return _BodyPhantom(
        _lung_vessel_points(np.random.default_rng(20241118)),
        _bowel_loop_spheres(np.random.default_rng(17)),
    )


def _paint_torso(sl: _AxialSlice, level: float, thickness: float, phantom: _BodyPhantom) -> None:
    """Paint a contrast-enhanced chest/abdomen cross-section at anatomical ``level`` (mm)."""
    abdomen = _smoothstep(level, 185.0, 250.0)
    shoulders = 1.0 - _smoothstep(level, -10.0, 45.0)
    body_rx = _lerp(158.0, 150.0, abdomen) + 18.0 * shoulders
    body_ry = _lerp(106.0, 116.0, abdomen)
    fat = _lerp(11.0, 24.0, abdomen)
    vb_y = _lerp(42.0, 34.0, abdomen)  # vertebral body centre; lumbar lordosis moves it forward
    vb_r = _lerp(16.0, 21.0, _smoothstep(level, 150.0, 300.0))

    _paint_table(sl, body_ry)
    sl.paint(sl.ellipse_mask(0.0, 0.0, body_rx, body_ry, power=2.6), -105.0)
    sl.paint(sl.ellipse_mask(0.0, 0.0, body_rx - fat, body_ry - fat, power=2.6), 48.0)
    if level < 50.0:  # scapulae and clavicles around the shoulder girdle
        for side in (-1.0, 1.0):
            sl.paint(sl.capsule_mask((side * 72, 96), (side * 132, 64), 4.0), 650.0)
            if level < 15.0:
                sl.paint(sl.capsule_mask((side * 16, -84), (side * 118, -62), 7.5), 700.0)
                sl.paint(sl.capsule_mask((side * 16, -84), (side * 118, -62), 4.5), 250.0)

    cav_rx, cav_ry, cav_cy = body_rx - fat - 17.0, body_ry - fat - 15.0, -4.0
    rho = sl.full_superellipse(0.0, cav_cy, cav_rx, cav_ry, 2.4)
    cavity = rho <= 1.0
    sl.hu[cavity] = -88.0  # mediastinal / retroperitoneal fat fills what organs leave

    _paint_lungs(sl, level, cavity, phantom, thickness)
    _paint_mediastinum(sl, level, vb_y, cavity)
    _paint_abdomen(sl, level, vb_y, cavity, phantom, thickness)
    _paint_spine(sl, level, vb_y, vb_r, abdomen)
    _paint_ribs(sl, level, rho, cav_cy, cav_rx, cav_ry)
    if 25.0 < level < 200.0:  # sternum: manubrium on top, body below
        wide = 1.0 - _smoothstep(level, 50.0, 70.0)
        y = cav_cy - cav_ry - 5.0
        sl.paint(sl.ellipse_mask(0.0, y, 15.0 + 9.0 * wide, 6.5), 700.0)
        sl.paint(sl.ellipse_mask(0.0, y, 12.0 + 9.0 * wide, 4.0), 260.0)


def _paint_table(sl: _AxialSlice, body_ry: float) -> None:
    """Paint the curved carbon-fibre couch with its foam core below the patient."""
    top = body_ry + 8.0
    win = sl.window(-190.0, 190.0, top - 1.0, top + 60.0)
    if win is None:
        return
    x = sl.coords[win[1]][None, :]
    y = sl.coords[win[0]][:, None]
    curve = top + 0.0011 * x * x
    inside = np.abs(x) < 185.0
    foam = (y > curve) & (y < curve + 28.0) & inside
    shell = ((np.abs(y - curve) < 1.3) | (np.abs(y - curve - 28.0) < 1.3)) & inside
    target = sl.hu[win]
    target[foam] = -930.0
    target[shell] = 180.0


def _paint_lungs(
    sl: _AxialSlice, level: float, cavity: np.ndarray, phantom: _BodyPhantom, thickness: float
) -> None:
    """Paint both lungs with a dependent-density gradient and the pulmonary vessels."""
    grow = math.sqrt(min(max(level / 55.0, 0.0), 1.0))
    shrink = 1.0 - _smoothstep(level, 195.0, 250.0)
    g = grow * math.sqrt(shrink)
    if g <= 0.02:
        return
    # Supine patients have denser (gravity-dependent) posterior lung.
    density = (-885.0 + 95.0 * np.clip((sl.coords[:, None] + 70.0) / 160.0, 0.0, 1.0)).astype(np.float32)
    density = np.broadcast_to(density, sl.hu.shape)
    for side, cx in ((-1.0, -66.0), (1.0, 70.0)):
        posterior_bias = 14.0 * (1.0 - shrink)  # lung bases survive longest in the posterior recesses
        shape = sl.ellipse_mask(cx, 8.0 + posterior_bias, 64.0 * g + 6.0 * (1 - grow), 86.0 * g, power=2.2)
        sl.paint(shape, density, within=cavity)
    # Vessels: discs where the tree crosses this slice, painted only inside aerated lung.
    vessels = phantom.lung_vessels
    dz = np.abs(vessels[:, 2] - level)
    hits = vessels[dz < vessels[:, 3] + thickness / 2.0]
    for x, y, z, r in hits:
        in_plane = float(r) if abs(z - level) < thickness / 2.0 else math.sqrt(max(r * r - (abs(z - level) - thickness / 2.0) ** 2, 0.0))
        if in_plane < 0.25:
            continue
        shape = sl.ellipse_mask(float(x), float(y), max(in_plane, 0.5), max(in_plane, 0.5))
        if shape is None:
            continue
        (rows, cols), mask = shape
        lung = sl.hu[rows, cols] < -600.0
        partial = min(1.0, in_plane / (0.9 * sl.spacing))
        sl.hu[rows, cols][mask & lung] = -850.0 + 960.0 * partial


def _paint_mediastinum(sl: _AxialSlice, level: float, vb_y: float, cavity: np.ndarray) -> None:
    """Paint heart, great vessels, airway and oesophagus."""
    if 15.0 < level < 205.0:  # mediastinal fat pad between the lungs
        f = _profile(level, 10.0, 215.0)
        sl.paint(sl.ellipse_mask(4.0, -8.0, 24.0 + 10.0 * f, 80.0 * f), -85.0, within=cavity)
    if level < 72.0:  # trachea with its cartilage wall
        sl.paint(sl.ellipse_mask(0.0, vb_y - 34.0, 10.5, 9.5), 60.0)
        sl.paint(sl.ellipse_mask(0.0, vb_y - 34.0, 8.5, 7.5), -1000.0)
    elif level < 102.0:  # main bronchi diverging from the carina
        spread = 6.0 + 0.9 * (level - 72.0)
        for side in (-1.0, 1.0):
            sl.paint(sl.ellipse_mask(side * spread, vb_y - 32.0, 7.0, 6.0), 60.0)
            sl.paint(sl.ellipse_mask(side * spread, vb_y - 32.0, 5.2, 4.4), -1000.0)
    if level < 205.0:  # oesophagus with a little swallowed air
        sl.paint(sl.ellipse_mask(9.0, vb_y - 19.0, 7.0, 6.0), 45.0)
        sl.paint(sl.ellipse_mask(9.0, vb_y - 19.0, 1.6, 1.4), -900.0)

    blood = 240.0
    if level < 45.0:  # arch branches
        for x, y, r in ((-12.0, -18.0, 6.5), (4.0, -12.0, 4.5), (16.0, -4.0, 5.0)):
            sl.paint(sl.ellipse_mask(x, y, r, r), blood)
        sl.paint(sl.capsule_mask((-34.0, -28.0), (-20.0, -34.0), 7.0), 160.0)  # brachiocephalic vein
        sl.paint(sl.capsule_mask((24.0, -38.0), (-20.0, -34.0), 6.0), 160.0)
    if 45.0 <= level < 62.0:  # aortic arch sweeping back to the left of the spine
        sl.paint(sl.capsule_mask((-8.0, -26.0), (22.0, vb_y - 18.0), 13.0), blood)
    if 60.0 <= level < 115.0:
        sl.paint(sl.ellipse_mask(-8.0, -26.0, 15.5, 15.5), blood)  # ascending aorta
    if 30.0 <= level < 108.0:
        sl.paint(sl.ellipse_mask(-34.0, -20.0, 10.0, 10.0), 300.0)  # SVC, dense inflow contrast
    if 80.0 <= level < 104.0:  # pulmonary trunk and its bifurcation
        sl.paint(sl.ellipse_mask(22.0, -34.0, 14.0, 14.0), 220.0)
        if level > 93.0:
            sl.paint(sl.capsule_mask((22.0, -30.0), (-38.0, 0.0), 9.0), 220.0)
            sl.paint(sl.capsule_mask((22.0, -30.0), (52.0, 4.0), 9.0), 220.0)
    if 58.0 <= level < 330.0:  # descending -> abdominal aorta
        drift = _smoothstep(level, 200.0, 250.0)
        r = _lerp(12.5, 10.0, drift)
        sl.paint(sl.ellipse_mask(_lerp(22.0, 6.0, drift), vb_y - _lerp(20.0, 27.0, drift), r, r), blood)
    elif level >= 330.0:  # common iliac arteries
        for side in (-1.0, 1.0):
            sl.paint(sl.ellipse_mask(side * (14.0 + 0.4 * (level - 330.0)), vb_y - 24.0, 7.0, 7.0), blood)

    f = _profile(level, 98.0, 192.0)
    if f > 0.0:  # heart: pericardial fat, myocardium, enhanced chambers
        cx, cy = 18.0, -24.0
        sl.paint(sl.ellipse_mask(cx, cy, 66.0 * f + 4.0, 52.0 * f + 4.0, -32.0), -75.0)
        sl.paint(sl.ellipse_mask(cx, cy, 66.0 * f, 52.0 * f, -32.0), 95.0)
        ventricles = _smoothstep(level, 120.0, 145.0)
        atria = 1.0 - ventricles
        sl.paint(sl.ellipse_mask(cx + 22.0, cy + 8.0, 24.0 * f * ventricles, 19.0 * f * ventricles, -32.0), 250.0)
        sl.paint(sl.ellipse_mask(cx - 16.0, cy - 22.0, 26.0 * f * ventricles, 12.0 * f * ventricles, -32.0), 210.0)
        sl.paint(sl.ellipse_mask(cx - 42.0, cy + 10.0, 19.0 * f, 17.0 * f), 190.0 if ventricles < 0.9 else 95.0)
        sl.paint(sl.ellipse_mask(cx + 2.0, cy + 30.0, 26.0 * f * atria, 13.0 * f * atria), 235.0)


def _paint_abdomen(
    sl: _AxialSlice, level: float, vb_y: float, cavity: np.ndarray, phantom: _BodyPhantom, thickness: float
) -> None:
    """Paint liver, spleen, stomach, pancreas, kidneys, bowel, muscles and pelvis."""
    if level < 170.0:
        return
    # Hemidiaphragm domes rise into the thorax: the left dome below stomach and spleen.
    left_dome = math.sqrt(min(max((level - 188.0) / 50.0, 0.0), 1.0))
    sl.paint(sl.ellipse_mask(58.0, 8.0, 92.0 * left_dome, 78.0 * left_dome), 40.0, within=cavity)
    grow = math.sqrt(min(max((level - 172.0) / 45.0, 0.0), 1.0))
    liver = grow * (1.0 - _smoothstep(level, 265.0, 310.0)) ** 0.5
    sl.paint(sl.ellipse_mask(-48.0, 2.0, 92.0 * liver, 80.0 * liver, 15.0), 112.0, within=cavity)
    left_lobe = _profile(level, 188.0, 262.0)
    sl.paint(sl.ellipse_mask(12.0, -46.0, 52.0 * left_lobe, 26.0 * left_lobe, -12.0), 112.0, within=cavity)
    if 182.0 < level < 222.0 and liver > 0.3:  # hepatic veins converging on the IVC
        for end in ((-86.0, -38.0), (-42.0, -64.0), (6.0, -52.0)):
            sl.paint(sl.capsule_mask((-24.0, vb_y - 22.0), end, 4.0), 165.0, within=cavity)
    if 228.0 < level < 262.0:  # portal vein branches
        sl.paint(sl.capsule_mask((-18.0, 4.0), (-74.0, -12.0), 6.0), 175.0)
        sl.paint(sl.capsule_mask((-18.0, 4.0), (-30.0, -36.0), 4.5), 175.0)
    gall = _profile(level, 248.0, 290.0)
    sl.paint(sl.ellipse_mask(-38.0, -52.0, 15.0 * gall, 19.0 * gall, 20.0), 12.0)
    if 190.0 < level < 332.0:  # IVC
        sl.paint(sl.ellipse_mask(-24.0, vb_y - 22.0, 12.0, 10.0), 150.0)

    stomach = _profile(level, 188.0, 262.0)
    if stomach > 0.0:
        cx, cy, rx, ry = 56.0, -26.0, 48.0 * stomach, 36.0 * stomach
        sl.paint(sl.ellipse_mask(cx, cy, rx, ry, 20.0), 70.0)
        contents = sl.ellipse_mask(cx, cy, rx - 4.0, ry - 4.0, 20.0)
        sl.paint(contents, 18.0)
        if contents is not None:  # supine: gas floats anteriorly above a fluid level
            (rows, cols), mask = contents
            air = mask & (sl.coords[rows][:, None] < cy - 0.35 * ry)
            sl.hu[rows, cols][air] = -1000.0
    spleen = _profile(level, 195.0, 268.0)
    sl.paint(sl.ellipse_mask(80.0, 38.0, 26.0 * spleen, 50.0 * spleen, 38.0), 122.0, within=cavity)
    pancreas = _profile(level, 246.0, 278.0)
    if pancreas > 0.0:
        sl.paint(sl.capsule_mask((-14.0, vb_y - 44.0), (58.0, vb_y - 30.0), 11.0 * pancreas), 98.0)
        sl.paint(sl.capsule_mask((-16.0, vb_y - 36.0), (40.0, vb_y - 34.0), 4.5 * pancreas), 170.0)  # splenic vein

    for side, top, bottom in ((1.0, 232.0, 318.0), (-1.0, 244.0, 330.0)):
        k = _profile(level, top, bottom)
        if k <= 0.0:
            continue
        cx, cy, angle = side * 70.0, vb_y + 10.0, side * 28.0
        sl.paint(sl.ellipse_mask(cx, cy, 30.0 * k + 6.0, 40.0 * k + 6.0, angle), -95.0)  # perirenal fat
        sl.paint(sl.ellipse_mask(cx, cy, 27.0 * k, 37.0 * k, angle), 190.0)
        sl.paint(sl.ellipse_mask(cx - side * 2.0, cy, 17.0 * k, 25.0 * k, angle), 135.0)
        if k > 0.6:  # renal sinus fat and pelvis open toward the hilum (anteromedial)
            sl.paint(sl.ellipse_mask(cx - side * 11.0, cy - 7.0, 8.0 * k, 13.0 * k, angle), -70.0)
            sl.paint(sl.capsule_mask((cx - side * 12.0, cy - 6.0), (side * 20.0, vb_y - 20.0), 3.5 * k), 220.0)

    if level > 252.0:
        psoas = 5.0 + 17.0 * _smoothstep(level, 252.0, 350.0)
        for side in (-1.0, 1.0):
            sl.paint(sl.ellipse_mask(side * (vb_y * 0.1 + 24.0 + psoas * 0.8), vb_y + 4.0, psoas, psoas * 1.15), 52.0)
        _paint_colon_and_bowel(sl, level, cavity, phantom, thickness)
    if level > 318.0:
        _paint_pelvis(sl, level, vb_y)


def _paint_colon_and_bowel(
    sl: _AxialSlice, level: float, cavity: np.ndarray, phantom: _BodyPhantom, thickness: float
) -> None:
    """Paint colon (gas and stool) and small-bowel loops."""
    if 262.0 < level < 286.0:
        sl.paint(sl.capsule_mask((-92.0, -30.0), (92.0, -40.0), 17.0), 80.0, within=cavity)
        sl.paint(sl.capsule_mask((-92.0, -30.0), (92.0, -40.0), 14.0), -1000.0, within=cavity)
    if level > 270.0:
        for cx, cy, r in ((-94.0, -4.0, 21.0), (96.0, 8.0, 17.0)):
            sl.paint(sl.ellipse_mask(cx, cy, r, r), 80.0, within=cavity)
            sl.paint(sl.ellipse_mask(cx, cy, r - 3.0, r - 3.0), -1000.0, within=cavity)
            # Stool: mottled gas and soft tissue in the dependent half.
            sl.paint(sl.ellipse_mask(cx, cy + 6.0, r - 6.0, r - 9.0), -180.0, within=cavity)
    loops = phantom.bowel_loops
    hits = loops[np.abs(loops[:, 2] - level) < loops[:, 3]]
    for x, y, z, r, content in hits:
        rr = math.sqrt(max(float(r) ** 2 - float(z - level) ** 2, 0.0))
        if rr < 3.0:
            continue
        sl.paint(sl.ellipse_mask(float(x), float(y), rr, rr * 0.9), 95.0, within=cavity)
        sl.paint(sl.ellipse_mask(float(x), float(y), rr - 2.5, rr * 0.9 - 2.5), float(content), within=cavity)


def _paint_pelvis(sl: _AxialSlice, level: float, vb_y: float) -> None:
    """Paint iliac wings, sacrum and gluteal muscles."""
    t = _smoothstep(level, 318.0, 370.0)
    for side in (-1.0, 1.0):
        sl.paint(sl.ellipse_mask(side * 82.0, vb_y + 52.0, 48.0 * t, 26.0 * t), 50.0)  # gluteus
        posterior = (side * (44.0 - 6.0 * t), vb_y + 24.0)
        anterior = (side * (108.0 + 14.0 * t), vb_y - 42.0 + 8.0 * t)
        width = 3.0 + 5.0 * t
        sl.paint(sl.capsule_mask(posterior, anterior, width), 850.0)
        sl.paint(sl.capsule_mask(posterior, anterior, width - 2.2), 240.0)
    if level > 335.0:
        sl.paint(sl.ellipse_mask(0.0, vb_y + 14.0, 34.0 + 10.0 * t, 20.0), 820.0)
        sl.paint(sl.ellipse_mask(0.0, vb_y + 14.0, 31.0 + 10.0 * t, 17.0), 260.0)
        sl.paint(sl.ellipse_mask(0.0, vb_y + 18.0, 9.0, 5.0), 20.0)


def _paint_spine(sl: _AxialSlice, level: float, vb_y: float, vb_r: float, abdomen: float) -> None:
    """Paint a vertebra (or an intervertebral disc) with its posterior elements."""
    if level > 338.0:
        return  # the sacrum takes over
    phase = (level + 12.0) % _VERTEBRA_PITCH_MM
    cx, cy = 0.0, vb_y
    canal_y = cy + vb_r + 9.0
    paraspinal = _lerp(26.0, 30.0, abdomen)
    for side in (-1.0, 1.0):  # erector spinae
        sl.paint(sl.ellipse_mask(side * 30.0, canal_y + 18.0, paraspinal, 20.0), 52.0)
    if phase < 4.5:
        sl.paint(sl.ellipse_mask(cx, cy, vb_r, vb_r * 0.9), 85.0)
    else:
        sl.paint(sl.ellipse_mask(cx, cy, vb_r, vb_r * 0.9), 720.0)
        sl.paint(sl.ellipse_mask(cx, cy, vb_r - 2.2, vb_r * 0.9 - 2.2), 245.0)
    if 7.0 < phase < 24.0:
        sl.paint(sl.ellipse_mask(cx, canal_y, 14.0, 12.5), 650.0)  # pedicles and laminae
        sl.paint(sl.capsule_mask((0.0, canal_y + 8.0), (0.0, canal_y + 30.0), 4.2), 650.0)
        if 10.0 < phase < 21.0:
            reach = _lerp(30.0, 40.0, abdomen)
            for side in (-1.0, 1.0):
                sl.paint(sl.capsule_mask((side * 8.0, canal_y - 2.0), (side * reach, canal_y + 3.0), 4.5), 620.0)
    sl.paint(sl.ellipse_mask(cx, canal_y, 8.5, 7.5), 25.0)  # thecal sac


def _paint_ribs(sl: _AxialSlice, level: float, rho: FloatArray, cy: float, rx: float, ry: float) -> None:
    """Paint obliquely cut ribs and costal cartilage in a ring around the cavity."""
    if level > 300.0:
        return
    ring_width = 9.0 / (0.5 * (rx + ry))
    rows = np.nonzero(((rho > 1.0) & (rho < 1.0 + ring_width)).any(axis=1))[0]
    if rows.size == 0:
        return
    band = slice(rows[0], rows[-1] + 1)
    r = rho[band]
    ring = (r > 1.0) & (r < 1.0 + ring_width)
    x = sl.coords[None, :]
    y = sl.coords[band][:, None] - cy
    phi = np.abs(np.arctan2(x, y))  # 0 at the spine, pi at the sternum
    # Ribs descend about 70 mm from their head to their anterior end.
    phase = (level + 8.0 - 72.0 * (phi / math.pi) ** 1.3) / 23.0
    index = np.floor(phase + 0.5)
    offset = np.abs(phase - index) * 23.0
    in_rib = ring & (offset < 5.5) & (index >= 0) & (index < 12) & (phi > 0.28)
    # Floating ribs (11, 12) end laterally; the others continue as cartilage.
    anterior_end = np.where(index >= 10, 1.7, np.where(index >= 8, 2.35, 2.6))
    bone = in_rib & (phi < anterior_end)
    cartilage = in_rib & (phi >= anterior_end) & (phi < 2.95) & (index < 10)
    radial = (r - 1.0) / ring_width
    cortex = (radial < 0.25) | (radial > 0.72) | (offset > 4.0)
    target = sl.hu[band]
    target[bone] = np.where(cortex[bone], 820.0, 330.0)
    target[cartilage] = 130.0


def _render_body_ct(slices: int, size: int, seed: str) -> tuple[np.ndarray, float, np.ndarray, float]:
    """Render the torso phantom; returns (HU volume int16, pixel spacing, levels, spacing)."""
    pixel_spacing = _CT_FOV_MM / size
    slice_spacing = _BODY_COVERAGE_MM / slices
    levels = _BODY_FIRST_LEVEL_MM + np.arange(slices) * slice_spacing
    phantom = _body_phantom()
    volume = np.empty((slices, size, size), np.int16)
    for index, level in enumerate(levels):
        sl = _AxialSlice(size, pixel_spacing, -1000.0)
        _paint_torso(sl, float(level), slice_spacing, phantom)
        volume[index] = _finish_ct_slice(sl.hu, _rng(seed, "noise", index), 13.0)
    return volume, pixel_spacing, levels, slice_spacing


def _finish_ct_slice(hu: FloatArray, rng: np.random.Generator, sigma: float) -> np.ndarray:
    """Blur like a soft reconstruction kernel and add grainy quantum noise."""
    noise = rng.standard_normal(hu.shape, dtype=np.float32) * np.float32(sigma * 1.6)
    noise = 0.45 * noise + 0.55 * _box3(noise) * 2.2
    return np.clip(np.rint(_box3(hu) + noise), -1024, 3071).astype(np.int16)


# --------------------------------------------------------------------------------------
# CT writing
# --------------------------------------------------------------------------------------

_CT_BODY_WINDOWS = ((40, 400, "SOFT TISSUE"), (-600, 1500, "LUNG"), (400, 1800, "BONE"))
_CT_HEAD_WINDOWS = ((40, 80, "BRAIN"), (75, 215, "SUBDURAL"), (600, 2800, "BONE"))


def _ds_number(value: float) -> str:
    """Format a decimal string (DS) compactly and within 16 characters."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def _ct_dataset(
    series: _Series,
    index: int,
    hu: np.ndarray,
    pixel_spacing: float,
    z: float,
    thickness: float,
    kernel: str,
    windows: Sequence[tuple[int, int, str]],
) -> Dataset:
    """Build one axial CT image with real geometry and several VOI presets."""
    ds = _base_dataset(series, index + 1)
    size = hu.shape[0]
    corner = -(size - 1) / 2.0 * pixel_spacing
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.AcquisitionNumber = 1
    ds.ScanOptions = "HELICAL MODE"
    ds.SliceThickness = _ds_number(thickness)
    ds.KVP = "120"
    ds.DataCollectionDiameter = "500"
    ds.ReconstructionDiameter = _ds_number(pixel_spacing * size)
    ds.GantryDetectorTilt = "0"
    ds.TableHeight = "152"
    ds.RotationDirection = "CW"
    ds.XRayTubeCurrent = 210
    ds.ExposureTime = 500
    ds.ConvolutionKernel = kernel
    ds.PatientPosition = "HFS"
    ds.ImagePositionPatient = [_ds_number(corner), _ds_number(corner), _ds_number(z)]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.FrameOfReferenceUID = _uid(series.study.key, "frame-of-reference")
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = _ds_number(z)
    ds.PixelSpacing = [_ds_number(pixel_spacing), _ds_number(pixel_spacing)]
    # Unsigned 12-bit storage with the usual -1024 intercept.
    _set_monochrome_pixels(ds, (hu.astype(np.int32) + 1024).clip(0, 4095), 12, "MONOCHROME2")
    ds.WindowCenter = [str(c) for c, _, _ in windows]
    ds.WindowWidth = [str(w) for _, w, _ in windows]
    ds.WindowCenterWidthExplanation = [name for _, _, name in windows]
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    return ds


def _ct_body_series(study: _Study, number: int, description: str, kernel: str) -> _Series:
    """Series descriptor for a body CT reconstruction."""
    return _Series(study, number, "CT", description, CTImageStorage, "DemoMed", "SynthCT 128", "094630")


def _z_for_level(level: float) -> float:
    """Table position (patient z, superior positive) of an anatomical level."""
    return -60.0 - level


def _write_ct_volume(
    out_dir: pathlib.Path,
    series: _Series,
    volume: np.ndarray,
    pixel_spacing: float,
    z_positions: Sequence[float],
    thickness: float,
    kernel: str,
    windows: Sequence[tuple[int, int, str]],
    transfer_syntax_uid: str,
    progress: Progress | None = None,
) -> list[pathlib.Path]:
    """Write each slice of ``volume`` as one CT instance."""
    paths = []
    for index, (hu, z) in enumerate(zip(volume, z_positions, strict=True)):
        ds = _ct_dataset(series, index, hu, pixel_spacing, float(z), thickness, kernel, windows)
        paths.append(_write_part10(ds, out_dir / f"IM{index + 1:04d}.dcm", transfer_syntax_uid))
        if progress is not None:
            progress(1)
    return paths


def write_ct_series(
    out_dir: pathlib.Path,
    *,
    slices: int = 150,
    size: int = 512,
    transfer_syntax_uid: str = pydicom.uid.ExplicitVRLittleEndian,
    uid_seed: str = "ct",
) -> list[pathlib.Path]:
    """Write one contrast-enhanced axial chest/abdomen CT series into ``out_dir``.

    Parameters
    ----------
    out_dir : pathlib.Path
        Directory that receives ``IM0001.dcm`` ... (created if needed).
    slices : int
        Number of axial slices; they always span 375 mm from lung apex to pelvis.
    size : int
        Rows and columns of each slice (400 mm field of view).
    transfer_syntax_uid : str
        Explicit/Implicit VR Little Endian, RLE Lossless, JPEG 2000 Lossless,
        JPEG-LS Lossless or JPEG Lossless SV1 (the latter needs DCMTK's dcmcjpeg).
    uid_seed : str
        Seed of all UIDs; the same seed always gives the same study, series and SOP UIDs.

    Returns
    -------
    list[pathlib.Path]
        The written files in slice order (head to feet).
    """
    if slices < 1 or size < 16:
        raise ValueError("slices must be >= 1 and size >= 16")
    study = _CT_BODY_STUDY if uid_seed == _CT_BODY_STUDY.key else dataclasses.replace(_CT_BODY_STUDY, key=uid_seed)
    volume, pixel_spacing, levels, spacing = _render_body_ct(slices, size, uid_seed)
    series = _ct_body_series(study, 2, f"AXIAL {_ds_number(spacing)}MM SOFT TISSUE", "STANDARD")
    return _write_ct_volume(
        pathlib.Path(out_dir), series, volume, pixel_spacing, [_z_for_level(v) for v in levels],
        spacing, "STANDARD", _CT_BODY_WINDOWS, transfer_syntax_uid,
    )


# --------------------------------------------------------------------------------------
# Head phantom (CT head and MR brain share one labelled anatomy)
# --------------------------------------------------------------------------------------

(_AIR, _SOFT, _FAT, _BONE, _DIPLOE, _CSF, _GREY, _WHITE, _VITREOUS, _LENS, _MUSCLE, _SINUS,
 _DENSE_BONE, _HOLDER) = range(14)

# Tissue value tables indexed by label: CT in HU, MR in arbitrary 12-bit signal.
_HEAD_CT_HU = np.array([-1000, 45, -90, 1500, 650, 6, 40, 27, 12, 100, 52, -950, 2000, 120], np.float32)
_HEAD_T2 = np.array([0, 380, 820, 25, 420, 1900, 1020, 690, 1850, 260, 300, 0, 10, 0], np.float32)
_HEAD_T1 = np.array([0, 560, 1450, 25, 1150, 190, 560, 820, 150, 720, 470, 0, 10, 0], np.float32)


def _ellipsoid_distance(
    x: FloatArray, y: FloatArray, z: FloatArray, centre: Sequence[float], radii: Sequence[float]
) -> FloatArray:
    """Approximate signed distance (mm) to an ellipsoid surface; negative inside."""
    dx, dy, dz = (x - centre[0]) / radii[0], (y - centre[1]) / radii[1], (z - centre[2]) / radii[2]
    q = np.sqrt(dx * dx + dy * dy + dz * dz) + 1e-6
    gradient = np.sqrt((dx / radii[0]) ** 2 + (dy / radii[1]) ** 2 + (dz / radii[2]) ** 2) / q + 1e-6
    return (q - 1.0) / gradient


def _inside(x: FloatArray, y: FloatArray, z: FloatArray, centre: Sequence[float], radii: Sequence[float]) -> np.ndarray:
    """Boolean mask of points inside an axis-aligned ellipsoid."""
    return (
        ((x - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2 + ((z - centre[2]) / radii[2]) ** 2
    ) <= 1.0


_GYRI_WAVES = np.random.default_rng(31).normal(size=(6, 3))
_GYRI_PHASES = np.random.default_rng(32).uniform(0, 2 * np.pi, 6)


def _head_labels(x: FloatArray, y: FloatArray, z: FloatArray) -> np.ndarray:
    """Tissue labels of the head phantom at patient coordinates (mm, LPS, brain centre at 0)."""
    x, y, z = np.broadcast_arrays(x, y, z)
    labels = np.zeros(x.shape, np.uint8)
    lower = z < 5.0
    cranium = np.minimum.reduce([
        _ellipsoid_distance(x, y, z, (0, 0, 5), (68, 86, 70)) * ~lower
        + _ellipsoid_distance(x, y, z, (0, 0, 5), (68, 86, 50)) * lower,
        _ellipsoid_distance(x, y, z, (0, 40, -38), (54, 38, 26)),  # posterior fossa
        _ellipsoid_distance(x, y, z, (-42, -6, -30), (22, 36, 20)),  # middle cranial fossae
        _ellipsoid_distance(x, y, z, (42, -6, -30), (22, 36, 20)),
    ])
    face = _ellipsoid_distance(x, y, z, (0, -52, -52), (60, 50, 46))
    temporal = (np.abs(x) > 48) & (z > -25) & (z < 40)
    scalp_outer = np.where(temporal, 15.0, 12.5)
    labels[(cranium < scalp_outer) | (face < 0)] = _SOFT
    labels[(cranium > 8.5) & (cranium < 10.5)] = _FAT
    labels[temporal & (cranium > 7.0) & (cranium < 13.5)] = _MUSCLE
    for side in (-1.0, 1.0):  # ears
        labels[_inside(x, y, z, (side * 74, 8, -30), (7, 14, 20))] = _SOFT
    labels[(cranium > 0) & (cranium < 7)] = _BONE
    labels[(cranium > 2.2) & (cranium < 4.8)] = _DIPLOE
    # Skull base and face.
    for side in (-1.0, 1.0):
        orbit = _ellipsoid_distance(x, y, z, (side * 31, -66, -30), (19, 21, 18))
        labels[(orbit > -1.8) & (orbit < 0) & (y > -84)] = _BONE
        labels[orbit < -1.8] = _FAT
        labels[_inside(x, y, z, (side * 31, -72, -30), (12, 12, 12))] = _VITREOUS
        labels[_inside(x, y, z, (side * 31, -83.5, -30), (4.5, 2.0, 4.5))] = _LENS
        petrous = (x * side * 0.707 + (y - 8) * 0.707, -x * side * 0.707 + (y - 8) * 0.707)
        labels[((petrous[0] - 32) / 8) ** 2 + (petrous[1] / 24) ** 2 + ((z + 40) / 7) ** 2 <= 1] = _DENSE_BONE
        mastoid = _inside(x, y, z, (side * 56, 22, -44), (11, 13, 12))
        cells = np.sin(x * 1.7) * np.sin(y * 1.9) * np.sin(z * 1.5) > 0.1
        labels[mastoid] = np.where(cells[mastoid], _SINUS, _BONE)
        labels[(np.abs(z + 36) < 3.5) & (np.abs(np.abs(x) - 62) < 4.5) & (y > -62) & (y < -2) & (side * x > 0)] = _BONE
    nasal = _inside(x, y, z, (0, -64, -38), (15, 24, 22))
    labels[nasal] = np.where(np.abs(x[nasal]) < 1.2, _BONE, _SINUS)
    labels[_ellipsoid_distance(x, y, z, (0, -24, -44), (15, 12, 10)) < 1.8] = _BONE
    labels[_inside(x, y, z, (0, -24, -44), (13.2, 10.2, 8.2))] = _SINUS
    labels[_inside(x, y, z, (0, -85, 16), (16, 5, 12))] = _SINUS  # frontal sinus

    brain = cranium < 0
    labels[brain] = _WHITE
    # Cortex folded into gyri: sulci follow the zero set of a sum of plane waves.
    p = np.stack([x, y, z], axis=-1) / 7.5
    folds = np.cos(p @ _GYRI_WAVES.T + _GYRI_PHASES).sum(axis=-1)
    labels[brain & ((cranium > -4.0) | ((cranium > -19.0) & (np.abs(folds) < 1.1)))] = _GREY
    labels[brain & ((cranium > -1.0) | ((cranium > -17.0) & (np.abs(folds) < 0.22)))] = _CSF
    labels[brain & (np.abs(x) < 1.3) & (cranium > -38.0) & ((z > 22) | (np.abs(y) > 45))] = _CSF
    sylvian = brain & (np.abs(np.abs(x) - 44 - 0.25 * (y + 10)) < 1.6) & (z > -20) & (z < 14) & (y < 15)
    labels[sylvian] = _CSF
    for side in (-1.0, 1.0):  # deep grey nuclei
        labels[_inside(x, y, z, (side * 13, -15, 12), (6, 10, 8))] = _GREY
        labels[_inside(x, y, z, (side * 23, -3, 1), (6.5, 15, 10))] = _GREY
        labels[_inside(x, y, z, (side * 10, 9, 2), (8, 12, 9))] = _GREY
        # Lateral ventricles diverge posteriorly: a butterfly on axial slices.
        vx = side * (8.0 + 0.13 * (y + 12))
        labels[brain & (((x - vx) / 5.5) ** 2 + ((y + 1) / 31) ** 2 + ((z - 15) / 9) ** 2 <= 1)] = _CSF
    labels[_inside(x, y, z, (0, 6, -2), (2.6, 13, 8))] = _CSF  # third ventricle
    # Posterior fossa: cerebellum with folia, brainstem with its cisterns.
    cerebellum = _inside(x, y, z, (0, 44, -40), (50, 30, 20)) & brain
    folia = np.sin((z + 0.25 * np.abs(x)) * 1.4 + y * 0.3) > 0.55
    labels[cerebellum] = np.where(folia[cerebellum], _WHITE, _GREY)
    labels[_inside(x, y, z, (0, 12, -22), (22, 19, 11)) & brain] = _CSF
    labels[_inside(x, y, z, (0, 14, -28), (14, 12, 30))] = _WHITE
    labels[_inside(x, y, z, (0, 30, -42), (6, 4, 6))] = _CSF  # fourth ventricle
    return labels


def _head_holder(x: FloatArray, y: FloatArray) -> np.ndarray:
    """Mask of the CT head rest (a curved plastic cradle behind the skull)."""
    r = np.sqrt((x / 108.0) ** 2 + ((y - 5.0) / 118.0) ** 2)
    return (r > 1.0) & (r < 1.03) & (y > 40)


def _render_head_ct(slices: int, seed: str) -> tuple[np.ndarray, float, np.ndarray]:
    """Render head CT slices (512 x 512, 250 mm FOV); returns (HU, spacing, z positions)."""
    size, fov = 512, 250.0
    spacing = fov / size
    coords = (-(size - 1) / 2.0 * spacing + np.arange(size) * spacing).astype(np.float32)
    x, y = coords[None, :], coords[:, None]
    z_positions = -50.0 + 3.0 * np.arange(slices)
    volume = np.empty((slices, size, size), np.int16)
    holder = _head_holder(x, y)
    for index, z in enumerate(z_positions):
        labels = _head_labels(x, y, np.float32(z))
        labels[holder & (labels == _AIR)] = _HOLDER
        volume[index] = _finish_ct_slice(_HEAD_CT_HU[labels], _rng(seed, "noise", index), 3.5)
    return volume, spacing, z_positions


def _render_mr(
    plane: str, positions: Sequence[float], size: int, fov: float, table: FloatArray, seed: str
) -> np.ndarray:
    """Render MR slices of the head phantom (2x supersampled, coil shading, Rician noise)."""
    fine = size * 2
    coords = (-(fine - 1) / 2.0 * fov / fine + np.arange(fine) * fov / fine).astype(np.float32)
    out = np.empty((len(positions), size, size), np.uint16)
    for index, position in enumerate(positions):
        if plane == "axial":
            x, y, z = coords[None, :], coords[:, None], np.float32(position)
        else:  # sagittal: rows run head to feet, columns anterior to posterior
            x, y, z = np.float32(position), coords[None, :], -coords[:, None]
        signal = table[_head_labels(x, y, z)]
        signal = signal.reshape(size, 2, size, 2).mean(axis=(1, 3))
        signal = _box3(signal)
        rows = np.linspace(-1, 1, size, dtype=np.float32)[:, None]
        cols = np.linspace(-1, 1, size, dtype=np.float32)[None, :]
        signal *= 1.08 - 0.16 * (rows * rows + cols * cols) + 0.06 * rows  # receive-coil shading
        rng = _rng(seed, plane, index)
        real = signal + rng.normal(0, 18, signal.shape).astype(np.float32)
        imag = rng.normal(0, 18, signal.shape).astype(np.float32)
        out[index] = np.clip(np.hypot(real, imag), 0, 4095).astype(np.uint16)
    return out


