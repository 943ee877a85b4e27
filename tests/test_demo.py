"""Tests for the deterministic demo DICOM set generator (demo.studies)."""

from __future__ import annotations

import collections
import collections.abc
import dataclasses
import json
import logging
import os
import pathlib
import shutil
import sqlite3
import subprocess
import sys

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    MRImageStorage,
    RLELossless,
    UltrasoundMultiFrameImageStorage,
)

from demo import studies as demo

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
_REGENERATE = (
    "import pathlib, sys; from demo.studies import generate_demo_set; "
    "generate_demo_set(pathlib.Path(sys.argv[1]))"
)


@dataclasses.dataclass(frozen=True)
class GeneratedSet:
    """One generated demo set plus what a second, independent run produced."""

    root: pathlib.Path
    paths: list[pathlib.Path]
    progress_calls: list[int]
    datasets: dict[pathlib.Path, Dataset]
    second_root: pathlib.Path

    def series(
        self, predicate: collections.abc.Callable[[Dataset], bool]
    ) -> dict[str, list[Dataset]]:
        """Datasets matching ``predicate`` grouped by series, each sorted by InstanceNumber."""
        grouped: dict[str, list[Dataset]] = collections.defaultdict(list)
        for ds in self.datasets.values():
            if predicate(ds):
                grouped[ds.SeriesInstanceUID].append(ds)
        return {
            uid: sorted(items, key=lambda d: int(d.InstanceNumber))
            for uid, items in grouped.items()
        }


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> GeneratedSet:
    """Generate the demo set once; a child process regenerates it concurrently for the UID check."""
    first = tmp_path_factory.mktemp("demo-first")
    second = tmp_path_factory.mktemp("demo-second")
    # Running the second generation in parallel keeps the suite fast on two cores.
    child = subprocess.Popen(
        [sys.executable, "-c", _REGENERATE, str(second)],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    calls: list[int] = []
    try:
        paths = demo.generate_demo_set(first, progress=calls.append)
    finally:
        _out, err = child.communicate(timeout=600)
    assert child.returncode == 0, err
    datasets: dict[pathlib.Path, Dataset] = {path: pydicom.dcmread(path) for path in paths}
    return GeneratedSet(first, paths, calls, datasets, second)


def test_progress_reports_every_written_file(generated: GeneratedSet) -> None:
    assert generated.paths, "nothing was generated"
    assert all(isinstance(n, int) and n > 0 for n in generated.progress_calls)
    assert sum(generated.progress_calls) == len(generated.paths)
    assert len(set(generated.paths)) == len(generated.paths)
    assert all(path.is_relative_to(generated.root) for path in generated.paths)


def test_every_file_is_dicom_part10(generated: GeneratedSet) -> None:
    for path, ds in generated.datasets.items():
        with path.open("rb") as handle:
            header = handle.read(132)
        assert header[:128] == bytes(128), f"{path}: preamble is not zero"
        assert header[128:] == b"DICM", f"{path}: missing DICM magic"
        meta = ds.file_meta
        assert meta.MediaStorageSOPClassUID == ds.SOPClassUID
        assert meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert meta.TransferSyntaxUID
        assert meta.ImplementationClassUID


def test_sop_instance_uids_are_unique(generated: GeneratedSet) -> None:
    uids = [ds.SOPInstanceUID for ds in generated.datasets.values()]
    assert len(set(uids)) == len(uids)


def test_generating_twice_gives_identical_uids(generated: GeneratedSet) -> None:
    second = {
        path.relative_to(generated.second_root): pydicom.dcmread(path, stop_before_pixels=True)
        for path in generated.second_root.rglob("*.dcm")
    }
    first = {path.relative_to(generated.root): ds for path, ds in generated.datasets.items()}
    assert first.keys() == second.keys()
    for relative, ds in first.items():
        other = second[relative]
        assert other.SOPInstanceUID == ds.SOPInstanceUID, relative
        assert other.SeriesInstanceUID == ds.SeriesInstanceUID, relative
        assert other.StudyInstanceUID == ds.StudyInstanceUID, relative


def test_large_axial_ct_series_has_real_geometry(generated: GeneratedSet) -> None:
    series = generated.series(lambda d: d.SOPClassUID == CTImageStorage)
    big = [items for items in series.values() if len(items) >= 150]
    assert big, "no CT series with 150+ slices"
    slices = big[0]
    first = slices[0]
    assert (first.Rows, first.Columns) == (512, 512)
    assert first.PhotometricInterpretation == "MONOCHROME2"
    assert (first.BitsAllocated, first.BitsStored) == (16, 12)
    if first.PixelRepresentation == 0:
        assert float(first.RescaleIntercept) == -1024.0
        assert float(first.RescaleSlope) == 1.0
    z = [float(ds.ImagePositionPatient[2]) for ds in slices]
    steps = np.diff(z)
    assert np.all(steps < 0) or np.all(steps > 0), (
        "ImagePositionPatient z is not strictly monotonic"
    )
    assert np.allclose(np.abs(steps), float(first.SliceThickness), atol=1e-3)
    assert all(
        [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0] for ds in slices
    )
    assert len({ds.FrameOfReferenceUID for ds in slices}) == 1
    assert all(
        float(ds.SliceLocation) == pytest.approx(float(ds.ImagePositionPatient[2])) for ds in slices
    )
    assert len({tuple(float(v) for v in ds.PixelSpacing) for ds in slices}) == 1
    centres = [float(c) for c in first.WindowCenter]
    widths = [float(w) for w in first.WindowWidth]
    assert len(centres) >= 2 and len(widths) == len(centres)
    assert len(first.WindowCenterWidthExplanation) == len(centres)
    assert 40.0 in centres and -600.0 in centres  # soft tissue and lung presets


def test_ct_pixels_look_like_a_chest(generated: GeneratedSet) -> None:
    series = generated.series(lambda d: d.SOPClassUID == CTImageStorage)
    slices = next(items for items in series.values() if len(items) >= 150)
    chest = slices[len(slices) // 3]
    hu = chest.pixel_array.astype(np.float32) * float(chest.RescaleSlope) + float(
        chest.RescaleIntercept
    )
    total = hu.size
    assert (hu < -950).sum() > 0.2 * total, "expected air around the patient"
    assert (hu < -700).sum() - (hu < -950).sum() > 0.05 * total, "expected aerated lung"
    assert ((hu > -150) & (hu < 150)).sum() > 0.1 * total, "expected soft tissue"
    assert (hu > 500).sum() > 200, "expected bone (spine, ribs)"


def test_chest_radiograph_two_views(generated: GeneratedSet) -> None:
    series = generated.series(lambda d: d.Modality in ("CR", "DX"))
    views = {ds.ViewPosition: ds for items in series.values() if len(items) >= 2 for ds in items}
    assert {"PA", "LL"} <= views.keys() or {"PA", "LAT"} <= views.keys()
    for ds in (ds for items in series.values() for ds in items):
        assert ds.Rows >= 2000 and ds.Columns >= 2000
        assert ds.PhotometricInterpretation == "MONOCHROME1"
        assert ds.BitsStored >= 12
        assert len(ds.ImagerPixelSpacing) == 2 and float(ds.ImagerPixelSpacing[0]) > 0
        if ds.SOPClassUID == DigitalXRayImageStorageForPresentation:
            assert ds.PresentationIntentType == "FOR PRESENTATION"
    pa = views["PA"].pixel_array.astype(np.float32)
    rows, cols = pa.shape
    # MONOCHROME1: the well-exposed lungs have higher values than the mediastinum and abdomen.
    right_lung = pa[int(rows * 0.35) : int(rows * 0.45), int(cols * 0.22) : int(cols * 0.32)].mean()
    left_lung = pa[int(rows * 0.35) : int(rows * 0.45), int(cols * 0.68) : int(cols * 0.78)].mean()
    mediastinum = pa[
        int(rows * 0.35) : int(rows * 0.45), int(cols * 0.48) : int(cols * 0.52)
    ].mean()
    abdomen = pa[int(rows * 0.85) : int(rows * 0.92), int(cols * 0.3) : int(cols * 0.7)].mean()
    assert right_lung > mediastinum + 300 and left_lung > mediastinum + 300
    assert right_lung > abdomen + 300


def test_colour_ultrasound_cine(generated: GeneratedSet) -> None:
    cines = [
        ds
        for ds in generated.datasets.values()
        if ds.SOPClassUID == UltrasoundMultiFrameImageStorage
    ]
    assert cines
    ds = cines[0]
    assert int(ds.NumberOfFrames) >= 30
    assert ds.SamplesPerPixel == 3
    assert float(ds.FrameTime) > 0 and int(ds.CineRate) > 0
    frames = ds.pixel_array
    assert frames.shape == (int(ds.NumberOfFrames), ds.Rows, ds.Columns, 3)
    signed = frames.astype(np.int16)
    red = (signed[..., 0] - np.maximum(signed[..., 1], signed[..., 2])) > 60
    blue = (signed[..., 2] - np.maximum(signed[..., 0], signed[..., 1])) > 60
    assert (red | blue).sum(axis=(1, 2)).min() > 100, "every frame should show Doppler colour"
    # The Doppler signal changes from frame to frame (the bolus moves).
    assert not np.array_equal(red[0] | blue[0], red[len(red) // 2] | blue[len(blue) // 2])


def test_mr_series(generated: GeneratedSet) -> None:
    series = generated.series(lambda d: d.SOPClassUID == MRImageStorage)
    assert any(len(items) >= 20 for items in series.values())
    for items in series.values():
        first = items[0]
        assert (first.Rows, first.Columns) == (256, 256)
        assert first.PhotometricInterpretation == "MONOCHROME2"
        assert float(first.RepetitionTime) > 0 and float(first.EchoTime) > 0
        assert len({tuple(ds.ImageOrientationPatient) for ds in items}) == 1
        positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in items])
        assert np.all(np.linalg.norm(np.diff(positions, axis=0), axis=1) > 0)


def test_transfer_syntaxes(generated: GeneratedSet) -> None:
    syntaxes = {ds.file_meta.TransferSyntaxUID for ds in generated.datasets.values()}
    assert {RLELossless, JPEG2000Lossless, JPEGLSLossless, ExplicitVRLittleEndian} <= syntaxes
    if shutil.which("dcmcjpeg"):
        assert JPEGLosslessSV1 in syntaxes


def test_every_file_decodes_with_expected_shape(generated: GeneratedSet) -> None:
    for path, ds in generated.datasets.items():
        expected: tuple[int, ...] = (ds.Rows, ds.Columns)
        if int(ds.get("NumberOfFrames", 1)) > 1:
            expected = (int(ds.NumberOfFrames), *expected)
        if ds.SamplesPerPixel > 1:
            expected = (*expected, ds.SamplesPerPixel)
        assert ds.pixel_array.shape == expected, path


def test_studies_are_spread_over_patients_and_physicians(generated: GeneratedSet) -> None:
    physicians = {p.name: p for p in demo.DEMO_PHYSICIANS}
    patients = {p.patient_id: p for p in demo.DEMO_PATIENTS}
    studies: dict[str, Dataset] = {}
    for ds in generated.datasets.values():
        studies.setdefault(ds.StudyInstanceUID, ds)
        assert studies[ds.StudyInstanceUID].PatientID == ds.PatientID
        assert studies[ds.StudyInstanceUID].AccessionNumber == ds.AccessionNumber
    assert len({ds.PatientID for ds in studies.values()}) >= 4
    assert len({str(ds.ReferringPhysicianName) for ds in studies.values()}) >= 3
    assert len({ds.StudyDate[:4] for ds in studies.values()}) >= 3
    for ds in studies.values():
        patient = patients[ds.PatientID]
        assert str(ds.PatientName) == patient.name
        assert ds.PatientBirthDate == patient.birth_date and ds.PatientSex == patient.sex
        assert ds.AccessionNumber and ds.StudyID and ds.StudyDescription and ds.InstitutionName
        physician = physicians[str(ds.ReferringPhysicianName)]
        item = ds.ReferringPhysicianIdentificationSequence[0]
        code = item.PersonIdentificationCodeSequence[0]
        assert code.CodeValue == physician.npi
        assert code.CodingSchemeDesignator == "NPI"
        assert code.CodeMeaning
        assert item.InstitutionName
        schemes = {s.CodingSchemeDesignator for s in ds.CodingSchemeIdentificationSequence}
        assert "NPI" in schemes


def _npi_is_valid(npi: str) -> bool:
    """Luhn check over the NPI with its 80840 prefix (CMS rule)."""
    digits = [int(c) for c in "80840" + npi]
    total = 0
    for position, digit in enumerate(reversed(digits)):
        if position % 2 == 1:
            digit *= 2
            digit -= 9 if digit > 9 else 0
        total += digit
    return len(npi) == 10 and npi.isdigit() and total % 10 == 0


def test_demo_people() -> None:
    assert len(demo.DEMO_PHYSICIANS) >= 3
    assert len(demo.DEMO_PATIENTS) >= 4
    for physician in demo.DEMO_PHYSICIANS:
        assert _npi_is_valid(physician.npi), physician
        assert physician.email.endswith("@demo.example")
        assert physician.name.count("^") >= 1
        with pytest.raises(dataclasses.FrozenInstanceError):
            physician.npi = "0"  # type: ignore[misc]
    assert len({p.npi for p in demo.DEMO_PHYSICIANS}) == len(demo.DEMO_PHYSICIANS)
    for patient in demo.DEMO_PATIENTS:
        assert len(patient.birth_date) == 8 and patient.birth_date.isdigit()
        assert patient.sex in {"M", "F", "O"}
    assert len({p.patient_id for p in demo.DEMO_PATIENTS}) == len(demo.DEMO_PATIENTS)
    assert not _npi_is_valid("1234567890")  # the checker itself can fail


def test_write_ct_series_is_deterministic_and_configurable(tmp_path: pathlib.Path) -> None:
    first = demo.write_ct_series(
        tmp_path / "a", slices=4, size=64, transfer_syntax_uid=JPEGLSLossless, uid_seed="bench"
    )
    again = demo.write_ct_series(
        tmp_path / "b", slices=4, size=64, transfer_syntax_uid=JPEGLSLossless, uid_seed="bench"
    )
    other = demo.write_ct_series(tmp_path / "c", slices=4, size=64, uid_seed="other")
    assert len(first) == 4
    read = [pydicom.dcmread(p) for p in first]
    assert all(ds.file_meta.TransferSyntaxUID == JPEGLSLossless for ds in read)
    assert all(ds.pixel_array.shape == (64, 64) for ds in read)
    assert [ds.SOPInstanceUID for ds in read] == [pydicom.dcmread(p).SOPInstanceUID for p in again]
    assert pydicom.dcmread(other[0]).StudyInstanceUID != read[0].StudyInstanceUID


def test_jpeg_lossless_falls_back_without_dcmtk(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(shutil, "which", lambda _name: None)
    monkeypatch.setattr(demo, "_dcmcjpeg_warned", False)
    with caplog.at_level(logging.WARNING, logger="demo.studies"):
        paths = demo.write_ct_series(
            tmp_path, slices=2, size=32, transfer_syntax_uid=JPEGLosslessSV1
        )
    assert [pydicom.dcmread(p).file_meta.TransferSyntaxUID for p in paths] == [
        ExplicitVRLittleEndian
    ] * 2
    assert "dcmcjpeg" in caplog.text


@pytest.mark.skipif(shutil.which("dcmcjpeg") is None, reason="DCMTK not installed")
def test_jpeg_lossless_with_dcmtk(tmp_path: pathlib.Path) -> None:
    paths = demo.write_ct_series(tmp_path, slices=2, size=64, transfer_syntax_uid=JPEGLosslessSV1)
    plain = demo.write_ct_series(tmp_path / "plain", slices=2, size=64)
    for compressed, reference in zip(paths, plain, strict=True):
        ds, original = pydicom.dcmread(compressed), pydicom.dcmread(reference)
        assert ds.file_meta.TransferSyntaxUID == JPEGLosslessSV1
        assert ds.SOPInstanceUID == original.SOPInstanceUID
        assert np.array_equal(ds.pixel_array, original.pixel_array)  # truly lossless


def test_unsupported_transfer_syntax_is_rejected(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ValueError, match="transfer syntax"):
        demo.write_ct_series(
            tmp_path, slices=1, size=32, transfer_syntax_uid="1.2.840.10008.1.2.4.50"
        )


def test_sample_files() -> None:
    files = demo.sample_files()
    assert len(files) >= 50
    assert files == sorted(files)
    assert len({f.name for f in files}) == len(files)
    for path in files:
        with path.open("rb") as handle:
            assert handle.read(132)[128:] == b"DICM", path


# -- the demo is not the product -------------------------------------------------------------

def _flask(instance: pathlib.Path, env_name: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``flask --app app ARGS`` from the repository, as ``make demo`` runs it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PORTAL_")}
    env.update(PORTAL_INSTANCE_PATH=str(instance), PORTAL_ENV=env_name,
               PORTAL_SECRET_KEY="k" * 40)
    return subprocess.run([sys.executable, "-m", "flask", "--app", "app", *args], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=300)


def test_demo_commands_exist_only_in_development(tmp_path: pathlib.Path) -> None:
    for env_name, present in (("development", True), ("test", False), ("production", False)):
        listing = _flask(tmp_path / env_name, env_name, "--help")
        assert listing.returncode == 0, listing.stderr
        commands = {line.split()[0] for line in listing.stdout.split("Commands:")[1].splitlines()
                    if line.strip()}
        assert {"archive", "hl7", "db"} <= commands
        assert ({"demo", "demo-idp"} <= commands) is present, (env_name, commands)
    refused = _flask(tmp_path / "production", "production", "demo")
    assert refused.returncode == 2 and "No such command 'demo'" in refused.stderr
    refused = _flask(tmp_path / "production", "production", "demo-idp")
    assert refused.returncode == 2 and "No such command 'demo-idp'" in refused.stderr


def test_the_product_neither_ships_nor_imports_the_demo() -> None:
    import tomllib

    import setuptools

    config = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    find = config["tool"]["setuptools"]["packages"]["find"]
    # What `pip wheel .` packs: pyproject's packages.find (namespace packages by default).
    shipped = setuptools.find_namespace_packages(
        where=str(REPO_ROOT), include=find.get("include", ["*"]), exclude=find.get("exclude", ()))
    assert {"portal", "portal.archive", "portal.reports"} <= set(shipped)
    assert not [p for p in shipped if p.split(".")[0] != "portal"], shipped
    modules = sorted((REPO_ROOT / "portal").rglob("*.py"))
    assert not [m for m in modules if m.stem.startswith("demo")]
    importing = [m for m in modules if any(
        line.lstrip().startswith(("import demo", "from demo"))
        for line in m.read_text().splitlines())]
    assert importing == []


def test_flask_demo_imports_the_set_and_adds_people_and_reports(
        generated: GeneratedSet, tmp_path: pathlib.Path) -> None:
    """`make demo`'s first step, `flask --app app demo`, on an already generated set."""
    instance = tmp_path / "instance"
    # Hard links: the generated set is about 120 MB and lives on the same file system.
    shutil.copytree(generated.root, instance / "demo", copy_function=os.link)
    (instance / "demo" / ".complete").touch()
    done = _flask(instance, "development", "demo", "--no-samples")
    assert done.returncode == 0, done.stderr
    assert f"stored: {len(generated.paths)}, already stored: 0, refused: 0" in done.stdout
    assert "wrote instance/config.toml" in done.stdout
    assert "registered 7 demo people" in done.stdout
    assert "sent 4 demo report messages" in done.stdout
    studies = {str(ds.StudyInstanceUID) for ds in generated.datasets.values()}
    with sqlite3.connect(instance / "portal.db") as connection:
        imported = connection.execute(
            "SELECT study_instance_uid, details FROM audit_event WHERE event_id = '110107' "
            "AND outcome = 0 AND who = 'cli:demo'").fetchall()
    # One record per file, committed with its index row (docs/security.md 40).
    assert {uid for uid, _details in imported} == studies
    assert sum(json.loads(details)["instances"] for _uid, details in imported) == \
        len(generated.paths)
    again = _flask(instance, "development", "demo", "--no-samples")
    assert again.returncode == 0, again.stderr
    assert f"stored: 0, already stored: {len(generated.paths)}" in again.stdout
    assert "registered" not in again.stdout
