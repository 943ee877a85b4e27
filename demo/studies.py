"""Deterministic, realistic-looking synthetic DICOM demo studies for the referrer portal.

Everything here is computed with numpy from fixed seeds: no data is downloaded and
running the generator twice yields the same UIDs (so importing twice is idempotent).
The pictures are analytic phantoms, not patient data; every instance carries
``SyntheticData = YES``.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import io
import itertools
import logging
import math
import os
import pathlib
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import numpy.typing as npt
import pydicom
import pydicom.tag
import pydicom.uid
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    MRImageStorage,
    RLELossless,
    UltrasoundMultiFrameImageStorage,
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
Coordinate = FloatArray | np.float32 | float  # a grid axis, or one plane position
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
    key="ct",
    patient=DEMO_PATIENTS[0],
    physician=DEMO_PHYSICIANS[0],
    date="20241118",
    time="094210",
    accession="DEMO24CT0117",
    study_id="4117",
    description="CT CHEST ABDOMEN PELVIS WITH IV CONTRAST",
    body_part="CHESTABDPELVIS",
)
_XR_CHEST_STUDY = _Study(
    key="xr-chest",
    patient=DEMO_PATIENTS[0],
    physician=DEMO_PHYSICIANS[0],
    date="20250304",
    time="081530",
    accession="DEMO25DX0042",
    study_id="5042",
    description="XR CHEST 2 VIEWS PA AND LATERAL",
    body_part="CHEST",
)
_MR_BRAIN_STUDY = _Study(
    key="mr-brain",
    patient=DEMO_PATIENTS[1],
    physician=DEMO_PHYSICIANS[1],
    date="20230621",
    time="141005",
    accession="DEMO23MR0388",
    study_id="3388",
    description="MRI BRAIN WITHOUT CONTRAST",
    body_part="HEAD",
)
_US_LIVER_STUDY = _Study(
    key="us-liver",
    patient=DEMO_PATIENTS[2],
    physician=DEMO_PHYSICIANS[2],
    date="20250512",
    time="103344",
    accession="DEMO25US0210",
    study_id="5210",
    description="US ABDOMEN LIMITED LIVER WITH DOPPLER",
    body_part="ABDOMEN",
)
_CT_HEAD_STUDY = _Study(
    key="ct-head",
    patient=DEMO_PATIENTS[3],
    physician=DEMO_PHYSICIANS[3],
    date="20220930",
    time="223917",
    accession="DEMO22CT0951",
    study_id="2951",
    description="CT HEAD WITHOUT CONTRAST",
    body_part="HEAD",
)
_XR_CHEST_PA_STUDY = _Study(
    key="xr-chest-pa",
    patient=DEMO_PATIENTS[4],
    physician=DEMO_PHYSICIANS[1],
    date="20211207",
    time="160248",
    accession="DEMO21DX0733",
    study_id="1733",
    description="XR CHEST 1 VIEW PA",
    body_part="CHEST",
)

_INSTITUTION = "Demo General Hospital"
_INSTITUTION_ADDRESS = "1 Example Way, Springfield"
_UID_NAMESPACE = "referrer-portal-demo-v1"
# US NPI registry OID, declared so the private-looking "NPI" designator stays valid DICOM.
_NPI_CODING_SCHEME_UID = "2.16.840.1.113883.4.6"


def _uid(*parts: object) -> str:
    """Return a UID that depends only on ``parts`` (so regeneration is idempotent)."""
    return pydicom.uid.generate_uid(entropy_srcs=[_UID_NAMESPACE, *map(str, parts)])


_IMPLEMENTATION_CLASS_UID = pydicom.uid.UID(_uid("implementation-class"))


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


def _set_monochrome_pixels(
    ds: Dataset, pixels: np.ndarray, bits_stored: int, photometric: str
) -> None:
    """Store an unsigned 16-bit greyscale image as native pixel data."""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<u2").tobytes()


def _run_writes(
    write: Callable[[int], pathlib.Path],
    count: int,
    progress: Progress | None,
    transfer_syntax_uid: str,
) -> list[pathlib.Path]:
    """Run ``write(0..count-1)``, reporting progress from the calling thread.

    Only the DCMTK path uses threads (its work happens in child processes); the pylibjpeg
    and pyjpegls encoders are not safe to call concurrently (they crashed in testing).
    """
    paths = []
    threaded = transfer_syntax_uid == JPEGLosslessSV1 and shutil.which("dcmcjpeg") is not None
    workers = max(1, min(4, os.cpu_count() or 1)) if threaded else 1
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        for path in pool.map(write, range(count)):
            paths.append(path)
            if progress is not None:
                progress(1)
    return paths


_PYDICOM_ENCODERS = frozenset({RLELossless, JPEG2000Lossless, JPEGLSLossless})
_NATIVE_SYNTAXES = frozenset({ExplicitVRLittleEndian, ImplicitVRLittleEndian})
_dcmcjpeg_warned = False


def _file_meta(ds: Dataset, transfer_syntax_uid: str) -> FileMetaDataset:
    """Return complete File Meta Information for ``ds``."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = pydicom.uid.UID(ds.SOPClassUID)
    meta.MediaStorageSOPInstanceUID = pydicom.uid.UID(ds.SOPInstanceUID)
    meta.TransferSyntaxUID = pydicom.uid.UID(transfer_syntax_uid)
    meta.ImplementationClassUID = _IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = "PORTAL_DEMO_1"
    return meta


def _write_part10(
    ds: Dataset, path: pathlib.Path, transfer_syntax_uid: str, *, encapsulated: bool = False
) -> pathlib.Path:
    """Encode ``ds`` into ``transfer_syntax_uid`` and write it as a DICOM Part 10 file.

    ``encapsulated`` means the pixel data is already compressed in that transfer syntax.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.preamble = bytes(128)
    uid = pydicom.uid.UID(transfer_syntax_uid)
    if uid == JPEGLosslessSV1 and not encapsulated:
        if _write_with_dcmcjpeg(ds, path):
            return path
        uid = ExplicitVRLittleEndian
    if encapsulated or uid in _NATIVE_SYNTAXES:
        ds.file_meta = _file_meta(ds, uid)
    elif uid in _PYDICOM_ENCODERS:
        ds.file_meta = _file_meta(ds, ExplicitVRLittleEndian)
        ds.compress(uid, generate_instance_uid=False)  # keep our deterministic UID
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
            check=True,
            capture_output=True,
            timeout=120,
        )
    finally:
        tmp.unlink(missing_ok=True)
    return True


# --------------------------------------------------------------------------------------
# Small image helpers
# --------------------------------------------------------------------------------------


def _ramp(level: float, edge0: float, edge1: float) -> float:
    """Hermite step from 0 at ``edge0`` to 1 at ``edge1`` (scalar)."""
    t = min(max((level - edge0) / (edge1 - edge0), 0.0), 1.0)
    return t * t * (3.0 - 2.0 * t)


def _smoothstep(x: FloatArray, edge0: float, edge1: float) -> FloatArray:
    """Hermite step from 0 at ``edge0`` to 1 at ``edge1`` (element-wise)."""
    t = np.clip((np.asarray(x, dtype=np.float32) - edge0) / (edge1 - edge0), 0.0, 1.0)
    return np.asarray(t * t * (3.0 - 2.0 * t), np.float32)


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
    blurred: FloatArray = (rows[:, :-2] + rows[:, 1:-1] + rows[:, 2:]) / np.float32(9.0)
    return blurred


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
    """Return a numpy generator seeded from text, so pixel data is reproducible too."""
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
        win = self.window(
            cx - (reach or rx), cx + (reach or rx), cy - (reach or ry), cy + (reach or ry)
        )
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
            min(p0[0], p1[0]) - radius,
            max(p0[0], p1[0]) + radius,
            min(p0[1], p1[1]) - radius,
            max(p0[1], p1[1]) + radius,
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

    def full_superellipse(
        self, cx: float, cy: float, rx: float, ry: float, power: float
    ) -> FloatArray:
        """Normalised superellipse radius for every pixel (1.0 on the outline)."""
        dx = np.abs(self.coords[None, :] - cx) / rx
        dy = np.abs(self.coords[:, None] - cy) / ry
        radius: FloatArray = (dx**power + dy**power) ** (1.0 / power)
        return radius


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

    def grow(
        start: FloatArray, direction: FloatArray, length: float, radius: float, depth: int
    ) -> None:
        end = start + direction * length
        count = max(2, int(length / max(1.0, radius)))
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
        for d in (
            (0.35, 0.1, -1.0),
            (0.6, -0.5, -0.8),
            (1.0, -0.35, -0.2),
            (0.8, 0.5, 0.1),
            (0.8, 0.4, 0.6),
            (0.45, 0.3, 1.0),
            (0.6, -0.7, 0.5),
            (0.3, 0.7, 0.9),
        ):
            direction = np.array([side * d[0], d[1], d[2]])
            grow(hilum, direction / np.linalg.norm(direction), 30.0, 3.8, 7)
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


@functools.lru_cache(maxsize=1)
def _body_phantom() -> _BodyPhantom:
    """Return the fixed random structures of the torso phantom."""
    return _BodyPhantom(
        _lung_vessel_points(np.random.default_rng(20241118)),
        _bowel_loop_spheres(np.random.default_rng(17)),
    )


def _paint_torso(sl: _AxialSlice, level: float, thickness: float, phantom: _BodyPhantom) -> None:
    """Paint a contrast-enhanced chest/abdomen cross-section at anatomical ``level`` (mm)."""
    abdomen = _ramp(level, 185.0, 250.0)
    shoulders = 1.0 - _ramp(level, -10.0, 45.0)
    body_rx = _lerp(158.0, 150.0, abdomen) + 18.0 * shoulders
    body_ry = _lerp(106.0, 116.0, abdomen)
    fat = _lerp(11.0, 24.0, abdomen)
    vb_y = _lerp(42.0, 34.0, abdomen)  # vertebral body centre; lumbar lordosis moves it forward
    vb_r = _lerp(16.0, 21.0, _ramp(level, 150.0, 300.0))

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
    # Mediastinal/retroperitoneal fat fills what organs leave; above the lung apices the
    # thoracic inlet is mostly muscle, vessels and thyroid.
    sl.hu[cavity] = _lerp(42.0, -88.0, _ramp(level, -5.0, 30.0))

    _paint_lungs(sl, level, cavity, phantom, thickness)
    _paint_mediastinum(sl, level, vb_y, cavity)
    _paint_abdomen(sl, level, vb_y, cavity, phantom)
    _paint_spine(sl, level, vb_y, vb_r, abdomen)
    _paint_ribs(sl, level, rho, cav_cy, cav_rx, cav_ry)
    if 25.0 < level < 200.0:  # sternum: manubrium on top, body below
        wide = 1.0 - _ramp(level, 50.0, 70.0)
        y = cav_cy - cav_ry - 5.0
        sl.paint(sl.ellipse_mask(0.0, y, 15.0 + 9.0 * wide, 6.5), 700.0)
        sl.paint(sl.ellipse_mask(0.0, y, 12.0 + 9.0 * wide, 4.0), 260.0)


def _paint_table(sl: _AxialSlice, body_ry: float) -> None:
    """Paint the curved carbon-fibre couch with its foam core below the patient."""
    top = body_ry + 1.0
    win = sl.window(-190.0, 190.0, top - 1.0, top + 60.0)
    if win is None:
        return
    x = sl.coords[win[1]][None, :]
    y = sl.coords[win[0]][:, None]
    curve = top + 2.0 - 0.0009 * x * x  # the couch cradles the patient: edges curve upward
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
    shrink = 1.0 - _ramp(level, 195.0, 250.0)
    g = grow * math.sqrt(shrink)
    if g <= 0.02:
        return
    # Supine patients have denser (gravity-dependent) posterior lung.
    density = (-885.0 + 95.0 * np.clip((sl.coords[:, None] + 70.0) / 160.0, 0.0, 1.0)).astype(
        np.float32
    )
    density = np.broadcast_to(density, sl.hu.shape)
    for cx in (-66.0, 70.0):  # right lung (patient right is -x), left lung
        # Lung bases survive longest in the posterior recesses.
        posterior_bias = 14.0 * (1.0 - shrink)
        shape = sl.ellipse_mask(
            cx, 8.0 + posterior_bias, 64.0 * g + 6.0 * (1 - grow), 86.0 * g, power=2.2
        )
        sl.paint(shape, density, within=cavity)
    # Vessels: discs where the tree crosses this slice, painted only inside aerated lung.
    vessels = phantom.lung_vessels
    # Distance of each sample point outside the slab, then its cross-section radius in it.
    beyond = np.maximum(np.abs(vessels[:, 2] - level) - thickness / 2.0, 0.0)
    in_plane = np.sqrt(np.maximum(vessels[:, 3] ** 2 - beyond**2, 0.0))
    hits = vessels[in_plane >= 0.25]
    in_plane = in_plane[in_plane >= 0.25]
    # Skip the parts of the tree that run through the mediastinum rather than the lung.
    col = np.clip(np.rint((hits[:, 0] - sl.origin) / sl.spacing).astype(int), 0, sl.size - 1)
    row = np.clip(np.rint((hits[:, 1] - sl.origin) / sl.spacing).astype(int), 0, sl.size - 1)
    aerated = sl.hu[row, col] < -600.0
    for (x, y, _z, _r), radius in zip(hits[aerated], in_plane[aerated], strict=True):
        shape = sl.ellipse_mask(
            float(x), float(y), max(float(radius), 0.5), max(float(radius), 0.5)
        )
        if shape is None:
            continue
        (rows, cols), mask = shape
        lung = sl.hu[rows, cols] < -600.0
        partial = min(1.0, float(radius) / (0.9 * sl.spacing))
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

    # Heart first: the great vessels leave its base and are painted over it.
    f = _profile(level, 98.0, 192.0)
    if f > 0.0:  # heart: pericardial fat, myocardium, enhanced chambers
        cx, cy = 18.0, -24.0
        sl.paint(sl.ellipse_mask(cx, cy, 66.0 * f + 4.0, 52.0 * f + 4.0, -32.0), -75.0)
        sl.paint(sl.ellipse_mask(cx, cy, 66.0 * f, 52.0 * f, -32.0), 95.0)
        ventricles = _ramp(level, 120.0, 145.0)
        atria = 1.0 - ventricles
        sl.paint(
            sl.ellipse_mask(
                cx + 22.0, cy + 8.0, 24.0 * f * ventricles, 19.0 * f * ventricles, -32.0
            ),
            250.0,
        )
        sl.paint(
            sl.ellipse_mask(
                cx - 16.0, cy - 22.0, 26.0 * f * ventricles, 12.0 * f * ventricles, -32.0
            ),
            210.0,
        )
        sl.paint(
            sl.ellipse_mask(cx - 42.0, cy + 10.0, 19.0 * f, 17.0 * f),
            190.0 if ventricles < 0.9 else 95.0,
        )
        sl.paint(sl.ellipse_mask(cx + 2.0, cy + 30.0, 26.0 * f * atria, 13.0 * f * atria), 235.0)

    blood = 240.0
    if level < 45.0:  # arch branches
        for x, y, r in ((-12.0, -18.0, 6.5), (4.0, -12.0, 4.5), (16.0, -4.0, 5.0)):
            sl.paint(sl.ellipse_mask(x, y, r, r), blood)
        # Brachiocephalic veins joining toward the SVC.
        sl.paint(sl.capsule_mask((-34.0, -28.0), (-20.0, -34.0), 7.0), 160.0)
        sl.paint(sl.capsule_mask((24.0, -38.0), (-20.0, -34.0), 6.0), 160.0)
    if 45.0 <= level < 62.0:  # aortic arch sweeping back to the left of the spine
        sl.paint(sl.capsule_mask((-8.0, -26.0), (22.0, vb_y - 18.0), 13.0), blood)
    if 60.0 <= level < 115.0:
        sl.paint(sl.ellipse_mask(-8.0, -26.0, 15.5, 15.5), blood)  # ascending aorta
    if 30.0 <= level < 108.0:
        sl.paint(sl.ellipse_mask(-34.0, -20.0, 10.0, 10.0), 300.0)  # SVC, dense inflow contrast
    if 80.0 <= level < 104.0:  # pulmonary trunk and its bifurcation
        sl.paint(sl.ellipse_mask(22.0, -34.0, 14.0, 14.0), 220.0)
        if level > 93.0:  # the right pulmonary artery passes behind the ascending aorta
            sl.paint(sl.capsule_mask((22.0, -30.0), (-30.0, -2.0), 8.0), 220.0)
            sl.paint(sl.capsule_mask((22.0, -30.0), (38.0, 0.0), 8.0), 220.0)
    if 58.0 <= level < 330.0:  # descending -> abdominal aorta
        drift = _ramp(level, 200.0, 250.0)
        r = _lerp(12.5, 10.0, drift)
        sl.paint(
            sl.ellipse_mask(_lerp(22.0, 6.0, drift), vb_y - _lerp(20.0, 27.0, drift), r, r), blood
        )
    elif level >= 330.0:  # common iliac arteries
        for side in (-1.0, 1.0):
            sl.paint(
                sl.ellipse_mask(side * (14.0 + 0.4 * (level - 330.0)), vb_y - 24.0, 7.0, 7.0), blood
            )


def _paint_abdomen(
    sl: _AxialSlice,
    level: float,
    vb_y: float,
    cavity: np.ndarray,
    phantom: _BodyPhantom,
) -> None:
    """Paint liver, spleen, stomach, pancreas, kidneys, bowel, muscles and pelvis."""
    if level < 170.0:
        return
    # Hemidiaphragm domes rise into the thorax: the left dome below stomach and spleen.
    left_dome = math.sqrt(min(max((level - 188.0) / 50.0, 0.0), 1.0))
    sl.paint(sl.ellipse_mask(58.0, 8.0, 92.0 * left_dome, 78.0 * left_dome), 40.0, within=cavity)
    grow = math.sqrt(min(max((level - 172.0) / 45.0, 0.0), 1.0))
    liver = grow * (1.0 - _ramp(level, 245.0, 300.0)) ** 0.5
    sl.paint(sl.ellipse_mask(-48.0, 2.0, 92.0 * liver, 80.0 * liver, 15.0), 112.0, within=cavity)
    left_lobe = _profile(level, 188.0, 262.0)
    sl.paint(
        sl.ellipse_mask(12.0, -46.0, 52.0 * left_lobe, 26.0 * left_lobe, -12.0),
        112.0,
        within=cavity,
    )
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
        splenic_vein = sl.capsule_mask((-16.0, vb_y - 36.0), (40.0, vb_y - 34.0), 4.5 * pancreas)
        sl.paint(splenic_vein, 170.0)

    for side, top, bottom in ((1.0, 232.0, 318.0), (-1.0, 244.0, 330.0)):
        k = _profile(level, top, bottom)
        if k <= 0.0:
            continue
        cx, cy, angle = side * 70.0, vb_y + 10.0, side * 28.0
        perirenal_fat = sl.ellipse_mask(cx, cy, 30.0 * k + 6.0, 40.0 * k + 6.0, angle)
        sl.paint(perirenal_fat, -95.0)
        sl.paint(sl.ellipse_mask(cx, cy, 27.0 * k, 37.0 * k, angle), 190.0)
        for pyramid in (-0.55, 0.0, 0.55):  # medullary pyramids enhance later than the cortex
            sl.paint(
                sl.ellipse_mask(
                    cx + side * 8.0 * k, cy + pyramid * 30.0 * k, 7.0 * k, 8.0 * k, angle
                ),
                150.0,
            )
        if k > 0.6:  # renal sinus fat and pelvis open toward the hilum (anteromedial)
            sl.paint(sl.ellipse_mask(cx - side * 11.0, cy - 7.0, 8.0 * k, 13.0 * k, angle), -70.0)
            sl.paint(
                sl.capsule_mask((cx - side * 12.0, cy - 8.0), (side * 18.0, vb_y - 22.0), 3.5 * k),
                150.0,
            )

    if level > 252.0:
        psoas = 5.0 + 17.0 * _ramp(level, 252.0, 350.0)
        for side in (-1.0, 1.0):
            sl.paint(
                sl.ellipse_mask(
                    side * (vb_y * 0.1 + 24.0 + psoas * 0.8), vb_y + 4.0, psoas, psoas * 1.15
                ),
                52.0,
            )
        _paint_colon_and_bowel(sl, level, cavity, phantom)
    if level > 318.0:
        _paint_pelvis(sl, level, vb_y)


def _paint_colon_and_bowel(
    sl: _AxialSlice, level: float, cavity: np.ndarray, phantom: _BodyPhantom
) -> None:
    """Paint colon (gas and stool) and small-bowel loops."""
    if 262.0 < level < 286.0:  # transverse colon sagging forward across the abdomen
        path = [(-92.0, -30.0), (-40.0, -62.0), (30.0, -66.0), (92.0, -40.0)]
        for radius, value in ((17.0, 80.0), (14.0, -1000.0)):
            for p0, p1 in itertools.pairwise(path):
                sl.paint(sl.capsule_mask(p0, p1, radius), value, within=cavity)
        sl.paint(sl.ellipse_mask(-30.0, -56.0, 12.0, 7.0), -150.0, within=cavity)
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
        sl.paint(
            sl.ellipse_mask(float(x), float(y), rr - 2.5, rr * 0.9 - 2.5),
            float(content),
            within=cavity,
        )


def _paint_pelvis(sl: _AxialSlice, level: float, vb_y: float) -> None:
    """Paint iliac wings, sacrum and gluteal muscles."""
    t = _ramp(level, 318.0, 370.0)
    for side in (-1.0, 1.0):
        sl.paint(sl.ellipse_mask(side * 82.0, vb_y + 52.0, 48.0 * t, 26.0 * t), 50.0)  # gluteus
        # The iliac wing is a curved plate, concave toward the abdomen.
        wing = [
            (side * (44.0 - 6.0 * t), vb_y + 24.0),
            (side * (86.0 + 4.0 * t), vb_y + 8.0),
            (side * (110.0 + 12.0 * t), vb_y - 40.0 + 8.0 * t),
        ]
        width = 3.0 + 5.0 * t
        for p0, p1 in itertools.pairwise(wing):
            sl.paint(sl.capsule_mask(p0, p1, width), 850.0)
        for p0, p1 in itertools.pairwise(wing):
            sl.paint(sl.capsule_mask(p0, p1, width - 2.2), 240.0)
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
        sl.paint(sl.ellipse_mask(side * 30.0, canal_y + 13.0, paraspinal, 16.0), 52.0)
    if phase < 4.5:
        sl.paint(sl.ellipse_mask(cx, cy, vb_r, vb_r * 0.9), 85.0)
    else:
        sl.paint(sl.ellipse_mask(cx, cy, vb_r, vb_r * 0.9), 720.0)
        sl.paint(sl.ellipse_mask(cx, cy, vb_r - 2.2, vb_r * 0.9 - 2.2), 245.0)
    if 7.0 < phase < 24.0:
        sl.paint(sl.ellipse_mask(cx, canal_y, 14.0, 12.5), 650.0)  # pedicles and laminae
        sl.paint(sl.capsule_mask((0.0, canal_y + 8.0), (0.0, canal_y + 24.0), 4.2), 650.0)
        if 10.0 < phase < 21.0:
            reach = _lerp(30.0, 40.0, abdomen)
            for side in (-1.0, 1.0):
                sl.paint(
                    sl.capsule_mask(
                        (side * 8.0, canal_y - 2.0), (side * reach, canal_y + 3.0), 4.5
                    ),
                    620.0,
                )
    sl.paint(sl.ellipse_mask(cx, canal_y, 8.5, 7.5), 25.0)  # thecal sac


def _paint_ribs(
    sl: _AxialSlice, level: float, rho: FloatArray, cy: float, rx: float, ry: float
) -> None:
    """Paint obliquely cut ribs and costal cartilage in a ring around the cavity."""
    if level > 330.0:
        return
    ring_width = 9.0 / (0.5 * (rx + ry))
    rows, cols = np.nonzero((rho > 1.0) & (rho < 1.0 + ring_width))  # only the ring can hold ribs
    if rows.size == 0:
        return
    r = rho[rows, cols]
    # Angle around the body: 0 at the spine, pi at the sternum.
    phi = np.abs(np.arctan2(sl.coords[cols], sl.coords[rows] - cy))
    # Ribs slope steeply downward from the spine, so each crosses a slice as a short arc.
    phase = (level + 8.0 - 150.0 * (phi / math.pi) ** 1.5) / 23.0
    index = np.floor(phase + 0.5)
    offset = np.abs(phase - index) * 23.0
    in_rib = (offset < 4.6) & (index >= 0) & (index < 12) & (phi > 0.28)
    # Floating ribs (11, 12) end laterally; the others continue as cartilage.
    anterior_end = np.where(index >= 10, 1.7, np.where(index >= 8, 2.35, 2.6))
    bone = in_rib & (phi < anterior_end)
    cartilage = in_rib & (phi >= anterior_end) & (phi < 2.95) & (index < 10)
    radial = (r - 1.0) / ring_width
    cortex = (radial < 0.25) | (radial > 0.72) | (offset > 3.4)
    sl.hu[rows[bone], cols[bone]] = np.where(cortex[bone], 820.0, 330.0)
    sl.hu[rows[cartilage], cols[cartilage]] = 130.0


def _render_body_ct(
    slices: int, size: int, seed: str
) -> tuple[np.ndarray, float, np.ndarray, float]:
    """Render the torso phantom; returns (HU volume int16, pixel spacing, levels, spacing)."""
    pixel_spacing = _CT_FOV_MM / size
    slice_spacing = _BODY_COVERAGE_MM / slices
    levels = _BODY_FIRST_LEVEL_MM + np.arange(slices) * slice_spacing
    phantom = _body_phantom()
    noise = _NoiseBank(size, 13.0, _rng(seed, "noise"))
    volume = np.empty((slices, size, size), np.int16)
    for index, level in enumerate(levels):
        sl = _AxialSlice(size, pixel_spacing, -1000.0)
        _paint_torso(sl, float(level), slice_spacing, phantom)
        volume[index] = _finish_ct_slice(sl.hu, noise.slice_noise(index))
    return volume, pixel_spacing, levels, slice_spacing


class _NoiseBank:
    """Correlated CT noise images, drawn once and reused shifted (fast, still looks random)."""

    def __init__(self, size: int, sigma: float, rng: np.random.Generator, count: int = 6) -> None:
        """Draw ``count`` noise images with standard deviation ~``sigma`` HU."""
        self.size = size
        white = rng.standard_normal((count, size, size), dtype=np.float32) * np.float32(sigma * 1.6)
        self.images = [0.45 * w + 0.55 * _box3(w) * 2.2 for w in white]

    def slice_noise(self, index: int) -> FloatArray:
        """Noise for slice ``index``: a bank image rolled by a pseudo-random offset."""
        image = self.images[index % len(self.images)]
        shift = (index * 7919) % self.size, (index * 104729) % self.size
        return np.roll(image, shift, axis=(0, 1))


def _finish_ct_slice(hu: FloatArray, noise: FloatArray) -> np.ndarray:
    """Blur like a soft reconstruction kernel and add grainy quantum noise."""
    stored: np.ndarray = np.clip(np.rint(_box3(hu) + noise), -1024, 3071).astype(np.int16)
    return stored


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


def _ct_body_series(study: _Study, number: int, description: str, time: str = "094630") -> _Series:
    """Series descriptor for a body CT reconstruction."""
    return _Series(study, number, "CT", description, CTImageStorage, "DemoMed", "SynthCT 128", time)


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

    def write(index: int) -> pathlib.Path:
        ds = _ct_dataset(
            series,
            index,
            volume[index],
            pixel_spacing,
            float(z_positions[index]),
            thickness,
            kernel,
            windows,
        )
        return _write_part10(ds, out_dir / f"IM{index + 1:04d}.dcm", transfer_syntax_uid)

    if len(z_positions) != len(volume):
        raise ValueError("one z position per slice is required")
    return _run_writes(write, len(volume), progress, transfer_syntax_uid)


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
    if transfer_syntax_uid not in _NATIVE_SYNTAXES | _PYDICOM_ENCODERS | {JPEGLosslessSV1}:
        raise ValueError(f"demo generator cannot encode transfer syntax {transfer_syntax_uid}")
    study = (
        _CT_BODY_STUDY
        if uid_seed == _CT_BODY_STUDY.key
        else dataclasses.replace(_CT_BODY_STUDY, key=uid_seed)
    )
    volume, pixel_spacing, levels, spacing = _render_body_ct(slices, size, uid_seed)
    series = _ct_body_series(study, 2, f"AXIAL {_ds_number(spacing)}MM SOFT TISSUE")
    return _write_ct_volume(
        pathlib.Path(out_dir),
        series,
        volume,
        pixel_spacing,
        [_z_for_level(v) for v in levels],
        spacing,
        "STANDARD",
        _CT_BODY_WINDOWS,
        transfer_syntax_uid,
    )


# --------------------------------------------------------------------------------------
# Head phantom (CT head and MR brain share one labelled anatomy)
# --------------------------------------------------------------------------------------

(
    _AIR,
    _SOFT,
    _FAT,
    _BONE,
    _DIPLOE,
    _CSF,
    _GREY,
    _WHITE,
    _VITREOUS,
    _LENS,
    _MUSCLE,
    _SINUS,
    _DENSE_BONE,
    _HOLDER,
) = range(14)

# Tissue value tables indexed by label: CT in HU, MR in arbitrary 12-bit signal.
_HEAD_CT_HU = np.array(
    [-1000, 45, -90, 1500, 650, 6, 40, 27, 12, 100, 52, -950, 2000, 120], np.float32
)
_HEAD_T2 = np.array([0, 380, 820, 25, 420, 1900, 1020, 690, 1850, 260, 300, 0, 10, 0], np.float32)
_HEAD_T1 = np.array([0, 560, 1450, 25, 1150, 190, 560, 820, 150, 720, 470, 0, 10, 0], np.float32)


def _ellipsoid_distance(
    x: Coordinate, y: Coordinate, z: Coordinate, centre: Sequence[float], radii: Sequence[float]
) -> FloatArray:
    """Approximate signed distance (mm) to an ellipsoid surface; negative inside."""
    dx, dy, dz = (x - centre[0]) / radii[0], (y - centre[1]) / radii[1], (z - centre[2]) / radii[2]
    q = np.sqrt(dx * dx + dy * dy + dz * dz) + 1e-6
    gradient = (
        np.sqrt((dx / radii[0]) ** 2 + (dy / radii[1]) ** 2 + (dz / radii[2]) ** 2) / q + 1e-6
    )
    return (q - 1.0) / gradient


def _inside(
    x: Coordinate, y: Coordinate, z: Coordinate, centre: Sequence[float], radii: Sequence[float]
) -> np.ndarray:
    """Boolean mask of points inside an axis-aligned ellipsoid (broadcast over x, y, z)."""
    shape = np.broadcast_shapes(np.shape(x), np.shape(y), np.shape(z))
    for value, c, r in zip((x, y, z), centre, radii, strict=True):
        if np.size(value) == 1 and abs(float(np.ravel(value)[0]) - c) > r:
            return np.zeros(shape, bool)  # the image plane misses this ellipsoid entirely
    inside = (
        ((x - centre[0]) / radii[0]) ** 2
        + ((y - centre[1]) / radii[1]) ** 2
        + ((z - centre[2]) / radii[2]) ** 2
    ) <= 1.0
    return np.broadcast_to(inside, shape)


# Gyral pattern: a random field over surface direction (azimuth, elevation); its zero set
# marks sulci, which are extruded radially inward so they run perpendicular to the cortex.
_GYRI_FREQUENCIES = np.random.default_rng(31).uniform(
    5.0, 11.0, size=(7, 2)
) * np.random.default_rng(33).choice([-1, 1], size=(7, 2))
_GYRI_PHASES = np.random.default_rng(32).uniform(0, 2 * np.pi, 7)


def _fold_cortex(
    labels: np.ndarray, x: FloatArray, y: FloatArray, z: FloatArray, depth: FloatArray
) -> np.ndarray:
    """Carve sulci (CSF lined by grey matter) into the outer shell of the brain."""
    azimuth = np.arctan2(y, x)
    elevation = np.arctan2(z - 5.0, np.hypot(x, y))
    # Warping the direction with depth bends sulci instead of drawing straight spokes.
    warp = 0.09 * np.sin(depth * 0.32 + elevation * 4.0) + 0.05 * np.sin(
        azimuth * 9.0 + depth * 0.2
    )
    phase = (
        (azimuth + warp)[:, None] * np.round(_GYRI_FREQUENCIES[:, 0]).astype(np.float32)
        + (elevation - warp)[:, None] * _GYRI_FREQUENCIES[:, 1].astype(np.float32)
        + _GYRI_PHASES.astype(np.float32)
    )
    folds = np.cos(phase).sum(axis=-1)
    sulcal_depth = 14.0 + 5.0 * np.cos(azimuth * 3.0 + elevation * 2.0)
    labels = labels.copy()
    labels[(depth < sulcal_depth + 3.0) & (np.abs(folds) < 0.8)] = _GREY
    labels[(depth < sulcal_depth) & (np.abs(folds) < 0.2)] = _CSF
    return labels


def _head_labels(x: Coordinate, y: Coordinate, z: Coordinate) -> np.ndarray:
    """Tissue labels of the head phantom at patient coordinates (mm, LPS, brain centre at 0)."""
    px, py, pz = x, y, z  # un-broadcast: cheaper arithmetic, and lets _inside skip whole planes
    x, y, z = np.broadcast_arrays(x, y, z)
    labels = np.zeros(x.shape, np.uint8)
    lower = z < 5.0
    cranium = np.minimum.reduce(
        [
            _ellipsoid_distance(px, py, pz, (0, 0, 5), (68, 86, 70)) * ~lower
            + _ellipsoid_distance(px, py, pz, (0, 0, 5), (68, 86, 50)) * lower,
            _ellipsoid_distance(px, py, pz, (0, 40, -38), (54, 38, 26)),  # posterior fossa
            _ellipsoid_distance(px, py, pz, (-42, -6, -30), (22, 36, 20)),  # middle cranial fossae
            _ellipsoid_distance(px, py, pz, (42, -6, -30), (22, 36, 20)),
        ]
    )
    face = _ellipsoid_distance(px, py, pz, (0, -56, -52), (54, 42, 38))
    neck = (z < -40) & ((x / 50.0) ** 2 + ((y - 14.0) / 54.0) ** 2 <= 1.0)
    temporal = (np.abs(x) > 48) & (z > -25) & (z < 40)
    scalp_outer = np.where(temporal, 15.0, 12.5)
    labels[(cranium < scalp_outer) | (face < 0) | neck] = _SOFT
    # Cervical spine: vertebral bodies with discs, canal with cord; the pharynx in front.
    cervical = neck & (z < -58)
    vertebra = np.mod(z, 17.0) > 4.0  # x, y, z are full arrays after broadcasting
    body = cervical & ((x / 11.0) ** 2 + ((y - 6.0) / 9.0) ** 2 <= 1.0)
    labels[body] = np.where(vertebra[body], _DIPLOE, _SOFT)  # cancellous body or disc
    labels[
        cervical
        & ((x / 12.0) ** 2 + ((y - 26.0) / 10.0) ** 2 <= 1.0)
        & (np.abs(x) + np.abs(y - 26.0) > 9.0)
    ] = _BONE
    labels[cervical & (((x / 7.0) ** 2 + ((y - 25.0) / 6.5) ** 2) <= 1.0)] = _CSF
    labels[(z < -45) & ((x / 4.5) ** 2 + ((y - 25.0) / 4.0) ** 2 <= 1.0)] = _WHITE  # spinal cord
    labels[cervical & ((x / 11.0) ** 2 + ((y + 10.0) / 5.0) ** 2 <= 1.0)] = _SINUS  # pharynx
    labels[(cranium > 8.5) & (cranium < 10.5)] = _FAT
    labels[temporal & (cranium > 7.0) & (cranium < 13.5)] = _MUSCLE
    for side in (-1.0, 1.0):  # ears
        labels[_inside(px, py, pz, (side * 74, 8, -30), (7, 14, 20))] = _SOFT
    labels[(cranium > 0) & (cranium < 7)] = _BONE
    labels[(cranium > 2.2) & (cranium < 4.8)] = _DIPLOE
    # Skull base and face.
    for side in (-1.0, 1.0):
        orbit = _ellipsoid_distance(px, py, pz, (side * 31, -66, -30), (19, 21, 18))
        labels[(orbit > -1.8) & (orbit < 0) & (y > -84)] = _BONE
        labels[orbit < -1.8] = _FAT
        labels[_inside(px, py, pz, (side * 31, -72, -30), (12, 12, 12))] = _VITREOUS
        labels[_inside(px, py, pz, (side * 31, -83.5, -30), (4.5, 2.0, 4.5))] = _LENS
        petrous = (x * side * 0.707 + (y - 8) * 0.707, -x * side * 0.707 + (y - 8) * 0.707)
        labels[((petrous[0] - 32) / 8) ** 2 + (petrous[1] / 24) ** 2 + ((z + 40) / 7) ** 2 <= 1] = (
            _DENSE_BONE
        )
        mastoid = _inside(px, py, pz, (side * 56, 22, -44), (11, 13, 12))
        cells = np.sin(x[mastoid] * 1.7) * np.sin(y[mastoid] * 1.9) * np.sin(z[mastoid] * 1.5) > 0.1
        labels[mastoid] = np.where(cells, _SINUS, _BONE)
        labels[
            (np.abs(z + 36) < 3.5)
            & (np.abs(np.abs(x) - 62) < 4.5)
            & (y > -62)
            & (y < -2)
            & (side * x > 0)
        ] = _BONE
    nasal = _inside(px, py, pz, (0, -64, -38), (15, 24, 22))
    labels[nasal] = np.where(np.abs(x[nasal]) < 1.2, _BONE, _SINUS)
    labels[_ellipsoid_distance(px, py, pz, (0, -24, -44), (15, 12, 10)) < 1.8] = _BONE
    labels[_inside(px, py, pz, (0, -24, -44), (13.2, 10.2, 8.2))] = _SINUS
    labels[_inside(px, py, pz, (0, -85, 16), (16, 5, 12))] = _SINUS  # frontal sinus

    brain = cranium < 0
    labels[brain] = _WHITE
    depth = -cranium
    labels[brain & (depth < 3.5)] = _GREY
    labels[brain & (depth < 1.0)] = _CSF
    cortex = brain & (depth < 22.0)  # only the outer shell can hold sulci; saves most of the work
    labels[cortex] = _fold_cortex(labels[cortex], x[cortex], y[cortex], z[cortex], depth[cortex])
    labels[brain & (np.abs(x) < 1.3) & (depth < 38.0) & ((z > 22) | (np.abs(y) > 45))] = _CSF
    sylvian = brain & (depth < 18.0) & (np.abs(x) > 30.0) & (z > -22.0) & (z < 10.0)
    bend = y + 5.0 - 0.35 * (np.abs(x) - 40.0) + 0.03 * (np.abs(x) - 62.0) ** 2
    labels[sylvian & (np.abs(bend) < 1.0 + 0.1 * (18.0 - depth))] = _CSF
    # Corpus callosum: a white arch over the lateral ventricles (visible on midline sagittal).
    callosum = _inside(px, py, pz, (0, 0, 14), (9, 38, 16)) & ~_inside(
        px, py, pz, (0, 0, 14), (9, 34, 11)
    )
    labels[callosum & (z > 10)] = _WHITE
    for side in (-1.0, 1.0):  # deep grey nuclei
        labels[_inside(px, py, pz, (side * 13, -15, 12), (6, 10, 8))] = _GREY
        labels[_inside(px, py, pz, (side * 23, -3, 1), (6.5, 15, 10))] = _GREY
        labels[_inside(px, py, pz, (side * 10, 9, 2), (8, 12, 9))] = _GREY
        # Lateral ventricles diverge posteriorly: a butterfly on axial slices.
        vx = side * (8.0 + 0.13 * (y + 12))
        labels[brain & (((x - vx) / 5.5) ** 2 + ((y + 1) / 31) ** 2 + ((z - 15) / 9) ** 2 <= 1)] = (
            _CSF
        )
    labels[_inside(px, py, pz, (0, 6, -2), (2.6, 13, 8))] = _CSF  # third ventricle
    # Posterior fossa: cerebellum with folia, brainstem with its cisterns.
    cerebellum = _inside(px, py, pz, (0, 44, -40), (50, 30, 20)) & brain
    cx, cy, cz = x[cerebellum], y[cerebellum], z[cerebellum]
    # Folia curve around the fourth ventricle.
    arcs = np.sqrt((cx / 50.0) ** 2 + ((cy - 18.0) / 56.0) ** 2)
    core = ((cx / 22.0) ** 2 + ((cy - 40.0) / 14.0) ** 2 + ((cz + 42.0) / 9.0) ** 2) < 1.0
    folia = np.sin(arcs * 75.0 + cz * 0.9 + np.sin(cx * 0.15) * 2.0) > 0.7
    labels[cerebellum] = np.where(core | folia, _WHITE, _GREY)
    labels[_inside(px, py, pz, (0, 12, -22), (17, 16, 10)) & brain] = _CSF
    labels[_inside(px, py, pz, (0, 14, -28), (14, 12, 30))] = _WHITE
    labels[_inside(px, py, pz, (0, 30, -42), (6, 4, 6))] = _CSF  # fourth ventricle
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
    noise = _NoiseBank(size, 3.5, _rng(seed, "noise"))
    for index, z in enumerate(z_positions):
        labels = _head_labels(x, y, np.float32(z))
        labels[holder & (labels == _AIR)] = _HOLDER
        volume[index] = _finish_ct_slice(_HEAD_CT_HU[labels], noise.slice_noise(index))
    return volume, spacing, z_positions


def _render_mr(
    plane: str, positions: Sequence[float], size: int, fov: float, table: FloatArray, seed: str
) -> np.ndarray:
    """Render MR slices of the head phantom (blurred, coil shading, Rician noise)."""
    coords = (-(size - 1) / 2.0 * fov / size + np.arange(size) * fov / size).astype(np.float32)
    out = np.empty((len(positions), size, size), np.uint16)
    x: Coordinate
    y: Coordinate
    z: Coordinate
    for index, position in enumerate(positions):
        if plane == "axial":
            x, y, z = coords[None, :], coords[:, None], np.float32(position)
        else:  # sagittal: rows run head to feet, columns anterior to posterior
            x, y, z = np.float32(position), coords[None, :], -coords[:, None]
        signal = _box3(table[_head_labels(x, y, z)])  # blur stands in for the acquisition PSF
        rows = np.linspace(-1, 1, size, dtype=np.float32)[:, None]
        cols = np.linspace(-1, 1, size, dtype=np.float32)[None, :]
        signal *= 1.08 - 0.16 * (rows * rows + cols * cols) + 0.06 * rows  # receive-coil shading
        rng = _rng(seed, plane, index)
        real = signal + rng.normal(0, 18, signal.shape).astype(np.float32)
        imag = rng.normal(0, 18, signal.shape).astype(np.float32)
        out[index] = np.clip(np.hypot(real, imag), 0, 4095).astype(np.uint16)
    return out


# --------------------------------------------------------------------------------------
# Chest radiograph (analytic projection radiography)
# --------------------------------------------------------------------------------------

_XR_ROWS, _XR_COLS = 2500, 2048  # 43.75 x 35.8 cm detector
_XR_PIXEL_MM = 0.175
_XR_COARSE = 4  # smooth anatomy is computed on a 4x coarser grid and upsampled
_MU_SOFT = 0.02  # water-equivalent attenuation per mm (arbitrary effective energy)
_MU_BONE = 0.05


def _soft_step(distance: FloatArray, width: float = 1.5) -> FloatArray:
    """Smooth 0..1 edge of a structure: 1 where ``distance`` (mm, inside positive) > width."""
    return (0.5 * (1.0 + np.tanh(distance / width))).astype(np.float32)


def _tube_chord(d2: FloatArray, radius: float, cortex: float, marrow: float) -> FloatArray:
    """Projected thickness of a hollow bone cylinder: bright cortical edges, dimmer middle."""
    outer = np.sqrt(np.maximum(radius * radius - d2, 0.0))
    inner_r = max(radius - cortex, 0.0)
    inner = np.sqrt(np.maximum(inner_r * inner_r - d2, 0.0))
    return (2.0 * (outer - inner) + 2.0 * inner * marrow).astype(np.float32)


class _Radiograph:
    """Attenuation line integrals of a projection radiograph (u to the right, v down, in mm)."""

    def __init__(self) -> None:
        """Create a blank detector: coarse smooth layer, fine bone and vessel layers."""
        rows, cols = _XR_ROWS // _XR_COARSE, _XR_COLS // _XR_COARSE
        step = _XR_PIXEL_MM * _XR_COARSE
        self.u = ((np.arange(cols) - (cols - 1) / 2.0) * step).astype(np.float32)[None, :]
        self.v = ((np.arange(rows) + 0.5) * step).astype(np.float32)[:, None]
        self.soft = np.zeros((rows, cols), np.float32)
        self.lung = np.zeros((rows, cols), np.float32)
        self.bone = np.zeros((_XR_ROWS, _XR_COLS), np.float32)
        self.vessels = np.zeros((_XR_ROWS, _XR_COLS), np.float32)

    @staticmethod
    def _col(u: float) -> float:
        """Fine column index of horizontal position ``u``."""
        return u / _XR_PIXEL_MM + (_XR_COLS - 1) / 2.0

    @staticmethod
    def _row(v: float) -> float:
        """Fine row index of vertical position ``v``."""
        return v / _XR_PIXEL_MM - 0.5

    def add_tube(
        self,
        layer: FloatArray,
        points: npt.ArrayLike,
        radius: float,
        cortex: float,
        mu: float,
        marrow: float = 0.35,
        overlap: bool = True,
    ) -> None:
        """Add a tubular structure (rib, clavicle, vessel) along a polyline at full resolution.

        With ``overlap=False`` the structure is merged with a maximum instead of a sum, so
        branching vessels do not produce bright spots where branches meet.
        """
        pts = np.asarray(points, np.float32).reshape(-1, 2)
        c0 = max(int(self._col(pts[:, 0].min() - radius)), 0)
        c1 = min(int(self._col(pts[:, 0].max() + radius)) + 2, _XR_COLS)
        r0 = max(int(self._row(pts[:, 1].min() - radius)), 0)
        r1 = min(int(self._row(pts[:, 1].max() + radius)) + 2, _XR_ROWS)
        if c0 >= c1 or r0 >= r1:
            return
        # Minimum distance to the polyline, so joints between segments are not counted twice.
        d2 = np.full((r1 - r0, c1 - c0), np.inf, np.float32)
        segments = list(itertools.pairwise(pts)) if len(pts) > 1 else [(pts[0], pts[0])]
        for (u0, v0), (u1, v1) in segments:
            sc0 = max(int(self._col(min(u0, u1) - radius)), c0)
            sc1 = min(int(self._col(max(u0, u1) + radius)) + 2, c1)
            sr0 = max(int(self._row(min(v0, v1) - radius)), r0)
            sr1 = min(int(self._row(max(v0, v1) + radius)) + 2, r1)
            if sc0 >= sc1 or sr0 >= sr1:
                continue
            pu = ((np.arange(sc0, sc1) - (_XR_COLS - 1) / 2.0) * _XR_PIXEL_MM - u0).astype(
                np.float32
            )[None, :]
            pv = ((np.arange(sr0, sr1) + 0.5) * _XR_PIXEL_MM - v0).astype(np.float32)[:, None]
            su, sv = float(u1 - u0), float(v1 - v0)
            t = np.clip((pu * su + pv * sv) / max(su * su + sv * sv, 1e-6), 0.0, 1.0)
            dist = (pu - t * su) ** 2 + (pv - t * sv) ** 2
            window = d2[sr0 - r0 : sr1 - r0, sc0 - c0 : sc1 - c0]
            np.minimum(window, dist, out=window)
        chord = _tube_chord(d2, radius, cortex, marrow) * np.float32(mu)
        if overlap:
            layer[r0:r1, c0:c1] += chord
        else:
            np.maximum(layer[r0:r1, c0:c1], chord, out=layer[r0:r1, c0:c1])

    def ellipse(
        self, cu: float, cv: float, ru: float, rv: float, angle_deg: float = 0.0
    ) -> FloatArray:
        """Soft-edged ellipse mask on the coarse grid."""
        c, s = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
        du, dv = self.u - cu, self.v - cv
        q = np.sqrt(((du * c + dv * s) / ru) ** 2 + ((dv * c - du * s) / rv) ** 2)
        return _soft_step((1.0 - q) * min(ru, rv))

    def capsule(
        self, p0: tuple[float, float], p1: tuple[float, float], radius: float
    ) -> FloatArray:
        """Soft-edged capsule mask on the coarse grid."""
        su, sv = p1[0] - p0[0], p1[1] - p0[1]
        pu, pv = self.u - p0[0], self.v - p0[1]
        t = np.clip((pu * su + pv * sv) / (su * su + sv * sv), 0.0, 1.0)
        return _soft_step(radius - np.sqrt((pu - t * su) ** 2 + (pv - t * sv) ** 2))

    def add_vessel_tree(
        self,
        hilum: tuple[float, float],
        angles: Sequence[float],
        rng: np.random.Generator,
        radius: float = 3.4,
    ) -> None:
        """Branching pulmonary vessels radiating from a hilum, tapering to the periphery."""

        def branch(
            start: FloatArray, angle: float, length: float, radius: float, depth: int
        ) -> None:
            bend = rng.normal(0.0, 0.2)
            points = [start]
            for step in range(1, 5):  # gently curving vessel
                heading = angle + bend * step / 4.0
                points.append(
                    points[-1] + 0.25 * length * np.array([math.cos(heading), math.sin(heading)])
                )
            end = points[-1]
            self.add_tube(self.vessels, points, radius, radius, _MU_SOFT * 2.5, 1.0, overlap=False)
            if depth:
                for turn in (-1.0, 1.0):
                    branch(
                        end,
                        angle + bend + turn * rng.uniform(0.2, 0.5),
                        length * rng.uniform(0.7, 0.85),
                        radius * 0.76,
                        depth - 1,
                    )

        for angle in angles:
            start = np.array(hilum, np.float64) + 10.0 * np.array(
                [math.cos(angle), math.sin(angle)]
            )
            branch(start, angle, 32.0, radius, 5)

    def add_marker(self, letter: str, u: float, v: float) -> None:
        """Burn in a lead side marker (``R``/``L``) that blocks the beam."""
        font = ImageFont.load_default(size=110)
        canvas = Image.new("L", (120, 130), 0)
        ImageDraw.Draw(canvas).text((14, 2), letter, fill=255, font=font)
        glyph = np.asarray(canvas, np.float32) / 255.0
        row, col = int(self._row(v)), int(self._col(u))
        self.bone[row : row + glyph.shape[0], col : col + glyph.shape[1]] += glyph * 12.0

    def detector_image(self, seed: str) -> np.ndarray:
        """Convert attenuation to processed 12-bit MONOCHROME1 values (low = white)."""
        full = (_XR_ROWS, _XR_COLS)
        attenuation = _resize(self.soft, full) + self.bone + self.vessels * _resize(self.lung, full)
        # Typical CR/DR processing: compress the large-scale dynamic range, boost fine detail.
        coarse = attenuation.reshape(_XR_ROWS // 4, 4, _XR_COLS // 4, 4).mean(axis=(1, 3))
        base = _resize(_box_blur(coarse, 10), full)
        processed = 0.72 * base + 1.5 * (attenuation - base)
        rng = _rng(seed, "quantum-noise")
        noise = rng.standard_normal(full, dtype=np.float32) * np.float32(9.0)
        pixels = 3650.0 - 600.0 * processed + noise
        # Collimator shadow: unexposed border, shown white on MONOCHROME1.
        margin_rows, margin_cols = int(8 / _XR_PIXEL_MM), int(6 / _XR_PIXEL_MM)
        pixels[:margin_rows] = pixels[-margin_rows:] = 180.0
        pixels[:, :margin_cols] = pixels[:, -margin_cols:] = 180.0
        stored: np.ndarray = np.clip(np.rint(pixels), 0, 4095).astype(np.uint16)
        return stored


def _lung_lateral_edge(v: FloatArray | float) -> FloatArray:
    """Distance (mm) of the lateral lung margin from the midline at height ``v`` (PA view)."""
    edge: FloatArray = 60.0 + 84.0 * np.sqrt(
        np.clip((np.asarray(v, np.float32) - 40.0) / 230.0, 0.0, 1.0)
    )
    return edge


def _add_lung_texture(xr: _Radiograph, lung: FloatArray, seed: int, amount: float) -> None:
    """Faint blotchy parenchymal texture so the lungs are not perfectly smooth."""
    rng = np.random.default_rng(seed)
    texture = _box_blur(rng.standard_normal(lung.shape).astype(np.float32), 2, passes=2)
    xr.soft += amount * texture / (texture.std() + 1e-6) * np.clip(lung / 80.0, 0.0, 1.0)


def _chest_pa(heart_scale: float = 1.0) -> _Radiograph:
    """Compose a PA chest radiograph (patient's right on the image left).

    ``heart_scale`` > 1 enlarges the cardiac silhouette (cardiomegaly variant).
    """
    xr = _Radiograph()
    u, v = xr.u, xr.v
    au = np.abs(u)
    half_width = 60.0 + 106.0 * _smoothstep(v, 28.0, 100.0) - 12.0 * _smoothstep(v, 340.0, 437.0)
    depth = 120.0 + 110.0 * _smoothstep(v, 25.0, 110.0) + 15.0 * _smoothstep(v, 300.0, 420.0)
    xr.soft += _MU_SOFT * depth * np.sqrt(np.clip(1.0 - (u / half_width) ** 2, 0.0, 1.0))
    arms = (
        80.0
        * np.sqrt(np.clip(1.0 - ((au - 196.0) / 34.0) ** 2, 0.0, 1.0))
        * _smoothstep(v, 50.0, 110.0)
    )
    xr.soft += _MU_SOFT * arms

    lung = np.zeros_like(xr.soft)
    lateral = _lung_lateral_edge(v)
    for side, dome_top, dome_u in ((-1.0, 284.0, -58.0), (1.0, 298.0, 64.0)):
        su = u * side
        apex = 40.0 + 0.012 * (su - 62.0) ** 2
        medial = 16.0 + 12.0 * _smoothstep(v, 60.0, 200.0)
        dome = dome_top + 0.009 * (u - dome_u) ** 2
        inside = (
            _soft_step(v - apex)
            * _soft_step(lateral - su)
            * _soft_step(su - medial)
            * _soft_step(dome - v, 1.0)
        )
        centre, width = (lateral + medial) / 2.0, np.maximum((lateral - medial) / 2.0, 1.0)
        across = np.sqrt(np.clip(1.0 - ((su - centre) / (width * 1.15)) ** 2, 0.0, 1.0))
        vertical = np.sqrt(np.clip((v - apex) / 80.0, 0.0, 1.0)) * (
            0.5 + 0.5 * np.clip((dome - v) / 70.0, 0.0, 1.0)
        )
        lung += inside * 170.0 * across * vertical
        # Posterior costophrenic recess: a little aerated lung projects below the dome.
        lung += (
            25.0
            * _soft_step(v - dome)
            * _soft_step(dome + 30.0 - v, 6.0)
            * _soft_step(lateral - su)
            * _soft_step(su - 40.0)
        )
    s = heart_scale
    heart = np.maximum.reduce(
        [
            xr.ellipse(26.0 * s, 258.0, 60.0 * s, 50.0, 22.0),  # ventricles
            xr.ellipse(-26.0 - 30.0 * (s - 1.0), 244.0, 26.0 * s, 36.0),  # right atrium border
            xr.ellipse(62.0 * s, 276.0, 40.0 * s, 34.0, 30.0),  # left ventricular apex
            xr.ellipse(34.0, 206.0, 16.0, 18.0),  # pulmonary trunk / left atrial appendage
        ]
    )
    knob = xr.ellipse(30.0, 168.0, 16.0, 16.0)
    hila = xr.ellipse(-44.0, 205.0, 16.0, 24.0) + xr.ellipse(46.0, 198.0, 16.0, 24.0)
    lung *= (1.0 - 0.82 * heart) * (1.0 - 0.7 * knob) * (1.0 - 0.2 * hila)
    xr.soft -= _MU_SOFT * 0.82 * lung
    xr.lung = np.clip(lung / 60.0, 0.0, 1.0)
    _add_lung_texture(xr, lung, 11, 0.035)

    airway = np.maximum.reduce(
        [
            xr.capsule((0.0, -10.0), (2.0, 178.0), 8.5),
            xr.capsule((2.0, 178.0), (-30.0, 210.0), 6.0),
            xr.capsule((2.0, 178.0), (32.0, 204.0), 5.5),
        ]
    )
    xr.soft -= _MU_SOFT * 0.9 * 16.0 * airway
    xr.soft -= _MU_SOFT * 0.9 * 30.0 * xr.ellipse(70.0, 316.0, 26.0, 11.0)  # gastric bubble

    vertebra = (v - 40.0) % 25.0
    lumbar = _smoothstep(v, 260.0, 330.0)  # the spine shows through more below the heart
    spine = _soft_step(20.0 - au) * (1.0 - 0.4 * _soft_step(2.5 - np.abs(vertebra - 1.5), 0.8))
    xr.soft += (0.22 + 0.25 * lumbar) * spine
    for side in (-1.0, 1.0):  # pedicles
        xr.soft += 0.12 * _soft_step(4.0 - np.hypot(u - side * 13.0, (vertebra - 12.0) * 0.7), 0.8)

    for side in (-1.0, 1.0):
        for k in range(10):
            v0 = 50.0 + 22.5 * k
            drop_lateral, drop_anterior = 18.0 + 3.0 * k, 24.0 + 5.0 * k
            reach = float(_lung_lateral_edge(v0 + drop_lateral)) + 4.0
            # Posterior rib: out from the spine, rising slightly, then curving down the flank.
            theta = np.linspace(0.0, math.radians(105.0), 28)
            us = 18.0 + (reach - 18.0) * np.sin(theta)
            vs = v0 - 10.0 * np.sin(theta) + (drop_lateral + 10.0) * (1.0 - np.cos(theta))
            xr.add_tube(xr.bone, np.column_stack([side * us, vs]), 4.3 + 0.12 * k, 1.3, _MU_BONE)
            if k < 7:  # anterior ribs run down and medially to the costal cartilages
                t = np.linspace(0.0, 1.0, 18)
                lateral_point = (reach - 6.0, vs[-1])
                end = (46.0 + 2.0 * k, lateral_point[1] + drop_anterior)
                ua = lateral_point[0] + (end[0] - lateral_point[0]) * t
                va = lateral_point[1] + (end[1] - lateral_point[1]) * t + 8.0 * np.sin(np.pi * t)
                xr.add_tube(xr.bone, np.column_stack([side * ua, va]), 5.5, 0.9, _MU_BONE * 0.5)
        us = np.linspace(14.0, 150.0, 30)  # clavicle: gentle S from sternum to acromion
        t = (us - 14.0) / 136.0
        xr.add_tube(
            xr.bone,
            np.column_stack([side * us, 84.0 - 30.0 * t + 9.0 * np.sin(2 * np.pi * t)]),
            7.5,
            2.2,
            _MU_BONE * 1.1,
        )
        vs = np.linspace(72.0, 215.0, 16)  # medial border of the scapula
        xr.add_tube(
            xr.bone,
            np.column_stack([side * (118.0 + 0.1 * (vs - 72.0)), vs]),
            2.5,
            1.2,
            _MU_BONE * 0.6,
        )
        humeral_head = [(side * 184.0, 96.0)]
        xr.add_tube(xr.bone, humeral_head, 27.0, 2.5, _MU_BONE * 0.8, 0.45)
    rng = np.random.default_rng(4)
    fan = (-1.35, -0.95, -0.55, -0.15, 0.25, 0.65, 1.05, 1.4)
    xr.add_vessel_tree((-44.0, 205.0), [math.pi - a for a in fan], rng)
    xr.add_vessel_tree((46.0, 198.0), fan, rng)
    xr.add_marker("R", -160.0, 22.0)
    return xr


def _chest_lateral() -> _Radiograph:
    """Compose a left lateral chest radiograph (anterior on the image left)."""
    xr = _Radiograph()
    u, v = xr.u, xr.v
    centre = 25.0 * (1.0 - _smoothstep(v, 30.0, 110.0))  # the neck sits posteriorly
    half_depth = 58.0 + 60.0 * _smoothstep(v, 25.0, 110.0) + 6.0 * _smoothstep(v, 300.0, 420.0)
    width = 120.0 + 220.0 * _smoothstep(v, 25.0, 95.0) - 40.0 * _smoothstep(v, 110.0, 220.0)
    xr.soft += _MU_SOFT * width * np.sqrt(np.clip(1.0 - ((u - centre) / half_depth) ** 2, 0.0, 1.0))

    lung = np.zeros_like(xr.soft)
    for dome_shift in (0.0, 14.0):  # right and left lungs superimpose; domes differ slightly
        anterior = -100.0 + 0.04 * (v - 60.0)
        posterior = 90.0 - 0.02 * np.abs(v - 220.0)
        apex = 40.0 + 0.01 * (u - 10.0) ** 2
        # Domes peak in the anterior third and sweep down into the deep posterior sulcus.
        dome = (
            258.0
            + dome_shift
            + np.where(u > -45.0, 88.0 * ((u + 45.0) / 135.0) ** 2, 14.0 * ((u + 45.0) / 55.0) ** 2)
        )
        inside = (
            _soft_step(v - apex)
            * _soft_step(u - anterior)
            * _soft_step(posterior - u)
            * _soft_step(dome - v, 1.0)
        )
        vertical = np.sqrt(np.clip((v - apex) / 80.0, 0.0, 1.0)) * (
            0.5 + 0.5 * np.clip((dome - v) / 50.0, 0.0, 1.0)
        )
        across = np.sqrt(np.clip(1.0 - ((u + 5.0) / 110.0) ** 2, 0.15, 1.0))
        lung += inside * 105.0 * vertical * across
    heart = np.maximum(
        xr.ellipse(-42.0, 264.0, 56.0, 62.0, -15.0), xr.ellipse(-8.0, 236.0, 30.0, 30.0)
    )
    aorta = np.maximum.reduce(
        [
            xr.capsule((-38.0, 205.0), (-24.0, 158.0), 12.0),
            xr.capsule((-24.0, 158.0), (8.0, 146.0), 11.0),
            xr.capsule((8.0, 146.0), (30.0, 176.0), 10.5),
            xr.capsule((30.0, 176.0), (32.0, 300.0), 10.0),
        ]
    )
    hilum = xr.ellipse(4.0, 200.0, 20.0, 24.0)
    lung *= (1.0 - 0.78 * heart) * (1.0 - 0.15 * aorta) * (1.0 - 0.25 * hilum)
    xr.soft -= _MU_SOFT * 0.82 * lung
    xr.lung = np.clip(lung / 60.0, 0.0, 1.0)
    _add_lung_texture(xr, lung, 12, 0.03)
    xr.soft -= _MU_SOFT * 0.9 * 18.0 * xr.capsule((-12.0, -10.0), (6.0, 185.0), 8.5)  # trachea
    xr.soft -= _MU_SOFT * 0.9 * 30.0 * xr.ellipse(-30.0, 292.0, 24.0, 10.0)  # gastric bubble

    front = 22.0 + 12.0 * np.sin(np.pi * v / 500.0)  # anterior border of the vertebral bodies
    vertebra = (v - 30.0) % 26.0
    within_body = _soft_step(u - front) * _soft_step(front + 32.0 - u)
    body = within_body * (0.7 + 0.3 * _soft_step(np.abs(vertebra - 2.0) - 2.0, 0.6))
    endplate = within_body * _soft_step(1.5 - np.abs(np.abs(vertebra - 2.0) - 3.5), 0.6)
    posterior_elements = _soft_step(u - front - 36.0) * _soft_step(front + 72.0 - u)
    xr.soft += 0.55 * body + 0.25 * endplate + 0.25 * posterior_elements

    sternum = [(-114.0, 74.0), (-110.0, 120.0), (-106.0, 190.0), (-101.0, 258.0)]
    xr.add_tube(xr.bone, sternum, 5.0, 1.6, _MU_BONE * 0.6)
    for shift, scale in ((0.0, 1.0), (7.0, 1.06)):  # near- and far-side ribs (magnified)
        for k in range(10):
            v0 = 60.0 + 23.0 * k + shift
            us = np.linspace(86.0, -86.0, 24)
            t = (86.0 - us) / 172.0
            vs = v0 + scale * (70.0 * t**1.4 - 10.0 * np.sin(np.pi * t))
            xr.add_tube(xr.bone, np.column_stack([us, vs]), 4.5, 1.2, _MU_BONE * 0.4)
    rng = np.random.default_rng(8)
    xr.add_vessel_tree((4.0, 200.0), (-2.6, -2.0, -1.3, -0.5, 0.3, 1.2, 2.0), rng, radius=2.4)
    xr.add_marker("L", -160.0, 22.0)
    return xr


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    """Build a Code Sequence Macro item."""
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


_XR_VIEWS = {
    "PA": ("PA", ["L", "F"], _code("272479007", "SCT", "postero-anterior")),
    "LL": ("LL", ["P", "F"], _code("399173006", "SCT", "left lateral")),
}


def _dx_dataset(series: _Series, instance: int, pixels: np.ndarray, view: str) -> Dataset:
    """Build one DX For Presentation chest image (MONOCHROME1, 12 bits)."""
    ds = _base_dataset(series, instance)
    position, orientation, view_code = _XR_VIEWS[view]
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.ViewPosition = position
    ds.ViewCodeSequence = DicomSequence([view_code])
    ds.PatientOrientation = orientation
    ds.ImageLaterality = "U"
    ds.AnatomicRegionSequence = DicomSequence([_code("816094009", "SCT", "Chest")])
    ds.KVP = "120" if view == "PA" else "125"
    ds.ExposureTime = 8 if view == "PA" else 16
    ds.XRayTubeCurrent = 320
    ds.DistanceSourceToDetector = "1800"
    ds.DistanceSourceToPatient = "1650"
    ds.EstimatedRadiographicMagnificationFactor = "1.09"
    ds.DetectorType = "SCINTILLATOR"
    ds.ImagerPixelSpacing = [_ds_number(_XR_PIXEL_MM)] * 2
    _set_monochrome_pixels(ds, pixels, 12, "MONOCHROME1")
    ds.PixelIntensityRelationship = "LOG"
    ds.PixelIntensityRelationshipSign = 1
    ds.RescaleIntercept = "0"
    ds.RescaleSlope = "1"
    ds.RescaleType = "US"
    ds.WindowCenter = "2150"
    ds.WindowWidth = "3300"
    ds.WindowCenterWidthExplanation = "DEFAULT"
    ds.LossyImageCompression = "00"
    return ds


def _write_chest_radiographs(
    out_dir: pathlib.Path,
    study: _Study,
    views: Sequence[str],
    transfer_syntax_uid: str,
    progress: Progress | None,
    heart_scale: float = 1.0,
) -> list[pathlib.Path]:
    """Write a chest radiograph series with one instance per view."""
    series = _Series(
        study,
        1,
        "DX",
        "CHEST " + "/".join(views),
        DigitalXRayImageStorageForPresentation,
        "DemoMed",
        "SynthDR 43",
        study.time,
    )
    paths = []
    for instance, view in enumerate(views, start=1):
        xr = _chest_pa(heart_scale) if view == "PA" else _chest_lateral()
        ds = _dx_dataset(series, instance, xr.detector_image(f"{study.key}-{view}"), view)
        paths.append(_write_part10(ds, out_dir / f"IM{instance:04d}.dcm", transfer_syntax_uid))
        if progress is not None:
            progress(1)
    return paths


# --------------------------------------------------------------------------------------
# Colour Doppler ultrasound cine
# --------------------------------------------------------------------------------------

_US_ROWS, _US_COLS, _US_FRAMES, _US_FPS = 480, 640, 40, 20
_US_MM_PER_PX = 0.4
_US_FOOTPRINT_PX = 100  # curvilinear probe: virtual apex 40 mm behind the skin line
_US_APEX = (320.0, 40.0 - _US_FOOTPRINT_PX)  # (column, row) of the virtual apex, above the image
_US_DEPTH_PX = 400  # 16 cm imaging depth
_US_HALF_ANGLE = math.radians(30.0)
_US_BEAMS = 256
# Vessels as (start, end, radius) in tissue mm; the portal vein dips toward the hilum so its
# flow has a usable Doppler angle to the beams.
_PORTAL_VEIN = ((-72.0, 50.0), (8.0, 88.0), 6.0)
_PORTAL_BRANCH = ((8.0, 88.0), (54.0, 98.0), 4.0)
_HEPATIC_VEIN = ((-12.0, 132.0), (62.0, 62.0), 4.2)


def _segment_distance(
    x: FloatArray, y: FloatArray, p0: tuple[float, float], p1: tuple[float, float]
) -> tuple[FloatArray, FloatArray]:
    """Distance to a segment and the (unclamped) position along it, both in mm."""
    sx, sy = p1[0] - p0[0], p1[1] - p0[1]
    length = math.hypot(sx, sy)
    along = ((x - p0[0]) * sx + (y - p0[1]) * sy) / length
    t = np.clip(along / length, 0.0, 1.0)
    return np.hypot(x - p0[0] - t * sx, y - p0[1] - t * sy), along


def _us_tissue(x: FloatArray, y: FloatArray, depth: FloatArray) -> FloatArray:
    """Echogenicity of a liver scan (tissue mm: x lateral, y below the skin; polar grid)."""
    echo = np.full(np.broadcast_shapes(x.shape, y.shape), 0.8, np.float32)
    echo = np.where(depth < 1.5, 1.6, echo)  # skin
    echo = np.where(
        (depth >= 1.5) & (depth < 12.0),
        0.35 + 0.5 * (np.sin(depth * 1.3 + np.sin(x * 0.08) * 3.0) > 0.95),
        echo,
    )
    echo = np.where(
        (depth >= 12.0) & (depth < 24.0), 0.55 + 0.22 * np.sin(depth * 3.0 + x * 0.05), echo
    )
    echo = np.where((depth >= 24.0) & (depth < 25.6), 1.8, echo)  # liver capsule
    diaphragm = 140.0 - 0.004 * x * x
    echo = np.where(np.abs(y - diaphragm) < 1.6, 2.3, echo)
    echo = np.where(y > diaphragm + 1.6, 0.55, echo)  # mirror-image artefact beyond it
    lumen = np.zeros(echo.shape, bool)
    for (p0, p1, radius), wall in (
        (_PORTAL_VEIN, True),
        (_PORTAL_BRANCH, True),
        (_HEPATIC_VEIN, False),
    ):
        distance, along = _segment_distance(x, y, p0, p1)
        # Veins taper toward the periphery (their end point).
        local = radius * (
            1.0 - 0.4 * np.clip(along / math.hypot(p1[0] - p0[0], p1[1] - p0[1]), 0.0, 1.0)
        )
        if wall:  # portal veins have echogenic walls, hepatic veins do not
            echo = np.where(np.abs(distance - local - 0.9) < 0.9, 1.9, echo)
        lumen |= distance < local
    echo = np.where(lumen, 0.02, echo)
    # Posterior acoustic enhancement below fluid-filled vessels (beams run along axis 0).
    behind = np.maximum.accumulate(lumen, axis=0) & ~lumen
    echo = np.where(behind & (y < diaphragm), echo * 1.25, echo)
    return echo * (1.0 - 0.002 * depth)  # imperfect depth gain compensation


def _us_portal_flow(
    x: FloatArray, y: FloatArray, beam_x: FloatArray, beam_y: FloatArray, frame: int
) -> FloatArray:
    """Doppler velocity toward the probe (cm/s) in the portal vein; a bolus travels along it."""
    velocity = np.zeros(np.broadcast_shapes(x.shape, y.shape), np.float32)
    centre = 110.0 - 4.0 * (frame % 30)  # the bolus moves along the vein, frame by frame
    pulse = 0.85 + 0.15 * math.sin(2 * math.pi * frame / 20.0)
    for p0, p1, radius in (_PORTAL_VEIN, _PORTAL_BRANCH):
        distance, along = _segment_distance(x, y, p0, p1)
        length = math.hypot(p1[0] - p0[0], p1[1] - p0[1])
        ux, uy = (p1[0] - p0[0]) / length, (p1[1] - p0[1]) / length
        offset = (
            0.0
            if p0 == _PORTAL_VEIN[0]
            else math.hypot(*np.subtract(_PORTAL_VEIN[1], _PORTAL_VEIN[0]))
        )
        bolus = 0.35 + 0.65 * np.exp(-(((along + offset - centre) / 16.0) ** 2))
        local = radius * (1.0 - 0.4 * np.clip(along / length, 0.0, 1.0))
        speed = 42.0 * np.clip(1.0 - (distance / local) ** 2, 0.0, 1.0) * bolus * pulse
        toward = ux * beam_x + uy * beam_y  # flow runs end -> start, up toward the probe
        velocity = np.where(distance < local, speed * toward, velocity)
    return velocity


def _doppler_colour(velocity: FloatArray) -> FloatArray:
    """Colour map: dark red to yellow toward the probe, dark blue to cyan away (RGB 0..255)."""
    level = np.clip(np.abs(velocity) / 20.0, 0.0, 1.0)
    toward = np.stack([110.0 + 145.0 * level, 190.0 * level**2, 10.0 * level], axis=-1)
    away = np.stack([10.0 * level, 170.0 * level**2, 110.0 + 145.0 * level], axis=-1)
    return np.where((velocity > 0)[..., None], toward, away).astype(np.float32)


def _us_overlay() -> tuple[np.ndarray, np.ndarray]:
    """Burned-in annotation layer (RGB, mask): labels, depth scale and colour bar."""
    image = Image.new("RGB", (_US_COLS, _US_ROWS), (0, 0, 0))
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=13)
    text_colour = (215, 215, 215)
    for row, text in enumerate(
        ("DEMO GENERAL HOSPITAL", "C5-1  Abdomen", "Liver  Color", "4.0 MHz  D 16 cm")
    ):
        draw.text((8, 6 + 16 * row), text, fill=text_colour, font=font)
    for row, text in enumerate(("FR 20 Hz", "Gn 52", "CF 62%  PRF 1.5k", "MI 1.1  TIS 0.4")):
        draw.text((8, 400 + 16 * row), text, fill=text_colour, font=font)
    for cm in range(17):  # depth scale beside the sector, one tick per centimetre
        tick = _US_APEX[1] + _US_FOOTPRINT_PX + cm * 10.0 / _US_MM_PER_PX
        size = 4 if cm % 5 == 0 else 2
        draw.rectangle((582, tick - size / 2, 582 + size, tick + size / 2), fill=text_colour)
        if cm % 5 == 0 and cm:
            draw.text((592, tick - 7), str(cm), fill=text_colour, font=font)
    bar = _doppler_colour(np.linspace(20.0, -20.0, 100)).astype(np.uint8)
    bar[48:52] = 0  # no colour around zero velocity (wall filter)
    for i, colour in enumerate(bar):
        draw.line((614, 70 + i, 626, 70 + i), fill=tuple(int(c) for c in colour))
    draw.text((604, 52), "+20", fill=text_colour, font=font)
    draw.text((606, 174), "-20", fill=text_colour, font=font)
    draw.text((598, 190), "cm/s", fill=text_colour, font=font)
    rgb = np.asarray(image, np.uint8)
    return rgb, np.asarray(rgb.any(axis=-1), bool)


def _render_us_cine(seed: str) -> np.ndarray:
    """Render the sector-scan colour Doppler cine as uint8 RGB frames (F, rows, cols, 3)."""
    rng = _rng(seed, "speckle")
    margin = 24  # extra depth samples so the speckle can slide with the breathing liver

    def speckle_field() -> FloatArray:
        # Complex Gaussian scatter, correlated over a few samples (pulse length, beam width).
        field = rng.standard_normal((_US_DEPTH_PX + 2 * margin, _US_BEAMS, 2)).astype(np.float32)
        for shift in (1, 2):
            field = field + np.roll(field, shift, axis=0)
        for _ in range(2):
            field = field + np.roll(field, 1, axis=1) + np.roll(field, -1, axis=1)
        amplitude: FloatArray = np.hypot(field[..., 0], field[..., 1])
        normalised: FloatArray = amplitude / amplitude.mean()
        return normalised

    speckle, drift = speckle_field(), speckle_field()
    radius = (_US_FOOTPRINT_PX + np.arange(_US_DEPTH_PX, dtype=np.float32))[:, None]
    theta = np.linspace(-_US_HALF_ANGLE, _US_HALF_ANGLE, _US_BEAMS, dtype=np.float32)[None, :]
    depth_mm = (radius - _US_FOOTPRINT_PX) * _US_MM_PER_PX
    x_mm = radius * _US_MM_PER_PX * np.sin(theta)
    y_mm = radius * _US_MM_PER_PX * np.cos(theta) - _US_FOOTPRINT_PX * _US_MM_PER_PX

    # Scan conversion: each display pixel samples the polar grid (linear across beams).
    rows = np.arange(_US_ROWS, dtype=np.float32)[:, None] - _US_APEX[1]
    cols = np.arange(_US_COLS, dtype=np.float32)[None, :] - _US_APEX[0]
    pix_r = np.hypot(rows, cols)
    pix_theta = np.arctan2(cols, rows)
    sector = (
        (pix_r >= _US_FOOTPRINT_PX)
        & (pix_r < _US_FOOTPRINT_PX + _US_DEPTH_PX - 1)
        & (np.abs(pix_theta) <= _US_HALF_ANGLE)
    )
    beam = (pix_theta + _US_HALF_ANGLE) / (2 * _US_HALF_ANGLE) * (_US_BEAMS - 1)
    b0 = np.clip(np.floor(beam).astype(np.int32), 0, _US_BEAMS - 2)
    wb = np.clip(beam - b0, 0.0, 1.0)
    r_idx = np.clip(np.rint(pix_r - _US_FOOTPRINT_PX).astype(np.int32), 0, _US_DEPTH_PX - 1)
    beam_x, beam_y = np.sin(pix_theta), np.cos(pix_theta)
    pix_x = pix_r * _US_MM_PER_PX * beam_x
    pix_y = pix_r * _US_MM_PER_PX * beam_y - _US_FOOTPRINT_PX * _US_MM_PER_PX

    box_theta = (math.radians(-20.0), math.radians(6.0))
    box_r = (_US_FOOTPRINT_PX + 45.0 / _US_MM_PER_PX, _US_FOOTPRINT_PX + 100.0 / _US_MM_PER_PX)
    in_theta = (pix_theta > box_theta[0]) & (pix_theta < box_theta[1])
    in_depth = (pix_r > box_r[0]) & (pix_r < box_r[1])
    in_box = in_theta & in_depth & sector
    arcs = (np.minimum(np.abs(pix_r - box_r[0]), np.abs(pix_r - box_r[1])) < 0.7) & in_theta
    edges = (
        np.minimum(np.abs(pix_theta - box_theta[0]), np.abs(pix_theta - box_theta[1])) * pix_r < 0.7
    ) & in_depth
    outline = (arcs | edges) & sector
    overlay, overlay_mask = _us_overlay()

    frames = np.zeros((_US_FRAMES, _US_ROWS, _US_COLS, 3), np.uint8)
    for frame in range(_US_FRAMES):
        breath = 5.0 * math.sin(2 * math.pi * frame / _US_FRAMES)  # liver slides with respiration
        shift = round(breath / _US_MM_PER_PX)
        mix = 0.3 * math.sin(math.pi * frame / _US_FRAMES)  # slow speckle decorrelation
        scatter = (1 - mix) * speckle[margin - shift : margin - shift + _US_DEPTH_PX] + mix * drift[
            margin:-margin
        ]
        signal = _us_tissue(x_mm, y_mm - breath, depth_mm) * scatter
        grey = np.clip((20.0 * np.log10(signal + 1e-3) + 34.0) / 46.0, 0.0, 1.0) * 240.0
        grey = grey[r_idx, b0] * (1 - wb) + grey[r_idx, b0 + 1] * wb
        image = np.repeat(np.where(sector, grey, 0.0)[..., None], 3, axis=-1)
        velocity = _us_portal_flow(pix_x, pix_y - breath, beam_x, beam_y, frame)
        flow = in_box & (np.abs(velocity) > 1.5)  # wall filter
        image[flow] = _doppler_colour(velocity[flow])
        image[outline] = 190.0
        image[overlay_mask] = overlay[overlay_mask]
        frames[frame] = np.clip(image, 0, 255).astype(np.uint8)
    return frames


def _us_regions() -> DicomSequence:
    """Calibration of the 2-D sector so viewers can measure in centimetres."""
    region = Dataset()
    region.RegionSpatialFormat = 1  # 2D tissue image
    region.RegionDataType = 2  # colour flow
    region.RegionFlags = 0
    outer = _US_FOOTPRINT_PX + _US_DEPTH_PX
    region.RegionLocationMinX0 = int(_US_APEX[0] - math.sin(_US_HALF_ANGLE) * outer)
    region.RegionLocationMinY0 = int(_US_APEX[1] + math.cos(_US_HALF_ANGLE) * _US_FOOTPRINT_PX)
    region.RegionLocationMaxX1 = math.ceil(_US_APEX[0] + math.sin(_US_HALF_ANGLE) * outer)
    region.RegionLocationMaxY1 = int(_US_APEX[1] + outer)
    region.PhysicalUnitsXDirection = 3  # cm
    region.PhysicalUnitsYDirection = 3
    region.PhysicalDeltaX = _US_MM_PER_PX / 10.0
    region.PhysicalDeltaY = _US_MM_PER_PX / 10.0
    return DicomSequence([region])


def _jpeg_baseline_frames(frames: np.ndarray) -> list[bytes]:
    """Encode RGB frames as baseline JPEG with 4:2:2 chroma (DICOM YBR_FULL_422)."""
    encoded = []
    for frame in frames:
        buffer = io.BytesIO()
        Image.fromarray(frame, "RGB").save(buffer, format="JPEG", quality=90, subsampling=1)
        encoded.append(buffer.getvalue())
    return encoded


def _write_us_cine(
    out_dir: pathlib.Path, study: _Study, progress: Progress | None
) -> list[pathlib.Path]:
    """Write the colour Doppler liver cine as one JPEG Baseline multi-frame instance."""
    series = _Series(
        study,
        1,
        "US",
        "LIVER COLOR DOPPLER CINE",
        UltrasoundMultiFrameImageStorage,
        "DemoMed",
        "SynthUS 5",
        study.time,
    )
    frames = _render_us_cine(study.key)
    encoded = _jpeg_baseline_frames(frames)
    ds = _base_dataset(series, 1)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "ABDOMINAL", "0011"]  # 0011: 2D + colour flow
    ds.BurnedInAnnotation = "YES"  # only technical labels, no patient identifiers
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "YBR_FULL_422"
    ds.PlanarConfiguration = 0
    ds.NumberOfFrames = len(encoded)
    ds.Rows, ds.Columns = _US_ROWS, _US_COLS
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.FrameIncrementPointer = pydicom.tag.Tag("FrameTime")
    ds.FrameTime = _ds_number(1000.0 / _US_FPS)
    ds.CineRate = _US_FPS
    ds.RecommendedDisplayFrameRate = _US_FPS
    ds.ActualFrameDuration = int(1000 / _US_FPS)
    ds.TransducerData = ["C5-1", "", ""]
    ds.TransducerType = "CURVED LINEAR"
    ds.SequenceOfUltrasoundRegions = _us_regions()
    raw_size = frames.size
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionRatio = _ds_number(round(raw_size / sum(map(len, encoded)), 2))
    ds.LossyImageCompressionMethod = "ISO_10918_1"
    ds.PixelData = encapsulate(encoded)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    path = _write_part10(ds, out_dir / "IM0001.dcm", JPEGBaseline8Bit, encapsulated=True)
    if progress is not None:
        progress(1)
    return [path]


# --------------------------------------------------------------------------------------
# MR brain and CT head studies
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class _MRProtocol:
    """Acquisition parameters of one MR series."""

    description: str
    plane: str  # "axial" or "sagittal"
    slices: int
    first: float  # position of the first slice centre along the slice normal (mm)
    step: float
    thickness: float
    fov: float
    table: FloatArray
    tr: float
    te: float
    flip: float
    echo_train: int
    variant: str


_MR_SIZE = 256
_MR_PROTOCOLS = (
    _MRProtocol(
        "AX T2 TSE", "axial", 24, -60.0, 6.0, 5.0, 230.0, _HEAD_T2, 4200.0, 98.0, 150.0, 15, "SK"
    ),
    _MRProtocol(
        "SAG T1 SE", "sagittal", 20, -47.5, 5.0, 4.0, 240.0, _HEAD_T1, 520.0, 12.0, 90.0, 1, "SP"
    ),
)


def _mr_dataset(
    series: _Series, protocol: _MRProtocol, index: int, pixels: np.ndarray, position: float
) -> Dataset:
    """Build one MR image of a 2-D spin-echo series with full geometry."""
    ds = _base_dataset(series, index + 1)
    spacing = protocol.fov / _MR_SIZE
    corner = -(_MR_SIZE - 1) / 2.0 * spacing
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
    ds.ScanningSequence = "SE"
    ds.SequenceVariant = protocol.variant
    ds.ScanOptions = ""
    ds.MRAcquisitionType = "2D"
    ds.SequenceName = "tse2d" if protocol.echo_train > 1 else "se2d"
    ds.SliceThickness = _ds_number(protocol.thickness)
    ds.RepetitionTime = _ds_number(protocol.tr)
    ds.EchoTime = _ds_number(protocol.te)
    ds.NumberOfAverages = "2"
    ds.ImagingFrequency = "63.87"
    ds.ImagedNucleus = "1H"
    ds.MagneticFieldStrength = "1.5"
    ds.SpacingBetweenSlices = _ds_number(protocol.step)
    ds.EchoTrainLength = protocol.echo_train
    ds.FlipAngle = _ds_number(protocol.flip)
    ds.PixelBandwidth = "190"
    ds.ReceiveCoilName = "HEAD 16"
    ds.AcquisitionMatrix = [0, _MR_SIZE, _MR_SIZE, 0]
    ds.PatientPosition = "HFS"
    if protocol.plane == "axial":
        ds.ImagePositionPatient = [_ds_number(corner), _ds_number(corner), _ds_number(position)]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    else:  # sagittal: rows run anterior -> posterior, columns head -> feet
        ds.ImagePositionPatient = [_ds_number(position), _ds_number(corner), _ds_number(-corner)]
        ds.ImageOrientationPatient = ["0", "1", "0", "0", "0", "-1"]
    ds.SliceLocation = _ds_number(position)
    ds.FrameOfReferenceUID = _uid(series.study.key, "frame-of-reference")
    ds.PositionReferenceIndicator = ""
    ds.PixelSpacing = [_ds_number(spacing), _ds_number(spacing)]
    _set_monochrome_pixels(ds, pixels, 12, "MONOCHROME2")
    ds.WindowCenter = "900" if protocol.plane == "axial" else "700"
    ds.WindowWidth = "1900" if protocol.plane == "axial" else "1400"
    return ds


def _write_mr_series(
    out_dir: pathlib.Path,
    study: _Study,
    number: int,
    protocol: _MRProtocol,
    transfer_syntax_uid: str,
    progress: Progress | None,
) -> list[pathlib.Path]:
    """Render and write one MR brain series."""
    series = _Series(
        study,
        number,
        "MR",
        protocol.description,
        MRImageStorage,
        "DemoMed",
        "SynthMR 1.5T",
        study.time,
    )
    positions = [protocol.first + i * protocol.step for i in range(protocol.slices)]
    images = _render_mr(
        protocol.plane, positions, _MR_SIZE, protocol.fov, protocol.table, f"{study.key}-{number}"
    )

    def write(index: int) -> pathlib.Path:
        ds = _mr_dataset(series, protocol, index, images[index], positions[index])
        return _write_part10(
            ds, out_dir / f"S{number:03d}" / f"IM{index + 1:04d}.dcm", transfer_syntax_uid
        )

    return _run_writes(write, len(positions), progress, transfer_syntax_uid)


def _write_head_ct(
    out_dir: pathlib.Path,
    study: _Study,
    slices: int,
    transfer_syntax_uid: str,
    progress: Progress | None,
) -> list[pathlib.Path]:
    """Render and write a non-contrast head CT series (3 mm axial)."""
    volume, spacing, z_positions = _render_head_ct(slices, study.key)
    series = _Series(
        study, 2, "CT", "AXIAL 3MM BRAIN", CTImageStorage, "DemoMed", "SynthCT 128", study.time
    )
    return _write_ct_volume(
        out_dir,
        series,
        volume,
        spacing,
        list(z_positions),
        3.0,
        "H30s",
        _CT_HEAD_WINDOWS,
        transfer_syntax_uid,
        progress,
    )


def _write_body_ct_study(
    out_dir: pathlib.Path, study: _Study, progress: Progress | None
) -> list[pathlib.Path]:
    """Write the body CT: a 2.5 mm soft-tissue series plus a 5 mm lung-kernel series (RLE)."""
    slices = 150
    volume, pixel_spacing, levels, spacing = _render_body_ct(slices, 512, study.key)
    z = [_z_for_level(level) for level in levels]
    soft = _ct_body_series(study, 2, "AXIAL 2.5MM SOFT TISSUE")
    paths = _write_ct_volume(
        out_dir / "S002",
        soft,
        volume,
        pixel_spacing,
        z,
        spacing,
        "STANDARD",
        _CT_BODY_WINDOWS,
        ExplicitVRLittleEndian,
        progress,
    )
    # Thick slabs: average neighbouring slices, then sharpen like a lung reconstruction kernel.
    pairs = (
        volume[: slices // 2 * 2]
        .reshape(slices // 2, 2, *volume.shape[1:])
        .astype(np.float32)
        .mean(axis=1)
    )
    sharp = np.stack([slab + 0.8 * (slab - _box3(slab)) for slab in pairs])
    thick = np.clip(np.rint(sharp), -1024, 3071).astype(np.int16)
    lung_windows = (_CT_BODY_WINDOWS[1], _CT_BODY_WINDOWS[0], _CT_BODY_WINDOWS[2])
    lung = _ct_body_series(study, 3, "AXIAL 5MM LUNG", "094712")
    thick_z = [(z[2 * i] + z[2 * i + 1]) / 2.0 for i in range(len(thick))]
    paths += _write_ct_volume(
        out_dir / "S003",
        lung,
        thick,
        pixel_spacing,
        thick_z,
        2 * spacing,
        "LUNG",
        lung_windows,
        RLELossless,
        progress,
    )
    return paths


# --------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------


def generate_demo_set(
    out_dir: pathlib.Path, progress: Callable[[int], None] | None = None
) -> list[pathlib.Path]:
    """Write the whole demo set into ``out_dir`` and return the file paths.

    Parameters
    ----------
    out_dir : pathlib.Path
        Target directory; one sub-directory per study is created.
    progress : callable, optional
        Called with the number of files written since the previous call.

    Returns
    -------
    list[pathlib.Path]
        All written DICOM Part 10 files.
    """
    out_dir = pathlib.Path(out_dir)
    paths = _write_body_ct_study(out_dir / _CT_BODY_STUDY.key, _CT_BODY_STUDY, progress)
    paths += _write_chest_radiographs(
        out_dir / _XR_CHEST_STUDY.key / "S001",
        _XR_CHEST_STUDY,
        ("PA", "LL"),
        JPEGLSLossless,
        progress,
    )
    paths += _write_chest_radiographs(
        out_dir / _XR_CHEST_PA_STUDY.key / "S001",
        _XR_CHEST_PA_STUDY,
        ("PA",),
        JPEG2000Lossless,
        progress,
        heart_scale=1.3,  # this patient has an enlarged heart, so the two radiographs differ
    )
    for number, protocol in enumerate(_MR_PROTOCOLS, start=1):
        paths += _write_mr_series(
            out_dir / _MR_BRAIN_STUDY.key,
            _MR_BRAIN_STUDY,
            number,
            protocol,
            JPEG2000Lossless,
            progress,
        )
    paths += _write_us_cine(out_dir / _US_LIVER_STUDY.key / "S001", _US_LIVER_STUDY, progress)
    paths += _write_head_ct(
        out_dir / _CT_HEAD_STUDY.key / "S002", _CT_HEAD_STUDY, 40, JPEGLosslessSV1, progress
    )
    return paths


def _candidate_sample_paths() -> Iterator[pathlib.Path]:
    """Yield files shipped with pydicom and (if installed) the pydicom-data wheel.

    The folders are listed directly: pydicom's ``get_testdata_files`` may try to download
    missing files, and nothing here may reach beyond this machine.
    """
    yield from (pathlib.Path(pydicom.__file__).parent / "data" / "test_files").rglob("*")
    try:
        import data_store  # the pydicom-data wheel; pydicom also finds it via an entry point
    except ImportError:
        return
    yield from pathlib.Path(data_store.__file__).parent.rglob("*")


def sample_files() -> list[pathlib.Path]:
    """Return pydicom's and pydicom-data's bundled DICOM Part 10 files (by unique file name)."""
    by_name: dict[str, pathlib.Path] = {}
    for path in sorted(_candidate_sample_paths()):
        if path.name in by_name or not path.is_file():
            continue
        with path.open("rb") as handle:
            header = handle.read(132)
        if len(header) == 132 and header[128:132] == b"DICM":
            by_name[path.name] = path
    return sorted(by_name.values())
